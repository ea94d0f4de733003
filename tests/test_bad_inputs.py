"""The bad-input catalogue (issue #9): every command of every app against inputs it must refuse.

The catalogue is plain data: one `Case` per (app, task, command, bad input) with
a function that builds the input in the case's own temporary folder and the
expected outcome. Most inputs are errors: the command must exit non-zero and
print ONE line on stderr naming the input and the problem, with no traceback
and no TensorFlow internals. A few are valid and must succeed with a warning
(stereo 44.1 kHz audio is downmixed and resampled; unsorted dates are sorted).

Every case also checks that nothing already written changed: the files of the
case's own folder are hashed before and after it, and those of every fixture run
directory after it, against their hashes taken once, when the run was trained.

One tiny run per task (1 epoch, a few units, the bundled samples) is trained
the first time a case needs it and shared by the whole module. Inputs already
covered elsewhere for the same command are not repeated here:
test_nlp_errors.py (textgen train: missing/empty/non-UTF-8/short text;
sentiment train: missing columns, non-binary labels, cp1252 polarity files),
test_finance_cli.py and test_finance_data.py (forecast train: bad date,
duplicate date, negative price, missing value, window longer than the series,
non-numeric target, folder without CSV, unknown target), test_speech_words.py
(words train: missing folder, --strict on an empty file; words predict: a text
file among good ones; labels absent from the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import soundfile as sf

from apps.finance.__main__ import main as finance_main
from apps.nlp.__main__ import main as nlp_main
from apps.speech.__main__ import main as speech_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"nlp": nlp_main, "speech": speech_main, "finance": finance_main}
PROGS = {"nlp": "lstm-nlp", "speech": "lstm-speech", "finance": "lstm-finance"}
TASK_APP = {"textgen": "nlp", "sentiment": "nlp", "words": "speech", "digits": "speech",
            "forecast": "finance"}
# A run of another app, for the "run dir that belongs to someone else" cases.
OTHER_TASK = {"textgen": "forecast", "sentiment": "forecast", "words": "sentiment",
              "digits": "sentiment", "forecast": "textgen"}
FSDD = ROOT / "apps" / "speech" / "samples" / "fsdd"
SPY = ROOT / "apps" / "finance" / "samples" / "spy_sample.csv"
BIG = 200 * 2**20  # the "200 MB line"

# TensorFlow/Python internals that must never reach the user in an error line.
INTERNALS = re.compile(r"Traceback|File \"|tensorflow/core|OpError|[Gg]raph execution|"
                       r"\.py\", line|Exception encountered")

# Tiny settings: one epoch in a few seconds; the resume cases reuse them.
TRAIN_ARGS = {
    "textgen": ["--epochs", "1", "--units", "8", "--embedding-dim", "4", "--seq-len", "16",
                "--batch-size", "16", "--steps-per-epoch", "2", "--sample-length", "0"],
    "sentiment": ["--epochs", "1", "--units", "4", "--embedding-dim", "4", "--max-len", "8",
                  "--batch-size", "64", "--max-tokens", "50"],
    "words": ["--epochs", "1", "--units", "4", "--layers", "1", "--batch-size", "16",
              "--unidirectional"],
    "digits": ["--epochs", "1", "--units", "4", "--layers", "1", "--utterances", "8",
               "--test-utterances", "4", "--max-digits", "2", "--batch-size", "8",
               "--unidirectional"],
    "forecast": ["--epochs", "1", "--units", "4", "--window", "20", "--vol-window", "5",
                 "--batch-size", "256"],
}


# -- input builders ----------------------------------------------------------------------


def write(folder: Path, name: str, content: bytes | str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def big_line_file(folder: Path, name: str, head: str = "") -> Path:
    """`head`, then one 200 MB line (a sparse file: one seek and one write)."""
    path = folder / name
    with open(path, "wb") as f:
        f.write(head.encode())
        f.seek(len(head) + BIG - 1)
        f.write(b"\n")
    return path


def empty_dir(folder: Path, name: str) -> Path:
    path = folder / name
    path.mkdir()
    return path


def speech_wave(index: int = 0) -> tuple[np.ndarray, int]:
    y, rate = sf.read(sorted(FSDD.glob("*.wav"))[index], dtype="float32")
    return y, rate


def wav(folder: Path, name: str, kind: str) -> Path:
    """A recording of one of the bad (or odd) kinds of the catalogue."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    y, rate = speech_wave()
    if kind == "truncated":  # a real header promising more data than the file has
        good = folder / f".{name}.full.wav"
        sf.write(good, y, rate, subtype="PCM_16")
        path.write_bytes(good.read_bytes()[:60])
        good.unlink()
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    elif kind == "zero_samples":
        sf.write(path, np.zeros(0, np.float32), rate, subtype="PCM_16")
    elif kind == "one_ms":
        sf.write(path, y[len(y) // 2: len(y) // 2 + rate // 1000], rate, subtype="PCM_16")
    elif kind == "stereo_44k":
        import librosa

        y44 = librosa.resample(y, orig_sr=rate, target_sr=44100)
        sf.write(path, np.stack([y44, 0.8 * y44], axis=1), 44100, subtype="PCM_16")
    elif kind == "text":
        path.write_text("these are notes, not audio\n")
    else:
        raise ValueError(kind)
    return path


def fsdd_subset(folder: Path, digits: str = "0123") -> Path:
    """A small FSDD folder: every recording of these digits (3 speakers x 3)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(FSDD.glob("*.wav")):
        if path.name[0] in digits:
            shutil.copy(path, folder)
    return folder


def spy_rows() -> list[str]:
    return SPY.read_text().splitlines()


def spy_csv(folder: Path, name: str, edit: Callable[[list[str]], list[str]] | None = None
            ) -> Path:
    rows = spy_rows()
    return write(folder, name, "\n".join(edit(rows) if edit else rows) + "\n")


def set_cell(rows: list[str], line: int, column: int, value: str) -> list[str]:
    """`rows` with the cell at 1-based file `line` and 0-based `column` replaced."""
    cells = rows[line - 1].split(",")
    cells[column] = value
    return rows[:line - 1] + [",".join(cells)] + rows[line:]


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# -- fixture runs -----------------------------------------------------------------------


class Runs:
    """One tiny trained run per task, trained on first use and never modified."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "mfcc-cache"
        self.paths: dict[str, Path] = {}
        self.stderr: dict[str, str] = {}  # what each training printed there
        self.hashes: dict[str, dict[str, str]] = {}  # `tree_hash` of each, as trained
        self._words_data: Path | None = None

    def words_data(self) -> Path:
        """Digits 0-3 of the sample plus bad files a training run must skip."""
        if self._words_data is None:
            folder = fsdd_subset(self.root / "words-data")
            for name, kind in (("4_george_91.wav", "truncated"), ("5_george_92.wav", "corrupt"),
                               ("6_george_93.wav", "zero_samples"),
                               ("7_george_94.wav", "one_ms"), ("8_george_95.wav", "text"),
                               ("3_george_96.wav", "stereo_44k")):
                wav(folder, name, kind)
            write(folder, "notes.txt", "a text file in the audio folder\n")
            self._words_data = folder
        return self._words_data

    def __call__(self, task: str) -> Path:
        if task not in self.paths:
            run = self.root / f"{task}-run"
            argv = [task, "train", "--run-dir", str(run), *TRAIN_ARGS[task]]
            if task in ("words", "digits"):
                argv += ["--cache-dir", str(self.cache)]
            if task == "words":
                argv += ["--data", str(self.words_data())]
            with captured_fd2() as err:
                code = MAINS[TASK_APP[task]](argv)
            self.stderr[task] = err.read()
            assert code == 0, self.stderr[task][-3000:]
            self.paths[task] = run
            self.hashes[task] = tree_hash(run)  # every case must leave it so
        return self.paths[task]

    def copy(self, task: str, dest: Path) -> Path:
        """A copy of the task's run (for the cases that damage a run)."""
        shutil.copytree(self(task), dest, ignore=shutil.ignore_patterns(".lock"))
        return dest


class captured_fd2:
    """Collects what goes to stderr: file descriptor 2 (C++, threads) and `sys.stderr`.

    Both are pointed at one temporary file (`sys.stderr` through a duplicate of
    descriptor 2, so the two share one file offset and never overwrite each
    other); pytest's own capture, if any, is restored afterwards.
    """

    def __enter__(self):
        self.file = tempfile.TemporaryFile(mode="w+")
        sys.stderr.flush()
        self.saved_fd, self.saved_sys = os.dup(2), sys.stderr
        os.dup2(self.file.fileno(), 2)
        sys.stderr = open(os.dup(2), "w", buffering=1)  # closed in __exit__
        return self

    def __exit__(self, *exc):
        sys.stderr.close()
        sys.stderr = self.saved_sys
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)

    def read(self) -> str:
        self.file.seek(0)
        return self.file.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Runs]:
    yield Runs(tmp_path_factory.mktemp("fixture-runs"))
    keras.backend.clear_session()


