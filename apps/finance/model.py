"""Raw price rows -> features -> scaled -> LSTM stack -> point forecast + quantiles.

The Keras model takes the RAW window (Open, High, Low, Close, Volume, or the
target column alone) and computes its features and scaling itself, so
training, `predict` and the SavedModel share one code path and a served
model cannot be fed features computed differently.

The model forecasts the *change* from the last input value, standardised
with the training part's mean and standard deviation ("z"): the log return
for prices, the difference for levels. `to_units` turns z back into the
target's units (log return, price or level); `ForecastServing` does the same
in TensorFlow for the SavedModel.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from apps.finance.data import OHLCV, Settings
from common.lstm import LSTM

QUANTILES = (0.1, 0.5, 0.9)


@keras.saving.register_keras_serializable(package="lstm_suite")
class SeriesFeatures(keras.layers.Layer):
    """Raw rows [batch, window, columns] -> features [batch, window - vol_window, features].

    Every feature at a step uses only that row and earlier rows of the same
    window; the first `vol_window` rows are the warm-up of the rolling
    volatility and produce no step.
    """

    def __init__(self, mode: str, features: list[str], vol_window: int, kind: str, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.features = mode, list(features)
        self.vol_window, self.kind = int(vol_window), kind

    def call(self, rows):
        k = self.vol_window
        if self.mode == "ohlcv":
            col = {name: rows[..., i] for i, name in enumerate(OHLCV)}
            value = col["close"]
        else:
            col, value = {}, rows[..., 0]
        if self.kind == "level":
            change = value[:, 1:] - value[:, :-1]
        else:
            change = ops.log(value[:, 1:]) - ops.log(value[:, :-1])
        steps = rows.shape[1] - k
        out = []
        for name in self.features:
            if name in ("returns", "change"):
                f = change
            elif name == "range":
                f = ops.log(col["high"][:, 1:]) - ops.log(col["low"][:, 1:])
            elif name == "volume":
                lv = ops.log1p(col["volume"])
                f = lv[:, 1:] - lv[:, :-1]
            elif name == "level":
                f = value[:, 1:]
            elif name == "volatility":
                # Trailing std of the last k changes, one column per step.
                stacked = ops.stack([change[:, i: i + steps] for i in range(k)], axis=-1)
                f = ops.std(stacked, axis=-1)
                out.append(f)
                continue
            else:
                raise ValueError(f"unknown feature {name!r}")
            out.append(f[:, -steps:])
        return ops.stack(out, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] - self.vol_window, len(self.features))

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "features": self.features,
                "vol_window": self.vol_window, "kind": self.kind}


@keras.saving.register_keras_serializable(package="lstm_suite")
class MonotoneQuantiles(keras.layers.Layer):
    """[median, a, b] -> [median - softplus(a), median, median + softplus(b)]: never crossing."""

    def call(self, x):
        mid = x[:, 1:2]
        return ops.concatenate([mid - ops.softplus(x[:, 0:1]), mid,
                                mid + ops.softplus(x[:, 2:3])], axis=-1)


@keras.saving.register_keras_serializable(package="lstm_suite")
def pinball_loss(y_true, y_pred):
    """Quantile (pinball) loss averaged over the 10/50/90% heads."""
    tau = ops.convert_to_tensor(QUANTILES, dtype=y_pred.dtype)
    error = ops.cast(y_true, y_pred.dtype) - y_pred  # y_true [b, 1] broadcasts over heads
    return ops.mean(ops.maximum(tau * error, (tau - 1.0) * error), axis=-1)


def fit_feature_scaler(settings: Settings, x_train: np.ndarray) -> tuple[list, list]:
    """Mean and variance of every feature over the TRAINING windows only."""
    features = feature_layer(settings)(tf.constant(x_train)).numpy().astype(np.float64)
    flat = features.reshape(-1, features.shape[-1])
    var = flat.var(axis=0)
    return flat.mean(axis=0).tolist(), np.where(var > 1e-12, var, 1.0).tolist()


def feature_layer(settings: Settings) -> SeriesFeatures:
    return SeriesFeatures(settings.mode, list(settings.features), settings.vol_window,
                          "level" if settings.target_kind == "level" else "log",
                          name="features")


def build_model(settings: Settings, scaler: tuple[list, list], *, units: int = 32,
                layers: int = 1, dropout: float = 0.0) -> keras.Model:
    """The forecaster: raw rows in, {"point": [b, 1], "quantiles": [b, 3]} out (scaled)."""
    rows = keras.Input((settings.window, len(settings.raw_columns)), name="rows")
    x = feature_layer(settings)(rows)
    mean, variance = scaler
    x = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="scale")(x)
    for i in range(layers):
        x = LSTM(units, return_sequences=i < layers - 1, dropout=dropout, name=f"lstm_{i}")(x)
    point = keras.layers.Dense(1, name="point", dtype="float32")(x)
    raw_q = keras.layers.Dense(3, name="quantile_raw", dtype="float32")(x)
    quantiles = MonotoneQuantiles(name="quantiles", dtype="float32")(raw_q)
    return keras.Model(rows, {"point": point, "quantiles": quantiles}, name="forecaster")


# ---------------------------------------------------------------------------
# Units: change <-> target
# ---------------------------------------------------------------------------


def to_change(y: np.ndarray, last: np.ndarray, kind: str) -> np.ndarray:
    """Target in units -> the change the model forecasts."""
    if kind == "price":
        return np.log(y / last)
    if kind == "level":
        return y - last
    return y  # "return" already is a change


def to_units(change, last, kind: str):
    """The inverse of `to_change` (works on numpy arrays and tf tensors)."""
    if kind == "price":
        return last * (tf.exp(change) if tf.is_tensor(change) else np.exp(change))
    if kind == "level":
        return last + change
    return change


def recent_vol(rows, settings: Settings):
    """Per-example std of the last `vol_window` log returns (1 when not volatility-scaled).

    Works on numpy arrays and tf tensors alike, so training, predict and the
    SavedModel compute the very same number.
    """
    is_tf = tf.is_tensor(rows)
    if settings.target_kind == "level" or not settings.scale_by_volatility:
        return tf.ones_like(rows[:, 0, 0]) if is_tf else np.ones(len(rows))
    close = rows[:, -settings.vol_window - 1:, settings.target_index]
    close = tf.math.log(close) if is_tf else np.log(close.astype(np.float64))
    r = close[:, 1:] - close[:, :-1]
    std = tf.math.reduce_std(r, axis=1) if is_tf else np.std(r, axis=1)
    return tf.maximum(std, 1e-4) if is_tf else np.maximum(std, 1e-4)


def fit_target_scale(w, settings: Settings) -> dict:
    """Mean and std of the (volatility-scaled) change over the TRAINING windows."""
    u = to_change(w.y, w.last, settings.target_kind) / recent_vol(w.x, settings)
    return {"mean": float(u.mean()), "std": float(u.std() or 1.0), "band": 1.0}


def encode(w, scale: dict, settings: Settings) -> np.ndarray:
    """Targets in units -> what the model is trained on (z)."""
    u = to_change(w.y, w.last, settings.target_kind) / recent_vol(w.x, settings)
    return (u - scale["mean"]) / scale["std"]


def decode(z, rows, scale: dict, settings: Settings):
    """[n, 4] z (point, q10, q50, q90) -> units; numpy or tf."""
    z = widen_band(z, float(scale.get("band", 1.0)))
    v = recent_vol(rows, settings)[:, None]
    last = rows[:, -1, settings.target_index][:, None]
    if not tf.is_tensor(z):
        last = last.astype(np.float64)
    return to_units((z * scale["std"] + scale["mean"]) * v, last, settings.target_kind)


def predict_units(model: keras.Model, x: np.ndarray, scale: dict, settings: Settings,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """Point forecast and 10/50/90% quantiles in the target's units."""
    units = decode(predict_z(model, x, batch_size), x.astype(np.float64), scale, settings)
    return {"forecast": units[:, 0], "q10": units[:, 1], "q50": units[:, 2],
            "q90": units[:, 3]}


