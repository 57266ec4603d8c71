"""The flex-ops check: which TensorFlow ops a device needs through the TFLite Flex delegate.

Like ODP's task builder, one client training step and one evaluation step are expressed
as ``tf.function``s and converted to TFLite with builtin ops plus select TF ops (and ODP's
converter flags, notably ``_experimental_allow_all_select_tf_ops``: ops outside TFLite's
default Flex allow-list, such as ``L2Loss``, become Flex ops instead of failing the
conversion; whether a client can run them is what the table decides). The Flex ops are
read from ``tf.lite.experimental.Analyzer`` output (printed as ``FlexXxx``) and from the
flatbuffer, whose Flex custom options carry each op's ``NodeDef``: the kernel class name
(``L2LossOp<CPUDevice, float>``) comes from TensorFlow's kernel registry for that NodeDef,
as ODP's ``list_flex_ops`` does; when the registry has no CPU kernel the description is
best-effort (``<Op>Op<CPUDevice, <dtype>>``).

Each op maps through ``flex_ops_min_version.csv`` (a versioned table shipped with the
package) to the first client version that supports it; a task's ``min_client_version``
is the highest of them (compared as integers; ``"0"`` without Flex ops). An op missing
from the table fails the build with :class:`UnsupportedOpsError`.

The table functions are pure (no TensorFlow); TensorFlow is imported inside the functions
that convert models.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcompute.errors import ArtifactBuildError

FLEX_OPS_TABLE_VERSION = "1"
"""The table version this code ships with (the ``# version:`` line of the CSV)."""
FLEX_OPS_TABLE_PATH = Path(__file__).with_name("flex_ops_min_version.csv")
NO_FLEX_OPS_VERSION = "0"
CLIENT_PLAN_ERROR_PREFIX = "Cannot build the ClientOnlyPlan: "
OPTIMIZERS = ("SGD", "ADAM")
# tff.learning.optimizers.build_adam defaults (the client optimizer a device runs).
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7

_FLEX_IN_ANALYZER = re.compile(r"\bFlex(\w+)\(")
_VERSION_LINE = re.compile(r"^#\s*version:\s*(\S+)\s*$")


class UnsupportedOpsError(ArtifactBuildError):
    """The model needs Flex ops that no client version supports (not in the table)."""

    def __init__(self, unsupported: Mapping[str, str]) -> None:
        self.unsupported = dict(sorted(unsupported.items()))
        super().__init__(
            CLIENT_PLAN_ERROR_PREFIX
            + "Please contact the server operator to register these ops: "
            + str(self.unsupported)
        )


class TfliteConversionError(ArtifactBuildError):
    """The client computation could not be converted to TFLite."""


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FlexOpsTable:
    """op name -> the first client version (a decimal string) that supports it."""

    version: str
    min_versions: Mapping[str, str]

    def min_client_version(self, ops: Mapping[str, str] | Any) -> str:
        """Highest version among ``ops`` (names, or a name -> kernel mapping).

        Raises :class:`UnsupportedOpsError` naming every op (with its kernel) not in the table.
        """
        kernels = dict(ops) if isinstance(ops, Mapping) else {op: op for op in ops}
        unsupported = {op: kernel for op, kernel in kernels.items() if op not in self.min_versions}
        if unsupported:
            raise UnsupportedOpsError(unsupported)
        if not kernels:
            return NO_FLEX_OPS_VERSION
        return str(max(int(self.min_versions[op]) for op in kernels))


def parse_flex_ops_table(text: str, source: str = "flex ops table") -> FlexOpsTable:
    """Parse the CSV (``# version: N`` comment, header ``min_client_version,op``, rows)."""
    version = None
    rows: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            match = _VERSION_LINE.match(line)
            if match:
                version = match.group(1)
        elif line.strip():
            rows.append(line)
    if version is None:
        raise ArtifactBuildError(f"{source}: missing the '# version: N' line")
    reader = csv.reader(rows)
    header = next(reader, None)
    if header != ["min_client_version", "op"]:
        raise ArtifactBuildError(f"{source}: expected the header 'min_client_version,op', got {header}")
    table: dict[str, str] = {}
    for number, row in enumerate(reader, start=2):
        if len(row) != 2 or not row[0].strip().isdigit() or not row[1].strip():
            raise ArtifactBuildError(f"{source}: row {number} must be '<decimal version>,<op>', got {row}")
        client_version, op = row[0].strip(), row[1].strip()
        if op in table:
            raise ArtifactBuildError(f"{source}: op {op} is listed twice")
        table[op] = str(int(client_version))
    return FlexOpsTable(version=version, min_versions=table)


@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> FlexOpsTable:
    return parse_flex_ops_table(Path(path).read_text(encoding="utf-8"), source=path)


def load_flex_ops_table(path: str | os.PathLike[str] | None = None) -> FlexOpsTable:
    """The shipped table (or the CSV at ``path``), cached."""
    return _load_table(os.fspath(path or FLEX_OPS_TABLE_PATH))


# --------------------------------------------------------------------------- listing


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _analyzer_flex_ops(tflite_model: bytes) -> set[str]:
    tf = _tf()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tf.lite.experimental.Analyzer.analyze(model_content=tflite_model)
    return set(_FLEX_IN_ANALYZER.findall(out.getvalue()))


def _best_effort_kernel(op: str, node_def: Any | None) -> str:
    tf = _tf()
    dtype = None
    if node_def is not None:
        for attr in ("T", "dtype", "Tidx"):
            if attr in node_def.attr and node_def.attr[attr].type:
                dtype = tf.as_dtype(node_def.attr[attr].type).name
                break
    c_type = {"float32": "float", "float64": "double", "int32": "int32", "int64": "int64"}.get(dtype or "", dtype)
    return f"{op}Op<CPUDevice, {c_type}>" if c_type else f"{op}Op<CPUDevice>"


def _flatbuffer_flex_kernels(tflite_model: bytes) -> dict[str, str]:
    """op -> kernel class, from the NodeDefs in the Flex ops' custom options."""
    from flatbuffers import flexbuffers
    from tensorflow.core.framework import node_def_pb2
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.python.tools import selective_registration_header_lib as registry

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model, 0))
    kernels: dict[str, str] = {}
    for subgraph in model.subgraphs or []:
        for operator in subgraph.operators or []:
            code = model.operatorCodes[operator.opcodeIndex]
            custom = code.customCode.decode() if code.customCode else ""
            if not custom.startswith("Flex"):
                continue
            op, node_def = custom[len("Flex"):], None
            try:
                # Flex custom options: a flexbuffer vector [op name, serialized NodeDef].
                # Read the NodeDef as bytes (flexbuffers.Loads would decode it as UTF-8).
                vector = flexbuffers.GetRoot(bytes(operator.customOptions)).AsVector
                node_def = node_def_pb2.NodeDef.FromString(bytes(vector[1].AsStringBytes))
                op = node_def.op or op
                found = registry.get_ops_from_nodedef(node_def)
                kernel = found[1] if found and found[1] else _best_effort_kernel(op, node_def)
            except Exception:  # noqa: BLE001 - a description only; never fail the check on it
                kernel = _best_effort_kernel(op, node_def)
            kernels.setdefault(op, kernel)
    return kernels