@pytest.fixture(autouse=True)
def _seeded():
    """Replaces conftest's per-test seeding and `clear_session()` for this module.

    `clear_session()` runs a full garbage collection (~0.5 s with TensorFlow
    loaded), which after each of ~300 cases would be most of this file's time.
    The cases build no models (the fixture runs seed their own training), so
    the session is cleared once, when the module's runs are torn down. (The
    opt-in `freeze_gc_after_each_test` is no substitute: `_seeded` would still
    clear the session after every case, and the freeze comes before that
    collection, so each case's garbage, loaded models included, would stay
    in memory until the module ends.)
    """
    yield


# -- the catalogue ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """An error line matching every pattern, or (ok) success with every pattern on stderr.

    `after_warnings`: the error line may follow ``warning:`` lines. Only for
    folders where every recording is bad: without --strict each one is skipped
    with its own warning (the specified behaviour), and the error comes when
    none is left.
    """

    patterns: tuple[str, ...]
    ok: bool = False
    after_warnings: bool = False


def error(*patterns: str, after_warnings: bool = False) -> Expect:
    return Expect(patterns, after_warnings=after_warnings)


def ok(*warnings: str) -> Expect:
    return Expect(warnings, ok=True)


# make(tmp, runs) -> (argv after the app, the name the stderr line must show)
Make = Callable[[Path, Runs], tuple[list[str], str]]


@dataclass(frozen=True)
class Case:
    app: str
    task: str
    command: str
    name: str
    make: Make
    expect: Expect

    @property
    def id(self) -> str:
        return f"{self.app}-{self.task}-{self.command}-{self.name}"


CASES: list[Case] = []


def case(task: str, command: str, name: str, expect: Expect) -> Callable[[Make], Make]:
    """Registers `make` as the input builder of one catalogue case."""
    def register(make: Make) -> Make:
        CASES.append(Case(TASK_APP[task], task, command, name, make, expect))
        return make
    return register


def run_args(task: str, command: str, run: Path, tmp: Path, runs: Runs) -> list[str]:
    """A complete command line for `run`, with good input for the command's other args."""
    argv = [task, command, "--run-dir", str(run)]
    if command == "train":
        argv += ["--resume", *TRAIN_ARGS[task]]
        if task in ("words", "digits"):
            argv += ["--data", str(fsdd_subset(tmp / "good-data"))]
    if task in ("words", "digits") and command in ("train", "evaluate"):
        argv += ["--cache-dir", str(runs.cache)]  # outside the case folder: it may grow
    if (task, command) == ("sentiment", "predict"):
        argv += ["a wonderful film"]
    if task in ("words", "digits") and command == "predict":
        argv += [str(sorted(FSDD.glob("*.wav"))[0])]
    return argv


