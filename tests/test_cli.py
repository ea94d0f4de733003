"""The shared command line: flags, help, one-line errors, --json output."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.cli import build_parser, print_json, run_main
from common.errors import UserError

TINY = Path(__file__).with_name("tiny_task.py")
SHARED_TRAIN_FLAGS = ["--data", "--run-dir", "--epochs", "--batch-size", "--max-minutes",
                      "--seed", "--strategy", "--mixed-precision", "--resume",
                      "--learning-rate", "--clip-norm", "--lr-schedule", "--patience",
                      "--debug"]


def make_parser():
    return build_parser("app", "An app.", {"lm": "a language model", "cls": "a classifier"},
                        predict_command={"lm": "generate"},
                        train_defaults={"lm": {"epochs": 7}})


def test_tree_has_every_command_with_the_shared_flags():
    parser, commands = make_parser()
    assert sorted(commands) == sorted([
        ("lm", "train"), ("lm", "evaluate"), ("lm", "generate"), ("lm", "export"),
        ("cls", "train"), ("cls", "evaluate"), ("cls", "predict"), ("cls", "export")])
    args = parser.parse_args(["lm", "train", "--run-dir", "r"])
    assert (args.task, args.command, args.epochs) == ("lm", "train", 7)
    args = parser.parse_args(["cls", "train", "--run-dir", "r", "--strategy", "mirrored",
                              "--mixed-precision", "mixed_bfloat16", "--clip-norm", "0",
                              "--lr-schedule", "cosine", "--resume"])
    assert (args.epochs, args.clip_norm, args.strategy, args.resume) == (10, 0.0, "mirrored", True)
    assert parser.parse_args(["cls", "train", "--run-dir", "r"]).clip_norm == 1.0
    args = parser.parse_args(["cls", "evaluate", "--run-dir", "r", "--json"])
    assert args.json and args.command == "evaluate"


def test_help_explains_every_flag(capsys):
    parser, _ = make_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["cls", "train", "--help"])
    text = capsys.readouterr().out
    for flag in SHARED_TRAIN_FLAGS:
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        index = text.index(line)
        # the flag's help text follows on the same or the next line
        assert len(text[index:index + 200].split(None, 2)) == 3, flag
    assert "global norm" in text and "time budget" in text and "--resume" in text


@pytest.mark.parametrize("app", ["nlp", "speech", "finance"])
def test_every_help_page_of_every_app_prints(app, capsys):
    # argparse formats help text with %: one stray "90%" broke `lstm-finance --help`.
    import importlib

    main = importlib.import_module(f"apps.{app}.__main__")
    parser = main.make_parser()
    parser = parser[0] if isinstance(parser, tuple) else parser
    commands = [[]]
    for action in parser._subparsers._group_actions:
        for task, task_parser in action.choices.items():
            commands.append([task])
            for sub in task_parser._subparsers._group_actions:
                commands += [[task, command] for command in sub.choices]
    assert len(commands) >= 5
    for words in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*words, "--help"])
        assert exit_info.value.code == 0, words
        text = capsys.readouterr().out
        assert "usage:" in text, words
        # One default per flag: a help text that names its own is not given a second.
        for entry in re.split(r"\n  (?=-)", text):
            assert entry.count("default:") <= 1 and "(default: ())" not in entry, (words, entry)


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    parser, _ = make_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["cls", "train", "--run-dir", "r", "--epochs", "-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs: must be a positive integer" in err
    with pytest.raises(SystemExit):  # numpy's generators take no negative seed
        parser.parse_args(["cls", "train", "--run-dir", "r", "--seed", "-1"])
    assert "--seed: must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code, text", [
    (UserError("--data x.csv: no column 'close'"), 2, "--data x.csv: no column 'close'"),
    (FileNotFoundError(2, "No such file", "data/missing.csv"), 2, "data/missing.csv: no such"),
    (PermissionError(13, "Permission denied", "/root/x"), 2, "/root/x: Permission denied"),
    (RuntimeError("boom\nwith details"), 1, "RuntimeError: boom (rerun with --debug"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_failures_become_one_line(capsys, exc, code, text):
    parser, _ = make_parser()

    def handler(args):
        print("partial output")
        raise exc

    assert run_main(parser, handler, ["cls", "export", "--run-dir", "r"]) == code
    out, err = capsys.readouterr()
    assert err == f"app: error: {err.split('app: error: ', 1)[1]}"
    assert err.count("\n") == 1 and text in err
    assert "Traceback" not in err and out == "partial output\n"


def test_tensorflow_errors_become_one_line(capsys):
    import tensorflow as tf

    parser, _ = make_parser()

    def handler(args):
        tf.debugging.assert_equal(tf.constant(1), tf.constant(2), message="shapes disagree")

    assert run_main(parser, handler, ["cls", "export", "--run-dir", "r"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "InvalidArgumentError" in err


def test_debug_shows_the_traceback():
    parser, _ = make_parser()

    def handler(args):
        raise UserError("bad")

    with pytest.raises(UserError):
        run_main(parser, handler, ["cls", "export", "--run-dir", "r", "--debug"])


def test_handler_exit_code_is_returned():
    parser, _ = make_parser()
    assert run_main(parser, lambda args: None, ["cls", "export", "--run-dir", "r"]) == 0
    assert run_main(parser, lambda args: 4, ["cls", "export", "--run-dir", "r"]) == 4


def test_print_json_is_the_last_line(capsys):
    print("evaluating...")
    print_json({"loss": np.float32(0.25), "accuracy": np.float64(0.5), "n": np.int64(3)})
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1]) == {"loss": 0.25, "accuracy": 0.5, "n": 3}


def test_an_app_cli_error_is_one_line_on_stderr(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TINY), "tiny", "evaluate", "--run-dir", str(tmp_path / "nope"),
         "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2
    # TensorFlow's C++ runtime may log start-up lines before Python runs; ours is
    # the one line of the program, and there is no traceback.
    ours = [line for line in result.stderr.splitlines() if line.startswith("tiny_task")]
    assert ours == [f"tiny_task: error: --run-dir {tmp_path / 'nope'}: no such run directory"]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_tensorflow_startup_chatter_does_not_reach_stderr():
    # TensorFlow's C++ runtime logs at import and device start-up whatever
    # TF_CPP_MIN_LOG_LEVEL says; a failure after that must still read as one line.
    script = (
        "import argparse, sys\n"
        "from common.cli import run_main\n"
        "from common.errors import UserError\n"
        "def handler(args):\n"
        "    import tensorflow as tf\n"
        "    tf.function(lambda x: x + 1, jit_compile=True)(tf.constant(1.0))\n"
        "    print('kept', file=sys.stderr)\n"
        "    raise UserError('data.csv, line 3: expected a number')\n"
        "sys.exit(run_main(argparse.ArgumentParser(prog='app'), handler, []))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["kept", "app: error: data.csv, line 3: expected a number"]
