"""Quality of apps/nlp on the full datasets in /work/shared/data (not a test).

    python benchmarks/nlp_quality.py textgen --minutes 5          # Tiny Shakespeare
    python benchmarks/nlp_quality.py textgen --minutes 60
    python benchmarks/nlp_quality.py imdb                         # 10% held out
    python benchmarks/nlp_quality.py polarity --folds 10          # 10-fold CV
    python benchmarks/nlp_quality.py polarity --folds 10 --vectors imdb   # + word vectors
    python benchmarks/nlp_quality.py polarity --folds 10 --init-from imdb # fine-tune an IMDB model
    python benchmarks/nlp_quality.py polarity --folds 10 --init-from imdb-sentences
    python benchmarks/nlp_quality.py polarity-ensemble --members polarity-vectors-imdb,polarity-init-imdb
    python benchmarks/nlp_quality.py textgen --minutes 5 --units 256   # flags for train

Each benchmark runs the app's own command line with its default settings (plus
the budget), so the numbers are what a user gets. Results are merged into
benchmarks/results/nlp_quality.json (one entry per benchmark, with the command,
the machine load and the date) and printed as a table.

``--vectors imdb`` first builds PPMI + SVD word vectors (apps/nlp/embeddings.py)
from the TEXT of the IMDB reviews only (no labels; no rt-polarity sentences, so
no test fold leaks into the vectors), caches them under --work, and passes
them as ``--embeddings``: semi-supervised learning with unlabelled in-domain text.

``--init-from imdb`` first trains a sentiment model on the labelled IMDB reviews
(the app's defaults, 12 minutes at most; cached under --work) and fine-tunes it
on every fold (``--init-from``): supervised transfer from another review corpus,
so its rows are reported apart from those that learn from rt-polarity alone.
``--init-from imdb-sentences`` does the same from a model trained on IMDB's
reviews cut into sentences, each labelled with its review's label (distant
supervision with noisy labels, on texts as short as rt-polarity's), starting
from the ``--vectors imdb`` word vectors.

Each polarity variant keeps its run in --work (``polarity``, ``polarity-vectors-imdb``,
``polarity-init-imdb``, with ``-seed-N`` for ``--seed N``; a rerun of a variant
replaces it). Every variant uses seed 0's folds (``--split-seed 0``), whatever its
``--seed``. ``polarity-ensemble`` averages the out-of-fold probabilities
(``cv_predictions.csv``) of such runs and scores the mean per fold.

Targets: textgen <= 1.88 nats/char (5 min) and <= 1.50 (60 min) of validation
loss on the last 10% of Tiny Shakespeare; IMDB accuracy >= 0.88 on a 10% hold
out; rt-polarity 10-fold accuracy >= 0.80.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LSTM_SUITE_DATA", "/work/shared/data"))
RESULTS = ROOT / "benchmarks" / "results" / "nlp_quality.json"
TARGETS = {"textgen_5min": ("val nats/char", "<=", 1.88),
           "textgen_60min": ("val nats/char", "<=", 1.50),
           "imdb": ("test accuracy", ">=", 0.88),
           "polarity": ("10-fold accuracy", ">=", 0.80)}


def run_cli(args: list[str]) -> float:
    """Run ``python -m apps.nlp ARGS`` (output streamed), return its wall time."""
    cmd = [sys.executable, "-m", "apps.nlp", *args]
    print("$", " ".join(cmd), flush=True)
    started = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.monotonic() - started


def fresh(run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def bench_textgen(opts) -> dict:
    run = fresh(opts.work / f"textgen_{opts.minutes:g}min")
    args = ["textgen", "train", "--run-dir", str(run), "--data",
            str(DATA / "tinyshakespeare" / "input.txt"), "--max-minutes", str(opts.minutes),
            *opts.extra]
    seconds = run_cli(args)
    metrics = json.loads((run / "metrics.json").read_text())
    loss = metrics["validation"]["loss"]
    variant = "".join(f" {a}" for a in opts.extra)  # flags beyond the defaults
    return {"name": f"textgen_{opts.minutes:g}min{variant}", "value": loss,
            "bits_per_char": metrics["validation"]["bits_per_char"],
            "epochs": metrics["epochs_completed"], "best_epoch": metrics["best_epoch"],
            "train_seconds": metrics["train_seconds_this_process"],
            "wall_seconds": round(seconds, 1), "command": "python -m apps.nlp " + " ".join(args),
            "settings": json.loads((run / "config.json").read_text())["app_settings"] | {
                "vocabulary": "(from the text)"}}


def bench_imdb(opts) -> dict:
    run = fresh(opts.work / "imdb")
    # The app's own split: 80% train / 10% validation / 10% test, shuffled with --seed.
    args = ["sentiment", "train", "--run-dir", str(run), "--data",
            str(DATA / "imdb" / "imdb_reviews.csv"), *opts.extra]
    if opts.minutes:
        args += ["--max-minutes", str(opts.minutes)]
    seconds = run_cli(args)
    metrics = json.loads((run / "metrics.json").read_text())
    cls = metrics["test_classification"]
    return {"name": "imdb", "value": cls["accuracy"], "roc_auc": cls["roc_auc"], "f1": cls["f1"],
            "test_examples": cls["examples"], "epochs": metrics["epochs_completed"],
            "wall_seconds": round(seconds, 1), "command": "python -m apps.nlp " + " ".join(args)}


# Word vectors from unlabelled IMDB text: (module args, cache file name).
VECTORS = {"imdb": (["--text", str(DATA / "imdb" / "imdb_reviews.csv"), "--text-col", "review",
                     "--dim", "300", "--vocab", "40000", "--window", "5"],
                    "imdb_ppmi_svd_300.txt")}


def build_vectors(opts, name: str | None = None) -> tuple[Path, dict]:
    """The cached word vectors `name` (--vectors by default; built on first use), and how."""
    module_args, file_name = VECTORS[name or opts.vectors]
    path = opts.work / file_name
    command = [sys.executable, "-m", "apps.nlp.embeddings", "build", *module_args,
               "--out", str(path)]
    info = {"file": str(path), "command": "python -m apps.nlp.embeddings build "
            + " ".join([*module_args, "--out", str(path)])}
    if not path.exists():
        print("$", " ".join(command), flush=True)
        started = time.monotonic()
        subprocess.run(command, cwd=ROOT, check=True)
        info["build_seconds"] = round(time.monotonic() - started, 1)
    return path, info


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def imdb_sentences(opts, min_words: int = 3, max_words: int = 56) -> Path:
    """IMDB's reviews cut into sentences, each labelled with its review's label (cached).

    Distant supervision: most sentences of a positive review lean positive, many
    are neutral (plot), a few lean the other way; the labels are noisy, the
    sentences are as short as rt-polarity's. `<br />` ends a line, and a line
    is cut after . ! or ? followed by white space.
    """
    path = opts.work / "imdb_sentences.csv"
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    with open(DATA / "imdb" / "imdb_reviews.csv", encoding="utf-8", newline="") as source, \
            open(partial, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["review", "sentiment"])
        for row in csv.DictReader(source):
            for line in row["review"].replace("<br />", "\n").split("\n"):
                for sentence in SENTENCE_END.split(line.strip()):
                    if min_words <= len(sentence.split()) <= max_words:
                        writer.writerow([sentence, row["sentiment"]])
    partial.replace(path)
    return path


def source_flags(opts) -> list[str]:
    """Train flags of the --init-from source run (the labelled corpus a polarity model starts from)."""
    if opts.init_from == "imdb":  # the app's defaults on whole reviews
        return ["--data", str(DATA / "imdb" / "imdb_reviews.csv"), "--max-minutes", "12"]
    # imdb-sentences: the IMDB vectors' model shape, trained on IMDB's sentences
    vectors, _ = build_vectors(opts, "imdb")
    return ["--data", str(imdb_sentences(opts)), "--embeddings", str(vectors),
            "--pooling", "max", "--max-len", "56", "--embedding-dropout", "0.3",
            "--dropout", "0.5", "--batch-size", "128", "--epochs", "4", "--max-minutes", "25"]


SOURCES = ("imdb", "imdb-sentences")


def source_run(opts) -> tuple[Path, dict]:
    """The cached --init-from run (trained on first use), and how it was made."""
    run = opts.work / f"{opts.init_from}_source"
    flags = source_flags(opts)
    args = ["sentiment", "train", "--run-dir", str(run), *flags]
    info = {"run": str(run), "command": "python -m apps.nlp " + " ".join(args)}
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if "test_classification" not in metrics:  # not trained, or killed before the end
        info["train_seconds"] = round(run_cli(["sentiment", "train", "--run-dir",
                                               str(fresh(run)), *flags]), 1)
        metrics = json.loads(metrics_path.read_text())
    info["source_test_accuracy"] = metrics["test_classification"]["accuracy"]
    return run, info


def bench_polarity(opts) -> dict:
    run = fresh(opts.work / ("polarity" + (f"-vectors-{opts.vectors}" if opts.vectors else "")
                             + (f"-init-{opts.init_from}" if opts.init_from else "")
                             + (f"-seed-{opts.seed}" if opts.seed else "")))
    extra, vectors, source = list(opts.extra), None, None
    if opts.seed:
        # Seed 0's folds, so that the runs of several seeds can be averaged per example.
        extra = ["--seed", str(opts.seed), "--split-seed", "0", *extra]
    if opts.vectors:
        path, vectors = build_vectors(opts)
        extra = ["--embeddings", str(path), *extra]
    if opts.init_from:
        source_dir, source = source_run(opts)
        extra = ["--init-from", str(source_dir), *extra]
    args = ["sentiment", "train", "--run-dir", str(run), "--data", str(DATA / "rt-polarity"),
            "--cv", str(opts.folds), *extra]
    seconds = run_cli(args)
    cv = json.loads((run / "cv.json").read_text())
    variant = (f" vectors={opts.vectors}" if opts.vectors else "") + (
        f" init={opts.init_from}" if opts.init_from else "") + (
        f" seed={opts.seed}" if opts.seed else "") + "".join(f" {a}" for a in opts.extra)
    result = {"name": f"polarity{variant}", "value": cv["accuracy_mean"],
              "std": cv["accuracy_std"], "folds": cv["folds"],
              "per_fold": [f["accuracy"] for f in cv["per_fold"]],
              "wall_seconds": round(seconds, 1),
              "command": "python -m apps.nlp " + " ".join(args)}
    if vectors:
        result["vectors"] = vectors
    if source:
        result["init_from"] = source
    return result


def read_predictions(run: Path) -> dict[int, tuple[int, int, float]]:
    """index -> (fold, label, probability) from a CV run's cv_predictions.csv."""
    path = run / "cv_predictions.csv"
    if not path.exists():
        raise SystemExit(f"{path}: missing; run that polarity variant first")
    lines = path.read_text().splitlines()[1:]
    return {int(i): (int(k), int(y), float(p))
            for i, k, y, p in (line.split(",") for line in lines)}


