"""The adding problem: why an LSTM remembers and a simple RNN forgets.

Hochreiter & Schmidhuber's adding problem (1997; in the form of Le et al.,
2015): every time step carries two inputs, a value drawn from U[0, 1] and a
marker that is 1 at exactly two steps (one in the first half of the sequence,
one in the second half) and 0 elsewhere. The target, read after the last step,
is the sum of the two marked values. Predicting the constant 1.0 scores
MSE = Var(sum) = 2/12 ~ 0.167; a model "solves" a length T when its test MSE
falls below 0.01. Solving needs the first marked value carried over at least
T/2 steps, which is what the vanishing gradient makes hard for a simple RNN.

For each sequence length T and each model (``common.lstm.LSTM`` and
``keras.layers.SimpleRNN`` with about as many parameters), this module

1. trains on fresh random batches with Adam (clipnorm 1.0), evaluating a fixed
   test set every few steps and stopping once the model has stayed solved for
   two evaluations in a row;
2. measures ||dL/dh_t||, the norm of the gradient of one sequence's squared
   error with respect to the hidden state at every step t, at initialisation
   and after training (`hidden_state_grads`);
3. writes ``results.json``, ``learning_curves.png`` and ``grad_norms.png``.

Run ``python -m common.experiments.adding_problem --help``; the results and
their reading are in ``docs/experiments.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from common.cli import (
    ArgumentParser,
    HelpFormatter,
    add_debug_flag,
    choice_list,
    positive_float,
    positive_int,
    run_main,
)
from common.errors import UserError
from common.lstm import LSTM
from common.runs import versions, write_json

MODELS = ("lstm", "simplernn")
SOLVED_MSE = 0.01  # the usual threshold; the constant predictor scores ~0.167
SOLVED_EVALS = 2  # consecutive evaluations below SOLVED_MSE before stopping early
TEST_SIZE = 1000
GRAD_BATCH = 100  # sequences averaged in the gradient-norm curves

DEFAULT_LENGTHS = (50, 100, 200, 400)
DEFAULT_STEPS = 8000
DEFAULT_LEARNING_RATE = 1e-2


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def make_adding_data(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` adding-problem sequences of `length` steps.

    Returns ``x`` of shape (n, length, 2), float32, with channel 0 the values
    (U[0, 1]) and channel 1 the markers (exactly two ones: one in the first
    half, one in the second half), and ``y`` of shape (n, 1), the sum of the
    two marked values.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 to hold two markers, got {length}")
    values = rng.uniform(0.0, 1.0, size=(n, length))
    half = length // 2
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n)
    rows = np.arange(n)
    markers = np.zeros((n, length))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return x, y


def constant_baseline_mse(y: np.ndarray, constant: float = 1.0) -> float:
    """MSE of always predicting `constant` (1.0 = E[sum], so this is ~Var(sum) = 1/6)."""
    return float(np.mean((np.asarray(y, np.float64) - constant) ** 2))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def rnn_param_count(kind: str, units: int, inputs: int = 2) -> int:
    """Weights of the recurrent layer: kernel, recurrent kernel and bias."""
    gates = 4 if kind == "lstm" else 1
    return gates * (units * (inputs + units) + units)


def simplernn_units_for(lstm_units: int, inputs: int = 2) -> int:
    """SimpleRNN width whose parameter count is closest to an LSTM of `lstm_units`."""
    target = rnn_param_count("lstm", lstm_units, inputs)
    # u^2 + (inputs + 1) u = target; check the two integers around the root.
    root = (-(inputs + 1) + math.sqrt((inputs + 1) ** 2 + 4 * target)) / 2
    candidates = [max(1, math.floor(root)), math.ceil(root)]
    return min(candidates, key=lambda u: abs(rnn_param_count("simplernn", u, inputs) - target))


def build_model(kind: str, length: int, units: int, seed: int = 0) -> keras.Model:
    """Input(length, 2) -> recurrent layer "rnn" (last state only) -> Dense(1) "head"."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r} (choose from {', '.join(MODELS)})")
    keras.utils.set_random_seed(seed)
    rnn = LSTM(units, name="rnn") if kind == "lstm" else keras.layers.SimpleRNN(units, name="rnn")
    return keras.Sequential(
        [keras.Input((length, 2)), rnn, keras.layers.Dense(1, name="head")],
        name=f"{kind}_T{length}",
    )


