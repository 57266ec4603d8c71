"""Save and load `tff.learning.models.FunctionalModel` SavedModels (TF/TFF imported on call)."""
from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

_cleanup_registered = False


def _is_sparse_loss(loss: Any) -> bool:
    name = getattr(loss, "__name__", None) or type(loss).__name__
    return "sparse" in name.lower()


def label_casting_loss(loss: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``loss`` so integer labels are cast to the prediction dtype first.

    The seed's label spec is ``[None, 1]`` int64; a sigmoid/regression loss needs float
    labels. Sparse losses (class ids) are returned unchanged. The wrapper keeps the
    ``(y_true, y_pred, sample_weight=None)`` signature that
    ``functional_model_from_keras`` inspects.
    """
    if _is_sparse_loss(loss):
        return loss

    def cast_labels_loss(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        import tensorflow as tf

        if y_pred.dtype.is_floating and not y_true.dtype.is_floating:
            y_true = tf.cast(y_true, y_pred.dtype)
        # Plain Keras loss functions take no sample_weight; Loss objects accept None.
        if sample_weight is None:
            return loss(y_true, y_pred)
        return loss(y_true, y_pred, sample_weight=sample_weight)

    cast_labels_loss.__name__ = f"cast_labels_{getattr(loss, 'name', type(loss).__name__)}"
    return cast_labels_loss


def builtin_cross_entropy(num_classes: int) -> Any:
    """Mean categorical cross-entropy of softmax outputs (integer labels), from builtin TFLite ops.

    Keras' ``SparseCategoricalCrossentropy`` lowers to ``SparseSoftmaxCrossEntropyWithLogits``,
    a Flex op no ODP client version has; ``one_hot``, ``log`` and ``reduce_sum`` are builtins,
    so a model trained with this loss passes the flex-ops check and devices run its plan with
    TFLite. The value is Keras' (probabilities clipped to [1e-7, 1], mean over the batch).
    """
    import tensorflow as tf

    class BuiltinCrossEntropy(tf.keras.losses.Loss):
        def call(self, y_true: Any, y_pred: Any) -> Any:
            labels = tf.one_hot(tf.reshape(tf.cast(y_true, tf.int32), [-1]), num_classes)
            return -tf.reduce_sum(labels * tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0)), axis=-1)

    return BuiltinCrossEntropy()


def kill_tff_worker_children() -> int:
    """Kill this process's TFF ``worker_binary`` children (they can outlive the script).

    Returns how many were killed.
    """
    import psutil

    killed = 0
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            if any("worker_binary" in part for part in child.cmdline()):
                child.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def register_tff_worker_cleanup() -> None:
    """Register :func:`kill_tff_worker_children` to run at interpreter exit (once)."""
    global _cleanup_registered
    if not _cleanup_registered:
        atexit.register(kill_tff_worker_children)
        _cleanup_registered = True


def save_functional_model(
    keras_builder: Callable[[], Any],
    input_spec: Any,
    loss: Any,
    path: str | os.PathLike[str],
) -> str:
    """Convert a Keras model to a TFF functional model and save it as a SavedModel at ``path``.

    ``keras_builder`` is a no-argument callable returning a fresh, uncompiled Keras model:
    ``functional_model_from_keras`` leaves the model it converts unusable, so it gets the
    builder, never a shared instance. ``loss`` is a Keras loss (instance or function);
    integer labels are cast for non-sparse losses (see :func:`label_casting_loss`).
    Returns the path as a string.
    """
    if not callable(keras_builder):
        raise TypeError("keras_builder must be a no-argument callable returning a Keras model")
    import tensorflow_federated as tff

    register_tff_worker_cleanup()
    functional = tff.learning.models.functional_model_from_keras(
        keras_model=keras_builder,
        loss_fn=label_casting_loss(loss),
        input_spec=input_spec,
    )
    path = os.fspath(path)
    tff.learning.models.save_functional_model(functional, path)
    return path


def load_functional_model(path: str | os.PathLike[str]) -> Any:
    """Load a saved functional model, re-wrapped so TFF learning processes accept it.

    ``tff.learning.models.load_functional_model`` returns a model without metric state;
    this rebuilds a plain ``FunctionalModel`` with the loaded weights, predict and loss
    functions (and no metrics: the task builder adds the allowed ones).
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    loaded = tff.learning.models.load_functional_model(os.fspath(path))
    return tff.learning.models.FunctionalModel(
        initial_weights=loaded.initial_weights,
        predict_on_batch_fn=tf.function(loaded.predict_on_batch),
        loss_fn=tf.function(loaded.loss),
        input_spec=loaded.input_spec,
    )
