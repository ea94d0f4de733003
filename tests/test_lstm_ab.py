"""benchmarks/lstm_ab.py: two versions of the layer, timed side by side."""

import json

from helpers import ROOT, load_benchmark


def test_the_same_layer_twice_gives_one_row_per_shape_and_mode(tmp_path, capsys):
    ab = load_benchmark("lstm_ab")
    out = tmp_path / "ab.json"
    lstm = ROOT / "common" / "lstm.py"
    assert ab.main(["--a", str(lstm), "--b", str(lstm), "--shapes", "4x6x3x5,20x4x2x3",
                    "--iters", "3", "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["mode"]) for r in rows] == [
        ("4x6x3x5", "train"), ("4x6x3x5", "infer"), ("20x4x2x3", "train"),
        ("20x4x2x3", "infer")]
    for r in rows:
        assert r["n"] == 3 and r["a_ms"] > 0 and r["b_ms"] > 0
        assert r["b_over_a"] == r["b_ms"] / r["a_ms"]
        assert r["max_abs_dy"] == 0.0  # same code, same weights, same outputs
    assert "B/A" in capsys.readouterr().out
    # Loading the two copies left Keras's registry alone: .keras files still load
    # as common.lstm.LSTM (other tests in this process rely on it).
    import keras

    from common.lstm import LSTM
    assert keras.saving.get_registered_object("lstm_suite>LSTM") is LSTM


def test_exactly_one_baseline_is_asked_for(capsys):
    ab = load_benchmark("lstm_ab")
    for argv in ([], ["--base", "HEAD", "--a", "x.py"]):
        try:
            ab.main(argv)
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            raise AssertionError("accepted " + " ".join(argv))
    assert "exactly one of --base REV and --a FILE" in capsys.readouterr().err
