"""Run everything that executes an uploaded model in a child process that holds nothing.

The task builder must load the developer's SavedModel, run it on a sample batch, convert
it to TFLite and read its initial weights. :func:`inspect_model` does all of that in a
child process (``python -m fedcompute.taskbuilder.sandbox JOB_DIR``):

* the op allow-list walk (:mod:`fedcompute.taskbuilder.op_allowlist`) runs first, in the
  child, before TensorFlow loads the model;
* the child's environment is built from an allow-list (:func:`sandbox_environment`): no
  API key, no ``GOOGLE_*`` credentials, no emulator hosts, no proxy settings; ``HOME`` and
  ``TMPDIR`` point into its own job directory, which is also its working directory;
* CPU time and address space are capped with ``setrlimit`` and the wall clock with a
  timeout; ``PR_SET_NO_NEW_PRIVS`` is set;
* when the builder runs as root, the child confines itself after importing TensorFlow and
  before it opens the model (:func:`confine`): it moves into a network namespace of its own
  (no interface but a down loopback: no socket reaches anything) and drops to an
  unprivileged user (``nobody``, or ``FEDCOMPUTE_SANDBOX_USER``) that owns only its job
  directory, so a model cannot write root-owned files or read the builder's
  ``/proc/<pid>/environ``. The drop happens in the child rather than before ``exec``
  because the interpreter itself may live where that user cannot read it (e.g. under
  ``/root``); the untrusted model is not touched until after it;
* the result comes back as JSON, a ``.npz`` read with ``allow_pickle=False`` and raw TFLite
  bytes, each size-checked: never a pickle, which a compromised child could use to run
  code in the builder;
* errors come back as a fixed set of kinds with messages truncated to
  :data:`MAX_ERROR_CHARS`; TensorFlow runtime errors are reported by op and node, never
  with their text (which can echo tensor values, e.g. a string that failed to parse).

The builder process itself is made non-dumpable (``PR_SET_DUMPABLE`` 0) so a same-user
child cannot read its ``/proc/<pid>/environ`` (where the API key lives).

``in_process=True`` runs the same steps in the calling process (after the same op walk):
the benchmark's baseline and a fallback for tools; the task builder never uses it.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pwd
import re
import resource
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcompute.errors import ArtifactBuildError

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
MAX_RESULT_BYTES = 2 * 1024 * 1024 * 1024  # weights + two TFLite files
MAX_JSON_BYTES = 1024 * 1024
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
SANDBOX_USER_ENV = "FEDCOMPUTE_SANDBOX_USER"
DEFAULT_SANDBOX_USER = "nobody"
# Variables the child may inherit: locale and TensorFlow's own logging/threading knobs.
# Everything else (credentials, API keys, emulator hosts, proxies, cloud metadata) is dropped.
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TF_CPP_MIN_LOG_LEVEL", "TF_NUM_INTEROP_THREADS",
                  "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of the child (defaults fit the EMNIST CNN with room to spare)."""

    cpu_seconds: int = 900
    memory_bytes: int = 16 * 1024 * 1024 * 1024  # address space: TensorFlow reserves a lot of it
    wall_seconds: float = 1200.0


@dataclass(frozen=True)
class ModelJob:
    """What to do with the model (JSON-serializable: it is the child's input)."""

    model_dir: str
    label_name: str | None
    flex_ops_check: bool = True  # False: --skip_flex_ops_check (ops outside the table pass)
    client_optimizer: str = "SGD"
    learning_algo: str = "FED_AVG"


