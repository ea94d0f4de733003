"""Tests for `common.lstm.LSTM`: parity with `keras.layers.LSTM`, paths, config, errors.

Every parity test copies weights between the two layers (``set_weights(get_weights())``)
and compares forward outputs, returned states and gradients with respect to the inputs,
the three weights and any initial state.
"""

from __future__ import annotations

import inspect
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import common.lstm as lstm_mod
from common.lstm import LSTM

pytestmark = pytest.mark.usefixtures("freeze_gc_after_each_test")

ATOL = RTOL = 1e-5
B, T, F, U = 3, 6, 3, 5


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _close(a, b, atol=ATOL, rtol=RTOL, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol, err_msg=what)


def _inputs(batch=B, steps=T, features=F, seed=0, dtype="float32"):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, steps, features)).astype(dtype)


def _states(batch=B, units=U, seed=1, dtype="float32"):
    rng = np.random.RandomState(seed)
    return [rng.uniform(-0.5, 0.5, (batch, units)).astype(dtype) for _ in range(2)]


def _mask(kind, batch=B, steps=T):
    """Boolean (batch, steps) masks of several shapes (None for "none")."""
    if kind == "none":
        return None
    m = np.ones((batch, steps), bool)
    if kind == "right":  # strictly right-padded, varied lengths
        for b, n in enumerate([steps, steps - 2, 1][:batch]):
            m[b, n:] = False
    elif kind == "left":
        for b, n in enumerate([0, 2, steps - 1][:batch]):
            m[b, :n] = False
    elif kind == "mid":
        m[0, 2:4] = False
        m[1, 1] = False
        m[2, 3:] = False
        m[2, 4] = True
    elif kind == "full_row":  # one row fully masked, others right-padded
        m[0, :] = False
        m[1, 3:] = False
    else:  # pragma: no cover
        raise ValueError(kind)
    return m


def _randomize(layer, seed=7):
    rng = np.random.RandomState(seed)
    layer.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(w.dtype)
                       for w in layer.get_weights()])


def _pair(units=U, features=F, steps=T, direction="ours_to_keras", build_shape=None, **kwargs):
    """(ours, keras) layers with identical weights copied in the given direction."""
    ours = LSTM(units, **kwargs)
    ref = keras.layers.LSTM(units, **kwargs)
    shape = build_shape or (None, steps, features)
    ours.build(shape)
    ref.build(shape)
    if direction == "ours_to_keras":
        _randomize(ours)
        ref.set_weights(ours.get_weights())
    else:
        _randomize(ref)
        ours.set_weights(ref.get_weights())
    return ours, ref


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _loss(outputs):
    """A loss touching every output with fixed random weights."""
    total = tf.constant(0.0, tf.float64)
    for k, o in enumerate(outputs):
        w = tf.random.stateless_uniform(tf.shape(o), seed=[100 + k, 7], minval=-1.0,
                                        maxval=1.0, dtype=tf.float64)
        total = total + tf.reduce_sum(tf.cast(o, tf.float64) * w)
    return total


def _run(layer, x, mask=None, initial_state=None, training=False, weights=None):
    """Forward + gradients. Returns (outputs, grads dict)."""
    x = tf.convert_to_tensor(x)
    init = None if initial_state is None else [tf.convert_to_tensor(s) for s in initial_state]
    weights = list(layer.trainable_weights) if weights is None else weights
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        if init is not None:
            for s in init:
                tape.watch(s)
        kwargs = {"training": training}
        if mask is not None:
            kwargs["mask"] = tf.convert_to_tensor(mask)
        if init is not None:
            kwargs["initial_state"] = init
        outs = _as_list(layer(x, **kwargs))
        loss = _loss(outs)
    grads = {"x": tape.gradient(loss, x)}
    for k, w in enumerate(weights):
        grads[f"w{k}_{w.path.split('/')[-1]}"] = tape.gradient(loss, w)
    if init is not None:
        grads["h0"], grads["c0"] = tape.gradient(loss, init)
    del tape
    return outs, grads


def _grads_by_role(layer, grads):
    """Gradients keyed by role: x, h0, c0 and w<k>_<kernel|recurrent_kernel|bias>."""
    return grads


def _assert_parity(ours, ref, x, mask=None, initial_state=None, training=False,
                   atol=ATOL, rtol=RTOL):
    # Forward alone first (no tape), so a forward mismatch is reported as such.
    kwargs = {"training": training}
    if mask is not None:
        kwargs["mask"] = mask
    if initial_state is not None:
        kwargs["initial_state"] = [tf.constant(s) for s in initial_state]
    saved = [[np.asarray(v) for v in layer.states] if getattr(layer, "stateful", False)
             and layer.states is not None else None for layer in (ours, ref)]
    fo, fr = _as_list(ours(x, **kwargs)), _as_list(ref(x, **kwargs))
    assert len(fo) == len(fr)
    if not (training and (getattr(ours, "dropout", 0) or getattr(ours, "recurrent_dropout", 0))):
        for k, (a, b) in enumerate(zip(fo, fr, strict=True)):
            assert tuple(a.shape) == tuple(b.shape), (k, a.shape, b.shape)
            _close(a, b, atol, rtol, what=f"forward-only output {k}")
    for layer, snapshot in zip((ours, ref), saved, strict=True):  # roll stateful layers back
        if snapshot is not None:
            for v, value in zip(layer.states, snapshot, strict=True):
                v.assign(value)
    o_out, o_grads = _run(ours, x, mask, initial_state, training)
    r_out, r_grads = _run(ref, x, mask, initial_state, training)
    assert len(o_out) == len(r_out)
    for k, (a, b) in enumerate(zip(o_out, r_out, strict=True)):
        assert tuple(a.shape) == tuple(b.shape), (k, a.shape, b.shape)
        _close(a, b, atol, rtol, what=f"output {k}")
    og, rg = _grads_by_role(ours, o_grads), _grads_by_role(ref, r_grads)
    assert set(og) == set(rg)
    for name in og:
        assert og[name] is not None, f"no gradient for {name} (ours)"
        assert rg[name] is not None, f"no gradient for {name} (keras)"
        assert np.all(np.isfinite(np.asarray(og[name]))), name
        _close(og[name], rg[name], atol, rtol, what=f"gradient {name}")
    return o_out, o_grads


