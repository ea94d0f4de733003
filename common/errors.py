"""Errors the command line reports as one line instead of a traceback.

Raise `UserError` for anything the user can fix: a missing file, a malformed
column, a run directory that belongs to someone else. The message must name the
input and the problem in one sentence, e.g.::

    raise UserError(f"--data {path}: no column 'close' (columns: {cols})")

`common.cli.run_main` prints it as ``error: <message>`` on stderr and exits with
`exit_code` (2, the Unix convention for bad usage, unless a subclass says
otherwise).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported in one line."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        # One line: a multi-line message would look like a traceback.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class RunDirBusy(UserError):
    """Another live process holds the lock of the run directory."""

    exit_code = 3


class TrainingDiverged(UserError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept."""

    exit_code = 1


class ExportCheckFailed(UserError):
    """The reloaded SavedModel did not reproduce the in-process outputs."""

    exit_code = 1


class ClusterConfigError(UserError, ValueError):
    """TF_CONFIG is missing or malformed (exit 2; still a ValueError for library callers)."""
