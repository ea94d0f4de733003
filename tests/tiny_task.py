"""A tiny app built on the shared utilities, for the tests (and as an example).

    python tests/tiny_task.py tiny train --run-dir /tmp/r --epochs 3
    python tests/tiny_task.py tiny evaluate --run-dir /tmp/r --json

The task: predict the mean of a short random sequence with Input -> LSTM(8) ->
Dense(1). Test-only flags slow the epochs down, poison the weights at a given
epoch (for the NaN test), and stop the process in the middle of a write
(``--pause-at``, for the crash tests: they SIGKILL it there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.cli import build_parser, non_negative_float, print_json, run_main
from common.errors import UserError

APP = "tests"
TASK = "tiny"
STEPS, FEATURES = 6, 3


def make_data(seed: int = 0, n_train: int = 48, n_val: int = 16, n_test: int = 16):
    """(x, y) tuples of train/validation/test; y = mean of x over time and features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_val + n_test, STEPS, FEATURES)).astype("float32")
    y = x.mean(axis=(1, 2))[:, None].astype("float32")
    a, b = n_train, n_train + n_val
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def build_model():
    import keras

    from common.lstm import LSTM

    inputs = keras.Input((STEPS, FEATURES), name="sequence")
    hidden = LSTM(8, name="lstm")(inputs)
    outputs = keras.layers.Dense(1, name="mean", dtype="float32")(hidden)
    return keras.Model(inputs, outputs, name="tiny")


# -- fault injection for the crash tests (test-only: nothing like it in common/) --

PAUSE_HELP = """stop for good at a kill point, printing "PAUSED <point>" first: 'epoch@N' is
after batch 3 of epoch N (0-based); 'NAME@N' is in the middle of writing NAME (a file
or folder of the run dir: last.keras, history.csv, backup, saved_model, ...) the first
time it is written at epoch N or later: its temporary copy is truncated to half, as a
writer killed mid-write leaves it, and not renamed yet; 'NAME-swap@N', for a folder,
is between the two renames that swap the new folder in"""


def parse_pause(text: str) -> tuple[str, int]:
    name, _, epoch = text.partition("@")
    if not name or (epoch and not epoch.isdigit()):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME@EPOCH, got {text}")
    return name, int(epoch or 0)


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    time.sleep(3600)  # until the test kills us


def truncate_to_half(path: Path) -> None:
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        os.truncate(f, f.stat().st_size // 2)


def install_write_pause(point: tuple[str, int], epoch_now) -> None:
    """Wraps `os.replace`, which ends every atomic write of `common.runs`.

    `epoch_now()` is the epoch being trained (a callback keeps it up to date).
    """
    name, epoch = point
    swap = name.endswith("-swap")
    target = name.removesuffix("-swap")
    replace = os.replace

    def paused_replace(src, dst, *a, **kw):
        src, dst = Path(src), Path(dst)
        first_rename = (
            (dst.name == target and ".tmp-" in src.name)  # a file, or a new folder
            or (src.name == target and ".old-" in dst.name))  # the old folder goes aside
        if first_rename and epoch_now() >= epoch:
            if swap and ".old-" in dst.name:
                replace(src, dst, *a, **kw)
                pause(name)
            elif not swap:
                for tmp in sorted(dst.parent.glob(f"{target}.tmp-*")):
                    truncate_to_half(tmp)
                pause(name)
        return replace(src, dst, *a, **kw)

    os.replace = paused_replace


def debug_callbacks(args: argparse.Namespace) -> list:
    import keras
    import numpy as np

    pause_at = args.pause_at or ("", 0)
    now = {"epoch": 0}  # the epoch being trained, for install_write_pause
    if pause_at[0] not in ("", "epoch"):
        install_write_pause(pause_at, lambda: now["epoch"])

    class Slow(keras.callbacks.Callback):
        """Sleeps after every batch, pauses at 'epoch@N', and marks finished epochs."""

        def on_epoch_begin(self, epoch, logs=None):
            now["epoch"] = epoch

        def on_train_batch_end(self, batch, logs=None):
            time.sleep(args.sleep_per_batch)
            if pause_at == ("epoch", now["epoch"]) and batch == 2:
                pause("epoch")

        def on_epoch_end(self, epoch, logs=None):
            print(f"EPOCH_DONE {epoch}", flush=True)

    class Poison(keras.callbacks.Callback):
        """Turns the weights NaN when epoch `poison_epoch` (0-based) begins."""

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == args.poison_epoch:
                kernel = self.model.get_layer("mean").kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    return [Slow(), Poison()]


def make_parser():
    parser, commands = build_parser("tiny_task", "A tiny LSTM regression for the tests.",
                                    {TASK: "predict the mean of a random sequence"},
                                    train_defaults={TASK: {"epochs": 3, "batch_size": 8}})
    train = commands[TASK, "train"]
    train.add_argument("--sleep-per-batch", type=non_negative_float, default=0.0,
                       help="seconds to sleep after each batch (slows epochs for tests)")
    train.add_argument("--poison-epoch", type=int, default=-1,
                       help="make the weights NaN when this 0-based epoch begins")
    for command in ("train", "export"):
        commands[TASK, command].add_argument("--pause-at", type=parse_pause,
                                             metavar="POINT", help=PAUSE_HELP)
    return parser


def handle(args: argparse.Namespace) -> int:
    from common import runs

    if args.command == "train":
        return train(args)
    # Checked before TensorFlow is imported: a wrong --run-dir fails instantly.
    run = runs.load_run(args.run_dir, app=APP, task=TASK)
    if args.command == "evaluate" and args.data is not None:
        raise UserError(f"--data {args.data}: the tiny task only has its synthetic data")
    from common import training

    model = run.load_model()
    test_x, test_y = make_data()[2]
    if args.command == "evaluate":
        metrics = training.evaluate(model, (test_x, test_y), args.batch_size)
        if args.json:
            print_json(metrics)
        else:
            print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    elif args.command == "predict":
        for value in model.predict(test_x[:4], verbose=0)[:, 0]:
            print(f"{value:.4f}")
    elif args.command == "export":
        from common.export import ModelServing, export_saved_model

        if args.pause_at:
            install_write_pause(args.pause_at, lambda: 0)

        out = export_saved_model(ModelServing(model), args.out or run.saved_model, test_x[:4])
        print(f"exported {out}")
    return 0


def train(args: argparse.Namespace) -> int:
    from common import runs, training

    train_data, val_data, test_data = make_data()
    config = training.TrainConfig.from_args(args)
    with runs.open_run(args.run_dir, app=APP, task=TASK, resume=args.resume) as run:
        result = training.train(
            run, config, build_model, train_data, val_data, test_data,
            loss="mse", metrics=["mae"], data_source=args.data or "synthetic",
            settings={"steps": STEPS, "features": FEATURES},
            extra_callbacks=debug_callbacks(args))
    print(f"trained: test mae {result.metrics['test']['mae']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(make_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
