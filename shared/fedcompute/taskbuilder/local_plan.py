"""A client plan built in-process, the way the task builder builds it (tests, benchmarks).

Model check → flex-ops check (TFLite client steps) → ``ClientPlan`` → ``ClientOnlyPlan``
bytes → unpacked as a device unpacks its download, so callers exercise the real formats
without a server.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedcompute.plans import ClientPlan, UnpackedPlan, pack_plan, unpack_client_plan


def build_local_plan(
    model_dir: str | Path,
    target_dir: str | Path,
    *,
    kinds: tuple[str, ...] = ("TRAINING", "EVALUATION"),
    learning_algo: str = "FED_AVG",
    client_optimizer: str = "SGD",
    client_learning_rate: float = 0.1,
    batch_size: int = 10,
    epochs: int = 1,
    metrics: tuple[str, ...] = ("sparse_categorical_accuracy",),
    enforce_flex_ops: bool = True,
) -> tuple[dict[str, UnpackedPlan], list[np.ndarray]]:
    """``({kind: plan}, initial weights)`` for the SavedFunctionalModel at ``model_dir``.

    ``enforce_flex_ops=False`` keeps Flex ops outside the table (``--skip_flex_ops_check``).
    """
    from fedcompute.data.examples import ExampleSpec
    from fedcompute.taskbuilder import flex_ops, model_check
    from fedcompute.taskbuilder.artifacts import weight_specs

    loaded = model_check.load_functional_model_checked(model_dir)
    checked = model_check.check_model(loaded, label_name=None)
    spec = ExampleSpec.from_input_spec((loaded.x_spec, loaded.y_spec), checked.label_name)
    trainable, non_trainable = loaded.initial_weights()
    weights: list[Any] = [w.numpy() for w in trainable] + [w.numpy() for w in non_trainable]
    report = flex_ops.check_flex_ops(loaded, client_optimizer=client_optimizer, learning_algo=learning_algo,
                                     example_spec=checked.example_spec, enforce=enforce_flex_ops)
    plans = {}
    for kind in kinds:
        plan = ClientPlan(kind=kind, population_name="local", input_type=checked.input_type,
                          example_spec=spec.to_dict(), label_name=spec.label_name,
                          weights=weight_specs(weights[:len(trainable)], weights[len(trainable):]), metrics=metrics,
                          learning_algo=learning_algo, client_optimizer=client_optimizer,
                          client_learning_rate=client_learning_rate, batch_size=batch_size, epochs=epochs)
        data = pack_plan(plan, Path(model_dir), report.plan_step(kind))
        plans[kind] = unpack_client_plan(data, Path(target_dir) / kind.lower())
    return plans, weights
