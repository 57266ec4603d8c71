"""The metric allow-list.

Metrics can leak user data, so only these names may be computed on devices and released
in a round's metrics (the ODP task builder keeps a similar list). Names outside it are
reported back as ``rejected_metrics`` by the task builder, never silently dropped.
Training metrics are published as ``server/client_work/train/<name>``, evaluation
metrics as ``server/client_work/eval/<name>``.
"""
from __future__ import annotations

import difflib

ALLOWED_METRICS: tuple[str, ...] = (
    "auc-roc",
    "auc-pr",
    "accuracy",
    "binary_accuracy",
    "binary_crossentropy",
    "categorical_accuracy",
    "categorical_crossentropy",
    "sparse_categorical_accuracy",
    "sparse_categorical_crossentropy",
    "mean_absolute_error",
    "mean_squared_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
    "precision",
    "recall",
    "loss",
    "num_examples",
)

TRAIN_PREFIX = "server/client_work/train/"
EVAL_PREFIX = "server/client_work/eval/"
NON_FINITE_METRIC = "server/finalizer/update_non_finite"


def is_allowed(name: str) -> bool:
    return name in ALLOWED_METRICS


def closest_allowed(name: str) -> str | None:
    """The allowed metric name closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name.lower().replace(" ", "_"), ALLOWED_METRICS, n=1, cutoff=0.6)
    return matches[0] if matches else None


def split_metrics(names: list[str]) -> tuple[list[str], list[str]]:
    """(accepted, rejected), each in the order given, duplicates removed."""
    accepted: list[str] = []
    rejected: list[str] = []
    for name in dict.fromkeys(names):
        (accepted if is_allowed(name) else rejected).append(name)
    return accepted, rejected