# One tensor of a TFLite signature as it crosses the process boundary: [name, shape, dtype].
SpecRecord = tuple[str, tuple[int, ...], str]
MAX_SPEC_ENTRIES = 4096
MAX_NAME_CHARS = 256
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class FlexOutcome:
    """The TFLite client steps and what the plan says about them (all plain data)."""

    training_min_client_version: str
    eval_min_client_version: str
    training_tflite: bytes = field(repr=False)
    eval_tflite: bytes = field(repr=False)
    training_ops: tuple[str, ...] = ()
    eval_ops: tuple[str, ...] = ()
    # (inputs, outputs) of each step's signature, read in the child (the builder never
    # opens the TFLite model with an interpreter).
    training_io: tuple[tuple[SpecRecord, ...], tuple[SpecRecord, ...]] = ((), ())
    eval_io: tuple[tuple[SpecRecord, ...], tuple[SpecRecord, ...]] = ((), ())

    def plan_step(self, kind: str) -> Any:
        """The :class:`~fedcompute.plans.TfliteStep` a ``TRAINING`` or ``EVALUATION`` plan carries."""
        from fedcompute.plans import TfliteStep
        from fedcompute.tensor_spec import TensorSpec

        model, ops, (inputs, outputs) = (self.training_tflite, self.training_ops, self.training_io) \
            if kind == "TRAINING" else (self.eval_tflite, self.eval_ops, self.eval_io)
        return TfliteStep(model, tuple(TensorSpec(*s) for s in inputs), tuple(TensorSpec(*s) for s in outputs),
                          tuple(ops))


@dataclass(frozen=True)
class ModelFacts:
    """What the builder learns from the model: check result, example spec, weights, TFLite."""

    input_type: int
    label_name: str
    example_spec: dict[str, Any]  # model_check's example_spec (plan layout)
    input_spec: dict[str, Any]  # fedcompute.data.examples.ExampleSpec.to_dict()
    num_parameters: int
    trainable: tuple[np.ndarray, ...]
    non_trainable: tuple[np.ndarray, ...]
    flex: FlexOutcome | None
    seconds: float = 0.0


# --------------------------------------------------------------------------- the work (child side)


def _error_kinds() -> dict[str, type[ArtifactBuildError]]:
    from fedcompute.taskbuilder import flex_ops, model_check, op_allowlist

    return {"ModelCheckError": model_check.ModelCheckError, "DisallowedOpError": op_allowlist.DisallowedOpError,
            "UnsupportedOpsError": flex_ops.UnsupportedOpsError,
            "TfliteConversionError": flex_ops.TfliteConversionError, "ArtifactBuildError": ArtifactBuildError,
            "InputSpecError": ArtifactBuildError}


def run_job(job: ModelJob) -> ModelFacts:
    """Walk, load, check, convert: the steps that run model ops (call only in a sandbox).

    The op allow-list walk runs inside ``load_functional_model_checked``, before the load.
    """
    from fedcompute.data.examples import ExampleSpec
    from fedcompute.taskbuilder import flex_ops, model_check

    started = time.perf_counter()
    loaded = model_check.load_functional_model_checked(job.model_dir)
    checked = model_check.check_model(loaded, label_name=job.label_name)
    input_spec = ExampleSpec.from_input_spec((loaded.x_spec, loaded.y_spec), checked.label_name)
    # Like ODP, the TFLite client steps are always built; --skip_flex_ops_check only lets ops
    # outside the table through (and a conversion failure leaves a plan without TFLite).
    flex = None
    try:
        report = flex_ops.check_flex_ops(loaded, client_optimizer=job.client_optimizer,
                                         learning_algo=job.learning_algo, example_spec=checked.example_spec,
                                         enforce=job.flex_ops_check)
    except flex_ops.TfliteConversionError as error:
        if job.flex_ops_check:
            raise
        log.warning("no TFLite client steps in the plan (devices will train with TensorFlow): %s", error)
    else:
        flex = FlexOutcome(report.training_min_client_version, report.eval_min_client_version,
                           report.training_tflite, report.eval_tflite,
                           training_ops=tuple(report.training_ops), eval_ops=tuple(report.eval_ops),
                           training_io=_io_records(flex_ops.signature_io(report.training_tflite)),
                           eval_io=_io_records(flex_ops.signature_io(report.eval_tflite)))
    trainable, non_trainable = loaded.initial_weights()
    return ModelFacts(
        input_type=checked.input_type, label_name=checked.label_name, example_spec=checked.example_spec,
        input_spec=input_spec.to_dict(), num_parameters=checked.num_parameters,
        trainable=tuple(np.asarray(w.numpy()) for w in trainable),
        non_trainable=tuple(np.asarray(w.numpy()) for w in non_trainable),
        flex=flex, seconds=time.perf_counter() - started,
    )


