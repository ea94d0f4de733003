"""lstm-finance: forecast daily series (stock prices, temperatures) and compare with naive baselines.

    python -m apps.finance forecast train    --run-dir runs/spy            # bundled SPY sample
    python -m apps.finance forecast evaluate --run-dir runs/spy --json
    python -m apps.finance forecast predict  --run-dir runs/spy --data prices.csv
    python -m apps.finance forecast export   --run-dir runs/spy --out /tmp/spy_model

    python -m apps.finance forecast train --run-dir runs/temp --data temps.csv \\
        --target Temp --target-kind level --window 40

Flow: data.py (CSV -> validated series -> date-split windows) -> model.py (raw
rows -> features -> LSTM -> point + quantiles) -> common.training.train ->
evaluation.py (model vs persistence / historical mean / always-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from common.cli import (
    build_parser,
    dropout_rate,
    non_negative_float,
    positive_float,
    positive_int,
    print_json,
    run_main,
)
from common.errors import UserError

APP, TASK = "finance", "forecast"
SAMPLE = Path(__file__).parent / "samples" / "spy_sample.csv"


def fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text}")
    return value


def feature_list(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def make_parser():
    from apps.finance.data import BAND_RATE, MISSING_POLICIES, TARGET_KINDS

    parser, commands = build_parser(
        "lstm-finance",
        "Forecast daily time series (stock prices, temperatures) with an LSTM, always side "
        "by side with naive baselines (persistence, historical mean, always-up). Splits "
        "are chronological with a one-window gap; scalers see the training part only.",
        {TASK: "forecast the value h days ahead, with 10/50/90%% quantiles"},
        train_defaults={TASK: {"epochs": 20, "batch_size": 64, "patience": 5}})
    train = commands[TASK, "train"]
    train.add_argument("--target", metavar="COLUMN",
                       help="column to forecast; default: Close (Adj Close when present). "
                            "Any other numeric column makes a single-series model")
    train.add_argument("--target-kind", choices=TARGET_KINDS, default="auto",
                       help="return: next-h-day log return; price: the price itself; level: "
                            "the raw value (series that can be <= 0, e.g. temperatures); "
                            "auto: return for prices, level for another --target")
    train.add_argument("--window", type=positive_int, default=30,
                       help="raw rows per example: what predict and the SavedModel take")
    train.add_argument("--horizon", type=positive_int, default=1,
                       help="forecast this many rows (trading days) ahead")
    train.add_argument("--features", type=feature_list, default=None,
                       help="comma-separated features; prices: returns,range,volume,"
                            "volatility (default all); levels: level,change,volatility")
    train.add_argument("--vol-window", type=positive_int, default=10,
                       help="rows of the rolling volatility; also the warm-up, so the LSTM "
                            "sees window - vol-window steps")
    train.add_argument("--val-fraction", type=fraction, default=0.15,
                       help="share of rows (by date) for validation")
    train.add_argument("--test-fraction", type=fraction, default=0.15,
                       help="share of rows (by date, the latest) for the test part")
    train.add_argument("--missing", choices=MISSING_POLICIES, default="fail",
                       help="what to do with empty cells: fail, drop the row, or forward-fill")
    train.add_argument("--units", type=positive_int, default=32, help="LSTM units per layer")
    train.add_argument("--layers", type=positive_int, default=1, help="stacked LSTM layers")
    train.add_argument("--dropout", type=dropout_rate, default=0.0,
                       help="input dropout of every LSTM layer")
    train.add_argument("--point-loss", choices=("mae", "huber", "mse"), default="mae",
                       help="loss of the point head (on the standardised target); mae matches "
                            "the headline metric and forecasts the median")
    train.add_argument("--no-vol-scaling", dest="scale_by_volatility", action="store_false",
                       help="forecast raw standardised returns instead of returns in units "
                            "of the window's recent volatility (prices only)")
    train.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                       help="use the model as trained: the quantile heads' own 10-90%% band "
                            "and the point head unchanged, instead of a band fitted to cover "
                            "80%% of the validation part and a point forecast shrunk toward "
                            "persistence by the weight that minimises the validation MAE")
    train.add_argument("--band-rate", type=non_negative_float, default=None, metavar="RATE",
                       help="step of the walk-forward 10-90%% band: evaluate, predict and "
                            "the SavedModels move each edge by RATE x (missed - 0.1) after "
                            "every outcome known before the next forecast (in units of the "
                            "standardised, volatility-scaled change), so the band keeps "
                            "covering 80%% when the volatility regime shifts; 0 keeps the "
                            f"band fitted on the validation part fixed (default {BAND_RATE:g})")
    evaluate = commands[TASK, "evaluate"]
    evaluate.add_argument("--walk-forward", type=positive_int, default=1, metavar="K",
                          help="also report the metrics on K consecutive date blocks of the "
                               "test part (the model is not refit)")
    evaluate.add_argument("--no-plots", action="store_true",
                          help="skip the PNG and TensorBoard plots")
    predict = commands[TASK, "predict"]
    predict.add_argument("--data", metavar="PATH",
                         help="CSV file or folder; forecasts from the last --window rows of "
                              "each file; default: the data the run was trained on")
    predict.add_argument("--json", action="store_true",
                         help="print the forecasts as one JSON object on the last line")
    return parser


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def handle(args: argparse.Namespace) -> int:
    return {"train": train, "evaluate": evaluate, "predict": predict,
            "export": export}[args.command](args)


def _check_resume_data(run_dir: str, data_path: Path, fingerprint: str) -> None:
    """Refuse to resume on other rows: the split, scalers and baselines were fitted on
    the run's data. (Runs from before the fingerprint are not checked.)"""
    from common import runs

    config = runs.stored_config(run_dir, app=APP, task=TASK)
    stored = (config or {}).get("app_settings", {}).get("data_fingerprint")
    if stored is not None and stored != fingerprint:
        raise UserError(f"--resume: {Path(run_dir).absolute()} was trained on other data than "
                        f"--data {data_path} holds (trained on {config.get('data')}; the "
                        "tickers, dates or values differ); resume with the run's data, or "
                        "choose another --run-dir")


