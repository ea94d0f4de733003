"""Data for both NLP tasks: text files, CSVs, the Pang & Lee polarity files, TFDS.

Every loader either returns clean Python data or raises `UserError` with one
line naming the input and what was expected. Nothing here imports TensorFlow
except the TFDS loaders (and they import it lazily).
"""

from __future__ import annotations

import codecs
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

SAMPLES = Path(__file__).parent / "samples"
SHAKESPEARE_SAMPLE = SAMPLES / "shakespeare_sample.txt"
SENTIMENT_SAMPLE = SAMPLES / "sentiment_sample.csv"
TFDS_PREFIX = "tfds:"

# Files are read whole, and a text is held several times over (bytes, str, int32
# ids): a bigger one is refused up front rather than exhausting memory.
MAX_FILE_BYTES = 128 * 2**20

POSITIVE_NAMES = {"positive", "pos", "1", "true", "yes"}
NEGATIVE_NAMES = {"negative", "neg", "0", "false", "no"}


# -- raw bytes and decoding ------------------------------------------------------


def read_bytes(path: str | Path, flag: str = "--data") -> bytes:
    """The bytes of `path`; a missing, empty or too large file is a `UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{flag} {path}: {size / 2**20:.0f} MB is larger than the limit of "
                        f"{MAX_FILE_BYTES // 2**20} MB for one file; use a part of it")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{flag} {path}: the file is empty" if not data
                        else f"{flag} {path}: the file is empty (only white space)")
    return data


def decode(data: bytes, encoding: str, where: str) -> str:
    """`data` decoded, or a `UserError` saying where it failed and which flag helps.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped; a UTF-16 one
    under another encoding is an error naming utf-16, since an 8-bit
    encoding would "decode" it into text interleaved with NUL characters.
    """
    try:
        utf = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown encoding") from None
    if utf == "utf-8" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for family, marks in (("utf-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),
                          ("utf-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))):
        # UTF-32-LE's mark begins with UTF-16-LE's: checked first.
        if data.startswith(marks):
            if not utf.startswith(family):
                raise UserError(f"{where}: starts with a {family.upper()} byte-order mark; "
                                f"pass --encoding {family}")
            break
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{where}: byte 0x{data[e.start]:02x} at line {line} is not valid {encoding}; "
            "pass the file's encoding with --encoding (e.g. --encoding cp1252 or latin-1)"
        ) from None


def split_lines(data: bytes) -> list[bytes]:
    """Lines split on b"\\n" only (byte 0x85 inside a cp1252 line is not a break)."""
    return [line.rstrip(b"\r") for line in data.split(b"\n")]


# -- TFDS ------------------------------------------------------------------------


def tfds_name(data: str | None) -> str | None:
    """The dataset name of a ``tfds:NAME`` --data value, else None."""
    if data is not None and data.startswith(TFDS_PREFIX):
        name = data[len(TFDS_PREFIX):].strip()
        if not name:
            raise UserError(f"--data {data}: give a dataset name, e.g. tfds:tiny_shakespeare")
        return name
    return None


def _tfds_load(name: str, **kwargs):
    """`tfds.load` with its failures turned into one line."""
    import tensorflow_datasets as tfds

    try:
        return tfds.load(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"--data tfds:{name}: no such TensorFlow Datasets dataset "
                        "(see https://www.tensorflow.org/datasets/catalog)") from None
    except Exception as e:  # noqa: BLE001  (download/preparation failures vary)
        first = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise UserError(f"--data tfds:{name}: could not load ({first.strip()[:200]}); "
                        "TFDS needs the network once to download, or TFDS_DATA_DIR") from None


def load_tfds_text(name: str) -> str:
    """All text of a TFDS dataset with a ``text`` feature, splits in catalog order.

    For tiny_shakespeare the train/validation/test splits are consecutive parts
    of input.txt, so concatenating them gives back the whole file and the
    contiguous 90/10 split of `split_text` applies as for a local file.
    """
    import tensorflow_datasets as tfds

    try:
        known = set(tfds.builder(name).info.splits)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"--data tfds:{name}: no such TensorFlow Datasets dataset "
                        "(see https://www.tensorflow.org/datasets/catalog)") from None
    # Before the first download the split names may be unknown: assume the usual three.
    names = [s for s in ("train", "validation", "test") if s in known] or [
        "train", "validation", "test"]
    parts = []
    for ds in _tfds_load(name, split=names):
        for example in ds.as_numpy_iterator():
            if not isinstance(example, dict) or "text" not in example:
                raise UserError(f"--data tfds:{name}: has no 'text' feature; textgen needs "
                                "a text dataset such as tfds:tiny_shakespeare")
            parts.append(example["text"].decode("utf-8"))
    text = "".join(parts)
    if not text:
        raise UserError(f"--data tfds:{name}: the dataset holds no text")
    return text


def load_tfds_reviews(name: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train texts, train labels, test texts, test labels) of a supervised TFDS set."""
    splits = _tfds_load(name, split=["train", "test"], as_supervised=True)
    out = []
    for ds in splits:
        texts, labels = [], []
        for text, label in ds.as_numpy_iterator():
            texts.append(text.decode("utf-8", errors="replace"))
            labels.append(int(label))
        out += [texts, np.asarray(labels, dtype="int32")]
    for labels in (out[1], out[3]):
        if labels.size and not set(np.unique(labels)) <= {0, 1}:
            raise UserError(f"--data tfds:{name}: labels {sorted(set(labels))} are not binary")
    return out[0], out[1], out[2], out[3]