RUN_COMMANDS = [("textgen", "evaluate"), ("textgen", "generate"), ("textgen", "export"),
                ("sentiment", "evaluate"), ("sentiment", "predict"), ("sentiment", "export"),
                ("words", "evaluate"), ("words", "predict"), ("words", "export"),
                ("digits", "evaluate"), ("digits", "predict"), ("digits", "export"),
                ("forecast", "evaluate"), ("forecast", "predict"), ("forecast", "export")]
TRAIN_COMMANDS = [(task, "train") for task in TASK_APP]


# Builders of a bad --run-dir: (tmp, runs, task) -> (run dir, the name the error shows).


def other_app_run(tmp, runs, task):
    run = runs(OTHER_TASK[task])
    return run, run.name


def other_app_saved_model(tmp, runs, task):
    run = runs(OTHER_TASK[task]) / "saved_model"
    return run, str(run)


def run_is_file(tmp, runs, task):
    return write(tmp, "run.txt", "not a run\n"), "run.txt"


def run_missing(tmp, runs, task):
    return tmp / "no_such_run", "no_such_run"


def run_empty_dir(tmp, runs, task):
    return empty_dir(tmp, "empty_run"), "empty_run"


def run_unfinished(tmp, runs, task):
    """A run killed before it wrote its settings: config.json names only the owner."""
    run = empty_dir(tmp, "unfinished_run")
    write(run, "config.json", json.dumps({"app": TASK_APP[task], "task": task}))
    return run, "unfinished_run"


