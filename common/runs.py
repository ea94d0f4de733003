"""One training run = one directory, written atomically and locked while in use.

Layout (`RunDir` names every path)::

    RUN/config.json        every resolved setting, data source, app/task, versions
    RUN/metrics.json       final train/validation/test metrics
    RUN/logs/              TensorBoard (train/, validation/, inspection/) and history.csv
    RUN/checkpoints/       best.keras, last.keras, backup/ (BackupAndRestore state)
    RUN/model.keras        the trained model (loads with safe_mode=True)
    RUN/saved_model/       SavedModel whose serving_default takes raw input
    RUN/.lock              held (flock) by the process using the run

Everything we write goes to a temporary name in the same folder first and is
then renamed over the target, so a run killed at any moment leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import RunDirBusy, UserError

# Temporary names carry one of these markers (and our PID); a run that opens
# the directory under its lock removes whatever a killed process left behind.
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def history_csv(self) -> Path:
        return self.logs / "history.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.keras"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.keras"

    @property
    def backup(self) -> Path:
        return self.checkpoints / "backup"

    @property
    def model(self) -> Path:
        return self.root / "model.keras"

    @property
    def saved_model(self) -> Path:
        return self.root / "saved_model"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def read_config(self) -> dict[str, Any]:
        return read_json(self.config)

    def load_model(self, *, compile: bool = True):
        """`RUN/model.keras`, loaded with safe_mode=True."""
        if not self.model.exists():
            raise UserError(f"--run-dir {self.root}: no model.keras; train it first")
        return load_keras(self.model, compile=compile)


def load_keras(path: str | os.PathLike, *, compile: bool = True):
    """A .keras file loaded with safe_mode=True (our LSTM layer registered)."""
    import keras

    import common.lstm  # noqa: F401  (registers lstm_suite>LSTM for deserialization)

    return keras.saving.load_model(path, safe_mode=True, compile=compile)


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}{suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file and `os.replace`."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (numpy scalars become numbers)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def _jsonable(value: Any) -> Any:
    # numpy scalars/arrays and paths show up in metrics and configs.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_save_model(model, path: str | os.PathLike) -> None:
    """`model.save(path)` (a .keras file) via a temporary file and `os.replace`."""
    _save_via_temp(model.save, Path(path), ".keras")  # Keras insists on the suffix.


def atomic_save_weights(model, path: str | os.PathLike) -> None:
    """`model.save_weights(path)` (a .weights.h5 file), atomically."""
    _save_via_temp(model.save_weights, Path(path), ".weights.h5")


def _save_via_temp(save, path: Path, suffix: str) -> None:
    tmp = _tmp_name(path, suffix)
    try:
        save(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block succeeds.

    A directory cannot be swapped in one `rename` when the target exists, so
    the old one is first renamed aside: a crash in between leaves the new
    directory at `path.tmp-PID` and the old at `path.old-PID` (both removed
    by the next `open_run`), never a half-written `path`.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{path.name}{_OLD_MARK}{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(folder: Path) -> None:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if _TMP_MARK in entry.name or _OLD_MARK in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------


class RunLock:
    """An exclusive `flock` on RUN/.lock.

    The kernel drops the lock when its process dies, so a lock left by a killed
    run is simply taken over; the file only records who holds it, for the
    message. The file is never deleted: deleting it would let a process that
    opened the old file and one that creates a new one both "hold" the lock.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def acquire(self) -> None:
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirBusy(
                f"--run-dir {self.path.parent} is in use by {holder}; wait for it to "
                "finish or choose another --run-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------
# Opening runs
# ---------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def _check_owner(root: Path, app: str, task: str) -> dict[str, Any] | None:
    """The existing run's config, or None for a new run; refuse foreign folders."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise UserError(f"--run-dir {root}: exists and is not a directory")
    config_path = RunDir(root).config
    if not config_path.exists():
        # A folder with only our lock (a run killed before it wrote anything)
        # is as good as empty; anything else is someone's data.
        others = [p.name for p in root.iterdir()
                  if p.name != ".lock" and _TMP_MARK not in p.name]
        if others:
            raise UserError(
                f"--run-dir {root}: not empty and not a run directory "
                f"(contains {', '.join(sorted(others)[:3])}); choose a new folder"
            )
        return None
    config = read_json(config_path)
    owner = (config.get("app"), config.get("task"))
    if owner != (app, task):
        raise UserError(
            f"--run-dir {root}: belongs to app '{owner[0]}' task '{owner[1]}', not "
            f"'{app}' task '{task}'; choose another --run-dir"
        )
    return config


@contextlib.contextmanager
def open_run(run_dir: str | os.PathLike, *, app: str, task: str,
             resume: bool = False) -> Iterator[RunDir]:
    """Create (or, with `resume`, reopen) a run directory and hold its lock.

    Refuses a folder holding another app's run or non-run files, a folder
    holding a run when `resume` is False, and a folder another live process
    is using. Writes a first `config.json` naming `app` and `task` so the folder
    is claimed from the start.
    """
    run = RunDir(Path(run_dir).absolute())
    _check_owner(run.root, app, task)
    run.root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run.lock)
    lock.acquire()
    try:
        # Checked again under the lock: another process may have claimed the
        # folder between the first check and our lock.
        existing = _check_owner(run.root, app, task)
        if existing is not None and not resume:
            raise UserError(
                f"--run-dir {run.root}: already holds a run; pass --resume to continue it "
                "or choose another --run-dir"
            )
        if existing is None and resume:
            print(f"note: nothing to resume in {run.root}; starting a new run", file=sys.stderr)
        _remove_leftovers(run.root)
        _remove_leftovers(run.checkpoints)
        _remove_leftovers(run.backup)
        run.logs.mkdir(exist_ok=True)
        run.checkpoints.mkdir(exist_ok=True)
        if existing is None:
            write_json(run.config, {"app": app, "task": task, "created": _now(),
                                    "versions": versions()})
        yield run
    finally:
        lock.release()


def load_run(run_dir: str | os.PathLike, *, app: str, task: str) -> RunDir:
    """An existing run of `app`/`task`, for evaluate/predict/export (no lock)."""
    run = RunDir(Path(run_dir).absolute())
    if not run.root.is_dir():
        raise UserError(f"--run-dir {run.root}: no such run directory")
    if _check_owner(run.root, app, task) is None:
        raise UserError(f"--run-dir {run.root}: not a run directory (no config.json)")
    return run


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
