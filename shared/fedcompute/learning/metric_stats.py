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

Pure numpy: no TensorFlow import, so the aggregator can finalize without loading TF.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedcompute.errors import InvalidRequestError
from fedcompute.metric_names import ALLOWED_METRICS

# Keras defaults (backend.epsilon(), tf.keras.metrics.AUC(num_thresholds=200)).
KERAS_EPSILON = 1e-7
NUM_THRESHOLDS = 200
DECISION_THRESHOLD = 0.5

Stats = dict[str, np.ndarray]


def auc_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """The thresholds Keras ``AUC`` uses: evenly spaced, endpoints pushed out by epsilon."""
    inner = [(i + 1) * 1.0 / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return np.array([0.0 - KERAS_EPSILON] + inner + [1.0 + KERAS_EPSILON])


# ---------------------------------------------------------------------------
# Lining up labels and predictions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """One batch seen from every angle a metric may need."""

    n: int
    probs: np.ndarray  # [N, C] float32 (after sigmoid/softmax when from_logits)
    logits: np.ndarray | None  # [N, C] float32 raw outputs when from_logits, else None
    target: np.ndarray  # [N, C] float64: labels for binary/regression metrics
    class_ids: np.ndarray | None  # [N] int64 for categorical metrics (None: not classes)
    cat_probs: np.ndarray  # [N, K] probabilities for categorical metrics (K >= 2)
    cat_logits: np.ndarray | None  # [N, K] logits for categorical metrics when from_logits


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z64 = z.astype(np.float64)
    e = np.exp(z64 - z64.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z64 = z.astype(np.float64)
    shifted = z64 - z64.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _class_ids(labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise InvalidRequestError(
            "Class labels must be integers for a model with several output columns.",
            hint="pass integer class ids ([N] or [N, 1]) or one-hot labels [N, C]",
        )
    ids = labels.astype(np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise InvalidRequestError(
            f"Class label out of range [0, {num_classes}): found {int(ids.min())}..{int(ids.max())}.",
            hint="the labels must index the model's output columns",
        )
    return ids


def _align(y_true: object, y_pred: object, from_logits: bool) -> _Batch:
    pred = np.asarray(y_pred, dtype=np.float32)
    if pred.ndim == 1:
        pred = pred.reshape(-1, 1)
    if pred.ndim != 2:
        raise InvalidRequestError(
            f"Predictions must have shape [N] or [N, C]; got {list(pred.shape)}.",
            hint="flatten sequence outputs to one row per example before computing metrics",
        )
    n, c = pred.shape
    labels = np.asarray(y_true)
    if labels.shape[:1] != (n,) and not (labels.ndim == 0 and n == 1):
        raise InvalidRequestError(
            f"Labels and predictions disagree on the number of examples: "
            f"labels {list(labels.shape)}, predictions {list(pred.shape)}.",
            hint="pass one label row per prediction row",
        )
    if from_logits:
        logits = pred
        probs = _sigmoid(pred) if c == 1 else _softmax(pred)
    else:
        logits = None
        probs = pred

    if c == 1:
        if labels.size != n:
            raise InvalidRequestError(
                f"A one-column model needs one label per example; got labels {list(labels.shape)}.",
                hint="labels must have shape [N] or [N, 1]",
            )
        target = labels.astype(np.float64).reshape(n, 1)
        # Two-class view for categorical metrics; class id = the (0/1) label.
        is_binary_label = bool(np.all((target == 0) | (target == 1)))
        class_ids = target.reshape(-1).astype(np.int64) if is_binary_label else None
        cat_probs = np.concatenate([1.0 - probs, probs], axis=1)
        # softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)], so these logits are exact.
        cat_logits = np.concatenate([np.zeros_like(pred), pred], axis=1) if from_logits else None
    else:
        if labels.shape == (n, c):
            target = labels.astype(np.float64)
            class_ids = np.argmax(target, axis=1).astype(np.int64)
        elif labels.size == n:
            class_ids = _class_ids(labels, c)
            target = np.eye(c, dtype=np.float64)[class_ids]
        else:
            raise InvalidRequestError(
                f"Labels {list(labels.shape)} do not fit predictions {list(pred.shape)}.",
                hint="pass class ids ([N] or [N, 1]) or one-hot labels [N, C]",
            )
        cat_probs = probs
        cat_logits = logits
    return _Batch(n, probs, logits, target, class_ids, cat_probs, cat_logits)


def _need_classes(batch: _Batch, metric: str) -> np.ndarray:
    if batch.class_ids is None:
        raise InvalidRequestError(
            f"Metric {metric!r} needs class labels (0/1 for a one-column model); "
            "the labels are not integers in range.",
            hint="use a regression metric (mean_*_error) for real-valued labels",
        )
    return batch.class_ids


# ---------------------------------------------------------------------------
# Per-metric statistics
# ---------------------------------------------------------------------------


def _scalar(value: float | np.generic) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _mean_stats(per_example: np.ndarray) -> Stats:
    return {"sum": _scalar(np.sum(per_example, dtype=np.float64)), "count": _scalar(per_example.shape[0])}


def _correct_stats(per_example: np.ndarray) -> Stats:
    return {"correct": _scalar(np.sum(per_example, dtype=np.float64)), "count": _scalar(per_example.shape[0])}


def _binary_accuracy(b: _Batch) -> Stats:
    hits = (b.probs > np.float32(DECISION_THRESHOLD)).astype(np.float64) == b.target
    return _correct_stats(hits.mean(axis=1))


def _categorical_accuracy(metric: str) -> Callable[[_Batch], Stats]:
    def compute(b: _Batch) -> Stats:
        ids = _need_classes(b, metric)
        return _correct_stats((np.argmax(b.cat_probs, axis=1) == ids).astype(np.float64))

    return compute


def _accuracy(b: _Batch) -> Stats:
    # Keras compile(metrics=["accuracy"]): binary for one output column, else categorical.
    if b.probs.shape[1] == 1:
        return _binary_accuracy(b)
    return _categorical_accuracy("accuracy")(b)


def _binary_crossentropy(b: _Batch) -> Stats:
    y = b.target
    if b.logits is not None and b.logits.shape[1] == 1:
        z = b.logits.astype(np.float64)
        # tf.nn.sigmoid_cross_entropy_with_logits, the stable form.
        per_elem = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    else:
        p = np.clip(b.probs.astype(np.float64), KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        per_elem = -(y * np.log(p + KERAS_EPSILON) + (1.0 - y) * np.log(1.0 - p + KERAS_EPSILON))
    return _mean_stats(per_elem.mean(axis=1))


def _categorical_target(b: _Batch, metric: str) -> np.ndarray:
    if b.probs.shape[1] > 1:
        return b.target
    ids = _need_classes(b, metric)
    return np.eye(2, dtype=np.float64)[ids]


def _categorical_crossentropy(b: _Batch) -> Stats:
    y = _categorical_target(b, "categorical_crossentropy")
    if b.cat_logits is not None:
        per_example = -(y * _log_softmax(b.cat_logits)).sum(axis=1)
    else:
        p = b.cat_probs.astype(np.float64)
        p = p / p.sum(axis=1, keepdims=True)
        p = np.clip(p, KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        per_example = -(y * np.log(p)).sum(axis=1)
    return _mean_stats(per_example)


def _sparse_categorical_crossentropy(b: _Batch) -> Stats:
    ids = _need_classes(b, "sparse_categorical_crossentropy")
    rows = np.arange(b.n)
    if b.cat_logits is not None:
        log_p = _log_softmax(b.cat_logits)
    else:
        # Keras: clip, log, then a softmax crossentropy over the log-probabilities
        # (which renormalizes the clipped probabilities).
        p = np.clip(b.cat_probs.astype(np.float64), KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        log_p = np.log(p)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return _mean_stats(-log_p[rows, ids])


def _regression(kind: str) -> Callable[[_Batch], Stats]:
    def compute(b: _Batch) -> Stats:
        y = b.target
        p = b.probs.astype(np.float64)
        if kind == "mae":
            per_elem = np.abs(y - p)
        elif kind == "mse":
            per_elem = np.square(y - p)
        elif kind == "mape":
            per_elem = 100.0 * np.abs((y - p) / np.maximum(np.abs(y), KERAS_EPSILON))
        else:  # msle
            per_elem = np.square(
                np.log(np.maximum(p, KERAS_EPSILON) + 1.0) - np.log(np.maximum(y, KERAS_EPSILON) + 1.0)
            )
        return _mean_stats(per_elem.mean(axis=1))

    return compute


def _flat_binary(b: _Batch) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (is_positive, prediction) pairs, as Keras confusion metrics see them."""
    return (b.target.reshape(-1) != 0), b.probs.reshape(-1)


def _precision(b: _Batch) -> Stats:
    pos, p = _flat_binary(b)
    predicted = p > np.float32(DECISION_THRESHOLD)
    return {"tp": _scalar(np.sum(predicted & pos)), "fp": _scalar(np.sum(predicted & ~pos))}


def _recall(b: _Batch) -> Stats:
    pos, p = _flat_binary(b)
    predicted = p > np.float32(DECISION_THRESHOLD)
    return {"tp": _scalar(np.sum(predicted & pos)), "fn": _scalar(np.sum(~predicted & pos))}


def _confusion_buckets(b: _Batch) -> Stats:
    pos, p = _flat_binary(b)
    p = np.clip(p, np.float32(0.0), np.float32(1.0))
    # Keras's bucketing for evenly spaced thresholds, in float32 like Keras so that values
    # landing exactly on a threshold fall in the same bucket: ceil(p * (T - 1)) - 1,
    # and bucket -1 joins bucket 0 because the first threshold is -epsilon.
    buckets = np.ceil(p * np.float32(NUM_THRESHOLDS - 1)) - np.float32(1.0)
    buckets = np.maximum(buckets, 0).astype(np.int64)
    pos_f = pos.astype(np.float64)
    tp_bucket = np.bincount(buckets, weights=pos_f, minlength=NUM_THRESHOLDS)
    fp_bucket = np.bincount(buckets, weights=1.0 - pos_f, minlength=NUM_THRESHOLDS)
    tp = np.cumsum(tp_bucket[::-1])[::-1]
    fp = np.cumsum(fp_bucket[::-1])[::-1]
    return {"tp": tp, "fp": fp, "tn": fp_bucket.sum() - fp, "fn": tp_bucket.sum() - tp}


def _count(b: _Batch) -> Stats:
    return {"count": _scalar(b.n)}


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
    compute: Callable[[_Batch], Stats]
    finalize: Callable[[Mapping[str, np.ndarray]], float]
    needs_loss: bool = False


_MEAN = {"sum": (), "count": ()}
_CORRECT = {"correct": (), "count": ()}
_BUCKETS = dict.fromkeys(("tp", "fp", "tn", "fn"), (NUM_THRESHOLDS,))
_mean_finalize = _finalize_ratio("sum", ("count",))
_correct_finalize = _finalize_ratio("correct", ("count",))


def _loss_placeholder(b: _Batch) -> Stats:  # pragma: no cover - guarded in compute_stats
    raise AssertionError("loss stats are built from the batch loss")


METRIC_SPECS: Mapping[str, MetricStatsSpec] = {
    spec.name: spec
    for spec in (
        MetricStatsSpec("accuracy", _CORRECT, _accuracy, _correct_finalize),
        MetricStatsSpec("binary_accuracy", _CORRECT, _binary_accuracy, _correct_finalize),
        MetricStatsSpec(
            "categorical_accuracy", _CORRECT, _categorical_accuracy("categorical_accuracy"), _correct_finalize
        ),
        MetricStatsSpec(
            "sparse_categorical_accuracy",
            _CORRECT,
            _categorical_accuracy("sparse_categorical_accuracy"),
            _correct_finalize,
        ),
        MetricStatsSpec("binary_crossentropy", _MEAN, _binary_crossentropy, _mean_finalize),
        MetricStatsSpec("categorical_crossentropy", _MEAN, _categorical_crossentropy, _mean_finalize),
        MetricStatsSpec("sparse_categorical_crossentropy", _MEAN, _sparse_categorical_crossentropy, _mean_finalize),
        MetricStatsSpec("mean_absolute_error", _MEAN, _regression("mae"), _mean_finalize),
        MetricStatsSpec("mean_squared_error", _MEAN, _regression("mse"), _mean_finalize),
        MetricStatsSpec("mean_absolute_percentage_error", _MEAN, _regression("mape"), _mean_finalize),
        MetricStatsSpec("mean_squared_logarithmic_error", _MEAN, _regression("msle"), _mean_finalize),
        MetricStatsSpec("precision", {"tp": (), "fp": ()}, _precision, _finalize_ratio("tp", ("tp", "fp"))),
        MetricStatsSpec("recall", {"tp": (), "fn": ()}, _recall, _finalize_ratio("tp", ("tp", "fn"))),
        MetricStatsSpec("auc-roc", _BUCKETS, _confusion_buckets, _finalize_auc_roc),
        MetricStatsSpec("auc-pr", _BUCKETS, _confusion_buckets, _finalize_auc_pr),
        MetricStatsSpec("loss", _MEAN, _loss_placeholder, _mean_finalize, needs_loss=True),
        MetricStatsSpec("num_examples", {"count": ()}, _count, _finalize_count),
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
        return {"sum": _scalar(float(batch_loss) * n), "count": _scalar(n)}
    return spec.compute(_align(y_true, y_pred, from_logits))


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
    batch = _align(y_true, y_pred, from_logits) if any(not s.needs_loss for s in specs) else None
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