# ---------------------------------------------------------------------------
# ||dL/dh_t||
# ---------------------------------------------------------------------------


def unrolled_predict(kind: str, weights: Sequence[Any], x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """The model's prediction, computed step by step, with `delta[t]` added to h_t.

    `weights` are the recurrent layer's (kernel, recurrent_kernel, bias) and the
    head's (kernel, bias), in Keras's layout (LSTM gates i, f, c, o; tanh and
    sigmoid). `delta` has shape (T, B, U). Because the perturbed h_t is what
    feeds step t + 1, d prediction / d delta[t] is the TOTAL derivative with
    respect to h_t, through every later step, not just its direct use in the
    output. (The gradient with respect to a ``return_sequences`` output tensor
    would miss the recurrence.)
    """
    kernel, recurrent, bias, w_out, b_out = weights
    batch = tf.shape(x)[0]
    units = recurrent.shape[0]
    xw = tf.einsum("btf,fg->tbg", x, kernel) + bias  # every input projection at once
    h = tf.zeros((batch, units), x.dtype)
    c = tf.zeros((batch, units), x.dtype)
    for xw_t, delta_t in zip(tf.unstack(xw), tf.unstack(delta), strict=True):
        z = xw_t + tf.matmul(h, recurrent)
        if kind == "lstm":
            z_i, z_f, z_g, z_o = tf.split(z, 4, axis=-1)
            c = tf.sigmoid(z_f) * c + tf.sigmoid(z_i) * tf.tanh(z_g)
            h = tf.sigmoid(z_o) * tf.tanh(c)
        else:
            h = tf.tanh(z)
        h = h + delta_t
    return tf.matmul(h, w_out) + b_out


def model_weights(model: keras.Model) -> list[np.ndarray]:
    """(kernel, recurrent_kernel, bias, head kernel, head bias) of a `build_model` model."""
    return model.get_layer("rnn").get_weights() + model.get_layer("head").get_weights()


def hidden_state_grads(model: keras.Model, x: np.ndarray, y: np.ndarray,
                       dtype: str = "float32") -> np.ndarray:
    """dL_b/dh_t for every step t and sequence b, shape (T, B, U).

    L_b is the squared error of sequence b (not a batch mean, so the size of
    the batch does not scale the gradients). Computed with autodiff through
    `unrolled_predict`, which reproduces the model's forward pass.
    """
    kind = model.name.split("_")[0]
    weights = [tf.constant(w, dtype) for w in model_weights(model)]
    x = tf.constant(x, dtype)
    y = tf.constant(y, dtype)
    delta = tf.zeros((x.shape[1], x.shape[0], weights[1].shape[0]), dtype)
    with tf.GradientTape() as tape:
        tape.watch(delta)
        loss = tf.reduce_sum(tf.square(unrolled_predict(kind, weights, x, delta) - y))
    return tape.gradient(loss, delta).numpy()


def hidden_state_grad_norms(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean over the batch of ||dL/dh_t||, shape (T,)."""
    return np.linalg.norm(hidden_state_grads(model, x, y), axis=-1).mean(axis=1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _test_mse(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    pred = np.asarray(model.predict_on_batch(x), np.float64)
    return float(np.mean((pred - y) ** 2))


def train_one(kind: str, length: int, *, steps: int, units: int, batch_size: int,
              learning_rate: float, seed: int, eval_every: int,
              test: tuple[np.ndarray, np.ndarray], grad_batch: tuple[np.ndarray, np.ndarray],
              log: Callable[[str], None]) -> dict:
    """Train one model on one length; returns its entry of ``results``."""
    width = units if kind == "lstm" else simplernn_units_for(units)
    model = build_model(kind, length, width, seed=seed)
    # The fused LSTM loop is XLA-compiled on its own and runs fastest without
    # jit around it; Keras's SimpleRNN loop gains ~20 % from XLA.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0), loss="mse",
                  jit_compile=kind == "simplernn")
    grads_init = hidden_state_grad_norms(model, *grad_batch)

    # A training stream of its own per (seed, T, model): reruns repeat exactly.
    rng = np.random.default_rng([seed, length, MODELS.index(kind)])
    curve_steps, curve_mse = [0], [_test_mse(model, *test)]
    solved_step, streak, status = None, 0, "budget"
    start = time.perf_counter()
    step = 0
    for step in range(1, steps + 1):
        x, y = make_adding_data(rng, batch_size, length)
        loss = float(model.train_on_batch(x, y))
        if not math.isfinite(loss):
            status = "diverged"
            break
        if step % eval_every and step != steps:
            continue
        mse = _test_mse(model, *test)
        curve_steps.append(step)
        curve_mse.append(mse)
        if mse < SOLVED_MSE:
            solved_step = solved_step or step
            streak += 1
        else:
            solved_step, streak = None, 0
        if streak >= SOLVED_EVALS:
            status = "solved"
        if status == "solved" or step % (5 * eval_every) == 0:
            log(f"  {kind:<9} T={length:<4} step {step:>6}  train loss {loss:.4f}  "
                f"test MSE {mse:.4f}")
        if status == "solved":
            break
    train_time = time.perf_counter() - start
    grads_trained = hidden_state_grad_norms(model, *grad_batch)
    return {
        "model": kind,
        "T": length,
        "units": width,
        "params": int(model.count_params()),
        "test_mse": curve_mse[-1],
        "best_test_mse": min(curve_mse),
        "solved": curve_mse[-1] < SOLVED_MSE,
        "solved_step": solved_step,
        "steps_run": step,
        "stop": status,
        "train_time_s": round(train_time, 2),
        "curve": {"step": curve_steps, "test_mse": curve_mse},
        "grad_norms": {"init": grads_init.tolist(), "trained": grads_trained.tolist()},
    }


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

_COLORS = {"lstm": "tab:blue", "simplernn": "tab:red"}
_LABELS = {"lstm": "LSTM", "simplernn": "SimpleRNN"}


def _panels(lengths: Sequence[int]):
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    cols = min(len(lengths), 2)
    rows = math.ceil(len(lengths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(lengths):]:
        ax.set_visible(False)
    return plt, fig, dict(zip(lengths, axes.flat, strict=False))


def _save(plt, fig, axes: dict, path: Path) -> None:
    """One legend above the panels (they share their lines), then an atomic write."""
    handles, labels = next(iter(axes.values())).get_legend_handles_labels()
    ncol = min(len(labels), 2 * fig.axes[0].get_gridspec().ncols)
    legend_rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=9, frameon=False)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 * legend_rows + 0.05) / height))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_learning_curves(results: list[dict], path: Path) -> None:
    """Test MSE against training step, one panel per T, log scale."""
    lengths = sorted({r["T"] for r in results})
    baselines = {r["T"]: r["baseline_mse"] for r in results}
    plt, fig, axes = _panels(lengths)
    for r in results:
        ax = axes[r["T"]]
        ax.plot(r["curve"]["step"], r["curve"]["test_mse"], color=_COLORS[r["model"]],
                label=f"{_LABELS[r['model']]} ({r['units']} units)")
    for length, ax in axes.items():
        ax.axhline(baselines[length], color="gray", ls="--", lw=1,
                   label="constant predictor (1.0)")
        ax.axhline(SOLVED_MSE, color="green", ls=":", lw=1, label=f"solved ({SOLVED_MSE})")
        ax.set_yscale("log")
        ax.set_title(f"adding problem, T = {length}")
        ax.set_xlabel("training step")
        ax.set_ylabel("test MSE")
        ax.grid(True, which="major", alpha=0.3)
    _save(plt, fig, axes, path)


GRAD_FLOOR = 1e-20  # the grad-norm plots' lower edge (float32 gradients underflow to 0 anyway)


def plot_grad_norms(results: list[dict], path: Path) -> None:
    """Mean ||dL/dh_t|| against t, one panel per T: dashed at init, solid trained.

    Values below `GRAD_FLOOR` are off the chart: a trained SimpleRNN's
    gradient falls by ~20 orders of magnitude within a few dozen steps.
    """
    lengths = sorted({r["T"] for r in results})
    plt, fig, axes = _panels(lengths)
    for r in results:
        ax = axes[r["T"]]
        t = np.arange(1, r["T"] + 1)
        name = _LABELS[r["model"]]
        ax.plot(t, r["grad_norms"]["init"], color=_COLORS[r["model"]], ls="--", lw=1,
                label=f"{name}, initialisation")
        ax.plot(t, r["grad_norms"]["trained"], color=_COLORS[r["model"]], lw=1.5,
                label=f"{name}, trained")
    for length, ax in axes.items():
        ax.axvline(length / 2, color="gray", ls=":", lw=1)  # first marker is left of this line
        ax.set_yscale("log")
        ax.set_ylim(bottom=GRAD_FLOOR)
        ax.set_title(f"||dL/dh_t||, T = {length}")
        ax.set_xlabel("time step t (loss read at t = T)")
        ax.set_ylabel("mean ||dL/dh_t||")
        ax.grid(True, which="major", alpha=0.3)
    _save(plt, fig, axes, path)


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    """The printed summary, one row per (model, T).

    "const" is the test MSE of predicting 1.0 (theory: 1/6 = 0.1667), "test
    MSE" the final evaluation (the one "solved" is judged on), "best" the
    lowest evaluation on the way, "at step" the step from which the model
    stayed solved, "train s" the wall time of training and its evaluations.
    """
    lines = [f"{'model':<10} {'T':>4} {'units':>5} {'params':>6} {'const':>6} {'test MSE':>9} "
             f"{'best':>7} {'solved':>6} {'at step':>7} {'steps':>6} {'train s':>8}"]
    for r in results:
        at = "-" if r["solved_step"] is None or not r["solved"] else str(r["solved_step"])
        best = r["best_test_mse"]
        lines.append(f"{r['model']:<10} {r['T']:>4} {r['units']:>5} {r['params']:>6} "
                     f"{r['baseline_mse']:>6.4f} {r['test_mse']:>9.4f} {best:>7.4f} "
                     f"{'yes' if r['solved'] else 'no':>6} {at:>7} {r['steps_run']:>6} "
                     f"{r['train_time_s']:>8.1f}")
    return "\n".join(lines)


def run_experiment(
    lengths: Sequence[int],
    steps: int,
    out_dir: Path,
    *,
    units: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    models: Sequence[str] = MODELS,
    verbose: bool = True,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> dict:
    """Train every model on every length; write results.json and the two PNGs.

    `steps` is the budget per (model, T); a model stops earlier once solved.
    `units` is the LSTM's width; the SimpleRNN gets the width with the closest
    parameter count (`simplernn_units_for`). Returns ``{"results": [...],
    "files": [...]}`` with one entry per (model, T), ordered by model then T,
    each with ``model``, ``T``, ``test_mse``, ``solved`` and the details.
    """
    lengths = [int(t) for t in lengths]
    models = list(models)
    if not lengths or min(lengths) < 2:
        raise UserError(f"lengths {lengths}: need at least one sequence length, each >= 2")
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"models {models}: choose one or more of {', '.join(MODELS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda _msg: None)
    eval_every = max(1, min(100, steps // 20))

    results: list[dict] = []
    baselines: dict[int, float] = {}
    config = {"lengths": lengths, "steps": steps, "units": units, "batch_size": batch_size,
              "learning_rate": learning_rate, "seed": seed, "models": models,
              "eval_every": eval_every, "test_size": TEST_SIZE, "solved_mse": SOLVED_MSE,
              "solved_evals": SOLVED_EVALS, "optimizer": "Adam, clipnorm 1.0"}
    started = time.perf_counter()
    for length in lengths:
        # Test and gradient sets depend on (seed, T) only: every model sees the same ones.
        data_rng = np.random.default_rng([seed, length, 99])
        test = make_adding_data(data_rng, TEST_SIZE, length)
        grad_batch = (test[0][:GRAD_BATCH], test[1][:GRAD_BATCH])
        baselines[length] = constant_baseline_mse(test[1])
        log(f"T={length}: constant predictor (1.0) test MSE {baselines[length]:.4f}")
        for kind in models:
            results.append(train_one(kind, length, steps=steps, units=units,
                                     batch_size=batch_size, learning_rate=learning_rate,
                                     seed=seed, eval_every=eval_every, test=test,
                                     grad_batch=grad_batch, log=log))
            r = results[-1]
            r["baseline_mse"] = baselines[length]  # the same test set for every model
            log(f"  -> {kind} T={length}: test MSE {r['test_mse']:.4f}, "
                f"{'solved' if r['solved'] else 'not solved'} after {r['steps_run']} steps "
                f"({r['train_time_s']:.0f} s)")
            # Written after every model, so an interrupted long run keeps what it has.
            write_json(out_dir / "results.json", {
                "config": config, "baseline_mse": baselines, "versions": versions(),
                "wall_time_s": round(time.perf_counter() - started, 1),
                "results": sorted(results, key=_order),
            })
    results.sort(key=_order)
    plot_learning_curves(results, out_dir / "learning_curves.png")
    plot_grad_norms(results, out_dir / "grad_norms.png")
    files = [str(out_dir / name) for name in ("results.json", "learning_curves.png", "grad_norms.png")]
    log(format_table(results))
    return {"results": results, "files": files}


def _order(r: dict) -> tuple:
    return (MODELS.index(r["model"]), r["T"])


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"need sequence lengths >= 2, got {text!r}")
    return values



def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m common.experiments.adding_problem",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=HelpFormatter,
        epilog="The defaults take about 20 minutes on 2 CPU cores (the SimpleRNN runs its\n"
               "whole budget); `--lengths 50 --steps 800` under a minute. Results and their\n"
               "reading: docs/experiments.md.",
    )
    parser.add_argument("--lengths", type=_int_list, default=",".join(map(str, DEFAULT_LENGTHS)),
                        metavar="T1,T2,...",
                        help="sequence lengths T to train on, comma-separated")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help="training-step budget per model and T (one batch of fresh "
                             "sequences per step); a model stops early once solved")
    parser.add_argument("--units", type=positive_int, default=32,
                        help="LSTM units; the SimpleRNN gets the width with the closest "
                             "parameter count (65 for 32)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="sequences per training step")
    parser.add_argument("--learning-rate", type=positive_float, default=DEFAULT_LEARNING_RATE,
                        help="Adam learning rate (gradients clipped to norm 1.0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the training streams and the test sets (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/adding_problem"), metavar="DIR",
                        help="output directory for results.json, learning_curves.png and "
                             "grad_norms.png (created)")
    parser.add_argument("--models", type=choice_list(MODELS, "model"), default=",".join(MODELS),
                        metavar="M1,M2",
                        help=f"models to train, comma-separated from {','.join(MODELS)}")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final table")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""

    def handler(args: argparse.Namespace) -> int:
        outcome = run_experiment(args.lengths, args.steps, args.out, units=args.units,
                                 batch_size=args.batch_size, seed=args.seed, models=args.models,
                                 verbose=not args.quiet, learning_rate=args.learning_rate)
        if args.quiet:
            print(format_table(outcome["results"]))
        print("wrote " + ", ".join(outcome["files"]))
        return 0

    return run_main(build_parser(), handler, None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
