"""`make demo`: every app trained, exported and served on the bundled samples.

    python -m common.demo                    # ~4 minutes on 2 CPU cores, into runs/demo/
    python -m common.demo --quick --out /tmp/demo    # smallest settings (1-2 min), for tests
    python -m common.demo --only words,forecast

What it does, one numbered stage at a time:

1. trains each app task (nlp textgen and sentiment, speech words and digits,
   finance forecast) on the sample shipped in ``apps/<app>/samples/``, by
   calling the app's own ``main(argv)``, exactly as ``python -m apps.<app>
   <task> train --run-dir <root>/<app>_<task> ...`` would: every run directory
   gets config.json, metrics.json, logs/ (TensorBoard), model.keras and the
   exported saved_model/;
2. runs the adding-problem experiment (LSTM vs SimpleRNN, T = 50) into
   ``<root>/adding_problem`` (`common.experiments.adding_problem`);
3. sends one raw request through every exported SavedModel in a fresh Python
   process that imports TensorFlow and NumPy only, none of this project's code
   (`SERVE_SCRIPT`): proof that ``saved_model/`` stands on its own;
4. prints a table (task, metric, value, run dir), writes it to
   ``<root>/demo_summary.json``, and prints the command that opens
   TensorBoard on all the runs.

The settings below are the smallest that still learn something in a few
minutes; they are far from each app's defaults (see docs/*.md for real runs).
A failing stage is reported with its name, the others still run, and the demo
exits non-zero. The demo root is replaced on every run, but only if it holds
the demo's marker file (`MARKER`): a folder the demo did not make is never
deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cli import ArgumentParser, HelpFormatter, choice_list, describe_error
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO / "apps" / "speech" / "samples" / "fsdd"
SPY = REPO / "apps" / "finance" / "samples" / "spy_sample.csv"
MARKER = ".lstm-suite-demo"  # marks a folder the demo made (and may delete)
SUMMARY = "demo_summary.json"


# ---------------------------------------------------------------------------
# The tasks: which app, which flags (full demo / --quick), which metric
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One app task of the demo: trained with `flags`, reported by `metric`."""

    name: str  # --only name
    app: str  # apps.<app>
    task: str
    flags: tuple[str, ...]  # train flags of the full demo
    quick: tuple[str, ...]  # train flags of --quick (tests)
    metric: str  # what the table shows
    read: Callable[[dict], float]  # metrics.json -> the value

    @property
    def title(self) -> str:
        return f"{self.app} {self.task}"

    @property
    def run_name(self) -> str:
        return f"{self.app}_{self.task}"


TASKS = [
    # 90 KB of Shakespeare, 40 x 60 steps of 128 units (~1 min): about 2.5 bits/char,
    # enough for words, names and line breaks in the generated text.
    Task("textgen", "nlp", "textgen",
         flags=("--units", "128", "--embedding-dim", "32", "--seq-len", "64",
                "--batch-size", "64", "--steps-per-epoch", "60", "--epochs", "40",
                "--sample-length", "200"),
         quick=("--units", "16", "--embedding-dim", "8", "--seq-len", "32", "--batch-size", "32",
                "--steps-per-epoch", "4", "--epochs", "1", "--sample-length", "20"),
         metric="validation bits/char", read=lambda m: m["validation"]["bits_per_char"]),
    # 320 templated reviews: easy, a small bidirectional LSTM gets most of them.
    Task("sentiment", "nlp", "sentiment",
         flags=("--units", "16", "--embedding-dim", "16", "--max-len", "24",
                "--max-tokens", "1000", "--batch-size", "32", "--epochs", "8"),
         quick=("--units", "8", "--embedding-dim", "8", "--max-len", "16", "--max-tokens", "200",
                "--batch-size", "32", "--epochs", "1"),
         metric="test accuracy", read=lambda m: m["test"]["accuracy"]),
    # 90 FSDD recordings of 3 speakers: 54 train, 6 validation, 30 test (FSDD's split).
    Task("words", "speech", "words",
         flags=("--units", "32", "--layers", "1", "--batch-size", "16", "--epochs", "40",
                "--learning-rate", "2e-3"),
         quick=("--units", "8", "--layers", "1", "--batch-size", "16", "--epochs", "1"),
         metric="test accuracy", read=lambda m: m["test"]["accuracy"]),
    # Connected digit strings glued from the same recordings (CTC). Only two speakers
    # train, the test speaker is a third one: WER ~0.75 (bigger models overfit more).
    Task("digits", "speech", "digits",
         flags=("--units", "48", "--layers", "1", "--utterances", "600",
                "--test-utterances", "50", "--max-digits", "3", "--batch-size", "16",
                "--epochs", "14"),
         quick=("--units", "8", "--layers", "1", "--utterances", "16", "--test-utterances", "4",
                "--max-digits", "2", "--batch-size", "8", "--epochs", "1"),
         metric="test WER (CTC)", read=lambda m: m["test_transcription"]["wer"]),
    # Three years of SPY, next-day log return. MASE = MAE / persistence's MAE: ~1,
    # next-day returns are close to unpredictable (what the baselines are there for).
    Task("forecast", "finance", "forecast",
         flags=("--units", "32", "--epochs", "10", "--patience", "4"),
         quick=("--units", "8", "--window", "20", "--vol-window", "5", "--epochs", "1"),
         metric="test MASE (vs persistence)", read=lambda m: m["comparison"]["model"]["mase"]),
]

