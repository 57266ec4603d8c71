"""The TFLite device runtime executes the plan's TFLite model and equals TensorFlow and TFF.

Plans are built like the task builder builds them (flex-ops check → TFLite client steps →
``ClientOnlyPlan`` bytes → unpacked as a device does), for the dense digits model (passes
the flex-ops check) and the seed's CNN (select TF ops outside the table). One FedAvg round
through :class:`TfliteRuntime` must equal :class:`TensorflowRuntime` and TFF's
``build_unweighted_fed_avg`` on the same weights, examples and order to 1e-5, and so must the
metric statistics (training and evaluation).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from fedcompute.data.digits import load_digits
from fedcompute.data.examples import ExampleSpec, encode_examples
from fedcompute.errors import DeviceComputationError
from fedcompute.fleet import runtimes
from fedcompute.models import dense_digits, emnist_cnn
from fedcompute.plans import TfliteStep, UnpackedPlan
from fedcompute.taskbuilder.local_plan import build_local_plan

METRICS = ("sparse_categorical_accuracy",)
TOLERANCE = 1e-5


@dataclasses.dataclass
class Built:
    model_dir: Path
    weights: list[np.ndarray]
    example_spec: ExampleSpec
    plans: dict[tuple[str, str, str], UnpackedPlan]  # (kind, algorithm, optimizer) -> plan


def _build(model_dir: Path, tmp: Path, *, enforce: bool, variants, batch_size: int, lr: float) -> Built:
    """What the task builder does, then what a device does with the download."""
    plans, weights = {}, []
    for algorithm, optimizer in variants:
        built, weights = build_local_plan(
            model_dir, tmp / f"{algorithm}-{optimizer}", learning_algo=algorithm, client_optimizer=optimizer,
            client_learning_rate=lr, batch_size=batch_size, metrics=METRICS, enforce_flex_ops=enforce)
        plans.update({(kind, algorithm, optimizer): plan for kind, plan in built.items()})
    spec = ExampleSpec.from_dict(plans[("TRAINING", *variants[0])].plan.example_spec)
    return Built(model_dir, weights, spec, plans)


def _clients(images: np.ndarray, labels: np.ndarray, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], labels[start:start + size].reshape(-1, 1)))
        start += size
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("dense")
    dense_digits.save(str(tmp / "model"))
    return _build(tmp / "model", tmp, enforce=True, batch_size=10, lr=0.1,
                  variants=[("FED_AVG", "SGD"), ("FED_AVG", "ADAM"), ("FED_SGD", "SGD")])


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Built:
    from fedcompute.models.functional import save_functional_model

    tmp = tmp_path_factory.mktemp("cnn")
    save_functional_model(lambda: emnist_cnn.create_original_fedavg_cnn_model(only_digits=True, seed=3),
                          emnist_cnn.input_spec_type1(), emnist_cnn.loss(), str(tmp / "model"))
    return _build(tmp / "model", tmp, enforce=False, batch_size=5, lr=0.05, variants=[("FED_AVG", "SGD")])


def _examples(built: Built, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    return encode_examples(built.example_spec, x, y)


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(z)))) for x, z in zip(a, b))


def _assert_stats_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for metric in a:
        assert a[metric].keys() == b[metric].keys(), metric
        for stat in a[metric]:
            np.testing.assert_allclose(a[metric][stat], b[metric][stat], rtol=TOLERANCE, atol=TOLERANCE,
                                       err_msg=f"{metric}/{stat}")


def _tff_round(model_dir: Path, clients, batch: int, lr: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedcompute.models.functional import load_functional_model

    process = tff.learning.algorithms.build_unweighted_fed_avg(
        load_functional_model(str(model_dir)),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(lr),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
    )
    state = process.initialize()
    initial = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    datasets = [tf.data.Dataset.from_tensor_slices((x, y)).batch(batch) for x, y in clients]
    state = process.next(state, datasets).state
    return initial, [np.asarray(w) for w in process.get_model_weights(state).trainable]


def _fed_avg(built: Built, runtime: runtimes.DeviceRuntime, clients, key=("TRAINING", "FED_AVG", "SGD")):
    plan = built.plans[key]
    results = [runtime.train(plan, built.weights, _examples(built, x, y)) for x, y in clients]
    n_trainable = len(results[0].delta)
    mean_delta = [np.mean([r.delta[i] for r in results], axis=0) for i in range(n_trainable)]
    return [w + d for w, d in zip(built.weights, mean_delta)], results


@pytest.mark.parametrize("model", ["dense", "cnn"])
def test_one_fed_avg_round_equals_tensorflow_runtime_and_tff(model, request) -> None:
    built: Built = request.getfixturevalue(model)
    if model == "dense":
        images, labels = load_digits()
        clients, batch, lr = _clients(images, labels, (30, 45, 23)), 10, 0.1  # remainder batches on purpose
    else:
        images, labels = load_digits(image_size=28)
        clients, batch, lr = _clients(images, labels, (12, 8)), 5, 0.05
    plan = built.plans[("TRAINING", "FED_AVG", "SGD")]
    assert plan.tflite is not None and plan.plan.batch_size == batch

    tflite_weights, tflite_results = _fed_avg(built, runtimes.TfliteRuntime(), clients)
    tf_weights, tf_results = _fed_avg(built, runtimes.TensorflowRuntime(), clients)
    initial, tff_weights = _tff_round(built.model_dir, clients, batch, lr)

    assert _max_diff(initial, built.weights) == 0.0  # all start from the saved initial weights
    assert _max_diff(tflite_weights, tf_weights) < TOLERANCE
    assert _max_diff(tflite_weights, tff_weights) < TOLERANCE
    assert _max_diff(initial, tflite_weights) > 1e-3  # the round did train
    for a, b in zip(tflite_results, tf_results):
        assert (a.num_examples, a.num_batches, a.non_finite) == (b.num_examples, b.num_batches, b.non_finite)
        assert a.loss == pytest.approx(b.loss, rel=TOLERANCE)
        _assert_stats_close(a.metric_stats, b.metric_stats)
    assert set(tflite_results[0].metric_stats) == {"sparse_categorical_accuracy", "loss", "num_examples"}

    x, y = clients[0]
    evaluation = built.plans[("EVALUATION", "FED_AVG", "SGD")]
    _assert_stats_close(runtimes.TfliteRuntime().evaluate(evaluation, tflite_weights, _examples(built, x, y)),
                        runtimes.TensorflowRuntime().evaluate(evaluation, tflite_weights, _examples(built, x, y)))


@pytest.mark.parametrize(("algorithm", "optimizer"), [("FED_AVG", "ADAM"), ("FED_SGD", "SGD")])
def test_adam_and_fed_sgd_steps_equal_the_tensorflow_runtime(dense, algorithm, optimizer) -> None:
    images, labels = load_digits()
    x, y = images[:27], labels[:27].reshape(-1, 1)
    examples = _examples(dense, x, y)
    plan = dense.plans[("TRAINING", algorithm, optimizer)]
    plan = dataclasses.replace(plan, plan=dataclasses.replace(plan.plan, epochs=2))
    ours = runtimes.TfliteRuntime().train(plan, dense.weights, examples)
    theirs = runtimes.TensorflowRuntime().train(plan, dense.weights, examples)
    # Adam divides by sqrt(second moment) + 1e-7: float32 rounding differences between the
    # TFLite and TensorFlow kernels grow by up to ~1e2 where a gradient is near zero.
    tolerance = 1e-4 if optimizer == "ADAM" else TOLERANCE
    assert _max_diff(ours.delta, theirs.delta) < tolerance, _max_diff(ours.delta, theirs.delta)
    assert max(float(np.max(np.abs(d))) for d in ours.delta) > 1e-4
    assert ours.num_batches == theirs.num_batches == (3 if algorithm == "FED_SGD" else 6)
    _assert_stats_close(ours.metric_stats, theirs.metric_stats)


def test_dense_plan_passes_the_flex_check_and_the_cnn_plan_needs_unlisted_ops(dense, cnn) -> None:
    dense_ops = dense.plans[("TRAINING", "FED_AVG", "SGD")].tflite.flex_ops
    assert set(dense_ops) == {"BroadcastGradientArgs", "ParseExampleV2", "ReluGrad"}
    choice = runtimes.choose_runtime("auto", dense.plans[("TRAINING", "FED_AVG", "SGD")])
    assert choice.name == "tflite" and "341812000" in choice.reason
    cnn_plan = cnn.plans[("TRAINING", "FED_AVG", "SGD")]
    assert {"Conv2DBackpropFilter", "MaxPoolGrad", "SparseSoftmaxCrossEntropyWithLogits"} <= set(cnn_plan.tflite.flex_ops)
    choice = runtimes.choose_runtime("auto", cnn_plan)
    assert choice.name == "tensorflow" and "Conv2DBackpropFilter" in choice.reason
    assert runtimes.choose_runtime("tflite", cnn_plan).name == "tflite"
    no_tflite = dataclasses.replace(cnn_plan, tflite=None)
    assert runtimes.choose_runtime("auto", no_tflite).name == "tensorflow"


def _with_model(plan: UnpackedPlan, model: bytes, *, rehash: bool) -> UnpackedPlan:
    assert plan.tflite is not None
    step = dataclasses.replace(plan.tflite, model=model, sha256=b"" if rehash else plan.tflite.sha256)
    return dataclasses.replace(plan, tflite=step)


@pytest.mark.parametrize("rehash", [False, True], ids=["altered-after-build", "malformed-as-built"])
def test_corrupted_tflite_model_fails_with_model_computation_error(dense, rehash) -> None:
    plan = dense.plans[("TRAINING", "FED_AVG", "SGD")]
    images, labels = load_digits()
    examples = _examples(dense, images[:5], labels[:5])
    model = plan.tflite.model
    flipped = model[:100] + bytes(b ^ 0xFF for b in model[100:140]) + model[140:]
    # Truncated: tf.lite.Interpreter would crash the process on it; the runtime refuses it first.
    for broken in (b"\x00" * len(model), model[: len(model) // 3], flipped):
        if rehash and broken is flipped:
            continue  # a bit flip inside a valid flatbuffer may still load: the checksum catches it
        with pytest.raises(DeviceComputationError) as info:
            runtimes.TfliteRuntime().train(_with_model(plan, broken, rehash=rehash), dense.weights, examples)
        assert info.value.result == "FAILED_MODEL_COMPUTATION"
        assert "TFLite model" in str(info.value)
        assert ("SHA-256" in str(info.value)) == (not rehash)


def test_a_client_without_a_needed_flex_op_fails_with_ops_error(dense) -> None:
    plan = dense.plans[("TRAINING", "FED_AVG", "SGD")]
    images, labels = load_digits()
    runtime = runtimes.TfliteRuntime(supported_flex_ops={"ParseExampleV2", "ReluGrad"})
    with pytest.raises(DeviceComputationError) as info:
        runtime.train(plan, dense.weights, _examples(dense, images[:5], labels[:5]))
    assert info.value.result == "FAILED_OPS_ERROR"
    assert "BroadcastGradientArgs" in str(info.value)
    # A client of the plan's min_client_version has every op it needs; one version below lacks them.
    examples = _examples(dense, images[:5], labels[:5])
    result = runtimes.TfliteRuntime.for_client_version("341812000").train(plan, dense.weights, examples)
    assert result.num_examples == 5
    with pytest.raises(DeviceComputationError) as older:
        runtimes.TfliteRuntime.for_client_version("341811999").train(plan, dense.weights, examples)
    assert older.value.result == "FAILED_OPS_ERROR" and "ParseExampleV2" in str(older.value)


def test_plan_whose_spec_does_not_match_its_model_is_refused(dense) -> None:
    plan = dense.plans[("TRAINING", "FED_AVG", "SGD")]
    step: TfliteStep = plan.tflite
    wrong = dataclasses.replace(plan, tflite=dataclasses.replace(step, inputs=step.inputs[1:]))
    with pytest.raises(DeviceComputationError, match="does not match its TFLite model"):
        runtimes.TfliteRuntime().train(wrong, dense.weights, [b""])


README = Path(__file__).resolve().parents[2] / "README.md"


def _present(message, path: str) -> bool:
    *parents, last = path.split(".")
    for part in parents:
        message = getattr(message, part)
    value = getattr(message, last)
    return message.HasField(last) if hasattr(value, "ListFields") else len(value) > 0


def test_readme_client_plan_fields_match_the_built_plan(dense, tmp_path) -> None:
    """Every ``ClientOnlyPlan`` row of README's compatibility table says set/empty truthfully."""
    from fedcompute.plans import pack_plan
    from fedcompute.proto import plan_pb2

    built = dense.plans[("TRAINING", "FED_AVG", "SGD")]
    data = pack_plan(built.plan, built.saved_model_dir, built.tflite, "app:/digits")
    message = plan_pb2.ClientOnlyPlan.FromString(data)  # the download parses as ODP's message
    assert message.tflite_graph[4:8] == b"TFL3"
    section = README.read_text().split("## Compatibility with ODP clients", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `ClientOnlyPlan.")]
    assert len(rows) >= 12
    for row in rows:
        path = row[1].strip().split("`")[1].removeprefix("ClientOnlyPlan.")
        fedcompute = row[3].strip()
        present = _present(message, path)
        if fedcompute.startswith("empty"):
            assert not present, path
        elif fedcompute.startswith("set"):
            assert present, path
    assert message.phase.tensorflow_spec.example_selector.collection_uri == "app:/digits"
    specs = {s.name for s in message.phase.tensorflow_spec.input_tensor_specs}
    assert {"serialized_examples", "learning_rate", "trainable_0"} <= specs
