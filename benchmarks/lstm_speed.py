"""Speed of `common.lstm.LSTM` against `keras.layers.LSTM` (and torch `nn.LSTM`).

One run prints one table. For every shape (batch, steps, inputs, units) and
each mode it times:

* ``train``: one forward + backward pass and an Adam update on an MSE loss
  against a random target, inside a ``tf.function`` written here and shared by
  both Keras layers (no outer ``jit_compile``: Keras's trainer resolves
  ``jit_compile="auto"`` to False on CPU, so that is what users get);
* ``infer``: a ``tf.function`` calling ``model(x, training=False)``
  (``torch.inference_mode()`` for torch).

The implementations are timed round-robin (one iteration of each in turn, in a
rotating order, after a short pause), so load from other processes on a shared
machine hits all of them alike. Each row reports the median time per batch over
the timed iterations after warm-up and the p10-p90 spread, throughput, the
speed ratio to Keras (``keras_ms / impl_ms``: above 1 is faster), achieved
GFLOP/s and how close that is to two matmul rooflines measured at start-up:

* ``%roof``: best-case ms / measured ms, where the best case is the shape's
  matmul work at measured float32 ``tf.matmul`` rates: the input projection
  ``(B*T, D) x (D, 4U)`` as one large product and the recurrent
  ``(B, U) x (U, 4U)`` product as a serial chain of ``T`` steps (what any LSTM
  is bound by). See `Roofline`.
* ``%peak``: GFLOP/s against a large square float32 matmul, the machine's
  practical peak.

FLOP convention: forward = steps * (2 * B * (D + U) * 4U + 10 * B * U); a
train step counts 3x forward. Before timing, every implementation gets the
same weights (Keras ``set_weights``; torch ``weight_ih = kernel.T`` etc., same
gate order i, f, g, o) and its outputs (and, for train, gradients) are
compared with Keras's; a mismatch fails the row and the exit status.

Usage::

    python benchmarks/lstm_speed.py                 # full run (< 10 min on 2 cores)
    python benchmarks/lstm_speed.py --quick         # smoke test
    python benchmarks/lstm_speed.py --shapes 1,64x100x64x256 --iters 50

Results go to ``benchmarks/results/lstm_speed.json`` and ``.txt`` (``--quick``
writes ``lstm_speed_quick.*`` instead unless ``--json`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common.lstm import LSTM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Acceptance targets from the spec: speed-up over keras.layers.LSTM.
INFER_TARGET = 1.3
Y_TOL = 1e-4  # max |output difference| to Keras, from the spec
G_TOL = 1e-4  # max |gradient difference| / max |Keras gradient|
TORCH_HINT = "torch not installed (pip install torch==2.13.0 for the comparison)"
SQUARE_N = 2048  # size of the square matmul that measures the machine's peak
# Idle time before each timed call, so that one framework's worker threads,
# which spin for a while after their work, do not steal cores from the next.
PAUSE_S = 0.01
# A median this far above the 10th percentile means two populations of timings
# (outside load for part of the row): the ratio to Keras may then flip on a re-run.
# On this machine quiet runs gave at most 1.20 (inference rows are the widest)
# and a loaded one 1.32; the one full run whose Keras train row read 71.8 ms
# median against 46.1 ms p10 (1.56) showed 2.06x where quiet runs give 1.45x.
NOISY_MEDIAN_OVER_P10 = 1.4


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark configuration, with its training target (None: no target)."""

    batch: int
    steps: int
    inputs: int
    units: int
    train_target: float | None = None

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.steps}x{self.inputs}x{self.units}"

    @property
    def forward_flops(self) -> float:
        b, d, u = self.batch, self.inputs, self.units
        return self.steps * (2.0 * b * (d + u) * 4 * u + 10.0 * b * u)

    def flops(self, mode: str) -> float:
        return self.forward_flops * (3.0 if mode == "train" else 1.0)

    def target(self, mode: str) -> float | None:
        if mode == "train":
            return self.train_target
        return INFER_TARGET if self.train_target is not None else None