# -- textgen -----------------------------------------------------------------------


def load_text(data: str | None, encoding: str = "utf-8") -> str:
    """The text for textgen: a file, ``tfds:NAME``, or (None) the shipped sample."""
    name = tfds_name(data)
    if name is not None:
        return load_tfds_text(name)
    path = Path(data) if data else SHAKESPEARE_SAMPLE
    return decode(read_bytes(path), encoding, f"--data {path}")


def split_text(text: str, fraction: float = 0.9) -> tuple[str, str]:
    """nanoGPT's protocol: the first 90% of characters train, the rest validates."""
    cut = int(len(text) * fraction)
    return text[:cut], text[cut:]


def build_vocabulary(text: str) -> list[str]:
    """The sorted distinct characters of the training text."""
    return sorted(set(text))


def encode(text: str, vocabulary: list[str]) -> np.ndarray:
    """Character ids as StringLookup numbers them: 0 is unknown, vocabulary[i] is i+1."""
    index = {ch: i + 1 for i, ch in enumerate(vocabulary)}
    return np.fromiter((index.get(ch, 0) for ch in text), dtype="int32", count=len(text))


@dataclass(frozen=True)
class Windows:
    """Inputs and next-character targets, (n, seq_len) each, as character ids."""

    x: np.ndarray
    y: np.ndarray


