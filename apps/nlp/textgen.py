"""Character-level text generation (char-rnn / nanoGPT style): model, data, generation.

    characters (strings) -> StringLookup -> Embedding -> N x LSTM -> Dense -> next-char logits

The vocabulary lives in the model (the StringLookup layer), so model.keras and
the SavedModel map text to text. Generation is incremental: each new character
runs one step of every LSTM cell from the carried (h, c) state, so its cost does
not grow with the length of the text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import keras
import numpy as np
import tensorflow as tf

from apps.nlp import data as nlp_data
from common.lstm import LSTM

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TextgenConfig:
    """The model and data settings of a textgen run (stored in config.json)."""

    vocabulary: tuple[str, ...]
    seq_len: int = 100
    embedding_dim: int = 64
    units: int = 256
    layers: int = 1
    dropout: float = 0.0
    stateful: bool = False
    batch_size: int = 64

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 1  # + the unknown character, id 0

    def to_json(self) -> dict:
        return asdict(self)


@keras.saving.register_keras_serializable(package="lstm_suite")
def bits_per_char(y_true, y_pred):
    """Cross-entropy in bits per character (the loss is in nats)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True) / LN2


def build_model(config: TextgenConfig) -> keras.Model:
    """(batch, time) single characters -> (batch, time, vocab) next-character logits."""
    if config.stateful:
        # A stateful LSTM keeps one state row per batch row: the batch size is fixed.
        inputs = keras.Input(batch_shape=(config.batch_size, None), dtype="string", name="chars")
    else:
        inputs = keras.Input(shape=(None,), dtype="string", name="chars")
    ids = keras.layers.StringLookup(vocabulary=list(config.vocabulary), num_oov_indices=1,
                                    mask_token=None, name="vocabulary")(inputs)
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim, name="embedding")(ids)
    for i in range(config.layers):
        x = LSTM(config.units, return_sequences=True, stateful=config.stateful,
                 name=f"lstm_{i}")(x)
        if config.dropout > 0:
            x = keras.layers.Dropout(config.dropout, name=f"dropout_{i}")(x)
    logits = keras.layers.Dense(config.vocab_size, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="textgen")


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- datasets ------------------------------------------------------------------