SPEC_SHAPES: tuple[Shape, ...] = (
    Shape(64, 100, 64, 256, 1.5),
    Shape(32, 200, 128, 128, 1.5),
    Shape(32, 100, 13, 128, 1.5),
    Shape(128, 60, 5, 64, 1.2),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    iters: int
    warmup: int
    max_seconds: float
    seed: int
    quick: bool


# ---------------------------------------------------------------------------
# Environment and statistics
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "common"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (common/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(torch_module: Any | None) -> dict[str, Any]:
    lstm_src = REPO / "common" / "lstm.py"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "torch": torch_module.__version__ if torch_module else None,
        "torch_threads": torch_module.get_num_threads() if torch_module else None,
        "git": git_revision(),
        "common_lstm_sha256": hashlib.sha256(lstm_src.read_bytes()).hexdigest()[:12],
    }


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    p10, p50, p90 = np.percentile(ms, [10, 50, 90])
    return {"ms_median": float(p50), "ms_p10": float(p10), "ms_p90": float(p90),
            "n": len(ms)}


def time_round_robin(fns: dict[str, Callable[[], object]], settings: Settings
                     ) -> dict[str, list[float]]:
    """Warm up, then time one call of each function in turn, rotating the order.

    Stops after ``settings.iters`` rounds, or earlier (but after at least
    ``min(5, iters)`` rounds) once ``settings.max_seconds`` have passed. Each
    function must block until its work is done; ``PAUSE_S`` of idle precedes
    every timed call.
    """
    for _ in range(settings.warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for i in range(settings.iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        if i + 1 >= min(5, settings.iters) and time.perf_counter() - start > settings.max_seconds:
            break
    return samples


# ---------------------------------------------------------------------------
# Matmul rooflines
# ---------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    """Fastest of ``reps`` calls after one warm-up: a roofline is a best case."""
    fn()
    times = []
    for _ in range(reps):
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(m: int, k: int, n: int, reps: int = 10) -> float:
    """GFLOP/s of one float32 (m, k) x (k, n) tf.matmul."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((m, k), dtype=np.float32))
    b = tf.constant(rng.standard_normal((k, n), dtype=np.float32))
    matmul = tf.function(lambda: tf.matmul(a, b)[0, 0])
    return 2.0 * m * k * n / _best_seconds(lambda: matmul().numpy(), reps) / 1e9


def recurrent_matmul_gflops(shape: Shape, reps: int = 10) -> float:
    """GFLOP/s of ``steps`` dependent (B, U) x (U, 4U) matmuls in one loop.

    ``h <- tanh((h @ w)[:, :U])`` keeps the chain serial (nothing can be hoisted
    or batched across steps, as in an LSTM) and the values bounded. Only the
    matmul is counted; the best of an XLA-compiled and a plain TF loop is kept.
    """
    b, u, steps = shape.batch, shape.units, shape.steps
    rng = np.random.default_rng(0)
    h0 = tf.constant(rng.uniform(-1, 1, (b, u)).astype(np.float32))
    w = tf.constant((rng.standard_normal((u, 4 * u)) * 2 / np.sqrt(u)).astype(np.float32))

    def chain(h: tf.Tensor) -> tf.Tensor:
        return tf.while_loop(lambda i, h: i < steps,
                             lambda i, h: (i + 1, tf.tanh(tf.matmul(h, w)[:, :u])),
                             (tf.constant(0), h))[1][0, 0]

    flops = 2.0 * b * u * 4 * u * steps
    best = 0.0
    for jit in (True, False):
        fn = tf.function(chain, jit_compile=jit)
        best = max(best, flops / _best_seconds(lambda f=fn: f(h0).numpy(), reps) / 1e9)
    return best


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Matmul-bound best-case time of one shape, from measured matmul rates.

    The input projection ``(B*T, D) x (D, 4U)`` is one large product; the
    recurrent ``(B, U) x (U, 4U)`` product runs ``T`` times in series. Forward:
    projection + chain. Train: forward, the serial ``dz_t @ W_hh^T`` chain
    backward, input-side weight and input gradients (at the projection rate) and
    the recurrent weight gradient as one large product (at the square rate):
    3x the forward matmul FLOPs, as in the GFLOP/s column.
    """

    square_gflops: float
    projection_gflops: float
    recurrent_gflops: float

    @staticmethod
    def measure(shape: Shape, square_gflops: float) -> Roofline:
        rows = shape.batch * shape.steps
        return Roofline(square_gflops,
                        matmul_gflops(rows, shape.inputs, 4 * shape.units),
                        recurrent_matmul_gflops(shape))

    def ideal_ms(self, shape: Shape, mode: str) -> float:
        b, t, d, u = shape.batch, shape.steps, shape.inputs, shape.units
        projection = 2.0 * t * b * d * 4 * u / self.projection_gflops
        recurrent = 2.0 * t * b * u * 4 * u / self.recurrent_gflops
        if mode == "infer":
            return (projection + recurrent) / 1e6
        batched_recurrent = 2.0 * t * b * u * 4 * u / self.square_gflops
        return (3 * projection + 2 * recurrent + batched_recurrent) / 1e6


# ---------------------------------------------------------------------------
# The implementations under test
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Impl:
    """Callables for one implementation at one shape, plus correctness results."""

    name: str
    train: Callable[[], object]
    infer: Callable[[], object]
    # mode -> {"dy": max |output - keras output|, "dg": relative gradient diff}
    check: dict[str, dict[str, float | None]]
    path: Callable[[], str | None] = lambda: None


def build_keras_model(layer_cls: type, shape: Shape, name: str) -> keras.Model:
    return keras.Sequential(
        [keras.Input((shape.steps, shape.inputs)), layer_cls(shape.units, name="lstm")],
        name=name)


def keras_functions(model: keras.Model, x: tf.Tensor, y: tf.Tensor
                    ) -> tuple[Callable[[], object], Callable[[], object], Callable]:
    """Train step, inference call and a (outputs, gradients) probe for a model."""
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def infer_step(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    @tf.function
    def probe(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(tf.square(out - y))
        return out, tape.gradient(loss, model.trainable_variables)

    def probe_np() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        out, grads = probe(x, y)
        return infer_step(x).numpy(), out.numpy(), [g.numpy() for g in grads]

    return (lambda: train_step(x, y).numpy(), lambda: infer_step(x).numpy(), probe_np)


def torch_functions(torch: Any, shape: Shape, weights: Sequence[np.ndarray],
                    x: np.ndarray, y: np.ndarray
                    ) -> tuple[Callable[[], object], Callable[[], object], Callable]:
    """Same as `keras_functions` for torch.nn.LSTM with the Keras weights."""
    kernel, recurrent, bias = weights
    lstm = torch.nn.LSTM(shape.inputs, shape.units, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        lstm.weight_hh_l0.copy_(torch.from_numpy(np.ascontiguousarray(recurrent.T)))
        lstm.bias_ih_l0.copy_(torch.from_numpy(bias))
        lstm.bias_hh_l0.zero_()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(lstm.parameters(), lr=1e-3)
    mse = torch.nn.functional.mse_loss

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out, _ = lstm(xt)
        loss = mse(out[:, -1], yt)
        loss.backward()
        optimizer.step()
        return loss.item()

    def infer_step() -> np.ndarray:
        with torch.inference_mode():
            return lstm(xt)[0][:, -1].numpy()

    def probe_np() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        lstm.zero_grad(set_to_none=True)
        out = lstm(xt)[0][:, -1]
        mse(out, yt).backward()
        grads = [lstm.weight_ih_l0.grad.numpy().T, lstm.weight_hh_l0.grad.numpy().T,
                 lstm.bias_ih_l0.grad.numpy()]
        lstm.zero_grad(set_to_none=True)
        return infer_step(), out.detach().numpy(), grads

    return train_step, infer_step, probe_np


def compare(reference: tuple, other: tuple) -> dict[str, dict[str, float | None]]:
    """Output and gradient differences of a probe result against Keras's."""
    (ref_inf, ref_train, ref_grads), (inf, train, grads) = reference, other
    scale = max(float(np.abs(g).max()) for g in ref_grads) or 1.0
    dg = max(float(np.abs(a - b).max()) for a, b in zip(ref_grads, grads, strict=True))
    return {"infer": {"dy": float(np.abs(ref_inf - inf).max()), "dg": None},
            "train": {"dy": float(np.abs(ref_train - train).max()), "dg": dg / scale}}


def build_impls(shape: Shape, torch: Any | None, seed: int) -> list[Impl]:
    """Keras, lstm-suite and (if available) torch at one shape, same weights."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((shape.batch, shape.steps, shape.inputs), dtype=np.float32)
    y_np = rng.uniform(-0.5, 0.5, (shape.batch, shape.units)).astype(np.float32)
    x, y = tf.constant(x_np), tf.constant(y_np)

    reference = build_keras_model(keras.layers.LSTM, shape, "keras")
    suite = build_keras_model(LSTM, shape, "suite")
    suite.set_weights(reference.get_weights())
    weights = reference.get_weights()

    k_train, k_infer, k_probe = keras_functions(reference, x, y)
    s_train, s_infer, s_probe = keras_functions(suite, x, y)
    ref = k_probe()  # before any training step changes the weights
    suite_layer = suite.layers[-1]
    impls = [
        Impl("keras", k_train, k_infer, compare(ref, ref)),
        Impl("lstm-suite", s_train, s_infer, compare(ref, s_probe()),
             path=lambda: getattr(suite_layer, "execution_path", None)),
    ]
    if torch is not None:
        t_train, t_infer, t_probe = torch_functions(torch, shape, weights, x_np, y_np)
        impls.append(Impl("torch", t_train, t_infer, compare(ref, t_probe())))
    return impls


# ---------------------------------------------------------------------------
# Rows, table, files
# ---------------------------------------------------------------------------


def make_rows(shape: Shape, mode: str, impls: Sequence[Impl], samples: dict[str, list[float]],
              paths: dict[str, str | None], roofline: Roofline) -> list[dict]:
    stats = {impl.name: summarize(samples[impl.name]) for impl in impls}
    keras_ms = stats["keras"]["ms_median"]
    torch_ms = stats["torch"]["ms_median"] if "torch" in stats else None
    rows = []
    for impl in impls:
        st = stats[impl.name]
        ms = st["ms_median"]
        gflops = shape.flops(mode) / (ms / 1e3) / 1e9
        check = impl.check[mode]
        check_ok = check["dy"] <= Y_TOL and (check["dg"] is None or check["dg"] <= G_TOL)
        target = shape.target(mode) if impl.name == "lstm-suite" else None
        ratio = keras_ms / ms
        if not check_ok:
            status = "FAIL(check)"
        elif impl.name == "keras":
            status = "baseline"
        elif impl.name == "torch":
            status = "reference"
        elif target is None:
            status = "-"
        else:
            status = "PASS" if ratio >= target else "FAIL"
        rows.append({
            "shape": shape.name, "batch": shape.batch, "steps": shape.steps,
            "inputs": shape.inputs, "units": shape.units, "mode": mode,
            "impl": impl.name, "execution_path": paths.get(impl.name), **st,
            "samples_per_s": shape.batch / (ms / 1e3),
            "ratio_vs_keras": ratio,
            "ratio_vs_torch": (torch_ms / ms) if torch_ms and impl.name == "lstm-suite" else None,
            "gflops": gflops,
            "roofline_ms": roofline.ideal_ms(shape, mode),
            "pct_roofline": 100 * roofline.ideal_ms(shape, mode) / ms,
            "pct_peak": 100 * gflops / roofline.square_gflops,
            "max_abs_dy": check["dy"], "rel_dgrad": check["dg"],
            "target_vs_keras": target, "status": status,
        })
    return rows


COLUMNS: tuple[tuple[str, str, Callable[[dict], str]], ...] = (
    # (header, alignment, formatter)
    ("shape BxTxDxU", "<", lambda r: r["shape"]),
    ("mode", "<", lambda r: r["mode"]),
    ("impl", "<", lambda r: r["impl"] + (f"[{r['execution_path']}]" if r["execution_path"]
                                         else "")),
    ("ms/batch", ">", lambda r: f"{r['ms_median']:.2f}"),
    ("p10-p90 ms", ">", lambda r: f"{r['ms_p10']:.1f}-{r['ms_p90']:.1f}"),
    ("n", ">", lambda r: str(r["n"])),
    ("samples/s", ">", lambda r: f"{r['samples_per_s']:.0f}"),
    ("x keras", ">", lambda r: f"{r['ratio_vs_keras']:.2f}"),
    ("x torch", ">", lambda r: "" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}"),
    ("GFLOP/s", ">", lambda r: f"{r['gflops']:.1f}"),
    ("%roof", ">", lambda r: f"{r['pct_roofline']:.0f}"),
    ("%peak", ">", lambda r: f"{r['pct_peak']:.0f}"),
    ("max|dy|", ">", lambda r: f"{r['max_abs_dy']:.0e}"),
    ("rel|dg|", ">", lambda r: "" if r["rel_dgrad"] is None else f"{r['rel_dgrad']:.0e}"),
    ("target", ">", lambda r: "" if r["target_vs_keras"] is None
     else f">={r['target_vs_keras']:.1f}x"),
    ("status", "<", lambda r: r["status"]),
)


def format_table(rows: Sequence[dict]) -> str:
    cells = [[fmt(r) for _, _, fmt in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(COLUMNS)]
    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, (_, a, _), w in zip(values, COLUMNS, widths,
                                                                    strict=True)).rstrip()
    out = [line([h for h, _, _ in COLUMNS]), line(["-" * w for w in widths])]
    previous = None
    for row, c in zip(rows, cells, strict=True):
        if previous is not None and (row["shape"], row["mode"]) != previous:
            out.append("")
        previous = (row["shape"], row["mode"])
        out.append(line(c))
    return "\n".join(out)


def noisy_rows(rows: Sequence[dict]) -> list[str]:
    """'shape mode impl' of the keras and lstm-suite rows whose timings look bimodal."""
    return [f"{r['shape']} {r['mode']} {r['impl']} (median {r['ms_median']:.1f} ms, "
            f"p10 {r['ms_p10']:.1f} ms)"
            for r in rows if r["impl"] in ("keras", "lstm-suite")
            and r["ms_median"] > NOISY_MEDIAN_OVER_P10 * r["ms_p10"]]


def format_report(env: dict, settings: Settings, square_gflops: float,
                  rooflines: dict[Shape, Roofline], rows: Sequence[dict],
                  torch_note: str | None) -> str:
    suite_rows = [r for r in rows if r["impl"] == "lstm-suite" and r["target_vs_keras"]]
    passed = sum(r["status"] == "PASS" for r in suite_rows)
    behind_torch = [f"{r['shape']} {r['mode']}" for r in suite_rows
                    if r["ratio_vs_torch"] is not None and r["ratio_vs_torch"] < 1]
    lines = [
        "LSTM speed: common.lstm.LSTM vs keras.layers.LSTM"
        + (" vs torch.nn.LSTM" if env["torch"] else "")
        + ("   [--quick: smoke test, not a measurement]" if settings.quick else ""),
        f"date {env['date']}   git {env['git']}   common/lstm.py sha256 "
        f"{env['common_lstm_sha256']}",
        f"cpu  {env['cpu']}, {env['cores']} usable cores ({env['logical_cpus']} logical), "
        f"loadavg at start {env['loadavg_start']}",
        f"sw   python {env['python']}, tensorflow {env['tensorflow']}, keras {env['keras']}, "
        f"numpy {env['numpy']}, torch "
        + (f"{env['torch']} ({env['torch_threads']} threads)" if env["torch"] else "-"),
        f"run  warm-up {settings.warmup}, up to {settings.iters} timed iterations per row "
        f"(at most ~{settings.max_seconds:.0f} s per shape and mode), round-robin, seed "
        f"{settings.seed}",
        f"peak      {SQUARE_N}^3 float32 tf.matmul: {square_gflops:.1f} GFLOP/s (= 100 %peak)",
        "roofline  per shape, measured float32 matmul GFLOP/s of the input projection "
        "(B*T,D)x(D,4U) and of the serial recurrent (B,U)x(U,4U) chain, and the resulting "
        "matmul-bound best-case ms (= 100 %roof):",
        *(f"          {s.name:>15}: projection {r.projection_gflops:6.1f}, recurrent "
          f"{r.recurrent_gflops:6.1f} GFLOP/s -> train {r.ideal_ms(s, 'train'):7.2f} ms, "
          f"infer {r.ideal_ms(s, 'infer'):7.2f} ms" for s, r in rooflines.items()),
        f"targets   train >= 1.5x keras at 64x100x64x256, 32x200x128x128, 32x100x13x128 and "
        f">= 1.2x at 128x60x5x64; inference >= {INFER_TARGET}x keras; aim for >= torch",
    ]
    if torch_note:
        lines.append(f"note      {torch_note}")
    if env["loadavg_start"][0] > 0.5 * env["cores"]:
        lines.append(f"warning   load average {env['loadavg_start'][0]} at start on "
                     f"{env['cores']} cores: other processes were running"
                     + (". torch, whose OpenMP threads wait on each other at every step, "
                        "slows down most." if env["torch"] else "."))
    lines += ["", format_table(rows), ""]
    lines.append(
        "ms/batch: median per batch; x keras = keras_ms / impl_ms (>1 is faster); x torch "
        "likewise; GFLOP/s with forward = T*(2*B*(D+U)*4U + 10*B*U), train = 3x forward;\n"
        "%roof = best-case ms / ms; %peak = GFLOP/s / square-matmul GFLOP/s; "
        f"max|dy|: output vs keras (<= {Y_TOL:g}); rel|dg|: gradient vs keras / max|grad| "
        f"(<= {G_TOL:g}).")
    if suite_rows:
        lines.append(f"summary   {passed}/{len(suite_rows)} lstm-suite rows meet their target"
                     + (f"; behind torch at: {', '.join(behind_torch)}" if behind_torch else
                        ("; at or ahead of torch everywhere" if env["torch"] else "")))
    noisy = noisy_rows(rows)
    if noisy:
        lines.append(f"warning   timings look bimodal (median > {NOISY_MEDIAN_OVER_P10}x "
                     f"p10), so their x keras may flip on a re-run: {'; '.join(noisy)}")
    lines.append(f"loadavg at end {[round(v, 2) for v in os.getloadavg()]}"
                 " (the machine may be shared: numbers are indicative)")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_shape(text: str) -> Shape:
    """A 1-based index into the spec shapes, or BxTxDxU (spec targets if listed)."""
    text = text.strip()
    if text.isdigit():
        index = int(text)
        if not 1 <= index <= len(SPEC_SHAPES):
            raise argparse.ArgumentTypeError(f"shape index must be 1..{len(SPEC_SHAPES)}")
        return SPEC_SHAPES[index - 1]
    try:
        b, t, d, u = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: use an index 1..{len(SPEC_SHAPES)} or BxTxDxU") from None
    for spec in SPEC_SHAPES:
        if (spec.batch, spec.steps, spec.inputs, spec.units) == (b, t, d, u):
            return spec
    return Shape(b, t, d, u)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="few iterations, for smoke testing (numbers are not meaningful)")
    parser.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")],
                        default=list(SPEC_SHAPES),
                        help="comma-separated 1-based indices or BxTxDxU "
                             "(default: " + ",".join(s.name for s in SPEC_SHAPES) + ")")
    parser.add_argument("--iters", type=int, help="timed iterations per row (default 50; "
                        "quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 5; "
                        "quick 1)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop timing a shape and mode after this many seconds, once 5 "
                             "rounds are done (default 45; quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    parser.add_argument("--json", type=Path,
                        help="where to write the JSON results; the table goes beside it "
                             "with a .txt suffix (default benchmarks/results/lstm_speed.json, "
                             "lstm_speed_quick.json with --quick)")
    return parser.parse_args(argv)


def import_torch(disabled: bool, threads: int) -> tuple[Any | None, str | None]:
    if disabled:
        return None, "torch comparison disabled (--no-torch)"
    try:
        import torch
    except ImportError:
        return None, TORCH_HINT
    torch.set_num_threads(threads)
    return torch, None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Each shape builds fresh tf.functions by design; TF's "retracing" warning is noise.
    tf.get_logger().setLevel("ERROR")
    settings = Settings(
        iters=args.iters if args.iters is not None else (3 if args.quick else 50),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5),
        max_seconds=args.max_seconds if args.max_seconds is not None else (
            10.0 if args.quick else 45.0),
        seed=args.seed, quick=args.quick)
    json_path = args.json or RESULTS / ("lstm_speed_quick.json" if args.quick
                                        else "lstm_speed.json")
    # Same thread count as TensorFlow's default intra-op pool (all usable cores).
    torch, torch_note = import_torch(args.no_torch, usable_cores())
    if torch_note:
        print(torch_note, flush=True)
    env = environment(torch)
    shapes: list[Shape] = list(dict.fromkeys(args.shapes))

    print("measuring matmul rooflines ...", flush=True)
    square_gflops = matmul_gflops(SQUARE_N, SQUARE_N, SQUARE_N)
    rooflines = {shape: Roofline.measure(shape, square_gflops) for shape in shapes}

    rows: list[dict] = []
    for shape in shapes:
        print(f"{shape.name}: building and checking ...", flush=True)
        impls = build_impls(shape, torch, settings.seed)
        for mode in ("train", "infer"):
            print(f"{shape.name}: timing {mode} ...", flush=True)
            fns = {impl.name: getattr(impl, mode) for impl in impls}
            samples = time_round_robin(fns, settings)
            paths = {impl.name: impl.path() for impl in impls}
            rows += make_rows(shape, mode, impls, samples, paths, rooflines[shape])
        keras.backend.clear_session()

    report = format_report(env, settings, square_gflops, rooflines, rows, torch_note)
    print("\n" + report)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "benchmark": "lstm_speed", "environment": env,
        "settings": dataclasses.asdict(settings),
        "flops": "forward = steps*(2*B*(D+U)*4U + 10*B*U); train = 3*forward",
        "roofline": {
            f"square_{SQUARE_N}_gflops": square_gflops,
            "per_shape": {s.name: {**dataclasses.asdict(r), "train_ms": r.ideal_ms(s, "train"),
                                   "infer_ms": r.ideal_ms(s, "infer")}
                          for s, r in rooflines.items()},
        },
        "targets": {"train_vs_keras": {s.name: s.train_target for s in shapes},
                    "infer_vs_keras": INFER_TARGET, "aim": ">= torch nn.LSTM",
                    "max_abs_dy": Y_TOL, "rel_dgrad": G_TOL},
        "torch_note": torch_note, "rows": rows,
    }
    write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_atomic(json_path.with_suffix(".txt"), report + "\n")
    print(f"\nwrote {json_path} and {json_path.with_suffix('.txt').name}")
    failed = [r for r in rows if r["status"].startswith("FAIL(check)")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