def predict_z(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """[n, 4] scaled forecasts: point, q10, q50, q90."""
    out = model.predict(x, batch_size=batch_size, verbose=0)
    return np.concatenate([out["point"], out["quantiles"]], axis=1).astype(np.float64)


def widen_band(z, band: float):
    """Scale the q10/q90 distances from the median by `band` (numpy or tf)."""
    mid = z[:, 2:3]
    lo, hi = mid - band * (mid - z[:, 1:2]), mid + band * (z[:, 3:4] - mid)
    cat = tf.concat if tf.is_tensor(z) else np.concatenate
    return cat([z[:, 0:1], lo, mid, hi], axis=1)


def calibrate_band(z: np.ndarray, y_z: np.ndarray, target: float = 0.8) -> float:
    """The factor that makes the 10-90% band cover `target` of the VALIDATION part.

    Quantile heads trained on one volatility regime are often too wide or too
    narrow in the next; a single width factor, fitted on data the model did not
    train on (and never on the test part), fixes most of it.
    """
    mid = z[:, 2]
    below = (mid - y_z) / np.maximum(mid - z[:, 1], 1e-9)
    above = (y_z - mid) / np.maximum(z[:, 3] - mid, 1e-9)
    needed = np.where(y_z < mid, below, above)  # band factor that just covers each point
    return float(np.quantile(needed, target))


class ForecastServing(tf.Module):
    """SavedModel: the last `window` raw rows -> forecast and quantiles in units."""

    def __init__(self, model: keras.Model, settings: Settings, scale: dict):
        super().__init__()
        self.model = model
        spec = tf.TensorSpec([None, settings.window, len(settings.raw_columns)], tf.float32,
                             name="rows")
        scale = {k: float(v) for k, v in scale.items()}
        j = settings.target_index

        @tf.function(input_signature=[spec])
        def serve(rows):
            out = model(rows, training=False)
            units = decode(tf.concat([out["point"], out["quantiles"]], axis=1), rows, scale,
                           settings)
            return {"forecast": units[:, 0], "q10": units[:, 1], "q50": units[:, 2],
                    "q90": units[:, 3], "last": rows[:, -1, j]}

        self.serve = serve
