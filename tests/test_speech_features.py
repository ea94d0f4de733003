"""MFCC features: librosa vs tf.signal, the cache, and unusable audio."""

import hashlib

import numpy as np
import pytest
import soundfile as sf

from apps.speech import features as F
from apps.speech.data import SAMPLES

CFG = F.FeatureConfig(sample_rate=8000)
FILES = sorted(SAMPLES.glob("*.wav"))


def test_tf_signal_matches_librosa_on_real_recordings():
    constants = F.graph_constants(CFG)
    for path in FILES[::9]:  # 10 recordings, 3 speakers
        y = F.load_audio(path, CFG.sample_rate)
        want = F.mfcc(y, CFG, name=str(path))
        got = F.tf_features(y, CFG, constants).numpy()
        assert got.shape == want.shape, path
        # The tolerance the docs state; measured ~2e-5.
        np.testing.assert_allclose(got, want, atol=1e-3, err_msg=str(path))


def test_log_mel_floor_in_both_paths():
    # A higher floor (--floor-db 30) changes the features, and tf.signal still
    # matches librosa; the default floor keeps the cache key caches already use.
    cfg = F.FeatureConfig(sample_rate=8000, floor_db=30.0)
    constants = F.graph_constants(cfg)
    changed = 0
    for path in FILES[::9]:
        y = F.load_audio(path, cfg.sample_rate)
        want = F.mfcc(y, cfg, name=str(path))
        np.testing.assert_allclose(F.tf_features(y, cfg, constants).numpy(), want, atol=1e-3,
                                   err_msg=str(path))
        changed += not np.allclose(want, F.mfcc(y, CFG), atol=1e-2)
    assert changed == len(FILES[::9])
    assert cfg.key() != CFG.key()


def test_batch_features_match_single_whatever_the_padding():
    # A clip's features alone and zero-padded in a batch must agree: a served
    # answer cannot depend on the other clips of the request.
    constants = F.graph_constants(CFG)
    waves = [F.load_audio(p, CFG.sample_rate) for p in FILES[:3]]
    batch = np.zeros((3, max(map(len, waves)) + 803), np.float32)
    for i, w in enumerate(waves):
        batch[i, :len(w)] = w
    x, lengths = F.tf_batch_features(batch, CFG, constants, max_frames=150)
    assert x.shape == (3, 150, CFG.dim)
    for i, w in enumerate(waves):
        single = F.mfcc(w, CFG)
        assert int(lengths[i]) == len(single)
        np.testing.assert_allclose(x[i, :len(single)], single, atol=1e-3)
        assert np.all(x[i, int(lengths[i]):] == 0)
        # librosa agrees: zeros after the clip are not part of it
        np.testing.assert_array_equal(F.mfcc(np.pad(w, (0, 37)), CFG), single)


def test_padding_cannot_add_a_trim_frame_when_the_hop_exceeds_half_a_window():
    # digits' defaults: hop 20 ms > half of the 32 ms window. librosa's last
    # frame of a clip can stop short of its last samples; a frame of the padded
    # row that reaches them must not count (it did, and kept a frame more).
    cfg = F.FeatureConfig(sample_rate=8000, hop_ms=20.0)
    constants = F.graph_constants(cfg)
    t = np.arange(3350) / 8000.0
    y = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    y[3350 - 528:3350 - 22] = 0.0
    y[3350 - 22:] = 0.5  # a loud step at the very end
    y[100] = 1e-40  # a denormal: TensorFlow flushes it to zero, so both paths must
    single = F.mfcc(y, cfg)
    batch = np.zeros((2, 4000), np.float32)
    batch[0, :len(y)] = y
    batch[1, 40:40 + len(y)] = y
    x, lengths = F.tf_batch_features(batch, cfg, constants)
    assert int(lengths[0]) == len(single)
    np.testing.assert_allclose(x[0, :len(single)], single, atol=1e-3)
    np.testing.assert_allclose(F.tf_features(y, cfg, constants).numpy(), single, atol=1e-3)