def bench_polarity_ensemble(opts) -> dict:
    """The mean out-of-fold probability of earlier polarity runs, scored per fold."""
    names = opts.members.split(",")
    members = [read_predictions(opts.work / name) for name in names]
    first = {i: (k, y) for i, (k, y, _) in members[0].items()}
    for name, member in zip(names[1:], members[1:], strict=True):
        if {i: (k, y) for i, (k, y, _) in member.items()} != first:
            raise SystemExit(f"{name}: other folds or labels than {names[0]} (same --folds "
                             "and split seed needed)")
    folds: dict[int, list[bool]] = {}
    for i, (k, y) in first.items():
        mean = sum(member[i][2] for member in members) / len(members)
        folds.setdefault(k, []).append((mean >= 0.5) == bool(y))
    per_fold = [sum(hits) / len(hits) for _, hits in sorted(folds.items())]
    mean = sum(per_fold) / len(per_fold)
    std = (sum((a - mean) ** 2 for a in per_fold) / len(per_fold)) ** 0.5
    return {"name": f"polarity ensemble={opts.members}", "value": mean, "std": std,
            "folds": len(per_fold), "per_fold": per_fold, "wall_seconds": 0.0,
            "members": {name: str(opts.work / name) for name in names}}


def write_table(results: dict) -> str:
    """The results as a text table, also written beside the JSON."""
    width = max(len("benchmark"), *(len(r["name"]) for r in results.values())) + 2
    lines = [f"{'benchmark':<{width}}{'metric':<20}{'value':>8}{'+- std':>8}  {'target':<8}"
             f"{'met':<6}{'wall s':>8}  load (1m) before/after  date"]
    for r in sorted(results.values(), key=lambda r: r["name"]):
        std = f"{r['std']:.4f}" if r.get("std") is not None else ""
        lines.append(f"{r['name']:<{width}}{r['metric']:<20}{r['value']:>8.4f}{std:>8}  "
                     f"{r['target'] or '':<8}{str(r['met']):<6}{r['wall_seconds']:>8.0f}  "
                     f"{r['loadavg_before'][0]}/{r['loadavg_after'][0]:<18}  {r['date']}")
    table = "\n".join(lines) + "\n"
    RESULTS.with_suffix(".txt").write_text(table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("textgen", "imdb", "polarity", "polarity-ensemble"))
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget (--max-minutes); textgen default 5")
    parser.add_argument("--folds", type=int, default=10, help="polarity: cross-validation folds")
    parser.add_argument("--vectors", choices=sorted(VECTORS), default=None,
                        help="polarity: build (once, cached in --work) and use word vectors "
                             "trained on this unlabelled text")
    parser.add_argument("--init-from", choices=SOURCES, default=None,
                        help="polarity: train (once, cached in --work) a model on this labelled "
                             "corpus and fine-tune it on every fold")
    parser.add_argument("--seed", type=int, default=0,
                        help="polarity: the models' seed; the folds stay seed 0's, and a seed "
                             "other than 0 gets its own run (e.g. polarity-init-imdb-seed-1)")
    parser.add_argument("--members", default="polarity-vectors-imdb,polarity-init-imdb",
                        help="polarity-ensemble: comma-separated polarity runs in --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nlp_quality"),
                        help="where the run directories go")
    # Any other flag goes to the app's train command, e.g. --units 256.
    opts, opts.extra = parser.parse_known_args()
    if opts.vectors and opts.init_from:
        parser.error("--vectors and --init-from exclude each other (the vocabulary and "
                     "vectors of an --init-from run are its own)")
    if opts.benchmark == "textgen" and opts.minutes is None:
        opts.minutes = 5.0
    opts.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    result = {"textgen": bench_textgen, "imdb": bench_imdb,
              "polarity": bench_polarity,
              "polarity-ensemble": bench_polarity_ensemble}[opts.benchmark](opts)
    what, op, target = TARGETS[result["name"].split()[0]]
    result.update({
        "metric": what, "target": f"{op} {target}" if target is not None else None,
        "met": None if target is None else (result["value"] <= target if op == "<="
                                            else result["value"] >= target),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[result["name"]] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    table = write_table(results)
    print("\n" + table + f"written {RESULTS} and {RESULTS.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
