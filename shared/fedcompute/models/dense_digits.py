"""A small dense digits classifier whose client steps an ODP client can run.

Flatten → Dense 16 relu → Dense 10 softmax on 8×8×1 images (sklearn digits), 1,210
parameters. Its loss is the categorical cross-entropy written with builtin ops
(``one_hot``, ``log``, ``reduce_sum``): Keras' ``SparseCategoricalCrossentropy`` lowers to
``SparseSoftmaxCrossEntropyWithLogits``, a Flex op no ODP client version has, whereas this
model's TFLite training step needs only ``ParseExampleV2``, ``BroadcastGradientArgs`` and
``ReluGrad`` (all in the flex-ops table), so its task passes the flex-ops check and devices
train it with the TFLite runtime by default.

TensorFlow is imported when a function is called, not at module import.
"""
from __future__ import annotations

from typing import Any

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


def create_model(seed: int = 1) -> Any:
    """A fresh (uncompiled) Keras model with deterministic initial weights."""
    import tensorflow as tf

    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=IMAGE_SHAPE),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(16, activation="relu", kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed)),
        tf.keras.layers.Dense(NUM_CLASSES, activation="softmax",
                              kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + 1)),
    ])


def input_spec() -> tuple[Any, Any]:
    """Input type 1: ``(images [None, 8, 8, 1] float32, labels [None, 1] int64)``."""
    import tensorflow as tf

    return tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32), tf.TensorSpec([None, 1], tf.int64)


def loss() -> Any:
    """Mean categorical cross-entropy of softmax outputs, from builtin TFLite ops only."""
    from fedcompute.models.functional import builtin_cross_entropy

    return builtin_cross_entropy(NUM_CLASSES)


def save(path: str, seed: int = 1) -> str:
    """Save the model as a TFF SavedFunctionalModel at ``path`` (what the task builder takes)."""
    from fedcompute.models.functional import save_functional_model

    return save_functional_model(lambda: create_model(seed), input_spec(), loss(), path)
