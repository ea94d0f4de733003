"""A drop-in `keras.layers.LSTM` with a fast CPU path and a guarded cuDNN path.

The layer keeps Keras's weights, weight names, gate order (i, f, c, o), config
and call semantics, and replaces only the loop over time steps. Each call picks
one of three execution paths:

1. ``"cudnn"``: TensorFlow's cuDNN RNN op, when a GPU is visible and the
   configuration allows it (tanh/sigmoid, ``use_bias``, no ``unroll``, no
   recurrent dropout while training). A mask that is not strictly right-padded,
   or that fully masks a sequence, routes that call to the fused path instead of
   raising as ``keras.layers.LSTM`` does.
2. ``"fused"``: the input projection of every time step is one matrix product
   before the loop; the loop, compiled with XLA, carries only the recurrent
   product and the gates. Training uses a hand-written backward pass through
   time whose weight gradients are again single matrix products.
3. ``"reference"``: Keras's own step loop, for ``recurrent_dropout`` while
   training and ``unroll=True``.

The path used by the last trace is in ``layer.execution_path``, and each trace
logs one line on the ``lstm_suite`` logger.
"""

from __future__ import annotations

import logging
import os

import keras
import tensorflow as tf
from keras import activations, ops

logger = logging.getLogger("lstm_suite")

def gpu_available() -> bool:
    """True when TensorFlow sees a GPU (tests patch this to simulate one)."""
    return bool(tf.config.list_logical_devices("GPU"))


def _is_standard_activations(activation, recurrent_activation) -> bool:
    return activation in (activations.tanh, tf.tanh, ops.tanh) and recurrent_activation in (
        activations.sigmoid,
        tf.sigmoid,
        ops.sigmoid,
    )


def _is_elementwise(fn) -> bool:
    """The fused path's backward pass assumes activations act elementwise."""
    return fn not in (activations.softmax, activations.log_softmax, ops.softmax,
                      ops.log_softmax, tf.nn.softmax, tf.nn.log_softmax)


# ---------------------------------------------------------------------------
# Fused kernels. All work on time-major tensors:
#   xw   (T, B, 4U)  input projection x_t @ kernel for every step
#   b    (4U,)       bias, added inside the loop's gate arithmetic (free there)
#   r    (U, 4U)     recurrent kernel
#   mask (T, B, 1)   bool, or None
# Output convention follows keras.backend.rnn: a masked step keeps the previous
# state and emits the previous output (or zeros when zero_output_for_mask).
# ---------------------------------------------------------------------------


def _gate_values(z, activation, recurrent_activation):
    z_i, z_f, z_g, z_o = tf.split(z, 4, axis=-1)
    return (
        recurrent_activation(z_i),
        recurrent_activation(z_f),
        activation(z_g),
        recurrent_activation(z_o),
    )


