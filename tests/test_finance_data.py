"""apps.finance data: layouts, validation errors, leak-free splits, features, baseline metrics."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from apps.finance import data as D
from apps.finance import evaluation as E
from apps.finance.synthetic import write_csv
from common.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "apps" / "finance" / "samples" / "spy_sample.csv"


def ohlcv_csv(path, rows=200, layout="stooq", seed=0):
    """A random-walk OHLCV file in the Yahoo or Stooq/Kaggle layout."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, rows)))
    dates = np.datetime64("2010-01-04") + np.arange(rows)
    lines = (["Date,Open,High,Low,Close,Adj Close,Volume"] if layout == "yahoo"
             else ["date,open,high,low,close,volume,openint"])
    for d, c in zip(dates, close, strict=True):
        o, h, lo, v = c * 0.999, c * 1.01, c * 0.99, int(rng.integers(1e5, 1e6))
        lines.append(f"{d},{o:.4f},{h:.4f},{lo:.4f},{c:.4f},{c * 0.5:.4f},{v}" if layout ==
                     "yahoo" else f"{d},{o:.4f},{h:.4f},{lo:.4f},{c:.4f},{v},0")
    path.write_text("\n".join(lines) + "\n")
    return path


def settings_for(path, **kw):
    kw.setdefault("window", 20)
    kw.setdefault("vol_window", 5)
    target, kind = kw.pop("target", None), kw.pop("target_kind", "auto")
    return D.resolve_settings(path, target=target, target_kind=kind, **kw)


def load(path, **kw):
    s = settings_for(path, **kw)
    return s, D.load_series(path, s)


def edit_line(path, line_no, new):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new
    path.write_text("\n".join(lines) + "\n")


# -- layouts -------------------------------------------------------------------


def test_layouts_are_recognised(tmp_path):
    s, series = load(SAMPLE)
    assert (s.mode, s.target_kind, s.raw_columns) == ("ohlcv", "return", D.OHLCV)
    assert series[0].values.shape == (756, 5)
    # Yahoo: Adj Close (here half the close) is the close that returns are computed on.
    yahoo = ohlcv_csv(tmp_path / "y.csv", layout="yahoo")
    s, series = load(yahoo)
    raw = np.genfromtxt(yahoo, delimiter=",", skip_header=1, usecols=(4, 5))
    np.testing.assert_allclose(series[0].values[:, 3], raw[:, 1])
    # Any date + numeric target column: a level series by default.
    temps = write_csv(tmp_path / "t.csv", days=300)
    s, series = load(temps, target="Temp")
    assert (s.mode, s.target_kind, s.raw_columns) == ("series", "level", ("temp",))
    assert series[0].values.shape == (300, 1)


def test_folder_of_tickers_and_common_cut_dates(tmp_path):
    ohlcv_csv(tmp_path / "aaa.us.txt", rows=400, seed=1)
    ohlcv_csv(tmp_path / "bbb.csv", rows=380, seed=2)
    (tmp_path / "notes.md").write_text("not data")
    s, series = load(tmp_path)
    assert [x.name for x in series] == ["aaa", "bbb"]
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    parts = D.split(series, s)
    assert set(parts["test"].ticker) <= {"aaa", "bbb"}
    # Same cut dates for every file: no test date of one ticker precedes a train date.
    assert parts["train"].dates.max() < parts["test"].dates.min()
    test = parts["test"]
    stats = E.train_stats(parts["train"], "return")
    zero = np.zeros(len(test))
    table = E.compare_by_ticker({"forecast": zero, "q10": zero - 1, "q50": zero,
                                 "q90": zero + 1}, test, stats, "return")
    assert set(table["by_ticker"]) == {"aaa", "bbb"}
    assert sum(t["examples"] for t in table["by_ticker"].values()) == table["examples"]
    assert table["model"]["mae"] == pytest.approx(table["persistence"]["mae"])


# -- validation errors -----------------------------------------------------------


