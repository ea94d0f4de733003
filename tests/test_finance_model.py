"""apps.finance.model: the validation calibration (point shrinkage, conformal band, vol floor).

Synthetic numbers only, no training: every test here runs in well under a second
once TensorFlow is imported.
"""

import numpy as np
import pytest

from apps.finance import model as M
from apps.finance.data import Settings, Windows

RNG_SEED = 7


def windows(x: np.ndarray, y: np.ndarray, last: np.ndarray) -> Windows:
    n = len(y)
    return Windows(x=x.astype(np.float32), y=y, last=last,
                   dates=np.arange(n).astype("datetime64[D]"), ticker=np.full(n, "t"))


@pytest.mark.parametrize("kind", ["return", "price", "level"])
def test_shrinkage_is_one_for_a_perfect_model_and_near_zero_for_noise(kind):
    rng = np.random.default_rng(RNG_SEED)
    n = 5000
    last = rng.uniform(50, 150, n) if kind != "return" else np.zeros(n)
    change = rng.laplace(0, 0.01, n)  # what really happens
    noise = rng.laplace(0, 0.01, n)  # a "forecast" that knows nothing
    y = M.to_units(change, last, kind) if kind != "return" else change
    perfect = y.copy()
    useless = M.to_units(noise, last, kind) if kind != "return" else noise
    assert M.fit_shrinkage(perfect, y, last, kind) == 1.0
    # Knows nothing: exactly persistence (the gain is not significant, or there is none).
    assert M.fit_shrinkage(useless, y, last, kind) == 0.0
    # A small but real edge on few windows is not trusted; on many windows it is.
    edge = 0.1 * change + noise
    edge = M.to_units(edge, last, kind) if kind != "return" else edge
    assert M.fit_shrinkage(edge[:50], y[:50], last[:50], kind) == 0.0
    assert M.fit_shrinkage(edge, y, last, kind, min_t=-np.inf) > 0.0
    # Signal plus as much noise: about half weight, and better than both ends.
    noisy = change + noise
    mixed = M.to_units(noisy, last, kind) if kind != "return" else noisy
    w = M.fit_shrinkage(mixed, y, last, kind)
    assert 0.3 < w < 0.8
    mae = lambda f: np.mean(np.abs(f - y))  # noqa: E731
    shrunk = M.to_units(w * noisy, last, kind) if kind != "return" else w * noisy
    persistence = M.to_units(np.zeros(n), last, kind) if kind != "return" else np.zeros(n)
    assert mae(shrunk) <= min(mae(mixed), mae(persistence))


def test_conformal_offsets_give_the_nominal_coverage_on_exchangeable_data():
    rng = np.random.default_rng(RNG_SEED)

    def draw(n):
        # Skewed, heavy-tailed residuals around a median head; the quantile heads
        # are deliberately far too narrow, so only the offsets can give 80%.
        mid = rng.normal(0, 1, n)
        y = mid + rng.standard_t(4, n) * 1.5 + 0.3 * rng.exponential(1, n)
        z = np.stack([mid, mid - 0.1, mid, mid + 0.1], axis=1)
        return z, y

    z_val, y_val = draw(4000)
    lo, hi = M.calibrate_offsets(z_val, y_val)
    assert lo < 0 < hi
    z_new, y_new = draw(20000)
    band = M.offset_band(z_new, lo, hi)
    inside = (y_new >= band[:, 1]) & (y_new <= band[:, 3])
    assert inside.mean() == pytest.approx(0.8, abs=0.02)
    assert np.mean(y_new < band[:, 1]) == pytest.approx(0.1, abs=0.015)
    np.testing.assert_array_equal(band[:, [0, 2]], z_new[:, [0, 2]])
    # A median that is far off still gives non-crossing quantiles.
    lo, hi = M.calibrate_offsets(z_val - 10.0, y_val)
    assert lo == 0.0 and hi > 0


def stock_rows(rng, n, window):
    """Random-walk OHLCV windows (close in column 3)."""
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (n, window)), axis=1))
    rows = np.stack([close, close * 1.01, close * 0.99, close, np.full_like(close, 1e6)], -1)
    return rows