def damaged_run(part: str, how: str):
    """A copy of the task's run with `part` truncated or deleted."""
    def build(tmp, runs, task):
        run = runs.copy(task, tmp / "copied-run")
        path = run / part
        if how == "truncate":
            truncate(path)
        else:
            path.unlink()
        return run, path.name
    return build


RESUME_FILES = ("checkpoints/backup/latest.weights.h5", "checkpoints/best.keras",
                "checkpoints/last.keras", "checkpoints/state.json")


def add_run_dir_cases() -> None:
    """--run-dir problems, for every command that reads a run (train: with --resume)."""
    for task, command in RUN_COMMANDS + TRAIN_COMMANDS:
        def add(name, expect, build, task=task, command=command):
            def make(tmp, runs):
                run, shown = build(tmp, runs, task)
                return run_args(task, command, run, tmp, runs), shown
            case(task, command, name, expect)(make)

        add("run_is_file", error("not a (run )?director"), run_is_file)
        add("run_of_other_app", error(f"belongs to app '{TASK_APP[OTHER_TASK[task]]}'"),
            other_app_run)
        add("saved_model_of_other_app", error("is a SavedModel, not a run director"),
            other_app_saved_model)
        if command == "train":
            for part in RESUME_FILES:
                add(f"resume_corrupt_{Path(part).name.split('.')[0]}",
                    error("cannot resume", "is damaged", r"remove \S+checkpoints"),
                    damaged_run(part, "truncate"))
            continue
        add("run_missing", error("no such run directory"), run_missing)
        add("run_empty_dir", error("not a run directory"), run_empty_dir)
        add("run_unfinished", error("train"), run_unfinished)
        add("config_corrupt", error("not valid JSON"), damaged_run("config.json", "truncate"))
        add("model_missing", error("no model.keras"), damaged_run("model.keras", "delete"))
        add("model_corrupt", error(r"not a loadable \.keras model \(damaged"),
            damaged_run("model.keras", "truncate"))


add_run_dir_cases()


def add_export_out_cases() -> None:
    """--out of export must never replace a file or a folder that is not a SavedModel."""
    for task in TASK_APP:
        def out_is_file(tmp, runs, task=task):
            out = write(tmp, "precious.txt", "keep me\n")
            return [task, "export", "--run-dir", str(runs(task)), "--out", str(out)], out.name

        def out_not_saved_model(tmp, runs, task=task):
            out = tmp / "my-folder"
            write(out, "notes.txt", "keep me\n")
            return [task, "export", "--run-dir", str(runs(task)), "--out", str(out)], out.name

        def out_in_another_run(tmp, runs, task=task):
            other = runs(OTHER_TASK[task]) / "saved_model"  # a real export of another run
            return [task, "export", "--run-dir", str(runs(task)), "--out", str(other)], \
                str(other.parent)

        case(task, "export", "out_is_file", error("not a (directory|folder)"))(out_is_file)
        case(task, "export", "out_in_another_run",
             error("inside another run directory"))(out_in_another_run)
        case(task, "export", "out_is_a_folder_not_a_saved_model",
             error("not a SavedModel"))(out_not_saved_model)


add_export_out_cases()


def add_dropout_cases() -> None:
    """--dropout 1 drops every input (Keras fails, or learns nothing): a usage error."""
    for task in TASK_APP:
        def dropout_one(tmp, runs, task=task):
            return [task, "train", "--run-dir", str(tmp / "new_run"), *TRAIN_ARGS[task],
                    "--dropout", "1"], "--dropout"

        case(task, "train", "dropout_one", error(r"must be in \[0, 1\), got 1"))(dropout_one)


add_dropout_cases()


for _task in ("words", "digits"):
    @case(_task, "train", "freq_mask_as_wide_as_the_mfcc",
          error("must be smaller than --n-mfcc \\(13\\)"))
    def _(tmp, runs, task=_task):
        argv = run_args(task, "train", tmp / "new_run", tmp, runs)
        return [*argv, "--freq-masks", "2", "--freq-mask-width", "7"], "--freq-mask-width 7"


# -- nlp ----------------------------------------------------------------------------


