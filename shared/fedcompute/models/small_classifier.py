"""A small Fashion-MNIST classifier for fleets of thousands of devices (the private demo's model).

Flatten → [Dense ``hidden_units`` relu] → Dense 10 softmax on the seed's type-1 input
``(images [None, 28, 28, 1] float32, labels [None, 1] int64)``. With ``hidden_units=0`` it
is multinomial logistic regression (7,850 parameters), the default: a device trains it in
about a millisecond, so a simulated fleet spends its time on the protocol, and the DP noise
on the averaged update (z·C / report_goal per coordinate) is small against its few weights.

Same input spec as the seed's CNN (:mod:`fedcompute.models.emnist_cnn`), so the same config
fields, examples and device code serve both; the same cross-entropy, written with builtin
TFLite ops, so an ODP client can run its plan (see :func:`loss`). TensorFlow is imported on call.
"""
from __future__ import annotations

from typing import Any

from fedcompute.models import emnist_cnn

NUM_CLASSES = 10
DEFAULT_HIDDEN_UNITS = 0


def num_parameters(hidden_units: int = DEFAULT_HIDDEN_UNITS) -> int:
    """Trainable parameters for ``hidden_units`` (0: logistic regression)."""
    pixels = 28 * 28
    if hidden_units <= 0:
        return pixels * NUM_CLASSES + NUM_CLASSES
    return pixels * hidden_units + hidden_units + hidden_units * NUM_CLASSES + NUM_CLASSES


def create_small_classifier(hidden_units: int = DEFAULT_HIDDEN_UNITS, seed: int | None = None) -> Any:
    """Uncompiled Keras model on ``[None, 28, 28, 1]`` images; softmax over 10 classes."""
    import tensorflow as tf

    if hidden_units < 0:
        raise ValueError(f"hidden_units must be >= 0 (0: logistic regression), got {hidden_units}")

    def glorot(offset: int) -> Any:
        return tf.keras.initializers.GlorotUniform(seed=None if seed is None else seed + offset)

    inputs = tf.keras.Input(shape=emnist_cnn.IMAGE_SHAPE, dtype=tf.float32, name="x")
    out = tf.keras.layers.Flatten(name="flatten")(inputs)
    if hidden_units:
        out = tf.keras.layers.Dense(hidden_units, activation="relu", name="hidden",
                                    kernel_initializer=glorot(0))(out)
    # Logistic regression starts at zero (the optimum's neighbourhood is reached faster from
    # uniform predictions); an MLP's output layer needs random weights to break symmetry.
    kernel = glorot(1) if hidden_units else tf.keras.initializers.Zeros()
    out = tf.keras.layers.Dense(NUM_CLASSES, activation="softmax", kernel_initializer=kernel, name="softmax")(out)
    name = f"mlp_{hidden_units}" if hidden_units else "logistic_regression"
    return tf.keras.Model(inputs=inputs, outputs=out, name=name)


def input_spec() -> tuple[Any, Any]:
    """The seed's type-1 spec, as the CNN's."""
    return emnist_cnn.input_spec_type1()


def loss() -> Any:
    """Cross-entropy of the softmax output from builtin ops (the CNN's value, without its Flex op).

    The CNN's ``SparseCategoricalCrossentropy`` needs ``SparseSoftmaxCrossEntropyWithLogits``,
    a Flex op no ODP client has; with this loss the small model's task passes the flex-ops
    check, so the private demo builds it without ``--skip_flex_ops_check`` and its devices
    train the plan's TFLite step, as ODP clients would.
    """
    from fedcompute.models.functional import builtin_cross_entropy

    return builtin_cross_entropy(NUM_CLASSES)


def save_small_classifier(path: Any, hidden_units: int = DEFAULT_HIDDEN_UNITS, seed: int | None = 0) -> str:
    """Save it as a SavedFunctionalModel at ``path`` (the helper the CNN is saved with)."""
    from fedcompute.models.functional import save_functional_model

    return save_functional_model(lambda: create_small_classifier(hidden_units, seed), input_spec(), loss(), path)
