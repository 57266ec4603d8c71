"""The catalog of example models and :func:`save_example_models`.

| name | model | input type | example layout |
|---|---|---|---|
| ``emnist_cnn_type1`` | EMNIST original FedAvg CNN | 1 | ``x`` 784 floats, ``y`` int64 |
| ``emnist_cnn_type2`` | same CNN, dict input | 2 | ``image`` 784 floats, ``my_label`` int64 |
| ``dict_binary_type2`` | seed's two-feature binary model | 2 | ``feature-1``, ``feature-2``, ``my_label`` |
| ``fashion_logreg_type1`` | logistic regression (7,850 params) for large fleets | 1 | ``x`` 784 floats, ``y`` int64 |

The catalog itself is plain data (no TensorFlow import); saving imports TF/TFF.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcompute.models import dict_binary, emnist_cnn, small_classifier


@dataclass(frozen=True)
class ExampleModel:
    """One example model: how to build it and which examples feed it."""

    name: str
    description: str
    input_type: int
    label_name: str | None  # the task config's label_name (None for input type 1)
    build_keras: Callable[[], Any]
    input_spec: Callable[[], Any]
    loss: Callable[[], Any]

    def example_spec(self) -> Any:
        """The :class:`~fedcompute.data.examples.ExampleSpec` of this model (imports TF)."""
        from fedcompute.data.examples import ExampleSpec

        return ExampleSpec.from_input_spec(self.input_spec(), self.label_name)


def _catalog(seed: int | None) -> dict[str, ExampleModel]:
    return {
        "emnist_cnn_type1": ExampleModel(
            name="emnist_cnn_type1",
            description="EMNIST original FedAvg CNN (1,663,370 params)",
            input_type=1,
            label_name=None,
            build_keras=lambda: emnist_cnn.create_original_fedavg_cnn_model(True, seed=seed),
            input_spec=emnist_cnn.input_spec_type1,
            loss=emnist_cnn.loss,
        ),
        "emnist_cnn_type2": ExampleModel(
            name="emnist_cnn_type2",
            description=(f"the same CNN with dict input {emnist_cnn.TYPE2_FEATURE_NAME!r}, "
                         "same weights layout"),
            input_type=2,
            label_name=emnist_cnn.TYPE2_LABEL_NAME,
            build_keras=lambda: emnist_cnn.create_original_fedavg_cnn_dict_model(True, seed=seed),
            input_spec=emnist_cnn.input_spec_type2,
            loss=emnist_cnn.loss,
        ),
        "dict_binary_type2": ExampleModel(
            name="dict_binary_type2",
            description="seed's binary model on feature-1/feature-2, sigmoid output",
            input_type=2,
            label_name=dict_binary.LABEL_NAME,
            build_keras=lambda: dict_binary.create_dict_binary_model(seed=seed),
            input_spec=dict_binary.input_spec,
            loss=dict_binary.loss,
        ),
        "fashion_logreg_type1": ExampleModel(
            name="fashion_logreg_type1",
            description=f"logistic regression on 28x28 images ({small_classifier.num_parameters(0):,} params), "
                        "the private demo's small model",
            input_type=1,
            label_name=None,
            build_keras=lambda: small_classifier.create_small_classifier(0, seed=seed),
            input_spec=small_classifier.input_spec,
            loss=small_classifier.loss,
        ),
    }


EXAMPLE_MODELS: dict[str, ExampleModel] = _catalog(seed=None)
EXAMPLE_MODEL_NAMES: tuple[str, ...] = tuple(EXAMPLE_MODELS)


def save_example_models(
    out_dir: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    seed: int | None = 0,
) -> dict[str, str]:
    """Save the example models as TFF functional models under ``out_dir/<name>/``.

    ``names`` selects a subset (default: all). ``seed`` makes the initial weights
    reproducible (``None``: random). Returns name → SavedModel directory.
    """
    from fedcompute.models.functional import save_functional_model

    catalog = _catalog(seed)
    selected = list(catalog) if names is None else list(names)
    unknown = [n for n in selected if n not in catalog]
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; choose from {list(catalog)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    for name in selected:
        model = catalog[name]
        saved[name] = save_functional_model(model.build_keras, model.input_spec(), model.loss(),
                                            out / name)
    return saved
