"""The seed's EMNIST "original FedAvg CNN" (McMahan et al. 2017), as in TFF's emnist_models.

Conv2D 32 5×5 same relu → MaxPool 2×2 same → Conv2D 64 5×5 same relu → MaxPool 2×2 same
→ Flatten → Dense 512 relu → Dense 10 (62 with ``only_digits=False``) softmax.
1,663,370 parameters for 10 classes. The output is a softmax, so the loss is the seed's
``SparseCategoricalCrossentropy()`` with its default ``from_logits=False``.

Input type 1 feeds it ``(images [None, 28, 28, 1] float32, labels [None, 1] int64)``;
input type 2 feeds it ``({"image": images}, labels)`` with the label stored under
``label_name = "my_label"`` (the seed's label name, so one config snippet fits both type-2
example models). The dict key ``image`` says what the feature is; a type-1 model's feature
is always ``x`` in the examples, whatever the model calls it.

TensorFlow is imported when a function is called, not at module import.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

NUM_PARAMETERS_DIGITS = 1_663_370
IMAGE_SHAPE = (28, 28, 1)
TYPE2_FEATURE_NAME = "image"
TYPE2_LABEL_NAME = "my_label"


def _layers(num_classes: int, seed: int | None) -> list[Any]:
    # Distinct deterministic seeds per layer when a seed is given (as TFF's debug_seed).
    import itertools

    import tensorflow as tf

    seeds: Iterator[int | None] = iter(range(seed, seed + 100)) if seed is not None else itertools.repeat(None)

    def glorot() -> Any:
        return tf.keras.initializers.GlorotUniform(seed=next(seeds))

    def conv(filters: int, name: str) -> Any:
        return tf.keras.layers.Conv2D(filters, kernel_size=5, padding="same", activation="relu",
                                      data_format="channels_last", kernel_initializer=glorot(),
                                      name=name)

    def pool(name: str) -> Any:
        return tf.keras.layers.MaxPooling2D(pool_size=(2, 2), padding="same",
                                            data_format="channels_last", name=name)

    return [
        conv(32, "conv2d"),
        pool("max_pooling2d"),
        conv(64, "conv2d_1"),
        pool("max_pooling2d_1"),
        tf.keras.layers.Flatten(name="flatten"),
        tf.keras.layers.Dense(512, activation="relu", kernel_initializer=glorot(), name="dense"),
        tf.keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=glorot(),
                              name="dense_1"),
    ]


def create_original_fedavg_cnn_model(only_digits: bool = True, seed: int | None = None) -> Any:
    """The seed's CNN as an uncompiled Keras model taking ``[None, 28, 28, 1]`` images.

    ``only_digits`` selects 10 outputs (62 otherwise); ``seed`` makes the initial weights
    deterministic.
    """
    import tensorflow as tf

    inputs = tf.keras.Input(shape=IMAGE_SHAPE, dtype=tf.float32, name="x")
    out = inputs
    for layer in _layers(10 if only_digits else 62, seed):
        out = layer(out)
    return tf.keras.Model(inputs=inputs, outputs=out, name="original_fedavg_cnn")


def create_original_fedavg_cnn_dict_model(only_digits: bool = True, seed: int | None = None,
                                          feature_name: str = TYPE2_FEATURE_NAME) -> Any:
    """The same CNN with a dict input ``{feature_name: [None, 28, 28, 1]}`` (input type 2).

    Keras matches dict inputs by the Input layers' names, so the Input is named
    ``feature_name``.
    """
    import tensorflow as tf

    image = tf.keras.Input(shape=IMAGE_SHAPE, dtype=tf.float32, name=feature_name)
    out = image
    for layer in _layers(10 if only_digits else 62, seed):
        out = layer(out)
    return tf.keras.Model(inputs={feature_name: image}, outputs=out,
                          name="original_fedavg_cnn_dict")


def input_spec_type1() -> tuple[Any, Any]:
    """The seed's type-1 spec: ``(TensorSpec([None, 28, 28, 1]), TensorSpec([None, 1], int64))``."""
    import tensorflow as tf

    return (tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32),
            tf.TensorSpec([None, 1], tf.int64))


def input_spec_type2(feature_name: str = TYPE2_FEATURE_NAME) -> tuple[Any, Any]:
    """Type-2 spec: ``(OrderedDict([(feature_name, [None, 28, 28, 1])]), [None, 1] int64)``."""
    import tensorflow as tf

    return (OrderedDict([(feature_name, tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32))]),
            tf.TensorSpec([None, 1], tf.int64))


def loss() -> Any:
    """The seed's loss for this model: ``SparseCategoricalCrossentropy()`` (softmax output)."""
    import tensorflow as tf

    return tf.keras.losses.SparseCategoricalCrossentropy()
