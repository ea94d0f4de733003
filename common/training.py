"""Train a Keras model into a run directory: the one `train` every app calls.

    with open_run(args.run_dir, app="finance", task="forecast", resume=args.resume) as run:
        result = train(run, TrainConfig.from_args(args), build_model,
                       (x_train, y_train), (x_val, y_val), (x_test, y_test),
                       loss="mse", metrics=["mae"], data_source=args.data)

`train` seeds everything, applies the precision policy and the distribution
strategy, builds and compiles the model (Adam, global-norm gradient clipping,
optional cosine schedule), fits it with the callbacks of
`common.callbacks.make_callbacks`, keeps the best epoch's weights, evaluates
on every split, and writes config.json, metrics.json, model.keras and
saved_model/ (see `common.runs` for the layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from common.callbacks import (
    CosineToTimeBudget,
    RunCheckpoint,
    StopOnNaN,
    TimeBudget,
    make_callbacks,
)
from common.errors import TrainingDiverged, UserError
from common.runs import (
    RunDir,
    atomic_save_model,
    jsonable,
    load_keras,
    read_json,
    versions,
    write_json,
)


@dataclass(frozen=True)
class TrainConfig:
    """The shared training settings (the flags of `common.cli.add_train_flags`)."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine"
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    patience: int = 0  # early stopping; 0 disables
    max_minutes: float | None = None
    seed: int = 0
    strategy: str = "default"  # "mirrored", "multiworker"
    mixed_precision: str = "off"  # "mixed_float16", "mixed_bfloat16"
    deterministic: bool = False  # TensorFlow's op determinism (set by the CLI for the command)

    @property
    def cosine_over_time_budget(self) -> bool:
        """Cosine decay that must also end with the time budget (a callback, not a schedule)."""
        return self.lr_schedule == "cosine" and self.max_minutes is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The fields of `args` named like ours (other flags are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


@dataclass
class TrainResult:
    model: keras.Model
    metrics: dict[str, Any]  # what RUN/metrics.json holds
    history: dict[str, list[float]]  # this process's epochs only (a resume starts late)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (weights, shuffling, dropout)."""
    keras.utils.set_random_seed(seed)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with the configured learning rate, schedule and gradient clipping.

    Clipping is by global norm (all gradients scaled together), as for recurrent
    nets in PyTorch's `clip_grad_norm_`: it bounds the step size while keeping
    its direction. The cosine schedule decays to 0 over `config.epochs` epochs,
    or, with a time budget, by whichever ends first (see `CosineToTimeBudget`).
    """
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
    learning_rate = config.learning_rate
    if config.cosine_over_time_budget:
        pass  # a constant the `CosineToTimeBudget` callback sets before every batch
    elif config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch))
    elif config.lr_schedule != "constant":
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")
    clipping = {"global_clipnorm": config.clip_norm} if config.clip_norm > 0 else {}
    return keras.optimizers.Adam(learning_rate=learning_rate, **clipping)


def as_dataset(data: Any, batch_size: int, *, shuffle: bool = False,
               seed: int = 0) -> tf.data.Dataset | None:
    """A batched `tf.data.Dataset` from arrays or a dataset.

    Args:
        data: None, a `tf.data.Dataset` that is already batched (returned as
            is), or an ``(x, y)`` / ``(x, y, sample_weight)`` tuple of arrays
            (or dicts of arrays) with examples along the first axis.
        batch_size: examples per batch, for arrays.
        shuffle: reshuffle array examples every epoch (training data).
        seed: the shuffling seed.
    """
    if data is None or isinstance(data, tf.data.Dataset):
        return data
    if not isinstance(data, tuple):
        raise TypeError("data must be a tf.data.Dataset or an (x, y) tuple of arrays")
    dataset = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        count = len(tf.nest.flatten(data)[0])
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def count_steps(dataset: tf.data.Dataset) -> int:
    """Batches per epoch (iterates once if the dataset does not know)."""
    steps = int(dataset.cardinality())
    if steps == tf.data.INFINITE_CARDINALITY:
        raise ValueError("the training dataset is infinite; give one epoch's worth of data")
    if steps == tf.data.UNKNOWN_CARDINALITY:
        steps = int(dataset.reduce(0, lambda n, _: n + 1))
    if steps == 0:
        raise UserError("the training data is empty")
    return steps


def evaluate(model: keras.Model, data: Any, batch_size: int = 32) -> dict[str, float]:
    """The compiled loss and metrics of `model` on `data` (see `as_dataset`)."""
    dataset = as_dataset(data, batch_size)
    results = model.evaluate(dataset, verbose=0, return_dict=True)
    return {name: float(value) for name, value in results.items()}


def build_and_compile(config: TrainConfig, build_model: Callable[[], keras.Model], loss: Any,
                      metrics: Any, steps_per_epoch: int,
                      strategy: tf.distribute.Strategy | None = None) -> keras.Model:
    """`build_model()` under `config`'s precision policy and strategy, compiled with
    `make_optimizer`: what `train` does before fitting, for loops of their own
    (sentiment's --cv). `strategy` defaults to `make_strategy(config.strategy)`."""
    from common.distribute import configure_mixed_precision, make_strategy  # imported lazily

    if strategy is None:
        strategy = make_strategy(config.strategy)

    # Always set: "off" puts back float32 if an earlier run in this process
    # changed Keras's global policy.
    configure_mixed_precision(config.mixed_precision)
    # Variables (model and optimizer) must be created under the strategy.
    with strategy.scope():
        model = build_model()
        # A mapping holds per-output metrics of a multi-output model.
        model.compile(optimizer=make_optimizer(config, steps_per_epoch), loss=loss,
                      metrics=dict(metrics) if isinstance(metrics, Mapping) else list(metrics))
    return model


def train(
    run: RunDir,
    config: TrainConfig,
    build_model: Callable[[], keras.Model],
    train_data: Any,
    validation_data: Any = None,
    test_data: Any = None,
    *,
    loss: Any,
    metrics: Sequence[Any] | Mapping[str, Any] = (),
    monitor: str = "val_loss",
    mode: str = "min",
    data_source: str | None = None,
    settings: Mapping[str, Any] | None = None,
    serving: Callable[[keras.Model], tf.Module] | None = None,
    serving_sample: Any = None,
    probe_inputs: Any = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Train, evaluate, save and export one run (see the module docstring).

    Args:
        run: from `common.runs.open_run` (which holds the lock).
        config: the shared settings, usually `TrainConfig.from_args(args)`.
        build_model: returns a new, built, uncompiled model; called under the
            distribution strategy.
        train_data, validation_data, test_data: see `as_dataset`; validation
            and test are optional.
        loss, metrics: passed to `model.compile`.
        monitor, mode: which logged metric picks the best epoch ("val_loss"
            falls back to "loss" without validation data).
        data_source: where the data came from (recorded in config.json).
        settings: the app's own resolved settings (vocabulary size, window...).
        serving: builds the export module from the trained model (see
            `common.export`); default: `ModelServing` (the model's own inputs).
        serving_sample: raw input for the export self-check; default: the
            first batch of inputs of the test/validation/training data.
        probe_inputs: a batch of inputs for the LSTM gate inspection logs.
        extra_callbacks: the app's own callbacks, run after ours.

    Raises:
        TrainingDiverged: the loss or the weights became NaN/inf; the
            checkpoints hold the last good epoch.
    """
    from common.distribute import make_strategy  # imported lazily

    resuming = run.last_checkpoint.exists()
    if resuming:
        _check_resume_training(run, config)
    # First: a multi-worker strategy must exist before any other TensorFlow op.
    strategy = make_strategy(config.strategy)
    set_seed(config.seed)
    train_ds = as_dataset(train_data, config.batch_size, shuffle=True, seed=config.seed)
    val_ds = as_dataset(validation_data, config.batch_size)
    test_ds = as_dataset(test_data, config.batch_size)
    steps_per_epoch = count_steps(train_ds)
    if val_ds is None and monitor.startswith("val_"):
        monitor = monitor[len("val_"):]

    model = build_and_compile(config, build_model, loss, metrics, steps_per_epoch, strategy)
    if resuming:  # checked before config.json is rewritten
        _check_resume_model(run, model, settings)
    _write_config(run, config, model, data_source, settings, monitor, steps_per_epoch)

    callbacks = make_callbacks(run, monitor=monitor, mode=mode, patience=config.patience,
                               max_minutes=config.max_minutes, probe_inputs=probe_inputs)
    if config.cosine_over_time_budget:
        callbacks.append(CosineToTimeBudget(config.learning_rate,
                                            config.epochs * steps_per_epoch, config.max_minutes))
    callbacks += list(extra_callbacks)
    started = time.monotonic()
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                        callbacks=callbacks, shuffle=False,  # as_dataset shuffles
                        verbose=1 if sys.stdout.isatty() else 2)
    nan_guard = _find(callbacks, StopOnNaN)
    checkpoint = _find(callbacks, RunCheckpoint)
    if nan_guard.diverged:
        raise TrainingDiverged(_divergence_message(run, nan_guard, checkpoint))

    if run.best_checkpoint.exists():
        # The model we keep is the best epoch's, not the last one's.
        best = load_keras(run.best_checkpoint, compile=False)
        model.set_weights(best.get_weights())

    metrics_out: dict[str, Any] = {
        "train": evaluate(model, train_ds),
        "validation": evaluate(model, val_ds) if val_ds is not None else None,
        "test": evaluate(model, test_ds) if test_ds is not None else None,
        "epochs_completed": 0 if checkpoint.last_epoch is None else checkpoint.last_epoch + 1,
        "best_epoch": None if checkpoint.best_epoch is None else checkpoint.best_epoch + 1,
        "monitor": monitor,
        "best": checkpoint.best,
        "stopped": _stop_reason(callbacks, model),
        "train_seconds_this_process": round(time.monotonic() - started, 1),
    }
    write_json(run.metrics, metrics_out)
    atomic_save_model(model, run.model)

    from common.export import ModelServing, export_saved_model

    module = serving(model) if serving is not None else ModelServing(model)
    if serving_sample is None:
        serving_sample = _first_inputs(test_ds or val_ds or train_ds)
    export_saved_model(module, run.saved_model, serving_sample)
    return TrainResult(model=model, metrics=metrics_out, history=dict(history.history))


def _find(callbacks, kind):
    return next(c for c in callbacks if isinstance(c, kind))


def _stop_reason(callbacks, model) -> str:
    for c in callbacks:
        if isinstance(c, TimeBudget) and c.stopped_epoch is not None:
            return "time_budget"
        if isinstance(c, keras.callbacks.EarlyStopping) and c.stopped_epoch > 0:
            return "early_stopping"
    return "completed"


def _first_inputs(dataset: tf.data.Dataset):
    batch = next(iter(dataset))
    return batch[0] if isinstance(batch, tuple) else batch


def _divergence_message(run: RunDir, guard: StopOnNaN, checkpoint: RunCheckpoint) -> str:
    where = f"epoch {guard.epoch + 1}" + (f", batch {guard.batch + 1}" if guard.batch is not None
                                          else "")
    if checkpoint.last_epoch is not None:
        kept = (f"the last good checkpoint is {run.last_checkpoint} "
                f"(epoch {checkpoint.last_epoch + 1})")
    else:
        kept = "no epoch finished cleanly, so there is no checkpoint"
    return (f"training diverged: {guard.what} at {where}; {kept}. Try a lower --learning-rate, "
            "a smaller --clip-norm, or look for NaN/inf in the data")


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _settings_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for each (nested) app setting of `new` that `old` differs in."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in new
                for change in _settings_changes(old.get(key, _ABSENT), new.get(key, _ABSENT),
                                                f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


# Changing these between a run and its --resume would drop the optimizer's state
# (Adam's moments, the step count that drives the schedule) with only a warning.
RESUME_FIXED_TRAINING = ("mixed_precision", "lr_schedule")


def _check_resume_training(run: RunDir, config: TrainConfig) -> None:
    """Refuse a --resume that changes a `RESUME_FIXED_TRAINING` flag, before anything is built."""
    trained = (read_json(run.config).get("training") or {}) if run.config.exists() else {}
    for name in RESUME_FIXED_TRAINING:
        if name in trained and trained[name] != getattr(config, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--resume: {run.root} was trained with {flag} {trained[name]}, "
                            f"this command gives {getattr(config, name)} (the optimizer's "
                            f"state would not carry over); repeat {flag} {trained[name]} to "
                            "resume it, or choose another --run-dir")


def _check_resume_model(run: RunDir, model: keras.Model, settings) -> None:
    """Refuse a --resume into a model of other weight shapes than the run's last checkpoint.

    Keras would fail deep inside the restore with "objects could not be
    loaded", after config.json had been overwritten; this names the app
    settings that changed instead, before anything is written.
    """
    try:
        saved = load_keras(run.last_checkpoint, compile=False)
    except UserError:
        return  # the restore reads the backup's weights, not this file: let it try
    if [tuple(w.shape) for w in saved.weights] == [tuple(w.shape) for w in model.weights]:
        return
    recorded = (read_json(run.config).get("app_settings") if run.config.exists() else None)
    why = "."
    if isinstance(recorded, dict):
        # JSON round trip: tuples become lists, as in the stored config.
        new = json.loads(json.dumps(dict(settings or {}), default=jsonable))
        changes = _settings_changes(recorded, new)
        why = (f"; changed: {'; '.join(changes)}." if changes else ".") + (
            f" The run's settings are in {run.config}.")
    raise UserError(f"--resume: {run.root} holds a model with other weight shapes than this "
                    f"command builds{why} Repeat the run's flags to resume it, or choose "
                    "another --run-dir")


def _write_config(run, config, model, data_source, settings, monitor, steps_per_epoch) -> None:
    previous = read_json(run.config) if run.config.exists() else {}
    resumed = run.backup.exists()
    write_json(run.config, {
        **previous,
        "versions": versions(),
        "data": data_source,
        "training": dataclasses.asdict(config),
        "app_settings": dict(settings or {}),
        "monitor": monitor,
        "steps_per_epoch": steps_per_epoch,
        "model": {"name": model.name, "parameters": model.count_params(),
                  "dtype_policy": keras.config.dtype_policy().name},
        "resumed": previous.get("resumed", 0) + int(resumed),
    })