def _recurrence(
    xw, b, r, h0, c0, mask, *, zero_output, return_sequences, save, activation,
    recurrent_activation,
):
    """The forward loop. Returns (outputs, h, c, saved).

    ``outputs`` is (T, B, U) when ``return_sequences`` else (B, U). With
    ``save`` every step writes ONE packed row (each write is a fixed cost in
    XLA's loop on CPU), laid out as `_LAYOUTS[save]`:

    - ``"gates"``: the gate pre-activations z (i, f, g, o) and the carried cell
      and hidden states, for the gate inspection and for activations other
      than tanh/sigmoid;
    - ``"derivatives"`` (tanh/sigmoid only): what the backward pass multiplies
      by, computed here where the gates already are, which spares it a pass
      over every step; and the hidden state.

    With a mask the emitted output is appended.
    """
    steps = tf.shape(xw)[0]
    dtype = xw.dtype
    keep_outputs = return_sequences and not save
    out_ta = tf.TensorArray(dtype, size=steps if keep_outputs else 1)
    saved_ta = tf.TensorArray(dtype, size=steps if save else 1)
    xw_ta = tf.TensorArray(dtype, size=steps).unstack(xw)
    mask_ta = None if mask is None else tf.TensorArray(tf.bool, size=steps).unstack(mask)

    # Without saving, the next step's projection rides in the loop state:
    # reading it there, outside the gate arithmetic, keeps XLA's one gate fusion
    # vectorised. With saving, the gates are split over several fusions anyway,
    # and reading the step's slice in them beats the two copies per step that
    # a carried slice costs (8.7 against 9.5 ms for 200 steps of 16 x 128).
    carry_x = not save

    def body(t, *state):
        if carry_x:
            x_t, h, c, out_ta, saved_ta, *y = state
            x_next = xw_ta.read(tf.minimum(t + 1, steps - 1))
        else:
            h, c, out_ta, saved_ta, *y = state
            x_t = xw_ta.read(t)
        z = x_t + b + tf.matmul(h, r)
        i, f, g, o = _gate_values(z, activation, recurrent_activation)
        c_new = f * c + i * g
        c_unmasked = c_new
        h_new = o * activation(c_new)
        if mask_ta is not None:
            # Only a mask makes the emitted output differ from h, so only then
            # is it carried (an extra loop variable is an extra copy per step).
            m = mask_ta.read(t)
            c_new = tf.where(m, c_new, c)
            y = (tf.where(m, h_new, tf.zeros_like(y[0]) if zero_output else y[0]),)
            h_new = tf.where(m, h_new, h)
        y_new = y[0] if y else h_new
        if keep_outputs:
            out_ta = out_ta.write(t, y_new)
        if save == "gates":
            row = [z, c_new, h_new]
        elif save == "derivatives":
            row = _derivative_fields(i, f, g, o, c, c_unmasked) + [h_new]
        if save:
            row += [y_new] if mask_ta is not None else []
            saved_ta = saved_ta.write(t, tf.concat(row, axis=-1))
        return (t + 1,) + ((x_next,) if carry_x else ()) + (h_new, c_new, out_ta, saved_ta) + tuple(y)

    y0 = () if mask is None else (tf.zeros_like(h0),)
    x0 = (xw_ta.read(0),) if carry_x else ()
    loop_vars = (tf.constant(0),) + x0 + (h0, c0, out_ta, saved_ta) + y0
    _, *state = tf.while_loop(
        lambda t, *_: t < steps, body, loop_vars, maximum_iterations=steps
    )
    h, c, out_ta, saved_ta, *y = state[len(x0):]
    saved = saved_ta.stack() if save else None
    if not return_sequences:
        outputs = y[0] if y else h
    elif save:
        outputs = _unpack(saved, "y" if mask is not None else "h", mask is not None, save)
    else:
        outputs = out_ta.stack()
    return outputs, h, c, saved


def _derivative_fields(i, f, g, o, c_prev, c) -> list:
    """The backward pass's per-step factors, for sigmoid gates and tanh.

    d_z_i = dc * a_i, d_z_f = dc * a_f, d_z_g = dc * a_g, d_z_o = dh * a_o,
    dc += dh * a_c and dc_prev = dc * f. At a masked step c is not the carried
    state, but every term there is multiplied by zero.
    """
    tanh_c = tf.tanh(c)
    return [i * (1.0 - i) * g, f * (1.0 - f) * c_prev, i * (1.0 - g * g),
            o * (1.0 - o) * tanh_c, o * (1.0 - tanh_c * tanh_c), f]


# Fields of a saved row (see `_recurrence`); "y" only with a mask.
_LAYOUTS = {
    "gates": ("i", "f", "g", "o", "c", "h", "y"),
    "derivatives": ("a_i", "a_f", "a_g", "a_o", "a_c", "f", "h", "y"),
}


def _unpack(saved, name: str, has_mask: bool, layout: str = "gates"):
    """One field, (T, B, U), of the packed per-step rows written by `_recurrence`."""
    fields = _LAYOUTS[layout][:None if has_mask else -1]
    width = saved.shape[-1] // len(fields)
    k = fields.index(name)
    return saved[..., k * width:(k + 1) * width]


def _with_derivative(fn, x):
    """fn(x) and its elementwise derivative fn'(x), for elementwise activations."""
    if fn in (tf.sigmoid, activations.sigmoid, ops.sigmoid):
        y = tf.sigmoid(x)
        return y, y * (1.0 - y)
    if fn in (tf.tanh, activations.tanh, ops.tanh):
        y = tf.tanh(x)
        return y, 1.0 - y * y
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y, tape.gradient(y, x)