# The adding problem (issue #8): LSTM vs SimpleRNN (same parameter count) on
# T = 50. At this learning rate the LSTM solves it after ~600 steps (~20 s);
# the SimpleRNN stays at the constant predictor's MSE (~0.17).
ADDING = {"lengths": (50,), "steps": 800, "units": 32, "learning_rate": 1e-2}
ADDING_QUICK = {"lengths": (20,), "steps": 10, "units": 8, "learning_rate": 1e-2}

# The requests sent to the SavedModels (raw input, as a client would send it).
PRIME = "ROMEO:\n"
REVIEW = "A wonderful film, the acting is superb and the story moving."
WORD_WAVS = ("3_nicolas_0.wav", "7_nicolas_0.wav")  # test recordings
# "4 2" said by a training speaker (recordings held out of training) and by
# the test speaker, whom the digits model never heard.
DIGIT_UTTERANCES = (("4_george_0.wav", "2_george_0.wav"), ("4_nicolas_0.wav", "2_nicolas_0.wav"))


# ---------------------------------------------------------------------------
# The fresh process: plain TensorFlow, one request per SavedModel
# ---------------------------------------------------------------------------

SERVE_SCRIPT = r'''
"""One raw request through each SavedModel; imports TensorFlow and NumPy only."""
import csv, json, sys

import numpy as np
import tensorflow as tf


def wav(path, rate):
    audio, sr = tf.audio.decode_wav(tf.io.read_file(path), desired_channels=1)
    if int(sr) != rate:
        raise ValueError(f"{path}: {int(sr)} Hz, the model takes {rate} Hz")
    return audio[:, 0].numpy()


def textgen(job):
    return {"prime": tf.constant(job["prime"]), "length": tf.constant(job["length"]),
            "temperature": tf.constant(0.8), "seed": tf.constant(0, tf.int64)}


def sentiment(job):
    return {"text": tf.constant(job["texts"])}


def batch(waves):  # rows zero-padded to the longest (the models trim silence)
    out = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
    for i, w in enumerate(waves):
        out[i, :len(w)] = w
    return {"waveform": tf.constant(out)}


def words(job):  # one recording per row
    return batch([wav(p, job["rate"]) for p in job["wavs"]])


def digits(job):  # one row per utterance: its recordings one after the other
    gap = np.zeros(int(0.1 * job["rate"]), np.float32)
    return batch([np.concatenate([np.concatenate([wav(p, job["rate"]), gap]) for p in paths])
                  for paths in job["utterances"]])


def forecast(job):  # the last `window` rows of the CSV, raw prices and volume
    with open(job["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    names = {n.strip().lower(): n for n in rows[0]}
    if "adj close" in names:
        names["close"] = names["adj close"]
    table = [[float(r[names[c]]) for c in job["columns"]] for r in rows[-job["window"]:]]
    return {"rows": tf.constant([table], tf.float32)}


def plain(tensor):  # a tensor as JSON: numbers as lists, strings decoded
    value = np.asarray(tensor.numpy())
    if value.dtype.kind in "OS":
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(
            value).tolist()
    return value.tolist()


results = {}
for job in json.loads(sys.argv[1]):
    try:
        serve = tf.saved_model.load(job["saved_model"]).signatures["serving_default"]
        outputs = serve(**globals()[job["kind"]](job))
        results[job["task"]] = {"ok": True, "outputs": {k: plain(v) for k, v in outputs.items()}}
    except Exception as exc:  # reported per model; the others still run
        results[job["task"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("apps", "common"))
print(json.dumps({"results": results, "project_modules": ours}))
'''


