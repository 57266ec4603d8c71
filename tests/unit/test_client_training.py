"""Device-side training equals one round of TFF's own algorithms.

One small model (dense net on sklearn's 8x8 digits) is built with
``functional_model_from_keras`` and saved once per module; TFF runs one round of
``build_unweighted_fed_avg`` / ``build_fed_sgd`` with it, and fedcompute's
``train_on_device`` runs each client on the *saved* model (plain ``tf.saved_model.load``)
from the same weights on the same batches. The new global weights must agree to 1e-5.
"""
from __future__ import annotations

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from sklearn.datasets import load_digits

from fedcompute.errors import InvalidRequestError
from fedcompute.learning import client_training as ct
from fedcompute.learning import metric_stats as ms

BATCH = 10
CLIENT_SIZES = (30, 45, 23)  # remainder batches included on purpose
INPUT_SPEC = (tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None, 1], tf.int64))


def _keras_model() -> tf.keras.Model:
    # A fresh model every time: functional_model_from_keras leaves its input unusable.
    tf.keras.utils.set_random_seed(7)
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(64,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64).reshape(-1, 1)
    return x, y


@pytest.fixture(scope="module")
def functional_model():
    return tff.learning.models.functional_model_from_keras(
        _keras_model(),
        loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(),
        input_spec=INPUT_SPEC,
        metrics_constructor=lambda: collections.OrderedDict(
            sparse_categorical_accuracy=tf.keras.metrics.SparseCategoricalAccuracy(),
            # TFF's functional metrics see (labels, predictions): the model's loss as a metric.
            loss=tf.keras.metrics.SparseCategoricalCrossentropy(),
        ),
    )


@pytest.fixture(scope="module")
def device_model(functional_model, tmp_path_factory) -> ct.DeviceModel:
    path = tmp_path_factory.mktemp("model") / "saved"
    tff.learning.models.save_functional_model(functional_model, str(path))
    return ct.load_model(path)


@pytest.fixture(scope="module")
def clients(digits) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = digits
    out, start = [], 0
    for size in CLIENT_SIZES:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


