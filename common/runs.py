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
old file or the new one, never half of one. Names that come from data or
config files go through `safe_child`, so they cannot point outside their folder.
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
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import RunDirBusy, UserError

# Temporary names carry one of these markers (and our PID); a run that opens
# the directory under its lock removes whatever a killed process left behind.
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory.

    ``flag`` is the command-line flag that named it, for error messages
    (``--run-dir``, or e.g. ``--init-from`` for a run read as a starting point).
    """

    root: Path
    flag: str = field(default="--run-dir", compare=False)

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

    def app_settings(self, *required: str) -> dict[str, Any]:
        """The app's settings a training wrote to config.json (``app_settings``).

        A run whose training never got that far (killed during its set-up) has
        none, or lacks one of the `required` keys: refused with a `UserError`
        naming config.json.
        """
        settings = self.read_config().get("app_settings")
        if not isinstance(settings, dict):
            settings = {}
        missing = [key for key in required if key not in settings]
        if not settings or missing:
            what = f"app_settings.{missing[0]}" if settings else "app_settings"
            raise UserError(f"{self.flag} {self.root}: the run never finished its set-up "
                            f"({self.config} has no {what}); train it again")
        return settings

    def load_model(self, *, compile: bool = True):
        """`RUN/model.keras`, loaded with safe_mode=True."""
        if not self.model.exists():
            raise UserError(f"{self.flag} {self.root}: no model.keras; train it first")
        return load_keras(self.model, compile=compile)


def load_keras(path: str | os.PathLike, *, compile: bool = True):
    """A .keras file loaded with safe_mode=True (our LSTM and ensemble layers registered).

    safe_mode makes Keras refuse what could run code while loading: a `Lambda`
    layer (its Python bytecode is stored in the file) and any class that is not
    a Keras built-in or registered with `keras.saving.register_keras_serializable`
    (e.g. a config naming ``os.system``). Those, and files that are not
    .keras models at all, raise `UserError` naming the file.
    """
    import keras

    import common.ensemble  # noqa: F401  (registers the ensembles' StackMembers)
    import common.lstm  # noqa: F401  (registers lstm_suite>LSTM for deserialization)

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not _is_whole_zip(path):  # else Keras says "File not found" for a cut-short file
        raise UserError(f"{path}: not a loadable .keras model (damaged: cut short or not a "
                        ".keras zip archive)")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: {_why_not_loaded(exc)}") from exc


def _why_not_loaded(exc: Exception) -> str:
    text = str(exc)
    if "Lambda" in text or "arbitrary code execution" in text:
        return ("contains a Lambda layer (Python code stored in the file); it will not be "
                "loaded, since loading it could run that code")
    if "Could not locate" in text or "could not be deserialized" in text:
        return ("names a class or function that is neither a Keras built-in nor one of "
                "ours; it will not be loaded (safe_mode)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"not a loadable .keras model ({first[:200]})"


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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def jsonable(value: Any) -> Any:
    """`json.dumps`'s default: numpy scalars and arrays as lists, paths as strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def safe_child(root: str | os.PathLike, name: str, *, source: str) -> Path:
    """`root / name`, refusing a `name` that could reach outside `root`.

    For names that come from data or config files (labels, list entries, file
    names) and become paths we read or write: absolute paths, ``..``
    components, NUL bytes and symbolic links leading out of `root` are refused
    with a `UserError` naming `source` (where the name came from), e.g.
    ``"--data d/validation_list.txt line 3"``. `name` may have several
    ``/``-separated components.
    """
    root = Path(root)
    if not name or "\0" in name or "\\" in name:
        raise UserError(f"{source}: {name!r} is not a valid relative path")
    parts = Path(name).parts
    if Path(name).is_absolute() or any(part in ("..", ".") for part in parts):
        raise UserError(f"{source}: {name!r} points outside {root}; only paths inside it "
                        "are allowed")
    child = root / name
    resolved_root = root.resolve()
    if not child.resolve().is_relative_to(resolved_root):
        raise UserError(f"{source}: {name!r} leads outside {root} (through a symbolic link)")
    return child


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
    directory at `path.tmp-PID` and the old at `path.old-PID`, never a
    half-written `path`; the next `open_run` (or `lock_for_writing`) puts the
    old one back and deletes the new one.
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


def _remove_leftovers(folder: Path, name: str = "") -> None:
    """Clean up after writers killed in `folder` (only those of `name`, if given).

    Call it only while holding the run's lock: nobody else is writing then. A
    folder killed between the two renames of `atomic_directory` is missing and
    its previous version sits at ``NAME.old-PID``: that one is put back (the
    old complete version wins); every other temporary is deleted.
    """
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if name and not entry.name.startswith((name + _TMP_MARK, name + _OLD_MARK)):
            continue
        if _TMP_MARK in entry.name or _OLD_MARK in entry.name:
            _clean_up(entry)


