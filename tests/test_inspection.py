"""LSTMInspection: the gate histograms and over-time images it writes."""

import collections
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.inspection import HISTOGRAMS, LSTMInspection
from common.lstm import LSTM

VOCAB, STEPS = 20, 7


def read_summaries(log_dir):
    """{tag: {step: ndarray}} from every event file under log_dir/inspection."""
    found = collections.defaultdict(dict)
    for path in glob.glob(os.path.join(log_dir, "inspection", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found[value.tag][event.step] = tf.make_ndarray(value.tensor)
    return found


def tokens(n, seed=0):
    """Integer sequences right-padded with 0 (2 to STEPS real tokens each)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(n, STEPS))
    lengths = rng.integers(2, STEPS + 1, size=n)
    x[np.arange(STEPS)[None, :] >= lengths[:, None]] = 0
    return x


def masked_functional_model():
    """Embedding(mask_zero) -> Bidirectional(LSTM) -> nested model with an LSTM."""
    inner_in = keras.Input((STEPS, 6))
    encoder = keras.Model(inner_in, LSTM(5, name="encoder_lstm")(inner_in), name="encoder")
    inputs = keras.Input((STEPS,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 4, mask_zero=True)(inputs)
    x = keras.layers.Bidirectional(LSTM(3, return_sequences=True, name="bi"))(x)
    x = encoder(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The functional model trained 2 epochs with the callback, and its summaries."""
    keras.utils.set_random_seed(0)
    log_dir = str(tmp_path_factory.mktemp("run"))
    x = tokens(32)
    with pytest.warns(UserWarning, match="does not support masking"):
        # Keras's own warning: the nested model does not pass the mask on.
        model = masked_functional_model()
        model.compile(optimizer="adam", loss="mse")
        callback = LSTMInspection(x[:8], log_dir)
        model.fit(x, np.random.rand(32, 1), epochs=2, batch_size=16, verbose=0,
                  callbacks=[callback])
    return model, callback, read_summaries(log_dir)


def test_logs_histograms_and_image_for_every_lstm(trained):
    _, _, summaries = trained
    for layer in ("forward_bi", "backward_bi", "encoder_lstm"):
        for key in HISTOGRAMS:
            assert set(summaries[f"lstm_inspection/{layer}/{key}"]) == {0, 1}
        image = summaries[f"lstm_inspection/{layer}/over_time"][1]
        # tf.summary.image stores [width, height, png...].
        assert image[2:].size == 1 and image[2].startswith(b"\x89PNG")


def test_forget_gate_values_are_probabilities(trained):
    _, callback, summaries = trained
    for layer in ("forward_bi", "backward_bi", "encoder_lstm"):
        buckets = summaries[f"lstm_inspection/{layer}/forget_gate"][1]  # (k, 3): left, right, count
        assert buckets[:, 2].sum() > 0
        assert 0.0 < buckets[:, 0].min() and buckets[:, 1].max() < 1.0
        forget = callback.gate_activations()[layer]["forget_gate"].numpy()
        assert ((forget > 0.0) & (forget < 1.0)).all()


def test_upstream_mask_reaches_gate_activations(trained):
    model, callback, summaries = trained
    probe = callback.probe_inputs
    real = probe != 0
    # Only real steps are histogrammed: 3 units per real (sequence, step).
    counts = summaries["lstm_inspection/forward_bi/cell_state"][0][:, 2]
    assert counts.sum() == real.sum() * 3
    # A masked step carries the state: on padding, the cell state stays at
    # its value at the last real step.
    cells = callback.gate_activations()["forward_bi"]["cell_state"].numpy()
    last = real.sum(axis=1) - 1
    for row, end in enumerate(last):
        np.testing.assert_allclose(cells[row, end:], np.repeat(cells[row, end][None],
                                                               STEPS - end, axis=0))
    # And it matches calling the layer directly with the Embedding's mask.
    embedded = model.layers[1](probe)
    direct = model.layers[2].forward_layer.gate_activations(embedded, mask=real)
    np.testing.assert_allclose(cells, direct["cell_state"].numpy(), atol=1e-6)


def test_sequential_model_and_every_n_epochs(tmp_path):
    model = keras.Sequential([LSTM(4, return_sequences=True), LSTM(2), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.rand(16, 5, 3).astype("float32")
    model.fit(x, np.random.rand(16, 1), epochs=2, batch_size=8, verbose=0,
              callbacks=[LSTMInspection(x[:4], tmp_path, every_n_epochs=2)])
    summaries = read_summaries(str(tmp_path))
    names = [layer.name for layer in model.layers[:2]]
    for name in names:
        assert set(summaries[f"lstm_inspection/{name}/forget_gate"]) == {1}
        assert set(summaries[f"lstm_inspection/{name}/over_time"]) == {1}
    assert len(summaries) == len(names) * (len(HISTOGRAMS) + 1)


def test_model_without_project_lstm_is_an_error(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(2)])
    callback = LSTMInspection(np.zeros((2, 5, 3), "float32"), tmp_path)
    callback.set_model(model)
    with pytest.raises(ValueError, match="common.lstm.LSTM"):
        callback.gate_activations()


@pytest.mark.parametrize("kwargs, message", [
    ({"probe_inputs": tf.data.Dataset.range(3)}, "not a tf.data.Dataset"),
    ({"every_n_epochs": 0}, "positive integer"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    arguments = {"probe_inputs": np.zeros((2, 5, 3)), "log_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        LSTMInspection(**arguments)