@pytest.mark.parametrize("rate, window_ms", [(8000, 32.0), (44100, 32.0), (8000, 31.875)])
def test_an_odd_window_and_a_click_on_the_last_sample(rate, window_ms):
    # An odd FFT size (32 ms at 44.1 kHz is 1411 samples) has one trim frame
    # fewer per clip than an even one: a padded row must not gain it; and the
    # Hann window must be librosa's periodic one at any length.
    cfg = F.FeatureConfig(sample_rate=rate, hop_ms=20.0, window_ms=window_ms)
    constants = F.graph_constants(cfg)
    n = 10 * cfg.hop
    y = (1e-4 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
    y[-1] = 1.0
    batch = np.zeros((2, n + cfg.hop), np.float32)
    batch[0, :n], batch[1] = y, 0.1
    try:  # librosa's frames reach the click only for an even FFT size
        frames = len(F.mfcc(y, cfg))
    except F.AudioError:  # the click alone is loud: less than a window is left
        frames = 0
    assert (frames > 0) == (cfg.n_fft % 2 == 1)
    assert int(F.tf_batch_features(batch, cfg, constants)[1][0]) == frames
    assert int(F.tf_batch_features(y[None], cfg, constants)[1][0]) == frames
    clip = F.load_audio(FILES[0], rate)
    np.testing.assert_allclose(F.tf_features(clip, cfg, constants).numpy(), F.mfcc(clip, cfg),
                               atol=1e-3)


def test_batch_features_of_unusable_audio_have_length_zero():
    # Everything `mfcc` refuses: silence, less than one window, a loud click
    # that trims to less than one window, NaN; and an empty batch.
    constants = F.graph_constants(CFG)
    clip = F.load_audio(FILES[0], CFG.sample_rate)
    batch = np.zeros((5, len(clip)), np.float32)
    batch[0] = clip
    batch[2, 0] = 0.5
    batch[3, :CFG.n_fft // 2] = 1e-4
    batch[3, 2000] = 1.0
    batch[4] = np.nan
    for row in batch[1:4]:
        with pytest.raises(F.AudioError):
            F.mfcc(row, CFG)
    x, lengths = F.tf_batch_features(batch, CFG, constants)
    assert int(lengths[0]) == len(F.mfcc(clip, CFG)) and lengths.numpy()[1:].tolist() == [0] * 4
    assert np.all(x.numpy()[1:] == 0) and np.all(np.isfinite(x.numpy()))
    x, lengths = F.tf_batch_features(np.zeros((0, 800), np.float32), CFG, constants)
    assert x.shape[0] == 0 and lengths.shape == (0,)


def test_cache_hits_second_time_and_is_npz(tmp_path, monkeypatch):
    cache = F.FeatureCache(tmp_path, CFG)
    first = cache.file_features(FILES[0])
    stored = list(tmp_path.rglob("*.npz"))
    assert len(stored) == 1
    np.load(stored[0], allow_pickle=False)["mfcc"]  # no pickle needed

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(F, "mfcc", boom)
    np.testing.assert_array_equal(F.FeatureCache(tmp_path, CFG).file_features(FILES[0]), first)
    # other settings -> another key -> a miss
    with pytest.raises(AssertionError, match="recomputed"):
        F.FeatureCache(tmp_path, F.FeatureConfig(sample_rate=8000, n_mfcc=12)).file_features(
            FILES[0])


def test_cache_keys_of_files_waveforms_and_speeds_stay_the_same(tmp_path):
    # Caches written before keep being hit: the key scheme must not change.
    def sha1(data: bytes) -> str:
        return hashlib.sha1(data).hexdigest()

    cache = F.FeatureCache(tmp_path, CFG)
    y = F.load_audio(FILES[0], CFG.sample_rate)
    cache.file_features(FILES[0])
    cache.file_features(FILES[0], speed=0.9)
    cache.wave_features(y, "y")
    cache.wave_features(y, "y", speed=1.1)
    content, wave = sha1(FILES[0].read_bytes()), sha1(y.tobytes())
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz")} == {
        f"{CFG.key()}/{digest[:2]}/{digest}.npz"
        for digest in (content, sha1(f"{content}:speed=0.9".encode()), wave,
                       sha1(f"{wave}:speed=1.1".encode()))}


def test_stereo_and_other_rate_are_mixed_down_and_resampled(tmp_path):
    y, rate = sf.read(FILES[0], dtype="float32")
    stereo = np.stack([y, y], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, rate)
    out = F.load_audio(path, 16000)
    assert out.ndim == 1 and abs(len(out) - 2 * len(y)) <= 2


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"RIFF\x00\x00garbage-not-a-wave" * 3, "not readable as audio"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(F.AudioError, match=f"bad.wav.*{message}"):
        F.load_audio(path, 8000)
    with pytest.raises(F.AudioError, match="no such file"):
        F.load_audio(tmp_path / "missing.wav", 8000)


def test_short_zero_length_and_silent_clips(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(100, np.float32) + 0.1, 8000)
    with pytest.raises(F.AudioError, match="short.wav.*shorter than one analysis window"):
        F.FeatureCache(None, CFG).file_features(path)
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), 8000)
    with pytest.raises(F.AudioError, match="zero.wav"):
        F.load_audio(path, 8000)
    with pytest.raises(F.AudioError, match="silent"):
        F.mfcc(np.zeros(4000, np.float32), CFG, name="quiet")
