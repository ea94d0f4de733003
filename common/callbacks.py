"""The callbacks of a training run, assembled in one place: `make_callbacks`.

Order matters and is fixed here:

1. `StopOnNaN` first, so a diverged epoch is known before anything is saved;
2. `RunCheckpoint` (best.keras, last.keras) before
3. `Backup` (the BackupAndRestore state), so a run killed between the two
   redoes an epoch instead of losing its checkpoint;
4. `HistoryCSV` after the backup: a line in history.csv means the epoch is safe;
5. TensorBoard, EarlyStopping, `TimeBudget` and the optional LSTM inspection.

Nothing is saved from an epoch whose loss or weights are not finite, so the
checkpoints and the backup always hold the last good state. Every file is
replaced atomically (see `common.runs`), so a run killed at any point, even
in the middle of a write, resumes from the backup with whole files.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from common.runs import (
    RunDir,
    atomic_directory,
    atomic_save_model,
    atomic_write_text,
    read_json,
    write_json,
)


def is_finite(model: keras.Model, logs: dict[str, Any] | None) -> bool:
    """True when the epoch's loss and all the model's weights are finite.

    The weights are checked too: the last update of an epoch can turn them NaN
    while the loss reported for that epoch (computed before it) is still fine.
    """
    loss = (logs or {}).get("loss")
    if loss is not None and not math.isfinite(float(loss)):
        return False
    return all(np.isfinite(w.numpy()).all() for w in model.weights if "float" in str(w.dtype))


class StopOnNaN(keras.callbacks.Callback):
    """Stops training when the loss or the weights stop being finite.

    Unlike `keras.callbacks.TerminateOnNaN` it records where (`epoch`,
    `batch`, `what`) so the caller can report it and point at the last good
    checkpoint; `diverged` tells whether it fired.
    """

    def __init__(self):
        super().__init__()
        self.diverged = False
        self.epoch: int | None = None
        self.batch: int | None = None
        self.what = ""
        self._current_epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(self._current_epoch, batch, f"loss became {float(loss)}")

    def on_epoch_end(self, epoch, logs=None):
        if not self.diverged and not is_finite(self.model, logs):
            self._stop(epoch, None, "the weights or the loss became NaN/inf")

    def _stop(self, epoch: int, batch: int | None, what: str) -> None:
        self.diverged = True
        self.epoch, self.batch, self.what = epoch, batch, what
        self.model.stop_training = True


class RunCheckpoint(keras.callbacks.Callback):
    """Saves RUN/checkpoints/last.keras every epoch and best.keras on improvement.

    Like `keras.callbacks.ModelCheckpoint`, but the files are replaced
    atomically, non-finite epochs are skipped, and the best value so far is kept
    in checkpoints/state.json so a resumed run does not overwrite a better
    checkpoint with a worse one.
    """

    def __init__(self, run: RunDir, monitor: str = "val_loss", mode: str = "min"):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.run = run
        self.monitor = monitor
        self.mode = mode
        self.state_path = run.checkpoints / "state.json"
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last_epoch: int | None = None

    def on_train_begin(self, logs=None):
        if self.state_path.exists():
            state = read_json(self.state_path)
            if state.get("monitor") == self.monitor:
                self.best = state.get("best")
                self.best_epoch = state.get("best_epoch")
            self.last_epoch = state.get("last_epoch")

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not is_finite(self.model, logs):
            return
        value = logs.get(self.monitor)
        if value is not None and math.isfinite(float(value)) and self._improved(float(value)):
            atomic_save_model(self.model, self.run.best_checkpoint)
            self.best, self.best_epoch = float(value), epoch
        atomic_save_model(self.model, self.run.last_checkpoint)
        self.last_epoch = epoch
        write_json(self.state_path, {"monitor": self.monitor, "mode": self.mode,
                                     "best": self.best, "best_epoch": self.best_epoch,
                                     "last_epoch": self.last_epoch})


class Backup(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that writes atomically and keeps its state.

    The state (weights with optimizer slots, the epoch number, and that epoch's
    logs for `HistoryCSV`) is written at the end of every epoch to
    checkpoints/backup/, and restored by the next `fit` on the same folder:
    ``--resume`` after a kill continues from the last completed epoch. It is
    kept after a finished run (``delete_checkpoint=False``) so
    ``--resume --epochs N`` can extend training.
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__(backup_dir=str(backup_dir), save_freq="epoch",
                         delete_checkpoint=False)
        self._logs: dict[str, float] = {}

    def on_epoch_end(self, epoch, logs=None):
        if is_finite(self.model, logs):
            self._logs = {k: float(v) for k, v in (logs or {}).items()}
            super().on_epoch_end(epoch, logs)

    # Replaces Keras's writer (save_weights, then the metadata json, in place):
    # a kill in the middle would leave a truncated .h5, or weights of one epoch
    # with the epoch number of the previous one. The two files are written to
    # a new folder that replaces the old one.
    def _save_model(self):
        with atomic_directory(self.backup_dir) as tmp:
            self.model.save_weights(tmp / Path(self._weights_path).name)
            write_json(tmp / Path(self._training_metadata_path).name,
                       {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                        "logs": self._logs})


class HistoryCSV(keras.callbacks.Callback):
    """RUN/logs/history.csv: one row per completed epoch, like `keras.callbacks.CSVLogger`.

    Unlike it, the file is rewritten atomically each epoch (never half a row),
    and it always matches the backup a resumed run starts from: rows of epochs
    the backup does not hold are dropped (they will be redone), and the row of
    the backup's last epoch is added from the backup when the run was killed
    after saving the backup but before writing the row.
    """

    def __init__(self, path: str | Path, backup_dir: str | Path | None = None):
        super().__init__()
        self.path = Path(path)
        self.backup_metadata = (None if backup_dir is None
                                else Path(backup_dir) / "training_metadata.json")
        self.rows: list[dict[str, str]] = []

    def on_train_begin(self, logs=None):
        self.rows = self._read()
        if self.backup_metadata is not None and self.backup_metadata.exists():
            backup = read_json(self.backup_metadata)
            done = int(backup["epoch"])  # epochs 0 .. done-1 are in the backup
            rows = [r for r in self.rows if int(r["epoch"]) < done]
            if done > 0 and backup.get("logs") and \
                    not any(int(r["epoch"]) == done - 1 for r in rows):
                rows.append(self._row(done - 1, backup["logs"]))
            if rows != self.rows:
                self.rows = rows
                self._write()

    def on_epoch_end(self, epoch, logs=None):
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch]
        self.rows.append(self._row(epoch, logs or {}))
        self._write()

    @staticmethod
    def _row(epoch: int, logs: dict[str, Any]) -> dict[str, str]:
        return {"epoch": str(epoch), **{k: repr(float(v)) for k, v in sorted(logs.items())}}

    def _read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit()]

    def _write(self) -> None:
        columns = ["epoch"] + sorted({k for row in self.rows for k in row} - {"epoch"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())


class TimeBudget(keras.callbacks.Callback):
    """Stops after the epoch that leaves too little time for another one.

    An epoch is never interrupted: after each one, training stops if the
    elapsed time plus the duration of the slowest epoch so far would exceed
    the budget. `fit` then returns normally, so the run is saved and exported.
    """

    def __init__(self, max_minutes: float):
        super().__init__()
        self.budget = 60.0 * max_minutes
        self.stopped_epoch: int | None = None
        self._start = self._epoch_start = 0.0
        self._slowest = 0.0

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self._slowest = max(self._slowest, now - self._epoch_start)
        if now - self._start + self._slowest > self.budget:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"time budget of {self.budget / 60:g} min reached after epoch {epoch + 1}; "
                  "stopping", file=sys.stderr, flush=True)


class CosineToTimeBudget(keras.callbacks.Callback):
    """Cosine learning-rate decay that reaches 0 when the run ends, by steps or by time.

    A step-based cosine schedule never finishes when a time budget stops the
    run first, so the last epochs train at a high rate. Here the progress is
    the larger of the fraction of steps done and the fraction of the time
    budget used, and the optimizer's rate is set before every batch:
    ``peak * (1 + cos(pi * progress)) / 2``. The clock counts this process
    only, like `TimeBudget` (a resumed run gets a fresh budget).
    """

    def __init__(self, peak: float, total_steps: int, max_minutes: float,
                 clock=time.monotonic):
        super().__init__()
        self.peak = float(peak)
        self.total_steps = max(1, int(total_steps))
        self.budget = 60.0 * max_minutes
        self._clock = clock
        self._start = 0.0
        self._step = 0

    def on_train_begin(self, logs=None):
        self._start = self._clock()
        # Read once (a resumed run starts late); counted here afterwards, so
        # the training loop never waits on a device read of the counter.
        self._step = int(self.model.optimizer.iterations.numpy())

    def progress(self) -> float:
        elapsed = (self._clock() - self._start) / self.budget
        return min(1.0, max(self._step / self.total_steps, elapsed))

    def on_train_batch_begin(self, batch, logs=None):
        rate = 0.5 * self.peak * (1.0 + math.cos(math.pi * self.progress()))
        self.model.optimizer.learning_rate.assign(rate)
        self._step += 1  # one optimizer step per batch (no steps_per_execution)


def make_callbacks(
    run: RunDir,
    *,
    monitor: str = "val_loss",
    mode: str = "min",
    patience: int = 0,
    max_minutes: float | None = None,
    histogram_freq: int = 1,
    probe_inputs: Any = None,
    inspection_every: int = 1,
) -> list[keras.callbacks.Callback]:
    """All callbacks of a training run, in the order they must run.

    Args:
        run: the run directory (logs/, checkpoints/ are written).
        monitor: the logged metric that picks the best checkpoint and drives
            early stopping; "val_loss" needs validation data.
        mode: "min" or "max": which direction of `monitor` is better.
        patience: early-stopping patience in epochs; 0 disables it.
        max_minutes: time budget (see `TimeBudget`); None for no limit.
        histogram_freq: epochs between weight histograms; 0 disables them.
        probe_inputs: a batch of model inputs; when given, LSTM gate
            activations on it are logged to RUN/logs/inspection.
        inspection_every: epochs between two inspections.
    """
    callbacks: list[keras.callbacks.Callback] = [
        StopOnNaN(),
        RunCheckpoint(run, monitor=monitor, mode=mode),
        Backup(run.backup),
        HistoryCSV(run.history_csv, run.backup),
        # write_graph is off: the fused LSTM's XLA graph is large and unreadable.
        keras.callbacks.TensorBoard(log_dir=str(run.logs), histogram_freq=histogram_freq,
                                    write_graph=False, update_freq="epoch"),
    ]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                                       patience=patience, verbose=1))
    if max_minutes is not None:
        callbacks.append(TimeBudget(max_minutes))
    if probe_inputs is not None:
        from common.inspection import LSTMInspection  # matplotlib only when inspecting

        # It writes to <log_dir>/inspection, beside train/ and validation/.
        callbacks.append(LSTMInspection(probe_inputs, str(run.logs),
                                        every_n_epochs=inspection_every))
    return callbacks
