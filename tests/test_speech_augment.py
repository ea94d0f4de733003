"""Training-data augmentation: SpecAugment-style masking on MFCCs, speed perturbation."""

import numpy as np
import pytest
import tensorflow as tf

from apps.speech import features as F
from apps.speech.__main__ import _speeds, main
from apps.speech.data import SAMPLES
from apps.speech.model import augment_fn

COEFFS, BLOCKS, FRAMES, LENGTH = 13, 3, 60, 48


def _example(seed: int = 0) -> np.ndarray:
    """(FRAMES, 39) normal features (no exact zeros), zero padding after LENGTH."""
    x = np.random.default_rng(seed).normal(size=(FRAMES, COEFFS * BLOCKS)).astype(np.float32)
    x[np.abs(x) < 1e-3] = 0.5
    x[LENGTH:] = 0.0
    return x


def _run(fn, xs: np.ndarray, seed: int) -> np.ndarray:
    """`fn` mapped over xs in tf.data (as in training) under a global seed."""
    tf.random.set_seed(seed)
    ds = tf.data.Dataset.from_tensor_slices((xs, np.zeros(len(xs), np.int32))).map(fn)
    return np.stack([x.numpy() for x, _ in ds])


def _zero(a: np.ndarray) -> np.ndarray:
    return np.abs(a) < 1e-5  # masked values are the mean (0), stored as 1e-6


def test_disabled_augmentation_is_the_identity():
    xs = np.stack([_example(i) for i in range(4)])
    out = _run(augment_fn(0, 0.0, 0, 0.0), xs, seed=1)
    np.testing.assert_array_equal(out, xs)


def test_shape_padding_and_seeded_determinism():
    xs = np.stack([_example(i) for i in range(8)])
    fn = augment_fn(0, 0.05, 4, 0.1, time_masks=2, time_mask_width=5, freq_masks=2,
                    freq_mask_width=2, blocks=BLOCKS)
    first, again, other = _run(fn, xs, 7), _run(fn, xs, 7), _run(fn, xs, 8)
    assert first.shape == xs.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for x in first:
        valid = np.any(x != 0, axis=-1)
        length = int(valid.sum())
        # Only the leading shift (<= 4 frames) shortens an example; padding stays
        # exactly zero and every real frame has a non-zero value (not read as padding).
        assert LENGTH - 4 <= length <= LENGTH and valid[:length].all()
        assert np.all(x[length:] == 0)


def test_frequency_masks_blank_the_same_band_in_every_block():
    xs = np.stack([_example(i) for i in range(32)])
    out = _run(augment_fn(0, 0.0, 0, 0.0, freq_masks=1, freq_mask_width=3, blocks=BLOCKS), xs, 3)
    widths = []
    for x, original in zip(out, xs, strict=True):
        blank = _zero(x[:LENGTH]).all(axis=0)  # whole columns at the mean
        parts = blank.reshape(BLOCKS, COEFFS)
        assert (parts == parts[0]).all()  # the same coefficients in MFCC, delta, delta-delta
        band = np.flatnonzero(parts[0])
        widths.append(len(band))
        if len(band):
            assert len(band) <= 3 and band[-1] - band[0] == len(band) - 1  # one contiguous band
        # Everything outside the band is untouched.
        np.testing.assert_array_equal(x[:LENGTH][:, ~blank], original[:LENGTH][:, ~blank])
    assert max(widths) >= 2  # masking happened


def test_time_masks_blank_short_spans_and_leave_the_rest():
    xs = np.stack([_example(i) for i in range(32)])
    out = _run(augment_fn(0, 0.0, 0, 0.0, time_masks=1, time_mask_width=20), xs, 5)
    widths = []
    for x, original in zip(out, xs, strict=True):
        blank = _zero(x).all(axis=1)[:LENGTH]
        rows = np.flatnonzero(blank)
        widths.append(len(rows))
        if len(rows):
            # One span, at most an eighth of the utterance even though time_mask_width is 20.
            assert rows[-1] - rows[0] == len(rows) - 1 and len(rows) <= LENGTH // 8
        np.testing.assert_array_equal(x[:LENGTH][~blank], original[:LENGTH][~blank])
        assert np.all(x[LENGTH:] == 0)
    assert max(widths) >= 3


def test_speed_perturbation_changes_length_and_is_cached_per_factor(tmp_path, monkeypatch):
    cfg = F.FeatureConfig(sample_rate=8000)
    path = sorted(SAMPLES.glob("*.wav"))[0]
    y = F.load_audio(path, cfg.sample_rate)
    assert F.speed_perturb(y, 1.0, cfg.sample_rate) is y
    fast, slow = (F.speed_perturb(y, f, cfg.sample_rate) for f in (1.1, 0.9))
    assert abs(len(fast) - len(y) / 1.1) <= 2 and abs(len(slow) - len(y) / 0.9) <= 2
    cache = F.FeatureCache(tmp_path, cfg)
    base, quick = cache.file_features(path), cache.file_features(path, 1.1)
    assert len(quick) < len(base)
    assert len(list(tmp_path.rglob("*.npz"))) == 2  # one entry per factor

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(F, "mfcc", boom)
    np.testing.assert_array_equal(cache.file_features(path, 1.1), quick)


def test_speed_flag():
    assert _speeds("0.9,1.1") == (0.9, 1.1)
    assert _speeds("none") == () and _speeds("1") == ()
    assert _speeds("1,0.95,0.95") == (0.95,)


@pytest.mark.parametrize("value", ["fast", "0.1", "0.9,x"])
def test_bad_speed_flag_is_one_line(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["words", "train", "--run-dir", str(tmp_path / "r"), "--speed", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--speed" in err[-1] and "speed factors" in err[-1]


def test_digit_utterances_get_one_seeded_speed_each():
    from apps.speech.__main__ import _utterance_features
    from apps.speech.data import connected_digits, fsdd_clips

    cfg = F.FeatureConfig(sample_rate=8000, hop_ms=20.0)
    cache = F.FeatureCache(None, cfg)
    utterances = connected_digits(fsdd_clips(SAMPLES), 8, seed=0, sample_rate=8000, max_digits=2)
    plain, _ = _utterance_features(utterances, cache, False)
    first, kept = _utterance_features(utterances, cache, False, (0.9, 1.1), seed=3)
    again, _ = _utterance_features(utterances, cache, False, (0.9, 1.1), seed=3)
    assert len(kept) == len(utterances)
    assert [len(x) for x in first] == [len(x) for x in again]  # seeded
    changed = [len(a) != len(b) for a, b in zip(first, plain, strict=True)]
    assert any(changed)  # some utterances were played faster or slower
