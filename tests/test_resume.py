"""A run killed with SIGKILL mid-epoch resumes from its last completed epoch.

The same test checks that a second run on a folder in use is refused (it
starts while the first one trains, which saves a TensorFlow start-up).
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.runs import load_keras, read_json

TINY = Path(__file__).with_name("tiny_task.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
EPOCHS = 12


def tiny_train(run_dir, *extra):
    return [sys.executable, str(TINY), "tiny", "train", "--run-dir", str(run_dir),
            "--epochs", str(EPOCHS), *extra]


def csv_epochs(run_dir):
    with open(run_dir / "logs" / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_run_resumes_from_its_last_completed_epoch(tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "first.err", "w") as err:
        # 6 batches of 0.3 s: an epoch lasts about 2 s, long enough to kill inside one.
        first = subprocess.Popen(tiny_train(run_dir, "--sleep-per-batch", "0.3"),
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        try:
            for line in first.stdout:
                if line.strip() == "EPOCH_DONE 1":  # two epochs are complete
                    break
            else:
                pytest.fail("training ended early: " + (tmp_path / "first.err").read_text())
            # While it trains, a second run on the same folder is refused.
            second = subprocess.run(tiny_train(run_dir, "--resume"), capture_output=True,
                                    text=True, env=ENV, timeout=120)
            time.sleep(0.6)  # into the next epoch (an epoch starts after each marker)
            assert first.poll() is None, "the first run finished before it could be killed"
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 3
    lines = [s for s in second.stderr.splitlines() if s.startswith("tiny_task")]
    assert lines == [f"tiny_task: error: --run-dir {run_dir} is in use by pid {first.pid} on "
                     f"{os.uname().nodename}; wait for it to finish or choose another --run-dir"]

    done = csv_epochs(run_dir)
    backup = read_json(run_dir / "checkpoints" / "backup" / "training_metadata.json")
    assert 2 <= len(done) < EPOCHS and done == list(range(len(done)))
    assert backup["epoch"] == len(done)  # the backup holds every logged epoch
    assert not (run_dir / "model.keras").exists()

    third = subprocess.run(tiny_train(run_dir, "--resume"), capture_output=True, text=True,
                           env=ENV, timeout=240)
    assert third.returncode == 0, third.stderr[-3000:]
    ran = [int(n) for n in re.findall(r"^EPOCH_DONE (\d+)$", third.stdout, re.M)]
    assert ran == list(range(len(done), EPOCHS))  # continued, not from scratch
    assert f"Epoch {len(done) + 1}/{EPOCHS}" in third.stdout
    assert csv_epochs(run_dir) == list(range(EPOCHS))

    # Nothing was lost: every checkpoint is there, loads, and the last is the final epoch.
    state = read_json(run_dir / "checkpoints" / "state.json")
    assert state["last_epoch"] == EPOCHS - 1 and state["best_epoch"] is not None
    for name in ("best.keras", "last.keras"):
        load_keras(run_dir / "checkpoints" / name)
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == EPOCHS
    assert read_json(run_dir / "config.json")["resumed"] == 1
    assert (run_dir / "model.keras").exists() and (run_dir / "saved_model").is_dir()
    leftovers = [p for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