def _io_records(io: tuple[tuple[Any, ...], tuple[Any, ...]]) -> tuple[tuple[SpecRecord, ...], tuple[SpecRecord, ...]]:
    inputs, outputs = io
    return (tuple((str(s.name), tuple(int(d) for d in s.shape), str(s.dtype)) for s in inputs),
            tuple((str(s.name), tuple(int(d) for d in s.shape), str(s.dtype)) for s in outputs))


def _write_result(out: Path, facts: ModelFacts) -> None:
    arrays = {f"t{i}": w for i, w in enumerate(facts.trainable)}
    arrays.update({f"n{i}": w for i, w in enumerate(facts.non_trainable)})
    np.savez(out / "weights.npz", **arrays)
    meta: dict[str, Any] = {
        "input_type": facts.input_type, "label_name": facts.label_name, "example_spec": facts.example_spec,
        "input_spec": facts.input_spec, "num_parameters": facts.num_parameters,
        "trainable": len(facts.trainable), "non_trainable": len(facts.non_trainable), "seconds": facts.seconds,
        "flex": None,
    }
    if facts.flex is not None:
        (out / "training.tflite").write_bytes(facts.flex.training_tflite)
        (out / "eval.tflite").write_bytes(facts.flex.eval_tflite)
        meta["flex"] = {"training_min_client_version": facts.flex.training_min_client_version,
                        "eval_min_client_version": facts.flex.eval_min_client_version,
                        "training_ops": list(facts.flex.training_ops), "eval_ops": list(facts.flex.eval_ops),
                        "training_io": facts.flex.training_io, "eval_io": facts.flex.eval_io}
    (out / "result.json").write_text(json.dumps(meta))


def _error_record(error: BaseException) -> dict[str, Any]:
    from fedcompute.taskbuilder import flex_ops

    kind = type(error).__name__
    record: dict[str, Any] = {"kind": kind if kind in _error_kinds() else "unexpected",
                              "message": getattr(error, "message", None) or str(error),
                              "hint": getattr(error, "hint", None)}
    if record["kind"] == "unexpected":
        # Not one of ours: say what failed, not what it said (the text may quote data).
        record["message"] = f"the model check failed with {kind}"
        record["hint"] = "check that the model loads and runs with tf.saved_model.load"
    if isinstance(error, flex_ops.UnsupportedOpsError):
        record["unsupported"] = error.unsupported
    return record


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user and group the child becomes (builder running as root)."""

    uid: int
    gid: int

    def arg(self) -> str:
        return f"{self.uid}:{self.gid}"

    @classmethod
    def parse(cls, text: str) -> RunAs:
        uid, gid = (int(part) for part in text.split(":"))
        return cls(uid, gid)


def sandbox_user(environ: Mapping[str, str]) -> RunAs | None:
    """Who the child runs as: an unprivileged user when the builder is root, else None (same user).

    Raises:
        ArtifactBuildError: ``FEDCOMPUTE_SANDBOX_USER`` names no user, or names root.
    """
    if os.geteuid() != 0:
        return None
    name = environ.get(SANDBOX_USER_ENV) or DEFAULT_SANDBOX_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError as error:
        raise ArtifactBuildError(f"{SANDBOX_USER_ENV}={name!r}: no such user on this host",
                                 hint="name an existing unprivileged user (default: nobody)") from error
    if entry.pw_uid == 0:
        raise ArtifactBuildError(f"{SANDBOX_USER_ENV}={name!r} is root: the model sandbox needs an unprivileged user",
                                 hint="name an unprivileged user (default: nobody)")
    return RunAs(entry.pw_uid, entry.pw_gid)


def _preload_for_confinement() -> None:
    """Import everything the model steps use while the child can still read the interpreter's files."""
    import encodings.idna  # noqa: F401 - str host names go through the idna codec
    import tempfile  # noqa: F401
    import zipfile  # noqa: F401

    import tensorflow as tf

    from fedcompute.data import examples  # noqa: F401
    from fedcompute.taskbuilder import flex_ops, model_check, op_allowlist  # noqa: F401

    tf.lite.TFLiteConverter  # noqa: B018 - tf.lite loads lazily
    tf.lite.Interpreter  # noqa: B018


