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
from collections.abc import Mapping
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
    client_learning_rate: float = 0.1,
    example_spec: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """``(train_module, eval_module)``: ``tf.Module``s with the weights as variables and a
    ``step`` ``tf.function`` with a concrete input signature (batch dimension None).

    With ``example_spec`` (from :func:`fedcompute.taskbuilder.model_check.check_model`) the
    step takes a batch of serialized ``tf.train.Example``s (``tf.string [None]``) and parses
    it in the graph, as ODP's client plans do (``ParseExampleV2`` becomes a Flex op);
    without it the step takes the model's ``(x, y)`` tensors.

    Training: forward (training mode), loss, gradients, one client optimizer update (SGD, or
    Adam as in ``tff.learning.optimizers.build_adam``), returns ``loss`` and ``predictions``.
    Evaluation: forward (inference mode) and loss, returns ``loss`` and ``predictions``.
    ``model`` is anything :func:`fedcompute.taskbuilder.model_check.as_loaded_model` takes.
    """
    from fedcompute.taskbuilder.model_check import as_loaded_model

    tf = _tf()
    optimizer = str(client_optimizer).upper()
    if optimizer not in OPTIMIZERS:
        raise ArtifactBuildError(f"unknown client optimizer {client_optimizer!r}; choose SGD or ADAM")
    loaded = as_loaded_model(model)
    trainable0, non_trainable0 = loaded.initial_weights()
    if example_spec is not None:
        from fedcompute.taskbuilder.model_check import parse_examples

        signature = [tf.TensorSpec([None], tf.string, name="serialized_examples")]

        def inputs(args: tuple[Any, ...]) -> tuple[Any, Any]:
            return parse_examples(example_spec, args[0])
    else:
        signature = [tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), loaded.x_spec),
                     tf.TensorSpec(loaded.y_spec.shape, loaded.y_spec.dtype)]

        def inputs(args: tuple[Any, ...]) -> tuple[Any, Any]:
            return args[0], args[1]

    def first_output(output: Any) -> Any:
        return tf.nest.flatten(output)[0]

    class TrainStep(tf.Module):  # type: ignore[name-defined]  # tf is imported lazily, so untyped here
        def __init__(self) -> None:
            super().__init__(name="client_train")
            self.trainable = [tf.Variable(w, name=f"trainable_{i}") for i, w in enumerate(trainable0)]
            self.non_trainable = [tf.Variable(w, trainable=False, name=f"non_trainable_{i}")
                                  for i, w in enumerate(non_trainable0)]
            if optimizer == "ADAM":
                self.accumulator = [tf.Variable(tf.zeros_like(w), trainable=False) for w in trainable0]
                self.preconditioner = [tf.Variable(tf.zeros_like(w), trainable=False) for w in trainable0]
                self.iteration = tf.Variable(0.0, trainable=False, name="iteration")

        @tf.function(input_signature=signature)
        def step(self, *args: Any) -> dict[str, Any]:
            x, y = inputs(args)
            weights = (tuple(self.trainable), tuple(self.non_trainable))
            with tf.GradientTape() as tape:
                output = loaded.predict(weights, x, training=True)
                loss = loaded.loss(output, y)
            grads = tape.gradient(loss, self.trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            lr = tf.constant(client_learning_rate, tf.float32)
            if optimizer == "SGD":
                for w, g in zip(self.trainable, grads):
                    w.assign_sub(tf.cast(lr, w.dtype) * g)
            else:
                self.iteration.assign_add(1.0)
                t = self.iteration
                scaled_lr = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA_2, t)) / (1.0 - tf.pow(ADAM_BETA_1, t))
                for w, a, p, g in zip(self.trainable, self.accumulator, self.preconditioner, grads):
                    a.assign(a + (g - a) * (1.0 - ADAM_BETA_1))
                    p.assign(p + (tf.square(g) - p) * (1.0 - ADAM_BETA_2))
                    w.assign_sub(tf.cast(scaled_lr, w.dtype) * a / (tf.sqrt(p) + ADAM_EPSILON))
            return {"loss": loss, "predictions": first_output(output)}

    class EvalStep(tf.Module):  # type: ignore[name-defined]  # tf is imported lazily, so untyped here
        def __init__(self) -> None:
            super().__init__(name="client_eval")
            self.trainable = [tf.Variable(w, trainable=False) for w in trainable0]
            self.non_trainable = [tf.Variable(w, trainable=False) for w in non_trainable0]

        @tf.function(input_signature=signature)
        def step(self, *args: Any) -> dict[str, Any]:
            x, y = inputs(args)
            output = loaded.predict((tuple(self.trainable), tuple(self.non_trainable)), x, training=False)
            return {"loss": loaded.loss(output, y), "predictions": first_output(output)}

    return TrainStep(), EvalStep()


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

    @property
    def ops(self) -> dict[str, str]:
        """All Flex ops (op -> kernel), sorted by op."""
        return dict(sorted({**self.eval_ops, **self.training_ops}.items()))

    @property
    def min_client_version(self) -> str:
        """The highest of the two computations' minimum versions."""
        return str(max(int(self.training_min_client_version), int(self.eval_min_client_version)))


def check_flex_ops(
    model: Any,
    *,
    client_optimizer: str = "SGD",
    client_learning_rate: float = 0.1,
    table: FlexOpsTable | None = None,
    example_spec: Mapping[str, Any] | None = None,
) -> FlexOpsReport:
    """Convert one training step and one evaluation step to TFLite and map their Flex ops.

    Pass the model check's ``example_spec`` to include in-graph example parsing, like ODP
    (see :func:`build_client_modules`).

    Raises :class:`UnsupportedOpsError` (ops of both computations together) when an op is
    not in the table, :class:`TfliteConversionError` when conversion fails.
    """
    table = table or load_flex_ops_table()
    train_module, eval_module = build_client_modules(
        model, client_optimizer=client_optimizer, client_learning_rate=client_learning_rate,
        example_spec=example_spec,
    )
    training_tflite = convert_to_tflite(train_module, "client training step")
    eval_tflite = convert_to_tflite(eval_module, "client evaluation step")
    training_ops = list_flex_ops(training_tflite)
    eval_ops = list_flex_ops(eval_tflite)
    unsupported = {
        op: kernel for op, kernel in {**eval_ops, **training_ops}.items() if op not in table.min_versions
    }
    if unsupported:
        raise UnsupportedOpsError(unsupported)
    return FlexOpsReport(
        training_ops=training_ops,
        eval_ops=eval_ops,
        training_min_client_version=table.min_client_version(training_ops),
        eval_min_client_version=table.min_client_version(eval_ops),
        training_tflite=training_tflite,
        eval_tflite=eval_tflite,
        table_version=table.version,
    )
