"""Bad input: one clear line on stderr, a non-zero exit, and no damage to a run."""

import json

import pytest

from apps.nlp import data as nlp_data
from apps.nlp.__main__ import main
from common.errors import UserError


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


def test_csv_encodings_excel_bom_and_utf16(tmp_path):
    rows = "review,sentiment\ngreat fun,positive\ndull,negative\n"
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + rows.encode())  # Excel's "CSV UTF-8"
    assert nlp_data.load_csv(bom, "review", "sentiment", "utf-8").texts == ["great fun", "dull"]
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(rows.encode("utf-16"))
    for encoding in ("utf-8", "latin-1"):  # latin-1 would "decode" it into NUL-riddled text
        with pytest.raises(UserError, match="UTF-16 byte-order mark; pass "
                                                     "--encoding utf-16"):
            nlp_data.load_csv(utf16, "review", "sentiment", encoding)
    assert nlp_data.load_csv(utf16, "review", "sentiment", "utf-16").texts == ["great fun",
                                                                             "dull"]
    utf32 = tmp_path / "utf32.csv"  # its mark begins with UTF-16's
    utf32.write_bytes(rows.encode("utf-32"))
    with pytest.raises(UserError, match="UTF-32 byte-order mark; pass --encoding utf-32"):
        nlp_data.load_csv(utf32, "review", "sentiment", "utf-16")
    assert nlp_data.load_csv(utf32, "review", "sentiment", "utf-32").texts[1] == "dull"


def test_unquoted_commas_make_extra_fields(tmp_path):
    path = tmp_path / "commas.csv"
    path.write_text('review,sentiment\n"great, fun",positive\nslow, dull,negative\n')
    with pytest.raises(UserError, match="line 3 has more fields than the header's 2; put "
                                        "texts that contain commas in double quotes"):
        nlp_data.load_csv(path, "review", "sentiment", "utf-8")
    path.write_text("review,sentiment\ngreat,positive,\ndull,negative, \n")  # empty extras
    assert nlp_data.load_csv(path, "review", "sentiment", "utf-8").texts == ["great", "dull"]


def test_blank_texts_are_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "blank.csv"
    path.write_text("review,sentiment\ngreat,positive\n  ,negative\nawful,negative\n,positive\n")
    data = nlp_data.load_csv(path, "review", "sentiment", "utf-8")
    assert data.texts == ["great", "awful"] and list(data.labels) == [1, 0]
    assert "skipped 2 row(s) whose 'review' is empty (first at line 3)" in capsys.readouterr().err
    path.write_text("review,sentiment\n ,positive\n,negative\n")
    with pytest.raises(UserError, match="header but no rows with text"):
        nlp_data.load_csv(path, "review", "sentiment", "utf-8")


def test_label_column_as_text_and_tiny_vocabulary_are_refused(tmp_path, capsys):
    path = tmp_path / "r.csv"
    path.write_text("review,sentiment\ngreat,positive\nawful,negative\n")
    run_fails(capsys, ["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data",
                       str(path), "--text-col", "sentiment"],
              "--text-col and --label-col both name 'sentiment'")
    with pytest.raises(SystemExit) as exit_info:  # a usage error, from argparse
        main(["sentiment", "train", "--run-dir", str(tmp_path / "r"), "--data", str(path),
              "--max-tokens", "2"])
    assert exit_info.value.code == 2
    assert "argument --max-tokens: must be >= 3" in error_line(capsys)
    assert not (tmp_path / "r").exists()