def _unshare_network() -> str:
    """Move this process into a fresh network namespace; returns "isolated" or why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNET) == 0:
            return "isolated"
        code = ctypes.get_errno()
        return f"shared ({errno.errorcode.get(code, code)}: unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN)"
    except (OSError, AttributeError) as error:
        return f"shared (no unshare on this system: {type(error).__name__})"


def confine(run_as: RunAs | None) -> dict[str, Any]:
    """Network namespace, then the unprivileged user (in that order: unshare needs root).

    Returns what was done, for the builder's log. Raises OSError if the user cannot be
    dropped (the child then reports an error and runs nothing).
    """
    if run_as is None:
        # The builder is not root, or the sandbox user cannot reach the job (logged by _hand_over).
        return {"uid": os.getuid(), "network": "shared (no privilege drop: the child runs as the builder's user)"}
    network = _unshare_network()
    os.setgroups([])
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PermissionError("the model sandbox is still root after dropping privileges")
    return {"uid": os.getuid(), "network": network}


def child_main(job_dir: Path, run_as: RunAs | None = None) -> int:
    """The child's entry point: read ``job.json``, confine, write ``out/`` or ``error.json``."""
    out = job_dir / "out"
    out.mkdir(exist_ok=True)
    try:
        job = ModelJob(**json.loads((job_dir / "job.json").read_text()))
        if run_as is not None:
            _preload_for_confinement()
        (job_dir / "confinement.json").write_text(json.dumps(confine(run_as)))
        _write_result(out, run_job(job))
        return 0
    except Exception as error:  # noqa: BLE001 - every failure is reported as a record
        (job_dir / "error.json").write_text(json.dumps(_error_record(error)))
        return 3


# --------------------------------------------------------------------------- the builder side


def sandbox_environment(parent: Mapping[str, str], job_dir: Path) -> dict[str, str]:
    """The child's environment: an allow-list of harmless variables, its own HOME and TMPDIR."""
    env = {name: parent[name] for name in _INHERITED_ENV if name in parent}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding fedcompute/
    env.update({"HOME": str(job_dir / "home"), "TMPDIR": str(job_dir / "tmp"), "PYTHONPATH": package_root,
                "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "NO_PROXY": "*", "no_proxy": "*"})
    return env


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the other limits still apply
        pass


def protect_builder_process() -> None:
    """Make this process non-dumpable: same-user processes cannot read its /proc/PID/environ."""
    _prctl(_PR_SET_DUMPABLE, 0)


def _limit_child(limits: SandboxLimits) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)

    return apply


def _reachable_by(path: Path, run_as: RunAs) -> bool:
    """Whether ``run_as`` can traverse every directory above ``path`` (it must reach the model)."""
    for parent in path.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == run_as.uid and mode.st_mode & stat.S_IXUSR:
            continue
        if mode.st_gid == run_as.gid and mode.st_mode & stat.S_IXGRP:
            continue
        if not mode.st_mode & stat.S_IXOTH:
            return False
    return True


def _installed_code() -> list[Path]:
    """Where the child's imports come from: this package and TensorFlow (located, not imported)."""
    import importlib.util

    import fedcompute

    paths = [Path(fedcompute.__file__)]
    spec = importlib.util.find_spec("tensorflow")
    if spec is not None and spec.origin:
        paths.append(Path(spec.origin))
    return paths


def _hand_over(work_dir: Path, model_dir: Path, run_as: RunAs | None) -> RunAs | None:
    """Give the job directory to the sandbox user; None (stay the same user) if it cannot reach the model."""
    if run_as is None:
        return None
    if not (_reachable_by(work_dir, run_as) and _reachable_by(model_dir, run_as)):
        log.warning("model sandbox runs as the builder's user: uid %d cannot reach %s or %s "
                    "(give the build directory's parents o+x)", run_as.uid, work_dir, model_dir)
        return None
    code = _installed_code()
    unreachable = [path for path in code if not _reachable_by(path, run_as)]
    if unreachable:
        # The child imports modules after dropping the user (TensorFlow loads lazily): it must
        # reach the installation, e.g. not a checkout under a 0700 directory such as /root.
        log.warning("model sandbox runs as the builder's user: uid %d cannot reach the Python installation "
                    "at %s (give its parent directories o+x)", run_as.uid, ", ".join(map(str, unreachable)))
        return None
    for path in (work_dir, work_dir / "home", work_dir / "tmp", work_dir / "out"):
        os.chown(path, run_as.uid, run_as.gid)
    # The model stays root-owned and read-only for the child.
    for root, dirs, files in os.walk(model_dir):
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)
        for name in files:
            os.chmod(Path(root) / name, 0o644)
    os.chmod(model_dir, 0o755)
    return run_as