def test_decode_applies_shrinkage_and_offsets_the_same_in_numpy_and_tf():
    import tensorflow as tf

    settings = Settings(window=20, vol_window=5)
    rng = np.random.default_rng(RNG_SEED)
    rows = stock_rows(rng, 64, settings.window)
    z = np.sort(rng.normal(0, 1, (64, 4)), axis=1)[:, [1, 0, 1, 3]]
    scale = {"mean": 0.05, "std": 1.3, "band": 1.0, "shrink": 0.3, "vol_floor": 1e-3,
             "band_lo": -1.1, "band_hi": 0.9}
    out = M.decode(z, rows, scale, settings)
    full = M.decode(z, rows, {**scale, "shrink": 1.0}, settings)
    np.testing.assert_allclose(out[:, 0], 0.3 * full[:, 0])  # return kind: change = units
    np.testing.assert_allclose(out[:, 1:], full[:, 1:])  # the band is not shrunk
    vol = M.recent_vol(rows, settings, 1e-3)
    q10 = ((z[:, 2] - 1.1) * 1.3 + 0.05) * vol
    np.testing.assert_allclose(out[:, 1], q10)
    persistence = M.decode(z, rows, {**scale, "shrink": 0.0}, settings)
    np.testing.assert_array_equal(persistence[:, 0], 0.0)
    in_tf = M.decode(tf.constant(z, tf.float32), tf.constant(rows, tf.float32), scale,
                     settings).numpy()
    np.testing.assert_allclose(in_tf, out, rtol=1e-4, atol=1e-6)
    # Runs written before the offsets existed keep their width factor.
    old = {"mean": 0.05, "std": 1.3, "band": 2.0}
    np.testing.assert_allclose(M.decode(z, rows, old, settings),
                               M.decode(M.widen_band(z, 2.0), rows, {**old, "band": 1.0},
                                        settings))


@pytest.mark.parametrize("kind", ["price", "level"])
def test_a_no_change_forecast_scores_as_persistence(kind):
    # With shrink 0 the point forecast IS persistence; through the float32
    # copy of the last value it used to land a rounding error above or below
    # it and score as "up" or "down" (level data: the always-up share).
    from apps.finance.evaluation import direction

    settings = Settings(window=20, vol_window=5, mode="series", target="temp",
                        target_kind=kind, features=("level", "change", "volatility"))
    rng = np.random.default_rng(RNG_SEED)
    values = 10.0 + np.cumsum(rng.normal(0, 0.7, 400)) / 3 + 0.1  # not float32-exact
    values = np.abs(values) + 1.0
    ends = np.arange(settings.window - 1, len(values) - 1)
    x = values[ends[:, None] + np.arange(-settings.window + 1, 1)][:, :, None]
    w = windows(x, values[ends + 1], values[ends])
    assert np.any(w.x[:, -1, 0].astype(np.float64) != w.last)  # float32 rounds them

    class Model:
        def predict(self, x, batch_size, verbose):
            n = len(x)
            return {"point": np.full((n, 1), 0.3), "quantiles": np.tile([-1.0, 0.0, 1.0], (n, 1))}

    scale = {"mean": 0.0, "std": 1.0, "shrink": 0.0, "band_lo": -1.0, "band_hi": 1.0}
    pred, _ = M.forecast_known(Model(), w, scale, settings)
    np.testing.assert_array_equal(pred["forecast"], w.last)
    assert direction(pred["forecast"], w, kind) == direction(w.last, w, kind)


def test_volatility_floor_tames_stale_price_windows():
    settings = Settings(window=20, vol_window=5)
    rng = np.random.default_rng(RNG_SEED)
    rows = stock_rows(rng, 2000, settings.window + 1)
    # 5% of the windows end in six identical closes (tick-rounded, stale prices).
    stale = rng.random(2000) < 0.05
    rows[stale, -6:, :4] = rows[stale, -7:-6, :4]
    x = rows[:, :-1]
    last = x[:, -1, 3]
    w = windows(x, rng.normal(0, 0.01, 2000), last)  # tomorrow moves as usual
    scale = M.fit_target_scale(w, settings)
    assert scale["vol_floor"] > 1e-3  # a quarter of the median daily vol (~0.01)
    assert 0.5 < scale["std"] < 3.0  # with the old 1e-4 floor it is in the tens
    old = w.y / M.recent_vol(x, settings)
    assert old.std() > 10 * scale["std"]
    z = M.encode(w, scale, settings)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0)


