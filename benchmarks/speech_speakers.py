"""Is the unseen-speaker gap about speakers or about data? (a benchmark, not a test)

    .venv/bin/python benchmarks/speech_speakers.py --seeds 1,2 --jobs 2   # nicolas unseen
    .venv/bin/python benchmarks/speech_speakers.py --test-speaker jackson

Holds one FSDD speaker out (all 500 of their clips are the test set) and trains
`words` on the SAME number of clips, 50 per digit, drawn equally from k of the
other four speakers, for every subset of them (k = 1..4: 4 + 6 + 4 + 1 runs per
seed). Each speaker gives the lowest FSDD indices of each digit (k = 1: 50,
k = 2: 25, k = 3: 17, k = 4: 13 per speaker and digit, so 500-520 clips). Every
run is `words train --test-speakers SPEAKER --deterministic` with the app's
defaults otherwise, through the real command line, on a folder of links the
script builds; `words evaluate --json` scores it. If accuracy rises with k at
a fixed amount of data, the number of training speakers is what limits it.

Prints a table (every subset, then the mean per k) and writes
benchmarks/results/speech_speakers_SPEAKER.{txt,json}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests)
from speech_ensemble import write  # noqa: E402  (sibling scripts)
from speech_quality import DATA, SPEAKERS, cli  # noqa: E402

CLIPS_PER_DIGIT = 50


def subset_folder(root: Path, data: Path, test_speaker: str, speakers: tuple[str, ...]) -> Path:
    """Links to every clip of the test speaker and CLIPS_PER_DIGIT clips per digit of `speakers`."""
    folder = root / "+".join(speakers)
    folder.mkdir(parents=True)
    per_speaker = -(-CLIPS_PER_DIGIT // len(speakers))
    for clip in data.glob(f"*_{test_speaker}_*.wav"):
        (folder / clip.name).symlink_to(clip.resolve())
    for speaker, digit, index in itertools.product(speakers, range(10), range(per_speaker)):
        clip = data / f"{digit}_{speaker}_{index}.wav"
        if not clip.exists():
            raise SystemExit(f"{clip}: missing (need {per_speaker} clips per digit of {speaker})")
        (folder / clip.name).symlink_to(clip.resolve())
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--test-speaker", default="nicolas", choices=SPEAKERS)
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/speech_speakers"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/speech_quality_cache"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-minutes", type=float, default=12.0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings at a time (2 suits 2 cores: each run is small)")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    others = [s for s in SPEAKERS if s != args.test_speaker]
    subsets = [c for k in range(1, len(others) + 1) for c in itertools.combinations(others, k)]

    def one(speakers: tuple[str, ...], folder: Path, seed: int) -> dict:
        run = args.out / f"{'+'.join(speakers)}-seed{seed}-{stamp}"
        started = time.time()
        cli("words", "train", "--data", str(folder), "--run-dir", str(run),
            "--test-speakers", args.test_speaker, "--seed", str(seed), "--deterministic",
            "--epochs", str(args.epochs), "--max-minutes", str(args.max_minutes),
            "--cache-dir", str(args.cache_dir))
        scored = cli("words", "evaluate", "--run-dir", str(run), "--cache-dir",
                     str(args.cache_dir), "--json")
        row = {"k": len(speakers), "speakers": list(speakers), "seed": seed,
               "accuracy": scored["accuracy"], "test_clips": scored["examples"],
               "minutes": round((time.time() - started) / 60, 1)}
        print(row, flush=True)
        return row

    with tempfile.TemporaryDirectory(prefix="speech_speakers-") as links:
        folders = [subset_folder(Path(links), args.data, args.test_speaker, s) for s in subsets]
        # --deterministic: a run's result does not depend on what runs beside it.
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda job: one(*job),
                                 [(s, f, seed) for s, f in zip(subsets, folders, strict=True)
                                  for seed in seeds]))
    by_k = {k: float(np.mean([r["accuracy"] for r in rows if r["k"] == k]))
            for k in sorted({r["k"] for r in rows})}
    lines = [f"FSDD words, {args.test_speaker} unseen ({rows[0]['test_clips']} test clips); "
             f"training: {CLIPS_PER_DIGIT} clips per digit from k speakers; seeds {args.seeds}",
             f"{'k':>2} {'training speakers':32} {'seed':>4} {'accuracy':>8} {'minutes':>7}"]
    lines += [f"{r['k']:>2} {'+'.join(r['speakers']):32} {r['seed']:>4} {r['accuracy']:8.3f} "
              f"{r['minutes']:7.1f}" for r in rows]
    lines += [f"{k:>2} {'mean of ' + str(sum(r['k'] == k for r in rows)) + ' runs':32} "
              f"{'':>4} {mean:8.3f}" for k, mean in by_k.items()]
    write(f"speech_speakers_{args.test_speaker}", "\n".join(lines),
          {"test_speaker": args.test_speaker, "seeds": seeds,
           "clips_per_digit": CLIPS_PER_DIGIT, "rows": rows,
           "mean_by_k": {str(k): v for k, v in by_k.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
