"""The task builder: config + SavedFunctionalModel -> checks, artifacts, task pair.

``build_task_group`` runs the whole pipeline of the seed's steps 2-5: validate the
config, load and check the model, split metrics into accepted/rejected, the DP check
(dp_accounting), the flex-ops check (TFLite), build the client plan, evaluation plan,
server phase and initial checkpoints, then create the training and/or evaluation task
through task management, upload the artifacts at the ODP paths and open the tasks. A
failure at any step leaves no task and no artifact behind.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedcompute.config import ValidatedConfig, validate_task_config
from fedcompute.dp import NO_DP
from fedcompute.errors import ArtifactBuildError, ConflictError, FedComputeError, InvalidRequestError
from fedcompute.learning.contribution_bounds import max_examples_per_device
from fedcompute.plans import ClientPlan, ServerPhase, TfliteStep, pack_plan
from fedcompute.ports import BlobStore
from fedcompute.proto import common_pb2, eligibility_pb2, task_builder_pb2, task_management_pb2
from fedcompute.safe_extract import ExtractLimits, download_prefix, extract_zip
from fedcompute.settings import Settings
from fedcompute.taskbuilder.artifacts import (
    TaskArtifacts,
    artifacts_from_weights,
    publish_artifacts,
    weight_specs,
    write_new_artifact,
)

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 1024 * 1024 * 1024
MAX_MODEL_FILES = 10_000
TRAFFIC_SCALE = 1000

ErrorType = task_builder_pb2.ErrorType


class TaskManagementError(FedComputeError):
    """Task management refused or failed to create/open a task."""

    http_status = 409


@dataclass(frozen=True)
class BuildFlags:
    skip_flex_ops_check: bool = False
    skip_dp_check: bool = False
    skip_dp_aggregator: bool = False
    non_private_test_run: bool = False  # the only way a config may fix noise_seed


class TaskManagementPort(Protocol):
    """What the builder needs from task management (HTTP client or in-process)."""

    def create_task(self, population: str, task: task_management_pb2.Task) -> task_management_pb2.Task: ...
    def open_task(self, population: str, task_id: int) -> task_management_pb2.Task: ...
    def delete_task(self, population: str, task_id: int) -> None: ...
    def get_task(self, population: str, task_id: int) -> task_management_pb2.Task: ...
    def cancel_task(self, population: str, task_id: int, reason: str = "") -> task_management_pb2.Task: ...


@dataclass
class BuildOutcome:
    """The response plus where things went (for logs and the CLI)."""

    response: task_builder_pb2.BuildTaskResponse
    artifact_uris: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- model input


MODEL_LIMITS = ExtractLimits(max_total_bytes=MAX_MODEL_BYTES, max_entries=MAX_MODEL_FILES)


def fetch_saved_model(resource: common_pb2.Resource, blobs: BlobStore, target: Path) -> Path:
    """Materialize the request's saved model (gs:// directory or zip, or inline zip) in ``target``.

    Every archive entry and object name goes through :mod:`fedcompute.safe_extract`.
    """
    kind = resource.WhichOneof("resource")
    if kind == "inline_resource":
        extract_zip(resource.inline_resource.data, target, what="inline saved_model", limits=MODEL_LIMITS)
        return _model_root(target)
    if kind != "uri" or not resource.uri:
        raise InvalidRequestError("saved_model is missing", hint="pass --saved_model=DIR|ZIP|gs://bucket/path")
    uri = resource.uri
    if not uri.startswith("gs://"):
        raise InvalidRequestError(f"saved_model URI {uri!r} is not a gs:// URI",
                                  hint="task_builder_client uploads local models to the model bucket for you")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket or not prefix:
        raise InvalidRequestError(f"saved_model URI {uri!r} needs gs://BUCKET/PATH")
    if prefix.endswith(".zip"):
        extract_zip(blobs.read(bucket, prefix), target, what=uri, limits=MODEL_LIMITS)
        return _model_root(target)
    written = download_prefix(lambda p: blobs.list(bucket, p), lambda name: blobs.read(bucket, name), prefix,
                              target, what=uri, limits=MODEL_LIMITS)
    if not written:
        raise ArtifactBuildError(f"saved_model {uri} is empty or does not exist",
                                 hint="save it with tff.learning.models.save_functional_model and upload the directory")
    return _model_root(target)


def _model_root(target: Path) -> Path:
    """The directory holding saved_model.pb (the archive may wrap it in one folder)."""
    if (target / "saved_model.pb").exists():
        return target
    found = sorted(p.parent for p in target.rglob("saved_model.pb"))
    if not found:
        raise ArtifactBuildError("no saved_model.pb in the uploaded saved_model",
                                 hint="save it with tff.learning.models.save_functional_model")
    return found[0]


# ----------------------------------------------------------------------------- the build


def build_task_group(
    request: task_builder_pb2.BuildTaskRequest,
    *,
    blobs: BlobStore,
    settings: Settings,
    task_management: TaskManagementPort | None,
    artifacts_only: bool,
    work_dir: Path | None = None,
    now: Callable[[], float] = time.time,
) -> BuildOutcome:
    """Run the build; domain errors come back as ``error_info`` (nothing created)."""
    timings: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fedcompute-build-", dir=work_dir) as tmp:
            # Traversable (not listable) by the model sandbox's unprivileged user: it reads
            # the model and writes its job directory below; nothing else is in here.
            os.chmod(tmp, 0o711)
            return _build(request, blobs=blobs, settings=settings, task_management=task_management,
                          artifacts_only=artifacts_only, tmp=Path(tmp), timings=timings)
    except FedComputeError as error:
        error_type = (ErrorType.TASK_MANAGEMENT_ERROR if isinstance(error, TaskManagementError)
                      else ErrorType.INVALID_REQUEST if isinstance(error, InvalidRequestError)
                      else ErrorType.ARTIFACT_BUILDING_ERROR)
        log.warning("build failed: %s", error)
        response = task_builder_pb2.BuildTaskResponse(
            error_info=task_builder_pb2.ErrorInfo(error_type=error_type, error_message=str(error)))
        report = getattr(error, "task_report", None)
        if report is not None:
            response.task_report.CopyFrom(report)
        return BuildOutcome(response, timings=timings)


def _timed(timings: dict[str, float], name: str):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 3)

    return _Timer()


def _build(request, *, blobs, settings, task_management, artifacts_only, tmp, timings) -> BuildOutcome:
    from fedcompute.data.examples import ExampleSpec
    from fedcompute.privacy import accounting, disclosure
    from fedcompute.taskbuilder import sandbox

    flags = BuildFlags(request.flags.skip_flex_ops_check, request.flags.skip_dp_check,
                       request.flags.skip_dp_aggregator, request.flags.non_private_test_run)
    validated = validate_task_config(request.task_config)
    spec = validated.spec
    report = _report_skeleton(validated)
    report.non_private_test_run = flags.non_private_test_run
    if spec.dp is not None:
        # Before any work: a fixed noise seed is public noise (no privacy) unless declared a test run.
        disclosure.check_noise_seed(spec.dp.noise_seed, non_private_test_run=flags.non_private_test_run)

    with _timed(timings, "model_check"):
        model_dir = fetch_saved_model(request.saved_model, blobs, tmp / "model")
        # Everything that runs the model's ops (load, sample batch, TFLite conversion,
        # initial weights) happens in a sandboxed child process, after the op allow-list walk.
        # The raw config's label_name: normalization fills in "y", which would let a type-2
        # model without label_name build and then find no label in device examples.
        facts = sandbox.inspect_model(sandbox.ModelJob(
            model_dir=str(model_dir), label_name=request.task_config.label_name or None,
            flex_ops_check=not flags.skip_flex_ops_check, client_optimizer=spec.client_optimizer,
            learning_algo=spec.learning_algo), tmp / "sandbox")
    example_spec = ExampleSpec.from_dict(facts.input_spec)

    dp_result = None
    dp = spec.dp
    if spec.has_training and dp is not None and not flags.skip_dp_aggregator:
        with _timed(timings, "dp_check"):
            dp_result = accounting.check_dp(
                dp.aggregator, noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm,
                report_goal=spec.report_goal, rounds=spec.num_rounds, target_epsilon=spec.target_epsilon,
                delta=spec.delta, population_size=spec.population_size, raise_on_failure=False,
                # With --skip_dp_check the failure is not reported: skip the (slow) search
                # for the noise multiplier that would pass.
                explain_failure=not flags.skip_dp_check,
            )
        _fill_dp_report(report, dp_result)
        report.privacy_assumptions = disclosure.privacy_assumptions(
            dp_result.mechanism.value, report_goal=spec.report_goal, population_size=dp_result.population_size,
            over_selection_rate=spec.over_selection_rate)
        if not dp_result.passed and not flags.skip_dp_check:
            error = accounting.DpBudgetExceededError(dp_result)
            error.task_report = report  # type: ignore[attr-defined]
            raise error

    training_min_version = eval_min_version = "0"
    extra: dict[str, bytes] = {}
    steps: dict[str, TfliteStep | None] = {"TRAINING": None, "EVALUATION": None}
    if facts.flex is not None:
        training_min_version = facts.flex.training_min_client_version
        eval_min_version = facts.flex.eval_min_client_version
        extra = {"client_training.tflite": facts.flex.training_tflite, "client_eval.tflite": facts.flex.eval_tflite}
        steps = {kind: facts.flex.plan_step(kind) for kind in steps}
    else:  # only with --skip_flex_ops_check: the sandbox reports a conversion failure as no TFLite
        log.warning("no TFLite client steps in the plan (devices will train with TensorFlow): "
                    "the model did not convert to TFLite")

    with _timed(timings, "artifacts"):
        weights = list(facts.trainable) + list(facts.non_trainable)
        specs = weight_specs(list(facts.trainable), list(facts.non_trainable))
        accepted = tuple(report.metric_results.accepted_metrics.split(", ")) if \
            report.metric_results.accepted_metrics else ()
        noise = dp_result.noise_multiplier if dp_result is not None else 0.0
        training_artifacts = eval_artifacts = None
        if spec.has_training:
            plan = _client_plan(spec, "TRAINING", facts.input_type, example_spec, specs, accepted)
            phase = _server_phase(spec, specs, accepted, dp, noise, flags, spec.report_goal,
                                  spec.over_selection_rate)
            training_artifacts = artifacts_from_weights(
                phase, weights, client_plan=pack_plan(plan, model_dir, steps["TRAINING"], spec.example_selector_uri),
                extra=extra)
        if spec.has_evaluation:
            ev = spec.evaluation
            assert ev is not None
            plan = _client_plan(spec, "EVALUATION", facts.input_type, example_spec, specs, accepted)
            phase = _server_phase(spec, specs, accepted, None, 0.0, flags, ev.report_goal, ev.over_selection_rate)
            eval_artifacts = artifacts_from_weights(
                phase, weights, eval_plan=pack_plan(plan, model_dir, steps["EVALUATION"], ev.example_selector_uri))

    group = task_builder_pb2.TaskGroup()
    outcome = BuildOutcome(task_builder_pb2.BuildTaskResponse(task_report=report), timings=timings)
    if artifacts_only:
        with _timed(timings, "upload"):
            build_id = uuid.uuid4().hex[:12]
            for kind, artifacts in (("training", training_artifacts), ("eval", eval_artifacts)):
                if artifacts is None:
                    continue
                prefix = f"artifacts/{spec.population_name}/{build_id}/{kind}"
                for name, data in artifacts.objects(spec.population_name, 0).items():
                    object_name = f"{prefix}/{name.split('/0/', 1)[1]}"
                    write_new_artifact(blobs, settings.model_bucket, object_name, data)
                    outcome.artifact_uris.append(f"gs://{settings.model_bucket}/{object_name}")
        if training_artifacts is not None:
            group.training_task.CopyFrom(task_management_pb2.Task(min_client_version=training_min_version))
        if eval_artifacts is not None:
            group.eval_task.CopyFrom(task_management_pb2.Task(min_client_version=eval_min_version))
        outcome.response.task_group.CopyFrom(group)
        return outcome

    if task_management is None:
        raise TaskManagementError("task management is not configured",
                                  hint="set FEDCOMPUTE_TASK_MANAGEMENT_URL, or use --build_artifact_only")
    created: list[int] = []
    try:
        with _timed(timings, "create_tasks"):
            training_task = eval_task = None
            traffic = spec.evaluation.traffic if spec.evaluation is not None else 0.0
            if training_artifacts is not None:
                training_task = _create(task_management, spec.population_name, _training_task_proto(
                    spec, training_min_version, traffic))
                created.append(training_task.task_id)
                outcome.artifact_uris += _publish(blobs, settings, spec.population_name, training_task.task_id,
                                                  training_artifacts)
            if eval_artifacts is not None:
                ev = spec.evaluation
                assert ev is not None  # eval artifacts exist only for a config with an evaluation block
                source_population = ev.source_training_population or spec.population_name
                source_id = training_task.task_id if training_task is not None else ev.source_training_task_id
                if training_task is None:
                    _check_eval_source(task_management, source_population, source_id)
                eval_task = _create(task_management, spec.population_name, _eval_task_proto(
                    spec, eval_min_version, source_population, source_id))
                created.append(eval_task.task_id)
                outcome.artifact_uris += _publish(blobs, settings, spec.population_name, eval_task.task_id,
                                                  eval_artifacts)
            for task_id in created:
                opened = _open(task_management, spec.population_name, task_id)
                if training_task is not None and task_id == training_task.task_id:
                    training_task = opened
                else:
                    eval_task = opened
    except Exception as error:
        for task_id in reversed(created):
            _roll_back(task_management, spec.population_name, task_id, error)
        raise
    if training_task is not None:
        group.training_task.CopyFrom(training_task)
    if eval_task is not None:
        group.eval_task.CopyFrom(eval_task)
    outcome.response.task_group.CopyFrom(group)
    return outcome


def _roll_back(tm: TaskManagementPort, population: str, task_id: int, cause: BaseException) -> None:
    """Delete a task this build created; cancel it if it was already opened.

    Task management only deletes CREATED tasks, so when the second task's open fails the
    first one is OPEN: cancel it so no device is ever assigned to half a task group.
    Cleanup errors are logged, never raised: the build's own error is the one to report.
    """
    try:
        tm.delete_task(population, task_id)
        return
    except ConflictError:
        pass
    except FedComputeError as cleanup_error:
        log.error("rollback of task %s/%s failed: %s", population, task_id, cleanup_error)
        return
    try:
        tm.cancel_task(population, task_id, f"task build failed: {cause}")
        log.warning("rollback: task %s/%s was already open; canceled it", population, task_id)
    except FedComputeError as cleanup_error:
        log.error("rollback of open task %s/%s failed: %s", population, task_id, cleanup_error)


def _create(tm: TaskManagementPort, population: str, task: task_management_pb2.Task) -> task_management_pb2.Task:
    try:
        return tm.create_task(population, task)
    except FedComputeError as error:
        raise TaskManagementError(error.message, hint=error.hint) from error  # message: no hint twice


def _open(tm: TaskManagementPort, population: str, task_id: int) -> task_management_pb2.Task:
    try:
        return tm.open_task(population, task_id)
    except FedComputeError as error:
        raise TaskManagementError(error.message, hint=error.hint) from error


def _publish(blobs, settings, population, task_id, artifacts: TaskArtifacts) -> list[str]:
    return [f"gs://{settings.model_bucket}/{n}" for n in publish_artifacts(blobs, settings, population, task_id,
                                                                           artifacts)]


def _check_eval_source(tm: TaskManagementPort, population: str, task_id: int) -> None:
    if task_id <= 0:
        raise InvalidRequestError("EVAL_ONLY needs evaluation.source_training_task_id",
                                  hint="set it to the training task id to evaluate")
    try:
        tm.get_task(population, task_id)
    except FedComputeError as error:
        raise TaskManagementError(f"evaluation source task {population}/{task_id}: {error}",
                                  hint="set evaluation.source_training_task_id to an existing training task") from error


def _report_skeleton(validated: ValidatedConfig) -> task_builder_pb2.TaskReport:
    config = validated.config
    lp = config.federated_learning.learning_process
    report = task_builder_pb2.TaskReport()
    report.applied_algorithms.learning_algo = lp.type
    report.applied_algorithms.client_optimizer = lp.client_optimizer
    report.applied_algorithms.server_optimizer = lp.server_optimizer
    report.applied_algorithms.dp_aggregator = config.differential_privacy.type
    spec = validated.spec
    report.metric_results.accepted_metrics = ", ".join(spec.accepted_metrics)
    report.metric_results.rejected_metrics = ", ".join(spec.rejected_metrics)
    report.dp_hyperparameters.num_training_rounds = spec.num_rounds
    report.dp_hyperparameters.dp_delta = spec.delta
    if spec.dp is not None:
        report.dp_hyperparameters.dp_clip_norm = spec.dp.clip_norm
        if spec.dp.noise_multiplier is not None:
            report.dp_hyperparameters.noise_multiplier = spec.dp.noise_multiplier
    return report


def _fill_dp_report(report: task_builder_pb2.TaskReport, result: Any) -> None:
    hp = report.dp_hyperparameters
    hp.dp_delta = result.delta
    hp.dp_epsilon = result.epsilon if np.isfinite(result.epsilon) else float("inf")
    hp.noise_multiplier = result.noise_multiplier
    if result.clip_norm is not None:
        hp.dp_clip_norm = result.clip_norm
    hp.num_training_rounds = result.rounds


def _client_plan(spec, kind, input_type, example_spec, specs, metrics) -> ClientPlan:
    return ClientPlan(
        kind=kind, population_name=spec.population_name, input_type=input_type,
        example_spec=example_spec.to_dict(), label_name=example_spec.label_name, weights=specs, metrics=metrics,
        learning_algo=spec.learning_algo, client_optimizer=spec.client_optimizer,
        client_learning_rate=spec.client_learning_rate, batch_size=spec.batch_size,
        max_batches=spec.max_training_batches_per_client, epochs=spec.num_epochs,
        min_separation=spec.min_separation,
    )


def _server_phase(spec, specs, metrics, dp, noise, flags, report_goal, over_selection) -> ServerPhase:
    params = NO_DP if dp is None or flags.skip_dp_aggregator else dp.params(noise)
    return ServerPhase(
        learning_algo=spec.learning_algo, server_optimizer=spec.server_optimizer,
        server_learning_rate=spec.server_learning_rate, report_goal=report_goal, over_selection_rate=over_selection,
        total_rounds=spec.num_rounds, population_size=spec.population_size, target_epsilon=spec.target_epsilon,
        delta=spec.delta, dp=params, weights=specs, metrics=metrics,
        # --skip_dp_check opts out of the budget at build time; the ledger then records
        # epsilon after every round but does not stop the task on it.
        extra={"enforce_privacy_budget": not flags.skip_dp_check,
               # Ingestion refuses uploads claiming more examples than a device can train on.
               "max_device_examples": max_examples_per_device(spec.batch_size, spec.max_training_batches_per_client,
                                                              spec.num_epochs, spec.learning_algo)},
    )


def _training_task_proto(spec, min_version: str, eval_traffic: float) -> task_management_pb2.Task:
    task = task_management_pb2.Task(
        population_name=spec.population_name, total_iteration=spec.num_rounds,
        min_aggregation_size=spec.report_goal, max_aggregation_size=spec.max_aggregation_size,
        min_client_version=min_version, max_client_version="999999999",
    )
    task.info.traffic_weight = int(round(TRAFFIC_SCALE * (1.0 - eval_traffic)))
    policy = task.info.training_info.eligibility_task_info.eligibility_policies.add(name="min_separation_policy")
    policy.min_sep_policy.CopyFrom(eligibility_pb2.MinimumSeparationPolicy(minimum_separation=spec.min_separation))
    return task


def _eval_task_proto(spec, min_version: str, source_population: str, source_id: int) -> task_management_pb2.Task:
    ev = spec.evaluation
    task = task_management_pb2.Task(
        population_name=spec.population_name, total_iteration=max(spec.num_rounds, 1),
        min_aggregation_size=ev.report_goal, max_aggregation_size=ev.max_aggregation_size,
        min_client_version=min_version, max_client_version="999999999",
    )
    task.info.traffic_weight = int(round(TRAFFIC_SCALE * ev.traffic))
    info = task.info.evaluation_info
    info.training_population_name = source_population
    info.training_task_id = source_id
    if ev.checkpoint_selector.kind == "hour":
        info.check_point_selector.duration_selector.hours = ev.checkpoint_selector.k
    else:
        info.check_point_selector.iteration_selector.size = ev.checkpoint_selector.k
    return task


def report_to_text(response: task_builder_pb2.BuildTaskResponse) -> tuple[str, str]:
    """The seed's two log blocks: the TaskReport, then training_task/eval_task min versions."""
    from google.protobuf import text_format

    report = text_format.MessageToString(response.task_report)
    group = task_builder_pb2.TaskGroup()
    if response.task_group.HasField("training_task"):
        group.training_task.min_client_version = response.task_group.training_task.min_client_version or "0"
    if response.task_group.HasField("eval_task"):
        group.eval_task.min_client_version = response.task_group.eval_task.min_client_version or "0"
    return report, text_format.MessageToString(group)


