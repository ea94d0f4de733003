"""A tiny app built on the shared utilities, for the tests (and as an example).

    python tests/tiny_task.py tiny train --run-dir /tmp/r --epochs 3
    python tests/tiny_task.py tiny evaluate --run-dir /tmp/r --json

The task: predict the mean of a short random sequence with Input -> LSTM(8) ->
Dense(1). Test-only flags slow the epochs down (for the kill test) and poison
the weights at a given epoch (for the NaN test).
"""

from __future__ import annotations

import argparse
import sys
import time

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


def debug_callbacks(args: argparse.Namespace) -> list:
    import keras
    import numpy as np

    class Slow(keras.callbacks.Callback):
        """Sleeps after every batch and prints a marker when an epoch is done."""

        def on_train_batch_end(self, batch, logs=None):
            time.sleep(args.sleep_per_batch)

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
