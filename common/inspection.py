"""Watch what an LSTM's gates do, in TensorBoard.

An LSTM decides at every time step what to forget (forget gate), what to store
(input gate) and what to emit (output gate); the cell state is the memory those
gates maintain. `LSTMInspection` is a Keras callback that runs a fixed probe
batch through the model every few epochs and logs, for every
`common.lstm.LSTM` layer:

- histograms ``lstm_inspection/<layer>/input_gate``, ``.../forget_gate``,
  ``.../output_gate`` and ``.../cell_state``;
- an image ``lstm_inspection/<layer>/over_time``: the mean forget-gate
  activation and the mean cell-state norm at each time step.

Layers are found at any depth: directly in a Sequential or functional model,
inside nested Sequential/functional models, and as the ``forward_layer`` /
``backward_layer`` of `keras.layers.Bidirectional` (Keras names those
``forward_<name>`` and ``backward_<name>``).

How a layer's input is found: the callback builds, once, a small functional
model from the model's inputs to the tensors each LSTM layer was called with
(its sequences, and its ``initial_state`` when the graph passes one), and runs
it in inference mode on the probe batch. Keras attaches the mask produced
upstream (e.g. by ``Embedding(mask_zero=True)``) to the tensors it computes;
the callback reads it back and hands it to ``gate_activations``. Masked steps
are left out of the histograms and the per-step means, because there the layer
only carries its previous state along. This relies on two Keras internals
(the model's node graph and the ``_keras_mask`` tensor attribute), since Keras
has no public API for either; layers hidden inside custom (subclassed) layers
or models are not reached.

The probe costs one inference forward pass per logged epoch and nothing per
batch. Under `tf.distribute.MultiWorkerMirroredStrategy` only the chief worker
probes and writes, as with checkpoints.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import get_keras_mask

from common.distribute import is_chief
from common.lstm import LSTM

HISTOGRAMS = ("input_gate", "forget_gate", "output_gate", "cell_state")
TAG_PREFIX = "lstm_inspection"


@dataclasses.dataclass(frozen=True)
class _Probe:
    """What one LSTM layer received for the probe batch."""

    name: str
    layer: LSTM
    sequences: tf.Tensor
    mask: tf.Tensor | None
    initial_state: list | None


class LSTMInspection(keras.callbacks.Callback):
    """Logs LSTM gate activations and cell states to TensorBoard.

    Args:
        probe_inputs: One batch of model inputs (an array or tensor, or the
            list/dict a multi-input model takes), kept fixed so that epochs
            compare like with like. A few dozen sequences are plenty.
        log_dir: The run's log directory; summaries go to
            ``<log_dir>/inspection`` beside Keras's ``train``/``validation``.
        every_n_epochs: Probe after every n-th epoch (``1`` = every epoch).

    Example:

    ```python
    from common.inspection import LSTMInspection

    model.fit(
        x_train, y_train, epochs=10,
        callbacks=[
            keras.callbacks.TensorBoard("runs/exp1"),
            LSTMInspection(x_train[:32], "runs/exp1"),
        ],
    )
    # tensorboard --logdir runs/exp1: Histograms and Images tabs,
    # tags lstm_inspection/<layer>/...
    ```
    """

    def __init__(self, probe_inputs, log_dir: str, every_n_epochs: int = 1):
        super().__init__()
        if isinstance(probe_inputs, tf.data.Dataset):
            raise ValueError(
                "LSTMInspection expects probe_inputs to be one batch of model inputs "
                "(array, tensor, or list/dict of them), not a tf.data.Dataset; take "
                "one with `next(iter(dataset))[0]`."
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or (
                every_n_epochs < 1):
            raise ValueError(
                f"LSTMInspection expects every_n_epochs to be a positive integer; "
                f"got {every_n_epochs!r}."
            )
        self.probe_inputs = probe_inputs
        self.log_dir = os.fspath(log_dir)
        self.every_n_epochs = every_n_epochs
        self._writer = None
        # One input extractor per model (the outer one and any nested ones),
        # built on first use: the model may be built only once fit() starts.
        self._extractors: dict[int, tuple[keras.Model | None, list]] = {}

    def set_model(self, model):
        super().set_model(model)
        self._extractors = {}

    # -- callback hooks -------------------------------------------------------

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        if not is_chief(self.model.distribute_strategy):
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "inspection"))
        with self._writer.as_default(step=epoch):
            for probe in self._probes():
                self._log(probe, epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- probing ----------------------------------------------------------------

    def gate_activations(self) -> dict[str, dict[str, tf.Tensor]]:
        """The probe batch's gate activations for every LSTM layer, by tag name.

        What the callback logs, for use in a notebook or a test: each value is
        `common.lstm.LSTM.gate_activations` of that layer (masked steps included).

        Example:

        ```python
        inspection = LSTMInspection(x[:8], "runs/exp1")
        inspection.set_model(model)
        inspection.gate_activations()["lstm"]["forget_gate"].shape  # (8, T, units)
        ```
        """
        return {
            probe.name: probe.layer.gate_activations(
                probe.sequences, mask=probe.mask, initial_state=probe.initial_state)
            for probe in self._probes()
        }

    def _probes(self) -> list[_Probe]:
        """Runs the probe batch up to every LSTM layer; returns what each received."""
        model = self.model
        if not _is_graph_model(model):
            raise ValueError(
                "LSTMInspection expects a built Sequential or functional model (it "
                "follows the graph to each LSTM's input); got "
                f"{type(model).__name__} '{model.name}', which has no such graph."
            )
        probes = list(self._walk(model, self.probe_inputs, mask=None))
        if not probes:
            raise ValueError(
                f"LSTMInspection expects the model '{model.name}' to contain "
                "common.lstm.LSTM layers (keras.layers.LSTM has no gate_activations); "
                "found none."
            )
        return _unique_names(probes)

    def _walk(self, container, inputs, mask):
        extractor, targets = self._extractor(container)
        if not targets:
            return
        with warnings.catch_warnings():
            # Handing a nested model's mask to its extractor is intended; Keras
            # warns that the extractor, a plain functional model, drops masks.
            warnings.filterwarnings("ignore", message=".*does not support masking")
            values = extractor(inputs, training=False, mask=mask)
        if len(targets) == 1:  # Keras unwraps a one-element output list
            values = [values]
        for target, value in zip(targets, values, strict=True):
            sequences = value["sequences"]
            if "mask" in value:
                seq_mask = value["mask"]
            else:
                seq_mask = tf.nest.map_structure(get_keras_mask, sequences)
            state = value.get("initial_state")
            if isinstance(target, LSTM):
                yield _Probe(target.name, target, sequences, seq_mask, state)
            elif isinstance(target, keras.layers.Bidirectional):
                # Bidirectional splits a given initial state into halves.
                half = None if state is None else len(state) // 2
                for layer, part in ((target.forward_layer, slice(None, half)),
                                    (target.backward_layer, slice(half, None))):
                    yield _Probe(layer.name, layer, sequences, seq_mask,
                                 None if state is None else state[part])
            else:  # a nested model
                yield from self._walk(target, sequences, seq_mask)

    def _extractor(self, container):
        key = id(container)
        if key not in self._extractors:
            graph = _graph(container)
            nodes = {node for level in graph._nodes_by_depth.values() for node in level}
            graph_tensors = {id(t) for node in nodes for t in node.outputs}
            targets, outputs = [], []
            for layer in container.layers:
                if not _holds_lstm(layer):
                    continue
                node = next((n for n in layer._inbound_nodes if n in nodes), None)
                if node is None:
                    continue
                targets.append(layer)
                outputs.append(_call_tensors(node, graph_tensors))
            extractor = keras.Model(graph._inputs_struct, outputs) if targets else None
            self._extractors[key] = (extractor, targets)
        return self._extractors[key]

    # -- logging ----------------------------------------------------------------

    def _log(self, probe: _Probe, epoch: int) -> None:
        acts = probe.layer.gate_activations(
            probe.sequences, mask=probe.mask, initial_state=probe.initial_state)
        valid = None if probe.mask is None else tf.cast(probe.mask, tf.bool)
        for key in HISTOGRAMS:
            values = acts[key] if valid is None else tf.boolean_mask(acts[key], valid)
            tf.summary.histogram(f"{TAG_PREFIX}/{probe.name}/{key}", values)
        forget = acts["forget_gate"].numpy()
        cell_norm = np.linalg.norm(acts["cell_state"].numpy(), axis=-1)
        weights = np.ones(forget.shape[:2]) if valid is None else valid.numpy().astype(float)
        png = _over_time_png(
            probe.name, epoch,
            _mean_over_batch(forget.mean(axis=-1), weights),
            _mean_over_batch(cell_norm, weights),
        )
        image = tf.image.decode_png(png, channels=4)[None]
        tf.summary.image(f"{TAG_PREFIX}/{probe.name}/over_time", image)


# ---------------------------------------------------------------------------
# Finding each LSTM layer and what it was called with
# ---------------------------------------------------------------------------


def _is_graph_model(layer) -> bool:
    return isinstance(layer, keras.Model) and _graph(layer) is not None


def _graph(model):
    """The functional graph of a functional or (built) Sequential model, or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") else None