def text_data_cases(task: str, command: str, *, csv: bool, skip: tuple[str, ...] = ()) -> None:
    """--data (predict: --file) problems of a command reading text; `skip`: tested elsewhere."""
    flag = "--file" if command == "predict" else "--data"

    def add(name, expect, build):
        if name in skip:
            return

        def make(tmp, runs):
            path = build(tmp)
            run = tmp / "new_run" if command == "train" else runs(task)
            return [task, command, "--run-dir", str(run), flag, str(path)], path.name
        case(task, command, name, expect)(make)

    add("missing", error("no such file"), lambda tmp: tmp / "missing.txt")
    add("empty", error("empty"), lambda tmp: write(tmp, "empty.csv", ""))
    if not (task == "sentiment" and command != "predict"):  # a folder: the polarity pair
        add("directory", error("is a directory"), lambda tmp: empty_dir(tmp, "a_folder"))
    add("non_utf8", error("line 2 is not valid utf-8", "--encoding"),
        lambda tmp: write(tmp, "latin1.csv",
                          b"review,sentiment\n" + b"caf\xe9 cr\xe8me,positive\n" * 50))
    add("line_of_200_mb", error("200 MB is larger than the limit"),
        lambda tmp: big_line_file(tmp, "huge.csv", "review,sentiment\n"))
    if csv:
        add("header_only", error("header but no rows"),
            lambda tmp: write(tmp, "header.csv", "review,sentiment\n"))
        add("one_row", error("2 values|too few"),
            lambda tmp: write(tmp, "one.csv", "review,sentiment\ngreat,positive\n"))
        add("missing_columns", error("no column 'sentiment'"),
            lambda tmp: write(tmp, "cols.csv", "review,stars\ngreat,5\nawful,1\n"))
        add("too_few_fields", error("line 3", "too few fields"),
            lambda tmp: write(tmp, "fields.csv", "review,sentiment\ngreat,positive\nawful\n"))


text_data_cases("textgen", "train", csv=False, skip=("missing", "empty", "non_utf8"))
text_data_cases("textgen", "evaluate", csv=False)
text_data_cases("sentiment", "train", csv=True, skip=("missing_columns",))
text_data_cases("sentiment", "evaluate", csv=True)
text_data_cases("sentiment", "predict", csv=False)


@case("textgen", "evaluate", "text_shorter_than_a_window", error("fewer than one"))
def _(tmp, runs):
    path = write(tmp, "short.txt", "To be.\n")
    return ["textgen", "evaluate", "--run-dir", str(runs("textgen")), "--data", str(path)], \
        path.name


@case("sentiment", "train", "folder_without_polarity_files", error("rt-polarity.pos"))
def _(tmp, runs):
    folder = empty_dir(tmp, "reviews")
    return ["sentiment", "train", "--run-dir", str(tmp / "r"), "--data", str(folder)], \
        folder.name


@case("sentiment", "predict", "empty_text", error("text 2 of the arguments is empty"))
def _(tmp, runs):
    return ["sentiment", "predict", "--run-dir", str(runs("sentiment")), "good", " "], "text 2"


@case("textgen", "generate", "prime_of_unknown_characters", error("none of its characters"))
def _(tmp, runs):
    return ["textgen", "generate", "--run-dir", str(runs("textgen")), "--prime", "\u65e5\u672c",
            "--length", "5"], "--prime"


@case("sentiment", "predict", "nothing_to_classify", error("nothing to classify"))
def _(tmp, runs):
    return ["sentiment", "predict", "--run-dir", str(runs("sentiment"))], "classify"


# -- speech -------------------------------------------------------------------------


def audio_file_cases(task: str) -> None:
    """predict FILE... with one bad (or odd) file."""
    def add(name, expect, build):
        def make(tmp, runs):
            path = build(tmp)
            return [task, "predict", "--run-dir", str(runs(task)), str(path)], path.name
        case(task, "predict", name, expect)(make)

    add("missing", error("no such file"), lambda tmp: tmp / "missing.wav")
    add("empty", error("empty file"), lambda tmp: write(tmp, "empty.wav", b""))
    add("directory", error("is a directory"), lambda tmp: empty_dir(tmp, "clips.wav"))
    add("truncated_wav", error("not readable as audio|shorter than one analysis window"),
        lambda tmp: wav(tmp, "truncated.wav", "truncated"))
    add("corrupt_wav", error("not readable as audio"), lambda tmp: wav(tmp, "corrupt.wav",
                                                                      "corrupt"))
    add("zero_samples", error("no samples"), lambda tmp: wav(tmp, "zero.wav", "zero_samples"))
    add("clip_of_1_ms", error("shorter than one analysis window"),
        lambda tmp: wav(tmp, "tiny.wav", "one_ms"))
    add("text_file", error("not readable as audio"), lambda tmp: wav(tmp, "notes.txt", "text"))
    add("file_of_200_mb", error("not readable as audio"),
        lambda tmp: big_line_file(tmp, "huge.wav"))

    @case(task, "predict", "stereo_44k", ok())
    def _(tmp, runs):
        path = wav(tmp, "stereo.wav", "stereo_44k")
        return [task, "predict", "--run-dir", str(runs(task)), str(path)], path.name


