"""Models, losses, decoders and serving modules for the two speech tasks.

words:  MFCC frames (padded, masked) -> (Bi)LSTM stack -> softmax over labels
digits: MFCC frames (padded, masked) -> BiLSTM stack -> per-frame logits over
        10 digits + CTC blank (the last class) -> CTC loss; greedy or beam decoding

Both serving modules take a raw float32 waveform at the model's sample rate
and compute the MFCCs in-graph (`features.tf_batch_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from apps.speech.features import FeatureConfig, graph_constants, tf_batch_features
from common.lstm import LSTM

DIGITS = "0123456789"
BLANK = len(DIGITS)  # CTC blank = last class, as tf.nn.ctc_*_decoder expect


@dataclass(frozen=True)
class ModelConfig:
    units: int = 64
    layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.2


def _recurrent_stack(x, cfg: ModelConfig, *, last_returns_sequences: bool):
    for i in range(cfg.layers):
        sequences = last_returns_sequences or i < cfg.layers - 1
        layer = LSTM(cfg.units, return_sequences=sequences, name=f"lstm_{i}")
        if cfg.bidirectional:
            layer = keras.layers.Bidirectional(layer, name=f"bilstm_{i}")
        x = layer(x)
        if cfg.dropout:
            x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    return x


def build_word_model(frames: int, dim: int, n_classes: int, cfg: ModelConfig) -> keras.Model:
    """(batch, frames, dim) zero-padded MFCCs -> class probabilities."""
    inputs = keras.Input((frames, dim), name="mfcc")
    # Padding frames are all zeros; a real normalised frame never is.
    x = keras.layers.Masking(0.0, name="mask")(inputs)
    x = _recurrent_stack(x, cfg, last_returns_sequences=False)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name="speech_words")


@keras.saving.register_keras_serializable(package="lstm_suite")
class DropMask(keras.layers.Layer):
    """Identity that ends the Keras mask.

    Without it Keras would weight the per-utterance CTC loss by the per-frame
    mask of the logits (and fail on the shapes); CTC gets the lengths itself.
    """

    def compute_mask(self, inputs, mask=None):
        return None

    def call(self, inputs):
        # A new tensor: the input one carries the mask as an attribute.
        return tf.identity(inputs)


def build_ctc_model(dim: int, cfg: ModelConfig) -> keras.Model:
    """(batch, frames, dim) zero-padded MFCCs -> per-frame logits (10 digits + blank)."""
    inputs = keras.Input((None, dim), name="mfcc")
    x = keras.layers.Masking(0.0, name="mask")(inputs)
    x = _recurrent_stack(x, cfg, last_returns_sequences=True)
    x = keras.layers.Dense(len(DIGITS) + 1, name="logits", dtype="float32")(x)
    outputs = DropMask(name="unmasked", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="speech_digits")


@keras.saving.register_keras_serializable(package="lstm_suite")
def ctc_loss(y_true, logits):
    """CTC loss per example; y_true = [frame count, digit, ..., -1 padding]."""
    y_true = tf.cast(y_true, tf.int32)
    frames, labels = y_true[:, 0], y_true[:, 1:]
    label_length = tf.reduce_sum(tf.cast(labels >= 0, tf.int32), axis=1)
    loss = tf.nn.ctc_loss(labels=tf.maximum(labels, 0), logits=tf.cast(logits, tf.float32),
                          label_length=label_length, logit_length=frames,
                          logits_time_major=False, blank_index=BLANK)
    # Per frame of label, so the scale does not grow with the string length.
    return loss / tf.cast(tf.maximum(label_length, 1), tf.float32)


def ctc_targets(strings: Sequence[str], frames: Sequence[int], max_digits: int) -> np.ndarray:
    out = np.full((len(strings), 1 + max_digits), -1, np.int32)
    for i, (s, n) in enumerate(zip(strings, frames, strict=True)):
        out[i, 0] = n
        out[i, 1:1 + len(s)] = [int(d) for d in s]
    return out


def decode(logits, lengths, *, beam_width: int = 0):
    """Digit strings (tf.string, (batch,)) from logits (batch, frames, 11).

    beam_width 0 decodes greedily; otherwise `tf.nn.ctc_beam_search_decoder`.
    Logits of an ensemble, (batch, members, frames, 11), go to `decode_ensemble`.
    """
    if logits.shape.rank == 4:
        return decode_ensemble(logits, lengths, beam_width=beam_width)
    return _strings(_decoded(logits, lengths, beam_width, 1)[0], tf.shape(logits)[0])


def _decoded(logits, lengths, beam_width: int, top_paths: int) -> list[tf.SparseTensor]:
    """The `top_paths` best label sequences of each row, as tf.nn.ctc_*_decoder give them."""
    time_major = tf.transpose(tf.cast(logits, tf.float32), [1, 0, 2])
    lengths = tf.cast(lengths, tf.int32)
    if beam_width > 0:
        decoded, _ = tf.nn.ctc_beam_search_decoder(time_major, lengths,
                                                   beam_width=max(beam_width, top_paths),
                                                   top_paths=top_paths)
        return decoded
    return tf.nn.ctc_greedy_decoder(time_major, lengths)[0]


def _strings(labels: tf.SparseTensor, batch) -> tf.Tensor:
    sparse = tf.SparseTensor(labels.indices, labels.values,
                             [tf.cast(batch, tf.int64), tf.maximum(labels.dense_shape[1], 1)])
    return _join(tf.RaggedTensor.from_sparse(sparse))


def decode_ensemble(logits, lengths, *, beam_width: int = 0, top_paths: int = 4):
    """Digit strings of several CTC models at once: logits (batch, members, frames, 11).

    Models trained apart emit a digit's peak on different frames (several
    frames apart on FSDD), so their per-frame probabilities cannot be averaged.
    Instead, each member proposes its `top_paths` best strings (at most
    `beam_width`; its greedy one with beam_width 0), every member scores every
    proposal by its CTC probability over all alignments, and the string with
    the highest mean probability wins.
    """
    logits = tf.cast(logits, tf.float32)
    members = logits.shape[1]
    batch = tf.shape(logits)[0]
    lengths = tf.cast(lengths, tf.int32)
    paths = min(top_paths, beam_width) if beam_width > 0 else 1
    # A row of 0 frames leaves the beam fewer than `paths` leaves; 1 frame decodes to "".
    proposals = [tf.sparse.to_dense(path, default_value=-1)
                 for m in range(members)
                 for path in _decoded(logits[:, m], tf.maximum(lengths, 1), beam_width, paths)]
    n = len(proposals)
    width = tf.maximum(tf.reduce_max([tf.shape(p)[1] for p in proposals]), 1)
    proposals = tf.stack([tf.pad(p, [[0, 0], [0, width - tf.shape(p)[1]]], constant_values=-1)
                          for p in proposals], axis=1)  # (batch, n, width)
    flat = tf.reshape(proposals, [-1, width])
    log_p = tf.stack([tf.reshape(_log_probability(tf.repeat(logits[:, m], n, axis=0), flat,
                                                  tf.repeat(lengths, n)), [batch, n])
                      for m in range(members)])
    score = tf.reduce_logsumexp(log_p, axis=0)  # log(sum over members) = log(mean) + const
    best = tf.gather(proposals, tf.argmax(score, axis=1, output_type=tf.int32), batch_dims=1)
    return _join(tf.RaggedTensor.from_tensor(best, padding=-1))


def _log_probability(logits, labels, lengths):
    """log p(labels | logits) under CTC, all alignments: logits (rows, frames, 11),
    labels (rows, width) padded with -1, lengths (rows,) frames.

    The sparse-label CTC op runs in time linear in the label length (the dense
    one in its square, which long garbage proposals make slow); it refuses
    empty labels, whose only alignment is blank at every frame, so those are
    scored apart.
    """
    labels = tf.cast(labels, tf.int32)
    empty = tf.reduce_all(labels < 0, axis=1)
    first = tf.range(tf.shape(labels)[1])[None] == 0
    labels = tf.where(empty[:, None] & first, 0, labels)  # a stand-in digit
    where = tf.where(labels >= 0)
    sparse = tf.SparseTensor(where, tf.gather_nd(labels, where), tf.shape(labels, tf.int64))
    loss = tf.nn.ctc_loss(labels=sparse, logits=logits, label_length=None,
                          logit_length=tf.maximum(lengths, 1),  # room for the stand-in
                          logits_time_major=False, blank_index=BLANK)
    frames = tf.sequence_mask(lengths, tf.shape(logits)[1], tf.float32)
    all_blank = tf.reduce_sum(tf.nn.log_softmax(logits)[..., BLANK] * frames, axis=1)
    return tf.where(empty, all_blank, -loss)


def _join(labels: tf.RaggedTensor) -> tf.Tensor:
    """One string per row of digit labels."""
    return tf.strings.reduce_join(tf.gather(tf.constant(list(DIGITS)), labels), axis=-1)


def edit_operations(truth: str, predicted: str) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of a minimal alignment of `predicted` to `truth`.

    Their sum is the edit distance. Among alignments of minimal cost the
    backtrace prefers a substitution, then a deletion, then an insertion
    (as NIST's sclite does), so the split is deterministic.
    """
    n, m = len(truth), len(predicted)
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (truth[i - 1] != predicted[j - 1]),
                             cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    subs = dels = ins = 0
    i, j = n, m
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (truth[i - 1] != predicted[j - 1]):
            subs += truth[i - 1] != predicted[j - 1]
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            dels, i = dels + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    return subs, dels, ins


