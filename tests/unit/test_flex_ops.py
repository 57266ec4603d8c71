"""The flex-ops check: TFLite conversion of the client computations and the version table."""
from __future__ import annotations

import csv
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedcompute.errors import ArtifactBuildError
from fedcompute.taskbuilder import flex_ops as fo
from fedcompute.taskbuilder import model_check as mc

PREFIX = "Cannot build the ClientOnlyPlan: Please contact the server operator to register these ops: "


# ------------------------------------------------------------------------ the table (pure)


def test_table_ships_with_the_package_and_is_versioned():
    table = fo.load_flex_ops_table()
    assert table.version == fo.FLEX_OPS_TABLE_VERSION
    with open(fo.FLEX_OPS_TABLE_PATH, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(line for line in fh if not line.startswith("#")))[1:]
    assert {op: version for version, op in rows} == dict(table.min_versions)
    assert table.min_versions["L2Loss"] == "341912000"


def test_min_client_version_is_the_highest_compared_as_integers():
    table = fo.parse_flex_ops_table("# version: 7\nmin_client_version,op\n99,A\n100,B\n341812000,C\n")
    assert table.version == "7"
    assert table.min_client_version({}) == fo.NO_FLEX_OPS_VERSION == "0"
    assert table.min_client_version({"A": "AOp", "B": "BOp"}) == "100"  # as strings "99" > "100"
    assert table.min_client_version(["A"]) == "99"
    assert table.min_client_version(["A", "C", "B"]) == "341812000"


def test_unknown_ops_fail_with_the_register_message():
    table = fo.load_flex_ops_table()
    with pytest.raises(fo.UnsupportedOpsError) as info:
        table.min_client_version({"Zeta": "ZetaOp<CPUDevice, float>", "L2Loss": "L2LossOp<CPUDevice, float>",
                                  "Atan": "UnaryOp<CPUDevice, functor::atan<float>>"})
    assert isinstance(info.value, ArtifactBuildError)
    assert str(info.value) == PREFIX + (
        "{'Atan': 'UnaryOp<CPUDevice, functor::atan<float>>', 'Zeta': 'ZetaOp<CPUDevice, float>'}"
    )
    assert info.value.unsupported == {"Atan": "UnaryOp<CPUDevice, functor::atan<float>>",
                                      "Zeta": "ZetaOp<CPUDevice, float>"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("min_client_version,op\n1,A\n", "version"),
        ("# version: 1\nop,min_client_version\nA,1\n", "header"),
        ("# version: 1\nmin_client_version,op\nv3,A\n", "row 2"),
        ("# version: 1\nmin_client_version,op\n1,A\n2,A\n", "listed twice"),
    ],
)
def test_malformed_tables_are_rejected(text, fragment):
    with pytest.raises(ArtifactBuildError, match=fragment):
        fo.parse_flex_ops_table(text)


# ------------------------------------------------------------------------ TFLite conversion

class HalfSquaredError(tf.keras.losses.Loss):
    """tf.nn.l2_loss on the squeezed residual: the squeeze of [None, 1] has an unknown rank,
    so the converter cannot decompose L2Loss into builtins and keeps it as a Flex op (the
    situation ODP's seed error reports)."""

    def call(self, y_true, y_pred):
        return tf.nn.l2_loss(tf.squeeze(y_pred - tf.cast(y_true, y_pred.dtype)))


