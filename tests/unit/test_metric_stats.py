"""Metrics from summed per-device statistics equal the Keras metric on the pooled data.

Each dataset is split unevenly across simulated devices; every device computes sufficient
statistics on its own slice (in a few batches), the statistics are summed, finalized once,
and compared with ``tf.keras.metrics.*`` run centrally on the concatenated data. The test
also checks that averaging per-device metric values would give a different number, so the
equality is not an accident of the split.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf  # noqa: E402  (reference implementation only)

from fedcompute.errors import InvalidRequestError
from fedcompute.learning import metric_stats as ms
from fedcompute.metric_names import ALLOWED_METRICS

N = 600
SPLIT_SIZES = (7, 33, 120, 440)  # deliberately uneven devices
BATCH = 32


def _binary_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, size=(N, 1))
    logits = (rng.normal(size=(N, 1)) * 1.5 + (y * 2.0 - 1.0) * 0.8).astype(np.float32)
    return y.astype(np.int64), logits


def _multiclass_data(rng: np.random.Generator, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, c, size=(N,))
    logits = rng.normal(size=(N, c)).astype(np.float32) * 1.3
    logits[np.arange(N), y] += 1.0
    return y.astype(np.int64), logits


def _regression_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.uniform(0.0, 3.0, size=(N, 1))
    y[:5] = 0.0  # exercises the epsilon guards of MAPE/MSLE
    pred = (y + rng.normal(scale=0.5, size=(N, 1))).astype(np.float32)
    return y.astype(np.float32), pred


def _np_sigmoid(z: np.ndarray) -> np.ndarray:
    return tf.math.sigmoid(z).numpy()


def _np_softmax(z: np.ndarray) -> np.ndarray:
    return tf.nn.softmax(z).numpy()


def _keras_value(metric_obj: object, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    metric_obj.update_state(y_true, y_pred)  # type: ignore[attr-defined]
    return float(metric_obj.result().numpy())  # type: ignore[attr-defined]


def _keras_reference(metric: str, y: np.ndarray, out: np.ndarray, *, from_logits: bool) -> float:
    """The Keras metric on pooled data, with labels/predictions lined up as documented."""
    km = tf.keras.metrics
    c = out.shape[1]
    probs = (_np_sigmoid(out) if c == 1 else _np_softmax(out)) if from_logits else out
    if c == 1:
        onehot = np.eye(2, dtype=np.float32)[y.reshape(-1).astype(np.int64)] if y.dtype.kind == "i" else None
        two_class = np.concatenate([1.0 - probs, probs], axis=1)
        two_logits = np.concatenate([np.zeros_like(out), out], axis=1)
        dense = y.astype(np.float32)
        cat_pred, cat_logits = two_class, two_logits
    else:
        onehot = np.eye(c, dtype=np.float32)[y.reshape(-1)]
        dense = onehot
        cat_pred, cat_logits = probs, out
    sparse = y.reshape(-1, 1)
    if metric == "accuracy":
        if c == 1:
            return _keras_value(km.BinaryAccuracy(), dense, probs)
        return _keras_value(km.SparseCategoricalAccuracy(), sparse, probs)
    if metric == "binary_accuracy":
        return _keras_value(km.BinaryAccuracy(), dense, probs)
    if metric == "categorical_accuracy":
        return _keras_value(km.CategoricalAccuracy(), onehot, cat_pred)
    if metric == "sparse_categorical_accuracy":
        return _keras_value(km.SparseCategoricalAccuracy(), sparse, cat_pred)
    if metric == "binary_crossentropy":
        if from_logits and c == 1:
            return _keras_value(km.BinaryCrossentropy(from_logits=True), dense, out)
        return _keras_value(km.BinaryCrossentropy(), dense, probs)
    if metric == "categorical_crossentropy":
        if from_logits:
            return _keras_value(km.CategoricalCrossentropy(from_logits=True), onehot, cat_logits)
        return _keras_value(km.CategoricalCrossentropy(), onehot, cat_pred)
    if metric == "sparse_categorical_crossentropy":
        if from_logits:
            return _keras_value(km.SparseCategoricalCrossentropy(from_logits=True), sparse, cat_logits)
        return _keras_value(km.SparseCategoricalCrossentropy(), sparse, cat_pred)
    if metric.startswith("mean_"):
        cls = {
            "mean_absolute_error": km.MeanAbsoluteError,
            "mean_squared_error": km.MeanSquaredError,
            "mean_absolute_percentage_error": km.MeanAbsolutePercentageError,
            "mean_squared_logarithmic_error": km.MeanSquaredLogarithmicError,
        }[metric]
        return _keras_value(cls(), dense, probs)
    if metric == "precision":
        return _keras_value(km.Precision(), dense, probs)
    if metric == "recall":
        return _keras_value(km.Recall(), dense, probs)
    if metric == "auc-roc":
        return _keras_value(km.AUC(curve="ROC"), dense, probs)
    if metric == "auc-pr":
        return _keras_value(km.AUC(curve="PR"), dense, probs)
    if metric == "num_examples":
        return float(len(y))
    if metric == "loss":
        return float(_loss_fn(c)(y, out).numpy())
    raise AssertionError(metric)


def _loss_fn(c: int):
    if c == 1:
        return tf.keras.losses.BinaryCrossentropy()
    return tf.keras.losses.SparseCategoricalCrossentropy()


def _device_slices() -> list[slice]:
    assert sum(SPLIT_SIZES) == N
    bounds = np.cumsum((0,) + SPLIT_SIZES)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _device_stats(metric: str, y: np.ndarray, out: np.ndarray, *, from_logits: bool) -> dict[str, np.ndarray]:
    """One device: statistics accumulated batch by batch, as a device does while training."""
    total = ms.zero_stats(metric)
    for start in range(0, len(y), BATCH):
        yb, ob = y[start : start + BATCH], out[start : start + BATCH]
        batch_loss = float(_loss_fn(out.shape[1])(yb, ob).numpy()) if metric == "loss" else None
        total = ms.sum_stats(total, ms.compute_stats(metric, yb, ob, from_logits=from_logits, batch_loss=batch_loss))
    return total


CLASSIFICATION_METRICS = [m for m in ALLOWED_METRICS if not m.startswith("mean_")]
REGRESSION_METRICS = [m for m in ALLOWED_METRICS if m.startswith("mean_")] + ["num_examples"]

CASES = (
    [("binary_probs", m) for m in ALLOWED_METRICS]
    + [("multiclass_probs", m) for m in ALLOWED_METRICS]
    + [("regression", m) for m in REGRESSION_METRICS]
    + [("binary_logits", m) for m in CLASSIFICATION_METRICS if m != "loss"]
    + [
        ("multiclass_logits", m)
        for m in ("categorical_crossentropy", "sparse_categorical_crossentropy", "accuracy", "auc-roc")
    ]
)


def _dataset(kind: str) -> tuple[np.ndarray, np.ndarray, bool]:
    rng = np.random.default_rng(20240607)
    if kind.startswith("binary"):
        y, logits = _binary_data(rng)
        return (y, logits, True) if kind.endswith("logits") else (y, _np_sigmoid(logits), False)
    if kind.startswith("multiclass"):
        y, logits = _multiclass_data(rng)
        return (y, logits, True) if kind.endswith("logits") else (y, _np_softmax(logits), False)
    y, pred = _regression_data(rng)
    return y, pred, False


@pytest.mark.parametrize(("kind", "metric"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_summed_device_stats_match_keras_on_pooled_data(kind: str, metric: str) -> None:
    y, out, from_logits = _dataset(kind)
    if metric == "loss":
        # The loss metric is built from the model's loss, computed on probabilities here.
        from_logits = False
    per_device = [_device_stats(metric, y[s], out[s], from_logits=from_logits) for s in _device_slices()]
    summed = per_device[0]
    for stats in per_device[1:]:
        summed = ms.sum_stats(summed, stats)
    federated = ms.finalize(metric, summed)

    expected = _keras_reference(metric, y, out, from_logits=from_logits)
    assert federated == pytest.approx(expected, abs=1e-5, rel=1e-5)

    # Averaging per-device values is a different (wrong) estimator on uneven devices.
    averaged = float(np.mean([ms.finalize(metric, s) for s in per_device]))
    assert abs(averaged - expected) > 1e-4, (metric, averaged, expected)


def test_auc_statistics_are_confusion_buckets_over_keras_thresholds() -> None:
    y, logits = _binary_data(np.random.default_rng(1))
    probs = _np_sigmoid(logits)
    stats = ms.compute_stats("auc-roc", y, probs)
    keras_auc = tf.keras.metrics.AUC()
    keras_auc.update_state(y, probs)
    np.testing.assert_allclose(np.array(keras_auc.thresholds), ms.auc_thresholds(), atol=1e-12)
    np.testing.assert_array_equal(stats["tp"], keras_auc.true_positives.numpy())
    np.testing.assert_array_equal(stats["fp"], keras_auc.false_positives.numpy())
    np.testing.assert_array_equal(stats["tn"], keras_auc.true_negatives.numpy())
    np.testing.assert_array_equal(stats["fn"], keras_auc.false_negatives.numpy())


def test_predictions_exactly_on_thresholds_land_in_keras_buckets() -> None:
    grid = (np.arange(ms.NUM_THRESHOLDS, dtype=np.float32) / np.float32(ms.NUM_THRESHOLDS - 1)).reshape(-1, 1)
    y = (np.arange(ms.NUM_THRESHOLDS) % 3 == 0).astype(np.int64).reshape(-1, 1)
    for curve, metric in (("ROC", "auc-roc"), ("PR", "auc-pr")):
        keras_auc = tf.keras.metrics.AUC(curve=curve)
        keras_auc.update_state(y, grid)
        stats = ms.compute_stats(metric, y, grid)
        np.testing.assert_array_equal(stats["tp"], keras_auc.true_positives.numpy())
        np.testing.assert_array_equal(stats["fp"], keras_auc.false_positives.numpy())
        assert ms.finalize(metric, stats) == pytest.approx(float(keras_auc.result().numpy()), abs=1e-6)


def test_registry_covers_exactly_the_allow_list() -> None:
    assert set(ms.METRIC_SPECS) == set(ALLOWED_METRICS)
    for metric in ALLOWED_METRICS:
        zero = ms.zero_stats(metric)
        assert ms.finalize(metric, zero) == 0.0  # divide_no_nan, like Keras on no data


def test_unknown_metric_and_mismatched_stats_are_rejected_with_hints() -> None:
    with pytest.raises(InvalidRequestError, match="did you mean 'precision'"):
        ms.compute_stats("precison", np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(InvalidRequestError, match="keys differ"):
        ms.sum_stats(ms.zero_stats("precision"), ms.zero_stats("recall"))
    with pytest.raises(InvalidRequestError, match="shape"):
        ms.validate_stats("auc-roc", {k: np.zeros(3) for k in ("tp", "fp", "tn", "fn")})
    with pytest.raises(InvalidRequestError, match="batch_loss"):
        ms.compute_stats("loss", np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(InvalidRequestError, match="out of range"):
        ms.compute_stats("accuracy", np.array([0, 7]), np.full((2, 3), 1 / 3, dtype=np.float32))


def test_flat_round_trip_keeps_every_statistic() -> None:
    y, logits = _multiclass_data(np.random.default_rng(2))
    stats = ms.compute_all(["auc-pr", "accuracy", "loss", "num_examples"], y, _np_softmax(logits), batch_loss=0.5)
    back = ms.unflatten_stats(ms.flatten_stats(stats))
    assert set(back) == set(stats)
    for metric in stats:
        for key in stats[metric]:
            np.testing.assert_array_equal(back[metric][key], stats[metric][key])
    assert ms.finalize("loss", back["loss"]) == pytest.approx(0.5)
    assert ms.finalize("num_examples", back["num_examples"]) == N
