"""Child process for tests/test_lstm_export.py: load an exported SavedModel WITHOUT
importing `common`, run `serve` and `serving_default`, compare with the expected
outputs written by the parent.

Usage: python lstm_export_child.py <saved_model_dir> <data_dir> <n_inputs>
data_dir holds x<k>.npy (inputs) and y<k>.npy (expected outputs) for k < n_inputs.
Prints one JSON line with the results; exits non-zero on any mismatch.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    model_dir, data_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loaded = tf.saved_model.load(model_dir)
    serving = loaded.signatures["serving_default"]
    (input_name,) = serving.structured_input_signature[1].keys()
    report = {"input_name": input_name, "max_abs_diff_serve": [],
              "max_abs_diff_serving_default": []}
    for k in range(n):
        x = np.load(os.path.join(data_dir, f"x{k}.npy"))
        expected = np.load(os.path.join(data_dir, f"y{k}.npy"))
        y_serve = np.asarray(loaded.serve(tf.constant(x)))
        outs = serving(**{input_name: tf.constant(x)})
        (y_sig,) = [np.asarray(v) for v in outs.values()]
        np.save(os.path.join(data_dir, f"child_serve{k}.npy"), y_serve)
        np.save(os.path.join(data_dir, f"child_sig{k}.npy"), y_sig)
        report["max_abs_diff_serve"].append(float(np.max(np.abs(y_serve - expected))))
        report["max_abs_diff_serving_default"].append(float(np.max(np.abs(y_sig - expected))))
        np.testing.assert_allclose(y_serve, expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(y_sig, expected, atol=1e-5, rtol=1e-5)
    report["common_imported"] = any(m == "common" or m.startswith("common.")
                                    for m in sys.modules)
    report["keras_imported"] = "keras" in sys.modules
    print("RESULT " + json.dumps(report))
    if report["common_imported"]:
        sys.exit(3)


if __name__ == "__main__":
    main()
