"""apps.finance end to end: train -> evaluate --json -> predict -> export, and bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from apps.finance.__main__ import main
from apps.finance.synthetic import write_csv

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "apps" / "finance" / "samples" / "spy_sample.csv"
TINY = ["--epochs", "1", "--units", "8", "--window", "20", "--vol-window", "5",
        "--batch-size", "64"]


def run_cli(capsys, *argv):
    code = main(["forecast", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


# Runs in a fresh interpreter without any of our code: raw CSV rows in, forecast out.
FRESH = textwrap.dedent("""
    import json, sys
    import pandas as pd, tensorflow as tf
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    frame = pd.read_csv(sys.argv[2])
    rows = frame[["Open", "High", "Low", "Close", "Volume"]].to_numpy("float32")[-20:]
    out = {k: v.numpy().tolist() for k, v in serve(rows=tf.constant(rows[None])).items()}
    out["ours"] = sorted(m for m in sys.modules if m.split(".")[0] in ("common", "apps"))
    print(json.dumps(out))
    """)


def test_stock_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--run-dir", str(run), *TINY)
    assert code == 0, err
    for name in ("config.json", "metrics.json", "model.keras", "saved_model", "logs"):
        assert (run / name).exists(), name
    comparison = json.loads((run / "metrics.json").read_text())["comparison"]
    assert comparison["persistence"]["mase"] == pytest.approx(1.0)

    code, out, err = run_cli(capsys, "evaluate", "--run-dir", str(run), "--json",
                             "--walk-forward", "2")
    assert code == 0, err
    metrics = last_json(out)
    assert metrics["target_kind"] == "return"
    for name in ("model", "persistence", "historical_mean"):
        row = metrics[name]
        assert {"mae", "rmse", "mase", "directional_accuracy", "coverage_10_90"} <= set(row)
        low, high = row["directional_accuracy_ci95"]
        assert low <= row["directional_accuracy"] <= high
    assert metrics["persistence"]["mase"] == pytest.approx(1.0)
    assert metrics["model"]["mase"] == pytest.approx(
        metrics["model"]["mae"] / metrics["persistence"]["mae"])
    assert metrics["examples"] == comparison["examples"]
    assert metrics["model"]["mae"] == pytest.approx(comparison["model"]["mae"], rel=1e-4)
    assert len(metrics["walk_forward"]) == 2
    # The walk-forward band is scored, and so is the validation band it started from.
    assert 0.0 <= metrics["model"]["coverage_10_90_fixed_band"] <= 1.0
    assert metrics["model"]["coverage_10_90"] == pytest.approx(
        comparison["model"]["coverage_10_90"])
    assert (run / "plots" / "forecast_spy_sample.png").stat().st_size > 1000
    assert (run / "plots" / "strategy_spy_sample.png").exists()
    assert any((run / "logs" / "evaluation").iterdir())

    code, out, err = run_cli(capsys, "predict", "--run-dir", str(run), "--json")
    assert code == 0, err
    forecast = last_json(out)["spy_sample"]
    assert forecast["q10"] <= forecast["q50"] <= forecast["q90"]
    assert forecast["last_date"] == "2017-11-10"
    assert forecast["band_outcomes"] == metrics["examples"]  # walked through the test part

    export_dir = tmp_path / "export"
    code, out, err = run_cli(capsys, "export", "--run-dir", str(run), "--out", str(export_dir))
    assert code == 0, err
    assert f"10-90% band: walked through {metrics['examples']} outcome(s)" in out
    # Both the export and train's own SavedModel serve what predict printed, band included.
    for saved in (export_dir, run / "saved_model"):
        result = subprocess.run([sys.executable, "-c", FRESH, str(saved), str(SAMPLE)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=180,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert result.returncode == 0, result.stderr[-2000:]
        served = json.loads(result.stdout.splitlines()[-1])
        assert served["ours"] == []
        for key in ("forecast", "q10", "q50", "q90"):
            assert served[key][0] == pytest.approx(forecast[key], abs=1e-5), (saved, key)
        assert served["last"][0] == pytest.approx(258.09, abs=1e-3)


def test_temperature_level_series(tmp_path, capsys):
    data = write_csv(tmp_path / "temps.csv", days=500)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--run-dir", str(run), "--data", str(data),
                             "--target", "Temp", *TINY)
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--run-dir", str(run), "--json",
                             "--no-plots")
    assert code == 0, err
    metrics = last_json(out)
    assert metrics["target_kind"] == "level"
    assert metrics["persistence"]["mase"] == pytest.approx(1.0)
    assert not (run / "plots").exists()
    code, out, err = run_cli(capsys, "predict", "--run-dir", str(run), "--json")
    temps = np.loadtxt(data, delimiter=",", skiprows=1, usecols=1)
    forecast = last_json(out)["temps"]
    assert forecast["last_value"] == pytest.approx(temps[-1])
    assert temps.min() - 10 < forecast["forecast"] < temps.max() + 10


def bad_file(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["date", "duplicate", "price", "missing", "window",
                                  "not_numeric", "empty_folder", "no_target", "band_rate"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    rows = SAMPLE.read_text().splitlines()
    run = tmp_path / "run"
    extra = []
    if case == "date":
        rows[10] = "11/31/2015x" + rows[10][10:]
        expect = "line 11, column 'Date': cannot parse date"
    elif case == "duplicate":
        rows[10] = rows[9]
        expect = "lines 10 and 11, column 'Date': duplicate date"
    elif case == "price":
        rows[10] = ",".join(rows[10].split(",")[:4] + ["-3"] + rows[10].split(",")[5:])
        expect = "line 11, column 'Close': price -3 is not positive"
    elif case == "missing":
        rows[10] = ",".join(rows[10].split(",")[:2] + [""] + rows[10].split(",")[3:])
        expect = "line 11, column 'High': missing value (pass --missing drop"
    elif case == "window":
        extra = ["--window", "2000"]
        expect = "--window 2000 is longer than the series (756 rows"
    elif case == "not_numeric":
        rows = ["Date,Temp"] + [f"2001-01-{d:02d},{'warm' if d == 7 else d}" for d in
                                range(1, 29)]
        extra = ["--target", "Temp"]
        expect = "line 8, column 'Temp': 'warm' is not a number"
    elif case == "no_target":
        extra = ["--target", "rainfall"]
        expect = "no column 'rainfall'"
    elif case == "band_rate":
        extra = ["--no-calibrate", "--band-rate", "0.02"]
        expect = "--band-rate: the walk-forward band starts from the band fitted on"
    data = bad_file(tmp_path, "\n".join(rows) + "\n")
    if case == "empty_folder":
        data = tmp_path / "folder"
        data.mkdir()
        expect = "the folder has no .csv or .txt files"
    code, out, err = run_cli(capsys, "train", "--run-dir", str(run), "--data", str(data),
                             *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstm-finance: error:"), err
    assert expect in lines[0]
    assert "Traceback" not in err
    assert not run.exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"app": "finance", "task": "forecast"}))
    before = (run / "config.json").read_bytes()
    bad = bad_file(tmp_path, "Date,Close\n2001-01-01,1\n")
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), "--data", str(bad),
                           "--target", "close")
    assert code == 2 and "longer than the series" in err
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), *TINY)
    assert code == 2 and "already holds a run" in err
    assert (run / "config.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == ["config.json"]
    code, _, err = run_cli(capsys, "evaluate", "--run-dir", str(run))
    assert code == 2 and "train it again" in err


def test_resume_with_another_model_size_or_target_is_refused(tmp_path, capsys):
    # Calibration rewrites the run's target scale after training; a refused
    # --resume must not list those fitted numbers as flags the user changed.
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), *TINY)
    assert code == 0, err
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    wider = ["--epochs", "2", "--units", "16", "--window", "20", "--vol-window", "5",
             "--batch-size", "64"]
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), "--resume", *wider)
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "changed: model.units: 8 -> 16." in message, message
    assert "target_scale" not in message
    # Same weight shapes, another target: refused too, before anything is written.
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), "--resume", *TINY,
                           "--target-kind", "price")
    assert code == 2
    assert "trained with data.target_kind = 'return', this command gives 'price'" in err
    # The same layout with other numbers: refused; the same rows moved elsewhere
    # (and in CRLF lines) are the run's data.
    other = tmp_path / "edited" / SAMPLE.name  # the same ticker name: only a value differs
    other.parent.mkdir()
    lines = SAMPLE.read_text().splitlines()
    lines[-1] = _bump_close(lines[-1], lines[0])
    other.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), "--resume", *TINY,
                           "--data", str(other))
    assert code == 2 and "was trained on other data than --data" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*")
            if p.is_file() and p.name != ".lock"} == before
    moved = tmp_path / "moved" / SAMPLE.name
    moved.parent.mkdir()
    moved.write_bytes(SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run), "--resume", *TINY,
                           "--data", str(moved))
    assert code == 0, err


def _bump_close(row: str, header: str) -> str:
    """`row` with its Close one cent higher."""
    cells = row.split(",")
    close = [c.strip().lower() for c in header.split(",")].index("close")
    cells[close] = f"{float(cells[close]) + 0.01:.6f}"
    return ",".join(cells)
