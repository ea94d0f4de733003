"""words: train -> evaluate -> predict -> export on the shipped FSDD sample, and bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from apps.speech import data
from apps.speech.__main__ import main
from apps.speech.features import FeatureCache, FeatureConfig

SAMPLE = sorted(data.SAMPLES.glob("*.wav"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    run_dir, cache = root / "run", root / "cache"
    code = main(["words", "train", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                 "--epochs", "2", "--units", "8", "--layers", "1", "--batch-size", "16"])
    assert code == 0
    return run_dir, cache


def test_run_directory(run):
    run_dir, cache = run
    for name in ("config.json", "metrics.json", "model.keras", "saved_model", "logs",
                 "checkpoints"):
        assert (run_dir / name).exists(), name
    settings = json.loads((run_dir / "config.json").read_text())["app_settings"]
    assert settings["labels"] == list("0123456789")
    assert settings["examples"]["test"] == 30  # index 0 of 3 speakers x 10 digits
    # The default augmentation, speed perturbation included, was used and recorded.
    assert settings["augmentation"]["speed"] == [0.9, 1.1]
    assert settings["augmentation"]["time_masks"] == settings["augmentation"]["freq_masks"] == 2
    assert list(cache.rglob("*.npz"))  # the MFCC cache was filled


def test_deterministic_training_repeats_bit_for_bit(run, tmp_path):
    # Without --deterministic the two models differ (the parallel augmentation
    # map draws its random numbers in a varying order): checked when written.
    from tensorflow.python.framework import config as tf_config

    from common.runs import load_keras

    _, cache = run
    weights = []
    for name in ("first", "second"):
        assert main(["words", "train", "--run-dir", str(tmp_path / name), "--cache-dir",
                     str(cache), "--epochs", "2", "--units", "8", "--layers", "1",
                     "--batch-size", "16", "--seed", "3", "--deterministic"]) == 0
        weights.append(load_keras(tmp_path / name / "model.keras").get_weights())
        assert not tf_config.is_op_determinism_enabled()  # only for the command
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    training = json.loads((tmp_path / "first" / "config.json").read_text())["training"]
    assert training["deterministic"] is True


def test_evaluate_json(run, capsys):
    run_dir, cache = run
    assert main(["words", "evaluate", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["examples"] == 30
    assert 0.0 <= metrics["accuracy"] <= 1.0
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 30
    assert np.isclose(np.trace(confusion) / 30, metrics["accuracy"])
    assert set(metrics["per_class_accuracy"]) == set("0123456789")
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "logs" / "evaluate").iterdir())  # TensorBoard image


def test_predict_and_unreadable_file(run, capsys, tmp_path):
    run_dir, _ = run
    assert main(["words", "predict", "--run-dir", str(run_dir), str(SAMPLE[0])]) == 0
    name, label, prob = capsys.readouterr().out.strip().split("\t")
    assert name == str(SAMPLE[0]) and label in "0123456789" and 0 < float(prob) <= 1
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    assert main(["words", "predict", "--run-dir", str(run_dir), str(SAMPLE[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "notes.wav" in captured.err and "not readable as audio" in captured.err
    assert str(SAMPLE[0]) in captured.out  # the good file is still answered


CHILD = """
import json, sys
import numpy as np, soundfile as sf, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
y, rate = sf.read(sys.argv[2], dtype="float32")
out = serve(waveform=tf.constant(y[None]))
# A batch: the clip zero-padded, silence, one sample, NaN; and an empty batch.
batch = np.zeros((4, len(y) + 800), np.float32)
batch[0, :len(y)], batch[2, 0], batch[3] = y, 0.5, np.nan
many = serve(waveform=tf.constant(batch))
empty = serve(waveform=tf.zeros([0, 100]))
assert not any(m.split(".")[0] in ("apps", "common") for m in sys.modules), "our code loaded"
print(json.dumps({"label": out["label"].numpy()[0].decode(),
                  "probabilities": out["probabilities"].numpy()[0].tolist(),
                  "valid": out["valid"].numpy().tolist(),
                  "batch_labels": [b.decode() for b in many["label"].numpy()],
                  "batch_valid": many["valid"].numpy().tolist(),
                  "batch_probabilities": many["probabilities"].numpy().tolist(),
                  "empty": list(empty["probabilities"].shape)}))
