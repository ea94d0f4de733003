"""`make demo` (common/demo.py): the quick demo end to end, and TensorBoard on its output."""

import contextlib
import io
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import free_ports

from common import demo

TASK_TITLES = [t.title for t in demo.TASKS]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The demo with --quick into a temporary root: (exit code, stdout, root)."""
    root = tmp_path_factory.mktemp("demo") / "runs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(["--quick", "--out", str(root)])
    text = out.getvalue()
    print(text)  # shown by pytest if a test fails
    return code, text, root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_trains_exports_and_serves_every_task(quick_demo):
    code, text, root = quick_demo
    assert code == 0, text[-3000:]
    assert (root / demo.MARKER).is_file()
    for task in demo.TASKS:
        run = root / task.run_name
        for name in ("config.json", "metrics.json", "model.keras", "logs",
                     "saved_model/saved_model.pb"):
            assert (run / name).exists(), f"{task.title}: no {name}"

    summary = json.loads((root / demo.SUMMARY).read_text())
    assert summary["quick"] is True and summary["failures"] == []
    rows = {r["task"]: r for r in summary["tasks"]}
    assert set(TASK_TITLES) <= set(rows)
    assert {"adding problem LSTM", "adding problem SimpleRNN"} <= set(rows)
    for row in rows.values():
        assert row["ok"] and math.isfinite(row["value"]), row
    # The table's values are the ones in the runs' own metrics.json.
    for task in demo.TASKS:
        metrics = json.loads((root / task.run_name / "metrics.json").read_text())
        assert rows[task.title]["value"] == pytest.approx(task.read(metrics))
    results = json.loads((root / "adding_problem" / "results.json").read_text())["results"]
    assert {r["model"] for r in results} == {"lstm", "simplernn"}
    assert (root / "adding_problem" / "learning_curves.png").is_file()

    # One request per SavedModel, answered in the fresh process (plain TensorFlow).
    served = summary["predictions"]
    assert set(served) == {t.name for t in demo.TASKS}
    assert all(p["ok"] for p in served.values()), served
    assert served["textgen"]["outputs"]["text"].startswith(demo.PRIME)
    assert len(served["textgen"]["outputs"]["generated"]) == 200
    assert all(0 <= p <= 1 for p in served["sentiment"]["outputs"]["probability"])
    assert len(served["words"]["outputs"]["label"]) == len(demo.WORD_WAVS)
    assert set(served["words"]["outputs"]["label"]) <= set("0123456789")
    transcripts = served["digits"]["outputs"]["digits"]
    assert len(transcripts) == len(demo.DIGIT_UTTERANCES)
    assert set("".join(transcripts)) <= set("0123456789")
    assert math.isfinite(served["forecast"]["outputs"]["forecast"][0])

    # Progress lines, the table and the TensorBoard command are printed.
    assert "[1/7] nlp textgen: training" in text and "[7/7] serving" in text
    table = text[text.index("task  "):]
    for title in [*TASK_TITLES, "adding problem LSTM", "adding problem SimpleRNN"]:
        assert title in table
    assert f"--logdir {root}" in text and "tensorboard" in text


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensorboard_shows_the_demo_runs(quick_demo):
    code, _, root = quick_demo
    assert code == 0
    [port] = free_ports(1)
    base = f"http://127.0.0.1:{port}/data"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port),
         "--host", "127.0.0.1", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        runs, tags = [], {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                runs = _get(f"{base}/runs")
                tags = {kind: _get(f"{base}/plugin/{kind}/tags")
                        for kind in ("scalars", "histograms", "images")}
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            # Loading is asynchronous: wait until every run and its images are in.
            if (all(any(r.startswith(t.run_name + "/") for r in runs) for t in demo.TASKS)
                    and any(tags.get("images", {}).values())):
                break
            time.sleep(1)
        for task in demo.TASKS:
            assert any(r.startswith(f"{task.run_name}/") for r in runs), (task.run_name, runs)

        def all_tags(kind: str) -> set[str]:
            return {tag for by_tag in tags[kind].values() for tag in by_tag}

        assert "epoch_loss" in all_tags("scalars")
        assert all_tags("histograms"), "no histograms"
        # The LSTM gate inspection (histograms and the over-time image) of the runs.
        inspection = "nlp_textgen/logs/inspection"
        for kind in ("images", "histograms"):
            found = tags[kind].get(inspection, {})
            assert any(t.startswith("lstm_inspection/") for t in found), (kind, tags[kind])
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_demo_root_is_replaced_only_when_the_demo_made_it(tmp_path):
    mine = tmp_path / "demo"
    demo.prepare_root(mine)
    (mine / "old_run").mkdir()
    demo.prepare_root(mine)  # a previous demo root: replaced
    assert (mine / demo.MARKER).is_file() and not (mine / "old_run").exists()

    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(demo.UserError, match="not written by the demo"):
        demo.prepare_root(other)
    assert (other / "keep.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    demo.prepare_root(tmp_path / "empty")  # an empty folder is fine


def test_a_failing_stage_is_named_and_fails_the_demo(tmp_path, monkeypatch, capsys):
    # --units 0 is refused by the app's parser before anything is trained.
    broken = demo.Task("sentiment", "nlp", "sentiment", flags=("--units", "0"),
                       quick=("--units", "0"), metric="test accuracy", read=lambda m: 0.0)
    monkeypatch.setattr(demo, "TASKS", [broken])
    code = demo.main(["--quick", "--only", "sentiment", "--out", str(tmp_path / "d")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "demo: error: stage 1 (nlp sentiment) failed" in err
    assert "--units" in err  # the app's own one-line error is shown too
    summary = json.loads((tmp_path / "d" / demo.SUMMARY).read_text())
    row = summary["tasks"][0]
    assert row["ok"] is False and "--units" in row["error"]  # the app's error line


def test_a_failing_serving_process_fails_every_trained_row(tmp_path, monkeypatch, capsys):
    def trained(task, root, quick, debug=False):
        return demo.Row(task.title, task.metric, 0.5, str(root / task.name), 0.0)

    def broken_process(jobs):
        raise RuntimeError("the serving process died")

    monkeypatch.setattr(demo, "train_task", trained)
    monkeypatch.setattr(demo, "serving_job", lambda task, run_dir: {"task": task.name})
    monkeypatch.setattr(demo, "serve_in_fresh_process", broken_process)
    code = demo.main(["--quick", "--only", "sentiment,forecast",
                      "--out", str(tmp_path / "d")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "serving: FAILED: RuntimeError: the serving process died" in out
    assert "stage 3 (serving) failed" in err
    summary = json.loads((tmp_path / "d" / demo.SUMMARY).read_text())
    assert [row["ok"] for row in summary["tasks"]] == [False, False]
    assert all(row["error"] == "serving: no answer" for row in summary["tasks"])


def test_help_and_bad_flags():
    with pytest.raises(SystemExit) as exc:
        demo.main(["--only", "nope"])
    assert exc.value.code == 2
    assert "--quick" in demo.make_parser().format_help()