def test_serving_module_exports_a_model_with_dropout(tmp_path):
    import tensorflow as tf

    from common.export import export_saved_model

    settings = Settings(window=20, vol_window=5)
    model = M.build_model(settings, ([0.0] * 4, [1.0] * 4), units=4, dropout=0.2)
    scale = {"mean": 0.0, "std": 1.0, "shrink": 0.5, "vol_floor": 1e-3, "band_lo": -1.0,
             "band_hi": 1.0}
    rows = stock_rows(np.random.default_rng(RNG_SEED), 3, settings.window).astype(np.float32)
    export_saved_model(M.ForecastServing(model, settings, scale), tmp_path / "sm",
                       tf.constant(rows))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))  # kept: it owns the variables
    served = loaded.serve(tf.constant(rows))
    expected = M.decode(M.predict_z(model, rows), rows.astype(np.float64), scale, settings)
    np.testing.assert_allclose(served["forecast"].numpy(), expected[:, 0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(served["q90"].numpy(), expected[:, 3], rtol=1e-4, atol=1e-6)


def test_served_rows_of_the_wrong_shape_or_value_fail_with_a_message(tmp_path):
    # Signatures do not check a request's shape: 31 rows, or Yahoo's six
    # columns, were read as something else and answered.
    import tensorflow as tf

    from common.export import export_saved_model

    settings = Settings(window=20, vol_window=5)
    model = M.build_model(settings, ([0.0] * 4, [1.0] * 4), units=4, dropout=0.0)
    scale = {"mean": 0.0, "std": 1.0, "shrink": 0.5, "vol_floor": 1e-3, "band_lo": -1.0,
             "band_hi": 1.0}
    rows = stock_rows(np.random.default_rng(RNG_SEED), 2, 21).astype(np.float32)
    export_saved_model(M.ForecastServing(model, settings, scale), tmp_path / "sm",
                       tf.constant(rows[:, 1:]))
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    assert serve(rows=tf.constant(rows[:, 1:]))["forecast"].shape == (2,)
    assert serve(rows=tf.zeros([0, 20, 5]))["forecast"].shape == (0,)
    zero_price, nan, negative_volume = (rows[:, 1:].copy() for _ in range(3))
    zero_price[1, -1, 3] = 0.0
    nan[0, 5, 0] = np.nan
    negative_volume[0, 0, 4] = -1.0
    for bad, message in [
            (rows, r"expected shape \[batch, 20, 5\]: the last 20 rows of Open, High, Low, "
                   r"Close, Volume, oldest first; got\] \[2 21 5\]"),
            (np.concatenate([rows[:, 1:], rows[:, 1:, :1]], axis=2), r"got\] \[2 20 6\]"),
            (zero_price, r"a price \(Open, High, Low, Close\) is not positive \(a return "
                         r"target needs positive values\)"),
            (nan, "NaN or infinite"),
            (negative_volume, "a Volume is negative")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(rows=tf.constant(bad))
    # A one-column series (here --target volume --target-kind return) has its
    # own rule: every value positive, as when its CSV is read.
    settings = Settings(window=20, vol_window=5, mode="series", target="volume",
                        features=("returns", "volatility"))
    model = M.build_model(settings, ([0.0] * 2, [1.0] * 2), units=4, dropout=0.0)
    series = rows[:, 1:, 4:5] / 1e6
    export_saved_model(M.ForecastServing(model, settings, scale), tmp_path / "series",
                       tf.constant(series))
    serve = tf.saved_model.load(str(tmp_path / "series")).signatures["serving_default"]
    series[0, 3, 0] = 0.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="a Volume value is not positive"):
        serve(rows=tf.constant(series))
    # As a level it may be zero, but, as in its CSV, never negative.
    level = Settings(window=20, vol_window=5, mode="series", target="volume",
                     target_kind="level", features=("level", "change", "volatility"))
    model = M.build_model(level, ([0.0] * 3, [1.0] * 3), units=4, dropout=0.0)
    export_saved_model(M.ForecastServing(model, level, scale), tmp_path / "level",
                       tf.constant(series))
    serve = tf.saved_model.load(str(tmp_path / "level")).signatures["serving_default"]
    series[0, 3, 0] = -5.0
    with pytest.raises(tf.errors.InvalidArgumentError, match="a Volume is negative"):
        serve(rows=tf.constant(series))


def test_walk_forward_band_recovers_80_percent_after_a_regime_shift():
    rng = np.random.default_rng(RNG_SEED)
    lo, hi = -1.2816, 1.2816  # the 10/90% quantiles of N(0, 1): fitted in a turbulent regime
    calm = rng.normal(0.0, 0.5, 4000)  # then volatility halves
    ticker = np.zeros(len(calm), int)
    lo_t, hi_t, _ = M.track_band(calm, ticker, lo, hi, rate=0.01)
    fixed = np.mean((calm >= lo) & (calm <= hi))
    walked = (calm >= lo_t) & (calm <= hi_t)
    assert fixed > 0.95
    assert np.mean(walked[1000:]) == pytest.approx(0.8, abs=0.03)
    assert np.mean(calm[1000:] < lo_t[1000:]) == pytest.approx(0.1, abs=0.03)
    # Rate 0 is the fixed band.
    lo0, hi0, _ = M.track_band(calm, ticker, lo, hi, rate=0.0)
    assert np.all(lo0 == lo) and np.all(hi0 == hi)


@pytest.mark.parametrize("lag", [1, 3])
def test_walk_forward_band_uses_only_outcomes_known_before_each_forecast(lag):
    rng = np.random.default_rng(RNG_SEED)
    residual = rng.normal(0.0, 1.0, 200)
    ticker = np.zeros(200, int)
    lo_t, hi_t, final = M.track_band(residual, ticker, -1.0, 1.0, rate=0.05, lag=lag)
    changed = residual.copy()
    changed[120:] += 10.0  # every later outcome far above the band
    lo_c, hi_c, _ = M.track_band(changed, ticker, -1.0, 1.0, rate=0.05, lag=lag)
    np.testing.assert_array_equal(hi_c[:120 + lag], hi_t[:120 + lag])
    assert np.all(hi_c[120 + lag:] > hi_t[120 + lag:])
    # `final` is what the next forecast would get once the last outcomes are in.
    more = np.r_[residual, np.zeros(lag)]
    lo_m, hi_m, _ = M.track_band(more, np.zeros(200 + lag, int), -1.0, 1.0, rate=0.05, lag=lag)
    assert final["0"] == (lo_m[-1], hi_m[-1])
    assert np.all(lo_t <= 0) and np.all(hi_t >= 0)


def test_walk_forward_band_walks_each_file_from_the_validation_offsets():
    rng = np.random.default_rng(RNG_SEED)
    a, b = rng.normal(0.0, 3.0, 300), rng.normal(0.0, 0.3, 300)
    ticker = np.array(["a"] * 300 + ["b"] * 300)
    lo_t, hi_t, final = M.track_band(np.r_[a, b], ticker, -1.0, 1.0, rate=0.02)
    assert (lo_t[0], hi_t[0]) == (lo_t[300], hi_t[300]) == (-1.0, 1.0)
    alone_b = M.track_band(b, np.full(300, "b"), -1.0, 1.0, rate=0.02)
    np.testing.assert_array_equal(hi_t[300:], alone_b[1])
    assert final["a"][1] > 1.0 > final["b"][1]  # wide file widened, calm file narrowed


def test_forecast_known_walks_the_band_with_the_horizon_as_lag(monkeypatch):
    import dataclasses

    settings = dataclasses.replace(Settings(window=20, vol_window=5), horizon=3)
    rng = np.random.default_rng(RNG_SEED)
    n = 300
    rows = stock_rows(rng, n, settings.window)
    w = windows(rows, rng.normal(0, 0.02, n), rows[:, -1, 3])
    z = np.sort(rng.normal(0, 0.1, (n, 4)), axis=1)[:, [1, 0, 1, 3]]
    monkeypatch.setattr(M, "predict_z", lambda model, x, batch_size=256: z)
    scale = {"mean": 0.0, "std": 1.0, "shrink": 1.0, "vol_floor": 1e-3, "band_lo": -0.5,
             "band_hi": 0.5, "band_rate": 0.05}
    pred, final = M.forecast_known(None, w, scale, settings)
    residual = M.encode(w, scale, settings) - z[:, 2]
    lo, hi, expected = M.track_band(residual, w.ticker, -0.5, 0.5, rate=0.05, lag=3)
    walked = M.decode(z, w.x.astype(np.float64), scale, settings, (lo, hi))
    np.testing.assert_allclose(pred["q10"], walked[:, 1])
    np.testing.assert_allclose(pred["q90"], walked[:, 3])
    assert final == expected
    # The unmoved band rides along, and equals what predict_units gives.
    fixed = M.predict_units(None, w.x, scale, settings)
    np.testing.assert_allclose(pred["q10_fixed"], fixed["q10"])
    np.testing.assert_allclose(pred["forecast"], fixed["forecast"])
    assert not np.allclose(pred["q10"], fixed["q10"])  # the wide validation band narrowed
    # The SavedModel's band: where the walk ended.
    assert M.walked_scale(scale, final)["band_lo"] == pytest.approx(final["t"][0])


@pytest.mark.parametrize("scale", [
    {"mean": 0.0, "std": 1.0, "band": 2.0},  # a run from before the offsets
    {"mean": 0.0, "std": 1.0, "band_lo": -1.0, "band_hi": 1.0, "shrink": 1.0},  # no rate
    {"mean": 0.0, "std": 1.0, "band_lo": -1.0, "band_hi": 1.0, "band_rate": 0.0},
])
def test_runs_without_a_band_rate_keep_their_fixed_band(monkeypatch, scale):
    settings = Settings(window=20, vol_window=5)
    rng = np.random.default_rng(RNG_SEED)
    rows = stock_rows(rng, 50, settings.window)
    w = windows(rows, rng.normal(0, 0.02, 50), rows[:, -1, 3])
    z = np.sort(rng.normal(0, 0.1, (50, 4)), axis=1)[:, [1, 0, 1, 3]]
    monkeypatch.setattr(M, "predict_z", lambda model, x, batch_size=256: z)
    pred, final = M.forecast_known(None, w, scale, settings)
    assert final == {} and "q10_fixed" not in pred
    np.testing.assert_allclose(pred["q90"], M.predict_units(None, w.x, scale, settings)["q90"])
    assert M.walk_ends(None, w, scale, settings) == {}
    assert M.walked_scale(scale, {}) is scale
