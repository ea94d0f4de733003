"""Trains a tiny `common.lstm.LSTM` model under a named strategy; prints JSON.

Run by tests/test_distribute.py in a subprocess, because the things under test
must be set before TensorFlow initialises: logical CPU devices (``mirrored``)
and the TF_CONFIG cluster (``multiworker``, one process per worker).

    python tests/multiworker_task.py --strategy mirrored --logical-cpus 2
    TF_CONFIG='{...}' python tests/multiworker_task.py --strategy multiworker

The last line of stdout is a JSON object: replicas, per-epoch loss, whether
this process is chief, the final weights, and (with ``--reference``) the
largest weight difference from the same training under the default strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--logical-cpus", type=int, default=0,
                        help="split the CPU into this many logical devices")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--inspect-dir", help="also run LSTMInspection, logging here")
    parser.add_argument("--reference", action="store_true",
                        help="also train under the default strategy and compare weights")
    return parser.parse_args(argv)


def dataset():
    # Same data on every worker; under MultiWorkerMirroredStrategy Keras
    # shards it so each worker takes its part of every global batch.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6, 3)).astype("float32")
    y = x[:, :, 0].cumsum(axis=1)[:, -1:].astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options), x


def train(strategy, epochs, callbacks=()):
    import keras

    from common.lstm import LSTM

    keras.utils.set_random_seed(0)
    data, x = dataset()
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((6, 3)),
            LSTM(8, return_sequences=True),
            keras.layers.Bidirectional(LSTM(4)),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(data, epochs=epochs, verbose=0, shuffle=False, validation_data=data,
                        callbacks=list(callbacks))
    return model, history.history["loss"], x


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)

    from common.distribute import is_chief, make_strategy

    # Before any other TensorFlow work: MultiWorkerMirroredStrategy insists.
    strategy = make_strategy(args.strategy)
    callbacks = []
    if args.inspect_dir:
        from common.inspection import LSTMInspection

        _, x = dataset()
        callbacks.append(LSTMInspection(x[:8], args.inspect_dir))
    model, losses, _ = train(strategy, args.epochs, callbacks)
    weights = model.get_weights()
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "loss": [float(v) for v in losses],
        "chief": is_chief(strategy),
        "execution_path": model.layers[0].execution_path,
        "weights": [w.ravel().tolist() for w in weights],
    }
    if args.reference:
        reference, _, _ = train(tf.distribute.get_strategy(), args.epochs)
        result["max_weight_diff_vs_default"] = max(
            float(np.abs(a - b).max()) for a, b in zip(weights, reference.get_weights(), strict=True))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