def _clean_up(entry: Path) -> None:
    """Put back an ``.old-`` whose original is missing; delete any other leftover."""
    if _OLD_MARK in entry.name:
        # The last mark is ours: NAME itself may contain ".old-".
        original = entry.with_name(entry.name.rsplit(_OLD_MARK, 1)[0])
        if not original.exists() and not original.is_symlink():
            os.replace(entry, original)
            return
    if entry.is_dir() and not entry.is_symlink():
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

    @staticmethod
    def me() -> str:
        """How the lock file names this process."""
        return f"pid {os.getpid()} on {socket.gethostname()}"

    def acquire(self) -> None:
        """Take the lock, or raise `RunDirBusy` naming the holder."""
        if not self.try_acquire():
            raise RunDirBusy(
                f"--run-dir {self.path.parent} is in use by {self.holder() or 'another process'}; "
                "wait for it to finish or choose another --run-dir")

    def holder(self) -> str:
        """Who holds (or last held) the lock, e.g. "pid 123 on host"."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another holder has it."""
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(self.me() + "\n")
        f.flush()
        self._file = f
        return True

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


def _check_owner(root: Path, app: str, task: str,
                 flag: str = "--run-dir") -> dict[str, Any] | None:
    """The existing run's config, or None for a new run; refuse foreign folders."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise UserError(f"{flag} {root}: exists and is not a directory")
    config_path = RunDir(root).config
    if (root / "saved_model.pb").is_file():
        raise UserError(f"{flag} {root}: is a SavedModel, not a run directory; pass the "
                        "run directory it was exported from (the folder holding config.json)")
    if not config_path.exists():
        # A folder with only our lock (a run killed before it wrote anything)
        # is as good as empty; anything else is someone's data.
        others = [p.name for p in root.iterdir()
                  if p.name != ".lock" and _TMP_MARK not in p.name]
        if others:
            advice = "choose a new folder" if flag == "--run-dir" else "pass a run directory"
            raise UserError(
                f"{flag} {root}: not empty and not a run directory "
                f"(contains {', '.join(sorted(others)[:3])}); {advice}"
            )
        return None
    config = read_json(config_path)
    owner = (config.get("app"), config.get("task"))
    if owner != (app, task):
        raise UserError(
            f"{flag} {root}: belongs to app '{owner[0]}' task '{owner[1]}', not "
            f"'{app}' task '{task}'; choose another {flag}"
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
        for folder in (run.root, run.checkpoints, run.backup, run.logs):
            _remove_leftovers(folder)
        if existing is not None:
            check_resumable(run)
        run.logs.mkdir(exist_ok=True)
        run.checkpoints.mkdir(exist_ok=True)
        if existing is None:
            write_json(run.config, {"app": app, "task": task, "created": _now(),
                                    "versions": versions()})
        try:
            yield run
        except BaseException:
            if existing is None:
                _discard_unstarted(run)
            raise
    finally:
        lock.release()


def _discard_unstarted(run: RunDir) -> None:
    """Remove what `open_run` made for a NEW run that failed before it had a result.

    Nothing in it can be resumed, and leaving its config.json would make the
    corrected command fail with "already holds a run". Only `open_run`'s own
    config.json, logs/ and checkpoints/ go, and only while no result exists
    (no checkpoint, and no metrics.json, model.keras, cv.json or
    cv_progress.json: a cross-validation or ensemble run writes those without
    checkpoints); the
    lock file stays, as `RunLock` requires, and anything else in the folder
    is left alone.
    """
    results = ("metrics.json", "model.keras", "cv.json", "cv_progress.json")
    if any(run.checkpoints.rglob("*")) or any((run.root / n).exists() for n in results):
        return
    shutil.rmtree(run.logs, ignore_errors=True)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    run.config.unlink(missing_ok=True)


def stored_config(run_dir: str | os.PathLike, *, app: str, task: str) -> dict[str, Any] | None:
    """The config.json of `run_dir` if it holds `app`'s `task` run, else None.

    None for a folder with no run yet, and for another app's or task's run
    (which `open_run` refuses with its own message): for the checks a
    `--resume` makes before anything is opened.
    """
    path = RunDir(Path(run_dir).absolute()).config
    if not path.is_file():
        return None
    config = read_json(path)
    return config if (config.get("app"), config.get("task")) == (app, task) else None


_MISSING = object()


def check_resume_settings(run_dir: str | os.PathLike, settings: dict[str, Any], *,
                          app: str, task: str) -> None:
    """Refuse to resume a run with model settings other than those it was trained with.

    `settings` are the resolved values of this command (app_settings keys, or
    dotted paths into them such as ``data.window``); each must equal what the
    run's config.json holds, if it holds the key. Checked before anything is
    written. A run with no config yet, or another app's or task's (which
    `open_run` refuses), passes.
    """
    config = stored_config(run_dir, app=app, task=task)
    if config is None:
        return
    for key, value in settings.items():
        stored: Any = config.get("app_settings") or {}
        for part in key.split("."):
            stored = stored.get(part, _MISSING) if isinstance(stored, dict) else _MISSING
        value = json.loads(json.dumps(value, default=jsonable))  # tuples as stored: lists
        if stored is not _MISSING and stored != value:
            raise UserError(f"--resume: {Path(run_dir).absolute()} was trained with {key} = "
                            f"{stored!r}, this command gives {value!r}; repeat the run's flags "
                            "to resume it, or choose another --run-dir")


def check_resumable(run: RunDir) -> None:
    """Refuse to resume from checkpoint files that cannot be read whole.

    Atomic writes keep our own files whole, but a damaged disk or a copy cut
    short can still truncate them. Checked before anything is written, so a
    refused resume leaves the run as it was.
    """
    checks = [(run.checkpoints / "state.json", _is_json),
              (run.backup / "training_metadata.json", _is_json),
              (run.best_checkpoint, _is_whole_zip), (run.last_checkpoint, _is_whole_zip),
              (run.backup / "latest.weights.h5", _is_whole_hdf5)]
    for path, is_whole in checks:
        if path.exists() and not is_whole(path):
            raise UserError(f"--run-dir {run.root}: cannot resume: {path} is damaged (cut "
                            f"short or not a {path.suffix} file); remove {run.checkpoints} to "
                            "train this run again from epoch 1, or choose another --run-dir")


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _is_whole_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None  # reads every member, checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _is_whole_hdf5(path: Path) -> bool:
    import h5py

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]  # reads every byte: a truncated file fails here

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except (OSError, KeyError, ValueError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def lock_for_writing(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the run directory that contains `path` while writing it.

    For commands that write into an existing run without `open_run` (``export``
    rewrites RUN/saved_model): a run a live process is training is refused
    with `RunDirBusy`, since its own export would race ours. Leftovers of a
    killed writer of `path` are cleaned up first. Inside `open_run` (this
    process already holds the lock), and for a `path` outside any run
    directory, nothing is locked and nothing is cleaned up: there, a name like
    ``NAME.old-123`` may as well be the user's own folder.
    """
    path = Path(path).absolute()
    run = RunDir(path.parent)
    if not run.config.is_file():
        yield
        return
    lock = RunLock(run.lock)
    if not lock.try_acquire():
        if lock.holder() == RunLock.me():  # this very process: open_run around us
            yield
            return
        lock.acquire()  # raises RunDirBusy naming the holder
    try:
        _remove_leftovers(run.root, path.name)
        yield
    finally:
        lock.release()


