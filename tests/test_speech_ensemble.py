"""words and digits ensembles: trained runs -> one run that averages their predictions."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from apps.speech import data
from apps.speech.__main__ import main
from apps.speech.features import FeatureConfig, load_audio, mfcc, pad_sequences
from common.runs import load_keras

SAMPLE = sorted(data.SAMPLES.glob("*.wav"))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    runs = []
    for seed in (1, 2):
        run_dir = root / f"seed{seed}"
        assert main(["words", "train", "--run-dir", str(run_dir), "--cache-dir",
                     str(root / "cache"), "--seed", str(seed), "--epochs", "1", "--units", "8",
                     "--layers", "1", "--batch-size", "16", "--speed", "none"]) == 0
        runs.append(run_dir)
    return root, runs


def features(run_dir, files):
    settings = json.loads((run_dir / "config.json").read_text())["app_settings"]
    cfg = FeatureConfig.from_dict(settings["features"])
    return pad_sequences([mfcc(load_audio(f, cfg.sample_rate), cfg) for f in files],
                         settings["max_frames"])


def test_ensemble_averages_its_members_and_serves_like_any_run(members, tmp_path, capsys):
    import tensorflow as tf

    root, runs = members
    ensemble = tmp_path / "ensemble"
    assert main(["words", "ensemble", "--run-dir", str(ensemble), "--members",
                 *map(str, runs)]) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
    for name in ("config.json", "metrics.json", "model.keras", "saved_model"):
        assert (ensemble / name).exists(), name
    settings = json.loads((ensemble / "config.json").read_text())["app_settings"]
    assert settings["ensemble_members"] == [str(r) for r in runs]

    x = features(runs[0], SAMPLE[:6])
    alone = [load_keras(r / "model.keras", compile=False).predict(x, verbose=0) for r in runs]
    assert not np.allclose(alone[0], alone[1])  # different seeds, different members
    mean = load_keras(ensemble / "model.keras", compile=False).predict(x, verbose=0)
    np.testing.assert_allclose(mean, (alone[0] + alone[1]) / 2, atol=1e-6)

    # The SavedModel takes a raw waveform, like a single run's.
    serve = tf.saved_model.load(str(ensemble / "saved_model")).signatures["serving_default"]
    wave = load_audio(SAMPLE[0], FeatureConfig.from_dict(settings["features"]).sample_rate)
    served = serve(waveform=tf.constant(wave[None]))["probabilities"].numpy()[0]
    np.testing.assert_allclose(served, mean[0], atol=1e-3)

    assert main(["words", "evaluate", "--run-dir", str(ensemble), "--cache-dir",
                 str(root / "cache"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["examples"] == 30 and 0.0 <= metrics["accuracy"] <= 1.0
    assert main(["words", "predict", "--run-dir", str(ensemble), str(SAMPLE[0])]) == 0
    assert capsys.readouterr().out.split("\t")[1] == settings["labels"][int(mean[0].argmax())]


def test_members_that_do_not_fit_together_are_refused(members, tmp_path, capsys):
    root, runs = members
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["app_settings"]["labels"] = list("abcdefghij")
    (other / "config.json").write_text(json.dumps(config))
    cases = [
        (["--members", str(runs[0]), str(other)], "differs from", "in labels"),
        (["--members", str(runs[0])], "needs at least 2 runs", ""),
        (["--members", str(runs[0]), str(tmp_path / "nothing")], "no such run directory",
         "--members "),
    ]
    for flags, expect, more in cases:
        out_dir = tmp_path / "ensemble"
        assert main(["words", "ensemble", "--run-dir", str(out_dir), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0] and more in err[0], err
        assert not out_dir.exists()
    assert main(["words", "ensemble", "--run-dir", str(runs[0]), "--members",
                 *map(str, runs)]) == 2
    assert "is one of the --members" in capsys.readouterr().err


def test_features_are_compared_as_trained(members, tmp_path, capsys):
    # A run from before --floor-db stored no floor_db: it was trained with 80.
    # Ensembles and --resume compare what the features were, not the stored keys.
    root, runs = members
    before, eighty = tmp_path / "before", tmp_path / "eighty"
    for source, copy, floor in ((runs[0], before, None), (runs[1], eighty, 80.0)):
        shutil.copytree(source, copy)
        config = json.loads((copy / "config.json").read_text())
        config["app_settings"]["features"].pop("floor_db")
        if floor is not None:
            config["app_settings"]["features"]["floor_db"] = floor
        (copy / "config.json").write_text(json.dumps(config))
    assert main(["words", "ensemble", "--run-dir", str(tmp_path / "same"), "--members",
                 str(before), str(eighty)]) == 0
    capsys.readouterr()
    assert main(["words", "ensemble", "--run-dir", str(tmp_path / "mixed"), "--members",
                 str(before), str(runs[1])]) == 2
    assert "in features" in capsys.readouterr().err
    # --resume with today's default floor (60) would train the old run on other features.
    kept = {p: p.read_bytes() for p in before.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["words", "train", "--run-dir", str(before), "--resume", "--cache-dir",
                 str(root / "cache"), "--epochs", "2", "--units", "8", "--layers", "1",
                 "--batch-size", "16", "--speed", "none"]) == 2
    err = capsys.readouterr().err
    assert "trained on other features (floor_db: 80.0 -> 60.0)" in err, err
    assert "--floor-db 80" in err
    assert {p: p.read_bytes() for p in before.rglob("*")
            if p.is_file() and p.name != ".lock"} == kept


def test_runs_of_an_older_feature_computation(members, tmp_path, capsys):
    # Runs from before the features version was stored were computed by version 1.
    root, runs = members
    old = tmp_path / "old"
    shutil.copytree(runs[0], old)
    config = json.loads((old / "config.json").read_text())
    assert config["app_settings"].pop("features_version") == 2
    (old / "config.json").write_text(json.dumps(config))
    kept = {p: p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["words", "train", "--run-dir", str(old), "--resume", "--cache-dir",
                 str(root / "cache"), "--epochs", "2", "--units", "8", "--layers", "1",
                 "--batch-size", "16", "--speed", "none"]) == 2
    err = capsys.readouterr().err
    assert "older feature computation (version 1, now 2: a clip ends at its last non-zero " \
           "sample)" in err, err
    assert {p: p.read_bytes() for p in old.rglob("*")
            if p.is_file() and p.name != ".lock"} == kept
    # evaluate still works, and says why its numbers may differ a little
    assert main(["words", "evaluate", "--run-dir", str(old), "--cache-dir",
                 str(root / "cache"), "--json"]) == 0
    assert "trained with feature computation version 1" in capsys.readouterr().err
    # an ensemble does not mix versions
    assert main(["words", "ensemble", "--run-dir", str(tmp_path / "mixed"), "--members",
                 str(old), str(runs[1])]) == 2
    assert "in features_version" in capsys.readouterr().err


def spikes(path, frames=12):
    """CTC logits that emit digit d at frame t for each (t, d), blank elsewhere."""
    from apps.speech.model import BLANK

    logits = np.full((frames, BLANK + 1), -4.0, np.float32)
    logits[:, BLANK] = 4.0
    for t, digit in path:
        logits[t, BLANK], logits[t, digit] = -4.0, 4.0
    return logits


def test_ensemble_decoding_combines_strings_not_frames():
    import tensorflow as tf

    from apps.speech.model import decode

    # Three members hear "12", "12" and "13", each with its peaks on other frames.
    members = [spikes([(1, 1), (5, 2)]), spikes([(3, 1), (8, 2)]), spikes([(2, 1), (9, 3)])]
    mean = np.mean([tf.nn.softmax(m).numpy() for m in members], axis=0)
    # Averaging frame by frame loses every digit (blank wins each frame 2 to 1) ...
    assert decode(tf.constant(np.log(mean))[None], [12]).numpy()[0] == b""
    # ... the sequence-level ensemble keeps the majority's string, greedy or beam.
    stacked = tf.constant(np.stack(members)[None])  # (batch, members, frames, 11)
    for width in (0, 8):
        assert decode(stacked, [12], beam_width=width).numpy().tolist() == [b"12"]
    # Batches with other lengths, inside a tf.function (as in the SavedModel).
    batch = tf.concat([stacked, stacked[:, :, ::-1]], axis=0)
    graph = tf.function(lambda x, n: decode(x, n, beam_width=4),
                        input_signature=[tf.TensorSpec([None, 3, None, 11]),
                                         tf.TensorSpec([None], tf.int32)])
    assert graph(batch, tf.constant([12, 10])).numpy().tolist() == [b"12", b"21"]
    # A repeated digit needs the blank between its peaks; silence is "", even
    # for a row of no frames at all.
    twice = tf.constant(np.stack([spikes([(1, 1), (3, 1)])] * 2)[None])
    silent = tf.constant(np.stack([spikes([])] * 2)[None])
    for width in (0, 4):
        assert decode(twice, [12], beam_width=width).numpy().tolist() == [b"11"]
        assert decode(silent, [12], beam_width=width).numpy().tolist() == [b""]
        assert decode(silent, [0], beam_width=width).numpy().tolist() == [b""]


def test_ensemble_scores_are_ctc_log_probabilities():
    import tensorflow as tf

    from apps.speech.model import BLANK, _log_probability

    logits = np.random.default_rng(0).normal(size=(3, 12, BLANK + 1)).astype("float32") * 3
    labels = np.array([[1, 2, -1], [-1, -1, -1], [1, 1, 3]], np.int32)
    lengths = np.array([12, 9, 12], np.int32)
    dense = -tf.nn.ctc_loss(labels=np.maximum(labels, 0), logits=logits,
                            label_length=(labels >= 0).sum(1), logit_length=lengths,
                            logits_time_major=False, blank_index=BLANK).numpy()
    np.testing.assert_allclose(_log_probability(logits, labels, lengths).numpy(), dense,
                               rtol=1e-5)


def test_digits_ensemble_transcribes_with_all_its_members(tmp_path, capsys):
    import subprocess
    import sys

    import tensorflow as tf

    cache = tmp_path / "cache"
    tiny = ["--cache-dir", str(cache), "--epochs", "1", "--units", "8", "--layers", "1",
            "--utterances", "16", "--test-utterances", "4", "--max-digits", "2",
            "--batch-size", "8", "--speed", "none"]
    runs = [tmp_path / f"seed{seed}" for seed in (1, 2)]
    for seed, run_dir in zip((1, 2), runs, strict=True):
        assert main(["digits", "train", "--run-dir", str(run_dir), "--seed", str(seed),
                     *tiny]) == 0
    ensemble = tmp_path / "ensemble"
    assert main(["digits", "ensemble", "--run-dir", str(ensemble), "--beam-width", "2",
                 "--members", *map(str, runs)]) == 0
    assert "members' test wer:" in capsys.readouterr().out
    metrics = json.loads((ensemble / "metrics.json").read_text())
    assert [m["utterances"] for m in metrics["member_test"]] == [4, 4]
    settings = json.loads((ensemble / "config.json").read_text())["app_settings"]
    assert settings["beam_width"] == 2

    x = np.random.default_rng(1).normal(size=(2, 32, 39)).astype("float32")
    alone = [load_keras(r / "model.keras", compile=False)(x).numpy() for r in runs]
    both = load_keras(ensemble / "model.keras", compile=False)(x).numpy()
    np.testing.assert_allclose(both, np.stack(alone, axis=1), atol=1e-6)

    # evaluate in a fresh process: loading the ensemble registers its layer itself.
    result = subprocess.run(
        [sys.executable, "-m", "apps.speech", "digits", "evaluate", "--run-dir", str(ensemble),
         "--cache-dir", str(cache), "--json"],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["utterances"] == 4 and scores["wer"] >= 0
    serve = tf.saved_model.load(str(ensemble / "saved_model")).signatures["serving_default"]
    wave = load_audio(SAMPLE[0], 8000)
    assert set(serve(waveform=tf.constant(wave[None]))["digits"].numpy()[0].decode()) <= set(
        "0123456789")

    # Members with another test corpus are refused, before anything is written.
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["app_settings"]["corpus_seed"] = 5
    (other / "config.json").write_text(json.dumps(config))
    refused = tmp_path / "refused"
    assert main(["digits", "ensemble", "--run-dir", str(refused), "--members", str(runs[0]),
                 str(other)]) == 2
    err = capsys.readouterr().err
    assert "in corpus_seed" in err and not refused.exists()