def audio_folder_cases(task: str, command: str) -> None:
    """--data FOLDER problems."""
    def add(name, expect, build):
        def make(tmp, runs):
            path = build(tmp)
            run = (["--run-dir", str(tmp / "new_run")] if command == "train"
                   else ["--run-dir", str(runs(task))])
            return [task, command, *run, "--cache-dir", str(runs.cache), "--data",
                    str(path)], path.name
        case(task, command, name, expect)(make)

    if command != "train":  # train: in test_speech_words.py
        add("missing", error("no such folder"), lambda tmp: tmp / "missing")
    add("file_not_folder", error("not a folder"), lambda tmp: wav(tmp, "clip.wav", "one_ms"))
    add("empty_folder", error("no recordings"), lambda tmp: empty_dir(tmp, "recordings"))
    add("only_a_text_file", error("no recordings"),
        lambda tmp: write(tmp / "texts", "notes.txt", "not audio\n").parent)
    if command == "train":
        def strict(tmp):
            # Every recording of one training speaker is cut short: digits draws
            # its utterances at random and reads only the recordings it draws.
            folder = fsdd_subset(tmp / "strict")
            for path in folder.glob("*_george_*.wav"):
                wav(folder, path.name, "truncated")
            return folder
        case(task, command, "strict_truncated_wav",
             error(r"\d_george_\d\.wav", "shorter than|too short"))(
            lambda tmp, runs: ([task, "train", "--run-dir", str(tmp / "new_run"), "--strict",
                                "--cache-dir", str(runs.cache), "--data", str(strict(tmp)),
                                *TRAIN_ARGS[task]], "_george_"))
    else:
        def only_bad(tmp):
            folder = tmp / "bad-recordings"
            for name, kind in (("0_george_0.wav", "truncated"), ("1_george_0.wav", "corrupt"),
                               ("2_jackson_0.wav", "zero_samples"), ("3_jackson_0.wav",
                                                                     "one_ms")):
                wav(folder, name, kind)
            return folder
        add("only_bad_recordings", error("no usable (digit )?recordings", after_warnings=True),
            only_bad)


for _task in ("words", "digits"):
    audio_file_cases(_task)
    audio_folder_cases(_task, "train")
    audio_folder_cases(_task, "evaluate")


@case("words", "train", "cache_dir_is_a_file", error("--cache-dir", "not a folder|is a file"))
def _(tmp, runs):
    cache = write(tmp, "cache.txt", "not a folder\n")
    return ["words", "train", "--run-dir", str(tmp / "new_run"), "--cache-dir", str(cache),
            "--data", str(fsdd_subset(tmp / "d")), *TRAIN_ARGS["words"]], cache.name


# -- finance -------------------------------------------------------------------------


