"""SavedModel export: raw-input signatures, the self-check, and a fresh-process load."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tiny_task

from common.errors import ExportCheckFailed, UserError
from common.export import SIGNATURE, ModelServing, export_saved_model
from common.runs import open_run
from common.training import TrainConfig, train


class CsvServing(tf.Module):
    """Raw input = one line of comma-separated numbers per sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="line")])
    def serve(self, line):
        values = tf.strings.to_number(tf.strings.split(line, ",").to_tensor("0"))
        x = tf.reshape(values, [-1, tiny_task.STEPS, tiny_task.FEATURES])
        return {"mean": self.model(x, training=False)[:, 0]}


def csv_lines(x):
    return tf.constant([",".join(f"{v:.6f}" for v in row.ravel()) for row in x])


# Runs in a fresh interpreter: nothing of this project may be imported there.
FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    out = {}
    for name, path, key, value in json.loads(sys.argv[1]):
        serve = tf.saved_model.load(path).signatures["serving_default"]
        value = np.load(value) if value.endswith(".npy") else tf.constant(json.loads(value))
        out[name] = {k: v.numpy().tolist() for k, v in serve(**{key: value}).items()}
    out["ours"] = sorted(m for m in sys.modules if m.split(".")[0] in ("common", "apps"))
    print(json.dumps(out))
    """)


def load_fresh(jobs, cwd):
    result = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
        cwd=cwd, timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_saved_models_load_without_the_project_and_agree(tmp_path):
    # A trained run (default ModelServing) and a raw-text export of the same model.
    train_data, val_data, test_data = tiny_task.make_data()
    with open_run(tmp_path / "run", app="tests", task="tiny") as run:
        result = train(run, TrainConfig(epochs=1, batch_size=16), tiny_task.build_model,
                       train_data, val_data, test_data, loss="mse")
    model = result.model
    x = test_data[0][:5]
    lines = csv_lines(x)
    export_saved_model(CsvServing(model), tmp_path / "csv_export", lines)
    np.save(tmp_path / "x.npy", x)
    expected = model.predict(x, verbose=0)

    fresh = load_fresh([
        ["run", str(run.saved_model), "sequence", str(tmp_path / "x.npy")],
        ["csv", str(tmp_path / "csv_export"), "line",
         json.dumps([s.decode() for s in lines.numpy().tolist()])],
    ], cwd=tmp_path)
    assert fresh["ours"] == []
    np.testing.assert_allclose(fresh["run"]["output"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fresh["csv"]["mean"], expected[:, 0], rtol=1e-4, atol=1e-5)


def test_signature_takes_raw_input(tmp_path):
    model = tiny_task.build_model()
    x = tiny_task.make_data()[2][0][:3]
    export_saved_model(CsvServing(model), tmp_path / "export", csv_lines(x))
    signature = tf.saved_model.load(str(tmp_path / "export")).signatures[SIGNATURE]
    spec = signature.structured_input_signature[1]["line"]
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    assert list(signature.structured_outputs) == ["mean"]


def test_failed_self_check_keeps_the_previous_export(tmp_path):
    model = tiny_task.build_model()
    x = tiny_task.make_data()[2][0][:3]
    target = tmp_path / "export"
    export_saved_model(ModelServing(model), target, x)
    before = sorted(os.listdir(target))

    class Stateful(tf.Module):
        """Each call changes a variable: the reloaded copy cannot agree."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.calls = tf.Variable(0.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 6, 3], tf.float32)])
        def serve(self, x):
            return self.model(x) + self.calls.assign_add(1.0)

    with pytest.raises(ExportCheckFailed, match="output 'output_0' differs after reloading"):
        export_saved_model(Stateful(), target, x)
    assert sorted(os.listdir(target)) == before
    assert os.listdir(tmp_path) == ["export"]


def test_a_new_export_keeps_the_users_files_beside_the_savedmodel(tmp_path):
    # TF Serving reads warm-up requests from assets.extra/; people keep model
    # cards next to an export. Replacing the SavedModel must not delete them.
    model = tiny_task.build_model()
    x = tiny_task.make_data()[2][0][:3]
    target = tmp_path / "export" / "1"
    export_saved_model(ModelServing(model), target, x)
    (target / "assets.extra").mkdir()
    (target / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"warm")
    (target / "MODEL_CARD.md").write_text("mine")
    first = (target / "saved_model.pb").stat().st_mtime_ns

    export_saved_model(ModelServing(model), target, x)

    assert (target / "assets.extra" / "tf_serving_warmup_requests").read_bytes() == b"warm"
    assert (target / "MODEL_CARD.md").read_text() == "mine"
    assert (target / "saved_model.pb").stat().st_mtime_ns != first  # replaced, not skipped
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]  # no temporaries left
    # A file that cannot be copied stops the export with the old one intact.
    os.mkfifo(target / "pipe")
    second = (target / "saved_model.pb").read_bytes()
    with pytest.raises(UserError, match="pipe: could not be kept in the new export"):
        export_saved_model(ModelServing(model), target, x)
    assert (target / "saved_model.pb").read_bytes() == second
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]
    (target / "pipe").unlink()
    tf.saved_model.load(str(target)).signatures[SIGNATURE](**{
        "sequence": tf.constant(x)})


def test_graph_loaders_find_every_variable(tmp_path):
    # TensorFlow Serving and `saved_model_cli run` load the graph TF1-style and
    # need every variable in the SavedModel's variables (keras-team/keras#19274);
    # the dropout layer adds a seed-state variable outside the weights.
    import keras

    from common.lstm import LSTM

    inputs = keras.Input((tiny_task.STEPS, tiny_task.FEATURES), name="sequence")
    hidden = keras.layers.Dropout(0.5)(LSTM(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    x = tiny_task.make_data()[2][0][:4]
    export_saved_model(ModelServing(model), tmp_path / "export", x)

    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.load(session, ["serve"], str(tmp_path / "export"))
        signature = meta.signature_def[SIGNATURE]
        got = session.run(signature.outputs["output"].name,
                          {signature.inputs["sequence"].name: x})
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
