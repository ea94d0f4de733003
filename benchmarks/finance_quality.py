"""Quality of apps.finance on the real data: model vs naive baselines, per ticker.

    .venv/bin/python benchmarks/finance_quality.py                 # all 9 tickers + weather
    .venv/bin/python benchmarks/finance_quality.py --tickers spy ko --epochs 5

Trains one model per stock file (default flags of `lstm-finance forecast
train` except the ones below, chosen once and never tuned on the test part:
early stopping looks at the validation part only) and one on the Melbourne
daily minimum temperatures (`--target Temp --target-kind level`). After
training, `train` fits the 10-90% band offsets and the point shrinkage weight
w on the validation part (see apps/finance/model.py::calibrate); the test
part is scored once. Prints the side-by-side table and writes
benchmarks/results/finance_quality.{json,txt}.

Honest targets (from the issue): stocks: MASE <= 1.0 on returns and 10-90%
coverage within 0.80 +- 0.03; temperature: MAE at least 10% below
persistence (MASE <= 0.90).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STOCKS = Path("/work/shared/data/stocks")
WEATHER = Path("/work/shared/data/weather/daily-min-temperatures.csv")
RESULTS = ROOT / "benchmarks" / "results"


def train_one(data: Path, run_dir: Path, flags: list[str]) -> tuple[dict, dict, float]:
    import keras

    from apps.finance.__main__ import main

    keras.backend.clear_session()
    started = time.monotonic()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = main(["forecast", "train", "--run-dir", str(run_dir), "--data", str(data),
                     *flags])
    if code != 0:
        raise SystemExit(f"training on {data} failed (exit {code}):\n{log.getvalue()[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The validation calibration: point shrinkage weight and band offsets.
    scale = json.loads((run_dir / "config.json").read_text())["app_settings"]["target_scale"]
    return metrics, scale, time.monotonic() - started


def row(name: str, table: dict, metrics: dict, scale: dict, seconds: float, kind: str) -> dict:
    m, p, h = table["model"], table["persistence"], table["historical_mean"]
    out = {"name": name, "kind": kind, "examples": table["examples"],
           "epochs": metrics["epochs_completed"], "best_epoch": metrics["best_epoch"],
           "seconds": round(seconds, 1), "target_scale": scale, "table": table}
    if kind == "return":
        out["target_met"] = bool(m["mase"] <= 1.0 and abs(m["coverage_10_90"] - 0.8) <= 0.03)
    else:
        out["target_met"] = bool(m["mae"] <= 0.9 * p["mae"])
    out["summary"] = (f"{name:8} {table['examples']:6d} {m['mae']:9.5g} {p['mae']:9.5g} "
                      f"{h['mae']:9.5g} {m['mase']:6.3f} {h['mase']:6.3f} "
                      f"{m['directional_accuracy']:6.3f} "
                      f"{table['always_up']['directional_accuracy']:6.3f} "
                      f"{m['coverage_10_90']:6.3f} "
                      f"{m.get('coverage_10_90_fixed_band', m['coverage_10_90']):6.3f} "
                      f"{p['coverage_10_90']:6.3f} "
                      f"{scale.get('shrink', 1.0):5.2f} "
                      f"{'yes' if out['target_met'] else 'NO':>4}")
    return out


HEADER = (f"{'series':8} {'test n':>6} {'MAE mod':>9} {'MAE pers':>9} {'MAE mean':>9} "
          f"{'MASE':>6} {'MASEmn':>6} {'dir':>6} {'up':>6} {'cov':>6} {'covF':>6} {'covP':>6} {'w':>5} {'ok':>4}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickers", nargs="*", default=None,
                        help="ticker file stems (default: every file in the stocks folder)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-minutes", type=float, default=1.5,
                        help="time budget per model")
    parser.add_argument("--skip-weather", action="store_true")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed (default: the app's); the table then goes to "
                             "results/finance_quality_seedN.{txt,json}, beside the main one")
    args = parser.parse_args()

    tickers = args.tickers or sorted(p.name.split(".")[0] for p in STOCKS.glob("*.txt"))
    common = ["--epochs", str(args.epochs), "--patience", "3", "--max-minutes",
              str(args.max_minutes), "--batch-size", "128",
              *(["--seed", str(args.seed)] if args.seed is not None else [])]
    stock_flags = [*common, "--window", "40", "--vol-window", "10", "--units", "32"]
    weather_flags = [*common, "--target", "Temp", "--target-kind", "level", "--window", "40",
                     "--vol-window", "10", "--units", "32"]
    rows = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="finance_quality_") as tmp:
        for ticker in tickers:
            data = STOCKS / f"{ticker}.us.txt"
            metrics, scale, secs = train_one(data, Path(tmp) / ticker, stock_flags)
            rows.append(row(ticker, metrics["comparison"], metrics, scale, secs, "return"))
            print(rows[-1]["summary"], flush=True)
        if not args.skip_weather:
            metrics, scale, secs = train_one(WEATHER, Path(tmp) / "weather", weather_flags)
            rows.append(row("min-temp", metrics["comparison"], metrics, scale, secs, "level"))
            print(rows[-1]["summary"], flush=True)
    text = "\n".join([
        "apps.finance quality (test part = latest 15% of dates, after a one-window gap)",
        f"stock flags: {' '.join(stock_flags)}", f"weather flags: {' '.join(weather_flags)}",
        "MAE: log-return units for stocks, degC for min-temp; MASE = MAE / persistence MAE;",
        "MASEmn = historical-mean baseline; dir = model directional accuracy, up = always-up;",
        "cov = model 10-90% coverage (walk-forward band), covF = the same model with its",
        "validation band held fixed, covP = persistence+train-quantiles coverage;",
        "w = weight of the model's forecast change, fitted on validation (0 = persistence);",
        "ok = stocks: MASE <= 1 and |cov - 0.80| <= 0.03; temperature: MAE <= 0.9 x persistence",
        HEADER, *[r["summary"] for r in rows]])
    name = "finance_quality" if args.seed is None else f"finance_quality_seed{args.seed}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.txt").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"stock_flags": stock_flags, "weather_flags": weather_flags, "rows": rows},
        indent=2, default=str) + "\n")
    print(f"wrote {RESULTS / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