@pytest.fixture(scope="module", autouse=True)
def _kill_tff_workers():
    yield
    # TFF's runtime leaves a worker_binary child behind (see STACK.md).
    for child in psutil.Process().children(recursive=True):
        try:
            if any("worker_binary" in part for part in child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


def _tff_datasets(clients, epochs: int = 1) -> list[tf.data.Dataset]:
    return [tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat(epochs) for x, y in clients]


def _flat(weights: tff.learning.models.ModelWeights) -> list[np.ndarray]:
    return [np.asarray(w) for w in list(weights.trainable) + list(weights.non_trainable)]


def _initial(functional_model) -> list[np.ndarray]:
    trainable, non_trainable = functional_model.initial_weights
    return [np.asarray(w) for w in list(trainable) + list(non_trainable)]


def _assert_close(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
    assert worst < 1e-5, worst


@pytest.mark.parametrize(
    ("optimizer", "client_opt", "epochs"),
    [
        ("SGD", tff.learning.optimizers.build_sgdm(learning_rate=0.1), 2),
        ("ADAM", tff.learning.optimizers.build_adam(learning_rate=0.01), 1),
    ],
    ids=["sgd-2-epochs", "adam"],
)
def test_fed_avg_round_matches_tff(functional_model, device_model, clients, optimizer, client_opt, epochs) -> None:
    lr = 0.1 if optimizer == "SGD" else 0.01
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        functional_model,
        client_optimizer_fn=client_opt,
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )
    state = process.initialize()
    w0 = _flat(process.get_model_weights(state))
    _assert_close(w0, device_model.initial_weights())  # the saved model holds the same start
    output = process.next(state, _tff_datasets(clients, epochs))
    expected = _flat(process.get_model_weights(output.state))

    results = [
        ct.train_on_device(
            device_model,
            w0,
            ct.batches_from_arrays(x, y, BATCH),
            algorithm="FED_AVG",
            optimizer=optimizer,
            learning_rate=lr,
            epochs=epochs,
            metrics=["sparse_categorical_accuracy"],
        )
        for x, y in clients
    ]
    # Server side of build_unweighted_fed_avg with SGD(1.0): w - 1.0 * (-mean(delta)).
    mean_delta = [np.mean([r.delta[i] for r in results], axis=0) for i in range(device_model.num_trainable)]
    ours = [w + d for w, d in zip(w0, mean_delta)] + w0[device_model.num_trainable :]
    _assert_close(ours, expected)
    assert any(float(np.max(np.abs(d))) > 1e-3 for d in mean_delta)  # training did move the model

    # Training metrics: summed statistics finalize to TFF's own training metrics.
    summed = results[0].metric_stats
    for r in results[1:]:
        summed = ms.sum_all(summed, r.metric_stats)
    train = output.metrics["client_work"]["train"]
    assert ms.finalize("sparse_categorical_accuracy", summed["sparse_categorical_accuracy"]) == pytest.approx(
        float(train["sparse_categorical_accuracy"]), abs=1e-6
    )
    assert ms.finalize("loss", summed["loss"]) == pytest.approx(float(train["loss"]), abs=1e-5)
    assert ms.finalize("num_examples", summed["num_examples"]) == epochs * sum(CLIENT_SIZES)
    assert sum(r.num_examples for r in results) == epochs * sum(CLIENT_SIZES)
    assert [r.num_batches for r in results] == [epochs * -(-n // BATCH) for n in CLIENT_SIZES]


def test_fed_sgd_round_matches_tff(functional_model, device_model, clients) -> None:
    server_lr = 0.5
    process = tff.learning.algorithms.build_fed_sgd(
        functional_model, server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=server_lr)
    )
    state = process.initialize()
    w0 = _flat(process.get_model_weights(state))
    output = process.next(state, _tff_datasets(clients))
    expected = _flat(process.get_model_weights(output.state))

    results = [
        ct.train_on_device(
            device_model,
            w0,
            ct.batches_from_arrays(x, y, BATCH),
            algorithm="FED_SGD",
            learning_rate=123.0,  # ignored by FED_SGD: the server learning rate scales
            epochs=5,  # ignored too: one gradient over the device's data
        )
        for x, y in clients
    ]
    # TFF's FedSGD weights client gradients by example count; gradient = -delta.
    counts = np.array([r.num_examples for r in results], dtype=np.float64)
    assert list(counts) == list(CLIENT_SIZES)
    mean_delta = [
        np.sum([c * r.delta[i] for c, r in zip(counts, results)], axis=0) / counts.sum()
        for i in range(device_model.num_trainable)
    ]
    ours = [w - server_lr * (-d) for w, d in zip(w0, mean_delta)]
    _assert_close(ours, expected)


def test_fed_sgd_is_the_full_batch_gradient(device_model, clients) -> None:
    x, y = clients[1]
    w0 = device_model.initial_weights()
    batched = ct.train_on_device(device_model, w0, ct.batches_from_arrays(x, y, 7), algorithm="FED_SGD")
    whole = ct.train_on_device(device_model, w0, [(x, y)], algorithm="FED_SGD")
    _assert_close(batched.delta, whole.delta)
    # One FED_AVG SGD step on the whole batch moves by exactly lr * (that same delta).
    step = ct.train_on_device(device_model, w0, [(x, y)], algorithm="FED_AVG", learning_rate=0.3)
    _assert_close(step.delta, [0.3 * d for d in whole.delta])


def test_step_functions_trace_once_and_evaluation_matches_keras(device_model, clients, digits) -> None:
    x, y = digits
    w0 = device_model.initial_weights()
    # Batch sizes 10, 7 and 3 (and the remainders) all reuse one trace per function.
    for size in (10, 7, 3):
        ct.train_on_device(device_model, w0, ct.batches_from_arrays(*clients[0], size), learning_rate=0.05)
    assert device_model.fn("sgd_step").experimental_get_tracing_count() == 1

    metrics = ["accuracy", "sparse_categorical_crossentropy", "auc-roc"]
    stats = ct.evaluate_on_device(device_model, w0, ct.batches_from_arrays(x, y.reshape(-1), 64), metrics)
    keras_model = _keras_model()
    keras_model.set_weights(w0)
    probs = keras_model.predict(x, batch_size=256, verbose=0)
    assert ms.finalize("num_examples", stats["num_examples"]) == len(x)
    keras_accuracy = float(np.mean(probs.argmax(1) == y[:, 0]))
    assert ms.finalize("accuracy", stats["accuracy"]) == pytest.approx(keras_accuracy, abs=1e-6)
    keras_loss = float(tf.keras.losses.SparseCategoricalCrossentropy()(y, probs))
    assert ms.finalize("loss", stats["loss"]) == pytest.approx(keras_loss, abs=1e-5)
    scce = ms.finalize("sparse_categorical_crossentropy", stats["sparse_categorical_crossentropy"])
    assert scce == pytest.approx(keras_loss, abs=1e-5)
    auc = tf.keras.metrics.AUC()
    auc.update_state(np.eye(10)[y[:, 0]], probs)
    assert ms.finalize("auc-roc", stats["auc-roc"]) == pytest.approx(float(auc.result()), abs=1e-5)


def test_max_batches_non_finite_and_bad_inputs(device_model, clients) -> None:
    x, y = clients[1]
    w0 = device_model.initial_weights()
    capped = ct.train_on_device(device_model, w0, ct.batches_from_arrays(x, y, BATCH), epochs=3, max_batches=4)
    assert (capped.num_batches, capped.num_examples) == (4, 40)

    huge = ct.train_on_device(
        device_model, w0, ct.batches_from_arrays(x, y, BATCH), learning_rate=1e38, metrics=["accuracy"]
    )
    assert huge.non_finite
    assert all(not np.any(d) for d in huge.delta)
    assert ms.finalize("accuracy", huge.metric_stats["accuracy"]) == 0.0

    with pytest.raises(InvalidRequestError, match="weight tensors"):
        ct.train_on_device(device_model, w0[:-1], [(x, y)])
    with pytest.raises(InvalidRequestError, match="expects"):
        ct.train_on_device(device_model, w0, [(x[:, :10], y)])
    with pytest.raises(InvalidRequestError, match="allow-list"):
        ct.train_on_device(device_model, w0, [(x, y)], metrics=["f1_score"])
    with pytest.raises(InvalidRequestError, match="FED_AVG"):
        ct.train_on_device(device_model, w0, [(x, y)], algorithm="FED_PROX")
