"""The command line shared by every app: ``<app> <task> <command> [flags]``.

An app describes its tasks, gets one argparse parser per (task, command) with
the shared flags already on it, adds its own flags, and hands a dispatch
function to `run_main`::

    parser, commands = build_parser("lstm-nlp", "Text models.", {"sentiment": "..."})
    commands["sentiment", "predict"].add_argument("text", help="a review")
    def main(argv=None):
        return run_main(parser, dispatch, argv)

`run_main` turns `UserError` and the usual failures (missing file, bad
permissions, out of memory, Ctrl-C) into one ``error:`` line on stderr and a
non-zero exit code (2 for bad input); ``--debug`` shows the traceback instead.

This module imports neither TensorFlow nor Keras, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from common.errors import UserError

# Must be set before TensorFlow is imported to silence its C++ start-up chatter;
# apps import this module first. An explicit setting by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What TensorFlow's C++ runtime prints at start-up whatever TF_CPP_MIN_LOG_LEVEL
# says (absl logs before it is initialised). Dropped from stderr so that a
# failure reads as our one line; everything else passes through.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|failed call to cuInit"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|oneDNN supports DT_BOOL only on platforms with AVX-512"
)

COMMANDS = ("train", "evaluate", "predict", "export")
STRATEGIES = ("default", "mirrored", "multiworker")
PRECISIONS = ("off", "mixed_float16", "mixed_bfloat16")
LR_SCHEDULES = ("constant", "cosine")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "clip_norm": 1.0,
    "lr_schedule": "constant",
    "patience": 0,
    "max_minutes": None,
    "seed": 0,
    "strategy": "default",
    "mixed_precision": "off",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (argparse prints the usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" for flags with a meaningful default (not None, False or
    empty) whose help text does not already say what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        meaningful = default not in (None, False, argparse.SUPPRESS) and \
            not (isinstance(default, (tuple, list, str)) and not default)
        if meaningful and action.option_strings and "default:" not in text:
            text += " (default: %(default)s)"
        return text


# -- argument types: a bad value becomes a one-line usage error -------------


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def dropout_rate(text: str) -> float:
    """A dropout rate: the fraction of units dropped, in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def choice_list(choices: Sequence[str], what: str = "value") -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of `choices`, e.g. ``a,c``."""

    def parse(text: str) -> list[str]:
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(bad) or repr(text)}; "
                                             f"choose from {','.join(choices)}")
        return names

    return parse


# -- shared flags ------------------------------------------------------------


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show full Python/TensorFlow tracebacks instead of one error line")


def add_run_dir_flag(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--run-dir", required=required, metavar="DIR",
                        help="the run directory (config.json, checkpoints/, logs/, model.keras, "
                             "saved_model/)")


def add_train_flags(parser: argparse.ArgumentParser, *,
                    data_help: str = "training data (file or folder); default: the app's "
                                     "bundled sample",
                    **defaults: Any) -> None:
    """The flags of every ``train`` command; `defaults` overrides `TRAIN_DEFAULTS`."""
    unknown = set(defaults) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training defaults: {sorted(unknown)}")
    d = {**TRAIN_DEFAULTS, **defaults}
    parser.add_argument("--data", metavar="PATH", help=data_help)
    add_run_dir_flag(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last completed epoch "
                             "(without it an existing run is never overwritten)")
    parser.add_argument("--epochs", type=positive_int, default=d["epochs"],
                        help="total number of epochs (a resumed run counts the ones done)")
    parser.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                        help="examples per training step (summed over devices)")
    parser.add_argument("--learning-rate", type=positive_float, default=d["learning_rate"],
                        help="peak learning rate of the Adam optimizer")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d["lr_schedule"],
                        help="learning-rate schedule: constant, or cosine decay to 0 by the "
                             "end of the run (the last epoch, or --max-minutes if that comes "
                             "first)")
    parser.add_argument("--clip-norm", type=non_negative_float, default=d["clip_norm"],
                        help="clip gradients to this global norm (keeps recurrent nets from "
                             "exploding); 0 disables")
    parser.add_argument("--patience", type=non_negative_int, default=d["patience"],
                        help="early stopping: stop after this many epochs without a better "
                             "validation loss; 0 disables")
    parser.add_argument("--max-minutes", type=positive_float, default=d["max_minutes"],
                        help="time budget: stop cleanly after the epoch that would overrun it, "
                             "then save and export as usual; default: no limit")
    parser.add_argument("--seed", type=non_negative_int, default=d["seed"],
                        help="random seed for weights, shuffling and dropout")
    parser.add_argument("--strategy", choices=STRATEGIES, default=d["strategy"],
                        help="tf.distribute strategy: default (one device), mirrored (all "
                             "local GPUs), multiworker (TF_CONFIG cluster)")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, default=d["mixed_precision"],
                        help="compute dtype policy: off (float32), mixed_float16 (GPU), "
                             "mixed_bfloat16 (TPU/recent CPUs)")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-for-bit repeatable training for a given --seed on the same "
                             "machine and software (TensorFlow's op determinism; random "
                             "augmentation is then drawn in order), unless --max-minutes, "
                             "which follows the clock, stops the run or drives the schedule")
    add_debug_flag(parser)


def add_evaluate_flags(parser: argparse.ArgumentParser, *,
                       data_help: str = "data to evaluate on; default: the test split of the "
                                        "data the run was trained on") -> None:
    parser.add_argument("--data", metavar="PATH", help=data_help)
    add_run_dir_flag(parser)
    parser.add_argument("--batch-size", type=positive_int, default=TRAIN_DEFAULTS["batch_size"],
                        help="examples per evaluation step")
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON object on the last line of stdout")
    add_debug_flag(parser)


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    add_run_dir_flag(parser)
    add_debug_flag(parser)


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    add_run_dir_flag(parser)
    parser.add_argument("--out", metavar="DIR",
                        help="where to write the SavedModel; default: RUN/saved_model")
    add_debug_flag(parser)


def add_members_flag(parser: argparse.ArgumentParser, runs: str) -> None:
    """An `ensemble` command's --members; `runs` says which runs fit together."""
    parser.add_argument("--members", nargs="+", required=True, metavar="RUN",
                        help=f"two or more trained {runs}; --run-dir is the new run, which "
                             "`evaluate`, `predict` and `export` then treat like any other")


