"""A/B timing of two versions of common/lstm.py, interleaved in one process.

    python benchmarks/lstm_ab.py --base HEAD~1            # HEAD~1's lstm.py (A) vs the working tree's (B)
    python benchmarks/lstm_ab.py --a old.py --b new.py --shapes 2 --iters 60

For a change worth a few percent, which separate `lstm_speed.py` runs cannot
tell apart from the machine's drift: both versions are loaded as separate
modules, get the same weights, and run the same train step (forward, backward,
Adam) and inference call as `lstm_speed.py`, timed round-robin, so outside load
hits both alike. B/A below 1 means B is faster. The outputs of the two are
compared too (max |dy|): a speed-up that changes the result is no speed-up.
Prints a table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lstm_speed  # noqa: E402  (the timing and model code both benchmarks share)

ROOT = Path(__file__).resolve().parents[1]
LSTM_PATH = "common/lstm.py"


def load_version(path: Path, name: str) -> ModuleType:
    """common/lstm.py (or a copy of another version) as its own module.

    Its LSTM class registers itself with Keras as "lstm_suite>LSTM" on import;
    the registration is undone, so that loading a .keras file in this process
    still gives `common.lstm.LSTM`.
    """
    import keras

    registered = keras.saving.get_custom_objects()
    before = dict(registered)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        registered.clear()
        registered.update(before)
    return module


def file_at(revision: str, folder: Path) -> Path:
    """common/lstm.py as of a git revision, written into `folder`."""
    result = subprocess.run(["git", "show", f"{revision}:{LSTM_PATH}"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"--base {revision}: {result.stderr.strip()}")
    path = folder / "lstm_base.py"
    path.write_text(result.stdout)
    return path


def compare(versions: dict[str, ModuleType], shapes: Sequence[lstm_speed.Shape],
            settings: lstm_speed.Settings) -> list[dict]:
    """One row per shape and mode: median and p10 ms of A and B, B/A, max |dy|."""
    import keras
    import tensorflow as tf

    rows = []
    rng = np.random.default_rng(settings.seed)
    for shape in shapes:
        x = tf.constant(rng.normal(size=(shape.batch, shape.steps, shape.inputs)), tf.float32)
        y = tf.constant(rng.uniform(-0.5, 0.5, (shape.batch, shape.units)), tf.float32)
        keras.utils.set_random_seed(settings.seed)
        models = {k: lstm_speed.build_keras_model(v.LSTM, shape, f"model_{k}")
                  for k, v in versions.items()}
        models["b"].set_weights(models["a"].get_weights())
        fns = {k: lstm_speed.keras_functions(m, x, y) for k, m in models.items()}
        dy = float(np.max(np.abs(fns["a"][1]() - fns["b"][1]())))
        for mode, index in (("train", 0), ("infer", 1)):
            samples = lstm_speed.time_round_robin({k: f[index] for k, f in fns.items()},
                                                  settings)
            a, b = (lstm_speed.summarize(samples[k]) for k in ("a", "b"))
            rows.append({"shape": shape.name, "mode": mode, "a_ms": a["ms_median"],
                         "b_ms": b["ms_median"], "a_p10_ms": a["ms_p10"],
                         "b_p10_ms": b["ms_p10"], "b_over_a": b["ms_median"] / a["ms_median"],
                         "n": a["n"], "max_abs_dy": dy})
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = [f"{'shape BxTxDxU':<16}{'mode':<7}{'A ms':>9}{'B ms':>9}{'B/A':>7}"
             f"{'A p10':>9}{'B p10':>9}{'n':>4}{'max|dy|':>9}"]
    for r in rows:
        lines.append(f"{r['shape']:<16}{r['mode']:<7}{r['a_ms']:>9.2f}{r['b_ms']:>9.2f}"
                     f"{r['b_over_a']:>7.3f}{r['a_p10_ms']:>9.2f}{r['b_p10_ms']:>9.2f}"
                     f"{r['n']:>4}{r['max_abs_dy']:>9.0e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", metavar="REV",
                        help=f"A is {LSTM_PATH} at this git revision (instead of --a)")
    parser.add_argument("--a", type=Path, help="A: a copy of lstm.py")
    parser.add_argument("--b", type=Path, default=ROOT / LSTM_PATH,
                        help=f"B: a copy of lstm.py (default: the working tree's {LSTM_PATH})")
    parser.add_argument("--shapes", default="1,2,3,4",
                        help="comma-separated spec shape indices (1-4) or BxTxDxU "
                             "(default: the four of lstm_speed.py)")
    parser.add_argument("--iters", type=int, default=40, help="timed rounds per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="time limit per row (after at least 5 rounds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if (args.base is None) == (args.a is None):
        parser.error("give exactly one of --base REV and --a FILE")
    shapes = [lstm_speed.parse_shape(s) for s in args.shapes.split(",")]
    settings = lstm_speed.Settings(iters=args.iters, warmup=args.warmup,
                                   max_seconds=args.max_seconds, seed=args.seed, quick=False)
    with tempfile.TemporaryDirectory() as tmp:
        a_path = args.a if args.a is not None else file_at(args.base, Path(tmp))
        versions = {"a": load_version(a_path, "lstm_ab_a"),
                    "b": load_version(args.b, "lstm_ab_b")}
        rows = compare(versions, shapes, settings)
    print(f"A = {args.base or args.a}, B = {args.b}")
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.base or args.a), "b": str(args.b),
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
