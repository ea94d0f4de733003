"""Model vs naive baselines on the same test windows, and the plots.

Baselines (all forecast the target in its units, from the same windows):

* ``persistence``: no change (a zero return; for prices and levels the last
  value). Its quantiles are the last value plus the training part's 10/50/90%
  quantiles of the change.
* ``historical_mean``: the training part's mean change (return kind and
  price kind, applied to the last value), or the training mean level (level
  kind); quantiles from the training targets the same way.
* ``always_up``: direction only: predicts "up" every time.

MASE = MAE / MAE of persistence on the same windows, so persistence scores
exactly 1.0 and anything above 1.0 is worse than doing nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from apps.finance.data import Windows
from apps.finance.model import to_change, to_units


def train_stats(train: Windows, kind: str) -> dict[str, Any]:
    """What the baselines know: statistics of the TRAINING targets only."""
    change = to_change(train.y, train.last, kind)
    return {"change_mean": float(change.mean()),
            "change_quantiles": np.quantile(change, [0.1, 0.5, 0.9]).tolist(),
            "level_mean": float(train.y.mean()),
            "level_quantiles": np.quantile(train.y, [0.1, 0.5, 0.9]).tolist()}


def baselines(test: Windows, stats: dict[str, Any], kind: str) -> dict[str, dict[str, np.ndarray]]:
    """Point and quantile forecasts of the naive baselines on `test`."""
    last = test.last
    n = len(test)
    names = ("q10", "q50", "q90")
    persistence = {"forecast": to_units(np.zeros(n), last, kind)}
    persistence.update({name: to_units(np.full(n, q), last, kind)
                        for name, q in zip(names, stats["change_quantiles"], strict=True)})
    if kind == "level":
        mean = {"forecast": np.full(n, stats["level_mean"])}
        mean.update({name: np.full(n, q) for name, q in zip(names, stats["level_quantiles"], strict=True)})
    else:
        mean = {"forecast": to_units(np.full(n, stats["change_mean"]), last, kind)}
        mean.update({k: v for k, v in persistence.items() if k != "forecast"})
    return {"persistence": persistence, "historical_mean": mean}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def direction(forecast: np.ndarray, test: Windows, kind: str) -> dict[str, Any]:
    """Directional accuracy: forecast change > 0 vs actual change > 0, with the 95% CI."""
    predicted_up = to_change(forecast, test.last, kind) > 0
    return _direction(predicted_up, to_change(test.y, test.last, kind) > 0)


def _direction(predicted_up: np.ndarray, actual_up: np.ndarray) -> dict[str, Any]:
    hits = int(np.sum(predicted_up == actual_up))
    n = len(actual_up)
    low, high = wilson_interval(hits, n)
    return {"directional_accuracy": hits / n if n else math.nan,
            "directional_accuracy_ci95": [low, high]}


def scores(pred: dict[str, np.ndarray], test: Windows, kind: str,
           persistence_mae: float) -> dict[str, Any]:
    """MAE, RMSE, MASE, direction, and quantile calibration of one forecaster."""
    err = pred["forecast"] - test.y
    mae = float(np.mean(np.abs(err)))
    out: dict[str, Any] = {
        "mae": mae,
        "rmse": float(np.sqrt(np.mean(err ** 2))),
        "mase": mae / persistence_mae if persistence_mae > 0 else math.nan,
        **direction(pred["forecast"], test, kind),
        "coverage_10_90": float(np.mean((test.y >= pred["q10"]) & (test.y <= pred["q90"]))),
        "below_q10": float(np.mean(test.y < pred["q10"])),
        "below_q50": float(np.mean(test.y < pred["q50"])),
        "below_q90": float(np.mean(test.y < pred["q90"])),
    }
    pinball = [np.mean(np.maximum(t * (test.y - pred[q]), (t - 1) * (test.y - pred[q])))
               for t, q in ((0.1, "q10"), (0.5, "q50"), (0.9, "q90"))]
    out["pinball"] = float(np.mean(pinball))
    if "q10_fixed" in pred:  # a walk-forward band: also the band it started from, unmoved
        out["coverage_10_90_fixed_band"] = float(
            np.mean((test.y >= pred["q10_fixed"]) & (test.y <= pred["q90_fixed"])))
    return out


def compare(model_pred: dict[str, np.ndarray], test: Windows, stats: dict[str, Any],
            kind: str) -> dict[str, Any]:
    """The side-by-side table: model and every baseline on the same windows."""
    base = baselines(test, stats, kind)
    persistence_mae = float(np.mean(np.abs(base["persistence"]["forecast"] - test.y)))
    table = {"model": scores(model_pred, test, kind, persistence_mae)}
    for name, pred in base.items():
        table[name] = scores(pred, test, kind, persistence_mae)
    actual_up = to_change(test.y, test.last, kind) > 0
    table["always_up"] = _direction(np.ones(len(test), bool), actual_up)
    return {"examples": len(test), **table}


def compare_by_ticker(model_pred: dict[str, np.ndarray], test: Windows, stats: dict[str, Any],
                      kind: str) -> dict[str, Any]:
    """`compare` overall and, with more than one file, per file."""
    result = compare(model_pred, test, stats, kind)
    names = np.unique(test.ticker)
    if len(names) > 1:
        result["by_ticker"] = {}
        for name in names:
            keep = test.ticker == name
            sub = _subset(test, keep)
            result["by_ticker"][str(name)] = compare(
                {k: v[keep] for k, v in model_pred.items()}, sub, stats, kind)
    return result


def _subset(w: Windows, keep: np.ndarray) -> Windows:
    return Windows(x=w.x[keep], y=w.y[keep], last=w.last[keep], dates=w.dates[keep],
                   ticker=w.ticker[keep])


def walk_forward(model_pred: dict[str, np.ndarray], test: Windows, stats: dict[str, Any],
                 kind: str, folds: int) -> list[dict[str, Any]]:
    """Roll a fixed model over `folds` consecutive date blocks of the test part."""
    order = np.argsort(test.dates, kind="stable")
    out = []
    for block in np.array_split(order, folds):
        keep = np.zeros(len(test), bool)
        keep[block] = True
        sub = _subset(test, keep)
        res = compare({k: v[keep] for k, v in model_pred.items()}, sub, stats, kind)
        res["first_date"], res["last_date"] = str(sub.dates.min()), str(sub.dates.max())
        out.append(res)
    return out


def strategy_curves(model_pred: dict[str, np.ndarray], test: Windows, kind: str,
                    horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative log return of long-when-forecast-up vs buy-and-hold (one file).

    Uses every `horizon`-th window so holding periods do not overlap.
    """
    order = np.argsort(test.dates, kind="stable")[::horizon]
    actual = to_change(test.y[order], test.last[order], kind)
    long = to_change(model_pred["forecast"][order], test.last[order], kind) > 0
    return test.dates[order], np.cumsum(actual * long), np.cumsum(actual)


