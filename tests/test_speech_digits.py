"""digits: the connected-digit corpus, CTC decoding and metrics, and a tiny run."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from apps.speech import data
from apps.speech.__main__ import main
from apps.speech.model import BLANK, decode, digit_metrics, edit_distance, edit_operations


def test_corpus_is_deterministic_and_one_speaker_each():
    clips = data.fsdd_clips(data.SAMPLES)
    a = data.connected_digits(clips, 6, seed=3, sample_rate=8000, max_digits=4)
    b = data.connected_digits(clips, 6, seed=3, sample_rate=8000, max_digits=4)
    c = data.connected_digits(clips, 6, seed=4, sample_rate=8000, max_digits=4)
    assert [u.digits for u in a] == [u.digits for u in b]
    assert all(np.array_equal(x.waveform, y.waveform) for x, y in zip(a, b, strict=True))
    assert [u.digits for u in a] != [u.digits for u in c]
    assert all(1 <= len(u.digits) <= 4 and u.digits.isdigit() for u in a)
    one = data.connected_digits([x for x in clips if x.speaker == "george"], 3, seed=0,
                                sample_rate=8000)
    assert {u.speaker for u in one} == {"george"}


def test_augmented_training_batches_repeat_for_a_seed():
    # The batch augmentation draws its random numbers one example after another,
    # so a seed gives the same batches every time (a parallel map_fn did not).
    import keras

    from apps.speech.__main__ import _bucketed
    from apps.speech.model import augment_fn

    rng = np.random.default_rng(0)
    features = [rng.normal(size=(n, 6)).astype("float32") for n in rng.integers(20, 60, 64)]
    targets = np.zeros((64, 3), np.int32)

    def batches():
        keras.utils.set_random_seed(1)
        augment = augment_fn(1, 0.1, 0, 0.1, time_masks=2, time_mask_width=3, freq_masks=1,
                             freq_mask_width=1)
        ds = _bucketed(features, targets, 16, shuffle=True, seed=1, augment=augment)
        return [x.numpy() for x, _ in ds]

    first, second = batches(), batches()
    assert len(first) == len(second) >= 4
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_decoders_and_metrics():
    # frames: 3 3 blank 3 1 1 -> "331"
    path = [3, 3, BLANK, 3, 1, 1, BLANK, BLANK]
    logits = np.full((1, len(path), BLANK + 1), -5.0, np.float32)
    logits[0, np.arange(len(path)), path] = 5.0
    for width in (0, 4):
        assert decode(tf.constant(logits), [6], beam_width=width).numpy()[0] == b"331"
    assert decode(tf.constant(logits[:, :0 + 2]), [2]).numpy()[0] == b"3"
    assert edit_distance("1234", "1245") == 2 and edit_distance("", "12") == 2
    m = digit_metrics(["123", "45"], ["123", "4"])
    assert m["wer"] == pytest.approx(1 / 5) and m["sequence_accuracy"] == 0.5
    assert (m["substitutions"], m["deletions"], m["insertions"], m["digits"]) == (0, 1, 0, 5)


@pytest.mark.parametrize("truth, predicted, expected", [
    ("1234", "1234", (0, 0, 0)),
    ("1234", "1294", (1, 0, 0)),
    ("1234", "124", (0, 1, 0)),
    ("1234", "12334", (0, 0, 1)),
    ("", "12", (0, 0, 2)),
    ("12", "", (0, 2, 0)),
    ("1122", "12", (0, 2, 0)),       # CTC merging a repeated digit: deletions
    ("123", "9", (1, 2, 0)),         # a tie broken towards the substitution
    ("5", "56789", (0, 0, 4)),
])
def test_edit_operations_split_the_edit_distance(truth, predicted, expected):
    assert edit_operations(truth, predicted) == expected
    assert edit_distance(truth, predicted) == sum(expected)
    m = digit_metrics([truth], [predicted])
    assert m["wer"] == pytest.approx(sum(expected) / max(len(truth), 1))


def test_edit_operations_on_random_strings():
    def levenshtein(a, b):  # the textbook recurrence, memoised
        @functools.cache
        def d(i, j):
            if not i or not j:
                return i + j
            return min(d(i - 1, j - 1) + (a[i - 1] != b[j - 1]), d(i - 1, j) + 1, d(i, j - 1) + 1)
        return d(len(a), len(b))

    rng = np.random.default_rng(0)
    for _ in range(300):
        truth, predicted = ("".join(rng.choice(list("0123"), rng.integers(0, 8)))
                            for _ in range(2))
        subs, dels, ins = edit_operations(truth, predicted)
        assert subs + dels + ins == levenshtein(truth, predicted)
        assert len(predicted) == len(truth) - dels + ins


CHILD = """
import sys, numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
t = np.arange(4000) / 8000.0
tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
out = serve(waveform=tf.constant(tone[None]))
padded = serve(waveform=tf.constant(np.stack([np.pad(tone, (0, 3000)), np.zeros(7000, np.float32)])))
empty = serve(waveform=tf.zeros([0, 100]))
assert not any(m.split(".")[0] in ("apps", "common") for m in sys.modules)
print(repr((out["digits"].numpy()[0].decode(), int(out["frames"][0]),
            [d.decode() for d in padded["digits"].numpy()], padded["frames"].numpy().tolist(),
            padded["valid"].numpy().tolist(), empty["digits"].shape[0])))
"""


def test_tiny_digits_run(tmp_path, capsys):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["digits", "train", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                 "--epochs", "1", "--units", "8", "--layers", "1", "--utterances", "16",
                 "--test-utterances", "4", "--max-digits", "2", "--batch-size", "8"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_transcription"]["utterances"] == 4
    assert list((run_dir / "logs" / "inspection").glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(["digits", "evaluate", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                 "--json", "--beam-width", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["test_speakers"] == ["nicolas"] and out["utterances"] == 4
    assert out["wer"] >= 0 and 0 <= out["sequence_accuracy"] <= 1
    # The WER is its substitutions, deletions and insertions over the truth's digits.
    assert out["wer"] == pytest.approx(
        (out["substitutions"] + out["deletions"] + out["insertions"]) / out["digits"])
    assert out["wer_beam"] == out["wer"] and "deletions_greedy" in out
    # In a fresh process: loading the model must register its custom layers itself.
    predicted = subprocess.run(
        [sys.executable, "-m", "apps.speech", "digits", "predict", "--run-dir", str(run_dir),
         str(sorted(data.SAMPLES.glob("*.wav"))[0])],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    name, digits = (predicted.stdout.strip().splitlines()[-1].split("\t") + [""])[:2]
    assert name.endswith(".wav") and set(digits) <= set("0123456789")
    result = subprocess.run([sys.executable, "-c", CHILD, str(run_dir / "saved_model")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    digits, frames, batch_digits, batch_frames, batch_valid, empty = eval(
        result.stdout.strip().splitlines()[-1])
    assert isinstance(digits, str) and set(digits) <= set("0123456789") and frames > 0
    # Padding does not change a clip's answer; silence gets none, and says so.
    assert batch_digits == [digits, ""] and batch_frames == [frames, 0]
    assert batch_valid == [True, False] and empty == 0
