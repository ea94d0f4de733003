"""Saving and exporting models that contain `common.lstm.LSTM`.

- `.keras` files round-trip with ``safe_mode=True`` and reload as `common.lstm.LSTM`.
- `model.export()` SavedModels run in a fresh process that never imports `common`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from common.lstm import LSTM

ATOL = RTOL = 1e-5
T, F, U = 6, 3, 5
CHILD = Path(__file__).with_name("lstm_export_child.py")


def _randomize(model, seed=3):
    rng = np.random.RandomState(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(w.dtype)
                       for w in model.get_weights()])


def _dense_model():
    inp = keras.Input((T, F), name="features")
    h = keras.layers.Masking()(inp)
    h = LSTM(U, return_sequences=True, use_cudnn=False, name="lstm_seq")(h)
    h = LSTM(U, go_backwards=True, name="lstm_last")(h)
    out = keras.layers.Dense(2)(h)
    model = keras.Model(inp, out)
    _randomize(model)
    return model


def _token_model():
    inp = keras.Input((T,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(12, F, mask_zero=True)(inp)
    h = keras.layers.Bidirectional(LSTM(U, return_sequences=True), merge_mode="concat")(h)
    h = keras.layers.Bidirectional(LSTM(U), merge_mode="sum")(h)
    out = keras.layers.Dense(2)(h)
    model = keras.Model(inp, out)
    _randomize(model)
    return model


def _sequential_model():
    model = keras.Sequential([keras.Input((T, F)), LSTM(U), keras.layers.Dense(1)])
    _randomize(model)
    return model


def _features(batch, seed=0):
    x = np.random.RandomState(seed).uniform(-1, 1, (batch, T, F)).astype("float32")
    x[0, 4:] = 0.0  # right padding (masked by Masking)
    if batch > 2:
        x[1, :2] = 0.0  # left padding
        x[2, 2:3] = 0.0  # a gap
    return x


def _tokens(batch, seed=0):
    tok = np.random.RandomState(seed).randint(1, 12, (batch, T)).astype("int32")
    tok[0, 4:] = 0
    if batch > 2:
        tok[1, :2] = 0
        tok[2, 2:3] = 0
    return tok


MODELS = {
    "masking": (_dense_model, _features),
    "embedding_bidirectional": (_token_model, _tokens),
    "sequential": (_sequential_model, _features),
}


def _lstm_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            found += [layer.forward_layer, layer.backward_layer]
        elif isinstance(layer, keras.layers.LSTM):
            found.append(layer)
    return found


@pytest.mark.parametrize("kind", list(MODELS))
def test_keras_file_round_trip_safe_mode(kind, tmp_path):
    build, data = MODELS[kind]
    model = build()
    x = data(4)
    expected = model.predict(x, verbose=0)
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    layers = _lstm_layers(reloaded)
    assert layers, "no LSTM layer in the reloaded model"
    for layer, original in zip(layers, _lstm_layers(model), strict=True):
        assert type(layer) is LSTM, type(layer)
        assert layer.get_config() == original.get_config()
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(reloaded(x), expected, atol=ATOL, rtol=RTOL)
    for a, b in zip(reloaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_file_keeps_use_cudnn(tmp_path):
    model = _dense_model()
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert reloaded.get_layer("lstm_seq").use_cudnn is False
    assert reloaded.get_layer("lstm_last").use_cudnn == "auto"
    assert reloaded.get_layer("lstm_last").go_backwards


def test_keras_file_reloaded_model_trains(tmp_path):
    model = _sequential_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = _features(16)
    y = x[:, :, 0].sum(axis=1, keepdims=True)
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "trained.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=ATOL, rtol=RTOL)
    hist = reloaded.fit(x, y, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(hist.history["loss"]))


def _run_child(export_dir, data_dir, n):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(export_dir), str(data_dir), str(n)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(data_dir),
    )
    result_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, (
        f"child failed (rc={proc.returncode})\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}")
    return json.loads(result_lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_export_saved_model_fresh_process(kind, tmp_path):
    build, data = MODELS[kind]
    model = build()
    export_dir = tmp_path / "export"
    model.export(str(export_dir))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    inputs = [data(4, seed=1), data(7, seed=2)]  # two batch sizes through one signature
    for k, x in enumerate(inputs):
        np.save(data_dir / f"x{k}.npy", x)
        np.save(data_dir / f"y{k}.npy", model.predict(x, verbose=0))
    report = _run_child(export_dir, data_dir, len(inputs))
    assert report["common_imported"] is False
    for k in range(len(inputs)):
        expected = np.load(data_dir / f"y{k}.npy")
        np.testing.assert_allclose(np.load(data_dir / f"child_serve{k}.npy"), expected,
                                   atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(np.load(data_dir / f"child_sig{k}.npy"), expected,
                                   atol=ATOL, rtol=RTOL)
