"""Binary sentiment classification: model, serving module and metrics.

    raw strings -> TextVectorization -> Embedding(mask_zero) -> Bidirectional(LSTM) x N
                -> Dense(1, sigmoid) = P(positive)

The vectorizer is adapted on the training split only and lives inside the
model, so model.keras and the SavedModel take raw strings. The Embedding can
start from pre-trained word vectors (apps/nlp/embeddings.py); they end up in
the model's weights, so serving still needs nothing but the strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from common.lstm import LSTM


@dataclass(frozen=True)
class SentimentConfig:
    """The model settings of a sentiment run (stored in config.json)."""

    vocabulary: tuple[str, ...]
    max_len: int = 256
    embedding_dim: int = 64
    units: int = 64
    layers: int = 1
    dropout: float = 0.3
    embedding_dropout: float = 0.0  # dropout on the word vectors (regularises fine-tuning)
    pooling: str = "last"  # "last": the final states; "max": max over time of every state
    embeddings: str | None = None  # the pre-trained vectors file, if any
    freeze_embeddings: bool = False
    embeddings_vocabulary: int = 0  # the vectors file's commonest words added
    init_from: str | None = None  # the run whose vocabulary and weights this one starts from

    def to_json(self) -> dict:
        d = asdict(self)
        d["vocabulary"] = len(self.vocabulary)  # the words are in model.keras
        return d


def adapt_vocabulary(texts: list[str], max_tokens: int) -> tuple[str, ...]:
    """The vocabulary TextVectorization learns from `texts` (training split only)."""
    vectorizer = keras.layers.TextVectorization(max_tokens=max_tokens)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(512))
    # Drop "" (padding) and "[UNK]": the layer adds them back itself.
    return tuple(str(w) for w in vectorizer.get_vocabulary()[2:])


@keras.saving.register_keras_serializable(package="lstm_suite")
class MaskedMaxOverTime(keras.layers.Layer):
    """Max over the real (unmasked) steps of (batch, steps, features) -> (batch, features).

    `keras.layers.GlobalMaxPooling1D` ignores the mask, and `Bidirectional`
    returns zeros at padded steps, so a padded text would pool max(its states,
    0): one text read differently depending on how much padding it got. Here
    padding never wins; a text with no real step (empty) pools to zeros.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return keras.ops.max(inputs, axis=1)
        real = keras.ops.expand_dims(keras.ops.cast(mask, "bool"), -1)
        pooled = keras.ops.max(keras.ops.where(real, inputs, float("-inf")), axis=1)
        return keras.ops.where(keras.ops.any(real, axis=1), pooled, 0.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def build_model(config: SentimentConfig,
                embedding_matrix: np.ndarray | None = None) -> keras.Model:
    """(batch,) strings -> (batch, 1) probability of the positive class.

    `embedding_matrix` (len(vocabulary) + 2, embedding_dim) initialises the
    Embedding (see embeddings.embedding_matrix); it is set as a weight, not as
    an initializer, so the model's config stays small.
    """
    inputs = keras.Input(shape=(1,), dtype="string", name="text")
    # Fixed output length: every batch has one shape, so the LSTM compiles once.
    ids = keras.layers.TextVectorization(vocabulary=list(config.vocabulary),
                                         output_sequence_length=config.max_len,
                                         name="vectorizer")(inputs)
    embedding = keras.layers.Embedding(len(config.vocabulary) + 2, config.embedding_dim,
                                       mask_zero=True, trainable=not config.freeze_embeddings,
                                       name="embedding")
    x = embedding(ids)
    if config.embedding_dropout > 0:
        x = keras.layers.Dropout(config.embedding_dropout, name="embedding_dropout")(x)
    for i in range(config.layers):
        last = i == config.layers - 1
        sequences = not last or config.pooling == "max"
        # Named, so the inspection's TensorBoard tags (forward_lstm_0, ...) do
        # not depend on how many models the process built before.
        x = keras.layers.Bidirectional(LSTM(config.units, return_sequences=sequences,
                                            name=f"lstm_{i}"), name=f"bilstm_{i}")(x)
        if last and config.pooling == "max":
            # Max over time of every state: a word anywhere in the text can decide.
            x = MaskedMaxOverTime(name="max_over_time")(x)
        if config.dropout > 0:
            x = keras.layers.Dropout(config.dropout, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="positive", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="sentiment")
    if embedding_matrix is not None:
        embedding.set_weights([embedding_matrix])  # raises on a shape mismatch
    return model


def pretrained_parts(model: keras.Model) -> tuple[tuple[str, ...], dict[str, list]]:
    """The vocabulary and the weights (by layer name) a fine-tuning run starts from.

    Everything with weights but the vectorizer: the embedding, every BiLSTM and
    the output layer, as numpy arrays, so they outlive the source model's session.
    """
    vocabulary = tuple(str(w) for w in model.get_layer("vectorizer").get_vocabulary()[2:])
    weights = {layer.name: layer.get_weights() for layer in model.layers
               if layer.weights and layer.name != "vectorizer"}
    return vocabulary, weights


def set_pretrained_weights(model: keras.Model, weights: dict[str, list]) -> None:
    """Load `pretrained_parts` weights into a model built from the same shape."""
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)


def as_inputs(texts: list[str]) -> np.ndarray:
    """Texts as the model's (batch, 1) string input."""
    return np.asarray(texts, dtype=object)[:, None]


def predict_texts(model: keras.Model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """P(positive) for each text, shape (n,)."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(texts)[:, None]).batch(batch_size)
    return model.predict(ds, verbose=0)[:, 0]


def serving_sample() -> tf.Tensor:
    """Two texts to trace the SavedModel's signature with."""
    return tf.constant(["a fine film", "dull and boring"])


class Serving(tf.Module):
    """``serving_default(text: string[batch]) -> {"probability": float[batch]}``."""

    def __init__(self, model: keras.Model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text):
        return {"probability": self.model(text[:, None], training=False)[:, 0]}


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, ROC AUC, F1 (positive class) and the confusion matrix at 0.5."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype="float64").reshape(-1)
    pred = (probs >= 0.5).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "examples": len(labels),
        "accuracy": (tp + tn) / max(1, len(labels)),
        "roc_auc": roc_auc(labels, probs),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        # rows = true label, columns = predicted label, [negative, positive]
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None  # undefined with one class
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