def plot(model_pred: dict[str, np.ndarray], test: Windows, settings, out_dir: Path,
         logs_dir: Path | None = None) -> list[Path]:
    """PNG plots per file (and TensorBoard images): forecast vs actual, strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    kind = settings.target_kind
    unit = {"return": f"{settings.horizon}-day log return", "price": "price",
            "level": settings.target}[kind]
    for name in np.unique(test.ticker):
        keep = test.ticker == name
        order = np.argsort(test.dates[keep], kind="stable")
        dates = test.dates[keep][order]
        pred = {k: v[keep][order] for k, v in model_pred.items()}
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.fill_between(dates, pred["q10"], pred["q90"], alpha=0.3, label="10-90% band")
        ax.plot(dates, test.y[keep][order], lw=0.8, color="black", label="actual")
        ax.plot(dates, pred["forecast"], lw=0.8, color="C3", label="forecast")
        ax.set_title(f"{name}: {unit}, test part")
        ax.legend(loc="upper left")
        written.append(_save(fig, out_dir / f"forecast_{name}.png"))
        plt.close(fig)
        if kind != "level":
            sub = _subset(test, keep)
            d, strat, hold = strategy_curves({k: v[keep] for k, v in model_pred.items()}, sub,
                                             kind, settings.horizon)
            fig, ax = plt.subplots(figsize=(10, 4))
            ax.plot(d, np.expm1(strat) * 100, label="long when forecast > 0, else flat")
            ax.plot(d, np.expm1(hold) * 100, label="buy and hold")
            ax.set_ylabel("cumulative return, %")
            ax.set_title(f"{name}: illustration only, not investment advice "
                         "(no costs, no slippage)")
            ax.legend(loc="upper left")
            written.append(_save(fig, out_dir / f"strategy_{name}.png"))
            plt.close(fig)
    if logs_dir is not None:
        _tensorboard_images(written, logs_dir)
    return written


def _save(fig, path: Path) -> Path:
    import os

    # Written aside and renamed: an interrupted evaluate never leaves half a PNG.
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _tensorboard_images(paths: list[Path], logs_dir: Path) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(logs_dir / "evaluation"))
    with writer.as_default():
        for path in paths:
            image = tf.io.decode_png(tf.io.read_file(str(path)), channels=4)
            tf.summary.image(path.stem, image[None], step=0)
    writer.close()
