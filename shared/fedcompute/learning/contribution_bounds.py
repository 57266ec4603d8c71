"""What one device can honestly contribute to a round, checked before its upload counts.

Every device is hostile. A decoded upload is well-shaped (:mod:`tensor_codec` checks
that); this module checks that its *values* are ones an honest device could have produced,
so that one or two devices can neither stall a round (a statistic near ``1.7e308`` makes
the round's sum overflow) nor set a round's metric alone (``correct = count = 10**9``):

* ``num_examples`` is in ``1 .. max_examples`` (the task's per-device cap);
* every statistic is finite; every count (any statistic but ``sum``) is a non-negative
  integer;
* per-example metrics: ``count <= num_examples``; accuracy-like: ``correct <= count``;
  mean-like (losses, crossentropies, errors): ``|sum| <= count * MAX_PER_EXAMPLE_VALUE``
  and non-negative except for ``loss`` (a custom loss may be negative);
* per-output metrics (precision, recall, AUC; Keras flattens the outputs): counts at most
  ``num_examples * MAX_OUTPUTS_PER_EXAMPLE``; AUC buckets are cumulative: ``tp`` and ``fp``
  never grow with the threshold, and ``tp + fn`` and ``fp + tn`` are the same at every
  threshold.

With these bounds the sum over any round stays far below float64 overflow
(``report_goal * max_examples * MAX_PER_EXAMPLE_VALUE``), and a device's weight in a metric
is at most its (capped) example count; the per-identity share cap of a round
(:mod:`fedcompute.identity`) bounds how many such devices one client can field.
Pure numpy, no TensorFlow.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedcompute.errors import InvalidRequestError

# Used when the task does not say (no max_training_batches_per_client): generous for one phone.
DEFAULT_MAX_DEVICE_EXAMPLES = 100_000
# Keras confusion metrics flatten [N, C] outputs: a device contributes N * C elements.
MAX_OUTPUTS_PER_EXAMPLE = 1024
# Bound on one example's loss / error / crossentropy value.
MAX_PER_EXAMPLE_VALUE = 1e6

_PER_EXAMPLE_RATIO = {"accuracy", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy"}
_PER_OUTPUT = {"precision", "recall", "auc-roc", "auc-pr"}
_SIGNED_SUM = {"loss"}


def max_examples_per_device(batch_size: int, max_batches: int, epochs: int, learning_algo: str) -> int:
    """The most examples an honest device trains on per round (0 when the task sets no cap)."""
    if max_batches <= 0 or batch_size <= 0:
        return 0
    passes = 1 if learning_algo == "FED_SGD" else max(1, epochs)
    return batch_size * max_batches * passes


def check_device_contribution(
    num_examples: int, metric_statistics: Mapping[str, np.ndarray], *, max_examples: int = 0
) -> None:
    """Raise :class:`InvalidRequestError` naming the first statistic no honest device produces.

    ``metric_statistics`` is the upload's flat ``{"metric/stat": array}``; ``max_examples``
    is the task's per-device cap (0: :data:`DEFAULT_MAX_DEVICE_EXAMPLES`).
    """
    cap = max_examples if max_examples > 0 else DEFAULT_MAX_DEVICE_EXAMPLES
    if not 1 <= num_examples <= cap:
        raise InvalidRequestError(
            f"num_examples {num_examples} is outside 1..{cap} (the task's per-device example cap)",
            hint="report the examples actually used this round",
        )
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in metric_statistics.items():
        metric, _, stat = key.rpartition("/")
        array = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise InvalidRequestError(f"metric statistic {key} is not finite")
        if stat != "sum" and (np.any(array < 0) or np.any(array != np.round(array))):
            raise InvalidRequestError(f"metric statistic {key} is a count: it must be a non-negative integer")
        grouped.setdefault(metric, {})[stat] = array
    for metric, stats in grouped.items():
        _check_metric(metric, stats, num_examples)


def _check_metric(metric: str, stats: Mapping[str, np.ndarray], n: int) -> None:
    def fail(what: str) -> InvalidRequestError:
        return InvalidRequestError(f"metric statistics of {metric!r}: {what}", hint="an honest device cannot send this")

    if metric in _PER_OUTPUT:
        limit = float(n) * MAX_OUTPUTS_PER_EXAMPLE
        for stat, array in stats.items():
            if np.any(array > limit):
                raise fail(f"{stat} exceeds num_examples x {MAX_OUTPUTS_PER_EXAMPLE} outputs ({limit:.0f})")
        if {"tp", "fp", "tn", "fn"} <= set(stats):
            _check_buckets(stats, fail)
        return
    count = float(np.sum(stats.get("count", 0.0)))
    if "count" in stats and count > n:
        raise fail(f"count {count:.0f} exceeds num_examples {n}")
    if metric in _PER_EXAMPLE_RATIO and "correct" in stats and float(np.sum(stats["correct"])) > count:
        raise fail(f"correct {float(np.sum(stats['correct'])):.0f} exceeds count {count:.0f}")
    if "sum" in stats:
        total = float(np.sum(stats["sum"]))
        if abs(total) > count * MAX_PER_EXAMPLE_VALUE:
            raise fail(f"|sum| {abs(total):.4g} exceeds count x {MAX_PER_EXAMPLE_VALUE:g}")
        if total < 0 and metric not in _SIGNED_SUM:
            raise fail(f"sum {total:.4g} is negative")


def _check_buckets(stats: Mapping[str, np.ndarray], fail: Callable[[str], InvalidRequestError]) -> None:
    tp, fp, tn, fn = (stats[k] for k in ("tp", "fp", "tn", "fn"))
    if np.any(np.diff(tp) > 0) or np.any(np.diff(fp) > 0):
        raise fail("tp/fp grow with the threshold (buckets must be cumulative)")
    if np.ptp(tp + fn) != 0 or np.ptp(fp + tn) != 0:
        raise fail("tp + fn and fp + tn must be the same at every threshold")
