"""words ensemble: trained runs -> one run whose probabilities are the mean of theirs."""

import json
import shutil

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