class InProcessTaskManagement(TaskManagementPort):
    """Task management called directly on the store (when no task management URL is set)."""

    def __init__(self, store: Any, blobs: BlobStore, settings: Settings) -> None:
        self._store, self._blobs, self._settings = store, blobs, settings

    def create_task(self, population, task):
        from fedcompute.services import task_management as tm

        return tm.task_to_proto(tm.create_task(self._store, tm.new_task_from_proto(population, task)))

    def open_task(self, population, task_id):
        from fedcompute.services import task_management as tm

        return tm.task_to_proto(tm.open_task(self._store, self._blobs, self._settings, population, task_id))

    def delete_task(self, population, task_id):
        from fedcompute.services import task_management as tm

        tm.delete_unopened_task(self._store, self._blobs, self._settings, population, task_id)

    def get_task(self, population, task_id):
        from fedcompute.services import task_management as tm

        return tm.task_to_proto(tm.get_task(self._store, population, task_id))

    def cancel_task(self, population, task_id, reason=""):
        from fedcompute.services import task_management as tm

        return tm.task_to_proto(tm.cancel_task(self._store, population, task_id, reason))


def http_status_for_response(response: task_builder_pb2.BuildTaskResponse) -> int:
    """200 on success; 400 for invalid requests and artifact errors, 409 for task management refusals."""
    if response.WhichOneof("result") != "error_info":
        return 200
    return 409 if response.error_info.error_type == ErrorType.TASK_MANAGEMENT_ERROR else 400
