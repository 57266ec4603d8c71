"""Versioned task artifacts: client plan, evaluation plan and server phase (pure).

* ``client_only_plan`` / ``eval_plan``: a serialized ODP ``ClientOnlyPlan``
  (``fedcompute/proto/plan.proto``): ``tflite_graph`` is the client step's TFLite model,
  ``phase.tensorflow_spec`` its inputs and outputs, and the fedcompute extension field
  ``fedcompute_plan`` a zip archive with ``plan.json`` (a :class:`ClientPlan`) and
  ``saved_model/`` (the SavedFunctionalModel files). Everything a device needs, in one object,
  whichever runtime it trains with (:mod:`fedcompute.fleet.runtimes`).
* ``server_phase``: JSON (:class:`ServerPhase`): what the aggregator and task management
  need: algorithm, server optimizer, DP aggregator and parameters, goals, tensor specs.

Formats carry ``format_version``; readers refuse versions they do not know.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcompute.dp import DpParams
from fedcompute.errors import InvalidRequestError
from fedcompute.tensor_spec import TensorSpec

CLIENT_PLAN_VERSION = 1
SERVER_PHASE_VERSION = 1
MAX_PLAN_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ClientPlan:
    """What a device runs: training (kind TRAINING) or evaluation (kind EVALUATION)."""

    kind: str
    population_name: str
    input_type: int  # 1: (features, label); 2: (OrderedDict of features, label)
    example_spec: dict[str, Any]  # fedcompute.data.examples.ExampleSpec.to_json() output
    label_name: str
    weights: tuple[TensorSpec, ...]
    metrics: tuple[str, ...]
    learning_algo: str = "FED_AVG"
    client_optimizer: str = "SGD"
    client_learning_rate: float = 0.1
    batch_size: int = 3
    max_batches: int = 0  # 0 = no cap
    epochs: int = 1
    min_separation: int = 0
    format_version: int = CLIENT_PLAN_VERSION

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["weights"] = [w.to_dict(with_trainable=True) for w in self.weights]
        data["metrics"] = list(self.metrics)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientPlan:
        data = json.loads(text)
        _check_version("client plan", data.get("format_version"), CLIENT_PLAN_VERSION)
        data["weights"] = tuple(TensorSpec.from_dict(w) for w in data["weights"])
        data["metrics"] = tuple(data["metrics"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ServerPhase:
    """What the server does with a round's reports."""

    learning_algo: str
    server_optimizer: str
    server_learning_rate: float
    report_goal: int
    over_selection_rate: float
    total_rounds: int
    population_size: int
    target_epsilon: float
    delta: float
    dp: DpParams
    weights: tuple[TensorSpec, ...]
    metrics: tuple[str, ...]
    format_version: int = SERVER_PHASE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def update_spec(self) -> tuple[TensorSpec, ...]:
        """Tensors of a device update: the trainable weights."""
        return tuple(w for w in self.weights if w.trainable)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["weights"] = [w.to_dict(with_trainable=True) for w in self.weights]
        data["metrics"] = list(self.metrics)
        data["dp"] = self.dp.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ServerPhase:
        data = json.loads(text)
        _check_version("server phase", data.get("format_version"), SERVER_PHASE_VERSION)
        data["weights"] = tuple(TensorSpec.from_dict(w) for w in data["weights"])
        data["metrics"] = tuple(data["metrics"])
        data["dp"] = DpParams.from_dict(data["dp"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_version(what: str, found: Any, supported: int) -> None:
    if found != supported:
        raise InvalidRequestError(
            f"{what} format_version {found!r} is not supported (this server reads {supported})",
            hint="rebuild the task with this server's task builder",
        )


# tensorflow.DataType numbers (tensorflow/core/framework/types.proto) of the dtypes a step uses.
TF_DATA_TYPES = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6, "string": 7,
                 "int64": 9, "bool": 10, "float16": 19}
_TF_DTYPE_NAMES = {number: name for name, number in TF_DATA_TYPES.items()}
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TfliteStep:
    """The plan's TFLite model and the inputs/outputs its ``TensorflowSpec`` lists."""

    model: bytes = field(repr=False)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    flex_ops: tuple[str, ...] = ()
    sha256: bytes = b""  # of ``model`` as built; empty: computed from ``model``

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.model).digest())


@dataclass(frozen=True)
class UnpackedPlan:
    """A downloaded plan: its :class:`ClientPlan`, where ``saved_model/`` was extracted, and
    the TFLite step (None when the task builder could not convert the model)."""

    plan: ClientPlan
    directory: Path
    tflite: TfliteStep | None

    @property
    def saved_model_dir(self) -> Path:
        return self.directory / "saved_model"


def _spec_proto(spec: TensorSpec) -> Any:
    from fedcompute.proto import plan_pb2

    if spec.dtype not in TF_DATA_TYPES:
        raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} has no tensorflow.DataType here")
    shape = plan_pb2.TensorShape(dim=[plan_pb2.TensorShape.Dim(size=int(d)) for d in spec.shape])
    return plan_pb2.TensorSpec(name=spec.name, shape=shape, dtype=TF_DATA_TYPES[spec.dtype])


