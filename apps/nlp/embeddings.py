"""Pre-trained word vectors: read them (GloVe/word2vec text format) and build them.

Reading (used by ``sentiment train --embeddings PATH``): the file is streamed
line by line and only the rows of words in the model's vocabulary are kept, so
a multi-gigabyte GloVe file costs memory for the vocabulary only.

Building (no network needed): PPMI + truncated SVD word vectors (Levy, Goldberg
& Dagan 2015, "Improving distributional similarity with lessons learned from
word embeddings") from any unlabelled text::

    python -m apps.nlp.embeddings build --text reviews.csv --text-col review \\
        --out vectors.txt --dim 300 --vocab 40000 --window 5

The text is tokenised exactly like the sentiment model's TextVectorization
(lowercase, ASCII punctuation stripped, split on whitespace), so the words of
the vectors file match the model's vocabulary.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from common.errors import UserError

# TextVectorization's default standardize="lower_and_strip_punctuation".
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def tokenize(text: str) -> list[str]:
    """The words TextVectorization (default settings) makes of `text`."""
    return _PUNCTUATION.sub("", text.lower()).split()


# -- reading ---------------------------------------------------------------------


def _parse_header(fields: list[str]) -> int | None:
    """The dimension announced by a word2vec header line ``count dim``, else None."""
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[1])
    return None


def read_vectors(path: str | Path, vocabulary: Iterable[str], flag: str = "--embeddings", *,
                 leading: int = 0) -> tuple[dict[str, np.ndarray], int, tuple[str, ...]]:
    """The vectors of the words of `vocabulary` found in the text file `path`.

    Format: one ``word v1 v2 ... vD`` per line (GloVe), optionally after a
    word2vec header line ``count D``. Returns ({word: float32 vector}, D,
    leading words). A malformed line raises a one-line UserError naming the
    file and line.

    The leading words are the file's first `leading` words that TextVectorization
    can produce; their vectors are kept too. Vector files list words by
    frequency (GloVe, word2vec and `build` all do), so these are the commonest
    words of the text the vectors were made from. Entries that are not a
    single lower-case token after TextVectorization's standardisation
    (punctuation, "Hello") are skipped: no text maps to them.
    """
    path = Path(path)
    wanted = set(vocabulary)
    found: dict[str, np.ndarray] = {}
    common: list[str] = []
    dim: int | None = None
    try:
        handle = open(path, encoding="utf-8", errors="strict", newline="\n")
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                fields = line.rstrip("\r\n").rstrip(" ").split(" ")
                if number == 1 and (header := _parse_header(fields)) is not None:
                    dim = header
                    continue
                if fields == [""]:
                    continue  # blank line
                if len(fields) < 2:
                    raise UserError(f"{flag} {path} line {number}: expected a word and its "
                                    f"vector, found {len(fields)} field")
                if dim is None:
                    dim = len(fields) - 1
                if len(fields) - 1 != dim:
                    raise UserError(f"{flag} {path} line {number}: expected {dim} numbers after "
                                    f"the word, found {len(fields) - 1}")
                word = fields[0]
                if len(common) < leading and tokenize(word) == [word]:
                    common.append(word)
                    wanted.add(word)
                if word not in wanted or word in found:
                    continue  # only the vocabulary's rows are kept (bounded memory)
                try:
                    found[word] = np.asarray(fields[1:], dtype="float32")
                except ValueError:
                    bad = next(f for f in fields[1:] if not _is_float(f))
                    raise UserError(f"{flag} {path} line {number}: {bad[:20]!r} is not a "
                                    "number") from None
                if not np.all(np.isfinite(found[word])):
                    raise UserError(f"{flag} {path} line {number}: the vector of {word!r} "
                                    "has a NaN or infinity")
        except UnicodeDecodeError as e:
            raise UserError(f"{flag} {path} line {number + 1}: not UTF-8 text ({e.reason}); "
                            "expected a GloVe/word2vec text file (binary word2vec is not "
                            "supported)") from None
    if dim is None:
        raise UserError(f"{flag} {path}: no vectors in the file")
    return found, dim, tuple(common)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def embedding_matrix(vocabulary: tuple[str, ...], vectors: dict[str, np.ndarray], dim: int,
                     seed: int = 0) -> np.ndarray:
    """The (len(vocabulary) + 2, dim) initial Embedding matrix for a TextVectorization.

    Row 0 is padding, row 1 is [UNK], row i + 2 is vocabulary[i]. Words without
    a vector get small random normals with the scale of the known vectors.
    """
    known = np.stack(list(vectors.values())) if vectors else np.zeros((1, dim), "float32")
    scale = float(known.std()) or 0.05
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, scale, size=(len(vocabulary) + 2, dim)).astype("float32")
    matrix[0] = 0.0  # padding (masked anyway)
    for i, word in enumerate(vocabulary):
        if word in vectors:
            matrix[i + 2] = vectors[word]
    return matrix


# -- building --------------------------------------------------------------------


def iter_documents(paths: list[str], text_col: str = "review") -> Iterator[str]:
    """The documents of each file: a CSV's `text_col` column, else one per line."""
    for name in paths:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"--text {path}: cannot read ({e.strerror or e})") from None
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if text_col not in (reader.fieldnames or []):
                raise UserError(f"--text {path}: no column '{text_col}' (columns: "
                                f"{', '.join(reader.fieldnames or [])}); use --text-col")
            for row in reader:
                yield row[text_col] or ""
        else:
            yield from text.split("\n")