def _holds_lstm(layer) -> bool:
    if isinstance(layer, LSTM):
        return True
    if isinstance(layer, keras.layers.Bidirectional):
        return isinstance(layer.forward_layer, LSTM)
    if _is_graph_model(layer):
        return any(_holds_lstm(inner) for inner in layer.layers)
    if isinstance(layer, keras.Model) and any(
            isinstance(inner, LSTM) for inner in layer._flatten_layers()):
        warnings.warn(
            f"LSTMInspection skips the LSTM layers inside '{layer.name}': it is a "
            "subclassed model, whose inputs cannot be followed.", stacklevel=3)
    return False


def _call_tensors(node, graph_tensors) -> dict:
    """The symbolic tensors a layer was called with at `node`, by role."""
    args, kwargs = node.arguments.args, node.arguments.kwargs
    tensors = {"sequences": args[0]}
    state = kwargs.get("initial_state", args[1] if len(args) > 1 else None)
    if state is not None:
        tensors["initial_state"] = list(state)
    # A mask passed explicitly from another graph tensor is computed by the
    # extractor; a mask Keras derived (Embedding(mask_zero=True), Masking)
    # travels on the sequences as `_keras_mask` instead.
    mask = kwargs.get("mask")
    if mask is not None and all(id(m) in graph_tensors for m in tf.nest.flatten(mask)):
        tensors["mask"] = mask
    return tensors