# ---------------------------------------------------------------------------
# parity with keras.layers.LSTM
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_parity_no_mask(return_sequences, return_state, go_backwards, training):
    # Weights are copied ours->keras in half of the cases and keras->ours in the rest.
    direction = "ours_to_keras" if return_state == go_backwards else "keras_to_ours"
    ours, ref = _pair(direction=direction, return_sequences=return_sequences,
                      return_state=return_state, go_backwards=go_backwards)
    out, _ = _assert_parity(ours, ref, _inputs(), training=training)
    assert len(out) == (3 if return_state else 1)
    assert ours.execution_path == "fused"


@pytest.mark.parametrize("mask_kind", ["right", "left", "mid", "full_row"])
@pytest.mark.parametrize("return_sequences,go_backwards", [(True, False), (False, True)])
@pytest.mark.parametrize("training", [False, True])
def test_parity_with_mask(mask_kind, return_sequences, go_backwards, training):
    ours, ref = _pair(return_sequences=return_sequences, return_state=True,
                      go_backwards=go_backwards,
                      direction="keras_to_ours" if training else "ours_to_keras")
    _assert_parity(ours, ref, _inputs(), mask=_mask(mask_kind), training=training)


@pytest.mark.parametrize("mask_kind,return_sequences,go_backwards", [
    ("none", False, False), ("right", True, True), ("mid", True, False),
    ("full_row", False, True)])
@pytest.mark.parametrize("training", [False, True])
def test_parity_initial_state(mask_kind, return_sequences, go_backwards, training):
    ours, ref = _pair(return_sequences=return_sequences, return_state=True,
                      go_backwards=go_backwards)
    _, grads = _assert_parity(ours, ref, _inputs(), mask=_mask(mask_kind),
                              initial_state=_states(), training=training)
    assert float(tf.reduce_sum(tf.abs(grads["h0"]))) > 0.0
    assert float(tf.reduce_sum(tf.abs(grads["c0"]))) > 0.0


@pytest.mark.parametrize("training", [False, True])
def test_parity_zero_output_for_mask(training):
    ours, ref = _pair(return_sequences=True, return_state=True, zero_output_for_mask=True)
    _assert_parity(ours, ref, _inputs(), mask=_mask("mid"), training=training)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_parity_use_bias_false(training, return_sequences):
    ours, ref = _pair(use_bias=False, return_sequences=return_sequences, return_state=True)
    assert len(ours.trainable_weights) == 2
    _assert_parity(ours, ref, _inputs(), mask=_mask("mid"), training=training)
    assert ours.execution_path == "fused"


@pytest.mark.parametrize("activation,recurrent_activation", [
    ("relu", "hard_sigmoid"),
    ("tanh", "hard_sigmoid"),
    ("relu", "sigmoid"),
])
@pytest.mark.parametrize("training", [False, True])
def test_parity_nonstandard_activations(activation, recurrent_activation, training):
    mask_kind = "mid" if training else "none"
    ours, ref = _pair(activation=activation, recurrent_activation=recurrent_activation,
                      return_sequences=True, return_state=True)
    _assert_parity(ours, ref, _inputs(), mask=_mask(mask_kind), training=training)
    assert ours.execution_path == "fused"


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_parity_unroll(training, go_backwards):
    ours, ref = _pair(unroll=True, return_sequences=True, return_state=True,
                      go_backwards=go_backwards)
    _assert_parity(ours, ref, _inputs(), mask=_mask("mid"), training=training)
    assert ours.execution_path == "reference"
    assert ours.planned_path(training) == "reference"


@pytest.mark.parametrize("training", [False, True])
def test_parity_softmax_activation(training):
    """A non-elementwise activation goes through Keras's own loop."""
    ours, ref = _pair(activation="softmax", return_sequences=True, return_state=True)
    assert ours.planned_path(training) == "reference"
    _assert_parity(ours, ref, _inputs(), mask=_mask("mid"), training=training)
    assert ours.execution_path == "reference"


def test_recurrent_dropout():
    ours, ref = _pair(recurrent_dropout=0.5, return_sequences=True, return_state=True)
    x = _inputs()
    # Inference: no dropout, fused path, equal to Keras.
    _assert_parity(ours, ref, x, mask=_mask("mid"), training=False)
    assert ours.execution_path == "fused"
    # Training: reference path; runs, differs from inference, gradients finite.
    out_train, grads = _run(ours, x, training=True)
    assert ours.execution_path == "reference"
    assert ours.planned_path(training=True) == "reference"
    out_inf = _as_list(ours(x, training=False))
    assert not np.allclose(out_train[0], out_inf[0])
    for g in grads.values():
        assert g is not None and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("return_sequences", [False, True])
def test_dropout(return_sequences):
    ours, ref = _pair(dropout=0.5, return_sequences=return_sequences, return_state=True,
                      seed=3)
    x = _inputs()
    # Inference: equal to Keras (no dropout applied).
    _assert_parity(ours, ref, x, mask=_mask("right"), training=False)
    out_train, grads = _run(ours, x, training=True)
    assert ours.execution_path == "fused"
    out_inf = _as_list(ours(x, training=False))
    assert not np.allclose(out_train[0], out_inf[0])
    for name, g in grads.items():
        assert g is not None, name
        assert np.all(np.isfinite(np.asarray(g))), name
    # The dropout mask is shared by all steps (one mask per sequence), so some
    # input feature of some row gets a zero gradient at every step at once.
    gx = np.asarray(grads["x"])
    assert np.any(np.all(gx == 0.0, axis=1))


