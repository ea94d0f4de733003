"""Audio -> MFCC features, twice: with librosa (training) and with tf.signal (serving).

Both paths compute the same thing, step by step:

1. trim leading/trailing silence: zeros after the last non-zero sample are
   dropped (in a batch they are the padding of a shorter clip), then frames
   (window `n_fft`, hop `hop`) whose RMS is more than `trim_db` below the
   loudest frame are cut (`librosa.effects.trim`);
2. power spectrogram (periodic Hann window, centred frames, zero padding),
   Slaney mel filterbank, dB floored `floor_db` below the utterance's
   loudest mel bin, DCT-II (orthonormal): `librosa.feature.mfcc`;
3. deltas and delta-deltas (Savitzky-Golay, width 9, edge frames repeated:
   `librosa.feature.delta(mode="nearest")`);
4. per-utterance mean/variance normalisation of every coefficient.

`tf_features` is the graph version the exported SavedModel runs on a raw
waveform; the mel matrix and filter coefficients are baked in as constants, so
the SavedModel needs neither librosa nor this module. On real recordings the
two agree to ~1e-3 after normalisation (float32 vs librosa's float64 steps;
see tests/test_speech_features.py).

`FeatureCache` keeps librosa's features on disk (npz, keyed by the file's
bytes and the settings), so a second run does not recompute them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "lstm-suite" / "mfcc"
_DELTA_WIDTH = 9
_AMIN = 1e-10
# The smallest normal float32: TensorFlow flushes smaller (denormal) samples to
# zero, so both paths count them as zeros.
_TINY = float(np.finfo(np.float32).tiny)
# The version of the computation below, stored with every run and in the
# cache key; FEATURES_CHANGE says what the current version changed.
FEATURES_VERSION = 2
FEATURES_CHANGE = "a clip ends at its last non-zero sample"


class AudioError(UserError):
    """A recording that cannot be used (unreadable, empty, too short)."""


@dataclass(frozen=True)
class FeatureConfig:
    """MFCC settings; everything a saved model needs to recompute its input."""

    sample_rate: int = 16000
    n_mfcc: int = 13
    window_ms: float = 32.0  # analysis window = FFT size
    hop_ms: float = 10.0
    n_mels: int = 40
    trim_db: float = 40.0  # silence threshold below the loudest frame
    # Log-mel floor below the loudest bin. Recordings differ most in their quiet
    # parts (noise floor, microphone, how tightly the clip was cut); a higher
    # floor makes those parts look alike. 80 is librosa's power_to_db default.
    floor_db: float = 80.0
    deltas: bool = True  # append deltas and delta-deltas

    @property
    def n_fft(self) -> int:
        return int(round(self.window_ms * self.sample_rate / 1000))

    @property
    def hop(self) -> int:
        return int(round(self.hop_ms * self.sample_rate / 1000))

    @property
    def dim(self) -> int:
        return self.n_mfcc * (3 if self.deltas else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def key(self) -> str:
        settings = {**self.to_dict(), "version": FEATURES_VERSION}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# -- librosa ------------------------------------------------------------------


def load_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """A file as mono float32 at `sample_rate` (resampled, channels averaged).

    Raises:
        AudioError: missing, empty, not audio, or no samples; names the file.
    """
    import librosa
    import soundfile

    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file (WAV/FLAC/OGG)")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes), expected audio (WAV/FLAC/OGG)")
    try:
        soundfile.info(str(path))  # reads the header only: says why a file is not audio
    except soundfile.SoundFileError as exc:
        reason = str(exc).rsplit(": ", 1)[-1]  # "Error opening 'PATH': Format not recognised."
        raise AudioError(f"{path}: not readable as audio (WAV/FLAC/OGG): "
                         f"{reason.rstrip('.')}") from None
    try:
        y, _ = librosa.load(path, sr=sample_rate, mono=True)
    except Exception as exc:  # noqa: BLE001  (soundfile/audioread raise many kinds)
        raise AudioError(f"{path}: not readable as audio (WAV/FLAC/OGG): "
                         f"{_first_line(exc)}") from None
    if y.size == 0:
        raise AudioError(f"{path}: contains no samples")
    if not np.all(np.isfinite(y)):
        raise AudioError(f"{path}: contains NaN/inf samples")
    return y.astype(np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def mfcc(y: np.ndarray, cfg: FeatureConfig, *, name: str = "waveform") -> np.ndarray:
    """Normalised MFCC (+ deltas) of a mono waveform, shape (frames, cfg.dim).

    Raises:
        AudioError: nothing is left after trimming silence, or less than one
            analysis window (`cfg.n_fft` samples).
    """
    import librosa

    if y.size < cfg.n_fft:
        raise AudioError(f"{name}: {y.size} samples, shorter than one analysis window "
                         f"({cfg.n_fft} samples = {cfg.window_ms:g} ms at {cfg.sample_rate} Hz)")
    if not np.all(np.isfinite(y)):
        raise AudioError(f"{name}: contains NaN/inf samples")
    nonzero = np.flatnonzero(np.abs(y) >= _TINY)
    if not nonzero.size:
        raise AudioError(f"{name}: silent (every sample is zero)")
    # The graph cannot tell a clip's trailing zeros from a batch's padding, so
    # neither path lets the trimmed clip reach past the last non-zero sample.
    y = y[:nonzero[-1] + 1]
    trimmed, _ = librosa.effects.trim(y, top_db=cfg.trim_db, frame_length=cfg.n_fft,
                                      hop_length=cfg.hop)
    if trimmed.size < cfg.n_fft:
        raise AudioError(f"{name}: silent (less than one {cfg.window_ms:g} ms window above "
                         f"-{cfg.trim_db:g} dB)")
    mel = librosa.feature.melspectrogram(y=trimmed, sr=cfg.sample_rate, n_fft=cfg.n_fft,
                                         hop_length=cfg.hop, n_mels=cfg.n_mels, window="hann",
                                         center=True, pad_mode="constant")
    coeffs = librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=cfg.floor_db),
                                  n_mfcc=cfg.n_mfcc)
    parts = [coeffs]
    if cfg.deltas:
        parts += [librosa.feature.delta(coeffs, width=_DELTA_WIDTH, order=k, mode="nearest")
                  for k in (1, 2)]
    x = np.concatenate(parts, axis=0).T.astype(np.float32)
    return normalise(x)


def speed_perturb(y: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """The waveform played `factor` times faster (Kaldi/sox "speed" perturbation).

    Resampling from `factor * sample_rate` to `sample_rate` shortens the clip by
    `factor` and scales every frequency (pitch and formants) by it: roughly what
    a speaker with a shorter or longer vocal tract sounds like, which is why it
    helps speaker-independent recognition (Ko et al., 2015).
    """
    import librosa

    if factor == 1.0:
        return y
    out = librosa.resample(y, orig_sr=factor * sample_rate, target_sr=sample_rate)
    return out.astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    """Per-utterance mean/variance normalisation of every feature column."""
    mean = x.mean(axis=0, keepdims=True)
    var = x.var(axis=0, keepdims=True)
    return ((x - mean) / np.sqrt(var + 1e-6)).astype(np.float32)


# -- cache ----------------------------------------------------------------------


class FeatureCache:
    """MFCCs on disk: one npz per (content, settings); writes are atomic.

    The key is the SHA-1 of the file's bytes (or of the waveform) plus the
    settings, so renamed or copied files hit the cache and edited files miss it.
    """

    def __init__(self, root: str | os.PathLike | None, cfg: FeatureConfig):
        self.cfg = cfg
        self.root = None if root is None else Path(root).expanduser() / cfg.key()

    def _path(self, digest: str) -> Path | None:
        return None if self.root is None else self.root / digest[:2] / f"{digest}.npz"

    def _load(self, digest: str) -> np.ndarray | None:
        path = self._path(digest)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["mfcc"]
        except Exception:  # noqa: BLE001  (a damaged entry is recomputed)
            return None

    def _store(self, digest: str, x: np.ndarray) -> None:
        path = self._path(digest)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, mfcc=x)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def file_features(self, path: str | os.PathLike, speed: float = 1.0) -> np.ndarray:
        """MFCCs of an audio file (computed and stored on a miss).

        `speed` != 1 gives the features of the speed-perturbed recording
        (`speed_perturb`), cached under their own key.
        """
        path = Path(path)
        if not path.is_file():
            load_audio(path, self.cfg.sample_rate)  # raises the right AudioError
        with open(path, "rb") as f:  # in chunks: memory stays bounded for any file size
            digest = hashlib.file_digest(f, "sha1").hexdigest()
        return self._cached(digest, speed, lambda: self._mfcc(
            load_audio(path, self.cfg.sample_rate), speed, str(path)))

    def wave_features(self, y: np.ndarray, name: str, speed: float = 1.0) -> np.ndarray:
        """MFCCs of a waveform already at the configured rate (optionally speed-perturbed)."""
        y = np.ascontiguousarray(y, dtype=np.float32)
        digest = hashlib.sha1(y.tobytes()).hexdigest()
        return self._cached(digest, speed, lambda: self._mfcc(y, speed, name))

    def _mfcc(self, y: np.ndarray, speed: float, name: str) -> np.ndarray:
        return mfcc(speed_perturb(y, speed, self.cfg.sample_rate), self.cfg, name=name)

    def _cached(self, digest: str, speed: float, compute) -> np.ndarray:
        """The entry of content `digest` at `speed`; on a miss, `compute()`, stored."""
        if speed != 1.0:  # the perturbed features have their own key
            digest = hashlib.sha1(f"{digest}:speed={speed!r}".encode()).hexdigest()
        x = self._load(digest)
        if x is None:
            x = compute()
            self._store(digest, x)
        return x


# -- tf.signal ---------------------------------------------------------------------


def graph_constants(cfg: FeatureConfig) -> dict[str, np.ndarray]:
    """Analysis window, mel matrix and delta filters as arrays, to bake into a graph."""
    import librosa
    from scipy.signal import get_window, savgol_coeffs

    mel = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
    # "dot" order: coefficient k multiplies frame t - 4 + k.
    d1 = savgol_coeffs(_DELTA_WIDTH, 1, deriv=1, use="dot")
    d2 = savgol_coeffs(_DELTA_WIDTH, 2, deriv=2, use="dot")
    # librosa's periodic Hann window; tf.signal.hann_window(periodic=True) is
    # symmetric for odd lengths (a 32 ms window at 44.1 kHz is 1411 samples).
    window = get_window("hann", cfg.n_fft, fftbins=True)
    return {"window": window.astype(np.float32), "mel": mel.T.astype(np.float32),
            "delta1": d1.astype(np.float32), "delta2": d2.astype(np.float32)}


def tf_features(y, cfg: FeatureConfig, constants: dict[str, np.ndarray]):
    """The graph version of `mfcc` for one waveform (1-D float32 tensor).

    Returns (frames, cfg.dim) features. Graphs cannot raise nicely, so audio
    `mfcc` refuses (silent, shorter than one window, NaN/inf) still gives a
    few frames of features that mean nothing; `tf_batch_features` gives such
    clips length 0 and zeros.
    """
    return _tf_features(y, cfg, constants)[0]


def _tf_features(y, cfg: FeatureConfig, constants: dict[str, np.ndarray]):
    """(features, usable): `tf_features` and whether `mfcc` would accept the clip."""
    import tensorflow as tf

    n_fft, hop = cfg.n_fft, cfg.hop
    y = tf.convert_to_tensor(y, tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(y))
    y = tf.where(finite, y, tf.zeros_like(y))

    # 1. trim: RMS of centred frames, in dB relative to the loudest one, over
    # the clip up to its last non-zero sample (a batch row's padding starts
    # there): librosa's frames of y[:n] are the first of these.
    n = tf.reduce_max(tf.where(tf.abs(y) >= _TINY, tf.range(1, tf.shape(y)[0] + 1), 0))
    padded = tf.pad(y, [[n_fft // 2, n_fft // 2]])
    power = tf.reduce_mean(tf.square(tf.signal.frame(padded, n_fft, hop)), axis=-1)
    power = power[:tf.maximum(1, 1 + (n + 2 * (n_fft // 2) - n_fft) // hop)]
    db = 10.0 * _log10(tf.maximum(power, _AMIN)) - \
        10.0 * _log10(tf.maximum(tf.reduce_max(power), _AMIN))
    loud = tf.cast(tf.where(db > -cfg.trim_db)[:, 0], tf.int32)
    start = tf.cond(tf.size(loud) > 0, lambda: loud[0] * hop, lambda: 0)
    end = tf.cond(tf.size(loud) > 0, lambda: tf.minimum(n, (loud[-1] + 1) * hop), lambda: 0)
    usable = finite & (end - start >= n_fft)
    y = y[start:end]
    y = tf.pad(y, [[0, tf.maximum(0, n_fft - tf.shape(y)[0])]])  # too short: pad

    # 2. MFCC
    padded = tf.pad(y, [[n_fft // 2, n_fft // 2]])
    stft = tf.signal.stft(padded, frame_length=n_fft, frame_step=hop, fft_length=n_fft,
                          window_fn=lambda n, dtype: tf.constant(constants["window"], dtype),
                          pad_end=False)
    mel = tf.matmul(tf.square(tf.abs(stft)), constants["mel"])
    log_mel = 10.0 * _log10(tf.maximum(mel, _AMIN))
    log_mel = tf.maximum(log_mel, tf.reduce_max(log_mel) - cfg.floor_db)
    coeffs = tf.signal.dct(log_mel, type=2, norm="ortho")[:, :cfg.n_mfcc]

    # 3. deltas
    parts = [coeffs]
    if cfg.deltas:
        parts += [_savgol(coeffs, constants["delta1"]), _savgol(coeffs, constants["delta2"])]
    x = tf.concat(parts, axis=-1)

    # 4. normalise
    mean, var = tf.nn.moments(x, axes=[0], keepdims=True)
    return (x - mean) / tf.sqrt(var + 1e-6), usable


def _log10(x):
    import tensorflow as tf

    return tf.math.log(x) / tf.math.log(tf.constant(10.0, x.dtype))


def _savgol(x, coeffs: np.ndarray):
    """Filter along time with edge frames repeated (scipy mode="nearest")."""
    import tensorflow as tf

    half = len(coeffs) // 2
    frames = tf.shape(x)[0]
    padded = tf.concat([tf.repeat(x[:1], half, axis=0), x, tf.repeat(x[-1:], half, axis=0)], 0)
    return tf.add_n([float(c) * padded[k:k + frames] for k, c in enumerate(coeffs)])


def tf_batch_features(waveforms, cfg: FeatureConfig, constants: dict[str, np.ndarray],
                      max_frames: int | None = None):
    """Features of a batch of waveforms (B, samples), zero-padded to the longest.

    Each row is trimmed on its own and ends at its last non-zero sample, so a
    clip gets the same features alone and in a batch, whatever the padding.
    A row `mfcc` would refuse (silent, shorter than one analysis window,
    NaN/inf) gets length 0 and all-zero features. With `max_frames` the result
    has exactly that many frames (longer sequences are cut).

    Returns:
        (features (B, T, dim), lengths (B,)); length 0 = unusable audio.
    """
    import tensorflow as tf

    waveforms = tf.convert_to_tensor(waveforms, tf.float32)
    # The untrimmed frame count bounds every row's: pad all rows to it.
    bound = 1 + tf.maximum(tf.shape(waveforms)[1], cfg.n_fft) // cfg.hop

    def one(y):
        x, usable = _tf_features(y, cfg, constants)
        length = tf.where(usable, tf.shape(x)[0], 0)
        x = x[:length]
        return tf.pad(x, [[0, bound - length], [0, 0]]), length

    def every_row():
        return tf.map_fn(one, waveforms, fn_output_signature=(
            tf.TensorSpec([None, cfg.dim], tf.float32), tf.TensorSpec([], tf.int32)))

    x, lengths = tf.cond(  # map_fn cannot stack an empty batch
        tf.shape(waveforms)[0] > 0, every_row,
        lambda: (tf.zeros([0, bound, cfg.dim]), tf.zeros([0], tf.int32)))
    if max_frames is not None:
        x = tf.pad(x, [[0, 0], [0, tf.maximum(0, max_frames - bound)], [0, 0]])[:, :max_frames]
        x = tf.ensure_shape(x, [None, max_frames, cfg.dim])
        lengths = tf.minimum(lengths, max_frames)
    return x, lengths


def pad_sequences(features: list[np.ndarray], frames: int) -> np.ndarray:
    """(N, frames, dim) zero-padded (and cut) copies of variable-length features."""
    dim = features[0].shape[1] if features else 0
    out = np.zeros((len(features), frames, dim), np.float32)
    for i, x in enumerate(features):
        out[i, :min(len(x), frames)] = x[:frames]
    return out