def train(args: argparse.Namespace) -> int:
    from apps.finance import data as D

    if not args.calibrate and args.band_rate is not None:
        raise UserError("--band-rate: the walk-forward band starts from the band fitted on "
                        "the validation part, which --no-calibrate turns off; drop one of them")
    data_path = Path(args.data) if args.data else SAMPLE
    # Everything about the data is checked before the run directory is touched.
    settings = D.resolve_settings(
        data_path, target=args.target, target_kind=args.target_kind, window=args.window,
        horizon=args.horizon, features=args.features, vol_window=args.vol_window,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, missing=args.missing,
        scale_by_volatility=args.scale_by_volatility)
    if args.resume:
        # Flags that keep the weight shapes can still change what the model
        # forecasts (--target-kind, --horizon) or from what (--window): refused.
        from common import runs

        runs.check_resume_settings(
            args.run_dir, {f"data.{key}": value for key, value in settings.to_json().items()
                           if key != "cut_dates"}, app=APP, task=TASK)
    series = D.load_series(data_path, settings)
    fingerprint = D.fingerprint(series)
    if args.resume:
        _check_resume_data(args.run_dir, data_path, fingerprint)
    settings = dataclasses.replace(settings, cut_dates=D.cut_dates(series, settings))
    parts = D.split(series, settings)

    import numpy as np

    from apps.finance import evaluation
    from apps.finance import model as M
    from common import runs, training

    kind = settings.target_kind
    scale = M.fit_target_scale(parts["train"], settings)
    scaler = M.fit_feature_scaler(settings, parts["train"].x)
    hparams = {"units": args.units, "layers": args.layers, "dropout": args.dropout,
               "point_loss": args.point_loss}

    def arrays(w):
        z = M.encode(w, scale, settings).astype(np.float32)[:, None]
        return w.x, {"point": z, "quantiles": z}

    stats = evaluation.train_stats(parts["train"], kind)
    app_settings = {"data": settings.to_json(), "data_fingerprint": fingerprint,
                    "target_scale": scale, "feature_scaler": scaler,
                    "model": hparams, "baseline_stats": stats,
                    "examples": {k: len(v) for k, v in parts.items()}}
    print(f"data: {data_path} ({len(series)} file(s)); examples train "
          f"{len(parts['train'])}, validation {len(parts['validation'])}, test "
          f"{len(parts['test'])}; validation from {settings.cut_dates[0]}, test from "
          f"{settings.cut_dates[1]}", flush=True)

    walked = {}  # the test part's forecasts with the walk-forward band, and its end

    def serving(model):
        # Called by `train` with the best weights, before the SavedModel is written.
        # The band and the point shrinkage are fitted on the validation part only;
        # the band then walks through the test part's outcomes, each forecast using
        # only those before it, and the SavedModel carries where the walk ended.
        val = parts["validation"]
        if args.calibrate and len(val) >= 20:
            rate = D.BAND_RATE if args.band_rate is None else args.band_rate
            scale.update(M.calibrate(M.predict_z(model, val.x), val, scale, settings, rate))
        elif args.calibrate:
            print(f"warning: only {len(val)} validation windows (fewer than 20): the model "
                  "is used as trained, with its own 10-90% band", file=sys.stderr)
        walked["pred"], walked["final"] = M.forecast_known(model, parts["test"], scale, settings)
        return M.ForecastServing(model, settings, M.walked_scale(scale, walked["final"]))

    with runs.open_run(args.run_dir, app=APP, task=TASK, resume=args.resume) as run:
        result = training.train(
            run, training.TrainConfig.from_args(args),
            lambda: M.build_model(settings, scaler, units=args.units, layers=args.layers,
                                  dropout=args.dropout),
            arrays(parts["train"]), arrays(parts["validation"]), arrays(parts["test"]),
            loss={"point": args.point_loss, "quantiles": M.pinball_loss},
            data_source=str(data_path.absolute()), settings=app_settings,
            serving=serving,
            serving_sample=parts["test"].x[:4],
            probe_inputs=parts["validation"].x[:16])
        test = parts["test"]
        pred = walked["pred"]  # `train` called `serving` with the model it returned
        table = evaluation.compare_by_ticker(pred, test, stats, kind)
        runs.write_json(run.metrics, {**result.metrics, "comparison": table})
        config = run.read_config()
        config["app_settings"]["target_scale"] = scale  # now with the calibration
        runs.write_json(run.config, config)
    print(summary_table(table, kind))
    return 0


