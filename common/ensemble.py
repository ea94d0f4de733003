"""Ensembles of trained runs: one model that averages its members, written as a run.

An app's ``ensemble`` command loads two or more runs of one task (`load_members`),
checks what its task needs them to share (`check_shared`), wraps their models
in one (`average_models`) and writes a new run directory (`write_ensemble_run`)
that the app's ``evaluate``, ``predict`` and ``export`` treat like any other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras

from common import runs
from common.errors import UserError


def _wrapped(members: Sequence[keras.Model]):
    """A new input like the first member's, and each member's output on it."""
    first = members[0].inputs[0]
    inputs = keras.Input(first.shape[1:], dtype=first.dtype, name=first.name)
    return inputs, [keras.Model(m.inputs[0], m.outputs[0], name=f"member_{k}")(inputs)
                    for k, m in enumerate(members)]


def average_models(members: Sequence[keras.Model], *, name: str) -> keras.Model:
    """One model whose output is the mean of the `members`' outputs.

    The members take one input of the same shape and dtype and give outputs of
    one shape; they are wrapped, not copied, under the names member_0, member_1, ...
    """
    inputs, outputs = _wrapped(members)
    average = keras.layers.Average(name="mean", dtype="float32")(outputs)
    return keras.Model(inputs, average, name=name)


@keras.saving.register_keras_serializable(package="lstm_suite")
class StackMembers(keras.layers.Layer):
    """The members' outputs side by side: a list of (batch, ...) -> (batch, members, ...)."""

    def call(self, inputs):
        return keras.ops.stack(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], len(input_shape), *input_shape[0][1:])


def stack_models(members: Sequence[keras.Model], *, name: str) -> keras.Model:
    """One model whose output holds every member's output: (batch, members, ...).

    For outputs that cannot be averaged position by position, e.g. CTC logits
    of models trained apart, whose peaks for one symbol fall on different
    frames: the caller combines the members' decodings instead.
    """
    inputs, outputs = _wrapped(members)
    return keras.Model(inputs, StackMembers(name="members", dtype="float32")(outputs),
                       name=name)


def load_members(paths: Sequence[str | os.PathLike], *, app: str, task: str,
                 run_dir: str | os.PathLike) -> list[runs.RunDir]:
    """The --members runs: at least two trained runs of `app`/`task`, none of them --run-dir."""
    if len(paths) < 2:
        raise UserError("--members: an ensemble needs at least 2 runs")
    members = [runs.load_run(path, app=app, task=task, flag="--members") for path in paths]
    for member in members:
        if not member.model.exists():
            raise UserError(f"--members {member.root}: holds no model.keras (a --cv run, or "
                            "one not trained to the end); pass trained runs")
    if runs.normalised_path(run_dir) in {m.root for m in members}:
        raise UserError(f"--run-dir {run_dir}: is one of the --members; choose a new "
                        "directory for the ensemble")
    return members


def check_shared(members: Sequence[runs.RunDir], keys: Sequence[str], what: str,
                 canonical: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
    """Refuse members whose config.json differ in `data` or in app_settings `keys`.

    `what` ends the message: what the members must share, in the app's words.
    `canonical[key]`, if given, maps a stored value to a comparable one (say,
    filling in a setting's default that older runs did not store).
    """
    canonical = canonical or {}

    def value(settings: dict[str, Any], key: str) -> Any:
        stored = settings.get(key)
        return canonical[key](stored) if key in canonical and stored is not None else stored

    configs = [member.read_config() for member in members]
    first = configs[0].get("app_settings") or {}
    for member, config in zip(members[1:], configs[1:], strict=True):
        settings = config.get("app_settings") or {}
        differs = [key for key in keys if value(settings, key) != value(first, key)]
        if config.get("data") != configs[0].get("data"):
            differs.append("data")
        if differs:
            raise UserError(f"--members: {member.root} differs from {members[0].root} in "
                            f"{', '.join(differs)}; {what}")


def write_ensemble_run(run_dir: str | os.PathLike, *, app: str, task: str,
                       members: Sequence[runs.RunDir], model: keras.Model,
                       settings: dict[str, Any],
                       export: Callable[[keras.Model, Path], None],
                       test_metrics: str = "test", headline: str = "accuracy") -> runs.RunDir:
    """A new run holding the ensemble: model.keras, config.json, metrics.json, saved_model/.

    `settings` become the run's app_settings (the first member's, usually),
    plus ``ensemble_members``; `export(model, path)` writes the SavedModel.
    metrics.json lists the members and their own test metrics (the
    `test_metrics` entry of their metrics.json; `headline` is the one printed).
    """
    names = [str(m.root) for m in members]
    member_test = [(runs.read_json(m.metrics) if m.metrics.exists() else {}).get(test_metrics)
                   or {} for m in members]
    with runs.open_run(run_dir, app=app, task=task) as run:
        runs.atomic_save_model(model, run.model)
        config = run.read_config()
        config.update(data=members[0].read_config().get("data"),
                      app_settings={**settings, "ensemble_members": names},
                      model={"name": model.name, "parameters": model.count_params()})
        runs.write_json(run.config, config)
        export(model, run.saved_model)
        runs.write_json(run.metrics, {"ensemble_of": names, "member_test": member_test})
    alone = ", ".join(f"{t.get(headline, float('nan')):.4f}" for t in member_test)
    print(f"ensemble of {len(members)} runs written to {run.root} (members' test {headline}: "
          f"{alone}); score it with: {task} evaluate --run-dir {run.root}")
    return run