def _spec_from_proto(proto: Any) -> TensorSpec:
    dtype = _TF_DTYPE_NAMES.get(proto.dtype)
    if dtype is None:
        raise InvalidRequestError(f"plan tensor {proto.name!r} has an unknown tensorflow.DataType {proto.dtype}")
    return TensorSpec(proto.name, tuple(int(d.size) for d in proto.shape.dim), dtype)


def pack_plan(plan: ClientPlan, saved_model_dir: Path, tflite: TfliteStep | None = None,
              example_selector_uri: str = "") -> bytes:
    """The serialized ``ClientOnlyPlan`` (deterministic bytes): ``tflite_graph`` and
    ``phase.tensorflow_spec`` from ``tflite``, ``fedcompute_plan`` = zip of ``plan.json`` +
    the SavedModel directory."""
    from fedcompute.proto import plan_pb2

    message = plan_pb2.ClientOnlyPlan(fedcompute_plan=_zip_plan(plan, saved_model_dir))
    spec = message.phase.tensorflow_spec
    message.phase.federated_compute.SetInParent()
    if example_selector_uri:
        spec.example_selector.collection_uri = example_selector_uri
    if tflite is not None:
        message.tflite_graph = tflite.model
        spec.input_tensor_specs.extend(_spec_proto(s) for s in tflite.inputs)
        spec.output_tensor_specs.extend(_spec_proto(s) for s in tflite.outputs)
        message.flex_ops.extend(sorted(tflite.flex_ops))
        message.tflite_graph_sha256 = tflite.sha256
    return message.SerializeToString(deterministic=True)


def _zip_plan(plan: ClientPlan, saved_model_dir: Path) -> bytes:
    """Zip ``plan.json`` + the SavedModel directory deterministically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _write(archive, "plan.json", plan.to_json().encode())
        for root, _dirs, files in sorted(os.walk(saved_model_dir)):
            for filename in sorted(files):
                path = Path(root) / filename
                _write(archive, f"saved_model/{path.relative_to(saved_model_dir).as_posix()}", path.read_bytes())
    return buffer.getvalue()


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: reproducible bytes
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def unpack_plan(data: bytes, target_dir: Path) -> ClientPlan:
    """Extract a plan into ``target_dir`` (model under ``saved_model/``); its ClientPlan."""
    return unpack_client_plan(data, target_dir).plan


def unpack_client_plan(data: bytes, target_dir: Path) -> UnpackedPlan:
    """Parse a ``ClientOnlyPlan`` (or a bare plan zip, the format before ClientOnlyPlan) and
    extract its SavedModel into ``target_dir``."""
    from google.protobuf.message import DecodeError

    from fedcompute.proto import plan_pb2

    if bytes(data[:4]) == ZIP_MAGIC:
        return UnpackedPlan(_unzip_plan(data, target_dir), target_dir, None)
    if len(data) > MAX_PLAN_BYTES:
        raise InvalidRequestError(f"the plan is {len(data)} bytes, over {MAX_PLAN_BYTES}")
    message = plan_pb2.ClientOnlyPlan()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidRequestError("the plan is not a ClientOnlyPlan protobuf", hint="rebuild the task") from error
    if not message.fedcompute_plan:
        raise InvalidRequestError("the ClientOnlyPlan has no fedcompute_plan (field 100)",
                                  hint="build the task with fedcompute's task builder")
    plan = _unzip_plan(message.fedcompute_plan, target_dir)
    tflite = None
    if message.tflite_graph:
        spec = message.phase.tensorflow_spec
        tflite = TfliteStep(
            model=message.tflite_graph,
            inputs=tuple(_spec_from_proto(s) for s in spec.input_tensor_specs),
            outputs=tuple(_spec_from_proto(s) for s in spec.output_tensor_specs),
            flex_ops=tuple(message.flex_ops),
            sha256=message.tflite_graph_sha256,
        )
    return UnpackedPlan(plan, target_dir, tflite)


def _unzip_plan(data: bytes, target_dir: Path) -> ClientPlan:
    """Extract the plan zip (plan.json + SavedModel) into ``target_dir``.

    Through :func:`fedcompute.safe_extract.extract_zip`: the plan comes from storage a
    device does not control, but it is unpacked with the same containment check and limits
    as every other archive.
    """
    from fedcompute.safe_extract import ExtractLimits, extract_zip

    extract_zip(data, target_dir, what="the plan", limits=ExtractLimits(max_total_bytes=MAX_PLAN_BYTES))
    plan_file = target_dir / "plan.json"
    if not plan_file.is_file():
        raise InvalidRequestError("the plan archive has no plan.json", hint="rebuild the task")
    return ClientPlan.from_json(plan_file.read_text())
