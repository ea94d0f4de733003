"""Daily CSV series -> validated frames -> chronological windows.

Layouts recognised (column names case-insensitive):

* Yahoo: ``Date,Open,High,Low,Close,Adj Close,Volume`` (``Adj Close`` is used
  as the close when present: it includes dividends and splits);
* Stooq/Kaggle: ``Date,Open,High,Low,Close,Volume,OpenInt``;
* anything with a date column and a numeric ``--target`` column (e.g.
  ``"Date","Temp"``).

Leakage is prevented here, once: the split is by date (the same cut dates for
every file of a folder, so no ticker's test period is seen through another's
training data), each example's inputs AND target lie inside its own part, and
one window of rows is left unused after each cut. Scalers are fitted by the
model on the training windows only (see `model.py`).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import UserError

if TYPE_CHECKING:  # pandas is imported when a file is read, not with the CLI
    import pandas

OHLCV = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS = ("open", "high", "low", "close")
DATE_NAMES = ("date", "datetime", "timestamp", "time", "day")
SUFFIXES = (".csv", ".txt")
MISSING_POLICIES = ("fail", "drop", "ffill")
TARGET_KINDS = ("auto", "return", "price", "level")
FEATURES_PRICE = ("returns", "range", "volume", "volatility")
FEATURES_LEVEL = ("level", "change", "volatility")
MIN_EXAMPLES = 4  # per part: fewer makes every metric meaningless
# Step of the walk-forward 10-90% band (model.track_band), in z units per
# outcome (z: the volatility-scaled change, standardised with the training
# part's mean and std). Chosen on the nine stock files' rows BEFORE their test
# parts (benchmarks/finance_band_study.py): the largest rate whose mean 80%
# interval score (width plus 10x the misses) is no worse than the fixed
# band's. Over 72 fit-on-one-block, score-the-next periods it cut the mean
# coverage error from 0.0115 to 0.0053 and the worst from 0.038 to 0.027.
BAND_RATE = 0.01
# A file is read whole; decades of daily rows are a few MB, so anything this big
# is not a daily series (or is damaged, e.g. one endless line) and is refused.
MAX_FILE_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Settings:
    """Everything that defines the data and the windows (stored in config.json)."""

    window: int = 30  # raw rows per example (what predict and the SavedModel take)
    horizon: int = 1  # forecast the value `horizon` rows after the last input row
    target: str = "close"
    target_kind: str = "return"  # resolved: return | price | level
    mode: str = "ohlcv"  # "ohlcv" (5 raw columns) or "series" (the target column only)
    features: tuple[str, ...] = FEATURES_PRICE
    vol_window: int = 10  # rows of the rolling volatility (also the warm-up dropped)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    missing: str = "fail"
    # Forecast returns in units of the window's recent volatility, so the band
    # follows calm and turbulent periods (prices only; see model.recent_vol).
    scale_by_volatility: bool = True
    cut_dates: tuple[str, str] = ("", "")  # first validation date, first test date

    @property
    def raw_columns(self) -> tuple[str, ...]:
        return OHLCV if self.mode == "ohlcv" else (self.target,)

    @property
    def positive_columns(self) -> tuple[int, ...]:
        """Indices of `raw_columns` that must be positive: the prices, or a series
        forecast as returns or prices (its logs are taken); none for levels."""
        if self.target_kind not in ("return", "price"):
            return ()
        return tuple(j for j, c in enumerate(self.raw_columns)
                     if c in PRICE_COLUMNS or self.mode == "series")

    @property
    def target_index(self) -> int:
        return OHLCV.index("close") if self.mode == "ohlcv" else 0

    @property
    def steps(self) -> int:
        """Time steps the LSTM sees: the window minus the volatility warm-up."""
        return self.window - self.vol_window

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        d = dict(d)
        d["features"] = tuple(d["features"])
        d["cut_dates"] = tuple(d["cut_dates"])
        return cls(**d)


@dataclass
class Series:
    """One validated file: dates and raw float64 columns (in `Settings.raw_columns` order)."""

    name: str
    path: str
    dates: np.ndarray  # datetime64[D], strictly increasing
    values: np.ndarray  # [rows, raw columns]


@dataclass
class Windows:
    """Examples of one part: raw windows, targets in units, and what they belong to."""

    x: np.ndarray  # [n, window, raw columns] float32
    y: np.ndarray  # [n] target in units (log return, price or level)
    last: np.ndarray  # [n] the target column's last input value
    dates: np.ndarray  # [n] date of the forecast target
    ticker: np.ndarray  # [n] file name it came from
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


# ---------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------


def list_files(path: str | Path) -> list[Path]:
    """The CSV files of `path` (one file, or a folder's *.csv / *.txt)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise UserError(f"--data {path}: the folder has no .csv or .txt files")
    else:
        files = [path]
    for file in files:
        size = file.stat().st_size
        if size == 0:
            raise UserError(f"{file}: the file is empty, expected a CSV with a header row")
        if size > MAX_FILE_BYTES:
            raise UserError(f"{file}: {size / 2**20:.0f} MB is larger than the limit of "
                            f"{MAX_FILE_BYTES // 2**20} MB for one file of daily rows")
    return files


def resolve_layout(columns: list[str], target: str | None, target_kind: str,
                   where: str) -> tuple[str, str, str]:
    """(mode, target, kind) for a file's columns and the --target/--target-kind flags."""
    lower = [c.strip().lower() for c in columns]
    has_ohlcv = all(c in lower for c in OHLCV)
    target = (target or "close").strip().lower()
    if target not in lower and not (target == "close" and "adj close" in lower):
        hint = "" if target != "close" else "; pass --target COLUMN for a non-price series"
        separator = next((sep for sep in ";\t|" if len(columns) == 1 and sep in columns[0]),
                         None)
        if separator is not None:  # one column named "Date;Open;...": not comma-separated
            hint = (f"; its columns seem to be separated by {separator!r}, and a CSV for "
                    "--data needs commas")
        raise UserError(f"{where}: no column '{target}' (columns: {', '.join(columns)}){hint}")
    if has_ohlcv and target in ("close", "adj close"):
        mode = "ohlcv"
        target = "close"
    else:
        mode = "series"
    if target_kind == "auto":
        target_kind = "return" if mode == "ohlcv" else "level"
    return mode, target, target_kind


def load_file(path: Path, settings: Settings) -> Series:
    """Read and validate one CSV; every error names the file, line and column."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise unreadable(path, e) from e
    if frame.empty:
        raise UserError(f"{path}: has a header but no data rows")
    columns = {c.strip().lower(): c for c in frame.columns}
    date_col = next((columns[n] for n in DATE_NAMES if n in columns), None)
    if date_col is None:
        raise UserError(f"{path}: no date column (expected one of {', '.join(DATE_NAMES)}; "
                        f"columns: {', '.join(frame.columns)})")
    lines = np.arange(len(frame)) + 2  # line 1 is the header

    wanted = settings.raw_columns
    source = {c: columns.get(c) for c in wanted}
    if settings.mode == "ohlcv" and "adj close" in columns:
        source["close"] = columns["adj close"]
    if settings.mode == "series" and source[settings.target] is None and \
            settings.target == "close" and "adj close" in columns:
        source["close"] = columns["adj close"]
    missing_cols = [c for c in wanted if source[c] is None]
    if missing_cols:
        raise UserError(f"{path}: no column '{missing_cols[0]}' (columns: "
                        f"{', '.join(frame.columns)}); every file of --data needs the same layout")

    raw_dates = frame[date_col].str.strip()
    dates = _parse_dates(path, raw_dates, lines, date_col)

    values = np.empty((len(frame), len(wanted)), dtype=np.float64)
    for j, name in enumerate(wanted):
        text = frame[source[name]].str.strip()
        numbers = pd.to_numeric(text.replace({"": None, "null": None, "NaN": None,
                                              "nan": None, "NA": None}), errors="coerce")
        not_number = np.flatnonzero(numbers.isna().to_numpy() & ~_is_blank(text))
        if len(not_number):
            i = not_number[0]
            raise UserError(f"{path}: line {lines[i]}, column '{source[name]}': "
                            f"'{text.iloc[i]}' is not a number")
        column = numbers.to_numpy(dtype=np.float64)
        infinite = np.flatnonzero(np.isinf(column))
        if len(infinite):
            i = infinite[0]
            raise UserError(f"{path}: line {lines[i]}, column '{source[name]}': "
                            f"'{text.iloc[i]}' is not a finite number")
        values[:, j] = column

    # Dates: sort (with a warning), then reject duplicates.
    order = np.argsort(dates.to_numpy(), kind="stable")
    if np.any(order != np.arange(len(order))):
        first = int(np.flatnonzero(np.diff(dates.to_numpy()) < np.timedelta64(0))[0]) + 1
        print(f"warning: {path}: dates are not in ascending order (first at line "
              f"{lines[first]}, '{raw_dates.iloc[first]}'); sorted them", file=sys.stderr)
    day = dates.to_numpy().astype("datetime64[D]")[order]
    values, lines = values[order], lines[order]
    dup = np.flatnonzero(day[1:] == day[:-1])
    if len(dup):
        i = dup[0]
        raise UserError(f"{path}: lines {lines[i]} and {lines[i + 1]}, column '{date_col}': "
                        f"duplicate date {day[i]}")

    values, day, lines = _handle_missing(path, values, day, lines, settings, source)

    for j in settings.positive_columns:
        bad = np.flatnonzero(~(values[:, j] > 0))
        if len(bad):
            i = bad[0]
            hint = (" (use --target-kind level for series that can be zero or negative)"
                    if settings.mode == "series" else "")
            raise UserError(f"{path}: line {lines[i]}, column '{source[wanted[j]]}': price "
                            f"{values[i, j]:g} is not positive{hint}")
    if "volume" in wanted:
        j = wanted.index("volume")
        bad = np.flatnonzero(values[:, j] < 0)
        if len(bad):
            raise UserError(f"{path}: line {lines[bad[0]]}, column '{source['volume']}': "
                            f"negative volume {values[bad[0], j]:g}")
    if len(day) < settings.window + settings.horizon:
        raise UserError(f"{path}: --window {settings.window} is longer than the series "
                        f"({len(day)} rows; one example needs --window + --horizon = "
                        f"{settings.window + settings.horizon})")
    return Series(name=path.name.split(".")[0], path=str(path), dates=day, values=values)


# Tried when a file's first date is no format pandas can guess (two-digit years).
SHORT_YEAR_FORMATS = ("%m/%d/%y", "%d/%m/%y", "%d.%m.%y", "%m-%d-%y", "%d-%m-%y")
# A time zone offset after a time of day (yfinance writes 2010-01-04 00:00:00-05:00):
# dropped, so the local trading date stays and summer/winter offsets do not mix.
TZ_SUFFIX = r"(?<=\d:\d\d)(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)$"


def _parse_dates(path, raw: pandas.Series, lines: np.ndarray, date_col: str) -> pandas.Series:
    """The file's dates, read with ONE format: ISO 8601, or the format of its first date.

    A per-value guess ("mixed") would read 12/11/2014 as December and
    13/11/2014 as November in the same file and scramble the series. A first
    date that reads both ways (12/11/2014) is settled by the rest of the file:
    the month-first or day-first reading that parses every date wins; if both
    do, the one that puts the rows in date order (a monthly series dated on
    the 1st) wins.
    """
    import pandas as pd
    from pandas.tseries.api import guess_datetime_format

    def read(fmt: str) -> pd.Series:
        try:
            return pd.to_datetime(raw, errors="coerce", format=fmt)
        except (ValueError, TypeError):  # e.g. offsets pandas refuses to mix
            return pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")

    raw = raw.str.replace(TZ_SUFFIX, "", regex=True)
    iso = read("ISO8601")
    if iso.notna().all():
        return iso
    first = raw.iloc[0] if len(raw) else ""
    with warnings.catch_warnings():  # pandas warns when dayfirst and the format disagree
        warnings.simplefilter("ignore", UserWarning)
        guessed = (guess_datetime_format(first), guess_datetime_format(first, dayfirst=True))
    formats = list(dict.fromkeys(f for f in guessed if f)) or list(SHORT_YEAR_FORMATS)
    readings = {f: read(f) for f in formats}
    whole = {f: d for f, d in readings.items() if d.notna().all()}
    distinct = list({tuple(d.to_numpy().tolist()): f for f, d in whole.items()}.values())
    if len(distinct) > 1:
        # Both readings parse every date: the one whose dates come in order and
        # at regular steps is the file's (month-first 1/1, 2/1, ... 12/1 is
        # monthly; day-first it would be 12 days and then a jump of a year).
        def irregularity(f: str) -> float:
            dates = whole[f].to_numpy()
            if not (whole[f].is_monotonic_increasing or whole[f].is_monotonic_decreasing):
                return np.inf
            gaps = np.abs(np.diff(dates).astype("timedelta64[s]").astype(np.float64))
            return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() else np.inf

        score = sorted((irregularity(f), f) for f in distinct)
        if score[0][0] < np.inf and score[0][0] < 0.5 * score[1][0]:
            return whole[score[0][1]]
        raise UserError(f"{path}: column '{date_col}': every date reads both as "
                        f"{' and as '.join(distinct)} (e.g. '{first}'); write the dates as "
                        "YYYY-MM-DD")
    if distinct:
        return whole[distinct[0]]
    # Report the first date the most successful reading (or ISO 8601) cannot parse.
    best = max(readings.values(), key=lambda d: int(d.notna().sum()), default=iso)
    i = int(np.flatnonzero(best.isna().to_numpy())[0])
    expected = ("one format for all of a file's dates: ISO 8601 such as 2017-11-10, or the "
                f"format of its first date '{first}'") if any(guessed) else "e.g. 2017-11-10"
    raise UserError(f"{path}: line {lines[i]}, column '{date_col}': cannot parse date "
                    f"'{raw.iloc[i]}' (expected {expected})")


def _is_blank(text) -> np.ndarray:
    return text.isin(["", "null", "NaN", "nan", "NA"]).to_numpy()


def _handle_missing(path, values, day, lines, settings, source):
    missing = np.isnan(values)
    if not missing.any():
        return values, day, lines
    i, j = np.argwhere(missing)[0]
    column = source[settings.raw_columns[j]]
    if settings.missing == "fail":
        raise UserError(f"{path}: line {lines[i]}, column '{column}': missing value "
                        "(pass --missing drop or --missing ffill to accept gaps)")
    if settings.missing == "drop":
        keep = ~missing.any(axis=1)
        return values[keep], day[keep], lines[keep]
    # Forward fill: a gap at the very start has nothing to copy.
    for j in range(values.shape[1]):
        col = values[:, j]
        if np.isnan(col[0]):
            raise UserError(f"{path}: line {lines[0]}, column '{source[settings.raw_columns[j]]}'"
                            ": missing value in the first row cannot be forward-filled")
        idx = np.where(np.isnan(col), 0, np.arange(len(col)))
        values[:, j] = col[np.maximum.accumulate(idx)]
    return values, day, lines


def unreadable(path: Path, e: Exception) -> UserError:
    """The error for a CSV pandas cannot read; a bad byte is located by line."""
    if isinstance(e, UnicodeDecodeError):
        data = Path(path).read_bytes()  # at most MAX_FILE_BYTES (see list_files)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data.count(b"\n", 0, bad.start) + 1
            return UserError(f"{path}: line {line}: byte 0x{data[bad.start]:02x} is not valid "
                             "UTF-8; save the file as UTF-8")
    return UserError(f"{path}: not a readable CSV file ({_first_line(e)})")


def _first_line(e: Exception) -> str:
    return next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)


def resolve_settings(path: str | Path, *, target: str | None, target_kind: str,
                     **kwargs: Any) -> Settings:
    """Settings for `path`'s layout: finds the mode and the target kind from its header."""
    import pandas as pd

    first = list_files(path)[0]
    try:
        columns = list(pd.read_csv(first, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise unreadable(first, e) from e
    mode, target, kind = resolve_layout(columns, target, target_kind, str(first))
    features = kwargs.pop("features", None) or (FEATURES_PRICE if mode == "ohlcv"
                                                 else FEATURES_LEVEL if kind == "level"
                                                 else ("returns", "volatility"))
    allowed = (FEATURES_PRICE if mode == "ohlcv" else
               ("level", "change", "volatility") if kind == "level" else
               ("returns", "volatility", "level"))
    unknown = [f for f in features if f not in allowed]
    if unknown:
        raise UserError(f"--features: '{unknown[0]}' is not available for this data "
                        f"(choose from {', '.join(allowed)})")
    settings = Settings(target=target, target_kind=kind, mode=mode,
                        features=tuple(features), **kwargs)
    if settings.steps < 2:
        raise UserError(f"--window {settings.window} must be at least --vol-window "
                        f"{settings.vol_window} + 2 (the LSTM needs 2 steps after the "
                        "volatility warm-up)")
    return settings


def load_series(path: str | Path, settings: Settings) -> list[Series]:
    """Every file of `path`, validated; each file's name (up to its first dot) names it."""
    series = [load_file(p, settings) for p in list_files(path)]
    seen: dict[str, str] = {}
    for s in series:
        if s.name in seen:
            raise UserError(f"--data {path}: {seen[s.name]} and {s.path} would both be "
                            f"ticker '{s.name}'; keep one, or rename one of them")
        seen[s.name] = s.path
    return series


def fingerprint(series: list[Series]) -> str:
    """A digest of what was read (tickers, dates, values): equal for the same data
    in another place or file encoding, different for other rows or numbers."""
    import hashlib

    digest = hashlib.sha1()
    for s in series:
        digest.update(s.name.encode() + b"\0")
        digest.update(s.dates.astype("datetime64[D]").astype(np.int64).tobytes())
        digest.update(np.ascontiguousarray(s.values, np.float64).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Splitting and windows
# ---------------------------------------------------------------------------


def cut_dates(series: list[Series], settings: Settings) -> tuple[str, str]:
    """The first validation and first test dates: quantiles of all rows' dates."""
    pooled = np.sort(np.concatenate([s.dates for s in series]))
    n = len(pooled)
    val = pooled[int(n * (1 - settings.val_fraction - settings.test_fraction))]
    test = pooled[int(n * (1 - settings.test_fraction))]
    return str(val), str(test)


def target_values(values: np.ndarray, last: np.ndarray, kind: str) -> np.ndarray:
    """The forecast target in units from the future and the last input value."""
    if kind == "return":
        return np.log(values) - np.log(last)
    return values


def make_windows(s: Series, settings: Settings, start: int, stop: int) -> Windows:
    """All examples whose input rows and target row lie in rows [start, stop)."""
    w, h, j = settings.window, settings.horizon, settings.target_index
    ends = np.arange(start + w - 1, stop - h)  # index of the last input row
    if len(ends) == 0:
        return empty_windows(settings)
    idx = ends[:, None] + np.arange(-w + 1, 1)[None, :]
    x = s.values[idx].astype(np.float32)
    last = s.values[ends, j]
    future = s.values[ends + h, j]
    return Windows(x=x, y=target_values(future, last, settings.target_kind), last=last,
                   dates=s.dates[ends + h], ticker=np.full(len(ends), s.name))


def empty_windows(settings: Settings) -> Windows:
    return Windows(x=np.zeros((0, settings.window, len(settings.raw_columns)), np.float32),
                   y=np.zeros(0), last=np.zeros(0), dates=np.zeros(0, "datetime64[D]"),
                   ticker=np.zeros(0, str))


def concat(parts: list[Windows], settings: Settings) -> Windows:
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_windows(settings)
    return Windows(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("x", "y", "last", "dates", "ticker")))


def split(series: list[Series], settings: Settings) -> dict[str, Windows]:
    """Train/validation/test windows, by the cut dates in `settings`, one window apart.

    Rows before the first cut are training rows; the first `window` rows on or
    after each cut are left unused (the gap), so no validation or test input
    is adjacent to a training target.
    """
    val_cut, test_cut = (np.datetime64(d, "D") for d in settings.cut_dates)
    gap = settings.window
    parts: dict[str, list[Windows]] = {"train": [], "validation": [], "test": []}
    for s in series:
        a = int(np.searchsorted(s.dates, val_cut))
        b = int(np.searchsorted(s.dates, test_cut))
        parts["train"].append(make_windows(s, settings, 0, a))
        parts["validation"].append(make_windows(s, settings, min(a + gap, b), b))
        parts["test"].append(make_windows(s, settings, min(b + gap, len(s.dates)),
                                          len(s.dates)))
    out = {k: concat(v, settings) for k, v in parts.items()}
    for name, windows in out.items():
        if len(windows) < MIN_EXAMPLES:
            rows = sum(len(s.dates) for s in series)
            raise UserError(
                f"--data: {rows} rows are too few for --window {settings.window}, --horizon "
                f"{settings.horizon} and the splits: the {name} part has {len(windows)} "
                f"examples (need {MIN_EXAMPLES}); each part needs window + horizon + "
                f"{MIN_EXAMPLES - 1} rows plus a gap of one window, i.e. about "
                f"{min_rows(settings)} rows in all")
    return out


def min_rows(settings: Settings) -> int:
    """Roughly the fewest rows that give every part MIN_EXAMPLES examples."""
    per_part = settings.window + settings.horizon + MIN_EXAMPLES - 1
    val_test = (per_part + settings.window) / min(settings.val_fraction, settings.test_fraction)
    return int(max(val_test, (per_part) / (1 - settings.val_fraction - settings.test_fraction)))


def test_part(series: list[Series], settings: Settings, allow_empty: bool = False) -> Windows:
    """The test windows of (possibly other) files, by the run's own cut dates."""
    test_cut = np.datetime64(settings.cut_dates[1], "D")
    parts = []
    for s in series:
        b = int(np.searchsorted(s.dates, test_cut))
        parts.append(make_windows(s, settings, min(b + settings.window, len(s.dates)),
                                  len(s.dates)))
    out = concat(parts, settings)
    if len(out) == 0 and not allow_empty:
        raise UserError(f"--data: no test windows: the run's test part starts "
                        f"{settings.cut_dates[1]} (+ a gap of {settings.window} rows) and "
                        "the data has too few rows after it")
    return out


def latest_windows(series: list[Series], settings: Settings) -> Windows:
    """The last `window` rows of every file (for predict); targets unknown (nan)."""
    w = settings.window
    x = np.stack([s.values[-w:] for s in series]).astype(np.float32)
    last = np.array([s.values[-1, settings.target_index] for s in series])
    return Windows(x=x, y=np.full(len(series), np.nan), last=last,
                   dates=np.array([s.dates[-1] for s in series]),
                   ticker=np.array([s.name for s in series]))
