"""Export a SavedModel whose ``serving_default`` takes raw input, and check it.

The app supplies the serving function because only it knows the raw input: a
`tf.Module` holding the model (so its variables are saved) and a
`tf.function` with an ``input_signature`` that goes from raw input (strings,
audio samples, price windows) to outputs::

    class Serving(tf.Module):
        def __init__(self, model, vectorizer):
            super().__init__()
            self.model, self.vectorizer = model, vectorizer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text):
            return {"probability": self.model(self.vectorizer(text), training=False)}

    export_saved_model(Serving(model, vectorizer), run.saved_model, sample=tf.constant(["good"]))

The export is written to a temporary folder, reloaded with
`tf.saved_model.load` and run on `sample`; only if it reproduces the
in-process outputs does it replace the previous export. Only a previous
SavedModel (or an empty folder) is ever replaced, and only its own entries:
files beside them (TF Serving's `assets.extra/` warm-up requests, a model card)
are kept. An export into a run directory holds the run's lock, so it cannot
race a training run's own export.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from common.errors import ExportCheckFailed, UserError
from common.runs import atomic_directory, lock_for_writing

SIGNATURE = "serving_default"

# What `tf.saved_model.save` writes; anything else in an export folder is the user's.
_SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "saved_model.pbtxt", "fingerprint.pb",
                                  "variables", "assets"})


class ModelServing(tf.Module):
    """Serves a one-input Keras model as is: raw input = the model's input tensor.

    For models whose input already is the raw input (e.g. price windows). The
    signature's argument is named after the model's `Input`; it returns
    ``{"output": ...}``, or the model's own dict for a multi-output model.
    Models with several inputs need their own module.
    """

    def __init__(self, model: keras.Model):
        super().__init__()
        if len(model.inputs) != 1:
            raise ValueError(f"ModelServing serves one-input models; {model.name} has "
                             f"{len(model.inputs)}: write a serving module for it")
        self.model = model
        x = model.inputs[0]
        spec = tf.TensorSpec((None, *tuple(x.shape)[1:]), x.dtype, name=_input_name(x))

        @tf.function(input_signature=[spec])
        def serve(inputs):
            outputs = model(inputs, training=False)
            return dict(outputs) if isinstance(outputs, dict) else {"output": outputs}

        self.serve = serve


def _input_name(tensor) -> str:
    # Keras input names ("input_layer", "prices") become signature argument names.
    return tensor.name.split(":")[0].replace("/", "_")


def export_saved_model(
    module: tf.Module,
    export_dir: str | os.PathLike,
    sample: Any,
    *,
    function_name: str = "serve",
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Save `module` with ``serving_default`` = ``module.<function_name>``, then check it.

    Args:
        module: a `tf.Module` that holds the model (and any lookup tables) as
            attributes, and a `tf.function` with an ``input_signature``.
        export_dir: the SavedModel folder; replaced only after the check passes.
        sample: raw input for the check: one value for a one-argument
            function, or a dict of argument name -> value.
        function_name: the attribute of `module` to serve.
        rtol, atol: tolerance of the output comparison (strings must match).

    Returns:
        The export folder.

    Raises:
        ExportCheckFailed: the reloaded SavedModel gave other outputs.
        UserError: `export_dir` exists and is neither a SavedModel nor empty.
        RunDirBusy: `export_dir` is in a run directory another process uses.
    """
    export_dir = Path(export_dir)
    function = getattr(module, function_name)
    if getattr(function, "input_signature", None) is None:
        raise ValueError(f"{type(module).__name__}.{function_name} must be a tf.function with "
                         "an input_signature (the raw input it serves)")
    signature = function.get_concrete_function()
    expected = _as_output_dict(_call(function, sample))
    _track_keras_variables(module)
    with lock_for_writing(export_dir):
        _check_replaceable(export_dir)
        with atomic_directory(export_dir) as tmp:
            tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: signature})
            reloaded = tf.saved_model.load(str(tmp)).signatures[SIGNATURE]
            got = reloaded(**_as_kwargs(reloaded, sample))
            _compare(expected, got, rtol=rtol, atol=atol, where=export_dir)
            _copy_other_entries(export_dir, tmp)
    return export_dir