def spawn_child(module: str, work_dir: Path, args: list[str], limits: SandboxLimits,
                ) -> subprocess.CompletedProcess[bytes]:
    """Start ``python -m module WORK_DIR ARGS`` the way the model check runs (env, limits, cwd)."""
    command = [sys.executable, "-m", module, str(work_dir), *args]
    return subprocess.run(command, cwd=work_dir, env=sandbox_environment(os.environ, work_dir),
                          preexec_fn=_limit_child(limits), capture_output=True, timeout=limits.wall_seconds,
                          stdin=subprocess.DEVNULL, check=False)


def _bounded_read(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise ArtifactBuildError(f"the model check produced {size} bytes in {path.name}, over {limit}")
    return path.read_bytes()


def _raise_child_error(record: Mapping[str, Any]) -> None:
    from fedcompute.taskbuilder import flex_ops

    kind = str(record.get("kind", "unexpected"))
    message = str(record.get("message") or "the model check failed")[:MAX_ERROR_CHARS]
    hint = record.get("hint")
    hint = str(hint)[:MAX_ERROR_CHARS] if hint else None
    if kind == "UnsupportedOpsError" and isinstance(record.get("unsupported"), dict):
        raise flex_ops.UnsupportedOpsError({str(k)[:200]: str(v)[:200] for k, v in record["unsupported"].items()})
    error_class = _error_kinds().get(kind, ArtifactBuildError)
    raise error_class(message, hint=hint)


def _names(value: Any, what: str) -> tuple[str, ...]:
    """A list of short strings from the child's JSON, or an error (the child is not trusted)."""
    if not isinstance(value, list) or len(value) > MAX_SPEC_ENTRIES or \
            not all(isinstance(v, str) and len(v) <= MAX_NAME_CHARS for v in value):
        raise ArtifactBuildError(f"the model check returned a malformed {what}")
    return tuple(value)


def _spec_records(value: Any, what: str) -> tuple[SpecRecord, ...]:
    """``[[name, shape, dtype], ...]`` from the child's JSON, checked entry by entry."""
    if not isinstance(value, list) or len(value) > MAX_SPEC_ENTRIES:
        raise ArtifactBuildError(f"the model check returned a malformed {what}")
    records: list[SpecRecord] = []
    for entry in value:
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and \
            len(entry[0]) <= MAX_NAME_CHARS and isinstance(entry[1], list) and len(entry[1]) <= 32 and \
            all(isinstance(d, int) and not isinstance(d, bool) and -1 <= d < 2**31 for d in entry[1]) and \
            isinstance(entry[2], str) and len(entry[2]) <= 32
        # A TensorFlow dtype name ("float32", "string": inputs may be serialized tf.Examples).
        if not ok or not _DTYPE_NAME.fullmatch(entry[2]):
            raise ArtifactBuildError(f"the model check returned a malformed {what}")
        records.append((entry[0], tuple(entry[1]), entry[2]))
    return tuple(records)


def _io(value: Any, what: str) -> tuple[tuple[SpecRecord, ...], tuple[SpecRecord, ...]]:
    if not isinstance(value, list) or len(value) != 2:
        raise ArtifactBuildError(f"the model check returned a malformed {what}")
    return _spec_records(value[0], f"{what} inputs"), _spec_records(value[1], f"{what} outputs")


def _read_result(out: Path) -> ModelFacts:
    meta = json.loads(_bounded_read(out / "result.json", MAX_JSON_BYTES))
    with np.load(out / "weights.npz", allow_pickle=False) as arrays:
        if sum(int(arrays[k].nbytes) for k in arrays.files) > MAX_RESULT_BYTES:
            raise ArtifactBuildError("the model's initial weights are too large")
        trainable = tuple(np.asarray(arrays[f"t{i}"]) for i in range(int(meta["trainable"])))
        non_trainable = tuple(np.asarray(arrays[f"n{i}"]) for i in range(int(meta["non_trainable"])))
    flex = None
    if meta.get("flex") is not None:
        flex = FlexOutcome(str(meta["flex"]["training_min_client_version"]),
                           str(meta["flex"]["eval_min_client_version"]),
                           _bounded_read(out / "training.tflite", MAX_RESULT_BYTES),
                           _bounded_read(out / "eval.tflite", MAX_RESULT_BYTES),
                           training_ops=_names(meta["flex"].get("training_ops", []), "training op list"),
                           eval_ops=_names(meta["flex"].get("eval_ops", []), "evaluation op list"),
                           training_io=_io(meta["flex"].get("training_io"), "training signature"),
                           eval_io=_io(meta["flex"].get("eval_io"), "evaluation signature"))
    return ModelFacts(
        input_type=int(meta["input_type"]), label_name=str(meta["label_name"]),
        example_spec=dict(meta["example_spec"]), input_spec=dict(meta["input_spec"]),
        num_parameters=int(meta["num_parameters"]), trainable=trainable, non_trainable=non_trainable,
        flex=flex, seconds=float(meta.get("seconds", 0.0)),
    )


def inspect_model(job: ModelJob, work_dir: Path, *, limits: SandboxLimits | None = None,
                  in_process: bool = False) -> ModelFacts:
    """Run :func:`run_job` in a sandboxed child (``work_dir`` becomes its private directory).

    Raises the same :class:`~fedcompute.errors.ArtifactBuildError` subclasses the in-process
    checks raise, with sanitized messages; a child killed by a limit is an
    :class:`ArtifactBuildError` naming the limit.
    """
    if in_process:
        return run_job(job)
    limits = limits or SandboxLimits()
    protect_builder_process()
    for sub in ("home", "tmp", "out"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    (work_dir / "job.json").write_text(json.dumps(asdict(job)))
    run_as = _hand_over(work_dir, Path(job.model_dir), sandbox_user(os.environ))
    started = time.perf_counter()
    try:
        done = spawn_child("fedcompute.taskbuilder.sandbox", work_dir,
                           ["--run-as", run_as.arg()] if run_as else [], limits)
    except subprocess.TimeoutExpired as error:
        raise ArtifactBuildError(f"the model check ran longer than {limits.wall_seconds:.0f} s and was stopped",
                                 hint="use a smaller model, or ask the operator to raise the limit") from error
    elapsed = time.perf_counter() - started
    tail = done.stderr.decode("utf-8", "replace")[-2000:]
    log.debug("model sandbox exited %s after %.2f s; stderr tail: %s", done.returncode, elapsed, tail)
    _log_confinement(work_dir / "confinement.json")
    if (work_dir / "error.json").exists():
        _raise_child_error(json.loads(_bounded_read(work_dir / "error.json", MAX_JSON_BYTES)))
    if done.returncode != 0:
        raise ArtifactBuildError(_killed_message(done.returncode, tail, limits),
                                 hint="use a smaller model, or ask the operator to raise the task builder's limits")
    return _read_result(work_dir / "out")


def _log_confinement(path: Path) -> None:
    try:
        record = json.loads(_bounded_read(path, MAX_JSON_BYTES))
        log.info("model sandbox ran as uid %s, network %s", int(record["uid"]), str(record["network"])[:200])
    except (OSError, ValueError, KeyError, TypeError, ArtifactBuildError):
        log.warning("model sandbox: no confinement record (the child failed before confining itself)")


def _killed_message(returncode: int, stderr_tail: str, limits: SandboxLimits) -> str:
    if returncode == -9 or returncode == -24 or "CPU time limit" in stderr_tail:  # SIGKILL / SIGXCPU
        return f"the model check was stopped by its CPU time limit ({limits.cpu_seconds} s)"
    if "MemoryError" in stderr_tail or "bad_alloc" in stderr_tail or "Resource exhausted" in stderr_tail:
        return f"the model check ran out of its memory limit ({limits.memory_bytes // 2**20} MiB)"
    return f"the model check process failed (exit status {returncode})"


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_as_arg = sys.argv[3] if sys.argv[2:3] == ["--run-as"] else None
    sys.exit(child_main(Path(sys.argv[1]), RunAs.parse(run_as_arg) if run_as_arg else None))