def cooccurrence(docs: Iterable[list[int]], size: int, window: int):
    """Symmetric word-context counts within +-`window` (scipy CSR, float64).

    Out-of-vocabulary tokens keep their positions (so distances are real) but
    pair with nothing.
    """
    import scipy.sparse as sp

    ids = []
    for doc in docs:
        ids.extend(doc)
        ids.extend([-1] * window)  # documents do not see each other
    tokens = np.asarray(ids, dtype="int64")
    counts = sp.csr_matrix((size, size), dtype="float64")
    for d in range(1, window + 1):
        a, b = tokens[:-d], tokens[d:]
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        # Both directions: context on the left and on the right.
        pairs = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(size, size)).tocsr()
        counts = counts + pairs + pairs.T
    return counts


def ppmi(counts, alpha: float = 0.75):
    """Positive PMI with context-distribution smoothing (c^alpha)."""
    import scipy.sparse as sp

    counts = counts.tocoo()
    total = counts.sum()
    word = np.asarray(counts.sum(axis=1)).ravel()
    context = np.asarray(counts.sum(axis=0)).ravel() ** alpha
    context /= context.sum()
    pmi = np.log(counts.data / total) - np.log(word[counts.row] / total) - np.log(
        context[counts.col])
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep].astype("float32"), (counts.row[keep], counts.col[keep])),
                         shape=counts.shape)


def truncated_svd(matrix, dim: int, iterations: int = 4, seed: int = 0):
    """Randomised SVD (Halko et al. 2011): the top `dim` (U, S) of a sparse matrix."""
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((matrix.shape[1], dim + 20)).astype("float32")
    q, _ = np.linalg.qr(matrix @ probe)
    for _ in range(iterations):  # power iterations sharpen the top of the spectrum
        q, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ q)
    small = (matrix.T @ q).T  # (dim + 20, n)
    u, s, _ = np.linalg.svd(small, full_matrices=False)
    return (q @ u)[:, :dim], s[:dim]


def build_vectors(docs: Iterable[str], *, dim: int = 300, vocab: int = 40000, window: int = 5,
                  min_count: int = 5, log=print) -> tuple[list[str], np.ndarray]:
    """PPMI + SVD word vectors of the `vocab` most frequent words: (words, (n, dim))."""
    started = time.monotonic()
    tokenized = [tokenize(d) for d in docs]
    freq = Counter(w for doc in tokenized for w in doc)
    words = [w for w, c in freq.most_common(vocab) if c >= min_count]
    if len(words) <= dim:
        raise UserError(f"the text has only {len(words)} words seen {min_count}+ times; "
                        f"need more than --dim {dim}")
    index = {w: i for i, w in enumerate(words)}
    log(f"{sum(freq.values())} tokens, {len(freq)} distinct, keeping {len(words)} "
        f"({time.monotonic() - started:.0f} s)")
    counts = cooccurrence(([index.get(w, -1) for w in doc] for doc in tokenized), len(words),
                          window)
    del tokenized
    matrix = ppmi(counts)
    log(f"PPMI matrix {matrix.shape}, {matrix.nnz} non-zeros ({time.monotonic() - started:.0f} s)")
    u, s = truncated_svd(matrix, dim)
    vectors = u * np.sqrt(s)  # eigenvalue weighting p = 0.5 (Levy et al. 2015)
    # Unit rows, then one global scale so entries are ~N(0, 0.1)-sized like GloVe's.
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8
    log(f"SVD to {dim} dimensions ({time.monotonic() - started:.0f} s)")
    return words, (vectors * np.sqrt(dim) * 0.1).astype("float32")


def write_vectors(path: str | Path, words: list[str], vectors: np.ndarray) -> None:
    """word2vec text format: a ``count dim`` header, then ``word v1 ... vD`` lines."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(words)} {vectors.shape[1]}\n")
        for word, row in zip(words, vectors, strict=True):
            f.write(word + " " + " ".join(f"{v:.5f}" for v in row) + "\n")
    tmp.replace(path)  # atomic: a killed build leaves no half-written file


def main(argv: list[str] | None = None) -> int:
    from common.cli import run_main

    parser = argparse.ArgumentParser(
        prog="python -m apps.nlp.embeddings",
        description="Build word vectors (PPMI + SVD) from unlabelled text, for "
                    "`python -m apps.nlp sentiment train --embeddings`.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train word vectors on text files")
    build.add_argument("--text", nargs="+", required=True, metavar="FILE",
                       help="text files (one document per line) or CSV files")
    build.add_argument("--text-col", default="review", help="the text column of CSV files")
    build.add_argument("--out", required=True, help="the vectors file to write (text format)")
    build.add_argument("--dim", type=int, default=300, help="vector size")
    build.add_argument("--vocab", type=int, default=40000, help="most frequent words kept")
    build.add_argument("--window", type=int, default=5, help="context words on each side")
    build.add_argument("--min-count", type=int, default=5, help="rarer words get no vector")

    def handle(args: argparse.Namespace) -> int:
        for flag in ("dim", "vocab", "window", "min_count"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
        words, vectors = build_vectors(iter_documents(args.text, args.text_col), dim=args.dim,
                                       vocab=args.vocab, window=args.window,
                                       min_count=args.min_count)
        write_vectors(args.out, words, vectors)
        print(f"wrote {len(words)} vectors of dimension {args.dim} to {args.out}")
        return 0

    return run_main(parser, handle, argv)


if __name__ == "__main__":
    sys.exit(main())