def csv_cases(command: str) -> None:
    """--data problems of forecast train/evaluate/predict (a run trained on OHLCV data)."""
    def add(name, expect, build, *, shown=None):
        def make(tmp, runs):
            path = build(tmp)
            run = (["--run-dir", str(tmp / "new_run"), *TRAIN_ARGS["forecast"]]
                   if command == "train" else ["--run-dir", str(runs("forecast"))])
            return ["forecast", command, *run, "--data", str(path)], shown or path.name
        case("forecast", command, name, expect)(make)

    add("missing", error("no such file"), lambda tmp: tmp / "missing.csv")
    add("empty", error("empty"), lambda tmp: write(tmp, "empty.csv", ""))
    add("non_utf8", error("line 1: byte 0xe9 is not valid UTF-8"),
        lambda tmp: write(tmp, "latin1.csv", "\n".join(spy_rows()).encode().replace(
            b"OpenInt", b"Int\xe9r\xeat")))
    add("no_date_column", error("no date column"),
        lambda tmp: spy_csv(tmp, "nodate.csv", lambda r: [",".join(x.split(",")[1:])
                                                          for x in r]))
    add("header_only", error("no (data )?rows|only a header"),
        lambda tmp: spy_csv(tmp, "header.csv", lambda r: r[:1]))
    add("one_row", error("longer than the series \\(1 rows"),
        lambda tmp: spy_csv(tmp, "one.csv", lambda r: r[:2]))
    add("nan_value", error("line 11, column 'Close'", "missing value|not a (finite )?number"),
        lambda tmp: spy_csv(tmp, "nan.csv", lambda r: set_cell(r, 11, 4, "NaN")))
    add("infinite_value", error("line 12, column 'High'", "inf", "finite"),
        lambda tmp: spy_csv(tmp, "inf.csv", lambda r: set_cell(r, 12, 2, "inf")))
    add("line_of_200_mb", error("200 MB is larger than the limit"),
        lambda tmp: big_line_file(tmp, "huge.csv", spy_rows()[0] + "\n"))
    add("folder_with_a_file_missing_a_column", error("b.csv", "no column 'volume'"),
        lambda tmp: (spy_csv(tmp / "tickers", "a.csv"),
                     spy_csv(tmp / "tickers", "b.csv",
                             lambda r: [",".join(x.split(",")[:5]) for x in r]))[0].parent,
        shown="b.csv")
    if command != "train":  # train: in test_finance_cli.py
        add("duplicate_dates", error("duplicate date"),
            lambda tmp: spy_csv(tmp, "dup.csv", lambda r: r[:10] + [r[9]] + r[11:]))
        add("negative_price", error("line 11, column 'Close'", "not positive"),
            lambda tmp: spy_csv(tmp, "neg.csv", lambda r: set_cell(r, 11, 4, "-3")))
        add("other_layout", error("no column"),
            lambda tmp: write(tmp, "temps.csv", "Date,Temp\n" + "".join(
                f"2001-01-{d:02d},{d}\n" for d in range(1, 29))))
        add("folder_without_csv", error("no .csv"), lambda tmp: empty_dir(tmp, "nocsv"))
    if command == "predict":
        def unsorted(tmp):
            return spy_csv(tmp, "unsorted.csv",
                           lambda r: r[:1] + r[1:-40] + r[-20:] + r[-40:-20])
        case("forecast", "predict", "unsorted_dates", ok("unsorted.csv", "not in ascending "
                                                                        "order", "sorted"))(
            lambda tmp, runs: (["forecast", "predict", "--run-dir", str(runs("forecast")),
                                "--data", str(unsorted(tmp))], "unsorted"))


for _command in ("train", "evaluate", "predict"):
    csv_cases(_command)


# -- running a case -------------------------------------------------------------------------


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (the lock file excluded).

    The 200 MB inputs the catalogue builds itself are identified by size and
    modification time instead of being read twice per case.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".lock":
            stat = path.stat()
            out[str(path.relative_to(root))] = (
                f"{stat.st_size}:{stat.st_mtime_ns}" if stat.st_size > BIG // 2 else
                hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def run_in_process(app: str, argv: list[str]) -> int:
    try:
        return MAINS[app](argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code if isinstance(exc.code, int) else 1


def check_error_line(err: str, app: str, shown: str, patterns: tuple[str, ...],
                     after_warnings: bool = False) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    if after_warnings:
        assert all(line.startswith("warning: ") for line in lines[:-1]), err[-3000:]
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err[-3000:]}"
    line = lines[0]
    assert line.startswith(f"{PROGS[app]}"), line
    assert "error:" in line, line
    assert shown in line, f"the line does not name {shown!r}: {line}"
    for pattern in patterns:
        assert re.search(pattern, line), f"no /{pattern}/ in: {line}"
    assert not INTERNALS.search(line), line
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, runs: Runs, tmp_path: Path, capfd):
    argv, shown = case.make(tmp_path, runs)
    capfd.readouterr()  # a fixture run trained just now printed its progress
    before = tree_hash(tmp_path)

    big = case.name.endswith("200_mb")
    if big:
        tracemalloc.start()
    code = run_in_process(case.app, argv)
    if big:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Bounded memory: the 200 MB input was rejected (or streamed), never read whole.
        assert peak < 50 * 2**20, f"peak Python allocation {peak / 2**20:.0f} MB"
    out, err = capfd.readouterr()

    if case.expect.ok:
        assert code == 0, err[-3000:]
        assert not INTERNALS.search(err), err[-3000:]
        for pattern in case.expect.patterns:
            assert re.search(pattern, err), f"no /{pattern}/ on stderr:\n{err[-3000:]}"
        assert shown in out  # the file was answered
    else:
        assert code != 0, f"exit 0 for a bad input; stdout:\n{out[-2000:]}"
        check_error_line(err, case.app, shown, case.expect.patterns,
                         case.expect.after_warnings)
    assert tree_hash(tmp_path) == before, "case folder changed"
    for task, path in runs.paths.items():
        assert tree_hash(path) == runs.hashes[task], f"run:{task} changed"


