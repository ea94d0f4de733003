"""Training through the shared utilities: run-dir layout, logs, NaN, time budget."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tiny_task
from tensorboard.backend.event_processing import event_accumulator

from common.callbacks import (
    Backup,
    CosineToTimeBudget,
    HistoryCSV,
    RunCheckpoint,
    StopOnNaN,
    TimeBudget,
    make_callbacks,
)
from common.errors import TrainingDiverged
from common.runs import open_run, read_json
from common.training import TrainConfig, make_optimizer, train

CONFIG = TrainConfig(epochs=2, batch_size=8, seed=3)


def run_tiny(root, config=CONFIG, *, resume=False, **kwargs):
    train_data, val_data, test_data = tiny_task.make_data()
    with open_run(root, app=tiny_task.APP, task=tiny_task.TASK, resume=resume) as run:
        result = train(run, config, tiny_task.build_model, train_data, val_data, test_data,
                       loss="mse", metrics=["mae"], data_source="synthetic", **kwargs)
    return run, result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("trained") / "run")


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, name), root)
                  for d, dirs, files in os.walk(root) for name in dirs + files)


def test_run_dir_has_exactly_the_documented_layout(trained):
    run, _ = trained
    top = sorted(os.listdir(run.root))
    assert top == [".lock", "checkpoints", "config.json", "logs", "metrics.json",
                   "model.keras", "saved_model"]
    assert sorted(os.listdir(run.checkpoints)) == ["backup", "best.keras", "last.keras",
                                                    "state.json"]
    assert sorted(os.listdir(run.backup)) == ["latest.weights.h5", "training_metadata.json"]
    assert sorted(os.listdir(run.logs)) == ["history.csv", "train", "validation"]
    assert {"saved_model.pb", "variables"} <= set(os.listdir(run.saved_model))
    assert not [p for p in tree(run.root) if ".tmp-" in p or ".old-" in p]


def test_config_and_metrics_record_the_run(trained):
    run, result = trained
    config = read_json(run.config)
    assert (config["app"], config["task"], config["data"]) == ("tests", "tiny", "synthetic")
    assert config["training"] == {**CONFIG.__dict__}
    assert set(config["versions"]) >= {"python", "tensorflow", "keras"}
    assert config["steps_per_epoch"] == 6 and config["monitor"] == "val_loss"
    metrics = read_json(run.metrics)
    assert metrics == json.loads(json.dumps(result.metrics))
    assert set(metrics["train"]) == set(metrics["validation"]) == set(metrics["test"]) == {
        "loss", "mae"}
    assert metrics["epochs_completed"] == 2 and metrics["stopped"] == "completed"
    with open(run.history_csv) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]


def test_model_is_the_best_epoch_and_loads_safely(trained):
    run, result = trained
    model = keras.saving.load_model(run.model, safe_mode=True)
    best = keras.saving.load_model(run.best_checkpoint, safe_mode=True)
    x = tiny_task.make_data()[2][0]
    np.testing.assert_allclose(model.predict(x, verbose=0), best.predict(x, verbose=0))
    np.testing.assert_allclose(model.predict(x, verbose=0), result.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert model.get_layer("lstm").__class__.__module__ == "common.lstm"


def test_tensorboard_logs_scalars_and_histograms(trained):
    run, _ = trained
    tags = {}
    for split in ("train", "validation"):
        acc = event_accumulator.EventAccumulator(
            str(run.logs / split), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        tags[split] = set(acc.Tags()["tensors"])
        assert [e.step for e in acc.Tensors("epoch_loss")] == [0, 1]
    assert {"epoch_loss", "epoch_mae", "epoch_learning_rate",
            "lstm/lstm_cell/kernel/histogram", "lstm/lstm_cell/recurrent_kernel/histogram",
            "lstm/lstm_cell/bias/histogram", "mean/kernel/histogram"} <= tags["train"]
    assert {"epoch_loss", "epoch_mae"} <= tags["validation"]


def test_resume_continues_and_extends_a_finished_run(tmp_path):
    run, _ = run_tiny(tmp_path / "run")
    _, result = run_tiny(tmp_path / "run", TrainConfig(epochs=3, batch_size=8, seed=3),
                         resume=True)
    assert len(result.history["loss"]) == 1  # only epoch 3 ran
    with open(run.history_csv) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    assert read_json(run.metrics)["epochs_completed"] == 3
    assert read_json(run.config)["resumed"] == 1


def test_resume_into_another_model_shape_is_refused_and_changes_nothing(tmp_path):
    import keras

    from common.errors import UserError
    from common.lstm import LSTM

    run, _ = run_tiny(tmp_path / "run", settings={"model": {"units": 8}, "noise": 0.1})
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}

    def wider():
        inputs = keras.Input((tiny_task.STEPS, tiny_task.FEATURES), name="sequence")
        outputs = keras.layers.Dense(1, name="mean")(LSTM(16, name="lstm")(inputs))
        return keras.Model(inputs, outputs, name="tiny")

    train_data, val_data, _ = tiny_task.make_data()
    with pytest.raises(UserError, match=r"other weight shapes .*changed: model\.units: 8 -> 16"):
        with open_run(run.root, app=tiny_task.APP, task=tiny_task.TASK, resume=True) as again:
            train(again, TrainConfig(epochs=3, batch_size=8, seed=3), wider, train_data,
                  val_data, loss="mse", settings={"model": {"units": 16}, "noise": 0.1})
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    # Another precision or schedule would drop the optimizer's state: refused too.
    for changed in ({"mixed_precision": "mixed_bfloat16"}, {"lr_schedule": "cosine"}):
        flag = "--" + next(iter(changed)).replace("_", "-")
        with pytest.raises(UserError, match=f"trained with {flag} .*state would not carry"):
            run_tiny(run.root, TrainConfig(epochs=3, batch_size=8, seed=3, **changed),
                     resume=True, settings={"model": {"units": 8}, "noise": 0.1})
        assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    # The same shapes with another setting: the run goes on and records it.
    _, result = run_tiny(run.root, TrainConfig(epochs=3, batch_size=8, seed=3), resume=True,
                         settings={"model": {"units": 8}, "noise": 0.2})
    assert len(result.history["loss"]) == 1
    assert read_json(run.config)["app_settings"]["noise"] == 0.2


def test_probe_inputs_add_lstm_inspection_logs(tmp_path):
    train_data, val_data, _ = tiny_task.make_data()
    run, _ = run_tiny(tmp_path / "run", TrainConfig(epochs=1, batch_size=16),
                      probe_inputs=val_data[0][:4])
    assert sorted(os.listdir(run.logs)) == ["history.csv", "inspection", "train", "validation"]
    assert any(name.startswith("events.out") for name in os.listdir(run.logs / "inspection"))


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                kernel = self.model.get_layer("lstm").cell.kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    root = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as error:
        run_tiny(root, TrainConfig(epochs=5, batch_size=8), extra_callbacks=[Poison()])
    message = str(error.value)
    assert "training diverged: loss became nan at epoch 3, batch 1" in message
    assert f"last good checkpoint is {root / 'checkpoints' / 'last.keras'} (epoch 2)" in message
    assert "\n" not in message
    last = keras.saving.load_model(root / "checkpoints" / "last.keras", safe_mode=True)
    assert all(np.isfinite(w).all() for w in last.get_weights())
    assert read_json(root / "checkpoints" / "state.json")["last_epoch"] == 1
    assert read_json(root / "checkpoints" / "backup" / "training_metadata.json")["epoch"] == 2
    assert not (root / "model.keras").exists() and not (root / "saved_model").exists()


def test_nan_data_on_the_first_batch_is_reported(tmp_path):
    (x, y), val, test = tiny_task.make_data()
    x = x.copy()
    x[:] = np.nan
    with open_run(tmp_path / "run", app="tests", task="tiny") as run:
        with pytest.raises(TrainingDiverged, match="at epoch 1, batch 1; no epoch finished"):
            train(run, CONFIG, tiny_task.build_model, (x, y), val, loss="mse")


def test_time_budget_stops_after_an_epoch_and_still_saves(tmp_path):
    run, result = run_tiny(tmp_path / "run", TrainConfig(epochs=50, batch_size=8,
                                                         max_minutes=1e-4))
    assert len(result.history["loss"]) == 1
    assert result.metrics["stopped"] == "time_budget"
    assert run.model.exists() and (run.saved_model / "saved_model.pb").exists()


def test_without_validation_data_the_training_loss_picks_the_best(tmp_path):
    train_data, _, _ = tiny_task.make_data()
    with open_run(tmp_path / "run", app="tests", task="tiny") as run:
        result = train(run, TrainConfig(epochs=1, batch_size=16), tiny_task.build_model,
                       train_data, loss="mse")
    assert result.metrics["monitor"] == "loss" and result.metrics["validation"] is None
    assert run.best_checkpoint.exists()


def test_callbacks_come_in_a_safe_order(tmp_path):
    with open_run(tmp_path / "run", app="a", task="b") as run:
        callbacks = make_callbacks(run, patience=3, max_minutes=5)
    kinds = [type(c) for c in callbacks]
    assert kinds[:5] == [StopOnNaN, RunCheckpoint, Backup, HistoryCSV,
                         keras.callbacks.TensorBoard]
    assert kinds[5:] == [keras.callbacks.EarlyStopping, TimeBudget]
    assert callbacks[2].backup_dir == str(run.backup) and not callbacks[2].delete_checkpoint


def test_optimizer_clips_by_default_and_schedules(tmp_path):
    optimizer = make_optimizer(TrainConfig(), steps_per_epoch=10)
    assert optimizer.global_clipnorm == 1.0
    assert math.isclose(float(optimizer.learning_rate), 1e-3, rel_tol=1e-6)
    assert make_optimizer(TrainConfig(clip_norm=0), 10).global_clipnorm is None
    cosine = make_optimizer(TrainConfig(lr_schedule="cosine", epochs=2, learning_rate=0.1), 5)
    schedule = cosine._learning_rate
    assert math.isclose(float(schedule(0)), 0.1, rel_tol=1e-6) and float(schedule(10)) < 1e-6


def test_config_from_args_ignores_app_flags():
    import argparse

    args = argparse.Namespace(epochs=4, batch_size=2, vocab=100, run_dir="r", resume=False)
    assert TrainConfig.from_args(args) == TrainConfig(epochs=4, batch_size=2)


def test_multi_output_model_with_per_output_metrics(tmp_path):
    def build():
        x = keras.Input((4,), name="x")
        return keras.Model(x, {"a": keras.layers.Dense(1, name="a")(x),
                               "b": keras.layers.Dense(1, name="b")(x)})

    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = {"a": x[:, :1], "b": x[:, 1:2]}
    with open_run(tmp_path / "run", app="t", task="t") as run:
        result = train(run, TrainConfig(epochs=1, batch_size=8), build, (x, y),
                       loss={"a": "mse", "b": "mse"}, metrics={"a": ["mae"]})
    assert "a_mae" in result.history
    assert "b_mae" not in result.history
    # The default serving module passes a dict of outputs through.
    served = tf.saved_model.load(str(run.saved_model)).signatures["serving_default"](
        x=tf.constant(x[:2]))
    assert set(served) == {"a", "b"}


def test_cosine_decays_by_time_when_the_budget_ends_first():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    now = [0.0]
    schedule = CosineToTimeBudget(0.1, total_steps=1000, max_minutes=1, clock=lambda: now[0])
    schedule.set_model(model)
    schedule.on_train_begin()
    rates = []
    for seconds in (0.0, 30.0, 60.0, 90.0):
        now[0] = seconds
        schedule.on_train_batch_begin(0)
        rates.append(float(model.optimizer.learning_rate))
    # Half the budget used: half the peak; all of it (or more): 0.
    assert rates[0] == pytest.approx(0.1) and rates[1] == pytest.approx(0.05)
    assert rates[2] == pytest.approx(0.0, abs=1e-9) and rates[3] == pytest.approx(0.0, abs=1e-9)
    # The steps count too: 3/4 of them done at time 0 (a resumed run) is progress 3/4.
    model.optimizer.iterations.assign(750)
    now[0] = 0.0
    schedule.on_train_begin()
    schedule.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05 * (1 - math.sqrt(0.5)))


def test_cosine_with_a_time_budget_lowers_the_rate_during_training(tmp_path):
    train_data, val_data, _ = tiny_task.make_data()
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=0.01, lr_schedule="cosine",
                         max_minutes=30)
    with open_run(tmp_path / "run", app="tests", task="tiny") as run:
        result = train(run, config, tiny_task.build_model, train_data, val_data, loss="mse")
    # 3 epochs of a 30-minute budget: the steps finish first, so the rate ends near 0.
    assert float(result.model.optimizer.learning_rate) < 0.01 * 0.05
