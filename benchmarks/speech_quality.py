"""Speech quality report on the full FSDD data (a benchmark, not a test).

    python benchmarks/speech_quality.py                       # everything
    python benchmarks/speech_quality.py --only official --max-minutes 10
    python benchmarks/speech_quality.py --table-only     # the .txt again from the .json
    python benchmarks/speech_quality.py --only official --units 128   # flags for train

Runs, each through the real command line into its own run directory:

- official: `words` on FSDD's official split (indices 0-4 test); target >= 99%
  (a public BiLSTM on MFCCs reports 98.4%);
- loso: `words` leaving one speaker out, for each of the 5 speakers, and the mean
  (target mean >= 95%);
- digits: connected-digit CTC, test on an unseen speaker; target WER <= 5%.

Prints a table and writes benchmarks/results/speech_quality.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/fsdd/recordings")
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")
RESULTS = ROOT / "benchmarks" / "results"


def cli(*args: str) -> dict:
    """Run `python -m apps.speech ARGS`; the JSON of its last stdout line (or {})."""
    command = [sys.executable, "-m", "apps.speech", *args]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return json.loads(last) if last.startswith("{") else {}


def words(run_dir: Path, args, extra: list[str]) -> dict:
    started = time.time()
    cli("words", "train", "--data", str(args.data), "--run-dir", str(run_dir),
        "--epochs", str(args.epochs), "--max-minutes", str(args.max_minutes),
        "--cache-dir", str(args.cache_dir), *extra, *args.extra)
    metrics = cli("words", "evaluate", "--run-dir", str(run_dir), "--cache-dir",
                  str(args.cache_dir), "--json")
    trained = json.loads((run_dir / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "test_examples": metrics["examples"],
            "epochs": trained["epochs_completed"], "stopped": trained["stopped"],
            "minutes": round((time.time() - started) / 60, 1),
            "augmentation": augmentation(run_dir), "train_flags": [*extra, *args.extra]}


def augmentation(run_dir: Path) -> dict:
    """The augmentation settings the run used (the CLI defaults unless told)."""
    config = json.loads((run_dir / "config.json").read_text())
    return config["app_settings"].get("augmentation", {})


def render(report: dict) -> str:
    """The Markdown table of a report; a "before" column when the report keeps one."""
    before = report.get("before", {})

    def old(*keys: str) -> str:
        value = before
        for key in keys:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return f"{value:.4f}" if isinstance(value, float) else ""

    lines = ["| run | metric | target | before | after | epochs | stopped |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    if "official" in report:
        r = report["official"]
        lines.append(f"| official split | accuracy | >= 0.99 | {old('official', 'accuracy')} | "
                     f"{r['accuracy']:.4f} | {r['epochs']} | {r['stopped']} |")
    if "loso" in report:
        for s, r in report["loso"]["per_speaker"].items():
            lines.append(f"| leave out {s} | accuracy | | "
                         f"{old('loso', 'per_speaker', s, 'accuracy')} | {r['accuracy']:.4f} | "
                         f"{r['epochs']} | {r['stopped']} |")
        lines.append(f"| leave-one-out mean | accuracy | >= 0.95 | {old('loso', 'mean')} | "
                     f"{report['loso']['mean']:.4f} | | |")
    if "digits" in report:
        r = report["digits"]
        lines.append(f"| digits ({', '.join(r['test_speakers'])}) | WER | <= 0.05 | "
                     f"{old('digits', 'wer')} | {r['wer']:.4f} | {r['epochs']} | "
                     f"{r['stopped']} |")
        lines.append(f"| digits | sequence accuracy | | {old('digits', 'sequence_accuracy')} | "
                     f"{r['sequence_accuracy']:.4f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("/tmp/speech_quality"),
                        help="parent of the run directories (must not hold them yet)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/speech_quality_cache"))
    parser.add_argument("--only", choices=("official", "loso", "digits"), action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--speakers", default=",".join(SPEAKERS),
                        help="speakers to leave out in the loso part")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-minutes", type=float, default=15.0, help="budget per run")
    parser.add_argument("--utterances", type=int, default=3000,
                        help="connected-digit training utterances")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite the .txt table from the .json")
    # Any other flag goes to every train command, e.g. --units 128.
    args, args.extra = parser.parse_known_args()
    parts = args.only or ["official", "loso", "digits"]
    if args.table_only:
        parts = []
    out = RESULTS / "speech_quality.json"
    report: dict = {}  # this run's parts; merged into the file's latest content below
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if "official" in parts:
        report["official"] = words(args.out / f"official-{stamp}", args, [])
        report["official"]["target"] = ">= 0.99"
    if "loso" in parts:
        loso = {s: words(args.out / f"loso-{s}-{stamp}", args, ["--test-speakers", s])
                for s in args.speakers.split(",")}
        report["loso"] = {"per_speaker": loso, "target_mean": ">= 0.95",
                          "mean": sum(r["accuracy"] for r in loso.values()) / len(loso)}
    if "digits" in parts:
        run_dir = args.out / f"digits-{stamp}"
        started = time.time()
        cli("digits", "train", "--data", str(args.data), "--run-dir", str(run_dir),
            "--epochs", str(args.epochs), "--max-minutes", str(args.max_minutes),
            "--utterances", str(args.utterances), "--cache-dir", str(args.cache_dir),
            *args.extra)
        metrics = cli("digits", "evaluate", "--run-dir", str(run_dir), "--cache-dir",
                      str(args.cache_dir), "--json")
        trained = json.loads((run_dir / "metrics.json").read_text())
        report["digits"] = {**metrics, "epochs": trained["epochs_completed"],
                            "stopped": trained["stopped"], "target": "wer <= 0.05",
                            "training_utterances": args.utterances,
                            "minutes": round((time.time() - started) / 60, 1),
                            "augmentation": augmentation(run_dir),
                            "train_flags": list(args.extra)}

    # Re-read before writing: another invocation (say --only digits) may have
    # finished in the meantime; only this run's parts are replaced.
    latest = json.loads(out.read_text()) if out.exists() else {}
    report = {**latest, **{k: report[k] for k in parts}}
    table = render(report)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (RESULTS / "speech_quality.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