def _backward(d_out, d_h, d_c, saved, h0, c0, r, mask, *, zero_output, return_sequences,
              activation, recurrent_activation, layout):
    """Backpropagation through time for elementwise activations.

    Returns (d_xw (T, B, 4U), h_prev_ones (T*B, U+1), d_h0, d_c0). Everything
    that does not depend on the recurrence (the gate derivatives) is computed
    for all steps at once before the loop, packed one row per step; the loop
    keeps only the elementwise chain and d_z @ r^T. d_r and d_b are then one
    matrix product, h_prev_ones^T @ d_z (h_prev_ones = [h_{t-1}, 1]), which the
    caller runs outside this XLA call (see `_fused`).
    """
    steps = tf.shape(saved)[0]
    units = h0.shape[-1]
    has_mask = mask is not None
    h = _unpack(saved, "h", has_mask, layout)
    if layout == "derivatives":
        packed = saved  # the forward loop wrote the factors; the loop reads 6U of 7U+
    else:
        # d_z_i = dc * a_i, ... as in `_derivative_fields`, for any elementwise
        # activations: derivatives of the saved pre-activations, for all steps.
        z_i, z_f, z_g, z_o, c = (_unpack(saved, k, has_mask) for k in "ifgoc")
        c_prev = tf.concat([c0[None], c[:-1]], axis=0)
        i, di = _with_derivative(recurrent_activation, z_i)
        f, df = _with_derivative(recurrent_activation, z_f)
        o, do = _with_derivative(recurrent_activation, z_o)
        g, dg = _with_derivative(activation, z_g)
        act_c, dact_c = _with_derivative(activation, c)
        packed = tf.concat([di * g, df * c_prev, i * dg, do * act_c, o * dact_c, f], axis=-1)
    packed_ta = tf.TensorArray(saved.dtype, size=steps).unstack(packed)
    dout_ta = tf.TensorArray(saved.dtype, size=steps).unstack(d_out) if return_sequences else None
    mask_ta = None
    if has_mask:
        mask_ta = tf.TensorArray(saved.dtype, size=steps).unstack(tf.cast(mask, saved.dtype))
    dz_ta = tf.TensorArray(saved.dtype, size=steps)
    r_t = tf.transpose(r)

    def body(t, row, dh, dc, dy_carry, dz_ta):
        row_next = packed_ta.read(tf.maximum(t - 1, 0))
        a_c, f_t = row[:, 4 * units:5 * units], row[:, 5 * units:6 * units]
        dy = dy_carry
        if return_sequences:
            dy = dy + dout_ta.read(t)
        if has_mask:
            m = mask_ta.read(t)
            keep = 1.0 - m
            dh_step = m * (dh + dy)
            dc_step = m * dc
            dy_carry = tf.zeros_like(dy) if zero_output else keep * dy
        else:
            dh_step = dh + dy
            dc_step = dc
        dc_step = dc_step + dh_step * a_c
        # One broadcasted product over a (B, 4, U) view of a_i|a_f|a_g|a_o: XLA
        # makes it one fusion, where four sliced products and a concat were five.
        scale = tf.stack([dc_step, dc_step, dc_step, dh_step], axis=1)
        dz = tf.reshape(tf.reshape(row[:, :4 * units], [-1, 4, units]) * scale,
                        [-1, 4 * units])
        dz_ta = dz_ta.write(t, dz)
        dh_prev = tf.matmul(dz, r_t)
        dc_prev = dc_step * f_t
        if has_mask:
            dh_prev = dh_prev + keep * dh
            dc_prev = dc_prev + keep * dc
        return t - 1, row_next, dh_prev, dc_prev, dy_carry, dz_ta

    # Without return_sequences only the last output has a gradient: it enters
    # as the carry of the output chain at the last step.
    if return_sequences:
        dy0 = tf.zeros_like(h0)
    else:
        dy0 = d_out
    if not has_mask:
        d_h, dy0 = d_h + dy0, tf.zeros_like(h0)
    _, _, dh0, dc0, _, dz_ta = tf.while_loop(
        lambda t, *_: t >= 0,
        body,
        (steps - 1, packed_ta.read(steps - 1), d_h, d_c, dy0, dz_ta),
        maximum_iterations=steps,
    )
    dz = dz_ta.stack()
    h_prev = tf.concat([h0[None], h[:-1]], axis=0)
    h_prev = tf.concat([h_prev, tf.ones_like(h_prev[..., :1])], axis=-1)
    return dz, tf.reshape(h_prev, [-1, units + 1]), dh0, dc0


_compiled_recurrence = tf.function(_recurrence, jit_compile=True, autograph=False)
_compiled_backward = tf.function(_backward, jit_compile=True, autograph=False)


