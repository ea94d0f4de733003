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

from apps.finance.data import BAND_RATE, OHLCV, Settings
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


def recent_vol(rows, settings: Settings, floor: float = 1e-4):
    """Per-example std of the last `vol_window` log returns (1 when not volatility-scaled).

    Works on numpy arrays and tf tensors alike, so training, predict and the
    SavedModel compute the very same number. `floor` keeps windows of stale,
    tick-rounded prices (ten unchanged closes in a row happen in the early
    years of some files) from dividing a return by almost nothing; the fitted
    floor is stored in the target scale (see `fit_target_scale`).
    """
    is_tf = tf.is_tensor(rows)
    if settings.target_kind == "level" or not settings.scale_by_volatility:
        return tf.ones_like(rows[:, 0, 0]) if is_tf else np.ones(len(rows))
    close = rows[:, -settings.vol_window - 1:, settings.target_index]
    close = tf.math.log(close) if is_tf else np.log(close.astype(np.float64))
    r = close[:, 1:] - close[:, :-1]
    std = tf.math.reduce_std(r, axis=1) if is_tf else np.std(r, axis=1)
    return tf.maximum(std, tf.cast(floor, std.dtype)) if is_tf else np.maximum(std, floor)


# A quarter of the training part's median volatility: hit by stale-price
# windows only (msft's 1980s prices quoted to 1e-4 made the volatility-scaled
# training targets' std 35 instead of 1.5 with the old fixed floor of 1e-4).
VOL_FLOOR_FRACTION = 0.25


def fit_target_scale(w, settings: Settings) -> dict:
    """Volatility floor, and mean and std of the (volatility-scaled) change, over TRAINING windows.

    `shrink` (the point forecast's weight) and the band (`band_lo`/`band_hi`)
    are absent, which `decode` reads as the model as trained; `calibrate` fits
    them on the validation part after training. Leaving them out keeps the
    scale a --resume fits comparable with the run's stored, calibrated one.
    """
    vol = recent_vol(w.x, settings)
    scaled = settings.target_kind != "level" and settings.scale_by_volatility
    floor = max(1e-4, VOL_FLOOR_FRACTION * float(np.median(vol))) if scaled else 1e-4
    u = to_change(w.y, w.last, settings.target_kind) / np.maximum(vol, floor)
    return {"mean": float(u.mean()), "std": float(u.std() or 1.0), "vol_floor": floor}


def _vol(rows, scale: dict, settings: Settings):
    return recent_vol(rows, settings, float(scale.get("vol_floor", 1e-4)))


def encode(w, scale: dict, settings: Settings) -> np.ndarray:
    """Targets in units -> what the model is trained on (z)."""
    u = to_change(w.y, w.last, settings.target_kind) / _vol(w.x, scale, settings)
    return (u - scale["mean"]) / scale["std"]


def decode(z, rows, scale: dict, settings: Settings, offsets=None, last=None):
    """[n, 4] z (point, q10, q50, q90) -> units; numpy or tf.

    Applies the validation calibration stored in `scale`: the 10-90% band
    (offsets from the median, or the older width factor) and the shrinkage of
    the point forecast's change toward "no change" (persistence). `offsets`,
    a pair of [n] numpy arrays, replaces the stored band offsets per row (the
    walk-forward band of `track_band`). `last` (numpy, [n]) replaces the rows'
    last target value as the point the changes start from.
    """
    if offsets is not None:
        z = offset_band(z, offsets[0][:, None], offsets[1][:, None])
    elif "band_lo" in scale:
        z = offset_band(z, float(scale["band_lo"]), float(scale["band_hi"]))
    else:
        z = widen_band(z, float(scale.get("band", 1.0)))
    v = _vol(rows, scale, settings)[:, None]
    last = rows[:, -1, settings.target_index][:, None] if last is None else last[:, None]
    if not tf.is_tensor(z):
        last = np.asarray(last, np.float64)
    change = (z * scale["std"] + scale["mean"]) * v
    cat = tf.concat if tf.is_tensor(change) else np.concatenate
    change = cat([change[:, 0:1] * float(scale.get("shrink", 1.0)), change[:, 1:]], axis=1)
    return to_units(change, last, settings.target_kind)


