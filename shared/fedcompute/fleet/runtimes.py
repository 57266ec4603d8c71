"""Device runtimes: how a simulated device executes the plan it downloaded.

* :class:`TfliteRuntime` runs the plan's TFLite model (``ClientOnlyPlan.tflite_graph``) in
  ``tf.lite.Interpreter`` with the Flex delegate of the TensorFlow wheel, as an ODP phone runs
  TFLite: the serialized ``tf.train.Example``s from the app go in as the step's
  ``serialized_examples`` input, the weights go in and come out as tensors (names in
  :mod:`fedcompute.learning.step_signature`), one call per batch.
* :class:`TensorflowRuntime` trains the plan's SavedFunctionalModel with full TensorFlow
  (:mod:`fedcompute.learning.client_training`).

Both return the same :class:`~fedcompute.learning.client_training.LocalResult` (training)
or metric statistics (evaluation), computed by the same code, so a round does not depend on
the runtime beyond float rounding. A plan a runtime cannot execute raises
:class:`~fedcompute.errors.DeviceComputationError` naming ODP's failure result.

:func:`choose_runtime` picks the runtime for ``auto``: TFLite when the plan has a TFLite
model whose Flex ops ODP clients have (the flex-ops table), TensorFlow otherwise, with the
reason.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedcompute.errors import DeviceComputationError, InvalidRequestError
from fedcompute.learning import step_signature as sig
from fedcompute.learning.client_training import (
    LocalResult,
    MetricStats,
    StatsAccumulator,
    check_training_args,
    epoch_batches,
    local_result,
    metric_list,
)
from fedcompute.plans import ClientPlan, TfliteStep, UnpackedPlan

RUNTIME_NAMES = ("auto", "tflite", "tensorflow")
FAILED_OPS_ERROR = "FAILED_OPS_ERROR"
FAILED_MODEL_COMPUTATION = "FAILED_MODEL_COMPUTATION"


class DeviceRuntime(Protocol):
    """What a device trains and evaluates with."""

    name: str

    def train(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> LocalResult:
        """Local training from ``weights`` (all of them, plan order) on serialized examples."""
        ...

    def evaluate(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> MetricStats:
        """Metric statistics (incl. ``loss`` and ``num_examples``) of ``weights`` on the examples."""
        ...


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _split(plan: ClientPlan, weights: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(weights) != len(plan.weights):
        raise InvalidRequestError(f"the plan has {len(plan.weights)} weight tensors; got {len(weights)}",
                                  hint="the checkpoint does not belong to this plan")
    trainable: list[np.ndarray] = []
    non_trainable: list[np.ndarray] = []
    for spec, w in zip(plan.weights, weights):
        (trainable if spec.trainable else non_trainable).append(np.asarray(w, dtype=spec.dtype))
    return trainable, non_trainable


# --------------------------------------------------------------------------- TensorFlow


class TensorflowRuntime:
    """Full TensorFlow on the plan's SavedFunctionalModel."""

    name = "tensorflow"

    def _model_and_batches(self, plan: UnpackedPlan, examples: Sequence[bytes]) -> tuple[Any, list[Any]]:
        from fedcompute.data.examples import ExampleSpec, parse_examples
        from fedcompute.learning.client_training import batches_from_arrays, load_model

        x, y = parse_examples(list(examples), ExampleSpec.from_dict(plan.plan.example_spec))

        def to_numpy(t: Any) -> np.ndarray:
            return t.numpy() if hasattr(t, "numpy") else np.asarray(t)

        x = {k: to_numpy(v) for k, v in x.items()} if isinstance(x, dict) else to_numpy(x)
        return load_model(plan.saved_model_dir), batches_from_arrays(x, to_numpy(y), plan.plan.batch_size)

    def train(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> LocalResult:
        from fedcompute.learning.client_training import train_on_device

        model, batches = self._model_and_batches(plan, examples)
        p = plan.plan
        return train_on_device(model, weights, batches, algorithm=p.learning_algo, optimizer=p.client_optimizer,
                               learning_rate=p.client_learning_rate, epochs=p.epochs, max_batches=p.max_batches,
                               metrics=p.metrics)

    def evaluate(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> MetricStats:
        from fedcompute.learning.client_training import evaluate_on_device

        model, batches = self._model_and_batches(plan, examples)
        return evaluate_on_device(model, weights, batches, plan.plan.metrics)


# --------------------------------------------------------------------------- TFLite


@dataclass
class _LoadedStep:
    runner: Any
    inputs: frozenset[str]
    outputs: frozenset[str]


class TfliteRuntime:
    """The plan's TFLite step in ``tf.lite.Interpreter`` (builtins + the Flex delegate).

    ``supported_flex_ops``: the Flex ops this client has; None = every TensorFlow op the
    wheel's Flex delegate runs. A model needing others fails with ``FAILED_OPS_ERROR``, as on
    a phone whose module lacks them. Interpreters are not thread-safe: one per thread and plan.
    """

    name = "tflite"

    def __init__(self, supported_flex_ops: Iterable[str] | None = None, *, num_threads: int = 1) -> None:
        self.supported_flex_ops = None if supported_flex_ops is None else frozenset(supported_flex_ops)
        self.num_threads = num_threads
        self._local = threading.local()

    @classmethod
    def for_client_version(cls, version_code: str) -> TfliteRuntime:
        """An ODP client of ``version_code``: only the Flex ops the flex-ops table says that
        version has (what the task builder's ``min_client_version`` promises)."""
        from fedcompute.taskbuilder.flex_ops import load_flex_ops_table

        version = int(version_code)
        table = load_flex_ops_table().min_versions
        return cls(supported_flex_ops={op for op, first in table.items() if int(first) <= version})

    # -- loading ---------------------------------------------------------------

    def _step(self, plan: UnpackedPlan) -> _LoadedStep:
        if plan.tflite is None:
            raise DeviceComputationError(FAILED_MODEL_COMPUTATION, "the plan has no TFLite model (tflite_graph is empty)",
                                         hint="the task builder could not convert the model; use the TensorFlow runtime")
        cache: dict[int, _LoadedStep] = self._local.__dict__.setdefault("steps", {})
        key = id(plan.tflite.model)
        if key not in cache:
            if len(cache) > 4:  # a few plans per thread (training + evaluation, a new task)
                cache.pop(next(iter(cache)))
            cache[key] = self._load(plan.tflite)
        return cache[key]

    def _load(self, step: TfliteStep) -> _LoadedStep:
        _check_integrity(step)
        tf = _tf()
        try:
            interpreter = tf.lite.Interpreter(model_content=step.model, num_threads=self.num_threads)
        except (ValueError, RuntimeError) as err:
            raise DeviceComputationError(FAILED_MODEL_COMPUTATION,
                                         f"the plan's TFLite model is corrupted: {_short(err)}") from err
        if self.supported_flex_ops is not None:
            from fedcompute.taskbuilder.flex_ops import list_flex_ops

            try:
                needed = set(list_flex_ops(step.model))
            except Exception as err:  # noqa: BLE001 - any failure to read the flatbuffer
                raise DeviceComputationError(FAILED_MODEL_COMPUTATION,
                                             f"the plan's TFLite model is corrupted: {_short(err)}") from err
            missing = sorted(needed - self.supported_flex_ops)
            if missing:
                raise DeviceComputationError(
                    FAILED_OPS_ERROR, f"the plan's TFLite model needs Flex ops this client lacks: {', '.join(missing)}",
                    hint="build the task with ops from the flex-ops table (the task builder's check)")
        try:
            runner = interpreter.get_signature_runner()
            inputs = frozenset(runner.get_input_details())
            outputs = frozenset(runner.get_output_details())
        except (ValueError, RuntimeError) as err:
            text = _short(err)
            result = FAILED_OPS_ERROR if _is_missing_op(text) else FAILED_MODEL_COMPUTATION
            raise DeviceComputationError(result, f"the plan's TFLite model cannot be loaded: {text}") from err
        listed_in = {s.name for s in step.inputs}
        listed_out = {s.name for s in step.outputs}
        if listed_in != inputs or not listed_out <= outputs:
            raise DeviceComputationError(
                FAILED_MODEL_COMPUTATION,
                f"the plan's TensorflowSpec (inputs {sorted(listed_in)}, outputs {sorted(listed_out)}) does not "
                f"match its TFLite model (inputs {sorted(inputs)}, outputs {sorted(outputs)})")
        return _LoadedStep(runner, inputs, outputs)

    @staticmethod
    def _invoke(step: _LoadedStep, feed: dict[str, Any], needed: Iterable[str]) -> dict[str, np.ndarray]:
        missing_in = sorted(set(feed) - step.inputs)
        missing_out = sorted(set(needed) - step.outputs)
        if missing_in or missing_out:
            raise DeviceComputationError(
                FAILED_MODEL_COMPUTATION,
                f"the plan's TFLite model lacks inputs {missing_in} / outputs {missing_out} this plan needs")
        try:
            return step.runner(**feed)
        except (ValueError, RuntimeError) as err:
            text = _short(err)
            result = FAILED_OPS_ERROR if _is_missing_op(text) else FAILED_MODEL_COMPUTATION
            raise DeviceComputationError(result, f"the plan's TFLite model failed: {text}") from err

    # -- computations ------------------------------------------------------------

    @staticmethod
    def _batches(examples: Sequence[bytes], batch_size: int) -> list[np.ndarray]:
        return [np.array(list(examples[i:i + batch_size]), dtype=object) for i in range(0, len(examples), batch_size)]

    @staticmethod
    def _weights_feed(plan: ClientPlan, weights: Sequence[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        trainable, non_trainable = _split(plan, weights)
        feed = {sig.trainable(i): w for i, w in enumerate(trainable)}
        feed.update({sig.non_trainable(i): w for i, w in enumerate(non_trainable)})
        return feed, trainable

    def train(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> LocalResult:
        p = plan.plan
        algorithm, optimizer, lr, cap = check_training_args(p.learning_algo, p.client_optimizer,
                                                            p.client_learning_rate, p.epochs, p.max_batches)
        step = self._step(plan)
        feed, initial = self._weights_feed(p, weights)
        n_trainable = len(initial)
        acc = StatsAccumulator(metric_list(p.metrics), False)
        fed_sgd, adam = algorithm == "FED_SGD", optimizer == "ADAM"
        carried = {sig.trainable(i): sig.new_trainable(i) for i in range(n_trainable)}  # input <- output
        if fed_sgd:
            carried = {}
            grad_sum = [np.zeros_like(w) for w in initial]
        else:
            feed[sig.LEARNING_RATE] = np.float32(lr)
        if adam and not fed_sgd:
            for i, w in enumerate(initial):
                for name in (sig.adam_accumulator(i), sig.adam_preconditioner(i)):
                    feed[name] = np.zeros_like(w)
                    carried[name] = sig.new(name)
        needed = [sig.LOSS, sig.PREDICTIONS, sig.LABELS, *carried.values()]
        if fed_sgd:
            needed += [sig.gradient(i) for i in range(n_trainable)]
        steps = 0
        for batch in epoch_batches(self._batches(examples, p.batch_size), 1 if fed_sgd else p.epochs):
            if cap is not None and steps >= cap:
                break
            feed[sig.SERIALIZED_EXAMPLES] = batch
            if adam and not fed_sgd:
                feed[sig.ADAM_STEP] = np.float32(steps + 1)
            out = self._invoke(step, feed, needed)
            acc.add(out[sig.LABELS], out[sig.PREDICTIONS], float(out[sig.LOSS]))
            if fed_sgd:
                n = np.float32(out[sig.PREDICTIONS].shape[0])
                grad_sum = [a + n * out[sig.gradient(i)] for i, a in enumerate(grad_sum)]
            for name, output in carried.items():
                feed[name] = out[output]
            steps += 1
        if fed_sgd:
            count = np.float32(max(acc.count, 1))
            delta = [-(g / count) for g in grad_sum]
        else:
            delta = [feed[sig.trainable(i)] - w0 for i, w0 in enumerate(initial)]
        return local_result(delta, acc, steps)

    def evaluate(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: Sequence[bytes]) -> MetricStats:
        step = self._step(plan)
        feed, _ = self._weights_feed(plan.plan, weights)
        acc = StatsAccumulator(metric_list(plan.plan.metrics), False)
        for batch in self._batches(examples, plan.plan.batch_size):
            feed[sig.SERIALIZED_EXAMPLES] = batch
            out = self._invoke(step, feed, (sig.LOSS, sig.PREDICTIONS, sig.LABELS))
            acc.add(out[sig.LABELS], out[sig.PREDICTIONS], float(out[sig.LOSS]))
        return acc.stats


def _check_integrity(step: TfliteStep) -> None:
    """Refuse a model that is not the one built, or whose flatbuffer does not parse: the
    interpreter does not verify the flatbuffer and can crash the process on a truncated one."""
    if hashlib.sha256(step.model).digest() != step.sha256:
        raise DeviceComputationError(FAILED_MODEL_COMPUTATION,
                                     "the plan's TFLite model is corrupted: its SHA-256 differs from the plan's",
                                     hint="the download or the stored plan was altered; rebuild the task")
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        if not schema.Model.ModelBufferHasIdentifier(step.model, 0):
            raise ValueError("no TFL3 identifier")
        schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(step.model, 0))
    except Exception as err:  # noqa: BLE001 - struct/index errors of a malformed flatbuffer
        raise DeviceComputationError(FAILED_MODEL_COMPUTATION,
                                     f"the plan's TFLite model is not a valid TFLite flatbuffer: {_short(err)}") from err


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:500]


def _is_missing_op(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in ("op type not registered", "unresolved custom op",
                                                "didn't find op", "is neither a custom op nor a flex op"))


# --------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime a device uses for a plan, and why (one sentence)."""

    name: str
    reason: str


def choose_runtime(requested: str, plan: UnpackedPlan) -> RuntimeChoice:
    """``requested`` (``auto``, ``tflite`` or ``tensorflow``) resolved for ``plan``."""
    if requested not in RUNTIME_NAMES:
        raise InvalidRequestError(f"unknown device runtime {requested!r}", hint=f"use one of {RUNTIME_NAMES}")
    if requested != "auto":
        return RuntimeChoice(requested, f"--runtime {requested} was requested")
    if plan.tflite is None:
        return RuntimeChoice("tensorflow", "the plan has no TFLite model (the task builder could not convert it)")
    from fedcompute.taskbuilder.flex_ops import load_flex_ops_table

    table = load_flex_ops_table()
    unlisted = sorted(set(plan.tflite.flex_ops) - set(table.min_versions))
    if unlisted:
        return RuntimeChoice("tensorflow", "the plan's TFLite model needs Flex ops no ODP client version has "
                                           f"({', '.join(unlisted)}; built with --skip_flex_ops_check)")
    version = table.min_client_version(plan.tflite.flex_ops)
    return RuntimeChoice("tflite", f"the plan's TFLite model needs only Flex ops ODP clients have (since version "
                                   f"{version}: {', '.join(plan.tflite.flex_ops) or 'none'})")


_SHARED: dict[str, DeviceRuntime] = {}
_SHARED_LOCK = threading.Lock()


def get_runtime(name: str) -> DeviceRuntime:
    """The process-wide runtime called ``name`` (``tflite``: every Flex op of the wheel)."""
    with _SHARED_LOCK:
        if name not in _SHARED:
            if name == "tflite":
                _SHARED[name] = TfliteRuntime()
            elif name == "tensorflow":
                _SHARED[name] = TensorflowRuntime()
            else:
                raise InvalidRequestError(f"unknown device runtime {name!r}", hint="use tflite or tensorflow")
        return _SHARED[name]


def resolve(runtime: str | DeviceRuntime, plan: UnpackedPlan) -> DeviceRuntime:
    """A runtime object for ``runtime`` (a name, ``auto`` included, or a runtime itself)."""
    if not isinstance(runtime, str):
        return runtime
    return get_runtime(choose_runtime(runtime, plan).name)