def shard_count(batch: int | None) -> int:
    """How many batch shards the fused path runs side by side.

    Rows of a batch are independent, and one XLA loop keeps about one core busy
    at the sizes where the per-step product is small: separate XLA calls on
    slices of the batch run concurrently on TensorFlow's inter-op threads.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    inter_op = tf.config.threading.get_inter_op_parallelism_threads() or cores
    shards = max(1, min(cores or 1, inter_op, _MAX_SHARDS))
    if batch is not None and batch < _MIN_SHARD_ROWS * shards:
        return 1
    return shards


_MAX_SHARDS = 2
_MIN_SHARD_ROWS = 8


def split_batch(tensor, shards: int, axis: int = 0) -> list:
    """`shards` slices along the batch axis; sizes differ by at most one (may be 0)."""
    if tensor is None:
        return [None] * shards
    if shards == 1:
        return [tensor]
    batch = tf.shape(tensor)[axis]
    sizes = [(batch + shards - 1 - k) // shards for k in range(shards)]
    return tf.split(tensor, tf.stack(sizes), axis=axis)


def _after_all(tensors: list) -> list:
    """The tensors, each available only once all of them are computed."""
    if len(tensors) == 1:
        return list(tensors)
    with tf.control_dependencies(tensors):
        return [tf.identity(t) for t in tensors]


def _fused(xws, b, r, h0s, c0s, masks, *, zero_output, return_sequences, activation,
           recurrent_activation, training, function_boundary=False):
    """The fused recurrence over batch shards, with its hand-written gradient.

    ``xws``, ``h0s``, ``c0s`` and ``masks`` hold one entry per shard (``masks``
    may be None): each shard is its own XLA call, and TensorFlow runs the calls
    side by side. Returns (result, h, c) joined along the batch axis.

    Training saves one packed row per step for the backward pass. Inference
    runs the lean loop; if a gradient is asked for all the same (saliency,
    gradient-norm studies), it recomputes the forward with saving first.
    TF cannot differentiate the XLA loop itself (its TensorLists may not cross
    the XLA boundary), so this custom gradient is the whole gradient.
    """
    loop = dict(zero_output=zero_output, activation=activation,
                recurrent_activation=recurrent_activation)
    layout = ("derivatives" if _is_standard_activations(activation, recurrent_activation)
              else "gates")
    shards = len(xws)
    masks = [None] * shards if masks is None else list(masks)
    has_mask = masks[0] is not None
    seq_axis = 1 if return_sequences else 0  # batch axis of the result

    @tf.custom_gradient
    def run(*args):
        # Keep the tape out of the XLA functions: it would ask them for their
        # intermediates.
        args = [a if a.dtype == tf.bool else tf.stop_gradient(a) for a in args]
        xws, (b, r), h0s, c0s = (args[:shards], args[shards:shards + 2],
                                 args[shards + 2:2 * shards + 2],
                                 args[2 * shards + 2:3 * shards + 2])
        masks_ = args[3 * shards + 2:] if has_mask else [None] * shards
        # Start no loop before every shard's projection is done: a
        # multi-threaded product running beside a loop slows both.
        xws = _after_all(xws)
        parts = list(zip(xws, h0s, c0s, masks_, strict=True))
        forward = [
            _compiled_recurrence(xw, b, r, h0, c0, mask, return_sequences=return_sequences,
                                 save=layout if training else None, **loop)
            for xw, h0, c0, mask in parts
        ]
        result = tf.concat([f[0] for f in forward], axis=seq_axis)
        h = tf.concat([f[1] for f in forward], axis=0)
        c = tf.concat([f[2] for f in forward], axis=0)

        def grad(d_result, d_h, d_c):
            d_result = tf.zeros_like(result) if d_result is None else d_result
            d_h = tf.zeros_like(h) if d_h is None else d_h
            d_c = tf.zeros_like(c) if d_c is None else d_c
            grads = []
            for (xw, h0, c0, mask), fwd, dres, dh, dc in zip(
                parts, forward, split_batch(d_result, shards, seq_axis),
                split_batch(d_h, shards), split_batch(d_c, shards), strict=True,
            ):
                rows = fwd[3]
                if rows is None:
                    rows = _compiled_recurrence(xw, b, r, h0, c0, mask,
                                                return_sequences=return_sequences,
                                                save=layout, **loop)[3]
                grads.append(_compiled_backward(dres, dh, dc, rows, h0, c0, r, mask,
                                                return_sequences=return_sequences,
                                                layout=layout, **loop))
            # The weight products start once every loop is done. Inside a
            # shard's XLA call, the (U+1, T*B) x (T*B, 4U) product of d_r and d_b
            # competed for the cores with the other shard's loop: two shards'
            # backward calls took 14.3 ms with TensorFlow's default threads and
            # 12.2 ms with one intra-op thread (200 steps x 16 rows x 128 units).
            d_xws = _after_all([g[0] for g in grads])
            units = r.shape[0]
            d_rb = tf.add_n([
                tf.matmul(h_prev_ones, tf.reshape(d_xw, [-1, 4 * units]), transpose_a=True)
                for (_, h_prev_ones, *_), d_xw in zip(grads, d_xws, strict=True)])
            d_r, d_b = d_rb[:units], d_rb[units]
            d_h0s = [g[2] for g in grads]
            d_c0s = [g[3] for g in grads]
            return d_xws + [d_b, d_r] + d_h0s + d_c0s + [None] * (shards if has_mask else 0)

        return (result, h, c), grad

    if function_boundary:
        # Inside a tf.cond branch (the cuDNN fallback) the gradient closure may
        # not capture branch tensors; behind a function boundary TF exports
        # them as the call's intermediates. Only there: under a persistent tape
        # a function boundary makes TF prepare second-order gradients, which
        # would trace into the XLA loops.
        run = tf.function(run, autograph=False)
    return run(*xws, b, r, *h0s, *c0s, *(masks if has_mask else []))


# ---------------------------------------------------------------------------
# cuDNN
# ---------------------------------------------------------------------------


def cudnn_mask_ok(mask) -> tf.Tensor:
    """True when every row is strictly right-padded and has a real step."""
    mask = tf.cast(mask, tf.bool)
    lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    right_padded = tf.sequence_mask(lengths, maxlen=tf.shape(mask)[1])
    return tf.logical_and(
        tf.reduce_all(tf.equal(mask, right_padded)), tf.reduce_all(lengths > 0)
    )


def _cudnn_lstm(inputs, h0, c0, kernel, recurrent_kernel, bias, mask, go_backwards,
                return_sequences, zero_output_for_mask=False):
    """Batch-major LSTM through `CudnnRNNV3`. Returns (last, outputs, [h, c]).

    ``mask`` must be strictly right-padded with no empty row (`cudnn_mask_ok`).
    """
    batch = tf.shape(inputs)[0]
    if mask is None:
        lengths = tf.fill([batch], tf.shape(inputs)[1])
    else:
        lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    weights = tf.split(kernel, 4, axis=1) + tf.split(recurrent_kernel, 4, axis=1)
    # cuDNN adds a second (recurrent) bias; zero it so the maths is Keras's.
    biases = tf.split(tf.concat([tf.zeros_like(bias), bias], 0), 8)
    if tf.sysconfig.get_build_info().get("is_rocm_build", False):
        order = (0, 1, 3, 2, 4, 5, 7, 6)  # MIOpen stores gates i, f, o, c
        weights = [weights[k] for k in order]
        biases = [biases[k] for k in order]
    params = tf.concat([tf.reshape(tf.transpose(w), [-1]) for w in weights]
                       + [tf.reshape(b, [-1]) for b in biases], axis=0)
    if go_backwards:
        inputs = tf.reverse_sequence(inputs, lengths, seq_axis=1, batch_axis=0)
    outputs, h, c, _, _ = tf.raw_ops.CudnnRNNV3(
        input=inputs, input_h=h0[:, None], input_c=c0[:, None], params=params,
        is_training=True, rnn_mode="lstm", sequence_lengths=lengths, time_major=False,
    )
    if go_backwards:
        outputs = tf.reverse(
            tf.reverse_sequence(outputs, lengths, seq_axis=1, batch_axis=0), axis=[1])
    h = h[:, 0]
    c = c[:, 0]
    # cuDNN writes zeros at padded steps. The other paths (and Keras on CPU)
    # repeat the last real output there unless zero_output_for_mask; going
    # backwards the padded steps come first and are zeros on every path.
    if mask is not None and return_sequences and not (zero_output_for_mask or go_backwards):
        outputs = tf.where(tf.cast(mask, tf.bool)[..., None], outputs, h[:, None, :])
    return h, (outputs if return_sequences else h[:, None]), [h, c]


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="lstm_suite", name="LSTM")
class LSTM(keras.layers.LSTM):
    """Long Short-Term Memory layer: `keras.layers.LSTM`, faster.

    A drop-in replacement for `keras.layers.LSTM` (TensorFlow backend) with the
    same arguments, weights (``kernel`` ``(input_dim, 4 * units)``,
    ``recurrent_kernel`` ``(units, 4 * units)``, ``bias`` ``(4 * units,)``,
    gates in the order i, f, c, o) and outputs. Weights move between the two
    with ``get_weights()`` / ``set_weights()``.

    On CPU the loop runs fused and XLA-compiled with a hand-written backward
    pass; on a GPU it uses cuDNN and, unlike Keras, falls back instead of failing
    when a mask is not right-padded. ``execution_path`` reports the path taken.

    Args:
        units: Positive integer, dimensionality of the output space.
        activation: Activation for the cell candidate and output. Default tanh.
        recurrent_activation: Activation for the gates. Default sigmoid.
        use_bias: Whether the layer uses a bias vector. Default True.
        kernel_initializer, recurrent_initializer, bias_initializer: as Keras.
        unit_forget_bias: Add 1 to the forget-gate bias at initialisation.
        kernel_regularizer, recurrent_regularizer, bias_regularizer,
        activity_regularizer: as Keras.
        kernel_constraint, recurrent_constraint, bias_constraint: as Keras.
        dropout: Fraction of input units dropped while training (one mask per
            sequence, as Keras).
        recurrent_dropout: Fraction of recurrent units dropped while training;
            selects the reference path while training.
        seed: Random seed for dropout.
        return_sequences: Return the whole output sequence, not only the last.
        return_state: Also return the final ``h`` and ``c``.
        go_backwards: Process the sequence backwards and return it reversed.
        stateful: Carry the final state of batch ``k`` into batch ``k + 1``.
        unroll: Unroll the loop (reference path).
        use_cudnn: ``"auto"`` uses cuDNN when a GPU and the configuration allow
            it; ``True`` requires it (error otherwise); ``False`` never uses it.

    Example:

    >>> import numpy as np
    >>> from common.lstm import LSTM
    >>> layer = LSTM(4, return_sequences=True, return_state=True)
    >>> seq, h, c = layer(np.random.random((2, 10, 8)).astype("float32"))
    >>> seq.shape, h.shape, c.shape
    (TensorShape([2, 10, 4]), TensorShape([2, 4]), TensorShape([2, 4]))
    >>> layer.execution_path
    'fused'
    """

    def __init__(self, units, *args, use_cudnn="auto", **kwargs):
        super().__init__(units, *args, use_cudnn=use_cudnn, **kwargs)
        self.execution_path: str | None = None
        # Our cuDNN call lives beside an XLA-compiled fallback; nothing here
        # prevents an outer jit_compile on CPU.
        self.supports_jit = not (self.use_cudnn in ("auto", True) and gpu_available())

    # -- validation ---------------------------------------------------------

    def __call__(self, sequences, *args, **kwargs):
        # Checked here, not in call(): a symbolic call (keras.Input) never runs
        # call(), and Keras's InputSpec message does not say what to do.
        self._check_input(getattr(sequences, "shape", None), getattr(sequences, "dtype", None))
        return super().__call__(sequences, *args, **kwargs)

    def build(self, sequences_shape, initial_state_shape=None):
        self._check_input(sequences_shape, None)
        super().build(sequences_shape, initial_state_shape)

    def _check_input(self, shape, dtype) -> None:
        if shape is not None and len(shape) != 3:
            raise ValueError(
                f"LSTM layer '{self.name}' expects input of rank 3 (batch, timesteps, "
                f"features); got shape {tuple(shape)}. Add a time axis, e.g. "
                "x[:, :, None] for one feature per step."
            )
        if shape is not None and shape[-1] is None:
            raise ValueError(
                f"LSTM layer '{self.name}' needs a known feature dimension (the last axis); "
                f"got shape {tuple(shape)}. Give Input(shape=(timesteps, features))."
            )
        if dtype is not None and not tf.as_dtype(dtype).is_floating:
            raise TypeError(
                f"LSTM layer '{self.name}' expects floating-point input; got dtype "
                f"{tf.as_dtype(dtype).name}. Embed integer tokens first (keras.layers."
                "Embedding) or cast the features to float32."
            )

    # -- path selection -----------------------------------------------------

    def _cudnn_config_ok(self, training) -> bool:
        return (
            _is_standard_activations(self.activation, self.recurrent_activation)
            and self.use_bias
            and not self.unroll
            and not (training and self.recurrent_dropout)
        )

    def planned_path(self, training: bool = False) -> str:
        """The path a call would take, before any per-call mask check."""
        elementwise = _is_elementwise(self.activation) and _is_elementwise(
            self.recurrent_activation)
        if self.unroll or (training and self.recurrent_dropout) or not elementwise:
            if self.use_cudnn is True:
                raise ValueError(self._cudnn_refused(
                    "unroll=True, recurrent_dropout or a non-elementwise activation"))
            return "reference"
        if self.use_cudnn in ("auto", True) and self._cudnn_config_ok(training):
            if gpu_available():
                return "cudnn"
        if self.use_cudnn is True:
            reason = "no GPU is visible" if self._cudnn_config_ok(training) else (
                "the configuration needs tanh/sigmoid activations and use_bias=True")
            raise ValueError(self._cudnn_refused(reason))
        return "fused"

    def _cudnn_refused(self, reason: str) -> str:
        return (f"LSTM layer '{self.name}' has use_cudnn=True but cuDNN cannot be used: "
                f"{reason}. Pass use_cudnn='auto' to fall back to the fused implementation.")

    def _record_path(self, path: str) -> None:
        self.execution_path = path
        logger.info("LSTM layer '%s' traced with the %s path", self.name, path)

    # -- the loop -----------------------------------------------------------

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        path = self.planned_path(training)
        if path == "reference":
            self._record_path("reference")
            return keras.layers.RNN.inner_loop(
                self, sequences, initial_state, mask=mask, training=training)
        sequences = self._apply_input_dropout(sequences, training)
        if path == "cudnn":
            return self._cudnn_or_fallback(sequences, initial_state, mask, training)
        self._record_path("fused")
        return self._run_fused(sequences, initial_state, mask, training)

    def _apply_input_dropout(self, sequences, training):
        if training and 0.0 < self.dropout < 1.0:
            # One mask per sequence, shared by all steps, as Keras's cell does.
            dp_mask = self.cell.get_dropout_mask(sequences[:, 0, :])
            return sequences * ops.expand_dims(dp_mask, axis=1)
        return sequences

    def _weights(self, dtype):
        kernel = tf.cast(tf.convert_to_tensor(self.cell.kernel), dtype)
        recurrent = tf.cast(tf.convert_to_tensor(self.cell.recurrent_kernel), dtype)
        bias = None if self.cell.bias is None else tf.cast(
            tf.convert_to_tensor(self.cell.bias), dtype)
        return kernel, recurrent, bias

    def _cudnn_or_fallback(self, sequences, initial_state, mask, training):
        kernel, recurrent, bias = self._weights(sequences.dtype)

        def cudnn():
            return _cudnn_lstm(sequences, initial_state[0], initial_state[1], kernel,
                               recurrent, bias, mask, self.go_backwards,
                               self.return_sequences, bool(self.zero_output_for_mask))

        if mask is None:
            self._record_path("cudnn")
            return cudnn()
        ok = cudnn_mask_ok(mask)
        if tf.executing_eagerly():
            if bool(ok):
                self._record_path("cudnn")
                return cudnn()
            self._record_path("fused")
            return self._run_fused(sequences, initial_state, mask, training)
        # In a graph the mask is only known at run time: both branches are built
        # and the check picks one per call.
        self._record_path("cudnn")
        logger.info("LSTM layer '%s': masks that are not right-padded run the fused path",
                    self.name)
        def fused():
            return self._run_fused(sequences, initial_state, mask, training,
                                   function_boundary=True)

        last, outputs, states = tf.cond(ok, cudnn, fused)
        return last, outputs, list(states)

    def _time_major_projection(self, x, mask, kernel):
        """x (B, T, D) -> x @ kernel as (T, B, 4U), and the mask as (T, B, 1).

        One matrix product for all steps (the bias is added inside the loop);
        both come back in processing order (reversed for go_backwards).
        """
        x_tm = tf.transpose(tf.cast(x, kernel.dtype), (1, 0, 2))
        mask_tm = None if mask is None else tf.transpose(tf.cast(mask, tf.bool))[..., None]
        if self.go_backwards:
            x_tm = tf.reverse(x_tm, [0])
            mask_tm = None if mask_tm is None else tf.reverse(mask_tm, [0])
        # A 2-D product: its gradient runs faster than einsum's on CPU.
        xw = tf.matmul(tf.reshape(x_tm, [-1, x_tm.shape[-1]]), kernel)
        xw = tf.reshape(xw, tf.concat([tf.shape(x_tm)[:2], [4 * self.units]], axis=0))
        return xw, mask_tm

    def _fused_inputs(self, sequences, initial_state, mask, dtype, shards: int):
        """Per-shard projections, states and masks, plus bias and recurrent kernel.

        The batch is split before the projection, so the large (T, B, 4U)
        tensors are never split or joined.
        """
        kernel, recurrent, bias = self._weights(dtype)
        if bias is None:
            bias = tf.zeros([4 * self.units], dtype)
        xws, masks = [], []
        for x, m in zip(split_batch(sequences, shards), split_batch(mask, shards), strict=True):
            xw, mask_tm = self._time_major_projection(x, m, kernel)
            xws.append(xw)
            masks.append(mask_tm)
        h0s = split_batch(tf.cast(initial_state[0], dtype), shards)
        c0s = split_batch(tf.cast(initial_state[1], dtype), shards)
        return xws, bias, recurrent, h0s, c0s, (None if mask is None else masks)

    def _run_fused(self, sequences, initial_state, mask, training, function_boundary=False):
        compute_dtype = sequences.dtype
        # Half precision gains nothing on CPU and loses accuracy over long
        # sequences: run the recurrence in float32 and cast the results back.
        dtype = tf.float32 if compute_dtype in (tf.float16, tf.bfloat16) else compute_dtype
        xws, bias, recurrent, h0s, c0s, masks = self._fused_inputs(
            sequences, initial_state, mask, dtype, shard_count(sequences.shape[0]))
        outputs, h, c = _fused(
            xws, bias, recurrent, h0s, c0s, masks,
            zero_output=bool(self.zero_output_for_mask) and mask is not None,
            return_sequences=self.return_sequences, activation=self.activation,
            recurrent_activation=self.recurrent_activation, training=bool(training),
            function_boundary=function_boundary)
        if self.return_sequences:
            last = outputs[-1]
            outputs = tf.transpose(outputs, (1, 0, 2))
            # The XLA call's output signature may have relaxed the time axis.
            outputs = tf.ensure_shape(outputs, [None, sequences.shape[1], self.units])
        else:
            last = outputs
            outputs = outputs[:, None]
        last, outputs, h, c = (tf.cast(t, compute_dtype) for t in (last, outputs, h, c))
        return last, outputs, [h, c]

    # -- introspection ------------------------------------------------------

    def gate_activations(self, inputs, mask=None, initial_state=None) -> dict[str, tf.Tensor]:
        """Per-step gate activations and states for one batch, in inference mode.

        Args:
            inputs: ``(batch, timesteps, features)`` float tensor, as passed to
                the layer.
            mask: optional ``(batch, timesteps)`` boolean mask.
            initial_state: optional ``[h0, c0]``; zeros (or the stored state of a
                stateful layer, which is left unchanged) otherwise.

        Returns:
            A dict of ``(batch, timesteps, units)`` float32 tensors aligned with
            the input time axis (also for ``go_backwards``): ``input_gate``,
            ``forget_gate``, ``cell_input`` (the candidate g), ``output_gate``,
            ``cell_state`` and ``hidden_state``. At a masked step the states
            repeat the carried values. This is a separate computation, so the
            normal path pays nothing for it.
        """
        x = tf.convert_to_tensor(inputs)
        if not self.built:
            self.build(tuple(x.shape))
        if initial_state is None:
            initial_state = (
                [tf.convert_to_tensor(s) for s in self.states] if self.stateful
                else self.get_initial_state(tf.shape(x)[0]))
        (xw,), bias, recurrent, (h0,), (c0,), masks = self._fused_inputs(
            x, initial_state, mask, tf.float32, shards=1)
        mask_tm = None if masks is None else masks[0]
        _, _, _, saved = _compiled_recurrence(
            xw, bias, recurrent, h0, c0, mask_tm, zero_output=False, return_sequences=True,
            save="gates", activation=self.activation,
            recurrent_activation=self.recurrent_activation,
        )
        has_mask = mask_tm is not None
        act, rec = self.activation, self.recurrent_activation
        fields = {"input_gate": ("i", rec), "forget_gate": ("f", rec), "cell_input": ("g", act),
                  "output_gate": ("o", rec), "cell_state": ("c", None),
                  "hidden_state": ("h", None)}
        result = {}
        for key, (field, fn) in fields.items():
            value = _unpack(saved, field, has_mask)
            value = value if fn is None else fn(value)
            if self.go_backwards:
                value = tf.reverse(value, [0])
            result[key] = tf.transpose(value, (1, 0, 2))
        return result

    # -- config -------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config["use_cudnn"] = self.use_cudnn
        return config