def predict_units(model: keras.Model, x: np.ndarray, scale: dict, settings: Settings,
                  batch_size: int = 256, offsets=None) -> dict[str, np.ndarray]:
    """Point forecast and 10/50/90% quantiles in the target's units."""
    return _as_dict(decode(predict_z(model, x, batch_size), x.astype(np.float64), scale,
                           settings, offsets))


def band_moves(scale: dict) -> bool:
    """True when the run's 10-90% band walks forward (a validation band and a rate > 0)."""
    return "band_lo" in scale and float(scale.get("band_rate", 0.0)) > 0


def forecast_known(model: keras.Model, w, scale: dict, settings: Settings,
                   batch_size: int = 256) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """Forecasts for windows whose outcomes are known (the test part), walking forward.

    The point forecast and median are the model's; the 10-90% band starts
    from the validation offsets and, when the band moves (`band_moves`), is
    updated after each outcome that was known when the next forecast was made
    (`track_band`). Returns the forecasts (plus `q10_fixed`/`q90_fixed`, the
    band that never moves) and each file's offsets after its last outcome
    (empty when the band does not move).
    """
    z = predict_z(model, w.x, batch_size)
    rows = w.x.astype(np.float64)
    # The outcomes are scored against the exact last value; the float32 copy in
    # the window would put a "no change" forecast a rounding error up or down.
    pred = _as_dict(decode(z, rows, scale, settings, last=w.last))
    if not band_moves(scale):
        return pred, {}
    residual = encode(w, scale, settings) - z[:, 2]
    lo, hi, final = track_band(residual, w.ticker, float(scale["band_lo"]),
                               float(scale["band_hi"]), rate=float(scale["band_rate"]),
                               lag=settings.horizon)
    walked = _as_dict(decode(z, rows, scale, settings, (lo, hi), last=w.last))
    walked["q10_fixed"], walked["q90_fixed"] = pred["q10"], pred["q90"]
    return walked, final


def walk_ends(model: keras.Model, known, scale: dict, settings: Settings
              ) -> dict[str, tuple[float, float]]:
    """Each file's band offsets after walking through the known outcomes in `known`.

    Empty when the band does not move or nothing is known: the caller keeps
    the validation band.
    """
    if not len(known) or not band_moves(scale):
        return {}
    return forecast_known(model, known, scale, settings)[1]


def walked_scale(scale: dict, final: dict[str, tuple[float, float]]) -> dict:
    """`scale` with the band offsets the walk reached (`forecast_known`'s `final`).

    What a SavedModel carries, so it serves the band `predict` would use. With
    several files, the mean of their offsets; with none (a fixed band, or no
    known outcomes), `scale` itself.
    """
    if not final:
        return scale
    lo, hi = np.mean(list(final.values()), axis=0)
    return {**scale, "band_lo": float(lo), "band_hi": float(hi)}


