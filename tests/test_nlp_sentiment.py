"""sentiment: train -> evaluate -> predict -> export, the polarity loader, CV, metrics."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from apps.nlp import data as nlp_data
from apps.nlp import sentiment
from apps.nlp.__main__ import main

TINY = ["--epochs", "1", "--units", "8", "--embedding-dim", "8", "--max-len", "16",
        "--batch-size", "32", "--max-tokens", "200"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("sentiment") / "run"
    assert main(["sentiment", "train", "--run-dir", str(run), *TINY]) == 0
    return run


def test_train_writes_run_with_vectorizer_inside(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test_classification"]) >= {"accuracy", "roc_auc", "f1",
                                                    "confusion_matrix"}
    config = json.loads((run_dir / "config.json").read_text())["app_settings"]
    assert config["examples"] == {"train": 256, "validation": 32, "test": 32}
    assert (run_dir / "model.keras").exists()
    # The LSTM inspection probes a few validation reviews (raw strings).
    assert list((run_dir / "logs" / "inspection").glob("events.out.tfevents.*"))


def test_evaluate_json(run_dir, capsys):
    assert main(["sentiment", "evaluate", "--run-dir", str(run_dir), "--json"]) == 0
    metrics = last_json(capsys.readouterr().out)
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == metrics["examples"] == 32
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert 0.0 <= metrics["roc_auc"] <= 1.0


def test_evaluate_refuses_data_that_no_longer_gives_the_trained_split(run_dir, tmp_path,
                                                                      capsys):
    # The test split is redrawn from the data file: after the file changed,
    # former training rows could be scored as test.
    from apps.nlp import data as nlp_data

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    grown = tmp_path / "grown.csv"
    grown.write_text(nlp_data.SENTIMENT_SAMPLE.read_text() + "a late review,positive\n" * 20)
    config = json.loads((copy / "config.json").read_text())
    config["app_settings"]["data"] = str(grown)
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["sentiment", "evaluate", "--run-dir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"now gives \{.*'test': 34.*\} examples, not the \{.*'test': 32.*\} it "
                     "was trained on", err), err
    assert "pass --data to score a file as a whole" in err


def test_predict_strings_and_file(run_dir, tmp_path, capsys):
    file = tmp_path / "texts.txt"
    file.write_text("a charming film\n\nthe plot is dull\n")
    assert main(["sentiment", "predict", "--run-dir", str(run_dir), "superb acting",
                 "--file", str(file), "--json"]) == 0
    out = last_json(capsys.readouterr().out)
    assert len(out["probability"]) == 3  # the empty line is skipped
    assert all(0.0 <= p <= 1.0 for p in out["probability"])
    assert out["label"] == ["positive" if p >= 0.5 else "negative" for p in out["probability"]]


def test_saved_model_takes_raw_strings_in_a_fresh_process(run_dir, tmp_path):
    import tensorflow as tf

    from common.runs import load_keras

    model = load_keras(run_dir / "model.keras", compile=False)
    texts = ["a wonderful film", "dull and boring"]
    expected = sentiment.predict_texts(model, texts)
    code = textwrap.dedent(f"""
        import json
        import tensorflow as tf
        serve = tf.saved_model.load({str(run_dir / "saved_model")!r}).signatures["serving_default"]
        print(json.dumps(serve(text=tf.constant({texts!r}))["probability"].numpy().tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    del tf


def write_polarity(folder):
    """rt-polarity-like files: cp1252 bytes with 0x85 (an ellipsis) inside lines."""
    folder.mkdir()
    pos = [b"a gem of a film \x85 truly moving", b"caf\xe9 scenes are lovely"] * 10
    neg = [b"tedious \x85 and flat", b"a mess from the start"] * 10
    (folder / "rt-polarity.pos").write_bytes(b"\n".join(pos) + b"\n")
    (folder / "rt-polarity.neg").write_bytes(b"\n".join(neg) + b"\n")
    return folder


def test_polarity_loader_splits_on_newline_only(tmp_path):
    folder = write_polarity(tmp_path / "rt")
    data = nlp_data.load_labelled(str(folder))
    assert len(data) == 40  # 0x85 did not split any line
    assert data.texts[0] == "a gem of a film \u2026 truly moving"  # cp1252 decode
    assert data.texts[1] == "caf\u00e9 scenes are lovely"
    assert data.labels.tolist() == [1] * 20 + [0] * 20
    # One file of the pair finds the other.
    assert len(nlp_data.load_labelled(str(folder / "rt-polarity.neg"))) == 40


def test_cross_validation_on_polarity_files(tmp_path):
    folder = write_polarity(tmp_path / "rt")
    run = tmp_path / "cv"
    assert main(["sentiment", "train", "--run-dir", str(run), "--data", str(folder), "--cv", "2",
                 "--epochs", "1", "--units", "4", "--embedding-dim", "4", "--max-len", "8",
                 "--batch-size", "16"]) == 0
    cv = json.loads((run / "cv.json").read_text())
    assert cv["folds"] == 2 and len(cv["per_fold"]) == 2
    assert sum(f["examples"] for f in cv["per_fold"]) == 40  # every example tested once
    assert cv["accuracy_mean"] == pytest.approx(np.mean([f["accuracy"] for f in cv["per_fold"]]))
    # Every example's out-of-fold probability, in the data's order.
    lines = (run / "cv_predictions.csv").read_text().splitlines()
    assert lines[0] == "index,fold,label,probability"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(40))
    assert [int(r[2]) for r in rows] == [1] * 20 + [0] * 20
    for k, fold in enumerate(cv["per_fold"], start=1):
        mine = [(int(r[2]), float(r[3])) for r in rows if int(r[1]) == k]
        assert len(mine) == fold["examples"]
        assert np.mean([(p >= 0.5) == y for y, p in mine]) == pytest.approx(fold["accuracy"])
    # Another --seed with the first run's --split-seed: the same folds, other models.
    reseeded = tmp_path / "reseeded"
    assert main(["sentiment", "train", "--run-dir", str(reseeded), "--data", str(folder),
                 "--cv", "2", "--epochs", "1", "--units", "4", "--embedding-dim", "4",
                 "--max-len", "8", "--batch-size", "16", "--seed", "5", "--split-seed", "0"]) == 0
    other = [line.split(",") for line in
             (reseeded / "cv_predictions.csv").read_text().splitlines()[1:]]
    assert [r[:3] for r in other] == [r[:3] for r in rows]
    assert json.loads((reseeded / "cv.json").read_text())["split_seed"] == 0
    assert [r[3] for r in other] != [r[3] for r in rows]


def test_cross_validation_flags(tmp_path, capsys):
    # --mixed-precision applies to every fold; a time budget and --resume are refused.
    folder = write_polarity(tmp_path / "rt")
    flags = ["sentiment", "train", "--data", str(folder), "--cv", "2", "--epochs", "1",
             "--units", "4", "--embedding-dim", "4", "--max-len", "8", "--batch-size", "16"]
    assert main([*flags, "--run-dir", str(tmp_path / "budget"), "--max-minutes", "5"]) == 2
    assert "--cv trains K models and has no time budget" in capsys.readouterr().err
    assert not (tmp_path / "budget").exists()
    import keras

    try:
        assert main([*flags, "--run-dir", str(tmp_path / "bf16"),
                     "--mixed-precision", "mixed_bfloat16"]) == 0
        # The folds' models were built under the policy (it used to be ignored).
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert json.loads((tmp_path / "bf16" / "cv.json").read_text())["folds"] == 2


def test_cross_validation_resumes_after_its_last_finished_fold(tmp_path, capsys, monkeypatch):
    from apps.nlp import sentiment

    folder = write_polarity(tmp_path / "rt")
    run = tmp_path / "cv"
    flags = ["sentiment", "train", "--run-dir", str(run), "--data", str(folder), "--cv", "2",
             "--epochs", "1", "--units", "4", "--embedding-dim", "4", "--max-len", "8",
             "--batch-size", "16"]
    predict, calls = sentiment.predict_texts, []

    def killed_in_fold_2(model, texts):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return predict(model, texts)

    monkeypatch.setattr(sentiment, "predict_texts", killed_in_fold_2)
    assert main(flags) == 130
    monkeypatch.setattr(sentiment, "predict_texts", predict)
    first = json.loads((run / "cv_progress.json").read_text())["folds"]
    assert len(first) == 1 and not (run / "cv.json").exists()
    capsys.readouterr()
    assert main(flags) == 2  # the run is kept: no silent restart
    assert "pass --resume" in capsys.readouterr().err
    assert main([*flags, "--resume", "--units", "5"]) == 2
    assert "--units: 4 -> 5" in capsys.readouterr().err
    assert flags[6:8] == ["--cv", "2"]
    assert main([*flags[:6], *flags[8:], "--resume"]) == 2  # without --cv
    assert "this is a --cv run" in capsys.readouterr().err
    other = write_polarity(tmp_path / "other")
    neg = other / "rt-polarity.neg"
    neg.write_bytes(neg.read_bytes().replace(b"tedious", b"tiresome", 1))
    assert main([*flags[:5], str(other), *flags[6:], "--resume"]) == 2
    assert "--data (texts or labels) differs" in capsys.readouterr().err
    assert main([*flags, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "fold 1/2: accuracy" in out and "(done before --resume)" in out
    assert out.count("/step - ") == 1  # only fold 2 was trained (one epoch)
    cv = json.loads((run / "cv.json").read_text())
    assert cv["per_fold"][0] == first[0]["metrics"] and len(cv["per_fold"]) == 2
    rows = (run / "cv_predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 40 and sum(row.split(",")[1] == "1" for row in rows) == 20
    # A finished run from before cv_progress.json: resuming would train it all again.
    (run / "cv_progress.json").unlink()
    assert main([*flags, "--resume"]) == 2
    assert "(no cv_progress.json)" in capsys.readouterr().err
    assert json.loads((run / "cv.json").read_text()) == cv
    # ... nor is a single run (trained without --cv) continued as a --cv run.
    single = [*flags[:3], str(tmp_path / "single"), *flags[4:6], *flags[8:]]
    assert main(single) == 0
    assert main([*single, "--cv", "2", "--resume"]) == 2
    assert "a run trained without --cv" in capsys.readouterr().err


def test_classification_metrics():
    labels = np.array([1, 1, 0, 0, 1])
    probs = np.array([0.9, 0.4, 0.2, 0.6, 0.8])
    m = sentiment.classification_metrics(labels, probs)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    # 6 positive/negative pairs, 5 ranked correctly (0.4 < 0.6 is the miss).
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert sentiment.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_tfds_imdb_reviews(tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(self, split, **kwargs):
        texts = ["a wonderful film", "awful and dull", "great cast", "boring plot"] * 5
        labels = [1, 0, 1, 0] * 5
        return tf.data.Dataset.from_tensor_slices({"text": texts, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        x, y, tx, ty = nlp_data.load_tfds_reviews("imdb_reviews")
        assert len(x) == len(tx) == 20 and y.tolist() == [1, 0, 1, 0] * 5
        from apps.nlp.__main__ import load_sentiment_splits

        train, val, test = load_sentiment_splits(None, "tfds:imdb_reviews", seed=0)
        # TFDS's test split is the test set; 10% of its train split validates.
        assert (len(train), len(val), len(test)) == (18, 2, 20)


def test_max_pooling_ignores_padding():
    # --pooling max: the same texts padded to 6 or 12 words give the same output,
    # also a 6-word text that fills max_len 6 exactly (no padding there).
    kwargs = {"vocabulary": ("a", "b", "c"), "embedding_dim": 4, "units": 3, "pooling": "max"}
    short = sentiment.build_model(sentiment.SentimentConfig(max_len=6, **kwargs))
    long = sentiment.build_model(sentiment.SentimentConfig(max_len=12, **kwargs))
    long.set_weights(short.get_weights())
    texts = sentiment.as_inputs(["a b", "c a b c c", "a b c a b c"])
    np.testing.assert_allclose(short(texts).numpy(), long(texts).numpy(), rtol=1e-5)
    assert isinstance(short.get_layer("max_over_time"), sentiment.MaskedMaxOverTime)
    # The second model gets the same LSTM names (the inspection's TensorBoard tags).
    assert long.get_layer("bilstm_0").forward_layer.name == "forward_lstm_0"
    # The layer itself: padding (zeros, as Bidirectional emits there) never wins,
    # and a text without a real step pools to zeros instead of -inf.
    states = np.array([[[-2.0, 1.0], [-3.0, 4.0], [0.0, 0.0]],
                       [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)
    mask = np.array([[True, True, False], [False, False, False]])
    pooled = sentiment.MaskedMaxOverTime()(states, mask=mask)
    assert np.asarray(pooled).tolist() == [[-2.0, 4.0], [0.0, 0.0]]


def test_pretrained_parts_carry_vocabulary_and_weights_to_a_longer_model():
    kwargs = {"vocabulary": ("good", "bad", "film"), "embedding_dim": 4, "units": 3}
    source = sentiment.build_model(sentiment.SentimentConfig(max_len=6, **kwargs))
    vocabulary, weights = sentiment.pretrained_parts(source)
    assert vocabulary == kwargs["vocabulary"]
    assert set(weights) == {"embedding", "bilstm_0", "positive"}
    tuned = sentiment.build_model(sentiment.SentimentConfig(
        max_len=12, dropout=0.5, **{**kwargs, "vocabulary": vocabulary}))
    sentiment.set_pretrained_weights(tuned, weights)
    texts = sentiment.as_inputs(["good film", "bad bad film unknownword"])
    np.testing.assert_allclose(source(texts).numpy(), tuned(texts).numpy(), rtol=1e-5)


def test_init_from_starts_from_the_earlier_run(run_dir, tmp_path, capsys):
    from common.runs import load_keras

    folder = write_polarity(tmp_path / "rt")
    run = tmp_path / "tuned"
    # A vanishing learning rate: one epoch leaves the starting weights in place.
    assert main(["sentiment", "train", "--run-dir", str(run), "--data", str(folder),
                 "--init-from", str(run_dir), "--units", "8", "--max-len", "24", "--epochs", "1",
                 "--batch-size", "16", "--learning-rate", "1e-9", "--freeze-embeddings"]) == 0
    settings = json.loads((run / "config.json").read_text())["app_settings"]
    assert settings["init_from"] == str(run_dir.absolute())
    assert settings["freeze_embeddings"] is True
    assert (settings["units"], settings["embedding_dim"], settings["max_len"]) == (8, 8, 24)
    source, tuned = load_keras(run_dir / "model.keras"), load_keras(run / "model.keras")
    assert (tuned.get_layer("vectorizer").get_vocabulary()
            == source.get_layer("vectorizer").get_vocabulary())
    for name in ("embedding", "bilstm_0", "positive"):
        for a, b in zip(source.get_layer(name).get_weights(), tuned.get_layer(name).get_weights(),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # Cross-validation fine-tunes every fold from the same run.
    cv = tmp_path / "cv"
    assert main(["sentiment", "train", "--run-dir", str(cv), "--data", str(folder), "--cv", "2",
                 "--init-from", str(run_dir), "--epochs", "1", "--batch-size", "16"]) == 0
    assert json.loads((cv / "cv.json").read_text())["folds"] == 2
    # A --cv run keeps no model: it cannot be a starting point.
    capsys.readouterr()
    assert main(["sentiment", "train", "--run-dir", str(tmp_path / "x"), "--init-from",
                 str(cv)]) == 2
    assert "a --cv run keeps no model" in capsys.readouterr().err
    # --resume keeps the run's starting point: without --init-from it is refused.
    assert main(["sentiment", "train", "--run-dir", str(run), "--data", str(folder),
                 "--resume", "--epochs", "2"]) == 2
    assert "--resume: " in capsys.readouterr().err


@pytest.mark.parametrize("flags, expect", [
    (["--units", "16"], "--units 16: --init-from"),
    (["--pooling", "max"], "--pooling max: --init-from"),
    (["--max-tokens", "50"], "--max-tokens: the vocabulary and word vectors come from"),
    (["--embeddings", "vectors.txt"], "--embeddings: the vocabulary and word vectors come from"),
    (["--embeddings-vocabulary", "10"], "--embeddings-vocabulary: the vocabulary and word"),
])
def test_init_from_refuses_another_model_shape(run_dir, tmp_path, capsys, flags, expect):
    run = tmp_path / "tuned"
    assert main(["sentiment", "train", "--run-dir", str(run), "--init-from", str(run_dir),
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not run.exists()


def test_init_from_names_a_missing_or_foreign_run(tmp_path, capsys):
    run = tmp_path / "tuned"
    assert main(["sentiment", "train", "--run-dir", str(run), "--init-from",
                 str(tmp_path / "nothing")]) == 2
    assert "--init-from " in capsys.readouterr().err and not run.exists()
    textgen = tmp_path / "textgen"
    textgen.mkdir()
    (textgen / "config.json").write_text(json.dumps({"app": "nlp", "task": "textgen"}))
    assert main(["sentiment", "train", "--run-dir", str(run), "--init-from", str(textgen)]) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "task 'textgen'" in err and not run.exists()


def test_ensemble_averages_its_members_and_serves_raw_strings(run_dir, tmp_path, capsys):
    import tensorflow as tf

    from common.runs import load_keras

    other = tmp_path / "other"  # same data and split, another shape
    assert main(["sentiment", "train", "--run-dir", str(other), *TINY, "--units", "4"]) == 0
    ensemble = tmp_path / "ensemble"
    assert main(["sentiment", "ensemble", "--run-dir", str(ensemble), "--members",
                 str(run_dir), str(other)]) == 0
    assert "ensemble of 2 runs" in capsys.readouterr().out
    texts = ["superb acting and a moving story", "dull, boring and far too long"]
    alone = [sentiment.predict_texts(load_keras(r / "model.keras", compile=False), texts)
             for r in (run_dir, other)]
    mean = sentiment.predict_texts(load_keras(ensemble / "model.keras", compile=False), texts)
    np.testing.assert_allclose(mean, (alone[0] + alone[1]) / 2, atol=1e-6)
    serve = tf.saved_model.load(str(ensemble / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(serve(text=tf.constant(texts))["probability"].numpy(), mean,
                               atol=1e-5)
    assert main(["sentiment", "evaluate", "--run-dir", str(ensemble), "--json"]) == 0
    assert last_json(capsys.readouterr().out)["examples"] == 32  # the members' test split
    # Another --seed is another split: refused, and nothing is written.
    reseeded = tmp_path / "reseeded"
    assert main(["sentiment", "train", "--run-dir", str(reseeded), *TINY, "--seed", "7"]) == 0
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["sentiment", "ensemble", "--run-dir", str(refused), "--members",
                 str(run_dir), str(reseeded)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in split_seed" in err[0], err
    assert not refused.exists()
    # --split-seed keeps the split: another seed's model is a member.
    assert main(["sentiment", "train", "--run-dir", str(reseeded), *TINY, "--seed", "7",
                 "--split-seed", "0", "--resume"]) == 2
    assert "split_seed = 7" in capsys.readouterr().err  # and the run is kept as it was
    same_split = tmp_path / "same_split"
    assert main(["sentiment", "train", "--run-dir", str(same_split), *TINY, "--seed", "7",
                 "--split-seed", "0"]) == 0
    assert main(["sentiment", "ensemble", "--run-dir", str(tmp_path / "seeds"), "--members",
                 str(run_dir), str(same_split)]) == 0
    capsys.readouterr()
    # A run without a model (a --cv run) is no member; an ensemble is no --init-from.
    cv_run = tmp_path / "cv"
    cv_run.mkdir()
    (cv_run / "config.json").write_text(json.dumps({"app": "nlp", "task": "sentiment"}))
    (cv_run / "cv.json").write_text("{}")
    assert main(["sentiment", "ensemble", "--run-dir", str(refused), "--members",
                 str(run_dir), str(cv_run)]) == 2
    assert "holds no model.keras (a --cv run" in capsys.readouterr().err
    assert main(["sentiment", "train", "--run-dir", str(refused), "--init-from",
                 str(ensemble)]) == 2
    assert "an ensemble has no single vocabulary" in capsys.readouterr().err
    assert not refused.exists()
