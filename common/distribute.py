"""Pick a `tf.distribute` strategy and a mixed-precision policy by name; op determinism.

The command-line apps expose ``--strategy`` and ``--mixed-precision``; this
module turns those names into TensorFlow objects:

- ``"default"``: no distribution (one device), `tf.distribute.get_strategy()`.
- ``"mirrored"``: `tf.distribute.MirroredStrategy` over every local GPU, or
  over the logical CPU devices when there is no GPU. One process, synchronous
  data parallelism; the batch size is the global batch, split across replicas.
- ``"multiworker"``: `tf.distribute.MultiWorkerMirroredStrategy`, the same
  across machines. Every worker runs the same command; the cluster and each
  worker's place in it come from the ``TF_CONFIG`` environment variable (see
  ``docs/distributed.md``).

Build the model and compile it inside ``strategy.scope()``. The project's
`common.lstm.LSTM` needs nothing special under either strategy: its
XLA-compiled loop and hand-written gradient run once per replica.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator

import keras
import tensorflow as tf

from common.errors import ClusterConfigError

logger = logging.getLogger("lstm_suite")

STRATEGIES = ("default", "mirrored", "multiworker")
MIXED_PRECISION_POLICIES = ("off", "mixed_float16", "mixed_bfloat16")

# The task types MultiWorkerMirroredStrategy trains with.
_TRAINING_TASK_TYPES = ("chief", "worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Creates the distribution strategy called `name`.

    Create a ``"multiworker"`` strategy at the start of the program, before
    any other TensorFlow work: it configures the runtime's collective ops and
    TensorFlow refuses once the runtime is initialised. Later calls return
    the same strategy.

    Args:
        name: One of ``"default"``, ``"mirrored"``, ``"multiworker"``.

    Returns:
        A `tf.distribute.Strategy`; ``strategy.num_replicas_in_sync`` says over
        how many devices each global batch is split. For ``"multiworker"`` it
        is a `MultiWorkerMirroredStrategy` subclass that lets Keras 3's `fit`
        run with more than one worker (see `_KerasMultiWorkerMirroredStrategy`).

    Example:

    ```python
    strategy = make_strategy("mirrored")
    with strategy.scope():
        model = build_model()
        model.compile(optimizer="adam", loss="mse")
    model.fit(dataset, epochs=3)  # dataset batched with the global batch size
    ```
    """
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multiworker":
        strategy = _multiworker_strategy()
    else:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}.")
    logger.info("strategy %s with %d replica(s) in sync", name,
                strategy.num_replicas_in_sync)
    return strategy


# One per process, because TensorFlow's collective runtime is: the strategy
# configures it at start-up, before any other op, and cannot do so again
# afterwards. So the command line makes it first (`common.cli.run_main`), and
# `common.training.train`, later, gets the same one back.
@functools.cache
def _multiworker_strategy() -> tf.distribute.Strategy:
    config = _read_tf_config()
    strategy = _KerasMultiWorkerMirroredStrategy()
    logger.info("multi-worker training as %s %d of a %d-worker cluster",
                config["task"]["type"], config["task"]["index"],
                _num_training_tasks(config["cluster"]))
    return strategy


def configure_mixed_precision(policy: str) -> None:
    """Sets Keras's global dtype policy for the layers created afterwards.

    With a mixed policy, layers compute in half precision and keep float32
    weights; `keras.Model.compile` then adds loss scaling for float16 by
    itself. `common.lstm.LSTM` still runs its recurrence in float32 on CPU, where
    half precision gains nothing. Call this before building the model.

    Args:
        policy: ``"off"`` (float32, Keras's default), ``"mixed_float16"`` (GPUs
            with tensor cores) or ``"mixed_bfloat16"`` (TPUs, recent CPUs/GPUs).

    Example:

    ```python
    configure_mixed_precision("mixed_bfloat16")
    model = build_model()  # Dense/LSTM layers compute in bfloat16
    configure_mixed_precision("off")  # back to float32
    ```
    """
    if policy not in MIXED_PRECISION_POLICIES:
        raise ValueError(
            f"Unknown mixed-precision policy {policy!r}; expected one of "
            f"{', '.join(MIXED_PRECISION_POLICIES)}.")
    keras.mixed_precision.set_global_policy("float32" if policy == "off" else policy)


