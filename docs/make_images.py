"""Regenerate the user's guide images in docs/images/ from the apps themselves.

    .venv/bin/python docs/make_images.py                 # ~4-6 minutes on 2 CPU cores
    .venv/bin/python docs/make_images.py --keep /tmp/img-runs   # keep the run dirs

Every image is a file the apps write in normal use; this script only trains
small runs on the bundled samples (in a temporary folder) and copies them:

| image | made by |
| --- | --- |
| `forecast_band.png` | `lstm-finance forecast evaluate`: `RUN/plots/forecast_spy_sample.png` |
| `confusion_matrix.png` | `lstm-speech words evaluate`: `RUN/confusion_matrix.png` |
| `gate_activations.png` | the LSTM inspection callback: the TensorBoard image `lstm_inspection/<layer>/over_time` of the last epoch, read back from `RUN/logs/inspection` |

The adding-problem curves in docs/images (`adding_*.png`) are made by the
experiment itself (see docs/experiments.md), not by this script.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SAMPLE_STEM = "spy_sample"  # the bundled finance sample: plots/forecast_<stem>.png
GATE_LAYER = "forward_lstm_0"  # the first LSTM of the words model (Bidirectional)
MAX_BYTES = 150_000  # the guide's images stay small


def run_app(app: str, *argv: str) -> None:
    """Runs `python -m apps.<app> ARGV` in this process; stops on a non-zero exit."""
    from common.demo import call_app

    print(f"\n$ python -m apps.{app} {' '.join(argv)}", flush=True)
    code, _ = call_app(app, list(argv))  # the app has printed its error line
    if code:
        sys.exit(f"make_images: `python -m apps.{app} {' '.join(argv)}` exited with {code}")


def last_image(event_dir: Path, tag: str) -> bytes:
    """The PNG of the last step of a TensorBoard image summary `tag` in `event_dir`."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    found: tuple[int, bytes] | None = None
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                # A TF2 image summary is a string tensor [width, height, png, ...].
                if value.tag == tag and (found is None or event.step >= found[0]):
                    found = (event.step, value.tensor.string_val[2])
    if found is None:
        sys.exit(f"make_images: no image {tag!r} in {event_dir}")
    return found[1]


def make_images(work: Path, out: Path) -> list[Path]:
    """Trains the runs under `work` and writes the images into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    cache = str(work / "mfcc-cache")  # never touch the user's ~/.cache

    # Finance: the forecast with its calibrated 10-90% band on the test part.
    forecast = work / "forecast"
    run_app("finance", "forecast", "train", "--run-dir", str(forecast),
            "--epochs", "10", "--seed", "1")
    run_app("finance", "forecast", "evaluate", "--run-dir", str(forecast))
    written = [copy(forecast / "plots" / f"forecast_{SAMPLE_STEM}.png", out / "forecast_band.png")]

    # Speech words: the test split's confusion matrix, and the LSTM gates over time.
    words = work / "words"
    run_app("speech", "words", "train", "--run-dir", str(words), "--seed", "1",
            "--cache-dir", cache)
    run_app("speech", "words", "evaluate", "--run-dir", str(words), "--cache-dir", cache)
    written.append(copy(words / "confusion_matrix.png", out / "confusion_matrix.png"))
    png = last_image(words / "logs" / "inspection", f"lstm_inspection/{GATE_LAYER}/over_time")
    gates = out / "gate_activations.png"
    gates.write_bytes(png)
    written.append(gates)
    return written


def copy(source: Path, target: Path) -> Path:
    if not source.is_file():
        sys.exit(f"make_images: {source} was not written")
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DOCS / "images",
                        help="where the images go (default: docs/images)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="train the runs in DIR (must not exist) and keep them; "
                             "default: a temporary folder, deleted afterwards")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        written = make_images(args.keep, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="lstm-suite-images-") as tmp:
            written = make_images(Path(tmp), args.out)
    print()
    for path in written:
        size = path.stat().st_size
        note = "" if size <= MAX_BYTES else f"  (over {MAX_BYTES // 1000} KB)"
        print(f"wrote {path} ({size / 1000:.0f} KB){note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
