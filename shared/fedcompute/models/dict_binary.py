"""The seed's type-2 example: features ``feature-1`` and ``feature-2`` (each ``[None, 1]``
float32), label ``my_label`` (``[None, 1]`` int64, 0 or 1), sigmoid output.

A small MLP (concat → Dense 8 relu → Dense 1 sigmoid, 33 parameters) trained with
``BinaryCrossentropy``; the int64 label is cast to float inside the saved loss
(:func:`fedcompute.models.functional.label_casting_loss`).
TensorFlow is imported when a function is called.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

FEATURE_NAMES = ("feature-1", "feature-2")
LABEL_NAME = "my_label"
HIDDEN_UNITS = 8


def create_dict_binary_model(seed: int | None = None) -> Any:
    """Uncompiled Keras model with dict input ``{feature-1, feature-2}`` → P(label = 1)."""
    import tensorflow as tf

    inputs = {name: tf.keras.Input(shape=(1,), dtype=tf.float32, name=name)
              for name in FEATURE_NAMES}
    x = tf.keras.layers.Concatenate(axis=-1, name="concat")([inputs[n] for n in FEATURE_NAMES])
    def init(k):
        return (tf.keras.initializers.GlorotUniform(seed=None if seed is None else seed + k))
    x = tf.keras.layers.Dense(HIDDEN_UNITS, activation="relu", kernel_initializer=init(0),
                              name="hidden")(x)
    out = tf.keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init(1),
                                name="probability")(x)
    return tf.keras.Model(inputs=inputs, outputs=out, name="dict_binary")


def input_spec() -> tuple[Any, Any]:
    """The seed's type-2 spec (features in this order, label ``[None, 1]`` int64)."""
    import tensorflow as tf

    return (OrderedDict((name, tf.TensorSpec([None, 1], tf.float32)) for name in FEATURE_NAMES),
            tf.TensorSpec([None, 1], tf.int64))


def loss() -> Any:
    """``BinaryCrossentropy()`` on the sigmoid output (labels are cast when saved)."""
    import tensorflow as tf

    return tf.keras.losses.BinaryCrossentropy()


def synthetic_data(num_examples: int, rng: Any = None) -> tuple[dict[str, Any], Any]:
    """A learnable toy dataset for the model: label = 1 iff feature-1 + feature-2 > 0.

    Returns ``({"feature-1": [N, 1], "feature-2": [N, 1]} float32, labels [N] int64)``;
    numpy only.
    """
    import numpy as np

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    f = gen.normal(size=(num_examples, 2)).astype(np.float32)
    labels = (f[:, 0] + f[:, 1] > 0).astype(np.int64)
    return {FEATURE_NAMES[0]: f[:, :1], FEATURE_NAMES[1]: f[:, 1:]}, labels