_COMMAND_HELP = {
    "train": ("train a model into a run directory", add_train_flags),
    "evaluate": ("report metrics of a trained run", add_evaluate_flags),
    "predict": ("run a trained model on new input", add_predict_flags),
    "generate": ("generate output with a trained model", add_predict_flags),
    "export": ("(re)write the run's SavedModel for serving", add_export_flags),
}


def build_parser(
    prog: str,
    description: str,
    tasks: Mapping[str, str],
    *,
    predict_command: str | Mapping[str, str] = "predict",
    train_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    extra_commands: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[ArgumentParser, dict[tuple[str, str], ArgumentParser]]:
    """An ``<task> <command>`` parser tree with the shared flags on every command.

    Args:
        prog: the program name shown in help and errors.
        description: one paragraph for the top-level ``--help``.
        tasks: task name -> one-line description.
        predict_command: "predict" or "generate" (or a per-task mapping) for the
            command that runs a trained model.
        train_defaults: per-task overrides of `TRAIN_DEFAULTS`.
        extra_commands: per task, more commands (name -> one-line help) after the
            four standard ones; they get ``--run-dir`` and ``--debug``, the app
            adds the rest.

    Returns:
        The root parser, and a dict (task, command) -> subparser for the app's
        own flags. Parsed namespaces carry ``task`` and ``command``.
    """
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    task_parsers = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    commands: dict[tuple[str, str], ArgumentParser] = {}
    for task, task_help in tasks.items():
        task_parser = task_parsers.add_parser(task, help=task_help, description=task_help,
                                              formatter_class=HelpFormatter)
        command_parsers = task_parser.add_subparsers(dest="command", metavar="COMMAND",
                                                     required=True)
        run_name = (predict_command if isinstance(predict_command, str)
                    else predict_command.get(task, "predict"))
        for command in ("train", "evaluate", run_name, "export"):
            help_text, add_flags = _COMMAND_HELP[command]
            sub = command_parsers.add_parser(command, help=help_text,
                                             description=f"{task}: {help_text}",
                                             formatter_class=HelpFormatter)
            if command == "train":
                add_train_flags(sub, **(train_defaults or {}).get(task, {}))
            else:
                add_flags(sub)
            commands[task, command] = sub
        for command, help_text in (extra_commands or {}).get(task, {}).items():
            sub = command_parsers.add_parser(command, help=help_text,
                                             description=f"{task}: {help_text}",
                                             formatter_class=HelpFormatter)
            add_run_dir_flag(sub)
            add_debug_flag(sub)
            commands[task, command] = sub
    return parser, commands


# -- running -----------------------------------------------------------------


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for an exception that ended a command."""
    if isinstance(exc, UserError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (a training run continues with --resume)", 130
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or exc}: no such file or directory", 2
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        return f"{exc.filename}: {exc.strerror}", 2
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size", 1
    tf = sys.modules.get("tensorflow")  # only if the command got as far as importing it
    if tf is not None and isinstance(exc, tf.errors.OpError):
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return "out of memory; try a smaller --batch-size", 1
        if isinstance(exc, tf.errors.NotFoundError):
            return f"not found: {_first_line(exc.message)}", 2
        return (f"TensorFlow {type(exc).__name__}: {_first_line(exc.message)} "
                "(rerun with --debug for the traceback)"), 1
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1
    return (f"{type(exc).__name__}: {_first_line(str(exc))} "
            "(rerun with --debug for the traceback)"), 1


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_main(
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
) -> int:
    """Parse `argv`, call `handler(args)`, and map failures to one stderr line.

    Returns the exit code (the handler's, or 0); use as
    ``raise SystemExit(main())``. With ``--debug`` exceptions propagate.
    """
    args = parser.parse_args(argv)
    if getattr(args, "debug", False):
        _start_multiworker(args)
        with _determinism(args):
            return handler(args) or 0
    try:
        with filtered_stderr(STARTUP_NOISE):
            _start_multiworker(args)
            with _determinism(args):
                return handler(args) or 0
    except Exception as exc:  # noqa: BLE001  (the point: no raw tracebacks)
        message, code = describe_error(exc)
    except KeyboardInterrupt as exc:
        message, code = describe_error(exc)
    sys.stdout.flush()
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return code


def _start_multiworker(args: argparse.Namespace) -> None:
    # The apps run TensorFlow ops while reading their data, and a multi-worker
    # strategy must exist before the first one; `common.training.train` later
    # gets this same strategy back.
    if getattr(args, "strategy", None) == "multiworker":
        from common.distribute import make_strategy

        make_strategy("multiworker")


def _determinism(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    # For the whole command: the apps build their tf.data pipelines before training.
    if not getattr(args, "deterministic", False):
        return contextlib.nullcontext()
    from common.distribute import op_determinism

    return op_determinism()


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str]) -> Iterator[None]:
    """Route file descriptor 2 through a filter dropping lines that match `noise`.

    Works at the descriptor level, because the chatter comes from C++ and from
    child processes, not from Python's `sys.stderr`.
    """
    try:
        original = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not noise.search(line.decode("utf-8", "replace")):
                    os.write(original, line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes our write end: the reader sees EOF
        # A child process still holding the pipe must not block the exit.
        thread.join(timeout=2)
        os.close(original)


def print_json(obj: Mapping[str, Any]) -> None:
    """Print `obj` as one JSON line: the last line of stdout for ``--json``."""
    sys.stdout.flush()
    print(json.dumps(obj, sort_keys=True, default=_to_builtin), flush=True)


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)
