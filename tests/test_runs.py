"""Run directories: atomic writes, ownership checks and the lock (no training)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from common.errors import RunDirBusy, UserError
from common.runs import (
    RunDir,
    atomic_directory,
    atomic_write_text,
    load_run,
    lock_for_writing,
    open_run,
    write_json,
)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    atomic_write_text(target, '{"x": 2}')
    assert json.loads(target.read_text()) == {"x": 2}
    assert os.listdir(tmp_path) == ["a.json"]


def test_write_json_converts_numpy_scalars(tmp_path):
    import numpy as np

    write_json(tmp_path / "m.json", {"loss": np.float32(0.5), "n": np.int64(3)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": 0.5, "n": 3}


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("half-way")
    assert (target / "v").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert os.listdir(tmp_path) == ["export"]


def test_new_run_is_claimed_and_never_overwritten(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="nlp", task="sentiment") as run:
        assert isinstance(run, RunDir)
        config = json.loads(run.config.read_text())
        assert (config["app"], config["task"]) == ("nlp", "sentiment")
        assert run.logs.is_dir() and run.checkpoints.is_dir()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        with open_run(root, app="nlp", task="sentiment"):
            pass
    with open_run(root, app="nlp", task="sentiment", resume=True):
        pass


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing_to_block_a_retry(
        tmp_path):
    root = tmp_path / "run"
    with pytest.raises(ValueError, match="bad flag"):
        with open_run(root, app="a", task="b") as run:
            (run.logs / "train").mkdir()
            raise ValueError("bad flag")
    assert os.listdir(root) == [".lock"]
    with open_run(root, app="a", task="b") as run:  # the corrected command: no --resume
        (run.checkpoints / "epoch-1").write_text("weights")
    # A failing resume keeps the run, checkpoint or not; so does a new run that
    # failed after its first checkpoint.
    with pytest.raises(KeyboardInterrupt):
        with open_run(root, app="a", task="b", resume=True) as run:
            (run.checkpoints / "epoch-1").unlink()
            raise KeyboardInterrupt
    assert run.config.exists() and run.logs.exists()
    with pytest.raises(KeyboardInterrupt):
        with open_run(tmp_path / "new", app="a", task="b") as run:
            (run.checkpoints / "epoch-1").write_text("weights")
            raise KeyboardInterrupt
    assert run.config.exists() and (run.checkpoints / "epoch-1").exists()


def test_run_of_another_app_or_task_is_refused(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="nlp", task="sentiment"):
        pass
    with pytest.raises(UserError, match="belongs to app 'nlp' task 'sentiment', not 'speech'"):
        with open_run(root, app="speech", task="keywords", resume=True):
            pass
    with pytest.raises(UserError, match="not 'nlp' task 'lm'"):
        load_run(root, app="nlp", task="lm")


def test_foreign_folder_and_file_are_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("")
    with pytest.raises(UserError, match="not empty and not a run directory"):
        with open_run(tmp_path / "photos", app="a", task="b"):
            pass
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]  # no lock left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        with open_run(tmp_path / "file", app="a", task="b"):
            pass


def test_resume_of_missing_run_starts_a_new_one(tmp_path, capsys):
    with open_run(tmp_path / "run", app="a", task="b", resume=True) as run:
        assert run.config.exists()
    assert "nothing to resume" in capsys.readouterr().err


def test_lock_refuses_a_second_user_in_the_same_process(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="a", task="b"):
        with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):
            with open_run(root, app="a", task="b", resume=True):
                pass
    with open_run(root, app="a", task="b", resume=True):  # released
        pass


def test_lock_refuses_another_live_process_and_takes_over_a_dead_ones(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="a", task="b"):
        pass
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(root / '.lock')!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0); f.truncate(); f.write(f"pid {{os.getpid()}} on test\\n"); f.flush()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid} on test"):
            with open_run(root, app="a", task="b", resume=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file (naming a dead PID)
    # stays, but the lock itself died with it.
    assert f"pid {holder.pid}" in (root / ".lock").read_text()
    with open_run(root, app="a", task="b", resume=True):
        assert f"pid {os.getpid()}" in (root / ".lock").read_text()


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="a", task="b") as run:
        pass
    (root / "model.keras.tmp-999.keras").write_text("half")
    (run.checkpoints / "last.keras.tmp-999.keras").write_text("half")
    (run.logs / "history.csv.tmp-999").write_text("epoch,lo")
    # Killed between the two renames of atomic_directory: the new folder is
    # complete at .tmp-, the old one aside at .old-, none at the real name.
    (run.checkpoints / "backup.old-999").mkdir()
    (run.checkpoints / "backup.old-999" / "v").write_text("old")
    (run.checkpoints / "backup.tmp-999").mkdir()
    # Killed while deleting the old folder after the swap.
    (root / "saved_model").mkdir()
    (root / "saved_model.old-998").mkdir()
    with open_run(root, app="a", task="b", resume=True):
        assert sorted(os.listdir(root)) == [".lock", "checkpoints", "config.json", "logs",
                                            "saved_model"]
        assert os.listdir(run.checkpoints) == ["backup"]  # the old copy is put back
        assert (run.backup / "v").read_text() == "old"
        assert os.listdir(run.logs) == []


def test_an_export_into_a_run_respects_its_lock(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="a", task="b") as run:
        with lock_for_writing(run.saved_model):  # our own lock: allowed, nothing cleaned
            pass
    (root / "saved_model.tmp-999").mkdir()
    (root / "saved_model.old-999").mkdir()
    (root / "metrics.json.tmp-999").write_text("{")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time
        f = open({str(root / '.lock')!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0); f.truncate(); f.write("pid 4242 on elsewhere\\n"); f.flush()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"--run-dir {root} is in use by pid 4242 on "
                                             "elsewhere"):
            with lock_for_writing(root / "saved_model"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with lock_for_writing(root / "saved_model"):
        # Only the leftovers of what we are about to write are cleaned up.
        assert sorted(os.listdir(root)) == [".lock", "checkpoints", "config.json", "logs",
                                            "metrics.json.tmp-999", "saved_model"]
        assert f"pid {os.getpid()}" in (root / ".lock").read_text()
    with lock_for_writing(tmp_path / "export"):  # not in a run: nothing to lock
        assert not (tmp_path / ".lock").exists()


def test_leftovers_are_matched_by_their_own_name(tmp_path):
    root = tmp_path / "run"
    with open_run(root, app="a", task="b"):
        pass
    # An export named with ".old-" killed between its renames, and a sibling
    # export whose name starts with ours.
    (root / "model.old-v2.old-999").mkdir()
    (root / "model.old-v2.old-999" / "saved_model.pb").write_text("old")
    (root / "model.old-v2x.tmp-999").mkdir()
    with lock_for_writing(root / "model.old-v2"):
        assert (root / "model.old-v2" / "saved_model.pb").read_text() == "old"
        assert (root / "model.old-v2x.tmp-999").is_dir()  # another export's business
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "export.old-20250101").mkdir()  # the user's own backup, say
    with lock_for_writing(outside / "export"):
        assert os.listdir(outside) == ["export.old-20250101"]


def test_load_run_errors_name_the_run_dir(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        load_run(tmp_path / "missing", app="a", task="b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path / "empty", app="a", task="b")
    with open_run(tmp_path / "run", app="a", task="b"):
        pass
    with pytest.raises(UserError, match="no model.keras; train it first"):
        load_run(tmp_path / "run", app="a", task="b").load_model()


def test_app_settings_of_a_run_that_never_finished_its_set_up(tmp_path):
    run = RunDir(tmp_path)
    config = {"app": "a", "task": "b"}
    write_json(run.config, config)
    message = re.escape(f"({run.config} has no app_settings); train it again")
    with pytest.raises(UserError, match=message):
        run.app_settings()
    write_json(run.config, config | {"app_settings": {"data": 1}})
    assert run.app_settings("data") == {"data": 1}
    with pytest.raises(UserError, match=r"has no app_settings\.features\); train it again"):
        run.app_settings("data", "features")


def test_resume_settings_are_checked_against_the_runs_own(tmp_path):
    from common.runs import check_resume_settings, load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"app": "nlp", "task": "sentiment", "app_settings": {"units": 8, "init_from": None}}))
    check_resume_settings(run, {"units": 8, "init_from": None, "layers": 2},
                          app="nlp", task="sentiment")  # layers: not stored, not compared
    with pytest.raises(UserError, match=r"--resume: .* trained with units = 8, this command "
                                        r"gives 16"):
        check_resume_settings(run, {"units": 16}, app="nlp", task="sentiment")
    # Another task's run is left for open_run to refuse with its own message.
    check_resume_settings(run, {"units": 16}, app="nlp", task="textgen")
    check_resume_settings(tmp_path / "new", {"units": 16}, app="nlp", task="sentiment")
    # A path through ".." names the same run as the direct one.
    assert load_run(tmp_path / "x" / ".." / "run", app="nlp", task="sentiment").root == run