def list_flex_ops(tflite_model: bytes) -> dict[str, str]:
    """The Flex ops a TFLite model needs: ``{op: kernel class}``, sorted by op."""
    kernels = _flatbuffer_flex_kernels(tflite_model)
    for op in _analyzer_flex_ops(tflite_model) - kernels.keys():
        kernels[op] = _best_effort_kernel(op, None)
    return dict(sorted(kernels.items()))


# --------------------------------------------------------------------------- computations


def build_client_modules(
    model: Any,
    *,
    client_optimizer: str = "SGD",
    learning_algo: str = "FED_AVG",
    example_spec: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(train_module, eval_module)``: ``tf.Module``s whose ``step`` ``tf.function`` is one
    client step with the weights as inputs and outputs (names:
    :mod:`fedcompute.learning.step_signature`; batch dimension None).

    A device runs a whole local epoch by calling the step once per batch and feeding each
    call's new weights to the next, so the converted TFLite model is what devices execute,
    not a stand-in for the flex-ops check.

    With ``example_spec`` (from :func:`fedcompute.taskbuilder.model_check.check_model`) the
    step takes a batch of serialized ``tf.train.Example``s (``tf.string [None]``) and parses
    it in the graph, as ODP's client plans do (``ParseExampleV2`` becomes a Flex op);
    without it the step takes the model's ``x`` and ``y`` tensors.

    Training (FED_AVG): forward (training mode), loss, gradients, one client optimizer step
    (SGD, or Adam as in ``tff.learning.optimizers.build_adam``, its state as inputs and
    outputs); FED_SGD: the gradients instead of new weights. Evaluation: forward (inference
    mode) and loss. Both return ``loss``, ``predictions`` and ``labels``.
    ``model`` is anything :func:`fedcompute.taskbuilder.model_check.as_loaded_model` takes.
    """
    from fedcompute.learning import step_signature as sig
    from fedcompute.taskbuilder.model_check import as_loaded_model

    tf = _tf()
    optimizer = str(client_optimizer).upper()
    if optimizer not in OPTIMIZERS:
        raise ArtifactBuildError(f"unknown client optimizer {client_optimizer!r}; choose SGD or ADAM")
    algorithm = str(learning_algo).upper()
    if algorithm not in ("FED_AVG", "FED_SGD"):
        raise ArtifactBuildError(f"unknown learning algorithm {learning_algo!r}; choose FED_AVG or FED_SGD")
    loaded = as_loaded_model(model)

    def named(specs: Any, name: Any) -> list[Any]:
        return [tf.TensorSpec(s.shape, s.dtype, name=name(i)) for i, s in enumerate(specs)]

    trainable_specs = named(loaded.trainable_specs, sig.trainable)
    non_trainable_specs = named(loaded.non_trainable_specs, sig.non_trainable)
    if example_spec is not None:
        from fedcompute.taskbuilder.model_check import parse_examples

        data_specs = [tf.TensorSpec([None], tf.string, name=sig.SERIALIZED_EXAMPLES)]

        def inputs(data: Sequence[Any]) -> tuple[Any, Any]:
            return parse_examples(example_spec, data[0])
    else:
        def strip(s: Any) -> Any:
            return tf.TensorSpec(s.shape, s.dtype)

        data_specs = [tf.nest.map_structure(strip, loaded.x_spec), strip(loaded.y_spec)]

        def inputs(data: Sequence[Any]) -> tuple[Any, Any]:
            return data[0], data[1]

    def common(output: Any, loss: Any, y: Any) -> dict[str, Any]:
        return {sig.LOSS: loss, sig.PREDICTIONS: tf.nest.flatten(output)[0], sig.LABELS: y}

    def forward_backward(trainable: Any, non_trainable: Any, data: Sequence[Any]) -> tuple[Any, Any, Any, Any]:
        x, y = inputs(data)
        trainable = list(trainable)
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            output = loaded.predict((tuple(trainable), tuple(non_trainable)), x, training=True)
            loss = loaded.loss(output, y)
        grads = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, output, loss, y

    lr_spec = tf.TensorSpec([], tf.float32, name=sig.LEARNING_RATE)
    if algorithm == "FED_SGD":
        class TrainStep(tf.Module):  # type: ignore[name-defined]  # tf is imported lazily, so untyped here
            @tf.function(input_signature=[trainable_specs, non_trainable_specs, *data_specs])
            def step(self, trainable: Any, non_trainable: Any, *data: Any) -> dict[str, Any]:
                grads, output, loss, y = forward_backward(trainable, non_trainable, data)
                return {**common(output, loss, y), **{sig.gradient(i): g for i, g in enumerate(grads)}}
    elif optimizer == "SGD":
        class TrainStep(tf.Module):  # type: ignore[name-defined,no-redef]
            @tf.function(input_signature=[trainable_specs, non_trainable_specs, *data_specs, lr_spec])
            def step(self, trainable: Any, non_trainable: Any, *rest: Any) -> dict[str, Any]:
                *data, lr = rest
                grads, output, loss, y = forward_backward(trainable, non_trainable, data)
                new = {sig.new_trainable(i): w - tf.cast(lr, w.dtype) * g
                       for i, (w, g) in enumerate(zip(trainable, grads))}
                return {**common(output, loss, y), **new}
    else:
        accumulator_specs = named(loaded.trainable_specs, sig.adam_accumulator)
        preconditioner_specs = named(loaded.trainable_specs, sig.adam_preconditioner)
        step_spec = tf.TensorSpec([], tf.float32, name=sig.ADAM_STEP)

        class TrainStep(tf.Module):  # type: ignore[name-defined,no-redef]
            @tf.function(input_signature=[trainable_specs, non_trainable_specs, *data_specs, lr_spec,
                                          accumulator_specs, preconditioner_specs, step_spec])
            def step(self, trainable: Any, non_trainable: Any, *rest: Any) -> dict[str, Any]:
                *data, lr, accumulator, preconditioner, t = rest
                grads, output, loss, y = forward_backward(trainable, non_trainable, data)
                # tff.learning.optimizers.build_adam; t is the 1-based step.
                scaled_lr = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, t)) / (1.0 - tf.pow(ADAM_BETA_1, t))
                out = common(output, loss, y)
                for i, (w, a, p, g) in enumerate(zip(trainable, accumulator, preconditioner, grads)):
                    a = a + (g - a) * (1.0 - ADAM_BETA_1)
                    p = p + (tf.square(g) - p) * (1.0 - ADAM_BETA_2)
                    out[sig.new_trainable(i)] = w - tf.cast(scaled_lr, w.dtype) * a / (tf.sqrt(p) + ADAM_EPSILON)
                    out[sig.new(sig.adam_accumulator(i))] = a
                    out[sig.new(sig.adam_preconditioner(i))] = p
                return out

    class EvalStep(tf.Module):  # type: ignore[name-defined]
        @tf.function(input_signature=[trainable_specs, non_trainable_specs, *data_specs])
        def step(self, trainable: Any, non_trainable: Any, *data: Any) -> dict[str, Any]:
            x, y = inputs(data)
            output = loaded.predict((tuple(trainable), tuple(non_trainable)), x, training=False)
            return common(output, loaded.loss(output, y), y)

    return TrainStep(name="client_train"), EvalStep(name="client_eval")


def convert_to_tflite(module: Any, what: str = "client computation") -> bytes:
    """Convert ``module.step`` to a TFLite flatbuffer (builtins + select TF ops, ODP's flags)."""
    tf = _tf()
    concrete = module.step.get_concrete_function()

    def attempt(all_funcs_one_use: bool, lower_tensor_lists: bool) -> bytes:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        converter.experimental_enable_resource_variables = True
        converter.exclude_conversion_metadata = True  # stable bytes, no build environment
        # pylint: disable=protected-access; these are the flags ODP's plan builder sets.
        converter._experimental_allow_all_select_tf_ops = True
        converter._experimental_preserve_assert_op = True
        converter._experimental_unfold_large_splat_constant = True
        converter._experimental_guarantee_all_funcs_one_use = all_funcs_one_use
        converter._experimental_lower_tensor_list_ops = lower_tensor_lists
        return converter.convert()

    options = [(False, True), (True, True), (True, False)]
    last: Exception | None = None
    for one_use, lower in options:
        try:
            return attempt(one_use, lower)
        except Exception as err:  # noqa: BLE001 - the converter raises several unrelated types
            last = err
            text = str(err)
            # Retry only for the two failures a flag fixes (as ODP does for the first).
            if "StatefulPartitionedCall" not in text and "tensor_list" not in text.lower():
                break
    summary = " ".join(str(last).split())[:2000]
    raise TfliteConversionError(
        f"{CLIENT_PLAN_ERROR_PREFIX}TFLite conversion of the {what} failed: {summary}",
        hint="build the model from ops TFLite (with select TF ops) can convert; --skip_flex_ops_check skips this check",
    ) from last


@dataclass(frozen=True)
class FlexOpsReport:
    """Flex ops and minimum client versions of the training and evaluation computations."""

    training_ops: dict[str, str]
    eval_ops: dict[str, str]
    training_min_client_version: str
    eval_min_client_version: str
    training_tflite: bytes = field(repr=False)
    eval_tflite: bytes = field(repr=False)
    table_version: str = FLEX_OPS_TABLE_VERSION
    unsupported: dict[str, str] = field(default_factory=dict)  # only with enforce=False

    @property
    def ops(self) -> dict[str, str]:
        """All Flex ops (op -> kernel), sorted by op."""
        return dict(sorted({**self.eval_ops, **self.training_ops}.items()))

    @property
    def min_client_version(self) -> str:
        """The highest of the two computations' minimum versions."""
        return str(max(int(self.training_min_client_version), int(self.eval_min_client_version)))

    def plan_step(self, kind: str) -> Any:
        """The :class:`~fedcompute.plans.TfliteStep` a ``TRAINING`` or ``EVALUATION`` plan carries."""
        from fedcompute.plans import TfliteStep

        model, ops = (self.training_tflite, self.training_ops) if kind == "TRAINING" else \
            (self.eval_tflite, self.eval_ops)
        inputs, outputs = signature_io(model)
        return TfliteStep(model, inputs, outputs, tuple(ops))


def check_flex_ops(
    model: Any,
    *,
    client_optimizer: str = "SGD",
    learning_algo: str = "FED_AVG",
    table: FlexOpsTable | None = None,
    example_spec: Mapping[str, Any] | None = None,
    enforce: bool = True,
) -> FlexOpsReport:
    """Convert one training step and one evaluation step to TFLite and map their Flex ops.

    Pass the model check's ``example_spec`` to include in-graph example parsing, like ODP
    (see :func:`build_client_modules`).

    Raises :class:`UnsupportedOpsError` (ops of both computations together) when an op is
    not in the table, :class:`TfliteConversionError` when conversion fails. With
    ``enforce=False`` (``--skip_flex_ops_check``, as ODP) unlisted ops do not fail the build:
    the report lists them in ``unsupported`` and the minimum versions stay ``"0"``.
    """
    table = table or load_flex_ops_table()
    train_module, eval_module = build_client_modules(
        model, client_optimizer=client_optimizer, learning_algo=learning_algo, example_spec=example_spec,
    )
    training_tflite = convert_to_tflite(train_module, "client training step")
    eval_tflite = convert_to_tflite(eval_module, "client evaluation step")
    training_ops = list_flex_ops(training_tflite)
    eval_ops = list_flex_ops(eval_tflite)
    unsupported = {
        op: kernel for op, kernel in {**eval_ops, **training_ops}.items() if op not in table.min_versions
    }
    if unsupported and enforce:
        raise UnsupportedOpsError(unsupported)
    return FlexOpsReport(
        training_ops=training_ops,
        eval_ops=eval_ops,
        training_min_client_version=table.min_client_version(training_ops) if enforce else NO_FLEX_OPS_VERSION,
        eval_min_client_version=table.min_client_version(eval_ops) if enforce else NO_FLEX_OPS_VERSION,
        training_tflite=training_tflite,
        eval_tflite=eval_tflite,
        table_version=table.version,
        unsupported=dict(sorted(unsupported.items())),
    )


def signature_io(tflite_model: bytes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(inputs, outputs)`` of the model's only signature as
    :class:`~fedcompute.tensor_spec.TensorSpec`s sorted by name, ``-1`` for a
    dimension of any size (what the plan's ``TensorflowSpec`` lists)."""
    from fedcompute.tensor_spec import TensorSpec

    tf = _tf()
    runner = tf.lite.Interpreter(model_content=tflite_model).get_signature_runner()

    def describe(details: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(name, tuple(int(d) for d in detail["shape_signature"]), tf.as_dtype(detail["dtype"]).name)
            for name, detail in sorted(details.items())
        )

    return describe(runner.get_input_details()), describe(runner.get_output_details())