def make_dataset(text: str, config: TextgenConfig, what: str, *, shuffle: bool = False,
                 seed: int = 0) -> tf.data.Dataset:
    """Batched (characters, next-character ids) with a fixed shape (one XLA compile).

    Stateful runs keep char-rnn's stream order (no shuffling); otherwise the
    non-overlapping windows are shuffled every epoch when `shuffle`.
    """
    ids = nlp_data.encode(text, list(config.vocabulary))
    if config.stateful:
        windows = nlp_data.make_streams(ids, config.seq_len, config.batch_size, what)
        batch, shuffle = config.batch_size, False
    else:
        windows = nlp_data.make_windows(ids, config.seq_len, what)
        batch = min(config.batch_size, len(windows.x))
    table = tf.constant(["[UNK]", *config.vocabulary])
    ds = tf.data.Dataset.from_tensor_slices((windows.x, windows.y))
    if shuffle:
        ds = ds.shuffle(len(windows.x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda x, y: (tf.gather(table, x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class ResetStates(keras.callbacks.Callback):
    """Stateful runs: every epoch and every evaluation starts from a zero state."""

    def _reset(self):
        for layer in self.model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_states()

    def on_epoch_begin(self, epoch, logs=None):
        self._reset()

    def on_test_begin(self, logs=None):
        self._reset()


# -- generation ------------------------------------------------------------------


class Generator(tf.Module):
    """Incremental sampling from a trained textgen model, exportable as a SavedModel.

    ``serve(prime, length, temperature, seed)`` is the serving signature;
    ``sample`` adds top-k and top-p (nucleus) filtering. Temperature <= 0 means
    greedy decoding. Sampling is stateless-random, so (inputs, seed) fix the
    output: the same call gives the same text in-process and after reloading.
    """

    def __init__(self, model: keras.Model):
        super().__init__()
        self.model = model
        self.lookup = model.get_layer("vocabulary")
        self.embedding = model.get_layer("embedding")
        self.lstms = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
        self.dense = model.get_layer("logits")
        vocab = [str(v) for v in self.lookup.get_vocabulary()]  # "[UNK]" first
        self.table = tf.constant(vocab)
        self.vocab_size = len(vocab)
        # An empty prime starts from a newline, like a new paragraph.
        self.start_id = vocab.index("\n") if "\n" in vocab else 0

    def _step(self, ids, states):
        """One character for every LSTM cell: ids (1,) and [(h, c), ...] -> logits (1, V)."""
        x = self.embedding(ids)
        new_states = []
        for layer, (h, c) in zip(self.lstms, states, strict=True):
            # The cell is the layer's own one-step function (same weights): a
            # single step needs neither the time loop nor an XLA compile.
            x, (h, c) = layer.cell(x, [h, c], training=False)
            new_states.append((h, c))
        # float32 whatever the compute dtype (--mixed-precision): the loop's
        # logits keep one dtype.
        return tf.cast(self.dense(x), tf.float32), new_states

    def _pick(self, logits, temperature, top_k, top_p, seed, step):
        logits = tf.cast(logits[0], tf.float32)
        never_unknown = tf.one_hot(0, self.vocab_size, on_value=-np.inf, off_value=0.0)
        logits = logits + never_unknown
        greedy = tf.argmax(logits, output_type=tf.int32)
        scaled = logits / tf.maximum(temperature, 1e-6)
        ranked = tf.sort(scaled, direction="DESCENDING")
        k = tf.clip_by_value(top_k, 1, self.vocab_size)
        kth = tf.gather(ranked, k - 1)
        scaled = tf.where((top_k > 0) & (scaled < kth), -np.inf, scaled)
        # Nucleus: keep the smallest set of top characters whose mass reaches top_p.
        ranked = tf.sort(scaled, direction="DESCENDING")
        before = tf.math.cumsum(tf.nn.softmax(ranked), exclusive=True)
        kept = tf.boolean_mask(ranked, before < top_p)
        floor = tf.reduce_min(tf.concat([kept, ranked[:1]], 0))
        scaled = tf.where((top_p < 1.0) & (scaled < floor), -np.inf, scaled)
        sampled = tf.random.stateless_categorical(
            scaled[None], 1, seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)]),
            dtype=tf.int32)[0, 0]
        return tf.where(temperature > 0, sampled, greedy)

    def _generate(self, prime, length, temperature, top_k, top_p, seed):
        chars = tf.strings.unicode_split(prime, "UTF-8")
        ids = tf.cast(self.lookup(chars), tf.int32)
        ids = tf.cond(tf.size(ids) > 0, lambda: ids, lambda: tf.constant([self.start_id]))
        # The cells compute (and return their states) in the layers' compute
        # dtype: bfloat16 or float16 under --mixed-precision.
        states = [(tf.zeros([1, layer.units], layer.compute_dtype),
                   tf.zeros([1, layer.units], layer.compute_dtype)) for layer in self.lstms]
        logits = tf.zeros([1, self.vocab_size])

        def read_prime(i, logits, states):
            logits, states = self._step(ids[i][None], states)
            return i + 1, logits, states

        _, logits, states = tf.while_loop(lambda i, *_: i < tf.size(ids), read_prime,
                                          (tf.constant(0), logits, states))
        out = tf.TensorArray(tf.int32, size=tf.maximum(length, 0))

        def sample(j, logits, states, out):
            next_id = self._pick(logits, temperature, top_k, top_p, seed, j)
            logits, states = self._step(next_id[None], states)
            return j + 1, logits, states, out.write(j, next_id)

        _, _, _, out = tf.while_loop(lambda j, *_: j < length, sample,
                                     (tf.constant(0), logits, states, out))
        generated = tf.strings.reduce_join(tf.gather(self.table, out.stack()))
        return {"text": prime + generated, "generated": generated}

    @tf.function(input_signature=[
        tf.TensorSpec([], tf.string, name="prime"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int64, name="seed"),
    ])
    def serve(self, prime, length, temperature, seed):
        """prime + `length` sampled characters (temperature <= 0: greedy)."""
        return self._generate(prime, length, temperature, tf.constant(0), tf.constant(1.0), seed)

    @tf.function(input_signature=[
        tf.TensorSpec([], tf.string, name="prime"),
        tf.TensorSpec([], tf.int32, name="length"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"),
        tf.TensorSpec([], tf.int64, name="seed"),
    ])
    def sample(self, prime, length, temperature, top_k, top_p, seed):
        """Like `serve`, with top-k (0: off) and top-p (1.0: off) filtering."""
        return self._generate(prime, length, temperature, top_k, top_p, seed)


def serving_sample(vocabulary) -> dict:
    """Raw input for the export self-check (greedy, so it is exactly reproducible)."""
    prime = "".join(vocabulary[:3])
    return {"prime": tf.constant(prime), "length": tf.constant(16),
            "temperature": tf.constant(0.0), "seed": tf.constant(0, tf.int64)}


class TextSamples(keras.callbacks.Callback):
    """Writes a generated sample to TensorBoard (RUN/logs/samples) after each epoch."""

    def __init__(self, log_dir: str, prime: str, length: int = 300, temperature: float = 0.8):
        super().__init__()
        self.log_dir, self.prime, self.length, self.temperature = (
            log_dir, prime, length, temperature)
        self._writer = None
        self._generator = None

    def on_epoch_end(self, epoch, logs=None):
        if self._generator is None:
            self._generator = Generator(self.model)
            self._writer = tf.summary.create_file_writer(self.log_dir)
        out = self._generator.serve(tf.constant(self.prime), tf.constant(self.length),
                                    tf.constant(self.temperature), tf.constant(epoch, tf.int64))
        text = out["text"].numpy().decode("utf-8", errors="replace")
        with self._writer.as_default():
            # Markdown: indent by 4 spaces so TensorBoard keeps the line breaks.
            tf.summary.text("sample", "\n".join("    " + ln for ln in text.split("\n")),
                            step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