def _unique_names(probes: list[_Probe]) -> list[_Probe]:
    # Layer names are unique within a model but nested models may repeat them.
    seen: dict[str, int] = {}
    result = []
    for probe in probes:
        count = seen.get(probe.name, 0)
        seen[probe.name] = count + 1
        name = probe.name if count == 0 else f"{probe.name}_{count}"
        result.append(dataclasses.replace(probe, name=name))
    return result


# ---------------------------------------------------------------------------
# The over-time image
# ---------------------------------------------------------------------------


def _mean_over_batch(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-step mean of (batch, timesteps) values over the unmasked sequences."""
    counts = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A step no sequence reaches has no mean: NaN leaves a gap in the plot.
        return np.where(counts > 0, (values * weights).sum(axis=0) / counts, np.nan)


def _over_time_png(name: str, epoch: int, forget: np.ndarray, cell_norm: np.ndarray) -> bytes:
    # Figure + its own Agg canvas: no pyplot, so no global backend or figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=80)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    steps = np.arange(len(forget))
    top.plot(steps, forget, color="tab:blue")
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("mean forget gate")
    top.set_title(f"{name}, epoch {epoch + 1}")
    bottom.plot(steps, cell_norm, color="tab:orange")
    bottom.set_ylabel("mean cell-state norm")
    bottom.set_xlabel("time step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
