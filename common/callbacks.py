"""The callbacks of a training run, assembled in one place: `make_callbacks`.

Order matters and is fixed here:

1. `StopOnNaN` first, so a diverged epoch is known before anything is saved;
2. `RunCheckpoint` (best.keras, last.keras) before
3. `Backup` (the BackupAndRestore state), so a run killed between the two
   redoes an epoch instead of losing its checkpoint;
4. `CSVLogger` after the backup: a line in history.csv means the epoch is safe;
5. TensorBoard, EarlyStopping, `TimeBudget` and the optional LSTM inspection.

Nothing is saved from an epoch whose loss or weights are not finite, so the
checkpoints and the backup always hold the last good state.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from common.runs import RunDir, atomic_save_model, atomic_save_weights, read_json, write_json


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

    The state (weights with optimizer slots, plus the epoch number) is written
    at the end of every epoch to checkpoints/backup/, and restored by the next
    `fit` on the same folder: ``--resume`` after a kill continues from the last
    completed epoch. It is kept after a finished run (``delete_checkpoint=False``)
    so ``--resume --epochs N`` can extend training.
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__(backup_dir=str(backup_dir), save_freq="epoch",
                         delete_checkpoint=False)

    def on_epoch_end(self, epoch, logs=None):
        if is_finite(self.model, logs):
            super().on_epoch_end(epoch, logs)

    # Replaces Keras's non-atomic writer (save_weights, then the metadata json):
    # a kill mid-write would leave a truncated .h5 that cannot be restored.
    def _save_model(self):
        Path(self.backup_dir).mkdir(parents=True, exist_ok=True)
        atomic_save_weights(self.model, self._weights_path)
        write_json(self._training_metadata_path,
                   {"epoch": self._current_epoch, "batch": self._last_batch_seen})


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
        keras.callbacks.CSVLogger(str(run.history_csv), append=True),
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