def serving_job(task: Task, run_dir: Path) -> dict[str, Any]:
    """The request for one task's SavedModel (what `SERVE_SCRIPT` needs to build it)."""
    run_dir = run_dir.absolute()  # the serving process runs in another folder
    job: dict[str, Any] = {"task": task.name, "kind": task.name,
                           "saved_model": str(run_dir / "saved_model")}
    settings = json.loads((run_dir / "config.json").read_text())["app_settings"]
    if task.name == "textgen":
        job.update(prime=PRIME, length=200)
    elif task.name == "sentiment":
        job.update(texts=[REVIEW, "A dull, boring film; the plot never works."])
    elif task.name == "words":
        job.update(wavs=[str(FSDD / name) for name in WORD_WAVS],
                   rate=settings["features"]["sample_rate"])
    elif task.name == "digits":
        job.update(utterances=[[str(FSDD / name) for name in u] for u in DIGIT_UTTERANCES],
                   rate=settings["features"]["sample_rate"])
    elif task.name == "forecast":
        data = settings["data"]
        columns = ["open", "high", "low", "close", "volume"] if data["mode"] == "ohlcv" \
            else [data["target"]]
        job.update(csv=str(SPY), columns=columns, window=data["window"])
    return job


def describe_prediction(task: str, job: dict[str, Any], outputs: dict[str, Any]) -> str:
    """One readable line for what a SavedModel answered."""
    if task == "textgen":
        return f"prime {job['prime']!r} -> {outputs['text'][:70]!r}..."
    if task == "sentiment":
        return "; ".join(f"{t[:30]!r}... -> P(positive) {p:.2f}"
                         for t, p in zip(job["texts"], outputs["probability"], strict=True))
    if task == "words":
        return "; ".join(f"{Path(w).name} -> '{label}' (p {p:.2f})" for w, label, p in
                         zip(job["wavs"], outputs["label"], outputs["probability"], strict=True))
    if task == "digits":
        return "; ".join(
            f"'{''.join(Path(w).name[0] for w in u)}' by {Path(u[0]).stem.split('_')[1]} -> "
            f"'{digits}'" for u, digits in zip(job["utterances"], outputs["digits"], strict=True))
    return (f"last {job['window']} rows of {Path(job['csv']).name} -> next-day log return "
            f"{outputs['forecast'][0]:+.5f} (10-90%: {outputs['q10'][0]:+.5f} .. "
            f"{outputs['q90'][0]:+.5f})")


