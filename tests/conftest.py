"""Shared test set-up: quiet TensorFlow, Keras on the TF backend, fixed seeds."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def _cheap_gc():
    """The module's end unfreezes what `freeze_gc_after_each_test` froze."""
    yield
    gc.unfreeze()


@pytest.fixture
def freeze_gc_after_each_test(_cheap_gc):
    """Opt in with ``pytestmark = pytest.mark.usefixtures("freeze_gc_after_each_test")``.

    `_seeded`'s clear_session() runs gc.collect() after every test, whose cost
    grows with the heap of traced TF graphs. Freezing the survivors after each
    test keeps that collection cheap in modules that trace many models.
    This teardown runs before `_seeded`'s, so it clears the session itself
    first: otherwise the test's own garbage would be frozen with the survivors.
    """
    yield
    keras.backend.clear_session()
    gc.freeze()