def test_variable_batch_size():
    ours, ref = _pair(return_sequences=True, return_state=True)
    for batch in (3, 5, 3):
        x = _inputs(batch=batch, seed=batch)
        mask = np.ones((batch, T), bool)
        mask[0, 4:] = False
        for training in (False, True):
            _assert_parity(ours, ref, x, mask=mask, training=training)


def test_variable_batch_size_in_tf_function():
    ours, ref = _pair(return_sequences=True)

    @tf.function(reduce_retracing=True)
    def f(layer_fn, x):
        return layer_fn(x)

    for batch in (3, 5):
        x = _inputs(batch=batch, seed=batch)
        _close(f(ours, x), ref(x))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_graph_mode_static_shapes(training, with_mask):
    """Inside a tf.function the outputs keep Keras's static shapes (time axis included)."""
    x = tf.constant(_inputs())
    m = tf.constant(_mask("mid")) if with_mask else None
    shapes = []
    for cls in (LSTM, keras.layers.LSTM):
        layer = cls(U, return_sequences=True, return_state=True)
        fn = tf.function(lambda x, layer=layer: layer(x, mask=m, training=training))
        outs = fn.get_concrete_function(x).structured_outputs
        shapes.append([tuple(o.shape) for o in outs])
    assert shapes[0] == shapes[1] == [(B, T, U), (B, U), (B, U)]


@pytest.mark.parametrize("return_sequences", [False, True])
def test_stateful(return_sequences):
    ours, ref = _pair(stateful=True, return_sequences=return_sequences, return_state=True,
                      build_shape=(B, T, F))
    x1, x2 = _inputs(seed=11), _inputs(seed=12)
    _assert_parity(ours, ref, x1)
    for a, b in zip(ours.states, ref.states, strict=True):
        _close(a, b, what="state after batch 1")
    assert float(tf.reduce_sum(tf.abs(ours.states[0]))) > 0.0
    _assert_parity(ours, ref, x2)  # carries the state of batch 1
    for a, b in zip(ours.states, ref.states, strict=True):
        _close(a, b, what="state after batch 2")
    carried = _as_list(ours(x2))[0]
    ours.reset_state()
    ref.reset_state()
    for s in ours.states:
        _close(s, np.zeros(s.shape))
    fresh_ours = _as_list(ours(x2))[0]
    fresh_ref = _as_list(ref(x2))[0]
    _close(fresh_ours, fresh_ref)
    assert not np.allclose(carried, fresh_ours)
    # After reset, a fresh non-stateful layer with the same weights agrees.
    plain = LSTM(U, return_sequences=return_sequences)
    plain.build((None, T, F))
    plain.set_weights(ours.get_weights())
    _close(plain(x2), fresh_ours)


def test_stateful_training_mode_state_carried():
    ours, ref = _pair(stateful=True, return_sequences=True, build_shape=(B, T, F))
    _assert_parity(ours, ref, _inputs(seed=11), training=True)
    _assert_parity(ours, ref, _inputs(seed=12), mask=_mask("right"), training=True)
    for a, b in zip(ours.states, ref.states, strict=True):
        _close(a, b)


def _bidi_pair(merge_mode, return_sequences, return_state=False, direction="ours_to_keras"):
    ours = keras.layers.Bidirectional(
        LSTM(U, return_sequences=return_sequences, return_state=return_state),
        merge_mode=merge_mode)
    ref = keras.layers.Bidirectional(
        keras.layers.LSTM(U, return_sequences=return_sequences, return_state=return_state),
        merge_mode=merge_mode)
    ours.build((None, T, F))
    ref.build((None, T, F))
    assert isinstance(ours.forward_layer, LSTM) and isinstance(ours.backward_layer, LSTM)
    assert ours.backward_layer.go_backwards
    src, dst = (ours, ref) if direction == "ours_to_keras" else (ref, ours)
    _randomize(src)
    dst.set_weights(src.get_weights())
    return ours, ref


@pytest.mark.parametrize("merge_mode", ["sum", "concat"])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_bidirectional(merge_mode, return_sequences, training):
    mask_kind = "mid" if return_sequences else "right"
    ours, ref = _bidi_pair(merge_mode, return_sequences,
                           direction="keras_to_ours" if training else "ours_to_keras")
    _assert_parity(ours, ref, _inputs(), mask=_mask(mask_kind), training=training)


def test_bidirectional_no_mask():
    ours, ref = _bidi_pair("concat", True)
    _assert_parity(ours, ref, _inputs(), training=True)


@pytest.mark.parametrize("training", [False, True])
def test_bidirectional_return_state(training):
    ours, ref = _bidi_pair("concat", True, return_state=True)
    out, _ = _assert_parity(ours, ref, _inputs(), mask=_mask("right"), training=training)
    assert len(out) == 5


@pytest.mark.parametrize("training", [False, True])
def test_float64(training):
    ours, ref = _pair(dtype="float64", return_sequences=True, return_state=True)
    assert ours.compute_dtype == "float64"
    x = _inputs(dtype="float64")
    out, _ = _assert_parity(ours, ref, x, mask=_mask("mid"), training=training,
                            atol=1e-10, rtol=1e-10)
    assert all(o.dtype == tf.float64 for o in out)


@pytest.mark.parametrize("training", [False, True])
def test_mixed_precision(training):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        ours, ref = _pair(return_sequences=True, return_state=True)
        assert ours.compute_dtype == "float16"
        assert ours.variable_dtype == "float32"
        x = _inputs()
        o_out, o_grads = _run(ours, x, mask=_mask("mid"), training=training)
        r_out, r_grads = _run(ref, x, mask=_mask("mid"), training=training)
        for a, b in zip(o_out, r_out, strict=True):
            assert a.dtype == tf.float16
            assert tuple(a.shape) == tuple(b.shape)
            _close(tf.cast(a, tf.float32), tf.cast(b, tf.float32), atol=1e-2, rtol=1e-2)
        og, rg = _grads_by_role(ours, o_grads), _grads_by_role(ref, r_grads)
        for name in og:
            assert og[name] is not None, name
            _close(tf.cast(og[name], tf.float32), tf.cast(rg[name], tf.float32),
                   atol=2e-2, rtol=2e-2, what=name)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------