def _save(tmp_dir, name, layers, loss, label_dtype):
    # A fresh Keras model every time: functional_model_from_keras consumes it.
    keras_model = tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(4,)), *layers])
    functional = tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn=loss,
        input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 1], label_dtype)),
    )
    path = str(tmp_dir / name)
    tff.learning.models.save_functional_model(functional, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flex_models")
    tf.keras.utils.set_random_seed(3)
    paths = {
        "l2": _save(tmp, "l2", [tf.keras.layers.Dense(1)], HalfSquaredError(), tf.float32),
        # atan and the softmax cross-entropy (Keras turns softmax + sparse CE into
        # SparseSoftmaxCrossEntropyWithLogits) are Flex ops that are not in the table.
        "unsupported": _save(
            tmp, "unsupported",
            [tf.keras.layers.Lambda(tf.math.atan), tf.keras.layers.Dense(3, activation="softmax")],
            tf.keras.losses.SparseCategoricalCrossentropy(), tf.int64,
        ),
        "softmax": _save(tmp, "softmax", [tf.keras.layers.Dense(3, activation="softmax")],
                         tf.keras.losses.MeanSquaredError(), tf.float32),
    }
    loaded = {}
    for name, path in paths.items():
        model = mc.load_functional_model_checked(path)
        loaded[name] = (model, mc.check_model(model, label_name=None).example_spec)
    return loaded


def test_l2_loss_model_needs_the_l2loss_flex_op(models):
    model, spec = models["l2"]
    report = fo.check_flex_ops(model, example_spec=spec)
    assert report.training_ops["L2Loss"] == "L2LossOp<CPUDevice, float>"
    assert "L2Loss" in report.eval_ops
    assert report.training_min_client_version == "341912000"
    assert report.eval_min_client_version == "341912000"
    assert report.min_client_version == "341912000"
    # In-graph example parsing, as on ODP devices.
    assert "ParseExampleV2" in report.training_ops


def test_ops_missing_from_the_table_fail_the_build(models):
    model, spec = models["unsupported"]
    with pytest.raises(fo.UnsupportedOpsError) as info:
        fo.check_flex_ops(model, example_spec=spec)
    assert set(info.value.unsupported) == {"Atan", "SparseSoftmaxCrossEntropyWithLogits"}
    assert str(info.value) == PREFIX + str(info.value.unsupported)
    assert "'Atan': 'UnaryOp<CPUDevice, functor::atan<float>>'" in str(info.value)


def _initial_feed(model, optimizer):
    trainable, _ = model.initial_weights()
    feed = {f"trainable_{i}": w.numpy() for i, w in enumerate(trainable)}
    if optimizer == "ADAM":
        for i, w in enumerate(trainable):
            feed[f"adam_accumulator_{i}"] = np.zeros_like(w.numpy())
            feed[f"adam_preconditioner_{i}"] = np.zeros_like(w.numpy())
    return feed


def _losses(step, feed, batch, learning_rate, steps=3):
    """Call a step ``steps`` times, carrying every ``new_<input>`` output into ``<input>``."""
    feed, losses = dict(feed), []
    for t in range(steps):
        inputs = {**feed, "serialized_examples": batch, "learning_rate": np.float32(learning_rate)}
        if "adam_accumulator_0" in feed:
            inputs["adam_step"] = np.float32(t + 1)
        out = {k: np.asarray(v) for k, v in step(**inputs).items()}
        losses.append(float(out["loss"]))
        feed.update({name: out[f"new_{name}"] for name in feed})
    return losses


@pytest.mark.parametrize(("optimizer", "learning_rate"), [("SGD", 0.5), ("ADAM", 0.01)])
def test_dense_softmax_model_version_comes_from_the_table_and_is_deterministic(models, optimizer, learning_rate):
    model, spec = models["softmax"]
    table = fo.load_flex_ops_table()
    kwargs = dict(example_spec=spec, client_optimizer=optimizer)
    first = fo.check_flex_ops(model, **kwargs)
    second = fo.check_flex_ops(model, **kwargs)
    assert first.training_ops and first.eval_ops
    assert first.training_min_client_version == str(max(int(table.min_versions[op]) for op in first.training_ops))
    assert first.eval_min_client_version == str(max(int(table.min_versions[op]) for op in first.eval_ops))
    assert (first.training_ops, first.eval_ops, first.min_client_version) == (
        second.training_ops, second.eval_ops, second.min_client_version)
    assert first.table_version == fo.FLEX_OPS_TABLE_VERSION
    # The TFLite training step really trains (weights in, new weights out), like the
    # TensorFlow step it came from.
    rng = np.random.default_rng(0)
    serialized = mc.serialize_examples(spec, {"x": rng.random((6, 4))}, rng.random((6, 1)))
    feed = _initial_feed(model, optimizer)
    runner = tf.lite.Interpreter(model_content=first.training_tflite).get_signature_runner()
    losses = _losses(runner, feed, np.array(serialized, dtype=object), learning_rate)
    assert losses[2] < losses[1] < losses[0]
    train, _ = fo.build_client_modules(model, **kwargs)

    def eager(**inputs):
        trainable = [inputs.pop(f"trainable_{i}") for i in range(len(model.trainable_specs))]
        args = [trainable, [], tf.constant(inputs.pop("serialized_examples")), inputs.pop("learning_rate")]
        if optimizer == "ADAM":
            n = len(trainable)
            args += [[inputs.pop(f"adam_accumulator_{i}") for i in range(n)],
                     [inputs.pop(f"adam_preconditioner_{i}") for i in range(n)], inputs.pop("adam_step")]
        return train.step(*args)

    assert losses == pytest.approx(_losses(eager, feed, serialized, learning_rate), rel=1e-4)
    inputs, outputs = fo.signature_io(first.training_tflite)
    assert {s.name for s in inputs} == set(feed) | {"serialized_examples", "learning_rate"} | (
        {"adam_step"} if optimizer == "ADAM" else set())
    assert {f"new_{name}" for name in feed} | {"loss", "predictions", "labels"} == {s.name for s in outputs}


def test_without_an_example_spec_the_step_takes_tensors(models):
    model, _ = models["softmax"]
    train, evaluate = fo.build_client_modules(model)
    x, y = tf.ones([2, 4]), tf.zeros([2, 1])
    weights = list(model.initial_weights()[0])
    before = float(evaluate.step(weights, [], x, y)["loss"])
    out = train.step(weights, [], x, y, tf.constant(0.1))
    new = [out[f"new_trainable_{i}"] for i in range(len(weights))]
    assert float(evaluate.step(new, [], x, y)["loss"]) < before
    ops = fo.list_flex_ops(fo.convert_to_tflite(train))
    assert "ParseExampleV2" not in ops and "BroadcastGradientArgs" in ops


def test_fed_sgd_step_returns_gradients_and_skip_check_reports_unlisted_ops(models):
    model, spec = models["unsupported"]
    report = fo.check_flex_ops(model, example_spec=spec, learning_algo="FED_SGD", enforce=False)
    assert set(report.unsupported) == {"Atan", "SparseSoftmaxCrossEntropyWithLogits"}
    assert report.min_client_version == fo.NO_FLEX_OPS_VERSION
    _, outputs = fo.signature_io(report.training_tflite)
    assert {s.name for s in outputs} >= {"gradient_0", "gradient_1", "loss"}
    assert not any(s.name.startswith("new_") for s in outputs)


def test_unknown_client_optimizer_is_rejected(models):
    with pytest.raises(ArtifactBuildError, match="SGD or ADAM"):
        fo.build_client_modules(models["softmax"][0], client_optimizer="ADAGRAD")
