"""A synthetic daily temperature series (seasonal cycle + AR(1) weather noise).

Used by the tests and to make `samples/synthetic_temperature.csv`; it is NOT
measured data. Run ``python -m apps.finance.synthetic OUT.csv`` to write one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def synthetic_temperatures(days: int = 730, seed: int = 0, start: str = "2001-01-01"):
    """(dates, temperatures in degC): 11 + 5 sin(season) + AR(1) noise, like a mild city."""
    rng = np.random.default_rng(seed)
    dates = np.datetime64(start, "D") + np.arange(days)
    season = 11.0 + 5.0 * np.cos(2 * np.pi * (np.arange(days) - 15) / 365.25)
    noise = np.zeros(days)
    for t in range(1, days):
        noise[t] = 0.7 * noise[t - 1] + rng.normal(0.0, 2.0)
    return dates, np.round(season + noise, 1)


def write_csv(path: str | Path, days: int = 730, seed: int = 0) -> Path:
    """Write a ``"Date","Temp"`` CSV like the Melbourne minimum-temperature file."""
    dates, temps = synthetic_temperatures(days, seed)
    path = Path(path)
    lines = ['"Date","Temp"'] + [f'"{d}",{t:.1f}' for d, t in zip(dates, temps, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_csv(sys.argv[1] if len(sys.argv) > 1 else "synthetic_temperature.csv"))
