"""Bad input: one clear line on stderr, a non-zero exit, and no damage to a run."""

import json

import pytest

from apps.nlp import data as nlp_data
from apps.nlp.__main__ import main


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def run_fails(capsys, argv, *expected) -> str:
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith("lstm-nlp: error: ")
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture
def existing_run(tmp_path):
    """A run dir with a config and a model file whose bytes must survive."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"app": "nlp", "task": "textgen"}))
    (run / "model.keras").write_bytes(b"precious")
    return run


def test_empty_text_file(tmp_path, capsys, existing_run):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run_fails(capsys, ["textgen", "train", "--run-dir", str(existing_run), "--resume",
                       "--data", str(empty)], str(empty), "empty")
    assert (existing_run / "model.keras").read_bytes() == b"precious"
    assert sorted(p.name for p in existing_run.iterdir()) == ["config.json", "model.keras"]


def test_text_shorter_than_a_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n" * 3)
    run_fails(capsys, ["textgen", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(short), "--seq-len", "64"], "fewer than one training window",
              "--seq-len")
    assert not (tmp_path / "r").exists()


def test_undecodable_bytes_name_the_encoding_flag(tmp_path, capsys):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"first line\nna\xefve caf\xe9\n" * 100)
    run_fails(capsys, ["textgen", "train", "--run-dir", str(tmp_path / "r"), "--data", str(bad)],
              "line 2", "utf-8", "--encoding")


def test_csv_without_the_columns(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\ngood,positive\nbad,negative\n")
    run_fails(capsys, ["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(csv)], "no column 'review'", "text, label", "--text-col")


def test_labels_that_are_not_binary(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\ngood,positive\nbad,negative\nmeh,neutral\n")
    run_fails(capsys, ["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(csv)], "exactly 2 values", "'neutral'")


def test_two_unknown_label_names_ask_for_positive_label(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\ngood,thumbs-up\nbad,thumbs-down\n")
    run_fails(capsys, ["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(csv)], "--positive-label")
    data = nlp_data.load_labelled(str(csv), positive_label="thumbs-up")
    assert data.labels.tolist() == [1, 0]


def test_polarity_bytes_undefined_in_cp1252(tmp_path, capsys):
    folder = tmp_path / "rt"
    folder.mkdir()
    (folder / "rt-polarity.pos").write_bytes(b"fine\nbad byte \x81 here\n")
    (folder / "rt-polarity.neg").write_bytes(b"dull\n")
    run_fails(capsys, ["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(folder)], "rt-polarity.pos line 2", "cp1252", "--encoding")


def test_unknown_tfds_name(tmp_path, capsys):
    for task in ("textgen", "sentiment"):
        run_fails(capsys, [task, "train", "--run-dir", str(tmp_path / "r"), "--data",
                           "tfds:no_such_dataset_xyz"], "tfds:no_such_dataset_xyz",
                  "no such TensorFlow Datasets dataset")


def test_missing_file_and_missing_run(tmp_path, capsys):
    run_fails(capsys, ["textgen", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(tmp_path / "nope.txt")], "nope.txt", "no such file")
    run_fails(capsys, ["sentiment", "predict", "--run-dir", str(tmp_path / "none"), "x"],
              "no such run directory")
