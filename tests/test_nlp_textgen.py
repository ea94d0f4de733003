"""textgen: train -> evaluate -> generate -> export on the shipped sample, tiny settings."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from apps.nlp import data as nlp_data
from apps.nlp import textgen
from apps.nlp.__main__ import main
from common.runs import load_keras

TINY = ["--epochs", "1", "--units", "16", "--embedding-dim", "8", "--seq-len", "32",
        "--batch-size", "32", "--sample-length", "20"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 20 KB of the shipped sample: enough for tiny models, quick to train."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(nlp_data.SHAKESPEARE_SAMPLE.read_text()[:20000])
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_text):
    run = tmp_path_factory.mktemp("textgen") / "run"
    assert main(["textgen", "train", "--run-dir", str(run), "--data", str(small_text),
                 *TINY]) == 0
    return run


def test_train_writes_a_complete_run(run_dir):
    for name in ("config.json", "metrics.json", "model.keras", "saved_model", "checkpoints",
                 "logs"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    vocab = config["app_settings"]["vocabulary"]
    text = json.loads((run_dir / "config.json").read_text())["data"]
    text = open(text).read()
    train_text = text[: int(len(text) * 0.9)]
    assert vocab == sorted(set(train_text))  # built from the training split
    # A generated sample went to TensorBoard.
    assert list((run_dir / "logs" / "samples").glob("events.out.tfevents.*"))
    # No budget: the small preset fills what TINY leaves unset; --units 16 wins.
    assert (config["app_settings"]["units"], config["app_settings"]["layers"],
            config["app_settings"]["dropout"]) == (16, 1, 0.0)
    assert (config["training"]["learning_rate"], config["training"]["lr_schedule"]) == (
        3e-3, "constant")


@pytest.mark.parametrize("flags, preset, expected", [
    ([], "small", (256, 1, 0.0, 3e-3, "constant")),
    (["--max-minutes", "29"], "small", (256, 1, 0.0, 3e-3, "constant")),
    (["--max-minutes", "60"], "large", (512, 2, 0.25, 2e-3, "cosine")),
    (["--max-minutes", "60", "--units", "128", "--lr-schedule", "constant"], "large",
     (128, 2, 0.25, 2e-3, "constant")),
    (["--max-minutes", "60", "--preset", "small"], "small", (256, 1, 0.0, 3e-3, "constant")),
    (["--preset", "large", "--dropout", "0"], "large", (512, 2, 0.0, 2e-3, "cosine")),
])
def test_preset_fills_only_the_flags_left_unset(flags, preset, expected):
    from apps.nlp.__main__ import make_parser, resolve_textgen_preset

    args = make_parser().parse_args(["textgen", "train", "--run-dir", "r", *flags])
    assert resolve_textgen_preset(args) == preset
    assert (args.units, args.layers, args.dropout, args.learning_rate,
            args.lr_schedule) == expected


def test_a_resumed_run_keeps_what_it_was_trained_with(tmp_path, small_text, capsys):
    # Resuming with an hour's budget must not switch a small run to the large
    # preset (other weight shapes, another schedule): --preset auto follows the run.
    run = tmp_path / "run"
    assert main(["textgen", "train", "--run-dir", str(run), "--data", str(small_text),
                 *TINY]) == 0
    assert TINY[2:4] == ["--units", "16"]
    without_units = TINY[:2] + TINY[4:]
    assert main(["textgen", "train", "--run-dir", str(run), "--data", str(small_text),
                 "--resume", "--max-minutes", "60", *without_units, "--epochs", "2"]) == 0
    assert "model: as trained: 1 x LSTM(16), dropout 0, Adam 0.003 (constant)" in \
        capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["app_settings"]["units"] == 16 and config["resumed"] == 1
    assert config["training"]["lr_schedule"] == "constant"


def test_evaluate_json_reports_nats_and_bits(run_dir, capsys):
    assert main(["textgen", "evaluate", "--run-dir", str(run_dir), "--json"]) == 0
    metrics = last_json(capsys.readouterr().out)
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss_nats_per_char"] / math.log(2))
    # One epoch of a tiny model is still better than guessing uniformly.
    vocab = json.loads((run_dir / "config.json").read_text())["app_settings"]["vocabulary"]
    assert 0 < metrics["loss_nats_per_char"] < math.log(len(vocab) + 1)


def test_generate_starts_with_the_prime(run_dir, capsys):
    assert main(["textgen", "generate", "--run-dir", str(run_dir), "--prime", "ROMEO:",
                 "--length", "25", "--seed", "3", "--top-k", "5"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("ROMEO:")
    assert len(out) == len("ROMEO:") + 25


def test_incremental_generation_matches_the_full_model(run_dir):
    """Greedy steps with carried state equal the argmax of the whole-sequence model."""
    model = load_keras(run_dir / "model.keras", compile=False)
    gen = textgen.Generator(model)
    out = gen.serve(tf.constant("First Citizen:"), tf.constant(12), tf.constant(0.0),
                    tf.constant(0, tf.int64))
    text = out["text"].numpy().decode()
    chars = tf.constant([list(text)])
    logits = model(chars, training=False)[0].numpy()
    logits[:, 0] = -np.inf  # the generator never emits the unknown character
    vocab = model.get_layer("vocabulary").get_vocabulary()
    predicted = "".join(str(vocab[i]) for i in logits.argmax(-1))
    n = len("First Citizen:")
    # The character after position p is the argmax of the logits at p.
    assert text[n:] == predicted[n - 1: len(text) - 1]


def test_sampling_controls(run_dir):
    gen = textgen.Generator(load_keras(run_dir / "model.keras", compile=False))

    def sample(temperature, top_k=0, top_p=1.0, seed=0):
        out = gen.sample(tf.constant("KING"), tf.constant(30), tf.constant(temperature),
                         tf.constant(top_k), tf.constant(top_p), tf.constant(seed, tf.int64))
        return out["generated"].numpy().decode()

    greedy = sample(0.0)
    assert sample(1.0, top_k=1) == greedy  # top-1 sampling is greedy
    assert sample(1.0, top_p=1e-6) == greedy  # so is a tiny nucleus
    assert sample(1.5, seed=1) == sample(1.5, seed=1)  # seeded
    assert sample(1.5, seed=1) != sample(1.5, seed=2)


def test_generation_under_mixed_precision():
    # The cells then compute and return their states in bfloat16; the
    # generation loop must carry them as such (it used to fail on the dtype).
    from common.distribute import configure_mixed_precision

    configure_mixed_precision("mixed_bfloat16")
    try:
        model = textgen.build_model(textgen.TextgenConfig(vocabulary=tuple("abc \n"), units=8,
                                                          layers=2, embedding_dim=4))
    finally:
        configure_mixed_precision("off")
    assert model.get_layer("lstm_0").compute_dtype == "bfloat16"
    generator = textgen.Generator(model)
    out = generator.serve(tf.constant("ab"), tf.constant(5), tf.constant(0.0),
                          tf.constant(0, tf.int64))
    assert len(out["generated"].numpy().decode()) == 5


def test_saved_model_runs_without_project_code(run_dir):
    code = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        serve = tf.saved_model.load({str(run_dir / "saved_model")!r}).signatures["serving_default"]
        out = serve(prime=tf.constant("ROMEO:"), length=tf.constant(15),
                    temperature=tf.constant(0.7), seed=tf.constant(1, tf.int64))
        assert not any(m.startswith("apps") or m.startswith("common") for m in sys.modules)
        print(json.dumps(out["text"].numpy().decode()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = json.loads(proc.stdout.strip().splitlines()[-1])
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 15


def test_export_command_rewrites_saved_model(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["textgen", "export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert (out / "saved_model.pb").exists()


def test_streams_layout_continues_rows():
    ids = np.arange(1, 202, dtype="int32")
    w = nlp_data.make_streams(ids, seq_len=5, streams=4, what="x")
    # Row b of batch k+1 continues row b of batch k; targets are shifted by one.
    assert list(w.x[4]) == list(range(w.x[0][-1] + 1, w.x[0][-1] + 6))
    assert (w.y == w.x + 1).all()


def test_tfds_tiny_shakespeare_stateful(tmp_path):
    """tfds:tiny_shakespeare through tfds.load (mocked), trained char-rnn style."""
    import tensorflow_datasets as tfds

    sample = nlp_data.SHAKESPEARE_SAMPLE.read_text()

    def as_dataset(self, split, **kwargs):
        # tiny_shakespeare: one example per split holding consecutive text.
        part = {"train": sample[:12000], "validation": sample[12000:14000],
                "test": sample[14000:16000]}[str(split)]
        return tf.data.Dataset.from_tensors({"text": tf.constant(part)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        assert nlp_data.load_text("tfds:tiny_shakespeare") == sample[:16000]
        run = tmp_path / "r"
        assert main(["textgen", "train", "--run-dir", str(run), *TINY, "--stateful",
                     "--batch-size", "8", "--data", "tfds:tiny_shakespeare",
                     "--sample-length", "0"]) == 0
    model = load_keras(run / "model.keras", compile=False)
    assert all(layer.stateful for layer in model.layers if "lstm" in layer.name)
    assert (run / "saved_model" / "saved_model.pb").exists()
