"""Versioned task artifacts: client plan, evaluation plan and server phase (pure).

* ``client_only_plan`` / ``eval_plan``: a zip archive with ``plan.json`` (a
  :class:`ClientPlan`) and ``saved_model/`` (the SavedFunctionalModel files), plus the
  TFLite models the flex-ops check produced. Everything a device needs, in one object.
* ``server_phase``: JSON (:class:`ServerPhase`): what the aggregator and task management
  need: algorithm, server optimizer, DP aggregator and parameters, goals, tensor specs.

Formats carry ``format_version``; readers refuse versions they do not know.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcompute.dp import DpParams
from fedcompute.errors import InvalidRequestError

CLIENT_PLAN_VERSION = 1
SERVER_PHASE_VERSION = 1
MAX_PLAN_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "trainable": self.trainable}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightSpec:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"], bool(d.get("trainable", True)))


@dataclass(frozen=True)
class ClientPlan:
    """What a device runs: training (kind TRAINING) or evaluation (kind EVALUATION)."""

    kind: str
    population_name: str
    input_type: int  # 1: (features, label); 2: (OrderedDict of features, label)
    example_spec: dict[str, Any]  # fedcompute.data.examples.ExampleSpec.to_json() output
    label_name: str
    weights: tuple[WeightSpec, ...]
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
        data["weights"] = [w.to_dict() for w in self.weights]
        data["metrics"] = list(self.metrics)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientPlan:
        data = json.loads(text)
        _check_version("client plan", data.get("format_version"), CLIENT_PLAN_VERSION)
        data["weights"] = tuple(WeightSpec.from_dict(w) for w in data["weights"])
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
    weights: tuple[WeightSpec, ...]
    metrics: tuple[str, ...]
    format_version: int = SERVER_PHASE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def update_spec(self) -> tuple[WeightSpec, ...]:
        """Tensors of a device update: the trainable weights."""
        return tuple(w for w in self.weights if w.trainable)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["weights"] = [w.to_dict() for w in self.weights]
        data["metrics"] = list(self.metrics)
        data["dp"] = self.dp.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ServerPhase:
        data = json.loads(text)
        _check_version("server phase", data.get("format_version"), SERVER_PHASE_VERSION)
        data["weights"] = tuple(WeightSpec.from_dict(w) for w in data["weights"])
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


def pack_plan(plan: ClientPlan, saved_model_dir: Path, extra_files: dict[str, bytes] | None = None) -> bytes:
    """Zip ``plan.json`` + the SavedModel directory (+ extra files) deterministically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _write(archive, "plan.json", plan.to_json().encode())
        for root, _dirs, files in sorted(os.walk(saved_model_dir)):
            for filename in sorted(files):
                path = Path(root) / filename
                _write(archive, f"saved_model/{path.relative_to(saved_model_dir).as_posix()}", path.read_bytes())
        for name, data in sorted((extra_files or {}).items()):
            _write(archive, name, data)
    return buffer.getvalue()


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: reproducible bytes
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def unpack_plan(data: bytes, target_dir: Path) -> ClientPlan:
    """Extract a plan archive into ``target_dir`` (model under ``saved_model/``).

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
