"""Metrics as sufficient statistics: computed on devices, summed, finalized once.

A federated metric must never be the average of per-device values (a device with 3
examples would weigh as much as one with 3,000, and an average of AUCs is not an AUC).
Instead every device reports *sufficient statistics* -- counts and sums that add up
across devices -- and the server finalizes the metric once from the sums:

====================================  ==============================  =====================
metric                                statistics (summed)             finalized as
====================================  ==============================  =====================
accuracy, binary_accuracy,            ``correct``, ``count``          correct / count
categorical_accuracy,
sparse_categorical_accuracy
*_crossentropy, loss, mean_*_error    ``sum``, ``count``              sum / count
precision                             ``tp``, ``fp`` (threshold 0.5)  tp / (tp + fp)
recall                                ``tp``, ``fn`` (threshold 0.5)  tp / (tp + fn)
auc-roc, auc-pr                       ``tp``, ``fp``, ``tn``, ``fn``  Keras ``AUC`` formulas
                                      per threshold (200)
num_examples                          ``count``                       count
====================================  ==============================  =====================

Every value matches the Keras metric (``tf.keras.metrics.*``, TF 2.14) computed centrally on
the concatenated data, to float tolerance. Ratios with a zero denominator finalize to 0.0,
as Keras does (``divide_no_nan``).

How model outputs and labels are lined up (``y_pred`` is ``[N]``, ``[N, 1]`` or ``[N, C]``):

- ``from_logits=True``: outputs are logits of a sigmoid (one column) or a softmax (several
  columns); they are turned into probabilities first, and the crossentropies use the
  numerically stable logit formulas (Keras ``from_logits=True``).
- One output column (binary or regression model): labels are reshaped to ``[N, 1]``.
  Categorical metrics see the two-class view ``[1 - p, p]`` with class id = the label
  (so ``sparse_categorical_accuracy`` of a sigmoid model is its accuracy at 0.5).
- Several columns: integer labels (``[N]`` or ``[N, 1]``) are class ids; binary and
  regression metrics see them one-hot encoded (Keras semantics with one-hot labels, e.g.
  micro-averaged AUC). Dense ``[N, C]`` labels are used as they are.
- ``accuracy`` resolves like Keras ``compile(metrics=["accuracy"])``: binary accuracy for
  one column, otherwise categorical accuracy (argmax of the prediction vs the class id).

This module is the metrics API: the registry (one :class:`MetricStatsSpec` per metric), the
finalizers, and summing, validating and (un)flattening statistics. How one batch's labels and
outputs are lined up and turned into statistics is :mod:`fedcompute.learning.metric_batch`.

Pure numpy: no TensorFlow import, so the aggregator can finalize without loading TF.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedcompute.errors import InvalidRequestError
from fedcompute.learning.metric_batch import (
    NUM_THRESHOLDS,
    Batch,
    Stats,
    accuracy,
    align_batch,
    binary_accuracy,
    binary_crossentropy,
    categorical_accuracy,
    categorical_crossentropy,
    confusion_buckets,
    example_count,
    precision,
    recall,
    regression,
    scalar,
    sparse_categorical_crossentropy,
)
from fedcompute.learning.metric_batch import auc_thresholds as auc_thresholds  # public API of this module
from fedcompute.metric_names import ALLOWED_METRICS

# ---------------------------------------------------------------------------
# Finalizers
# ---------------------------------------------------------------------------


def _div_no_nan(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _finalize_ratio(num_key: str, den_keys: tuple[str, ...]) -> Callable[[Mapping[str, np.ndarray]], float]:
    def finalize(stats: Mapping[str, np.ndarray]) -> float:
        den: np.ndarray = np.zeros((), dtype=np.float64)
        for k in den_keys:
            den = den + np.asarray(stats[k], dtype=np.float64)
        return float(_div_no_nan(stats[num_key], den))

    return finalize


def _finalize_auc_roc(stats: Mapping[str, np.ndarray]) -> float:
    tp, fp, tn, fn = (np.asarray(stats[k], dtype=np.float64) for k in ("tp", "fp", "tn", "fn"))
    recall = _div_no_nan(tp, tp + fn)
    fp_rate = _div_no_nan(fp, fp + tn)
    heights = (recall[:-1] + recall[1:]) / 2.0
    return float(np.sum((fp_rate[:-1] - fp_rate[1:]) * heights))


def _finalize_auc_pr(stats: Mapping[str, np.ndarray]) -> float:
    """Keras ``AUC(curve='PR')``: Davis & Goadrich interpolation between thresholds."""
    tp, fp, fn = (np.asarray(stats[k], dtype=np.float64) for k in ("tp", "fp", "fn"))
    dtp = tp[:-1] - tp[1:]
    p = tp + fp
    dp = p[:-1] - p[1:]
    prec_slope = _div_no_nan(dtp, np.maximum(dp, 0))
    intercept = tp[1:] - prec_slope * p[1:]
    both_positive = (p[:-1] > 0) & (p[1:] > 0)
    safe_p_ratio = np.where(both_positive, _div_no_nan(p[:-1], np.maximum(p[1:], 0)), 1.0)
    increment = _div_no_nan(
        prec_slope * (dtp + intercept * np.log(safe_p_ratio)), np.maximum(tp[1:] + fn[1:], 0)
    )
    return float(np.sum(increment))


def _finalize_count(stats: Mapping[str, np.ndarray]) -> float:
    return float(np.asarray(stats["count"], dtype=np.float64))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricStatsSpec:
    """How one metric is computed on a device and finalized on the server.

    ``stat_shapes`` gives each statistic's shape (``()`` for scalars); ``needs_loss`` is
    True for ``loss``, whose statistics come from the model's loss, not from predictions.
    """

    name: str
    stat_shapes: Mapping[str, tuple[int, ...]]
    compute: Callable[[Batch], Stats]
    finalize: Callable[[Mapping[str, np.ndarray]], float]
    needs_loss: bool = False


_MEAN = {"sum": (), "count": ()}
_CORRECT = {"correct": (), "count": ()}
_BUCKETS = dict.fromkeys(("tp", "fp", "tn", "fn"), (NUM_THRESHOLDS,))
_mean_finalize = _finalize_ratio("sum", ("count",))
_correct_finalize = _finalize_ratio("correct", ("count",))


def _loss_placeholder(b: Batch) -> Stats:  # pragma: no cover - guarded in compute_stats
    raise AssertionError("loss stats are built from the batch loss")


METRIC_SPECS: Mapping[str, MetricStatsSpec] = {
    spec.name: spec
    for spec in (
        MetricStatsSpec("accuracy", _CORRECT, accuracy, _correct_finalize),
        MetricStatsSpec("binary_accuracy", _CORRECT, binary_accuracy, _correct_finalize),
        MetricStatsSpec(
            "categorical_accuracy", _CORRECT, categorical_accuracy("categorical_accuracy"), _correct_finalize
        ),
        MetricStatsSpec(
            "sparse_categorical_accuracy",
            _CORRECT,
            categorical_accuracy("sparse_categorical_accuracy"),
            _correct_finalize,
        ),
        MetricStatsSpec("binary_crossentropy", _MEAN, binary_crossentropy, _mean_finalize),
        MetricStatsSpec("categorical_crossentropy", _MEAN, categorical_crossentropy, _mean_finalize),
        MetricStatsSpec("sparse_categorical_crossentropy", _MEAN, sparse_categorical_crossentropy, _mean_finalize),
        MetricStatsSpec("mean_absolute_error", _MEAN, regression("mae"), _mean_finalize),
        MetricStatsSpec("mean_squared_error", _MEAN, regression("mse"), _mean_finalize),
        MetricStatsSpec("mean_absolute_percentage_error", _MEAN, regression("mape"), _mean_finalize),
        MetricStatsSpec("mean_squared_logarithmic_error", _MEAN, regression("msle"), _mean_finalize),
        MetricStatsSpec("precision", {"tp": (), "fp": ()}, precision, _finalize_ratio("tp", ("tp", "fp"))),
        MetricStatsSpec("recall", {"tp": (), "fn": ()}, recall, _finalize_ratio("tp", ("tp", "fn"))),
        MetricStatsSpec("auc-roc", _BUCKETS, confusion_buckets, _finalize_auc_roc),
        MetricStatsSpec("auc-pr", _BUCKETS, confusion_buckets, _finalize_auc_pr),
        MetricStatsSpec("loss", _MEAN, _loss_placeholder, _mean_finalize, needs_loss=True),
        MetricStatsSpec("num_examples", {"count": ()}, example_count, _finalize_count),
    )
}

# The allow-list and the registry must not drift apart.
if set(METRIC_SPECS) != set(ALLOWED_METRICS):  # pragma: no cover - caught by any import in tests
    raise RuntimeError(f"metric_stats and metric_names disagree: {sorted(set(METRIC_SPECS) ^ set(ALLOWED_METRICS))}")


def get_spec(metric: str) -> MetricStatsSpec:
    """The spec of an allowed metric; an actionable error for any other name."""
    try:
        return METRIC_SPECS[metric]
    except KeyError:
        from fedcompute.metric_names import closest_allowed

        guess = closest_allowed(metric)
        hint = f"did you mean {guess!r}?" if guess else f"allowed metrics: {', '.join(ALLOWED_METRICS)}"
        raise InvalidRequestError(f"Metric {metric!r} is not on the metric allow-list.", hint=hint) from None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def zero_stats(metric: str) -> Stats:
    """The statistics of an empty dataset (the identity of :func:`sum_stats`)."""
    return {k: np.zeros(shape, dtype=np.float64) for k, shape in get_spec(metric).stat_shapes.items()}


def compute_stats(
    metric: str,
    y_true: object,
    y_pred: object,
    *,
    from_logits: bool = False,
    batch_loss: float | None = None,
) -> Stats:
    """Sufficient statistics of ``metric`` for one batch (or one device's data).

    ``y_pred``: ``[N]``, ``[N, 1]`` (sigmoid / regression) or ``[N, C]`` (softmax) outputs;
    ``y_true``: ``[N]`` or ``[N, 1]`` labels (class ids for several columns), or ``[N, C]``.
    ``batch_loss``: the model's mean loss over the batch, required for ``loss``.
    """
    spec = get_spec(metric)
    if spec.needs_loss:
        if batch_loss is None:
            raise InvalidRequestError(
                "Metric 'loss' needs the batch's mean loss.", hint="pass batch_loss=<mean loss of the batch>"
            )
        n = int(np.asarray(y_pred).shape[0]) if np.ndim(np.asarray(y_pred)) else 1
        return {"sum": scalar(float(batch_loss) * n), "count": scalar(n)}
    return spec.compute(align_batch(y_true, y_pred, from_logits))


def compute_all(
    metrics: Iterable[str],
    y_true: object,
    y_pred: object,
    *,
    from_logits: bool = False,
    batch_loss: float | None = None,
) -> dict[str, Stats]:
    """:func:`compute_stats` for several metrics, lining the batch up only once."""
    names = list(dict.fromkeys(metrics))
    specs = [get_spec(m) for m in names]
    batch = align_batch(y_true, y_pred, from_logits) if any(not s.needs_loss for s in specs) else None
    out: dict[str, Stats] = {}
    for spec in specs:
        if spec.needs_loss:
            out[spec.name] = compute_stats(spec.name, y_true, y_pred, batch_loss=batch_loss)
        else:
            assert batch is not None
            out[spec.name] = spec.compute(batch)
    return out


def _check_same_keys(a: Mapping[str, object], b: Mapping[str, object], what: str) -> None:
    if set(a) != set(b):
        raise InvalidRequestError(
            f"Cannot add {what}: keys differ ({sorted(a)} vs {sorted(b)}).",
            hint="both sides must come from the same metric list",
        )


def sum_stats(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Stats:
    """Elementwise sum of two statistics dicts of the same metric."""
    _check_same_keys(a, b, "metric statistics")
    out: Stats = {}
    for key in a:
        x = np.asarray(a[key], dtype=np.float64)
        y = np.asarray(b[key], dtype=np.float64)
        if x.shape != y.shape:
            raise InvalidRequestError(
                f"Cannot add metric statistic {key!r}: shapes {list(x.shape)} and {list(y.shape)} differ.",
                hint="both sides must be computed by the same fedcompute version",
            )
        out[key] = x + y
    return out


def sum_all(a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Stats]:
    """:func:`sum_stats` for every metric of two ``{metric: stats}`` dicts."""
    _check_same_keys(a, b, "metric statistics of different metric lists")
    return {m: sum_stats(a[m], b[m]) for m in a}


def validate_stats(metric: str, stats: Mapping[str, object]) -> Stats:
    """``stats`` as float64 arrays, checked against the metric's keys and shapes.

    Device uploads are untrusted input: a wrong key or shape, or a negative or non-finite
    count, is reported instead of silently skewing the round's metrics.
    """
    spec = get_spec(metric)
    if set(stats) != set(spec.stat_shapes):
        raise InvalidRequestError(
            f"Statistics for {metric!r} must have keys {sorted(spec.stat_shapes)}, got {sorted(stats)}."
        )
    out: Stats = {}
    for key, shape in spec.stat_shapes.items():
        value = np.asarray(stats[key], dtype=np.float64)
        if value.shape != shape:
            raise InvalidRequestError(
                f"Statistic {metric}/{key} must have shape {list(shape)}, got {list(value.shape)}."
            )
        if not np.all(np.isfinite(value)):
            raise InvalidRequestError(f"Statistic {metric}/{key} is not finite.")
        if key != "sum" and np.any(value < 0):
            raise InvalidRequestError(f"Statistic {metric}/{key} is a count and cannot be negative.")
        out[key] = value
    return out


def finalize(metric: str, stats: Mapping[str, np.ndarray]) -> float:
    """The metric's value from statistics summed over all devices."""
    spec = get_spec(metric)
    missing = set(spec.stat_shapes) - set(stats)
    if missing:
        raise InvalidRequestError(f"Statistics for {metric!r} lack {sorted(missing)}.")
    return spec.finalize(stats)


def finalize_all(all_stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
    """``{metric: value}`` for a ``{metric: stats}`` dict."""
    return {m: finalize(m, s) for m, s in all_stats.items()}


STAT_SEPARATOR = "/"


def flatten_stats(all_stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{"metric/stat": array}``: one flat mapping, e.g. to ship beside a model delta."""
    return {
        f"{m}{STAT_SEPARATOR}{k}": np.asarray(v, dtype=np.float64)
        for m, s in all_stats.items()
        for k, v in s.items()
    }


def unflatten_stats(flat: Mapping[str, np.ndarray]) -> dict[str, Stats]:
    """Inverse of :func:`flatten_stats`, validating each metric's statistics."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        metric, sep, stat = key.rpartition(STAT_SEPARATOR)
        if not sep:
            raise InvalidRequestError(f"Flat metric statistic key {key!r} lacks '{STAT_SEPARATOR}'.")
        grouped.setdefault(metric, {})[stat] = value
    return {m: validate_stats(m, s) for m, s in grouped.items()}