def make_windows(ids: np.ndarray, seq_len: int, what: str) -> Windows:
    """Non-overlapping windows of `seq_len` characters and their shifted targets."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise UserError(f"{what} has {len(ids)} characters, fewer than one training window "
                        f"of --seq-len {seq_len} + 1; use more text or a smaller --seq-len")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    return Windows(x, y)


def make_streams(ids: np.ndarray, seq_len: int, streams: int, what: str) -> Windows:
    """char-rnn's layout for stateful training: (steps * streams, seq_len) windows.

    The text is cut into `streams` contiguous pieces, one per batch row; batch k
    holds chunk k of every piece, so row b of batch k+1 continues row b of
    batch k and the LSTM state can be carried across batches.
    """
    per_stream = (len(ids) - 1) // streams
    steps = per_stream // seq_len
    if steps < 1:
        raise UserError(f"{what} has {len(ids)} characters, too few for --batch-size {streams} "
                        f"streams of at least --seq-len {seq_len} + 1 characters; use more "
                        "text, a smaller --batch-size or a smaller --seq-len")
    used = steps * seq_len
    x = np.stack([ids[b * per_stream: b * per_stream + used] for b in range(streams)])
    y = np.stack([ids[b * per_stream + 1: b * per_stream + used + 1] for b in range(streams)])
    # (streams, steps, seq_len) -> (steps, streams, seq_len) -> rows in batch order.
    x = x.reshape(streams, steps, seq_len).transpose(1, 0, 2).reshape(-1, seq_len)
    y = y.reshape(streams, steps, seq_len).transpose(1, 0, 2).reshape(-1, seq_len)
    return Windows(x, y)


# -- sentiment --------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """Texts and 0/1 labels (1 = positive)."""

    texts: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray) -> Labelled:
        return Labelled([self.texts[i] for i in index], self.labels[index])


def load_labelled(data: str | None, *, text_col: str = "review", label_col: str = "sentiment",
                  encoding: str | None = None, positive_label: str | None = None) -> Labelled:
    """A CSV file, a Pang & Lee polarity folder/file, or (None) the shipped sample CSV.

    ``tfds:NAME`` is handled by the caller (it comes with its own test split).
    """
    path = Path(data) if data else SENTIMENT_SAMPLE
    if path.is_dir() or path.suffix in (".pos", ".neg"):
        return load_polarity(path, encoding or "cp1252")
    return load_csv(path, text_col, label_col, encoding or "utf-8", positive_label)


def load_csv(path: Path, text_col: str, label_col: str, encoding: str,
             positive_label: str | None = None) -> Labelled:
    text = decode(read_bytes(path), encoding, f"--data {path}")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if text_col == label_col:
        raise UserError(f"--data {path}: --text-col and --label-col both name '{text_col}'; "
                        "the label would be part of the input")
    for flag, col in (("--text-col", text_col), ("--label-col", label_col)):
        if col not in columns:
            raise UserError(f"--data {path}: no column '{col}' (columns: {', '.join(columns)}); "
                            f"name the right one with {flag}")
    texts, raw, blank = [], [], []
    for row in reader:
        if row.get(text_col) is None or row.get(label_col) is None:
            raise UserError(f"--data {path}: line {reader.line_num} has too few fields")
        if any(extra.strip() for extra in row.get(None, ())):  # fields beyond the header's
            raise UserError(f"--data {path}: line {reader.line_num} has more fields than the "
                            f"header's {len(columns)}; put texts that contain commas in "
                            "double quotes")
        if not row[text_col].strip():  # nothing to learn from; keeping it would teach a bias
            blank.append(reader.line_num)
            continue
        texts.append(row[text_col])
        raw.append(row[label_col].strip())
    if blank:
        print(f"warning: --data {path}: skipped {len(blank)} row(s) whose '{text_col}' is "
              f"empty (first at line {blank[0]})", file=sys.stderr)
    if not texts:
        raise UserError(f"--data {path}: the CSV has a header but no rows"
                        + (" with text" if blank else ""))
    labels = binary_labels(raw, f"--data {path} column '{label_col}'", positive_label)
    return Labelled(texts, labels)


def binary_labels(raw: list[str], where: str, positive_label: str | None = None) -> np.ndarray:
    """0/1 labels from two distinct values (positive/negative, pos/neg, 1/0, ...)."""
    values = sorted(set(raw))
    if len(values) != 2:
        shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise UserError(f"{where}: labels must take exactly 2 values (binary), found "
                        f"{len(values)}: {shown}")
    if positive_label is not None:
        if positive_label not in values:
            raise UserError(f"--positive-label {positive_label}: not one of the labels "
                            f"{values[0]!r}, {values[1]!r} in {where}")
        positive = positive_label
    else:
        known = [v for v in values if v.lower() in POSITIVE_NAMES]
        others = [v for v in values if v.lower() in NEGATIVE_NAMES]
        if len(known) != 1 or len(others) != 1:
            raise UserError(f"{where}: cannot tell which of {values[0]!r}, {values[1]!r} is "
                            "positive; pass --positive-label")
        positive = known[0]
    return np.asarray([int(v == positive) for v in raw], dtype="int32")


def load_polarity(path: Path, encoding: str = "cp1252") -> Labelled:
    """rt-polarity.pos/.neg (a folder, or one of the two files: the other is found).

    The files are Windows-1252 and are split on b"\\n" only: byte 0x85 (an
    ellipsis in cp1252, NEL in latin-1) occurs inside lines.
    """
    folder = path if path.is_dir() else path.parent
    stem = "rt-polarity" if path.is_dir() else path.stem
    texts: list[str] = []
    labels: list[int] = []
    for suffix, label in ((".pos", 1), (".neg", 0)):
        file = folder / f"{stem}{suffix}"
        if not file.exists():
            raise UserError(f"--data {path}: expected {file.name} beside it (the Pang & Lee "
                            "polarity files come as a .pos/.neg pair)")
        data = read_bytes(file)
        for number, line in enumerate(split_lines(data), start=1):
            if not line.strip():
                continue
            texts.append(decode(line, encoding, f"--data {file} line {number}"))
            labels.append(label)
    return Labelled(texts, np.asarray(labels, dtype="int32"))


def split_labelled(data: Labelled, seed: int, fractions: tuple[float, float] = (0.8, 0.1)
                   ) -> tuple[Labelled, Labelled, Labelled]:
    """Shuffled train/validation/test (80/10/10 by default; the same for a given seed)."""
    order = np.random.default_rng(seed).permutation(len(data))
    a = int(len(data) * fractions[0])
    b = a + int(len(data) * fractions[1])
    parts = data.take(order[:a]), data.take(order[a:b]), data.take(order[b:])
    if min(len(p) for p in parts) < 1:
        raise UserError(f"the data has {len(data)} examples, too few for train/validation/test "
                        "splits; give at least 10")
    return parts


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """`k` disjoint shuffled index sets covering range(n), for cross-validation."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]