def _load(args: argparse.Namespace):
    """The run, its settings, and its model (imports TensorFlow)."""
    from apps.finance.data import Settings
    from common import runs

    # Checked before TensorFlow is imported: a wrong --run-dir fails at once.
    run = runs.load_run(args.run_dir, app=APP, task=TASK)
    from apps.finance import model as M  # noqa: F401  (registers the custom layers)

    config = run.read_config()
    app = run.app_settings("data")
    return run, config, Settings.from_json(app["data"]), app


def _data_path(args, config, run) -> Path:
    if getattr(args, "data", None):
        return Path(args.data)
    if not config.get("data"):
        raise UserError(f"--run-dir {run.root}: config.json names no data; pass --data")
    return Path(config["data"])


def evaluate(args: argparse.Namespace) -> int:
    run, config, settings, app = _load(args)
    from apps.finance import data as D
    from apps.finance import evaluation
    from apps.finance import model as M

    series = D.load_series(_data_path(args, config, run), settings)
    test = D.test_part(series, settings)
    model = run.load_model()
    kind = settings.target_kind
    pred, _ = M.forecast_known(model, test, app["target_scale"], settings, args.batch_size)
    stats = app["baseline_stats"]
    table = evaluation.compare_by_ticker(pred, test, stats, kind)
    table["target_kind"], table["horizon"] = kind, settings.horizon
    table["test_from"] = settings.cut_dates[1]
    if args.walk_forward > 1:
        if args.walk_forward > len(test):
            raise UserError(f"--walk-forward {args.walk_forward}: only {len(test)} test windows")
        table["walk_forward"] = evaluation.walk_forward(pred, test, stats, kind,
                                                        args.walk_forward)
    if not args.no_plots:
        written = evaluation.plot(pred, test, settings, run.root / "plots", run.logs)
        print(f"plots: {', '.join(str(p) for p in written)}")
    print(summary_table(table, kind))
    if args.json:
        print_json(table)
    return 0