# -- what the catalogue does not cover as single cases -----------------------------------


def test_training_skips_bad_recordings_and_accepts_stereo(runs: Runs):
    """words train on a folder holding bad files: a warning per file and a count, no exit."""
    run = runs("words")
    err = runs.stderr["words"]
    for name in ("4_george_91.wav", "5_george_92.wav", "6_george_93.wav", "7_george_94.wav",
                 "8_george_95.wav"):
        assert re.search(rf"warning: skipped .*{name}", err), name
    assert "3_george_96.wav" not in err  # stereo 44.1 kHz is valid input
    assert re.search(r"skipped \d+ of \d+ \w+ recordings", err)
    assert "ignored 1 file" in err and "notes.txt" in err
    settings = json.loads((run / "config.json").read_text())["app_settings"]
    assert sum(settings["examples"].values()) == 36 + 1  # the sample subset + the stereo clip


SUBPROCESS_CASES = {
    # The real exit code and stderr of `python -m apps.X`, one per app.
    "nlp": lambda tmp, runs: ["textgen", "generate", "--run-dir",
                              str(runs("forecast") / "saved_model")],
    "speech": lambda tmp, runs: ["words", "predict", "--run-dir", str(runs("words")),
                                 str(wav(tmp, "corrupt.wav", "corrupt"))],
    "finance": lambda tmp, runs: ["forecast", "predict", "--run-dir",
                                  str(runs.copy("forecast", tmp / "run")), "--data", str(
                                      spy_csv(tmp, "inf.csv",
                                              lambda r: set_cell(r, 12, 2, "inf")))],
}


@pytest.mark.parametrize("app", list(SUBPROCESS_CASES))
def test_real_exit_code_and_one_line(app: str, runs: Runs, tmp_path: Path):
    argv = SUBPROCESS_CASES[app](tmp_path, runs)
    result = subprocess.run([sys.executable, "-m", f"apps.{app}", *argv], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{PROGS[app]}: error: "), result.stderr
    assert not INTERNALS.search(result.stderr)


def test_a_window_longer_than_every_clip_names_ten_files_then_stops(tmp_path: Path, capfd):
    """A setting that rules out every recording: ten named warnings and one error, not one
    warning per file (there are 36 here)."""
    argv = ["words", "train", "--run-dir", str(tmp_path / "run"), "--cache-dir", "none",
            "--data", str(fsdd_subset(tmp_path / "d")), *TRAIN_ARGS["words"],
            "--window-ms", "5000"]
    assert run_in_process("speech", argv) == 2
    err = capfd.readouterr().err
    named = [line for line in err.splitlines() if "shorter than one analysis window" in line]
    assert len(named) == 10, err[-3000:]
    check_error_line(err, "speech", "--data", (r"every one of the \d+ train recordings was "
                                               "skipped",), after_warnings=True)
    assert not (tmp_path / "run").exists()


def test_digits_whose_every_utterance_is_skipped_stop_with_a_count(tmp_path: Path, capfd):
    argv = ["digits", "train", "--run-dir", str(tmp_path / "run"), "--cache-dir", "none",
            "--data", str(fsdd_subset(tmp_path / "d")), *TRAIN_ARGS["digits"],
            "--window-ms", "5000"]
    assert run_in_process("speech", argv) == 2
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "analysis window" in line]) <= 10, err
    assert re.search(r"warning: skipped \d+ of \d+ utterances", err), err[-3000:]
    check_error_line(err, "speech", "utterances", (r"every one of the \d+ utterances was "
                                                   "skipped",), after_warnings=True)
    assert not (tmp_path / "run").exists()
