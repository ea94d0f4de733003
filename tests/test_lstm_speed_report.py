"""benchmarks/lstm_speed.py: the warning for rows whose timings look bimodal."""

from helpers import load_benchmark


def row(impl, median, p10, shape="32x200x128x128", mode="train"):
    return {"shape": shape, "mode": mode, "impl": impl, "ms_median": median, "ms_p10": p10}


def test_bimodal_keras_and_suite_rows_are_named_and_torch_rows_are_not():
    bench = load_benchmark("lstm_speed")
    rows = [row("keras", 71.75, 46.1),  # the loaded run that read 2.06x
            row("lstm-suite", 31.1, 29.9),
            row("torch", 50.0, 10.0),  # torch is a reference: its noise decides nothing
            row("lstm-suite", 13.0, 10.8, mode="infer")]  # a quiet inference row
    noisy = bench.noisy_rows(rows)
    assert noisy == ["32x200x128x128 train keras (median 71.8 ms, p10 46.1 ms)"]
    assert bench.noisy_rows(rows[1:]) == []
