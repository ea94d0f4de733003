"""Would an ensemble of seeds reach the FSDD targets? (a benchmark, not a test)

    .venv/bin/python benchmarks/speech_ensemble.py --seeds 1,2,3
    .venv/bin/python benchmarks/speech_ensemble.py digits --seeds 1,2,3
    .venv/bin/python benchmarks/speech_ensemble.py loso --seeds 1,2,3

Trains one `words` model per seed on FSDD's official split (indices 0-4 are the
test clips) through the real command line, with the defaults otherwise. Then it
loads each run's SavedModel with plain TensorFlow (the deployed artifact: raw
waveform in, probabilities out), scores every test clip, and scores the mean of
the members' probabilities. Last, the app's own `words ensemble` combines the
runs and `words evaluate --json` scores that run. Prints a table and writes
benchmarks/results/speech_ensemble.{txt,json}. Target of the official split:
accuracy >= 0.99 (at most 2 of the 250 test clips wrong).

``digits`` does the same for connected digits: one `digits train` per seed with
the app's defaults (test speaker: the last alphabetically, yweweler; the same
generated corpus for every seed), each scored by the app at the end of training,
then `digits ensemble` (the string the members' mean CTC probability prefers)
and `digits evaluate --json`. Writes benchmarks/results/speech_ensemble_digits.{txt,json}. Target:
WER <= 0.05 on the unseen speaker.

``loso`` is leave-one-speaker-out: for every speaker, one `words train
--test-speakers SPEAKER` per seed, then `words ensemble` and `words evaluate
--json`; the table has each speaker's members and ensemble and their means.
Writes benchmarks/results/speech_ensemble_loso.{txt,json}. Target: mean
accuracy >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from speech_quality import DATA, RESULTS, cli  # noqa: E402  (its sibling script)

OFFICIAL_TEST = re.compile(r"^(\d)_([a-z]+)_([0-4])\.wav$")  # FSDD: indices 0-4 are test


def train(run_dir: Path, seed: int, args, task: str = "words", *extra: str) -> float:
    started = time.time()
    cli(task, "train", "--data", str(args.data), "--run-dir", str(run_dir), "--seed",
        str(seed), "--epochs", str(args.epochs), "--max-minutes", str(args.max_minutes),
        "--cache-dir", str(args.cache_dir), *extra)
    return (time.time() - started) / 60


def member_probabilities(saved_model: Path, waves: list[np.ndarray]) -> tuple[np.ndarray, list]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    rows = []
    for wave in waves:  # one clip per call: no padding differences between members
        out = serve(waveform=tf.constant(wave[None], tf.float32))
        rows.append(out["probabilities"].numpy()[0])
    config = json.loads((saved_model.parent / "config.json").read_text())
    labels = config["app_settings"]["labels"]
    return np.stack(rows), labels


def training_columns(row: dict) -> str:
    """A row's epochs and minutes, blank for the ensembles (they are not trained)."""
    return (f"{row['epochs'] if row['epochs'] is not None else '':>6} "
            f"{row['minutes'] if row['minutes'] is not None else '':>7}")


def write(name: str, text: str, report: dict) -> None:
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.txt").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")


def digits(args, seeds: list[int], stamp: str) -> int:
    runs = {seed: args.out / f"digits-seed{seed}-{stamp}" for seed in seeds}
    rows = []
    for seed, run in runs.items():
        minutes = round(train(run, seed, args, "digits"), 1)
        trained = json.loads((run / "metrics.json").read_text())
        scores = trained["test_transcription"]
        rows.append({"member": f"seed {seed}", "wer": scores["wer"],
                     "sequence_accuracy": scores["sequence_accuracy"],
                     "epochs": trained["epochs_completed"], "minutes": minutes})
    ensemble = args.out / f"digits-ensemble-{stamp}"
    cli("digits", "ensemble", "--run-dir", str(ensemble), "--members", *map(str, runs.values()))
    scored = cli("digits", "evaluate", "--run-dir", str(ensemble), "--cache-dir",
                 str(args.cache_dir), "--json")
    rows.append({"member": f"app: digits ensemble of {len(runs)} + evaluate",
                 "wer": scored["wer"], "sequence_accuracy": scored["sequence_accuracy"],
                 "wer_greedy": scored["wer_greedy"], "epochs": None, "minutes": None})
    lines = [f"FSDD connected digits, {scored['utterances']} test utterances of "
             f"{', '.join(scored['test_speakers'])} (unseen); beam search; target WER <= 0.05",
             f"{'member':38} {'WER':>7} {'seq acc':>7} {'epochs':>6} {'minutes':>7}"]
    for r in rows:
        lines.append(f"{r['member']:38} {r['wer']:7.4f} {r['sequence_accuracy']:7.4f} "
                     f"{training_columns(r)}")
    write("speech_ensemble_digits", "\n".join(lines),
          {"seeds": seeds, "test_speakers": scored["test_speakers"],
           "utterances": scored["utterances"], "rows": rows})
    return 0


