"""Tests for `common.experiments.adding_problem`: data, gradient norms, the driver, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from common.experiments import adding_problem as ap

pytestmark = pytest.mark.usefixtures("freeze_gc_after_each_test")

# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def test_data_has_two_markers_and_the_target_is_their_sum():
    rng = np.random.default_rng(0)
    x, y = ap.make_adding_data(rng, 500, 21)
    assert x.shape == (500, 21, 2) and y.shape == (500, 1)
    assert x.dtype == np.float32 and y.dtype == np.float32
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert set(np.unique(markers)) == {0.0, 1.0}
    np.testing.assert_array_equal(markers.sum(axis=1), 2)
    # One marker in each half (the first half is the first T // 2 steps).
    np.testing.assert_array_equal(markers[:, :10].sum(axis=1), 1)
    np.testing.assert_array_equal(markers[:, 10:].sum(axis=1), 1)
    np.testing.assert_allclose(y[:, 0], (values * markers).sum(axis=1), rtol=1e-6)
    # Marker positions actually vary (not always the same two steps).
    assert len({tuple(np.flatnonzero(m)) for m in markers}) > 100


def test_data_is_reproducible_from_the_seed_and_rejects_short_sequences():
    a = ap.make_adding_data(np.random.default_rng(7), 4, 6)
    b = ap.make_adding_data(np.random.default_rng(7), 4, 6)
    c = ap.make_adding_data(np.random.default_rng(8), 4, 6)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="length"):
        ap.make_adding_data(np.random.default_rng(0), 4, 1)


def test_constant_predictor_scores_one_sixth():
    _, y = ap.make_adding_data(np.random.default_rng(1), 200_000, 4)
    # Var(u1 + u2) = 2/12; the standard error here is ~4e-4.
    assert ap.constant_baseline_mse(y) == pytest.approx(1 / 6, abs=3e-3)
    assert ap.constant_baseline_mse(y, constant=0.0) > 1.0  # E[sum^2] = 7/6


def test_simplernn_width_matches_the_lstm_parameter_count():
    lstm = ap.rnn_param_count("lstm", 32)
    width = ap.simplernn_units_for(32)
    assert width == 65
    for other in (width - 1, width + 1):
        assert abs(ap.rnn_param_count("simplernn", width) - lstm) <= abs(
            ap.rnn_param_count("simplernn", other) - lstm)
    model = ap.build_model("simplernn", 5, width)
    assert model.get_layer("rnn").count_params() == ap.rnn_param_count("simplernn", width)


# ---------------------------------------------------------------------------
# gradient norms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ap.MODELS)
def test_unrolled_forward_reproduces_the_model(kind):
    model = ap.build_model(kind, 7, 4, seed=3)
    x, _ = ap.make_adding_data(np.random.default_rng(0), 5, 7)
    weights = [tf.constant(w) for w in ap.model_weights(model)]
    pred = ap.unrolled_predict(kind, weights, tf.constant(x), tf.zeros((7, 5, 4)))
    np.testing.assert_allclose(pred.numpy(), model.predict_on_batch(x), atol=1e-5)


@pytest.mark.parametrize("kind", ap.MODELS)
def test_hidden_state_grads_match_finite_differences(kind):
    steps, batch, units = 5, 2, 3
    model = ap.build_model(kind, steps, units, seed=1)
    x, y = ap.make_adding_data(np.random.default_rng(2), batch, steps)
    grads = ap.hidden_state_grads(model, x, y, dtype="float64")
    assert grads.shape == (steps, batch, units)

    weights = [tf.constant(w, tf.float64) for w in ap.model_weights(model)]
    xs, ys = tf.constant(x, tf.float64), y.astype(np.float64)

    def loss(delta):
        pred = ap.unrolled_predict(kind, weights, xs, tf.constant(delta)).numpy()
        return float(np.sum((pred - ys) ** 2))

    eps = 1e-6
    numeric = np.zeros_like(grads)
    for index in np.ndindex(*grads.shape):
        bump = np.zeros(grads.shape)
        bump[index] = eps
        numeric[index] = (loss(bump) - loss(-bump)) / (2 * eps)
    np.testing.assert_allclose(grads, numeric, rtol=1e-5, atol=1e-8)
    # The gradient reaches the early steps through the recurrence: a gradient
    # taken only at the output (the direct contribution) would be zero there.
    assert np.abs(grads[0]).max() > 1e-6


def test_grad_norms_are_a_positive_curve_over_time():
    model = ap.build_model("simplernn", 12, 8)
    x, y = ap.make_adding_data(np.random.default_rng(0), 6, 12)
    norms = ap.hidden_state_grad_norms(model, x, y)
    assert norms.shape == (12,)
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)


# ---------------------------------------------------------------------------
# the driver and the command line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short run of both models on T=10, shared by the tests below (~10 s)."""
    out = tmp_path_factory.mktemp("adding") / "nested" / "out"
    return out, ap.run_experiment((10,), 300, out, units=16, verbose=False)


@pytest.mark.slow
def test_run_experiment_writes_the_files_and_returns_the_documented_structure(tiny_run):
    out, outcome = tiny_run
    assert sorted(outcome) == ["files", "results"]
    names = sorted(p.split("/")[-1] for p in outcome["files"])
    assert names == ["grad_norms.png", "learning_curves.png", "results.json"]
    for path in outcome["files"]:
        assert (out / path.split("/")[-1]).stat().st_size > 1000
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    results = outcome["results"]
    assert [(r["model"], r["T"]) for r in results] == [("lstm", 10), ("simplernn", 10)]
    for r in results:
        assert isinstance(r["test_mse"], float) and np.isfinite(r["test_mse"])
        assert r["solved"] == (r["test_mse"] < ap.SOLVED_MSE)
        assert r["steps_run"] == 300 or r["solved"]
        assert r["curve"]["step"][0] == 0 and r["curve"]["step"][-1] == r["steps_run"]
        assert r["curve"]["test_mse"][-1] == r["test_mse"]
        assert len(r["grad_norms"]["init"]) == len(r["grad_norms"]["trained"]) == 10
    assert results[1]["units"] == ap.simplernn_units_for(16)

    saved = json.loads((out / "results.json").read_text())
    assert [r["test_mse"] for r in saved["results"]] == [r["test_mse"] for r in results]
    assert saved["baseline_mse"]["10"] == pytest.approx(1 / 6, abs=0.03)


@pytest.mark.slow
def test_lstm_beats_the_constant_predictor_on_short_sequences(tiny_run):
    lstm = tiny_run[1]["results"][0]
    # The constant predictor scores ~0.167; remembering one of the two values ~0.083.
    assert lstm["model"] == "lstm" and lstm["test_mse"] < 0.05


def test_cli_prints_the_table(tmp_path, capsys):
    code = ap.main(["--lengths", "6", "--steps", "4", "--units", "4", "--models", "simplernn",
                    "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "simplernn" in out and "test MSE" in out and "solved" in out
    assert (tmp_path / "grad_norms.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "1,50"], "lengths >= 2"),
    (["--lengths", "fifty"], "comma-separated integers"),
    (["--models", "gru"], "unknown model"),
    (["--steps", "0"], "positive integer"),
])
def test_cli_rejects_bad_flags_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ap.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        ap.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--lengths", "--steps", "--units", "--batch-size", "--learning-rate",
                 "--seed", "--out", "--models"):
        assert flag in out
    assert "adding problem" in out.lower()