@pytest.mark.parametrize("line, content, expected", [
    (5, "2010-13-45,1,2,0.5,1,100,0", r"line 5, column 'date': cannot parse date '2010-13-45'"),
    (5, "2010-01-07,1,2,0.5,0,100,0", r"line 5, column 'close': price 0 is not positive"),
    (5, "2010-01-07,1,2,0.5,abc,100,0", r"line 5, column 'close': 'abc' is not a number"),
    (6, "2010-01-04,1,2,0.5,1,100,0", r"lines 2 and 6, column 'date': duplicate date"),
    (7, "2010-01-09,1,2,0.5,,100,0", r"line 7, column 'close': missing value"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, line, content, expected):
    path = ohlcv_csv(tmp_path / "p.csv")
    edit_line(path, line, content)
    with pytest.raises(UserError, match=str(path).replace(".", r"\.") + ": " + expected):
        load(path)


def rewrite_dates(path, fmt: str):
    """`path` with its ISO dates rewritten in the strftime format `fmt`."""
    import datetime

    head, *rows = path.read_text().splitlines()
    rows = [datetime.date.fromisoformat(r[:10]).strftime(fmt) + r[10:] for r in rows]
    path.write_text("\n".join([head, *rows]) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%d-%b-%Y", "%m/%d/%y",
                                 "%d/%m/%y", "%Y-%m-%d 00:00:00-05:00"])
def test_one_date_format_per_file_day_or_month_first(tmp_path, capsys, fmt):
    # Day-first files begin with dates that also read month-first (04/01/2010):
    # a per-date guess would scramble them; the whole file decides.
    _, iso = load(ohlcv_csv(tmp_path / "iso.csv"))
    _, other = load(rewrite_dates(ohlcv_csv(tmp_path / "other.csv"), fmt))
    assert np.array_equal(other[0].dates, iso[0].dates)
    assert "warning" not in capsys.readouterr().err


def test_mixed_or_ambiguous_date_formats_are_refused(tmp_path):
    path = rewrite_dates(ohlcv_csv(tmp_path / "p.csv"), "%d/%m/%Y")
    edit_line(path, 30, "01/31/2010" + path.read_text().splitlines()[29][10:])  # month first
    with pytest.raises(UserError, match=r"line 30, column 'date': cannot parse date "
                                        r"'01/31/2010' \(expected one format"):
        load(path)
    # Two dates that read both ways, each reading in order: nothing can decide.
    path = tmp_path / "two.csv"
    path.write_text("date,open,high,low,close,volume\n01/02/2010,1,2,0.5,1,100\n"
                    "02/01/2010,1,2,0.5,1,100\n")
    with pytest.raises(UserError, match=r"reads both as %m/%d/%Y and as %d/%m/%Y"):
        load(path, window=5, vol_window=2)


def test_monthly_dates_on_the_first_and_time_zones(tmp_path):
    # 1/1, 2/1, ... 12/1 reads day-first too (12 days, then a year's jump):
    # the regular, monthly reading wins.
    path = tmp_path / "monthly.csv"
    days = [f"{m}/1/{y}" for y in range(2015, 2020) for m in range(1, 13)]
    path.write_text("date,value\n" + "".join(f"{d},{i + 1}\n" for i, d in enumerate(days)))
    _, series = load(path, target="value", window=5, vol_window=2)
    assert str(series[0].dates[1])[:10] == "2015-02-01"
    # yfinance's offsets change with daylight saving time: the local date is kept.
    path = rewrite_dates(ohlcv_csv(tmp_path / "tz.csv", rows=200), "%Y-%m-%d 00:00:00-05:00")
    lines = path.read_text().splitlines()
    lines[100:] = [line.replace("-05:00", "-04:00") for line in lines[100:]]
    path.write_text("\n".join(lines) + "\n")
    _, iso = load(ohlcv_csv(tmp_path / "iso.csv"))
    assert np.array_equal(load(path)[1][0].dates, iso[0].dates)


def test_unsorted_dates_are_sorted_with_a_warning(tmp_path, capsys):
    path = ohlcv_csv(tmp_path / "p.csv")
    lines = path.read_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    path.write_text("\n".join(lines) + "\n")
    _, series = load(path)
    assert "not in ascending order" in capsys.readouterr().err
    assert np.all(np.diff(series[0].dates) > np.timedelta64(0))


def test_missing_value_policies(tmp_path):
    path = ohlcv_csv(tmp_path / "p.csv")
    edit_line(path, 7, "2010-01-09,,,,,,0")
    _, dropped = load(path, missing="drop")
    assert len(dropped[0].dates) == 199
    _, filled = load(path, missing="ffill")
    assert len(filled[0].dates) == 200
    np.testing.assert_array_equal(filled[0].values[5], filled[0].values[4])


def test_target_not_numeric_and_missing_column(tmp_path):
    temps = write_csv(tmp_path / "t.csv", days=300)
    edit_line(temps, 10, '"2001-01-09",warm')
    with pytest.raises(UserError, match=r"line 10, column 'Temp': 'warm' is not a number"):
        load(temps, target="temp")
    with pytest.raises(UserError, match=r"no column 'close'.*pass --target"):
        load(temps)
    semicolons = ohlcv_csv(tmp_path / "semi.csv")
    semicolons.write_text(semicolons.read_text().replace(",", ";"))
    with pytest.raises(UserError, match=r"separated by ';', and a CSV for --data needs commas"):
        load(semicolons)


def test_too_short_series_and_window(tmp_path):
    path = ohlcv_csv(tmp_path / "p.csv", rows=60)
    with pytest.raises(UserError, match=r"--window 100 is longer than the series \(60 rows"):
        load(path, window=100)
    s, series = load(path, window=20)
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    with pytest.raises(UserError, match=r"60 rows are too few for --window 20"):
        D.split(series, s)
    with pytest.raises(UserError, match=r"--window 6 must be at least --vol-window 5 \+ 2"):
        settings_for(path, window=6)


def test_two_files_that_would_be_one_ticker(tmp_path):
    ohlcv_csv(tmp_path / "spy.csv", rows=300, seed=1)
    ohlcv_csv(tmp_path / "spy.us.txt", rows=300, seed=2)
    with pytest.raises(UserError, match=r"spy\.csv and .*spy\.us\.txt would both be ticker "
                                        r"'spy'"):
        load(tmp_path)


def test_folder_without_csv(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(UserError, match=r"the folder has no \.csv or \.txt files"):
        D.list_files(tmp_path)


def test_negative_levels_need_the_level_kind(tmp_path):
    temps = write_csv(tmp_path / "t.csv", days=300)
    edit_line(temps, 5, '"2001-01-04",-1.5')
    load(temps, target="temp")  # level: fine
    with pytest.raises(UserError, match=r"line 5, column 'Temp': price -1.5 .*--target-kind level"):
        load(temps, target="temp", target_kind="return")


# -- splits: no leakage ---------------------------------------------------------------


def test_split_is_chronological_with_a_window_gap():
    s, series = load(SAMPLE)
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    parts = D.split(series, s)
    dates = series[0].dates
    val_cut, test_cut = (np.datetime64(d) for d in s.cut_dates)
    assert parts["train"].dates.max() < val_cut  # train targets before the cut
    first_input = {}
    for name in ("validation", "test"):
        # The target date is `horizon` rows after the window's last row.
        end = np.searchsorted(dates, parts[name].dates) - s.horizon
        first_input[name] = dates[end - s.window + 1].min()
    cut_rows = {n: np.searchsorted(dates, c) for n, c in
                (("validation", val_cut), ("test", test_cut))}
    for name in ("validation", "test"):
        assert np.searchsorted(dates, first_input[name]) >= cut_rows[name] + s.window
    assert parts["validation"].dates.max() < test_cut
    # Targets are next-day log returns of the close.
    close = series[0].values[:, 3]
    i = np.searchsorted(dates, parts["test"].dates[0])
    assert parts["test"].y[0] == pytest.approx(np.log(close[i] / close[i - 1]))


def test_feature_scaler_sees_only_training_windows():
    import tensorflow as tf

    from apps.finance.model import feature_layer, fit_feature_scaler

    s, series = load(SAMPLE)
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    parts = D.split(series, s)
    before = fit_feature_scaler(s, parts["train"].x)
    # Wild test-period prices must not move the scaler.
    series[0].values[-200:, :4] *= np.linspace(1, 5, 200)[:, None]
    after = fit_feature_scaler(s, D.split(series, s)["train"].x)
    np.testing.assert_allclose(before, after)
    # The features layer matches a direct numpy computation.
    x = parts["train"].x[:3].astype(np.float64)
    f = feature_layer(s)(tf.constant(x, tf.float32)).numpy()
    close, k = x[:, :, 3], s.vol_window
    ret = np.diff(np.log(close), axis=1)
    np.testing.assert_allclose(f[:, :, 0], ret[:, k - 1:], atol=1e-5)
    np.testing.assert_allclose(f[:, :, 1], np.log(x[:, 1:, 1] / x[:, 1:, 2])[:, k - 1:],
                               atol=1e-5)
    np.testing.assert_allclose(f[:, -1, 3], ret[:, -k:].std(axis=1), atol=1e-5)
    assert f.shape == (3, s.steps, 4)


# -- metrics -----------------------------------------------------------------------


def test_baselines_and_metrics():
    s, series = load(SAMPLE)
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    parts = D.split(series, s)
    stats = E.train_stats(parts["train"], "return")
    test = parts["test"]
    perfect = {"forecast": test.y, "q10": test.y - 1, "q50": test.y, "q90": test.y + 1}
    table = E.compare(perfect, test, stats, "return")
    assert table["persistence"]["mase"] == pytest.approx(1.0)
    assert table["model"]["mae"] == 0 and table["model"]["mase"] == 0
    assert table["model"]["coverage_10_90"] == 1.0
    up = float(np.mean(test.y > 0))
    assert table["always_up"]["directional_accuracy"] == pytest.approx(up)
    assert table["persistence"]["directional_accuracy"] == pytest.approx(1 - up)
    low, high = E.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    folds = E.walk_forward(perfect, test, stats, "return", 3)
    assert sum(f["examples"] for f in folds) == len(test)
    assert folds[0]["last_date"] <= folds[1]["first_date"]


def test_band_calibration_hits_the_target_coverage():
    from apps.finance.model import calibrate_band, widen_band

    rng = np.random.default_rng(0)
    y = rng.normal(0, 2.0, 2000)  # the heads below think the scale is 1
    z = np.stack([np.zeros_like(y), np.full_like(y, -1.2816), np.zeros_like(y),
                  np.full_like(y, 1.2816)], axis=1)
    band = calibrate_band(z, y)
    assert band == pytest.approx(2.0, rel=0.1)
    wide = widen_band(z, band)
    assert np.mean((y >= wide[:, 1]) & (y <= wide[:, 3])) == pytest.approx(0.8, abs=0.01)
    np.testing.assert_array_equal(wide[:, [0, 2]], z[:, [0, 2]])


@pytest.mark.parametrize("kind", ["return", "price"])
def test_encode_decode_round_trip_numpy_and_tf(kind):
    import tensorflow as tf

    from apps.finance import model as M

    s, series = load(SAMPLE, target_kind=kind)
    s = dataclasses.replace(s, cut_dates=D.cut_dates(series, s))
    parts = D.split(series, s)
    scale = M.fit_target_scale(parts["train"], s)
    z_train = M.encode(parts["train"], scale, s)
    assert abs(z_train.mean()) < 1e-6 and z_train.std() == pytest.approx(1.0)
    test = parts["test"]
    z = np.repeat(M.encode(test, scale, s)[:, None], 4, axis=1)
    back = M.decode(z, test.x.astype(np.float64), scale, s)
    np.testing.assert_allclose(back[:, 0], test.y, rtol=1e-6, atol=1e-8)
    in_tf = M.decode(tf.constant(z, tf.float32), tf.constant(test.x), scale, s).numpy()
    np.testing.assert_allclose(in_tf[:, 0], test.y, rtol=1e-4, atol=1e-5)
    # Volatility scaling: calm windows get a smaller unit than turbulent ones.
    vol = M.recent_vol(test.x, s)
    assert vol.shape == (len(test),) and np.all(vol > 0) and vol.std() > 0