def edit_distance(a: str, b: str) -> int:
    return sum(edit_operations(a, b))


def digit_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Word (digit) error rate, its substitutions, deletions and insertions, and sequence accuracy.

    WER = (substitutions + deletions + insertions) / digits of the truth.
    """
    subs = dels = ins = 0
    for t, p in zip(truth, predicted, strict=True):
        s, d, i = edit_operations(t, p)
        subs, dels, ins = subs + s, dels + d, ins + i
    digits = sum(len(t) for t in truth)
    exact = sum(t == p for t, p in zip(truth, predicted, strict=True))
    return {"wer": (subs + dels + ins) / max(digits, 1),
            "sequence_accuracy": exact / max(len(truth), 1),
            "substitutions": subs, "deletions": dels, "insertions": ins, "digits": digits,
            "utterances": len(truth)}


# -- serving -----------------------------------------------------------------------


def _waveform_spec():
    return tf.TensorSpec([None, None], tf.float32, name="waveform")


class WordServing(tf.Module):
    """waveform (batch, samples) at the model's rate -> probabilities, label, probability, valid.

    Rows of a batch are zero-padded to the same length; a row ends at its last
    non-zero sample. A row `predict` would refuse (silent, shorter than one
    analysis window, NaN/inf) gets valid = False, label "" and probabilities 0.
    """

    def __init__(self, model: keras.Model, features: FeatureConfig, labels: Sequence[str]):
        super().__init__()
        self.model = model
        self.labels = tf.constant(list(labels))
        frames = int(model.inputs[0].shape[1])
        constants = graph_constants(features)

        @tf.function(input_signature=[_waveform_spec()])
        def serve(waveform):
            x, lengths = tf_batch_features(waveform, features, constants, max_frames=frames)
            valid = lengths > 0
            probabilities = self.model(x, training=False)
            probabilities = tf.where(valid[:, None], probabilities, 0.0)
            best = tf.argmax(probabilities, axis=-1)
            label = tf.where(valid, tf.gather(self.labels, best), "")
            return {"probabilities": probabilities, "label": label,
                    "probability": tf.reduce_max(probabilities, axis=-1), "valid": valid}

        self.serve = serve


class DigitServing(tf.Module):
    """waveform (batch, samples) at the model's rate -> digits (string per row), frames, valid.

    A row `predict` would refuse (silent, shorter than one analysis window,
    NaN/inf) gets valid = False, digits "" and frames 0.
    """

    def __init__(self, model: keras.Model, features: FeatureConfig, beam_width: int = 8):
        super().__init__()
        self.model = model
        constants = graph_constants(features)

        @tf.function(input_signature=[_waveform_spec()])
        def serve(waveform):
            x, lengths = tf_batch_features(waveform, features, constants)
            valid = lengths > 0
            logits = self.model(x, training=False)
            digits = tf.cond(  # the CTC decoders refuse an empty batch
                tf.size(lengths) > 0,
                lambda: decode(logits, tf.maximum(lengths, 1), beam_width=beam_width),
                lambda: tf.zeros([0], tf.string))
            return {"digits": tf.where(valid, digits, ""), "frames": lengths, "valid": valid}

        self.serve = serve


# -- augmentation (tf.data, on cached MFCC frames) ------------------------------------


def augment_fn(seed: int, noise: float, shift: int, gain: float, *, time_masks: int = 0,
               time_mask_width: int = 0, freq_masks: int = 0, freq_mask_width: int = 0,
               blocks: int = 1):
    """A tf.data map function that perturbs (features, label) training pairs.

    Works on the cached, normalised MFCCs (so the cache stays valid): random time
    shift (drop up to `shift` leading frames, the sequence moves left), a random
    gain (every feature scaled by a factor in [1 - gain, 1 + gain]), additive
    Gaussian noise of std `noise`, then SpecAugment-style masking (Park et al.,
    2019): `freq_masks` bands of up to `freq_mask_width` coefficients and
    `time_masks` spans of up to `time_mask_width` frames (at most an eighth of
    the utterance each) are set to the utterance mean, which is 0 after
    normalisation. The feature vector is `blocks` equal parts (MFCCs, deltas,
    delta-deltas), and a band masks the same coefficients in each part. Padding
    frames stay exactly zero; real frames never become exactly zero (they would
    read as padding).
    """
    def augment(x, y):
        frames = tf.shape(x)[0]
        valid = tf.reduce_any(tf.not_equal(x, 0.0), axis=-1)
        length = tf.reduce_sum(tf.cast(valid, tf.int32))
        if shift > 0:
            k = tf.random.uniform([], 0, shift + 1, dtype=tf.int32)
            k = tf.minimum(k, tf.maximum(length - 4, 0))
            x = tf.concat([x[k:], tf.zeros_like(x[:k])], axis=0)
            length = length - k
        mask = tf.cast(tf.range(frames) < length, x.dtype)[:, None]
        if gain > 0:
            x = x * tf.random.uniform([], 1.0 - gain, 1.0 + gain)
        if noise > 0:
            x = x + tf.random.normal(tf.shape(x), stddev=noise)
        keep = tf.ones_like(x)
        if freq_masks > 0 and freq_mask_width > 0:
            coeffs = tf.shape(x)[1] // blocks
            column = tf.range(tf.shape(x)[1]) % coeffs
            for _ in range(freq_masks):
                width = tf.random.uniform([], 0, freq_mask_width + 1, dtype=tf.int32)
                start = tf.random.uniform([], 0, tf.maximum(coeffs - width, 0) + 1,
                                          dtype=tf.int32)
                band = (column >= start) & (column < start + width)
                keep = keep * tf.cast(~band, x.dtype)[None, :]
        if time_masks > 0 and time_mask_width > 0:
            limit = tf.minimum(time_mask_width, length // 8)
            row = tf.range(frames)
            for _ in range(time_masks):
                width = tf.random.uniform([], 0, limit + 1, dtype=tf.int32)
                start = tf.random.uniform([], 0, tf.maximum(length - width, 0) + 1,
                                          dtype=tf.int32)
                span = (row >= start) & (row < start + width)
                keep = keep * tf.cast(~span, x.dtype)[:, None]
        x = x * keep
        # Keep padding exactly zero (the mask) and real frames non-zero.
        x = tf.where(tf.equal(x, 0.0), 1e-6, x) * mask
        return x, y

    del seed  # the global seed set by common.training seeds tf.random
    return augment