def predict(args: argparse.Namespace) -> int:
    run, config, settings, app = _load(args)
    import numpy as np

    from apps.finance import data as D
    from apps.finance import model as M

    series = D.load_series(_data_path(args, config, run), settings)
    latest = D.latest_windows(series, settings)
    model, scale = run.load_model(), app["target_scale"]
    # The walk-forward band learns from every outcome in the data's test part
    # (after the test cut and its one-window gap).
    known = D.test_part(series, settings, allow_empty=True)
    final = M.walk_ends(model, known, scale, settings)
    offsets = None
    if final:
        fixed = (scale["band_lo"], scale["band_hi"])
        edges = np.array([final.get(str(t), fixed) for t in latest.ticker], np.float64)
        offsets = (edges[:, 0], edges[:, 1])
    pred = M.predict_units(model, latest.x, scale, settings, offsets=offsets)
    unit = {"return": "log return", "price": "price", "level": settings.target}
    out = {}
    for i, name in enumerate(latest.ticker):
        row = {k: float(v[i]) for k, v in pred.items()}
        row.update(last_date=str(latest.dates[i]), last_value=float(latest.last[i]),
                   horizon_rows=settings.horizon, unit=unit[settings.target_kind],
                   band_outcomes=int(np.sum(known.ticker == name)) if final else 0)
        out[str(name)] = row
        print(f"{name}: last {latest.dates[i]} {settings.target} {latest.last[i]:.4f}; "
              f"+{settings.horizon} rows {row['unit']}: {row['forecast']:.4f} "
              f"(10-90%: {row['q10']:.4f} .. {row['q90']:.4f})")
    if args.json:
        print_json(out)
    return 0


def export(args: argparse.Namespace) -> int:
    run, config, settings, app = _load(args)
    import numpy as np

    from apps.finance import data as D
    from apps.finance import model as M
    from common import runs
    from common.export import export_saved_model

    model = run.load_model(compile=False)
    scale = app["target_scale"]
    fitted = "band_lo" in scale or float(scale.get("band", 1.0)) != 1.0
    band = "the validation band" if fitted else "the model's own quantile heads"
    path = Path(config["data"]) if config.get("data") else None
    if path is not None and path.exists():
        series = D.load_series(path, settings)
        sample = D.latest_windows(series, settings).x[:4]
        # The band as walked forward through the data's known outcomes, as predict uses it.
        known = D.test_part(series, settings, allow_empty=True)
        final = M.walk_ends(model, known, scale, settings)
        scale = M.walked_scale(scale, final)
        if final:
            band = (f"walked through {len(known)} outcome(s) of {path}"
                    + (f", the mean of {len(final)} files' offsets" if len(final) > 1 else ""))
    else:  # a flat, positive window still exercises every op
        sample = np.full((1, settings.window, len(settings.raw_columns)), 100.0, np.float32)
        band = f"{band} ({path} not found)" if path is not None else band
    out = export_saved_model(M.ForecastServing(model, settings, scale),
                             runs.export_path(run, args.out), sample)
    print(f"exported {out} (serving_default: rows [batch, {settings.window}, "
          f"{len(settings.raw_columns)}] = {', '.join(settings.raw_columns)}); "
          f"10-90% band: {band}")
    return 0


def summary_table(table: dict[str, Any], kind: str) -> str:
    """The model-vs-baselines table, one line per forecaster."""
    lines = [f"test windows: {table['examples']} (target: {kind})",
             f"{'':16} {'MAE':>10} {'RMSE':>10} {'MASE':>6} {'dir.acc':>8} {'95% CI':>13} "
             f"{'cov10-90':>8}"]
    for name in ("model", "persistence", "historical_mean", "always_up"):
        row = table[name]
        ci = row["directional_accuracy_ci95"]
        if "mae" in row:
            lines.append(f"{name:16} {row['mae']:10.5g} {row['rmse']:10.5g} {row['mase']:6.3f} "
                         f"{row['directional_accuracy']:8.3f} [{ci[0]:.3f},{ci[1]:.3f}] "
                         f"{row['coverage_10_90']:8.3f}")
        else:
            lines.append(f"{name:16} {'':10} {'':10} {'':6} {row['directional_accuracy']:8.3f} "
                         f"[{ci[0]:.3f},{ci[1]:.3f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_main(make_parser(), handle, argv)


if __name__ == "__main__":
    sys.exit(main())