@contextlib.contextmanager
def op_determinism() -> Iterator[None]:
    """Run the block with TensorFlow's op determinism on, then restore the setting.

    With it, the same seed on the same machine and software gives bit-for-bit
    the same training (`tf.config.experimental.enable_op_determinism`):
    `tf.data` maps with random augmentation then take their elements in order,
    and ops without a deterministic kernel raise instead of running. Without
    it, CPU training differs from run to run in the order in which parallel
    `tf.data` workers draw random numbers.
    """
    from tensorflow.python.framework import config as tf_config

    was_enabled = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process should write shared outputs (logs, checkpoints).

    In a multi-worker cluster every worker trains, but only one, the chief,
    should write to the run directory: the ``"chief"`` task if the cluster has
    one, otherwise worker 0. Single-process strategies are always chief.

    Args:
        strategy: The strategy in use; defaults to the current one.

    Example:

    ```python
    if is_chief(strategy):
        model.save("runs/exp1/model.keras")
    ```
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


class _KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3 gives it.

    With more than one worker, Keras 3's TensorFlow trainer calls
    ``strategy.reduce`` in two ways `tf.distribute` does not support
    (keras-team/keras#20585): on a whole (x, y) batch structure, to build the
    model before `fit`, and with ``axis=0`` on the scalar losses and metrics of
    every step, where it means the mean across replicas, as on one machine.
    `fit` then fails before training. This class maps `reduce` over nested
    structures, reduces scalars across replicas only, and gives the build-time
    call this worker's batch; every other call is the parent's.
    """

    def reduce(self, reduce_op, value, axis=None):
        def reduce_one(v):
            local = self.experimental_local_results(v)[0]
            if axis is None and local.shape.rank != 0:
                # Only the build-time call reduces whole batches, for their
                # shapes: this worker's part has them, and an all-reduce would
                # fail on a last, partial batch that splits unevenly.
                return local
            across_replicas_only = axis is not None and local.shape.rank == 0
            return super(_KerasMultiWorkerMirroredStrategy, self).reduce(
                reduce_op, v, None if across_replicas_only else axis)

        return tf.nest.map_structure(reduce_one, value)


def _read_tf_config() -> dict:
    """Parses and checks TF_CONFIG, so a mistake fails here and not as a hang."""
    hint = "see docs/distributed.md"
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        raise ClusterConfigError(
            "Strategy 'multiworker' expects the TF_CONFIG environment variable "
            f"(JSON with 'cluster' and 'task'); it is not set ({hint}).")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ClusterConfigError(
            f"TF_CONFIG must be JSON; parsing failed at character {error.pos}: "
            f"{error.msg} ({hint}).") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict):
        raise ClusterConfigError(
            "TF_CONFIG expects 'cluster' to map 'worker' (and optionally 'chief') to "
            f"lists of 'host:port' addresses; got {cluster!r} ({hint}).")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise ClusterConfigError(
                f"TF_CONFIG expects cluster['{job}'] to be a list of 'host:port' "
                f"strings; got {addresses!r} ({hint}).")
    if not _num_training_tasks(cluster):
        raise ClusterConfigError(
            f"TF_CONFIG expects a 'worker' or 'chief' job in 'cluster'; got {cluster!r} "
            f"({hint}).")
    task = config.get("task")
    task_type = task.get("type") if isinstance(task, dict) else None
    index = task.get("index") if isinstance(task, dict) else None
    if task_type not in _TRAINING_TASK_TYPES or task_type not in cluster or not (
            isinstance(index, int) and 0 <= index < len(cluster[task_type])):
        raise ClusterConfigError(
            "TF_CONFIG expects 'task' to be {'type': 'worker' or 'chief', 'index': i} "
            f"naming an entry of 'cluster'; got {task!r} ({hint}).")
    return config


def _num_training_tasks(cluster: dict) -> int:
    return sum(len(cluster.get(job) or ()) for job in _TRAINING_TASK_TYPES)