# inside models (Masking / Embedding masks)
# ---------------------------------------------------------------------------


def _masking_model(layer_cls, return_sequences):
    inp = keras.Input((T, F))
    h = keras.layers.Masking(mask_value=0.0)(inp)
    h = layer_cls(U, return_sequences=return_sequences)(h)
    out = keras.layers.Dense(2)(h)
    return keras.Model(inp, out)


def _embedding_model(layer_cls, return_sequences, bidirectional=False):
    inp = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(10, F, mask_zero=True)(inp)
    rnn = layer_cls(U, return_sequences=return_sequences)
    if bidirectional:
        rnn = keras.layers.Bidirectional(rnn)
    h = rnn(h)
    out = keras.layers.Dense(2)(h)
    return keras.Model(inp, out)


def _model_parity(ours_model, ref_model, x, training):
    _randomize(ours_model, seed=5)
    ref_model.set_weights(ours_model.get_weights())
    _assert_model_grads(ours_model, ref_model, x, training)
    # And the other direction.
    _randomize(ref_model, seed=6)
    ours_model.set_weights(ref_model.get_weights())
    _assert_model_grads(ours_model, ref_model, x, training)


def _assert_model_grads(ours_model, ref_model, x, training):
    res = []
    for m in (ours_model, ref_model):
        with tf.GradientTape() as tape:
            y = m(x, training=training)
            loss = _loss([y])
        res.append((y, tape.gradient(loss, m.trainable_weights)))
    (yo, go), (yr, gr) = res
    _close(yo, yr, what="model output")
    assert len(go) == len(gr)
    for a, b, w in zip(go, gr, ours_model.trainable_weights, strict=True):
        assert a is not None, w.path
        _close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), what=w.path)


@pytest.mark.parametrize("return_sequences,training", [(False, True), (True, False)])
def test_masking_layer_model(return_sequences, training):
    x = _inputs(batch=4)
    x[0, 4:] = 0.0  # right padding
    x[1, :2] = 0.0  # left padding
    x[2, 2:4] = 0.0  # a gap
    x[3, :] = 0.0  # fully masked row
    _model_parity(_masking_model(LSTM, return_sequences),
                  _masking_model(keras.layers.LSTM, return_sequences), x, training)


@pytest.mark.parametrize("return_sequences,bidirectional,training", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, False)])
def test_embedding_mask_zero_model(return_sequences, bidirectional, training):
    tokens = np.array([[1, 2, 3, 4, 0, 0],
                       [0, 0, 5, 6, 7, 8],
                       [9, 0, 0, 2, 3, 0],
                       [4, 5, 6, 7, 8, 9]], "int32")
    _model_parity(_embedding_model(LSTM, return_sequences, bidirectional),
                  _embedding_model(keras.layers.LSTM, return_sequences, bidirectional),
                  tokens, training)


def _fit_data(n=32):
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (n, T, F)).astype("float32")
    y = np.stack([x[:, :, 0].sum(1), x[:, -1, 1]], axis=1).astype("float32")
    return x, y


def _check_fit(model, x, y):
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    hist = model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    losses = hist.history["loss"]
    assert len(losses) == 2
    assert np.all(np.isfinite(losses))
    assert losses[1] < losses[0], losses
    return model


def test_fit_sequential():
    x, y = _fit_data()
    model = keras.Sequential([
        keras.Input((T, F)),
        LSTM(6, return_sequences=True),
        LSTM(U, dropout=0.1),
        keras.layers.Dense(2),
    ])
    _check_fit(model, x, y)
    assert model.layers[0].execution_path == "fused"
    assert model.predict(x[:3], verbose=0).shape == (3, 2)


def test_fit_functional_masked():
    x, y = _fit_data()
    x[::3, 4:] = 0.0
    inp = keras.Input((T, F))
    h = keras.layers.Masking()(inp)
    h = LSTM(U, return_sequences=True, go_backwards=True)(h)
    h = LSTM(U)(h)
    out = keras.layers.Dense(2)(h)
    _check_fit(keras.Model(inp, out), x, y)


