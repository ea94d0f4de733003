"""SIGKILL in the middle of every kind of write, then ``--resume``: nothing is lost.

`tiny_task.py --pause-at POINT` stops the process at a kill point (in the
middle of an epoch, or in the middle of writing a file or folder of the run:
its temporary copy half written and not yet renamed) and prints ``PAUSED``;
the test then SIGKILLs it and checks that

- every file of the run dir is whole: JSON parses, .keras loads, the .h5 backup
  reads, history.csv has whole rows, saved_model/ loads and serves (or is the
  old version, or absent before its first export);
- the next process continues from the last completed epoch (not from scratch),
  history.csv epochs run 0, 1, 2, ... without a gap or a duplicate, and the
  leftovers of the killed writer are gone.

One run is killed over and over, each resume being the victim of the next kill
point (a kill and its recovery cost one TensorFlow start-up, not two). While a
process is paused holding the run's lock, the test also checks what other
commands do with the busy run: a second train and an export are refused in one
line, evaluate reads the (atomically written) model.
"""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_task

from common.runs import load_keras, read_json

TINY = Path(__file__).with_name("tiny_task.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
EPOCHS = 8

# (kill point, epochs in the backup after the kill, rows in history.csv after it).
# A write point NAME@N pauses while epoch N (0-based) is being saved; the
# callbacks save last/best.keras and state.json, then the backup, then the
# history row, so a kill before the backup's swap redoes epoch N.
TRAIN_KILLS = [
    ("epoch@1", 1, 1),  # mid-epoch
    ("last.keras@2", 2, 2),
    ("best.keras@3", 3, 3),
    ("backup@4", 4, 4),  # BackupAndRestore state, half written
    ("backup-swap@5", 5, 5),  # between the renames: backup/ is missing, its old copy aside
    ("history.csv@6", 7, 6),  # the backup holds epoch 6, its row is not written yet
    ("metrics.json", 8, 8),  # after training (epoch 6's row was restored, 7 trained)
    ("model.keras", 8, 8),  # after training and metrics, before the export
    ("saved_model", 8, 8),  # inside the export's temporary folder
]
EXPORT_KILLS = ["saved_model", "saved_model-swap"]  # the export command of a finished run


def tiny(command, run_dir, *extra):
    argv = ["tiny", command, "--run-dir", str(run_dir), *extra]
    return argv + (["--epochs", str(EPOCHS)] if command == "train" else [])


@pytest.fixture
def started():
    """The processes a test starts; any still alive at the end (a failed test) are killed."""
    processes = []
    yield processes
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_until_paused(started, argv, point, err_path):
    """Start tiny_task with --pause-at `point`; return (process, stdout lines) once paused."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(TINY), *argv, "--pause-at", point],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    started.append(proc)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("PAUSED"):
            assert line.split()[1] == point.split("@")[0]
            return proc, lines
    proc.wait()
    pytest.fail(f"{point}: exited with {proc.returncode} before its kill point:\n"
                + "\n".join(lines[-10:]) + "\n" + Path(err_path).read_text()[-2000:])


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def epochs_done(lines):
    return [int(m) for m in re.findall(r"^EPOCH_DONE (\d+)$", "\n".join(lines), re.M)]


def leftovers(run_dir, pid=None):
    mark = re.compile(r"\.(tmp|old)-" + (str(pid) if pid else r"\d+"))
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if mark.search(p.name))


def tree_hash(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def history_epochs(run_dir):
    path = run_dir / "logs" / "history.csv"
    if not path.exists():
        return []
    text = path.read_text()
    assert text.endswith("\n"), "history.csv ends in the middle of a row"
    rows = list(csv.reader(text.splitlines()))
    assert all(len(row) == len(rows[0]) and all(row) for row in rows), text
    return [int(row[0]) for row in rows[1:]]


def backup_epochs(run_dir):
    """Epochs in the backup the next run restores (the old copy after a kill mid-swap)."""
    checkpoints = run_dir / "checkpoints"
    found = [checkpoints / "backup"] if (checkpoints / "backup").is_dir() else \
        sorted(checkpoints.glob("backup.old-*"))
    return read_json(found[0] / "training_metadata.json")["epoch"] if found else 0


def read_dataset(_, item):
    import h5py

    if isinstance(item, h5py.Dataset):
        item[()]  # reads every byte: a truncated file fails here


def check_whole(run_dir):
    """Every file at its final name is complete; only temporaries may be partial."""
    import h5py
    import tensorflow as tf

    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_dir() or path.name == ".lock" or \
                any(".tmp-" in part or ".old-" in part for part in rel.parts):
            continue
        if rel.parts[0] == "saved_model":
            continue  # loaded as a whole below
        if rel.parts[:2] in (("logs", "train"), ("logs", "validation")):
            continue  # TensorBoard event files: append-only records, readers skip a torn last one
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".keras":
            load_keras(path)
        elif path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                f.visititems(read_dataset)
        elif path.name == "history.csv":
            epochs = history_epochs(run_dir)
            assert epochs == list(range(len(epochs)))
        else:
            pytest.fail(f"unexpected file {rel}")
    if (run_dir / "saved_model").exists():
        serve = tf.saved_model.load(str(run_dir / "saved_model")).signatures["serving_default"]
        x = tiny_task.make_data()[2][0][:3]
        assert serve(sequence=tf.constant(x))["output"].shape == (3, 1)


def snapshot(run_dir):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run_dir.rglob("*") if p.is_file()}


def check_busy_run(run_dir, holder, capfd):
    """What other commands do while `holder` trains in `run_dir`."""
    capfd.readouterr()
    before = snapshot(run_dir)
    message = (f"tiny_task: error: --run-dir {run_dir} is in use by pid {holder.pid} on "
               f"{os.uname().nodename}; wait for it to finish or choose another --run-dir")
    assert tiny_task.main(tiny("train", run_dir, "--resume")) == 3
    assert capfd.readouterr().err.splitlines() == [message]
    if (run_dir / "model.keras").exists():
        # Reading is fine: model.keras is only ever replaced whole.
        assert tiny_task.main(tiny("evaluate", run_dir, "--json")) == 0
        assert set(json.loads(capfd.readouterr().out.splitlines()[-1])) == {"loss", "mae"}
        # Writing is not: our export would race the one the training run is doing.
        assert tiny_task.main(tiny("export", run_dir)) == 3
        assert capfd.readouterr().err.splitlines() == [message]
    assert snapshot(run_dir) == before  # the refused commands touched nothing


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_anywhere_the_run_resumes_with_whole_files(tmp_path, capfd, started):
    run_dir = tmp_path / "run"
    completed, previous_pid = 0, None
    for i, (point, backup_after, rows_after) in enumerate(TRAIN_KILLS):
        argv = tiny("train", run_dir, *(["--resume"] if i else []))
        proc, lines = run_until_paused(started, argv, point, tmp_path / f"{i}.err")
        name = point.split("@")[0]
        # Paused where we meant: in the middle of the write, or between the renames.
        if name.endswith("-swap"):
            assert leftovers(run_dir, proc.pid) and not list(run_dir.rglob(name[:-5]))
        elif name != "epoch":
            assert [p for p in leftovers(run_dir, proc.pid) if p.split("/")[-1].startswith(name)]
        # The killed writer before this one was cleaned up, and this one continued it.
        assert previous_pid is None or leftovers(run_dir, previous_pid) == []
        done = epochs_done(lines)
        assert done == list(range(completed, completed + len(done))), (point, done)
        if point == "epoch@1" or name == "saved_model":
            check_busy_run(run_dir, proc, capfd)
        kill(proc)

        check_whole(run_dir)
        completed = backup_epochs(run_dir)
        assert (completed, history_epochs(run_dir)) == (backup_after, list(range(rows_after))), \
            point
        previous_pid = proc.pid
    assert not (run_dir / "saved_model").exists()  # its first export was killed

    # The last resume finishes (in-process: saves a TensorFlow start-up).
    capfd.readouterr()
    assert tiny_task.main(tiny("train", run_dir, "--resume")) == 0
    assert epochs_done(capfd.readouterr().out.splitlines()) == []  # all 8 were done
    check_whole(run_dir)
    assert history_epochs(run_dir) == list(range(EPOCHS))
    assert read_json(run_dir / "metrics.json")["epochs_completed"] == EPOCHS
    assert read_json(run_dir / "checkpoints" / "state.json")["last_epoch"] == EPOCHS - 1
    assert (run_dir / "saved_model" / "saved_model.pb").is_file()
    assert leftovers(run_dir) == []

    # The export command of the finished run, killed while writing and mid-swap.
    exported = tree_hash(run_dir / "saved_model")
    for i, point in enumerate(EXPORT_KILLS):
        proc, _ = run_until_paused(started, tiny("export", run_dir), point, tmp_path / f"e{i}.err")
        kill(proc)
        check_whole(run_dir)
        if point == "saved_model":
            assert tree_hash(run_dir / "saved_model") == exported  # the old one, intact
        else:
            assert not (run_dir / "saved_model").exists()
            old = [p for p in run_dir.glob("saved_model.old-*")]
            assert len(old) == 1 and tree_hash(old[0]) == exported
    assert tiny_task.main(tiny("export", run_dir)) == 0
    assert capfd.readouterr().out.strip() == f"exported {run_dir / 'saved_model'}"
    check_whole(run_dir)
    assert leftovers(run_dir) == []