def export_path(run: RunDir, out: str | os.PathLike | None) -> Path:
    """Where `export` writes: `--out`, or the run's own saved_model/.

    Refuses an `--out` directly inside ANOTHER run directory (its
    saved_model/, say): that run would then serve this one's model under its
    own config. (A folder that is not an export is refused anyway, whatever
    holds it, when the export starts.)
    """
    if out is None:
        return run.saved_model
    path = Path(out).absolute()
    parent = RunDir(path.parent)
    if parent.config.is_file() and path.parent.resolve() != run.root.resolve():
        try:
            owner = read_json(parent.config)
        except (OSError, UserError):
            owner = {}
        if isinstance(owner, dict) and "app" in owner and "task" in owner:
            raise UserError(f"--out {out}: is inside another run directory ({path.parent}, "
                            f"{owner['app']} {owner['task']}); choose a folder outside it, or "
                            "omit --out to update this run's own saved_model/")
    return path


def normalised_path(path: str | os.PathLike) -> Path:
    """`path` made absolute, with "a/../b" as "b", so that paths recorded from it
    (config.json's init_from, --members) compare equal however they were typed."""
    return Path(os.path.normpath(Path(path).absolute()))


def load_run(run_dir: str | os.PathLike, *, app: str, task: str,
             flag: str = "--run-dir") -> RunDir:
    """An existing run of `app`/`task`, for evaluate/predict/export (no lock).

    `flag` names the command-line flag that gave `run_dir` in error messages.
    """
    run = RunDir(normalised_path(run_dir), flag)
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"{flag} {run.root}: is a file, not a run directory")
    if not run.root.is_dir():
        raise UserError(f"{flag} {run.root}: no such run directory")
    if _check_owner(run.root, app, task, flag) is None:
        raise UserError(f"{flag} {run.root}: not a run directory (no config.json)")
    return run


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