def _as_dict(units: np.ndarray) -> dict[str, np.ndarray]:
    return {"forecast": units[:, 0], "q10": units[:, 1], "q50": units[:, 2], "q90": units[:, 3]}


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
    train on (and never on the test part), fixes most of it. Runs trained
    before the conformal offsets (`calibrate_offsets`) still decode with it.
    """
    mid = z[:, 2]
    below = (mid - y_z) / np.maximum(mid - z[:, 1], 1e-9)
    above = (y_z - mid) / np.maximum(z[:, 3] - mid, 1e-9)
    needed = np.where(y_z < mid, below, above)  # band factor that just covers each point
    return float(np.quantile(needed, target))


def offset_band(z, lo: float, hi: float):
    """q10 = median + lo, q90 = median + hi (z units, i.e. volatility units; numpy or tf)."""
    mid = z[:, 2:3]
    cat = tf.concat if tf.is_tensor(z) else np.concatenate
    return cat([z[:, 0:1], mid + lo, mid, mid + hi], axis=1)


def calibrate_offsets(z: np.ndarray, y_z: np.ndarray, coverage: float = 0.8) -> tuple[float, float]:
    """Split-conformal 10-90% band: quantiles of the VALIDATION residuals around the median.

    In z units the residuals are already divided by the window's recent
    volatility, so a constant offset still widens the band in turbulent
    periods (normalised conformal prediction). On exchangeable data the band
    covers `coverage` of new points, whatever the heads learnt. Chosen over
    rescaling the heads' own widths (`calibrate_band`) on validation data
    only: fitted on the first half of each ticker's validation part, these
    offsets covered 0.78-0.82 of the second half, the rescaled heads 0.71-0.86.
    """
    tail = (1.0 - coverage) / 2
    lo, hi = np.quantile(y_z - z[:, 2], [tail, 1.0 - tail])
    # Clipped at the median so the quantiles never cross, even for a badly biased median.
    return min(float(lo), 0.0), max(float(hi), 0.0)


def track_band(residual: np.ndarray, ticker: np.ndarray, lo: float, hi: float, *,
               rate: float, lag: int = 1, coverage: float = 0.8
               ) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """Walk-forward 10-90% band offsets (online quantile tracking), file by file.

    Starts from the validation offsets `lo`/`hi` (z units) and, once the
    outcome of a forecast is known (`lag` windows later, i.e. the horizon),
    moves each edge by `rate` x (missed - tail): an edge that was crossed
    moves out by rate x 0.9, one that held moves in by rate x 0.1, so each
    edge is crossed by 10% of the outcomes over time even when the
    volatility regime shifts (online quantile tracking, the "P control" of
    Angelopoulos, Candes & Tibshirani 2023, "Conformal PID control for time
    series prediction"; the adaptive conformal inference of Gibbs & Candes 2021
    steps the miscoverage level instead). Every forecast uses only outcomes
    known before it was made. `residual` is the outcome minus the median, in
    z units; windows of one file must be consecutive and in date order.
    Returns the offsets in force for every window, and each file's offsets
    after its last outcome (what the next forecast would use).
    """
    tail = (1.0 - coverage) / 2
    lo_t, hi_t = np.empty(len(residual)), np.empty(len(residual))

    def learn(low: float, high: float, j: int) -> tuple[float, float]:
        low -= rate * (float(residual[j] < lo_t[j]) - tail)
        high += rate * (float(residual[j] > hi_t[j]) - tail)
        return min(low, 0.0), max(high, 0.0)  # never past the median

    final: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(ticker.tolist()):  # file order, each once
        idx = np.flatnonzero(ticker == name)
        low, high = lo, hi
        for k, i in enumerate(idx):
            if k >= lag:  # the outcome of the forecast made `lag` windows ago is in
                low, high = learn(low, high, idx[k - lag])
            lo_t[i], hi_t[i] = low, high
        for j in idx[max(len(idx) - lag, 0):]:  # outcomes known after the last forecast
            low, high = learn(low, high, j)
        final[str(name)] = (low, high)
    return lo_t, hi_t, final


def fit_shrinkage(forecast: np.ndarray, y: np.ndarray, last: np.ndarray, kind: str,
                  steps: int = 101, min_t: float = 1.645) -> float:
    """The weight w in [0, 1] on the forecast change, fitted on VALIDATION windows.

    The forecast becomes `last value + w x forecast change`: w = 0 is exactly
    persistence ("no change"), w = 1 the model as trained. w minimises the
    MAE in the target's own units (on a grid, so every kind is handled
    alike), and is then kept only if its gain over persistence is unlikely to
    be luck: the paired t statistic of |persistence error| - |error| must
    reach `min_t` (one-sided 5%), otherwise w = 0. Daily returns are so close
    to unpredictable that a model a hair better than persistence on one
    period is usually a hair worse on the next; on validation data only
    (weight fitted on the first half of each ticker's validation part, scored
    on the second), the gate turned 5 of 9 tickers from MASE 1.0004-1.010
    into 1.000 and cost 0.2-0.5% of MAE on 3 others.
    """
    change = to_change(forecast, last, kind)
    persistence = np.abs(to_units(np.zeros_like(change), last, kind) - y)
    grid = np.linspace(0.0, 1.0, steps)
    errors = [np.abs(to_units(w * change, last, kind) - y) for w in grid]
    best = int(np.argmin([e.mean() for e in errors]))  # ties: the smaller weight
    gain = persistence - errors[best]
    spread = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
    if best == 0 or spread == 0 or gain.mean() / spread < min_t:
        return 0.0
    return float(grid[best])


def calibrate(z: np.ndarray, val, scale: dict, settings: Settings,
              band_rate: float = BAND_RATE) -> dict:
    """Band offsets and point shrinkage fitted on the validation windows `val` (never test).

    `z` are the model's [n, 4] outputs on `val.x`; returns the entries to
    merge into the target scale, with `band_rate`, the step of the
    walk-forward band that starts from these offsets (`track_band`).
    """
    lo, hi = calibrate_offsets(z, encode(val, scale, settings))
    raw = decode(z, val.x.astype(np.float64), {**scale, "shrink": 1.0}, settings,
                 last=val.last)
    shrink = fit_shrinkage(raw[:, 0], val.y, val.last, settings.target_kind)
    return {"band_lo": lo, "band_hi": hi, "shrink": shrink, "band_rate": float(band_rate)}


def _row_checks(rows, settings: Settings) -> list:
    """Graph assertions on served rows: what `predict` checks in a CSV.

    Neither `tf.saved_model.load(...).signatures` nor TF Serving checks a
    request's shape against the signature; without these a window of 31 rows,
    or a Yahoo row with Adj Close, would be read silently as something else.
    """
    names = [c.capitalize() for c in settings.raw_columns]
    shape = tf.shape(rows)
    expected = tf.constant([settings.window, len(names)])
    checks = [tf.debugging.Assert(
        tf.reduce_all(tf.equal(shape[1:], expected)),
        [f"rows: expected shape [batch, {settings.window}, {len(names)}]: the last "
         f"{settings.window} rows of {', '.join(names)}, oldest first; got", shape])]
    with tf.control_dependencies(checks):  # the value checks need the right shape
        finite = tf.reduce_all(tf.math.is_finite(rows))
        checks.append(tf.debugging.Assert(finite, ["rows: a value is NaN or infinite"]))
        prices = list(settings.positive_columns)  # as data.load_file checks a CSV
        if prices:
            positive = tf.reduce_all(tf.gather(rows, prices, axis=2) > 0)
            what = (f"a price ({', '.join(names[j] for j in prices)})"
                    if settings.mode == "ohlcv" else f"a {names[0]} value")
            checks.append(tf.debugging.Assert(positive, [
                f"rows: {what} is not positive (a {settings.target_kind} target needs "
                "positive values)"]))
        if "volume" in settings.raw_columns:  # also a --target volume series
            j = settings.raw_columns.index("volume")
            checks.append(tf.debugging.Assert(tf.reduce_all(rows[:, :, j] >= 0),
                                              ["rows: a Volume is negative"]))
    return checks


class ForecastServing(tf.Module):
    """SavedModel: the last `window` raw rows -> forecast and quantiles in units.

    Rows of another shape, NaN/inf, non-positive prices (for returns and
    prices) or negative volumes fail the call with InvalidArgumentError naming
    the problem, as `predict` refuses such a CSV.
    """

    def __init__(self, model: keras.Model, settings: Settings, scale: dict):
        super().__init__()
        self.model = model
        spec = tf.TensorSpec([None, settings.window, len(settings.raw_columns)], tf.float32,
                             name="rows")
        scale = {k: float(v) for k, v in scale.items()}
        j = settings.target_index

        @tf.function(input_signature=[spec])
        def serve(rows):
            with tf.control_dependencies(_row_checks(rows, settings)):
                rows = tf.identity(rows)
            out = model(rows, training=False)
            units = decode(tf.concat([out["point"], out["quantiles"]], axis=1), rows, scale,
                           settings)
            return {"forecast": units[:, 0], "q10": units[:, 1], "q50": units[:, 2],
                    "q90": units[:, 3], "last": rows[:, -1, j]}

        self.serve = serve