"""


def test_saved_model_on_raw_waveform_in_fresh_process(run, tmp_path):
    run_dir, _ = run
    assert main(["words", "export", "--run-dir", str(run_dir), "--out",
                 str(tmp_path / "export")]) == 0
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "export"),
                             str(SAMPLE[5])], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    from apps.speech.features import load_audio, mfcc, pad_sequences
    from common.runs import load_keras

    settings = json.loads((run_dir / "config.json").read_text())["app_settings"]
    cfg = FeatureConfig.from_dict(settings["features"])
    x = pad_sequences([mfcc(load_audio(SAMPLE[5], cfg.sample_rate), cfg)],
                      settings["max_frames"])
    want = load_keras(run_dir / "model.keras", compile=False).predict(x, verbose=0)[0]
    np.testing.assert_allclose(served["probabilities"], want, atol=1e-3)
    assert served["label"] == settings["labels"][int(np.argmax(want))]
    assert served["valid"] == [True]
    # In a batch the clip gets the same answer as alone, whatever the padding;
    # audio `predict` refuses gets no answer, and says so.
    np.testing.assert_allclose(served["batch_probabilities"][0], served["probabilities"],
                               atol=1e-5)
    assert served["batch_labels"] == [served["label"], "", "", ""]
    assert served["batch_valid"] == [True, False, False, False]
    assert served["batch_probabilities"][1:] == [[0.0] * len(want)] * 3
    assert served["empty"] == [0, len(want)]


def test_labels_absent_from_the_model(run, tmp_path, capsys):
    run_dir, cache = run
    folder = tmp_path / "commands"
    for label, source in (("3", SAMPLE[30]), ("yes", SAMPLE[0])):
        (folder / label).mkdir(parents=True)
        shutil.copy(source, folder / label / "a_nohash_0.wav")
    assert main(["words", "evaluate", "--run-dir", str(run_dir), "--data", str(folder),
                 "--cache-dir", str(cache), "--json"]) == 0
    captured = capsys.readouterr()
    assert "label 'yes' is not one the model knows" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["examples"] == 1
    assert main(["words", "evaluate", "--run-dir", str(run_dir), "--data", str(folder),
                 "--strict"]) == 2
    assert "yes/a_nohash_0.wav" in capsys.readouterr().err


# -- data handling (no training) -------------------------------------------------------


def test_bad_files_are_skipped_or_stop_with_strict(tmp_path, capsys):
    for path in SAMPLE[:4]:
        shutil.copy(path, tmp_path)
    (tmp_path / "7_bob_1.wav").write_bytes(b"")
    (tmp_path / "8_bob_2.wav").write_bytes(b"RIFF....junk")
    (tmp_path / "README.md").write_text("not audio")
    clips, layout = data.load_clips(str(tmp_path))
    assert layout == "fsdd" and len(clips) == 6
    assert "ignored 1 file" in capsys.readouterr().err
    cache = FeatureCache(tmp_path / "cache", FeatureConfig(sample_rate=8000))
    features, kept = data.clip_features(clips, cache)
    assert len(kept) == 4
    err = capsys.readouterr().err
    assert "7_bob_1.wav: empty file" in err and "skipped 2 of 6" in err
    code = main(["words", "train", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path),
                 "--cache-dir", str(tmp_path / "cache"), "--strict"])
    assert code == 2
    assert "7_bob_1.wav" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.keras").exists()


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    assert main(["words", "train", "--run-dir", str(tmp_path / "r"), "--data",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such folder" in err


def test_official_and_speaker_independent_splits():
    clips = data.fsdd_clips(data.SAMPLES)
    official = data.split_clips(clips)
    assert all(c.index <= 4 for c in official["test"])
    assert all(c.index > 4 for c in official["train"] + official["validation"])
    by_speaker = data.split_clips(clips, test_speakers=("george",))
    assert {c.speaker for c in by_speaker["test"]} == {"george"}
    assert "george" not in {c.speaker for c in by_speaker["train"] + by_speaker["validation"]}
    with pytest.raises(data.UserError, match="no recordings of zed"):
        data.split_clips(clips, test_speakers=("zed",))


def test_speech_commands_layout(tmp_path):
    for label in ("yes", "no"):
        (tmp_path / label).mkdir()
        for i, speaker in enumerate(("aa11", "bb22", "cc33")):
            shutil.copy(SAMPLE[i], tmp_path / label / f"{speaker}_nohash_{i}.wav")
    (tmp_path / "_background_noise_").mkdir()
    shutil.copy(SAMPLE[0], tmp_path / "_background_noise_" / "noise.wav")
    (tmp_path / "validation_list.txt").write_text("yes/bb22_nohash_1.wav\n")
    (tmp_path / "testing_list.txt").write_text("yes/cc33_nohash_2.wav\nno/cc33_nohash_2.wav\n")
    clips, layout = data.load_clips(str(tmp_path))
    assert layout == "speech_commands" and len(clips) == 6
    splits = data.split_clips(clips)
    assert {c.name.split("/")[-1] for c in splits["test"]} == {"cc33_nohash_2.wav"}
    assert [c.speaker for c in splits["validation"]] == ["bb22"]
    assert {c.label for c in splits["train"]} == {"yes", "no"}


def test_tfds_speech_commands_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        clips, layout = data.load_clips("tfds:speech_commands")
    assert layout == "tfds" and len(clips) == 9
    assert {c.split for c in clips} == set(data.SPLITS)
    assert all(c.audio.dtype == np.float32 and c.rate == 16000 for c in clips)
    names = tfds.builder("speech_commands").info.features["label"].names
    assert all(c.label in names for c in clips)