def serve_in_fresh_process(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run `SERVE_SCRIPT` on `jobs` in a new interpreter; its parsed JSON answer."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise UserError(f"the serving process failed (exit code {proc.returncode}):\n{tail}")
    answer = json.loads(lines[-1])
    # Our packages are importable there (an editable install): check that none was used.
    if answer["project_modules"]:
        raise UserError("the serving process imported project code: "
                        + ", ".join(answer["project_modules"]))
    return answer["results"]


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary table (and of demo_summary.json)."""

    task: str
    metric: str
    value: float | None
    run_dir: str
    seconds: float
    ok: bool = True
    error: str | None = None


def prepare_root(root: Path) -> None:
    """Create the demo root; a previous demo root (with our marker) is replaced."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise UserError(f"--out {root}: exists and is not a folder")
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise UserError(f"--out {root}: the folder exists and was not written by the demo "
                            f"(no {MARKER} file in it); choose another --out or empty it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("Written by `python -m common.demo`: the next demo run into "
                               "this folder deletes it and everything in it.\n")


class _ErrorLines:
    """Wraps sys.stderr: writes pass through, the ``error:`` lines are remembered."""

    def __init__(self, stream):
        self.stream = stream
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines += [line.strip() for line in text.splitlines() if ": error: " in line]
        return self.stream.write(text)

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding...
        return getattr(self.stream, name)


def call_app(app: str, argv: list[str]) -> tuple[int, str | None]:
    """``apps.<app>.__main__.main(argv)``: (exit code, its error line, if any)."""
    stderr = _ErrorLines(sys.stderr)
    try:
        with contextlib.redirect_stderr(stderr):
            main = importlib.import_module(f"apps.{app}.__main__").main
            code = main(argv)  # the app prints its own one-line errors
    except SystemExit as exc:  # argparse usage errors: the message is already printed
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001  (anything else: one line, no traceback)
        message, code = describe_error(exc)
        print(f"error: {message}", file=sys.stderr)
        return code, message
    return code, (stderr.lines[-1] if code and stderr.lines else None)


def train_task(task: Task, root: Path, quick: bool, debug: bool = False) -> Row:
    """Train one task into <root>/<app>_<task>; its row of the table."""
    run_dir = root / task.run_name
    argv = [task.task, "train", "--run-dir", str(run_dir), *(task.quick if quick else task.flags)]
    if task.app == "speech":  # MFCCs cached inside the demo root, not in ~/.cache
        argv += ["--cache-dir", str(root / "mfcc_cache")]
    if debug:
        argv.append("--debug")
    print(f"  $ python -m apps.{task.app} {' '.join(argv)}", flush=True)
    started = time.monotonic()
    code, message = call_app(task.app, argv)
    seconds = time.monotonic() - started
    _release_memory()
    row = Row(task.title, task.metric, None, str(run_dir), round(seconds, 1))
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        row.ok, row.error = False, message or f"exit code {code} (see the error above)"
        return row
    missing = [name for name in ("config.json", "metrics.json", "model.keras",
                                 "saved_model/saved_model.pb") if not (run_dir / name).exists()]
    if missing:
        row.ok, row.error = False, f"the run has no {', '.join(missing)}"
        return row
    row.value = float(task.read(json.loads((run_dir / "metrics.json").read_text())))
    return row


def adding_problem(root: Path, quick: bool) -> list[Row]:
    """The vanishing-gradient experiment; one row per model (test MSE)."""
    settings = ADDING_QUICK if quick else ADDING
    out = root / "adding_problem"
    started = time.monotonic()
    try:
        from common.experiments.adding_problem import run_experiment

        outcome = run_experiment(settings["lengths"], settings["steps"], out,
                                 units=settings["units"],
                                 learning_rate=settings["learning_rate"])
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001  (reported as the stage's error)
        message = describe_error(exc)[0]
        return [Row("adding problem", "test MSE", None, str(out),
                    round(time.monotonic() - started, 1), ok=False, error=message)]
    finally:
        _release_memory()
    seconds = round(time.monotonic() - started, 1)
    names = {"lstm": "LSTM", "simplernn": "SimpleRNN"}
    return [Row(f"adding problem {names.get(r['model'], r['model'])}",
                f"test MSE, T={r['T']} ({'solved' if r['solved'] else 'not solved'})",
                float(r["test_mse"]), str(out), seconds) for r in outcome["results"]]


def _release_memory() -> None:
    # Each app builds its own models; the previous ones are no longer needed.
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def format_table(rows: list[Row], root: Path) -> str:
    """The summary table: task, metric, value, run dir (relative to the demo root)."""
    header = ("task", "metric", "value", "run dir")
    lines = [(r.task, r.metric, "FAILED" if not r.ok else f"{r.value:.4f}",
              _relative(Path(r.run_dir), root)) for r in rows]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(3)]
    out = []
    for line in [header, *lines]:
        out.append("  ".join(f"{c:<{w}}" for c, w in zip(line[:3], widths, strict=True))
                   + "  " + line[3])
    return "\n".join(out)


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def tensorboard_command(root: Path) -> str:
    """The command that opens TensorBoard on every run of the demo."""
    exe = Path(sys.executable)
    tensorboard = exe.with_name("tensorboard")
    shown = _shortest(root)
    if tensorboard.exists():
        return f"{_shortest(tensorboard)} --logdir {shown}"
    return f"{_shortest(exe)} -m tensorboard.main --logdir {shown}"


def _shortest(path: Path) -> str:
    # Relative to the working directory when inside it: what a user would type.
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

STAGE_NAMES = [t.name for t in TASKS] + ["adding"]


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m common.demo",
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[2:4]),
        formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                        help="the demo root: one run directory per task, adding_problem/, "
                             f"{SUMMARY}; replaced on every demo run (only if the demo made it)")
    parser.add_argument("--quick", action="store_true",
                        help="the smallest settings (1 epoch, tiny models): checks that "
                             "everything works in 1-2 minutes; the metrics mean nothing")
    parser.add_argument("--only", type=choice_list(STAGE_NAMES, "stage"), metavar="NAME[,NAME]",
                        help=f"run only these stages, from {','.join(STAGE_NAMES)}; "
                             "default: all (the serving check runs whenever an app task does)")
    parser.add_argument("--debug", action="store_true",
                        help="show full Python/TensorFlow tracebacks (of the apps too) instead "
                             "of one error line")
    return parser



