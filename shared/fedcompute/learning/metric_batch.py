"""One batch's metric statistics, as a device computes them (pure numpy, no TensorFlow).

Lines up a batch's labels and model outputs the way Keras does (:func:`align_batch`: logits
to probabilities, one column vs several, class ids vs one-hot labels) and computes each
metric's sufficient statistics for that batch. :mod:`fedcompute.learning.metric_stats`
registers these functions per metric, sums the statistics and finalizes them; see its
docstring for the table of metrics and statistics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcompute.errors import InvalidRequestError

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
class Batch:
    """One batch seen from every angle a metric may need."""

    n: int
    probs: np.ndarray  # [N, C] float32 (after _sigmoid/_softmax when from_logits)
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


def align_batch(y_true: object, y_pred: object, from_logits: bool) -> Batch:
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
        # _softmax([0, z]) == [1 - _sigmoid(z), _sigmoid(z)], so these logits are exact.
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
    return Batch(n, probs, logits, target, class_ids, cat_probs, cat_logits)


def _need_classes(batch: Batch, metric: str) -> np.ndarray:
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


def scalar(value: float | np.generic) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _mean_stats(per_example: np.ndarray) -> Stats:
    return {"sum": scalar(np.sum(per_example, dtype=np.float64)), "count": scalar(per_example.shape[0])}


def _correct_stats(per_example: np.ndarray) -> Stats:
    return {"correct": scalar(np.sum(per_example, dtype=np.float64)), "count": scalar(per_example.shape[0])}


def binary_accuracy(b: Batch) -> Stats:
    hits = (b.probs > np.float32(DECISION_THRESHOLD)).astype(np.float64) == b.target
    return _correct_stats(hits.mean(axis=1))


def categorical_accuracy(metric: str) -> Callable[[Batch], Stats]:
    def compute(b: Batch) -> Stats:
        ids = _need_classes(b, metric)
        return _correct_stats((np.argmax(b.cat_probs, axis=1) == ids).astype(np.float64))

    return compute


def accuracy(b: Batch) -> Stats:
    # Keras compile(metrics=["accuracy"]): binary for one output column, else categorical.
    if b.probs.shape[1] == 1:
        return binary_accuracy(b)
    return categorical_accuracy("accuracy")(b)


def binary_crossentropy(b: Batch) -> Stats:
    y = b.target
    if b.logits is not None and b.logits.shape[1] == 1:
        z = b.logits.astype(np.float64)
        # tf.nn.sigmoid_cross_entropy_with_logits, the stable form.
        per_elem = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    else:
        p = np.clip(b.probs.astype(np.float64), KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        per_elem = -(y * np.log(p + KERAS_EPSILON) + (1.0 - y) * np.log(1.0 - p + KERAS_EPSILON))
    return _mean_stats(per_elem.mean(axis=1))


def _categorical_target(b: Batch, metric: str) -> np.ndarray:
    if b.probs.shape[1] > 1:
        return b.target
    ids = _need_classes(b, metric)
    return np.eye(2, dtype=np.float64)[ids]


def categorical_crossentropy(b: Batch) -> Stats:
    y = _categorical_target(b, "categorical_crossentropy")
    if b.cat_logits is not None:
        per_example = -(y * _log_softmax(b.cat_logits)).sum(axis=1)
    else:
        p = b.cat_probs.astype(np.float64)
        p = p / p.sum(axis=1, keepdims=True)
        p = np.clip(p, KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        per_example = -(y * np.log(p)).sum(axis=1)
    return _mean_stats(per_example)


def sparse_categorical_crossentropy(b: Batch) -> Stats:
    ids = _need_classes(b, "sparse_categorical_crossentropy")
    rows = np.arange(b.n)
    if b.cat_logits is not None:
        log_p = _log_softmax(b.cat_logits)
    else:
        # Keras: clip, log, then a _softmax crossentropy over the log-probabilities
        # (which renormalizes the clipped probabilities).
        p = np.clip(b.cat_probs.astype(np.float64), KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        log_p = np.log(p)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return _mean_stats(-log_p[rows, ids])


def regression(kind: str) -> Callable[[Batch], Stats]:
    def compute(b: Batch) -> Stats:
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


def _flat_binary(b: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (is_positive, prediction) pairs, as Keras confusion metrics see them."""
    return (b.target.reshape(-1) != 0), b.probs.reshape(-1)


def precision(b: Batch) -> Stats:
    pos, p = _flat_binary(b)
    predicted = p > np.float32(DECISION_THRESHOLD)
    return {"tp": scalar(np.sum(predicted & pos)), "fp": scalar(np.sum(predicted & ~pos))}


def recall(b: Batch) -> Stats:
    pos, p = _flat_binary(b)
    predicted = p > np.float32(DECISION_THRESHOLD)
    return {"tp": scalar(np.sum(predicted & pos)), "fn": scalar(np.sum(~predicted & pos))}


def confusion_buckets(b: Batch) -> Stats:
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


def example_count(b: Batch) -> Stats:
    return {"count": scalar(b.n)}


