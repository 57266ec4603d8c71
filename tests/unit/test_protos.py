"""The .proto schemas keep ODP's field names, numbers and enum values (wire compatibility),
and the committed generated code matches the .proto files."""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from fedcompute.proto import (
    common_pb2,
    eligibility_pb2,
    task_assignment_pb2,
    task_builder_pb2,
    task_config_pb2,
    task_management_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "shared" / "fedcompute" / "proto"


def numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def values(enum) -> dict[str, int]:
    return {v.name: v.number for v in enum.DESCRIPTOR.values}


@pytest.mark.parametrize(
    "message, expected",
    [
        (common_pb2.Resource, {"uri": 1, "inline_resource": 3, "client_cache_id": 4, "max_age": 5, "compression_format": 999}),
        (common_pb2.Resource.InlineResource, {"data": 1, "compression_format": 2}),
        (common_pb2.RejectionInfo, {"reason": 1001, "retry_window": 1002, "auth_metadata": 1003}),
        (common_pb2.RetryWindow, {"delay_min": 1, "delay_max": 2}),
        (common_pb2.ResourceCapabilities, {"supported_compression_formats": 1, "supports_confidential_aggregation": 2}),
        (eligibility_pb2.EligibilityPolicyEvalSpec, {"name": 1, "min_version": 2, "data_availability_policy": 3,
                                                     "swor_policy": 4, "tf_custom_policy": 5, "min_sep_policy": 6}),
        (eligibility_pb2.MinimumSeparationPolicy, {"current_index": 1, "minimum_separation": 2}),
        (eligibility_pb2.DataAvailabilityPolicy, {"selector": 1, "min_example_count": 2}),
        (task_assignment_pb2.TaskAssignment, {"population_name": 1, "task_id": 2, "aggregation_id": 3, "assignment_id": 4,
                                              "task_name": 5, "init_checkpoint": 6, "plan": 7, "self_uri": 8,
                                              "eligibility_task_info": 9, "eligibility_task_info_signature": 10}),
        (task_assignment_pb2.UploadInstruction, {"upload_location": 1, "extra_request_headers": 2, "compression_format": 3}),
        (task_management_pb2.TaskInfo, {"traffic_weight": 1, "training_info": 2, "evaluation_info": 3}),
        (task_management_pb2.EvaluationInfo, {"check_point_selector": 1, "training_population_name": 2, "training_task_id": 3}),
        (task_config_pb2.TaskConfig, {"mode": 1, "population_name": 2, "label_name": 3, "policies": 4,
                                      "federated_learning": 5, "differential_privacy": 6, "use_daf": 7}),
        (task_config_pb2.LearningProcess, {"type": 1, "client_optimizer": 2, "client_learning_rate": 3, "server_optimizer": 4,
                                           "server_learning_rate": 5, "runtime_config": 6, "metrics": 7, "artifact_building": 8}),
        (task_config_pb2.Evaluation, {"source_training_population": 1, "checkpoint_selector": 2, "evaluation_traffic": 3,
                                      "report_goal": 4, "over_selection_rate": 5, "example_selector_uri": 6,
                                      "artifact_building": 7, "source_training_task_id": 8}),
        (task_config_pb2.DifferentialPrivacy, {"type": 1, "noise_multiplier": 2, "clip_norm": 3, "init_clip_norm": 4,
                                               "target_unclipped_quantile": 100, "clip_learning_rate": 101,
                                               "clipped_count_stddev": 102, "noise_seed": 103}),
        (task_config_pb2.ModelReleaseManagementPolicy, {"dp_target_epsilon": 1, "dp_delta": 2, "num_max_training_rounds": 3,
                                                        "population_size": 100}),
        (task_builder_pb2.TaskReport, {"applied_algorithms": 1, "metric_results": 3, "dp_hyperparameters": 4,
                                        "privacy_assumptions": 100, "non_private_test_run": 101}),
        (task_builder_pb2.ExperimentFlags, {"skip_flex_ops_check": 1, "skip_dp_check": 2, "skip_dp_aggregator": 3,
                                            "non_private_test_run": 100}),
        (task_builder_pb2.TaskReport.DPHyperparameters, {"dp_delta": 1, "dp_epsilon": 2, "noise_multiplier": 3,
                                                         "dp_clip_norm": 4, "num_training_rounds": 5}),
        (task_builder_pb2.BuildTaskResponse, {"task_group": 1, "error_info": 2, "task_report": 3}),
    ],
)
def test_field_numbers_match_odp(message: type, expected: dict[str, int]) -> None:
    assert numbers(message) == expected


def test_task_numbers_and_fedcompute_extensions() -> None:
    fields = numbers(task_management_pb2.Task)
    assert [fields[n] for n in ("population_name", "task_id", "min_aggregation_size", "status", "info")] == [1, 2, 4, 6, 20]
    assert (fields["min_client_version"], fields["max_client_version"], fields["metrics_url"]) == (14, 15, 19)
    assert {n: fields[n] for n in ("status_reason", "current_round", "epsilon_spent", "population_size")} == {
        "status_reason": 100, "current_round": 101, "epsilon_spent": 102, "population_size": 103}


def test_enum_values_match_odp() -> None:
    assert values(common_pb2.RejectionReason.Enum) == {
        "UNKNOWN": 0, "NO_TASK_AVAILABLE": 1, "UNAUTHORIZED": 2, "UNAUTHENTICATED": 3,
        "CLIENT_VERSION_MISMATCH": 4, "NO_ACTIVE_TASK_EXISTS": 5}
    assert values(task_assignment_pb2.ReportResultRequest.Result) == {
        "UNKNOWN": 0, "COMPLETED": 1, "FAILED": 2, "NOT_ELIGIBLE": 3, "FAILED_EXAMPLE_GENERATION": 4,
        "FAILED_MODEL_COMPUTATION": 5, "FAILED_OPS_ERROR": 6}
    assert values(task_management_pb2.TaskStatus.Enum) == {
        "UNKNOWN": 0, "OPEN": 1, "COMPLETED": 2, "CREATED": 3, "CANCELED": 4, "FAILED": 5}
    assert values(task_config_pb2.TaskMode.Enum) == {"UNKNOWN": 0, "TRAINING_ONLY": 1, "TRAINING_AND_EVAL": 2, "EVAL_ONLY": 3}
    assert values(task_config_pb2.LearningAlgo.Enum) == {"UNKNOWN": 0, "FED_AVG": 1, "FED_SGD": 2}
    assert values(task_config_pb2.DpAggregator.Enum) == {
        "UNKNOWN": 0, "FIXED_GAUSSIAN": 1, "TREE_AGGREGATION": 2, "TREE": 2, "ADAPTIVE_GAUSSIAN": 3, "ADAPTIVE_TREE": 4}
    assert values(task_builder_pb2.ErrorType.Enum) == {
        "UNKNOWN": 0, "INVALID_REQUEST": 1, "TASK_MANAGEMENT_ERROR": 2, "ARTIFACT_BUILDING_ERROR": 3}
    # The canonical name of value 2 is ODP's.
    assert task_config_pb2.DpAggregator.Enum.Name(2) == "TREE_AGGREGATION"


def test_wire_bytes_of_a_task_assignment_are_stable() -> None:
    assignment = task_assignment_pb2.TaskAssignment(
        population_name="p", task_id="3", aggregation_id="7", assignment_id="a",
        plan=common_pb2.Resource(uri="http://x/plan"),
    )
    assignment.eligibility_task_info.eligibility_policies.add(
        name="min_sep", min_sep_policy=eligibility_pb2.MinimumSeparationPolicy(current_index=7, minimum_separation=2))
    data = assignment.SerializeToString(deterministic=True)
    # Field 1 (population_name): tag 0x0a, length 1, "p".
    assert data.startswith(b"\x0a\x01p\x12\x013\x1a\x017")
    assert task_assignment_pb2.TaskAssignment.FromString(data) == assignment
    response = task_assignment_pb2.CreateTaskAssignmentResponse(
        rejection_info=common_pb2.RejectionInfo(reason=common_pb2.RejectionReason.NO_TASK_AVAILABLE))
    # RejectionInfo.reason = 1001 (varint): tag (1001 << 3) = 8008 -> b"\xc8\x3e".
    assert response.rejection_info.SerializeToString() == b"\xc8\x3e\x01"
    assert json_format.MessageToDict(response) == {"rejectionInfo": {"reason": "NO_TASK_AVAILABLE"}}


def test_optional_fields_track_presence() -> None:
    dp = task_config_pb2.DifferentialPrivacy()
    assert not dp.HasField("noise_multiplier")
    dp.noise_multiplier = 0.0
    assert dp.HasField("noise_multiplier")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "fedcompute" / "proto").mkdir(parents=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    for proto in protos:
        shutil.copy(proto, shared / "fedcompute" / "proto" / proto.name)
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(shared), f"--python_out={shared}", f"--pyi_out={shared}",
         *[str(shared / "fedcompute" / "proto" / p.name) for p in protos]],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi"):
            name = proto.stem + suffix
            assert filecmp.cmp(shared / "fedcompute" / "proto" / name, PROTO_DIR / name, shallow=False), (
                f"{name} is stale: run `make proto`")
