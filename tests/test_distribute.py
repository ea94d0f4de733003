"""Strategies and mixed precision by name; training common.lstm.LSTM under them.

The mirrored and multi-worker tests train in subprocesses (tests/multiworker_task.py):
logical devices and TF_CONFIG must be in place before TensorFlow initialises.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import free_ports

from common.distribute import (
    STRATEGIES,
    configure_mixed_precision,
    is_chief,
    make_strategy,
)
from common.errors import UserError
from common.lstm import LSTM

TASK = Path(__file__).with_name("multiworker_task.py")
TIMEOUT = 180  # seconds; a hung collective fails the test instead of blocking CI


def child_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)  # only the multi-worker test's own cluster
    env.update(extra)
    return env


def result_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# -- by name ------------------------------------------------------------------


def test_default_strategy():
    strategy = make_strategy("default")
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert is_chief(strategy)


def test_unknown_strategy_lists_choices():
    with pytest.raises(ValueError, match="default, mirrored, multiworker"):
        make_strategy("horovod")
    assert STRATEGIES == ("default", "mirrored", "multiworker")


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG environment variable"),
    ("{not json", "must be JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "'cluster'"),
    ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}',
     "list of 'host:port'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     "'task'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "'task'"),
])
def test_multiworker_rejects_missing_or_invalid_tf_config(monkeypatch, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message) as error:
        make_strategy("multiworker")
    assert isinstance(error.value, UserError) and error.value.exit_code == 2  # no traceback


@pytest.mark.parametrize("cluster, task, chief", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
])
def test_is_chief(cluster, task, chief):
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task[0], task_id=task[1])
    assert is_chief(types.SimpleNamespace(cluster_resolver=resolver)) is chief


def test_mixed_precision_set_and_reset():
    try:
        configure_mixed_precision("mixed_bfloat16")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        layer = LSTM(3)
        outputs = layer(np.random.rand(2, 4, 5).astype("float32"))
        assert outputs.dtype == tf.bfloat16
        assert layer.cell.kernel.dtype == "float32"
        configure_mixed_precision("mixed_float16")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        configure_mixed_precision("off")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_op_determinism_is_set_for_the_block_and_restored():
    from tensorflow.python.framework import config as tf_config

    from common.distribute import op_determinism

    assert not tf_config.is_op_determinism_enabled()
    with op_determinism():
        assert tf_config.is_op_determinism_enabled()
        with op_determinism():  # nested: the outer block keeps it
            pass
        assert tf_config.is_op_determinism_enabled()
    assert not tf_config.is_op_determinism_enabled()


def test_unknown_mixed_precision_policy():
    with pytest.raises(ValueError, match="off, mixed_float16, mixed_bfloat16"):
        configure_mixed_precision("float16")
    assert keras.mixed_precision.global_policy().name == "float32"


# -- training under a strategy --------------------------------------------------


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus(tmp_path):
    """LSTM (fused XLA loop + custom gradient) trains identically when mirrored."""
    completed = subprocess.run(
        [sys.executable, str(TASK), "--strategy", "mirrored", "--logical-cpus", "2",
         "--reference", "--inspect-dir", str(tmp_path)],
        env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = result_of(completed.stdout)
    assert result["replicas"] == 2
    assert result["execution_path"] == "fused"
    assert result["loss"][-1] < result["loss"][0]
    # The same global batches on one device: the gradients summed over the
    # two replicas equal the single-device ones.
    assert result["max_weight_diff_vs_default"] < 1e-5
    assert list((tmp_path / "inspection").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_multiworker_two_local_workers(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        # Worker 0 also trains the model on its own, to compare.
        reference = ["--reference"] if index == 0 else []
        workers.append(subprocess.Popen(
            [sys.executable, str(TASK), "--strategy", "multiworker",
             "--inspect-dir", str(tmp_path / f"worker{index}"), *reference],
            env=child_env(TF_CONFIG=json.dumps(config)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=TIMEOUT)
            assert worker.returncode == 0, stderr[-3000:]
            outputs.append(result_of(stdout))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    first, second = outputs
    assert first["replicas"] == second["replicas"] == 2
    assert first["loss"][-1] < first["loss"][0]
    assert first["loss"] == second["loss"]
    for a, b in zip(first["weights"], second["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    # Each global batch is split between the workers; together they take the
    # same steps as one process would.
    assert first["max_weight_diff_vs_default"] < 1e-5
    # Only the chief (worker 0) writes shared outputs such as the inspection.
    assert (first["chief"], second["chief"]) == (True, False)
    assert (tmp_path / "worker0" / "inspection").is_dir()
    assert not (tmp_path / "worker1").exists()


@pytest.mark.slow
def test_an_app_trains_with_two_local_workers(tmp_path):
    # The apps run TensorFlow ops while reading their data, before training
    # starts; the command line must create the strategy before those.
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "apps.finance", "forecast", "train", "--run-dir",
         str(tmp_path / f"run{index}"), "--epochs", "1", "--units", "4",
         "--strategy", "multiworker"],
        env=child_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                            "task": {"type": "worker", "index": index}})),
        cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for index in range(2)]
    try:
        for worker in workers:
            _, stderr = worker.communicate(timeout=TIMEOUT)
            assert worker.returncode == 0, stderr[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for index in range(2):
        metrics = json.loads((tmp_path / f"run{index}" / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 1
    assert (tmp_path / "run0" / "saved_model" / "saved_model.pb").is_file()
