"""Tensor names of the client steps in a plan's TFLite model (pure: no TensorFlow).

The task builder converts one client step per plan kind to TFLite
(:func:`fedcompute.taskbuilder.flex_ops.build_client_modules`); a device runs it once per
batch, carrying the weights from one call to the next (:mod:`fedcompute.fleet.runtimes`).
The plan's ``TensorflowSpec`` lists these names with shapes and dtypes.

Inputs: ``trainable_<i>``, ``non_trainable_<i>`` (the model's weights, model order),
``serialized_examples`` (``tf.string [batch]``: serialized ``tf.train.Example``s parsed in
the graph), ``learning_rate`` (training with a client optimizer); ADAM adds
``adam_accumulator_<i>``, ``adam_preconditioner_<i>`` and ``adam_step`` (1-based).
Outputs: ``loss`` (batch-mean), ``predictions`` (the model's first output), ``labels`` (as
parsed), and for training ``new_trainable_<i>`` (FED_AVG; ADAM also
``new_adam_accumulator_<i>``, ``new_adam_preconditioner_<i>``) or ``gradient_<i>`` (FED_SGD).
"""
from __future__ import annotations

SERIALIZED_EXAMPLES = "serialized_examples"
LEARNING_RATE = "learning_rate"
ADAM_STEP = "adam_step"
LOSS = "loss"
PREDICTIONS = "predictions"
LABELS = "labels"


def trainable(i: int) -> str:
    return f"trainable_{i}"


def non_trainable(i: int) -> str:
    return f"non_trainable_{i}"


def new_trainable(i: int) -> str:
    return f"new_trainable_{i}"


def gradient(i: int) -> str:
    return f"gradient_{i}"


def adam_accumulator(i: int) -> str:
    return f"adam_accumulator_{i}"


def adam_preconditioner(i: int) -> str:
    return f"adam_preconditioner_{i}"


def new(name: str) -> str:
    """The output that carries input ``name``'s next value."""
    return f"new_{name}"