def loso(args, seeds: list[int], stamp: str) -> int:
    speakers = sorted({p.name.split("_")[1] for p in args.data.glob("*_*_*.wav")})
    rows = []
    for speaker in speakers:
        runs = {seed: args.out / f"loso-{speaker}-seed{seed}-{stamp}" for seed in seeds}
        accuracy = {}
        for seed, run in runs.items():
            train(run, seed, args, "words", "--test-speakers", speaker)
            accuracy[seed] = cli("words", "evaluate", "--run-dir", str(run), "--cache-dir",
                                 str(args.cache_dir), "--json")["accuracy"]
        ensemble = args.out / f"loso-{speaker}-ensemble-{stamp}"
        cli("words", "ensemble", "--run-dir", str(ensemble), "--members",
            *map(str, runs.values()))
        scored = cli("words", "evaluate", "--run-dir", str(ensemble), "--cache-dir",
                     str(args.cache_dir), "--json")
        rows.append({"left_out": speaker, "test_clips": scored["examples"],
                     "members": accuracy, "ensemble": scored["accuracy"]})
        print(rows[-1], flush=True)
    head = f"{'left out':10} " + " ".join(f"{'seed ' + str(s):>7}" for s in seeds)
    clips = "/".join(sorted({str(r["test_clips"]) for r in rows}))
    lines = [f"FSDD leave-one-speaker-out accuracy ({clips} test clips each); "
             "target mean >= 0.95",
             f"{head} {'ensemble':>8}"]
    for r in rows:
        lines.append(f"{r['left_out']:10} " + " ".join(f"{r['members'][s]:7.3f}" for s in seeds)
                     + f" {r['ensemble']:8.3f}")
    means = {s: float(np.mean([r["members"][s] for r in rows])) for s in seeds}
    ensemble_mean = float(np.mean([r["ensemble"] for r in rows]))
    lines.append(f"{'mean':10} " + " ".join(f"{means[s]:7.3f}" for s in seeds)
                 + f" {ensemble_mean:8.3f}")
    write("speech_ensemble_loso", "\n".join(lines),
          {"seeds": seeds, "rows": rows, "member_means": means, "ensemble_mean": ensemble_mean})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", choices=("words", "digits", "loso"),
                        default="words",
                        help="words: the official split (default); digits: connected digits; "
                             "loso: leave one speaker out, each in turn")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/speech_ensemble"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/speech_quality_cache"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    args = parser.parse_args()

    from apps.speech.features import load_audio

    seeds = [int(s) for s in args.seeds.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.task == "digits":
        return digits(args, seeds, stamp)
    if args.task == "loso":
        return loso(args, seeds, stamp)
    runs = {seed: args.out / f"official-seed{seed}-{stamp}" for seed in seeds}
    minutes = {seed: round(train(run, seed, args), 1) for seed, run in runs.items()}

    clips = sorted(p for p in args.data.glob("*.wav") if OFFICIAL_TEST.match(p.name))
    truth = [OFFICIAL_TEST.match(p.name).group(1) for p in clips]
    waves = [load_audio(p, 8000) for p in clips]
    members, rows = [], []
    for seed, run in runs.items():
        probs, labels = member_probabilities(run / "saved_model", waves)
        members.append((probs, labels))
        predicted = [labels[i] for i in probs.argmax(axis=1)]
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
        epochs = json.loads((run / "metrics.json").read_text())["epochs_completed"]
        rows.append({"member": f"seed {seed}", "accuracy": accuracy,
                     "wrong": int(round((1 - accuracy) * len(clips))), "epochs": epochs,
                     "minutes": minutes[seed]})
    labels = members[0][1]
    assert all(m[1] == labels for m in members), "members disagree on the label order"
    mean = np.mean([m[0] for m in members], axis=0)
    best = mean.argmax(axis=1)
    accuracy = float(np.mean([labels[i] == t for i, t in zip(best, truth, strict=True)]))
    rows.append({"member": f"ensemble of {len(members)} (mean probability)",
                 "accuracy": accuracy, "wrong": int(round((1 - accuracy) * len(clips))),
                 "epochs": None, "minutes": None})
    ensemble = args.out / f"official-ensemble-{stamp}"
    cli("words", "ensemble", "--run-dir", str(ensemble), "--members", *map(str, runs.values()))
    scored = cli("words", "evaluate", "--run-dir", str(ensemble), "--cache-dir",
                 str(args.cache_dir), "--json")
    rows.append({"member": "app: words ensemble + evaluate", "accuracy": scored["accuracy"],
                 "wrong": int(round((1 - scored["accuracy"]) * scored["examples"])),
                 "epochs": None, "minutes": None})

    lines = [f"FSDD official split, {len(clips)} test clips; target accuracy >= 0.99",
             f"{'member':34} {'accuracy':>8} {'wrong':>5} {'epochs':>6} {'minutes':>7}"]
    for r in rows:
        lines.append(f"{r['member']:34} {r['accuracy']:8.4f} {r['wrong']:5d} "
                     f"{training_columns(r)}")
    write("speech_ensemble", "\n".join(lines),
          {"seeds": seeds, "test_clips": len(clips), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
