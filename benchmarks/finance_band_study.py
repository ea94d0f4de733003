"""How fast should the walk-forward 10-90% band move? A study on the rows BEFORE each test part.

    .venv/bin/python benchmarks/finance_band_study.py

For every stock file in ../shared/data/stocks, with the benchmark's stock
settings (window 40, volatility window 10, the default 15%/15% validation and
test parts), only the windows that end before the test part's first date are
used. They are cut into consecutive blocks as long as the validation part; the
band is fitted on one block (split-conformal quantiles of the
volatility-scaled, standardised return z around its median, as
`calibrate_offsets` does with the model's median) and scored on the next, half a block later each time.
The model's median of a daily return is close to a constant, so the block's
median stands in for it; no model is trained.

For each rate of `apps.finance.model.track_band` (0 = the fixed band) it
prints the mean and worst |coverage - 0.80|, the share of scored blocks within
0.80 +- 0.03, and the mean 80% interval score (width + 10 x the distance by
which an outcome falls outside; lower is better, in z units). The
run's default rate (BAND_RATE) is the largest rate whose interval score is no
worse than the fixed band's. Writes benchmarks/results/finance_band_study.{txt,json}.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.finance import data as D  # noqa: E402
from apps.finance import model as M  # noqa: E402

STOCKS = Path("/work/shared/data/stocks")
RESULTS = ROOT / "benchmarks" / "results"
RATES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05)


def pre_test_residuals(path: Path) -> tuple[np.ndarray, int]:
    """z of the windows before the test part (as the model is trained on); block length.

    z is the volatility-scaled next-day return standardised with the TRAINING
    part's mean and std (`fit_target_scale`), the units `track_band` moves in.
    """
    settings = D.resolve_settings(path, target=None, target_kind="auto", window=40, horizon=1,
                                  features=None, vol_window=10, val_fraction=0.15,
                                  test_fraction=0.15, missing="fail", scale_by_volatility=True)
    series = D.load_series(path, settings)
    settings = dataclasses.replace(settings, cut_dates=D.cut_dates(series, settings))
    s = series[0]
    val_cut, test_cut = (int(np.searchsorted(s.dates, np.datetime64(d, "D")))
                         for d in settings.cut_dates)
    scale = M.fit_target_scale(D.make_windows(s, settings, 0, val_cut), settings)
    w = D.make_windows(s, settings, 0, test_cut)
    return M.encode(w, scale, settings), int(len(s.dates) * settings.val_fraction)


def score_block(cal: np.ndarray, ev: np.ndarray, rate: float) -> tuple[float, float]:
    """Coverage and mean 80% interval score on `ev` of a band fitted on `cal`."""
    mid = np.median(cal)
    lo, hi = np.quantile(cal - mid, [0.1, 0.9])
    residual = ev - mid
    lo_t, hi_t, _ = M.track_band(residual, np.zeros(len(ev), int), float(lo), float(hi),
                                 rate=rate)
    below, above = np.maximum(lo_t - residual, 0), np.maximum(residual - hi_t, 0)
    inside = (below == 0) & (above == 0)
    return float(inside.mean()), float(np.mean(hi_t - lo_t + 10 * (below + above)))


def main() -> int:
    per_rate: dict[float, dict[str, list]] = {r: {"coverage": [], "score": []} for r in RATES}
    for path in sorted(STOCKS.glob("*.txt")):
        z, block = pre_test_residuals(path)
        for start in range(0, len(z) - 2 * block + 1, block // 2):
            cal, ev = z[start:start + block], z[start + block:start + 2 * block]
            for rate in RATES:
                cov, score = score_block(cal, ev, rate)
                per_rate[rate]["coverage"].append(cov)
                per_rate[rate]["score"].append(score)
    rows, lines = [], [
        "walk-forward band study: stock rows before each test part; fit on one "
        "validation-sized block, score the next",
        f"{'rate':>6} {'blocks':>6} {'mean|err|':>9} {'worst':>6} {'in.03':>6} {'score':>8}"]
    for rate, d in per_rate.items():
        err = np.abs(np.array(d["coverage"]) - 0.8)
        row = {"rate": rate, "blocks": len(err), "mean_abs_error": float(err.mean()),
               "worst_abs_error": float(err.max()), "within_003": float(np.mean(err <= 0.03)),
               "interval_score": float(np.mean(d["score"]))}
        rows.append(row)
        lines.append(f"{rate:6g} {row['blocks']:6d} {row['mean_abs_error']:9.4f} "
                     f"{row['worst_abs_error']:6.3f} {row['within_003']:6.2f} "
                     f"{row['interval_score']:8.4f}")
    fixed = rows[0]["interval_score"]
    chosen = max(r["rate"] for r in rows if r["interval_score"] <= fixed)
    lines.append(f"largest rate scoring no worse than the fixed band: {chosen:g} "
                 f"(apps.finance.data.BAND_RATE = {D.BAND_RATE:g})")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finance_band_study.txt").write_text(text + "\n")
    (RESULTS / "finance_band_study.json").write_text(
        json.dumps({"rows": rows, "chosen": chosen}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