def test_fit_jit_compile():
    x, y = _fit_data()
    model = keras.Sequential([keras.Input((T, F)), LSTM(U), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=True)
    hist = model.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    assert hist.history["loss"][1] < hist.history["loss"][0]


def test_fit_matches_keras_one_step():
    """One SGD step moves our weights exactly as it moves Keras's."""
    x, y = _fit_data(8)
    models = []
    for cls in (LSTM, keras.layers.LSTM):
        models.append(keras.Sequential([keras.Input((T, F)), cls(U), keras.layers.Dense(2)]))
    _randomize(models[0], seed=3)
    models[1].set_weights(models[0].get_weights())
    for m in models:
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        m.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        _close(a, b)


# ---------------------------------------------------------------------------
# path selection with a simulated GPU
# ---------------------------------------------------------------------------


def _reference_cudnn(inputs, h0, c0, kernel, recurrent_kernel, bias, mask, go_backwards,
                     return_sequences, zero_output_for_mask=False):
    """Keras's own loop with tanh/sigmoid, in `_cudnn_lstm`'s return convention
    ``(last_output, outputs, [h, c])``, outputs (B, T, U) or (B, 1, U)."""
    from keras.src.backend.tensorflow.rnn import rnn

    def step(x_t, states):
        h, c = states
        z = tf.matmul(x_t, kernel) + tf.matmul(h, recurrent_kernel) + bias
        i, f, g, o = tf.split(z, 4, axis=-1)
        c_new = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h_new = tf.sigmoid(o) * tf.tanh(c_new)
        return h_new, [h_new, c_new]

    last, outputs, states = rnn(step, inputs, [h0, c0], go_backwards=go_backwards, mask=mask,
                                return_all_outputs=return_sequences,
                                zero_output_for_mask=zero_output_for_mask)
    if not return_sequences:
        outputs = last[:, None]
    return last, outputs, list(states)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU is visible; `_cudnn_lstm` becomes a recording reference.

    Each recorded call is the dict of arguments bound to the real signature."""
    calls = []
    real_signature = inspect.signature(lstm_mod._cudnn_lstm)

    def fake(*args, **kwargs):
        bound = real_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        known = inspect.signature(_reference_cudnn).parameters
        return _reference_cudnn(**{k: v for k, v in bound.arguments.items() if k in known})

    monkeypatch.setattr(lstm_mod, "gpu_available", lambda: True)
    monkeypatch.setattr(lstm_mod, "_cudnn_lstm", fake)
    return calls


def test_fake_cudnn_matches_keras():
    """The stand-in used below agrees with keras.layers.LSTM itself."""
    ours, ref = _pair(return_sequences=True, return_state=True, go_backwards=True)
    x, m = _inputs(), _mask("right")
    out = _reference_cudnn(tf.constant(x), tf.zeros((B, U)), tf.zeros((B, U)),
                           ours.cell.kernel, ours.cell.recurrent_kernel, ours.cell.bias,
                           tf.constant(m), True, True)
    expected = ref(x, mask=m)
    _close(out[1], expected[0])
    _close(out[2][0], expected[1])
    _close(out[2][1], expected[2])


@pytest.mark.parametrize("return_sequences,go_backwards,training", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, False)])
def test_cudnn_path_selected(fake_gpu, return_sequences, go_backwards, training):
    ours, ref = _pair(return_sequences=return_sequences, return_state=True,
                      go_backwards=go_backwards)
    assert ours.planned_path(training) == "cudnn"
    _assert_parity(ours, ref, _inputs(), initial_state=_states(), training=training)
    assert ours.execution_path == "cudnn"
    assert len(fake_gpu) == 2  # the forward-only call and the taped call
    for call in fake_gpu:
        assert call["mask"] is None
        assert call["go_backwards"] == go_backwards
        assert call["return_sequences"] == return_sequences


@pytest.mark.parametrize("go_backwards,return_sequences", [(False, True), (True, False)])
def test_cudnn_right_padded_mask_uses_cudnn(fake_gpu, go_backwards, return_sequences):
    ours, ref = _pair(return_sequences=return_sequences, return_state=True,
                      go_backwards=go_backwards)
    _assert_parity(ours, ref, _inputs(), mask=_mask("right"), training=True)
    assert ours.execution_path == "cudnn"
    assert len(fake_gpu) == 2  # the forward-only call and the taped call
    for call in fake_gpu:
        np.testing.assert_array_equal(np.asarray(call["mask"]), _mask("right"))


@pytest.mark.parametrize("mask_kind", ["left", "mid", "full_row"])
@pytest.mark.parametrize("training", [False, True])
def test_cudnn_bad_mask_falls_back_eager(fake_gpu, mask_kind, training):
    ours, ref = _pair(return_sequences=True, return_state=True)
    assert not bool(lstm_mod.cudnn_mask_ok(_mask(mask_kind)))
    _assert_parity(ours, ref, _inputs(), mask=_mask(mask_kind), training=training)
    assert ours.execution_path == "fused"
    assert fake_gpu == []


@pytest.mark.parametrize("mask_kind,training", [
    ("right", False), ("mid", False), ("right", True), ("left", True), ("mid", True),
    ("full_row", True)])
def test_cudnn_graph_mode_mask(fake_gpu, mask_kind, training):
    ours, ref = _pair(return_sequences=True, return_state=True)
    x, m = tf.constant(_inputs()), tf.constant(_mask(mask_kind))

    @tf.function
    def run(layer, x, m):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outs = layer(x, mask=m, training=training)
            loss = _loss(outs)
        return outs, tape.gradient(loss, [x] + list(layer.trainable_weights))

    o_out, o_grads = run(ours, x, m)
    r_out, r_grads = run(ref, x, m)
    for a, b in zip(o_out, r_out, strict=True):
        _close(a, b)
    for a, b in zip(o_grads, r_grads, strict=True):
        _close(a, b)
    assert ours.execution_path == "cudnn"  # the traced plan; the cond decides at run time
    assert len(fake_gpu) >= 1  # traced into the cond's cuDNN branch


def test_cudnn_graph_mode_same_function_both_masks(fake_gpu):
    """One trace, good and bad masks at run time: both correct."""
    ours, ref = _pair(return_sequences=True)

    @tf.function(input_signature=[tf.TensorSpec((B, T, F)), tf.TensorSpec((B, T), tf.bool)])
    def run(x, m):
        return ours(x, mask=m)

    x = _inputs()
    for kind in ("right", "mid", "left", "full_row", "right"):
        _close(run(x, _mask(kind)), ref(x, mask=_mask(kind)), what=kind)


def test_cudnn_fit_model(fake_gpu):
    x, y = _fit_data()
    model = keras.Sequential([keras.Input((T, F)), LSTM(U), keras.layers.Dense(2)])
    _check_fit(model, x, y)
    assert model.layers[0].execution_path == "cudnn"
    assert fake_gpu


def test_cudnn_fit_masked_model(fake_gpu):
    """model.fit runs in a tf.function: the mask check becomes a tf.cond whose
    fused branch must be differentiable in training."""
    x, y = _fit_data()
    x[::2, 4:] = 0.0  # right padding: the cuDNN branch at run time
    x[1::4, :2] = 0.0  # left padding in some batches: the fused branch
    model = keras.Sequential([keras.Input((T, F)), keras.layers.Masking(), LSTM(U),
                              keras.layers.Dense(2)])
    _check_fit(model, x, y)
    assert model.layers[1].execution_path == "cudnn"
    assert fake_gpu


@pytest.mark.parametrize("kwargs", [
    {"activation": "relu"},
    {"recurrent_activation": "hard_sigmoid"},
    {"use_bias": False},
    {"unroll": True},
])
def test_cudnn_not_used_for_unsupported_config(fake_gpu, kwargs):
    ours, ref = _pair(return_sequences=True, **kwargs)
    expected = "reference" if kwargs.get("unroll") else "fused"
    assert ours.planned_path(False) == expected
    _assert_parity(ours, ref, _inputs(), mask=_mask("right"))
    assert ours.execution_path == expected
    assert fake_gpu == []


def test_cudnn_use_cudnn_false(fake_gpu):
    ours, ref = _pair(return_sequences=True, use_cudnn=False)
    assert ours.planned_path(False) == "fused"
    assert ours.planned_path(True) == "fused"
    _assert_parity(ours, ref, _inputs(), training=True)
    assert ours.execution_path == "fused"
    assert fake_gpu == []


def test_cudnn_use_cudnn_true_with_gpu(fake_gpu):
    ours, ref = _pair(return_sequences=True)  # keras's own use_cudnn=True raises on CPU
    ours = LSTM.from_config({**ours.get_config(), "use_cudnn": True})
    ours.build((None, T, F))
    ours.set_weights(ref.get_weights())
    assert ours.planned_path(False) == "cudnn"
    assert ours.planned_path(True) == "cudnn"
    _assert_parity(ours, ref, _inputs())
    assert ours.execution_path == "cudnn"


def test_cudnn_recurrent_dropout_training(fake_gpu):
    ours, _ = _pair(return_sequences=True, recurrent_dropout=0.3)
    assert ours.planned_path(training=True) == "reference"
    assert ours.planned_path(training=False) == "cudnn"
    ours(_inputs(), training=True)
    assert ours.execution_path == "reference"
    assert fake_gpu == []
    ours(_inputs(), training=False)
    assert ours.execution_path == "cudnn"
    assert len(fake_gpu) == 1


def test_cudnn_dropout_training_runs(fake_gpu):
    ours, _ = _pair(return_sequences=True, dropout=0.5)
    x = _inputs()
    out_train, grads = _run(ours, x, training=True)
    assert ours.execution_path == "cudnn"
    assert not np.allclose(out_train[0], ours(x, training=False))
    for g in grads.values():
        assert np.all(np.isfinite(np.asarray(g)))


def test_use_cudnn_true_without_gpu_is_clear_error(monkeypatch):
    monkeypatch.setattr(lstm_mod, "gpu_available", lambda: False)
    layer = LSTM(U, use_cudnn=True)
    with pytest.raises(ValueError, match="use_cudnn=True") as err:
        layer(_inputs())
    assert "GPU" in str(err.value)
    with pytest.raises(ValueError, match="GPU"):
        layer.planned_path(False)


@pytest.mark.parametrize("kwargs,needle", [
    ({"activation": "relu"}, "tanh/sigmoid"),
    ({"use_bias": False}, "use_bias"),
    ({"unroll": True}, "unroll"),
])
def test_use_cudnn_true_unsupported_config_is_clear_error(fake_gpu, kwargs, needle):
    layer = LSTM(U, use_cudnn=True, **kwargs)
    with pytest.raises(ValueError, match="use_cudnn=True") as err:
        layer(_inputs())
    assert needle in str(err.value)


def test_no_gpu_auto_is_fused(monkeypatch):
    monkeypatch.setattr(lstm_mod, "gpu_available", lambda: False)
    layer = LSTM(U)
    assert layer.planned_path(False) == "fused"
    assert layer.planned_path(True) == "fused"
    assert layer.execution_path is None
    layer(_inputs())
    assert layer.execution_path == "fused"


def test_execution_path_logged(caplog, fake_gpu):
    layer = LSTM(U, name="logged_lstm")
    with caplog.at_level(logging.INFO, logger="lstm_suite"):
        layer(_inputs())
        layer(_inputs(), mask=_mask("mid"))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lstm_suite"]
    assert any("logged_lstm" in m and "cudnn" in m for m in msgs), msgs
    assert any("logged_lstm" in m and "fused" in m for m in msgs), msgs
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "lstm_suite")


def test_execution_path_logged_reference(caplog):
    layer = LSTM(U, unroll=True, name="unrolled_lstm")
    with caplog.at_level(logging.INFO, logger="lstm_suite"):
        layer(_inputs())
    assert layer.execution_path == "reference"
    assert any("unrolled_lstm" in r.getMessage() and "reference" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------
# config and serialization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_cudnn", ["auto", True, False])
def test_config_round_trip(use_cudnn):
    layer = LSTM(U, activation="relu", recurrent_activation="hard_sigmoid", use_bias=True,
                 dropout=0.2, recurrent_dropout=0.1, return_sequences=True,
                 return_state=True, go_backwards=True, stateful=False, unroll=False,
                 unit_forget_bias=False, seed=5, use_cudnn=use_cudnn, name="cfg")
    config = layer.get_config()
    assert config["use_cudnn"] == use_cudnn
    clone = LSTM.from_config(config)
    assert type(clone) is LSTM
    assert clone.get_config() == config
    assert clone.use_cudnn == use_cudnn
    # Keras's LSTM config keys are a subset of ours.
    ref_config = keras.layers.LSTM(U).get_config()
    assert set(ref_config) <= set(config)


def test_serialize_keras_object():
    layer = LSTM(U, return_sequences=True, use_cudnn=False)
    layer.build((None, T, F))
    _randomize(layer)
    blob = keras.saving.serialize_keras_object(layer)
    assert blob["registered_name"] == "lstm_suite>LSTM"
    clone = keras.saving.deserialize_keras_object(blob)
    assert type(clone) is LSTM
    assert clone.use_cudnn is False
    assert clone.return_sequences
    clone.build((None, T, F))
    clone.set_weights(layer.get_weights())
    _close(clone(_inputs()), layer(_inputs()))
    # And via the registered name lookup.
    assert keras.saving.get_registered_object("lstm_suite>LSTM") is LSTM


def test_weights_names_and_shapes_match_keras():
    ours, ref = _pair()
    assert [w.shape for w in ours.weights] == [w.shape for w in ref.weights]
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in ref.weights]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_error_rank_2_input():
    with pytest.raises(ValueError, match="rank 3"):
        LSTM(U)(np.zeros((B, T), "float32"))


def test_error_rank_2_symbolic_input():
    with pytest.raises(ValueError, match="rank 3"):
        LSTM(U)(keras.Input((T,)))


def test_error_rank_2_build():
    with pytest.raises(ValueError, match="rank 3"):
        LSTM(U).build((B, T))


def test_error_unknown_feature_dim():
    with pytest.raises(ValueError, match="feature dimension") as err:
        LSTM(U)(keras.Input(shape=(None, None)))
    assert "(None, None, None)" in str(err.value)


def test_error_integer_input():
    with pytest.raises(TypeError, match="floating-point") as err:
        LSTM(U)(np.zeros((B, T, F), "int32"))
    assert "int32" in str(err.value)


def test_error_integer_input_in_model():
    # Raised while the model is built, before any data is fed.
    with pytest.raises(TypeError, match="floating-point"):
        keras.Sequential([keras.Input((T, F), dtype="int32"), LSTM(U)])


def test_error_integer_symbolic_input():
    """Building a functional model on an int32 Input should fail at once, not later
    inside predict/fit (the dtype check lives in call(), which symbolic calls skip)."""
    with pytest.raises(TypeError, match="floating-point"):
        LSTM(U)(keras.Input((T, F), dtype="int32"))


def test_error_invalid_use_cudnn():
    with pytest.raises(ValueError, match="use_cudnn"):
        LSTM(U, use_cudnn="sometimes")


# ---------------------------------------------------------------------------
# gate_activations
# ---------------------------------------------------------------------------

GATE_KEYS = ("input_gate", "forget_gate", "cell_input", "output_gate", "cell_state",
             "hidden_state")


def _layer(**kwargs):
    layer = LSTM(U, return_sequences=True, **kwargs)
    layer.build((None, T, F))
    _randomize(layer)
    return layer


def test_gate_activations_shapes_and_ranges():
    layer = _layer()
    gates = layer.gate_activations(_inputs())
    assert set(gates) == set(GATE_KEYS)
    for k in GATE_KEYS:
        assert tuple(gates[k].shape) == (B, T, U), k
        assert gates[k].dtype == tf.float32, k
    for k in ("input_gate", "forget_gate", "output_gate"):
        g = np.asarray(gates[k])
        assert np.all((g > 0) & (g < 1)), k
    assert np.all(np.abs(np.asarray(gates["cell_input"])) < 1)


def test_gate_activations_unbuilt_layer():
    layer = LSTM(U)
    gates = layer.gate_activations(_inputs())
    assert layer.built
    assert tuple(gates["hidden_state"].shape) == (B, T, U)


@pytest.mark.parametrize("go_backwards", [False, True])
def test_gate_activations_match_layer_output(go_backwards):
    layer = _layer(go_backwards=go_backwards)
    x = _inputs()
    gates = layer.gate_activations(x)
    seq = np.asarray(layer(x))
    # The layer returns outputs in processing order (reversed for go_backwards);
    # gate_activations are aligned with the input time axis.
    expected = seq[:, ::-1] if go_backwards else seq
    _close(gates["hidden_state"], expected)
    # And with keras's own layer.
    ref = keras.layers.LSTM(U, return_sequences=True, go_backwards=go_backwards)
    ref.build((None, T, F))
    ref.set_weights(layer.get_weights())
    _close(ref(x), seq)


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("mask_kind", ["right", "left", "mid"])
def test_gate_activations_with_mask(go_backwards, mask_kind):
    layer = _layer(go_backwards=go_backwards)
    x, m = _inputs(), _mask(mask_kind)
    gates = layer.gate_activations(x, mask=m)
    seq = np.asarray(layer(x, mask=m))
    expected = seq[:, ::-1] if go_backwards else seq
    # With zero initial state, the carried hidden state equals Keras's output
    # (which repeats the previous output at masked steps).
    _close(gates["hidden_state"], expected)
    h, c = np.asarray(gates["hidden_state"]), np.asarray(gates["cell_state"])
    # Masked steps repeat the carried state.
    order = range(T - 1, -1, -1) if go_backwards else range(T)
    prev_h = np.zeros((B, U), np.float32)
    prev_c = np.zeros((B, U), np.float32)
    for t in order:
        for b in range(B):
            if not m[b, t]:
                _close(h[b, t], prev_h[b])
                _close(c[b, t], prev_c[b])
        prev_h, prev_c = h[:, t], c[:, t]


def test_gate_activations_consistency():
    layer = _layer()
    x = _inputs()
    g = {k: np.asarray(v, np.float64) for k, v in layer.gate_activations(x).items()}
    h, c = g["hidden_state"], g["cell_state"]
    _close(h, g["output_gate"] * np.tanh(c))
    c_prev = np.concatenate([np.zeros((B, 1, U)), c[:, :-1]], axis=1)
    _close(c, g["forget_gate"] * c_prev + g["input_gate"] * g["cell_input"])
    # Recompute the gates from the weights.
    kernel, rec, bias = layer.get_weights()
    h_prev = np.concatenate([np.zeros((B, 1, U)), h[:, :-1]], axis=1)
    z = x @ kernel + h_prev @ rec + bias
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    _close(g["input_gate"], sig(z[..., :U]))
    _close(g["forget_gate"], sig(z[..., U:2 * U]))
    _close(g["cell_input"], np.tanh(z[..., 2 * U:3 * U]))
    _close(g["output_gate"], sig(z[..., 3 * U:]))


def test_gate_activations_consistency_masked_steps():
    layer = _layer()
    x, m = _inputs(), _mask("mid")
    g = {k: np.asarray(v, np.float64) for k, v in layer.gate_activations(x, mask=m).items()}
    h, c = g["hidden_state"], g["cell_state"]
    _close(h[m], (g["output_gate"] * np.tanh(c))[m])


def test_gate_activations_initial_state():
    layer = _layer()
    x, init = _inputs(), _states()
    gates = layer.gate_activations(x, initial_state=init)
    seq, h, c = layer(x, initial_state=init), None, None
    _close(gates["hidden_state"], seq)
    ref = LSTM(U, return_sequences=True, return_state=True)
    ref.build((None, T, F))
    ref.set_weights(layer.get_weights())
    _, h, c = ref(x, initial_state=init)
    _close(gates["hidden_state"][:, -1], h)
    _close(gates["cell_state"][:, -1], c)
    # The first forget contribution uses c0.
    g = {k: np.asarray(v, np.float64) for k, v in gates.items()}
    _close(g["cell_state"][:, 0],
           g["forget_gate"][:, 0] * init[1] + g["input_gate"][:, 0] * g["cell_input"][:, 0])


def test_gate_activations_nonstandard_activation():
    layer = _layer(activation="relu", recurrent_activation="hard_sigmoid")
    x = _inputs()
    g = layer.gate_activations(x)
    _close(g["hidden_state"], layer(x))
    for k in ("input_gate", "forget_gate", "output_gate"):
        v = np.asarray(g[k])
        assert np.all((v >= 0) & (v <= 1)), k
    _close(g["hidden_state"], np.asarray(g["output_gate"]) * np.maximum(g["cell_state"], 0))


def test_gate_activations_stateful_uses_and_keeps_state():
    layer = LSTM(U, return_sequences=True, stateful=True)
    layer.build((B, T, F))
    _randomize(layer)
    x1, x2 = _inputs(seed=1), _inputs(seed=2)
    layer(x1)
    before = [np.asarray(s) for s in layer.states]
    gates = layer.gate_activations(x2)
    for a, b in zip(layer.states, before, strict=True):
        _close(a, b)
    _close(gates["hidden_state"], layer(x2))


def test_gate_activations_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = _layer()
        gates = layer.gate_activations(_inputs())
        assert gates["hidden_state"].dtype == tf.float32
        _close(gates["hidden_state"], tf.cast(layer(_inputs()), tf.float32), atol=1e-2,
               rtol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------
# batch shards: from 16 rows the fused path splits the batch across cores
# ---------------------------------------------------------------------------

SHARDED_BATCH = 19  # odd on purpose: the two shards differ in size


def _sharded_mask(batch=SHARDED_BATCH, steps=T):
    mask = np.ones((batch, steps), bool)
    mask[0, 4:] = False   # right-padded
    mask[7, :2] = False   # left-padded
    mask[12, 3] = False   # a gap
    mask[18, :] = False   # fully masked row, in the second shard
    return mask


def test_batch_of_sixteen_or_more_is_sharded():
    cores = len(os.sched_getaffinity(0))
    assert lstm_mod.shard_count(SHARDED_BATCH) == min(2, cores)
    assert lstm_mod.shard_count(None) == min(2, cores)  # unknown batch: split, may be empty
    assert lstm_mod.shard_count(4) == 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kwargs,use_mask", [
    ({}, False),
    ({"return_sequences": True, "return_state": True}, True),
    ({"return_sequences": True, "go_backwards": True}, True),
    ({"return_sequences": True, "use_bias": False}, False),
])
def test_parity_with_batch_shards(kwargs, use_mask, training):
    ours, ref = _pair(**kwargs)
    x = _inputs(batch=SHARDED_BATCH)
    mask = _sharded_mask() if use_mask else None
    init = [np.random.default_rng(5).normal(size=(SHARDED_BATCH, U)).astype("float32")
            for _ in range(2)]
    _assert_parity(ours, ref, x, mask=mask, initial_state=init, training=training)


def test_sharded_parity_with_a_dynamic_batch_in_a_graph():
    ours, ref = _pair(return_sequences=True)
    x = tf.constant(_inputs(batch=SHARDED_BATCH))
    mask = tf.constant(_sharded_mask())

    def run(layer):
        @tf.function(input_signature=[tf.TensorSpec((None, T, F)), tf.TensorSpec((None, T), tf.bool)])
        def step(x, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = _loss(_as_list(layer(x, mask=mask, training=True)))
            return loss, tape.gradient(loss, [x] + layer.trainable_weights)
        return step(x, mask)

    (loss_o, grads_o), (loss_r, grads_r) = run(ours), run(ref)
    _close(loss_o, loss_r, ATOL, RTOL, what="loss")
    for k, (a, b) in enumerate(zip(grads_o, grads_r, strict=True)):
        _close(a, b, 1e-4, RTOL, what=f"gradient {k}")


def test_sharded_stateful_and_bidirectional_fit():
    x = _inputs(batch=32, seed=3)
    y = np.random.default_rng(4).normal(size=(32, 1)).astype("float32")
    for layer in (LSTM(U, stateful=True), keras.layers.Bidirectional(LSTM(U))):
        model = keras.Sequential([keras.Input((T, F), batch_size=16), layer,
                                  keras.layers.Dense(1)])
        model.compile("adam", "mse")
        losses = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history["loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
