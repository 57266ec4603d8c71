"""Artifact formats (client plan = ODP ClientOnlyPlan, server phase JSON) and the ODP storage layout."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from fedcompute import layout
from fedcompute.dp import DpParams
from fedcompute.errors import InvalidRequestError
from fedcompute.plans import (
    ClientPlan,
    ServerPhase,
    TfliteStep,
    pack_plan,
    unpack_client_plan,
    unpack_plan,
)
from fedcompute.proto import plan_pb2
from fedcompute.tensor_spec import TensorSpec


def _plan() -> ClientPlan:
    return ClientPlan(kind="TRAINING", population_name="p", input_type=1,
                      example_spec={"input_type": 1}, label_name="y",
                      weights=(TensorSpec("trainable/0", (3, 2), "float32"),), metrics=("accuracy",), batch_size=7)


def test_layout_paths_follow_odp():
    assert layout.client_plan_path("pop", 3) == "pop/3/0/s/0/client_only_plan"
    assert layout.server_phase_path("pop", 3) == "pop/3/0/s/0/server_phase"
    assert layout.checkpoint_path("pop", 3, 5) == "pop/3/5/s/0/checkpoint"
    assert layout.client_checkpoint_path("pop", 3, 5) == "pop/3/5/d/0/client_checkpoint"
    assert layout.metrics_path("pop", 3, 5) == "pop/3/5/s/0/metrics"
    assert layout.gradient_path("pop", 3, 5, "a-b") == "pop/3/5/d/a-b/gradient"


@pytest.mark.parametrize("name", ["pop/3/5/d/a-b/gradient", "my_new_population/12/1/d/0f0e-11/gradient"])
def test_gradient_paths_parse(name):
    parsed = layout.parse_gradient_path(name)
    assert parsed is not None and layout.gradient_path(parsed.population, parsed.task_id, parsed.round_number,
                                                       parsed.assignment_id) == name


@pytest.mark.parametrize("name", ["pop/3/5/d/a/b/gradient", "pop/x/5/d/a/gradient", "pop/3/5/s/0/checkpoint",
                                  "../3/5/d/a/gradient", "pop/3/5/d/a/gradient/extra", ""])
def test_foreign_paths_do_not_parse(name):
    assert layout.parse_gradient_path(name) is None


def _step() -> TfliteStep:
    return TfliteStep(b"TFL3-model", inputs=(TensorSpec("serialized_examples", (-1,), "string"),
                                            TensorSpec("trainable_0", (3, 2), "float32")),
                      outputs=(TensorSpec("loss", (), "float32"),), flex_ops=("ParseExampleV2",))


def test_plan_round_trip_is_deterministic(tmp_path: Path):
    model = tmp_path / "model"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"pb")
    (model / "variables" / "v.index").write_bytes(b"idx")
    first = pack_plan(_plan(), model, _step(), "app:/train")
    assert first == pack_plan(_plan(), model, _step(), "app:/train")
    unpacked = unpack_client_plan(first, tmp_path / "out")
    assert unpacked.plan == _plan() == unpack_plan(first, tmp_path / "again")
    assert unpacked.tflite == _step()
    assert (tmp_path / "out" / "saved_model" / "variables" / "v.index").read_bytes() == b"idx"
    assert unpack_client_plan(pack_plan(_plan(), model), tmp_path / "none").tflite is None


def test_plan_is_an_odp_client_only_plan(tmp_path: Path):
    (tmp_path / "model").mkdir()
    message = plan_pb2.ClientOnlyPlan.FromString(pack_plan(_plan(), tmp_path / "model", _step(), "app:/train"))
    assert message.tflite_graph == b"TFL3-model" and message.graph == b""
    spec = message.phase.tensorflow_spec
    assert [(s.name, [d.size for d in s.shape.dim], s.dtype) for s in spec.input_tensor_specs] == [
        ("serialized_examples", [-1], 7), ("trainable_0", [3, 2], 1)]  # DT_STRING, DT_FLOAT
    assert [s.name for s in spec.output_tensor_specs] == ["loss"]
    assert spec.example_selector.collection_uri == "app:/train"
    assert message.phase.WhichOneof("io_router") == "federated_compute"
    assert list(message.flex_ops) == ["ParseExampleV2"]
    assert zipfile.ZipFile(io.BytesIO(message.fedcompute_plan)).namelist() == ["plan.json"]


def test_plan_rejects_unknown_version_non_plans_and_escaping_entries(tmp_path: Path):
    with pytest.raises(InvalidRequestError, match="not a ClientOnlyPlan"):
        unpack_plan(b"\xff\xff", tmp_path)
    with pytest.raises(InvalidRequestError, match="no fedcompute_plan"):
        unpack_plan(plan_pb2.ClientOnlyPlan(tflite_graph=b"x").SerializeToString(), tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("plan.json", _plan().to_json())
        archive.writestr("../escape.txt", b"x")
    with pytest.raises(InvalidRequestError, match="contains '..'"):
        unpack_plan(buffer.getvalue(), tmp_path / "t")
    wrapped = plan_pb2.ClientOnlyPlan(fedcompute_plan=buffer.getvalue()).SerializeToString()
    with pytest.raises(InvalidRequestError, match="contains '..'"):  # the same containment check
        unpack_plan(wrapped, tmp_path / "u")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(InvalidRequestError, match="format_version 7"):
        ClientPlan.from_json(_plan().to_json().replace('"format_version": 1', '"format_version": 7'))


def test_server_phase_round_trip_and_update_spec():
    phase = ServerPhase(learning_algo="FED_AVG", server_optimizer="ADAM", server_learning_rate=0.01, report_goal=10,
                        over_selection_rate=0.3, total_rounds=3, population_size=1000, target_epsilon=5.0,
                        delta=1e-3, dp=DpParams("FIXED_GAUSSIAN", 1.1, 0.5, noise_seed=3),
                        weights=(TensorSpec("trainable/0", (2,), "float32"),
                                 TensorSpec("non_trainable/0", (2,), "float32", trainable=False)),
                        metrics=("auc-roc",), extra={"enforce_privacy_budget": False})
    again = ServerPhase.from_json(phase.to_json())
    assert again == phase
    assert [w.name for w in again.update_spec] == ["trainable/0"]


def test_impossible_adaptive_noise_split_is_refused_when_building_artifacts():
    import numpy as np

    from fedcompute.errors import ConfigError
    from fedcompute.taskbuilder.artifacts import artifacts_from_weights, weight_specs

    weights = [np.zeros((2, 2), np.float32)]

    def phase(goal: int) -> ServerPhase:
        return ServerPhase(learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=1.0,
                           report_goal=goal, over_selection_rate=0.3, total_rounds=3, population_size=10_000,
                           target_epsilon=10.0, delta=1e-4, dp=DpParams("ADAPTIVE_GAUSSIAN", 1.5, 1.0, 1.0),
                           weights=weight_specs(weights), metrics=())

    with pytest.raises(ConfigError, match="report goal of at least 16"):
        artifacts_from_weights(phase(10), weights)
    assert artifacts_from_weights(phase(16), weights).checkpoint