def _copy_other_entries(old: Path, new: Path) -> None:
    """Copy what the previous export folder holds besides the SavedModel into `new`.

    Copied, not moved: until the swap the old folder must stay whole.
    """
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in _SAVED_MODEL_ENTRIES:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, new / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        except OSError as exc:  # shutil.Error too
            raise UserError(f"{entry}: could not be kept in the new export ({exc}); the "
                            "previous export is unchanged") from None


def _track_keras_variables(module: tf.Module) -> None:
    """Make every variable of the Keras layers `module` holds a tracked `tf.Variable`.

    Keras 3 wraps each `tf.Variable` in a `keras.Variable` that `tf.Module`
    does not track. `tf.saved_model.load` still finds them through the
    functions that use them, but loaders of the graph itself (TensorFlow
    Serving, `saved_model_cli run`, `tf.compat.v1.saved_model.load`) fail with
    "Could not find variable" (keras-team/keras#19274). A list of the
    underlying variables on the module puts them in the SavedModel's
    variables. It also covers variables outside the weights, such as a
    dropout layer's seed state.
    """
    layers = [value for value in vars(module).values() if isinstance(value, keras.layers.Layer)]
    seen: set[int] = set()
    variables = []
    for layer in layers:
        for variable in layer.variables:
            value = getattr(variable, "value", variable)  # the tf.Variable inside
            if isinstance(value, tf.Variable) and id(value) not in seen:
                seen.add(id(value))
                variables.append(value)
    module.keras_variables = variables


def _check_replaceable(export_dir: Path) -> None:
    # The export replaces the whole folder: refuse anything but an old export,
    # so that `--out ~/Documents` cannot wipe a folder of someone's files.
    if export_dir.is_symlink():
        raise UserError(f"{export_dir}: is a symbolic link (the export would replace the link, "
                        f"not write where it points); give the real path, "
                        f"{export_dir.resolve()}")
    if export_dir.exists() and not export_dir.is_dir():
        raise UserError(f"{export_dir}: exists and is not a folder; choose a new export path")
    if export_dir.is_dir() and any(export_dir.iterdir()) and \
            not (export_dir / "saved_model.pb").is_file():
        raise UserError(f"{export_dir}: exists and is not a SavedModel (it would be "
                        "replaced); choose a new or empty folder")


def _call(function, sample):
    return function(**sample) if isinstance(sample, Mapping) else function(sample)


def _as_kwargs(signature, sample) -> dict[str, Any]:
    if isinstance(sample, Mapping):
        return dict(sample)
    names = list(signature.structured_input_signature[1])
    if len(names) != 1:
        raise ValueError(f"the serving function takes {names}; pass `sample` as a dict")
    return {names[0]: sample}


def _as_output_dict(outputs) -> dict[str, Any]:
    # What a signature returns for a function's outputs: dicts keep their keys,
    # anything else is flattened to output_0, output_1, ...
    if isinstance(outputs, Mapping):
        return dict(outputs)
    return {f"output_{i}": t for i, t in enumerate(tf.nest.flatten(outputs))}


def _compare(expected: dict, got: dict, *, rtol: float, atol: float, where: Path) -> None:
    if set(expected) != set(got):
        raise ExportCheckFailed(f"{where}: reloaded SavedModel outputs {sorted(got)}, "
                                f"expected {sorted(expected)}")
    for key, want in expected.items():
        want, have = np.asarray(want), np.asarray(got[key])
        if want.shape != have.shape:
            raise ExportCheckFailed(f"{where}: output '{key}' has shape {have.shape} after "
                                    f"reloading, {want.shape} before")
        same = (np.array_equal(want, have) if want.dtype.kind in "OSUb"
                else np.allclose(want, have, rtol=rtol, atol=atol, equal_nan=True))
        if not same:
            raise ExportCheckFailed(f"{where}: output '{key}' differs after reloading the "
                                    "SavedModel (the serving function is not deterministic "
                                    "or depends on Python state)")