def run_demo(args: argparse.Namespace) -> int:
    """Run the selected stages, print and write the summary; the exit code."""
    root: Path = args.out
    only = args.only or STAGE_NAMES
    tasks = [t for t in TASKS if t.name in only]
    stages = len(tasks) + ("adding" in only) + bool(tasks)
    prepare_root(root)
    print(f"demo: {stages} stages into {root}{' (--quick settings)' if args.quick else ''}",
          flush=True)
    started = time.monotonic()
    rows: list[Row] = []
    failures: list[str] = []
    step = 0

    def announce(what: str) -> None:
        nonlocal step
        step += 1
        print(f"\n[{step}/{stages}] {what} ...", flush=True)

    def report(new: list[Row]) -> None:
        for r in new:
            verdict = f"{r.metric} {r.value:.4f}" if r.ok else f"FAILED: {r.error}"
            print(f"[{step}/{stages}] {r.task}: {verdict} ({r.seconds:.0f} s)", flush=True)
            if not r.ok:
                failures.append(f"stage {step} ({r.task}) failed: {r.error}")
        rows.extend(new)

    trained: list[tuple[Task, Row]] = []
    for task in tasks:
        announce(f"{task.title}: training")
        row = train_task(task, root, args.quick, debug=args.debug)
        report([row])
        if row.ok:
            trained.append((task, row))

    if "adding" in only:
        lengths = ",".join(map(str, (ADDING_QUICK if args.quick else ADDING)["lengths"]))
        announce(f"adding problem: LSTM vs SimpleRNN, T = {lengths}")
        report(adding_problem(root, args.quick))

    predictions: dict[str, Any] = {}
    if tasks:
        announce("serving: one request per SavedModel in a fresh process (plain TensorFlow)")
        t0 = time.monotonic()
        jobs: list[dict] = []
        try:
            jobs = [serving_job(t, Path(r.run_dir)) for t, r in trained]
            answers = serve_in_fresh_process(jobs) if jobs else {}
        except Exception as exc:  # noqa: BLE001  (reported as the stage's failure)
            answers = {}
            problem = describe_error(exc)[0]
            failures.append(f"stage {step} (serving) failed: {problem}")
            print(f"[{step}/{stages}] serving: FAILED: {problem}", flush=True)
        # Every trained row gets a line, also when its request could not be built.
        for job, (task, row) in itertools.zip_longest(jobs, trained, fillvalue={}):
            answer = answers.get(task.name, {"ok": False, "error": "no answer"})
            if answer["ok"]:
                line = describe_prediction(task.name, job, answer["outputs"])
            else:
                line = f"FAILED: {answer['error']}"
                row.ok, row.error = False, f"serving: {answer['error']}"
                if answers:  # one model failed, not the whole process
                    failures.append(f"stage {step} (serving {task.title}) failed: "
                                    f"{answer['error']}")
            predictions[task.name] = {**answer, "request": job, "line": line}
            print(f"  {task.title:<16} {line}", flush=True)
        if answers:
            print(f"[{step}/{stages}] serving: {len(jobs)} SavedModel(s) answered "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)

    wall = time.monotonic() - started
    command = tensorboard_command(root)
    summary = {"root": str(root.absolute()), "quick": args.quick,
               "wall_seconds": round(wall, 1), "tasks": [vars(r) for r in rows],
               "predictions": predictions, "failures": failures, "tensorboard": command}
    (root / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ndemo finished in {wall / 60:.1f} min; summary in {root / SUMMARY}\n")
    print(format_table(rows, root))
    print(f"\nTensorBoard on all demo runs (then open http://localhost:6006):\n  {command}",
          flush=True)
    for failure in failures:
        print(f"demo: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``make demo``); returns the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return run_demo(args)
    try:
        return run_demo(args)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (one line, not a traceback)
        message, code = describe_error(exc)
        print(f"demo: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
