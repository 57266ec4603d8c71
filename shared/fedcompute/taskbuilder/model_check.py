"""Load and check the SavedFunctionalModel a developer hands to the task builder.

The model is the directory written by ``tff.learning.models.save_functional_model``.
It is loaded with plain ``tf.saved_model.load`` (no TensorFlow Federated import), which
exposes ``predict_on_batch_training`` / ``predict_on_batch_inference``
(``(model_weights, x, training)`` -> flat list of outputs; ``model_weights`` is a tuple
``(trainable, non_trainable)`` of tuples), ``loss`` (``(output, label, sample_weight)`` ->
``[loss]``), ``__call__()`` (the initial weights) and ``serialized_input_spec`` (a TFF type
proto; the specs are read from the function signatures instead, so TFF is not needed).

The two input layouts the seed supports:

* type 1: ``(features TensorSpec, label TensorSpec)``; each ``tf.train.Example`` holds
  feature ``x`` (the features flattened) and label ``y``;
* type 2: ``(OrderedDict[name, TensorSpec], label TensorSpec)``; one example feature per
  name, and the label under the task config's ``label_name``.

The list kind follows the dtype: floating -> ``float_list``, integer/bool -> ``int64_list``.
:func:`check_model` derives that layout (``example_spec``, the same dict format as
``fedcompute.data.examples.ExampleSpec.to_dict``) and runs the model once on a batch parsed
from serialized examples, so a model that cannot train on devices fails at build time.

TensorFlow is imported inside functions only.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedcompute.errors import ArtifactBuildError

TYPE1_FEATURE_NAME = "x"
TYPE1_LABEL_NAME = "y"
EXAMPLE_SPEC_VERSION = 1
SAMPLE_BATCH_SIZE = 3  # ODP's default client batch size
REQUIRED_ATTRIBUTES = ("predict_on_batch_training", "predict_on_batch_inference", "loss", "serialized_input_spec")

_SAVE_HINT = "save it with tff.learning.models.save_functional_model(functional_model, path)"
_CONVERT_HINT = (
    "convert the Keras model with tff.learning.models.functional_model_from_keras(keras_model, "
    "loss_fn=..., input_spec=...) and save the result with "
    "tff.learning.models.save_functional_model(functional_model, path)"
)
_DENSE_HINT = "TFLite does not support tf.sparse.SparseTensor / tf.RaggedTensor; use dense tf.Tensor inputs"
_LABEL_NAME_HINT = 'register label_name in the task builder config, e.g. label_name: "my_label"'


class ModelCheckError(ArtifactBuildError):
    """The saved model cannot be used for federated training on devices."""


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


MAX_ERROR_TEXT = 300


def describe_error(err: BaseException) -> str:
    """A failure of the model, safe to return to the caller.

    A TensorFlow runtime error's text can quote tensor values (``StringToNumber`` quotes
    the string it could not parse, an ``Assert`` its data), so only its class and the
    failing op and node are reported. Other errors (signature mismatches raised while
    tracing) keep their first line, truncated.
    """
    tf = _tf()
    if isinstance(err, tf.errors.OpError):
        node_def = getattr(err, "node_def", None)
        op, node = getattr(node_def, "op", ""), getattr(node_def, "name", "")
        where = f" in op {op} (node {node!r})" if op else ""
        return f"TensorFlow {type(err).__name__}{where}"
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:MAX_ERROR_TEXT]}"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    """A loaded SavedFunctionalModel and the specs read from its function signatures.

    ``x_spec`` is a ``tf.TensorSpec`` (type 1) or a dict name -> ``tf.TensorSpec`` (type 2,
    model order); ``output_spec`` is the structure ``loss`` expects as its first argument.
    """

    module: Any
    path: str | None
    x_spec: Any
    y_spec: Any
    output_spec: Any
    trainable_specs: tuple[Any, ...]
    non_trainable_specs: tuple[Any, ...]

    @property
    def num_parameters(self) -> int:
        """Number of scalars in the trainable and non-trainable weights."""
        return sum(
            math.prod(int(d) for d in s.shape) for s in self.trainable_specs + self.non_trainable_specs
        )

    def initial_weights(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """``(trainable, non_trainable)`` tensors of the initial model."""
        trainable, non_trainable = self.module()
        return tuple(trainable), tuple(non_trainable)

    def predict(self, model_weights: Any, x: Any, *, training: bool) -> Any:
        """The model's output, packed as ``loss`` expects it."""
        import tensorflow as tf  # not _tf(): this runs inside tf.functions (AutoGraph)

        fn = self.module.predict_on_batch_training if training else self.module.predict_on_batch_inference
        flat = tf.nest.flatten(fn(model_weights, x, training=training))
        return tf.nest.pack_sequence_as(self.output_spec, flat)

    def loss(self, output: Any, y: Any) -> Any:
        """The scalar (batch-mean) loss."""
        import tensorflow as tf

        return tf.nest.flatten(self.module.loss(output, y, None))[0]


def _strip_names(spec: Any) -> Any:
    tf = _tf()

    def one(s: Any) -> Any:
        return tf.TensorSpec(s.shape, s.dtype) if isinstance(s, tf.TensorSpec) else s

    return tf.nest.map_structure(one, spec, expand_composites=False)


def loaded_model_from_module(module: Any, path: str | None = None) -> LoadedModel:
    """Wrap an already loaded SavedModel object, checking it is a functional model."""
    where = path or "the saved model"
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(module, a)]
    if missing:
        raise ModelCheckError(
            f"{where} is a TensorFlow SavedModel but not a TFF SavedFunctionalModel: it lacks "
            f"{', '.join(missing)}",
            hint=_CONVERT_HINT,
        )
    try:
        (weights_spec, x_spec, _training), _ = module.predict_on_batch_training.structured_input_signature
        (output_spec, y_spec, _sample_weight), _ = module.loss.structured_input_signature
        trainable, non_trainable = weights_spec
    except (AttributeError, TypeError, ValueError) as err:
        raise ModelCheckError(
            f"{where}: unexpected signatures for predict_on_batch_training / loss ({describe_error(err)})",
            hint=_SAVE_HINT,
        ) from err
    return LoadedModel(
        module=module,
        path=path,
        x_spec=_strip_names(x_spec),
        y_spec=_strip_names(y_spec),
        output_spec=_strip_names(output_spec),
        trainable_specs=tuple(_strip_names(s) for s in trainable),
        non_trainable_specs=tuple(_strip_names(s) for s in non_trainable),
    )


def load_functional_model_checked(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a SavedFunctionalModel directory with errors that say how to fix it."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise ModelCheckError(
            f"the saved model directory {directory} does not exist (or is not a directory)",
            hint=_SAVE_HINT,
        )
    if not os.path.isfile(os.path.join(directory, "saved_model.pb")):
        raise ModelCheckError(
            f"not a SavedModel: no saved_model.pb in {directory}; {_SAVE_HINT.replace('save it', 'save the model')}"
        )
    from fedcompute.taskbuilder.op_allowlist import check_saved_model_file

    check_saved_model_file(directory)  # before any op of the model can run
    tf = _tf()
    try:
        module = tf.saved_model.load(directory)
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise ModelCheckError(f"cannot load the SavedModel in {directory}: {describe_error(err)}",
                              hint=_SAVE_HINT) from err
    return loaded_model_from_module(module, directory)


def as_loaded_model(model: Any) -> LoadedModel:
    """Accept a :class:`LoadedModel`, a directory, a ``tf.saved_model.load`` result or the
    result of ``tff.learning.models.load_functional_model`` (which wraps the module)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_functional_model_checked(model)
    inner = getattr(model, "_loaded_module", None)  # tff's _LoadedFunctionalModel (TFF 0.87)
    return loaded_model_from_module(inner if inner is not None else model)


# --------------------------------------------------------------------------- input spec


def _kind(spec: Any) -> str:
    name = type(spec).__name__
    if name in ("RaggedTensorSpec", "SparseTensorSpec"):
        return "composite"
    return "tensor" if name == "TensorSpec" else "other"


def _dtype_name(dtype: Any) -> str:
    return getattr(dtype, "name", str(dtype))


def _is_float(dtype: Any) -> bool:
    return bool(getattr(dtype, "is_floating", False))


def _is_int(dtype: Any) -> bool:
    return bool(getattr(dtype, "is_integer", False)) or _dtype_name(dtype) == "bool"


def _dims(spec: Any) -> list[int | None] | None:
    shape = spec.shape
    if getattr(shape, "rank", None) is None:
        return None
    return [None if d is None else int(d) for d in shape.as_list()]


def _feature_entry(name: str, spec: Any, what: str) -> dict[str, Any]:
    kind = _kind(spec)
    if kind == "composite":
        raise ModelCheckError(f"{what} is a {type(spec).__name__}: {_DENSE_HINT}")
    if kind != "tensor":
        raise ModelCheckError(
            f"{what} is a {type(spec).__name__}, expected a tf.TensorSpec",
            hint="input_spec must be (features, label) or (OrderedDict[name, tf.TensorSpec], label)",
        )
    if not (_is_float(spec.dtype) or _is_int(spec.dtype)):
        raise ModelCheckError(
            f"{what} has dtype {_dtype_name(spec.dtype)}; tf.train.Example features here are "
            "float_list (floating dtypes) or int64_list (integer/bool dtypes)",
            hint="feed numeric tensors to the model",
        )
    dims = _dims(spec)
    if not dims:
        raise ModelCheckError(
            f"{what} must have a batch dimension first (shape [None, ...]), got {spec.shape}",
            hint="declare the TensorSpec as [None, ...]",
        )
    if any(d is None for d in dims[1:]):
        raise ModelCheckError(
            f"{what} has shape {spec.shape}: every dimension except the batch one must be fixed "
            "(examples are parsed as fixed-length features)",
            hint="give every per-example dimension a size",
        )
    return {"name": name, "shape": [int(d or 0) for d in dims[1:]], "dtype": _dtype_name(spec.dtype)}  # dims[1:] checked fixed above


def check_input_spec(x_spec: Any, y_spec: Any, *, label_name: str | None) -> dict[str, Any]:
    """Validate a model's ``(x, y)`` input spec; return the ``example_spec`` dict.

    Pure over the spec objects (works on hand-built ``tf.TensorSpec`` / ``RaggedTensorSpec``).
    Type 1 uses features ``x`` and label ``y`` (``label_name`` is not used); type 2 needs
    ``label_name``, which must not be a feature name.
    """
    if _kind(y_spec) == "composite":
        raise ModelCheckError(f"the label spec is a {type(y_spec).__name__}: {_DENSE_HINT}")
    if isinstance(x_spec, Mapping):
        input_type = 2
        if not x_spec:
            raise ModelCheckError("the model's feature OrderedDict in input_spec is empty")
        if not label_name:
            raise ModelCheckError(
                "the model takes a dict of features (input type 2) but the config has no label_name, "
                "so the label cannot be found in the examples",
                hint=_LABEL_NAME_HINT,
            )
        names = [str(k) for k in x_spec]
        if label_name in names:
            raise ModelCheckError(
                f"label_name {label_name!r} is also one of the model's feature names {names}",
                hint="choose a label_name that differs from every feature name",
            )
        # Sorted by name: the loaded signature's dict order is not the model's OrderedDict
        # order (reading that needs TFF), and examples are parsed by name anyway.
        features = [_feature_entry(str(k), x_spec[k], f"feature {k!r}") for k in sorted(x_spec, key=str)]
        label = label_name
    elif isinstance(x_spec, Sequence) and not isinstance(x_spec, str):
        raise ModelCheckError(
            "the features part of input_spec is a sequence; use one tf.TensorSpec (input type 1) "
            "or an OrderedDict[name, tf.TensorSpec] (input type 2)"
        )
    else:
        input_type = 1
        features = [_feature_entry(TYPE1_FEATURE_NAME, x_spec, "the features spec")]
        label = TYPE1_LABEL_NAME
    label_entry = _check_label(y_spec, label)
    return {"version": EXAMPLE_SPEC_VERSION, "input_type": input_type, "features": features, "label": label_entry}


def _check_label(y_spec: Any, name: str) -> dict[str, Any]:
    if _kind(y_spec) != "tensor":
        raise ModelCheckError(f"the label spec is a {type(y_spec).__name__}, expected a tf.TensorSpec")
    if not (_is_float(y_spec.dtype) or _is_int(y_spec.dtype)) or _dtype_name(y_spec.dtype) == "bool":
        raise ModelCheckError(
            f"the label has dtype {_dtype_name(y_spec.dtype)}; it must be an integer or floating dtype",
            hint="e.g. tf.TensorSpec([None, 1], tf.int64)",
        )
    dims = _dims(y_spec)
    if dims not in ([None], [None, 1]):
        raise ModelCheckError(
            f"the label has shape {y_spec.shape}; it must be [None, 1] or [None] (one label per example)",
            hint="e.g. tf.TensorSpec([None, 1], tf.int64)",
        )
    return {"name": name, "shape": [int(d or 0) for d in dims[1:]], "dtype": _dtype_name(y_spec.dtype)}  # checked fixed above


# --------------------------------------------------------------------------- examples


def serialize_examples(example_spec: Mapping[str, Any], features: Mapping[str, Any], labels: Any) -> list[bytes]:
    """Serialized ``tf.train.Example`` protos in the layout of ``example_spec``.

    ``features`` maps each feature name to an array ``[batch, *shape]``; ``labels`` is
    ``[batch]`` or ``[batch, 1]``. (A small helper; ``fedcompute.data.examples`` has the
    fast, TF-free encoder devices use.)
    """
    import numpy as np

    tf = _tf()

    def feature(values: Any, dtype: str) -> Any:
        flat = np.asarray(values).reshape(-1)
        if tf.as_dtype(dtype).is_floating:
            return tf.train.Feature(float_list=tf.train.FloatList(value=flat.astype(np.float32).tolist()))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=flat.astype(np.int64).tolist()))

    labels = np.asarray(labels)
    out = []
    for i in range(labels.shape[0]):
        entries = {f["name"]: feature(np.asarray(features[f["name"]])[i], f["dtype"]) for f in example_spec["features"]}
        label = example_spec["label"]
        entries[label["name"]] = feature(labels[i], label["dtype"])
        out.append(tf.train.Example(features=tf.train.Features(feature=entries)).SerializeToString())
    return out


def parse_examples(example_spec: Mapping[str, Any], serialized: Any) -> tuple[Any, Any]:
    """Parse serialized examples into the model's ``(x, y)`` (``x`` a tensor or a dict).

    Also used inside the client ``tf.function``s (the ``ParseExampleV2`` op a device runs).
    """
    import tensorflow as tf  # not _tf(): this may run inside a tf.function (AutoGraph)


    def fixed(entry: Mapping[str, Any]) -> Any:
        dtype = tf.as_dtype(entry["dtype"])
        return tf.io.FixedLenFeature(entry["shape"], tf.float32 if dtype.is_floating else tf.int64)

    description = {f["name"]: fixed(f) for f in example_spec["features"]}
    label = example_spec["label"]
    description[label["name"]] = fixed(label)
    parsed = tf.io.parse_example(serialized, description)

    def cast(entry: Mapping[str, Any]) -> Any:
        return tf.cast(parsed[entry["name"]], tf.as_dtype(entry["dtype"]))

    features = {f["name"]: cast(f) for f in example_spec["features"]}
    x = features[TYPE1_FEATURE_NAME] if example_spec["input_type"] == 1 else features
    return x, cast(label)


def sample_batch(example_spec: Mapping[str, Any], batch_size: int = SAMPLE_BATCH_SIZE, seed: int = 0) -> tuple[Any, Any]:
    """A deterministic batch, round-tripped through serialized examples like device data.

    Features are uniform in [0, 1) (integers: 0/1); labels are 0 (a valid class for any
    classifier and a valid regression target).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    features = {}
    for f in example_spec["features"]:
        shape = (batch_size, *f["shape"])
        features[f["name"]] = (
            rng.random(shape) if _tf().as_dtype(f["dtype"]).is_floating else rng.integers(0, 2, shape)
        )
    labels = np.zeros((batch_size, *example_spec["label"]["shape"]))
    return parse_examples(example_spec, serialize_examples(example_spec, features, labels))


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class ModelCheckResult:
    """What the task builder learns from the model (the client plan carries ``example_spec``)."""

    input_type: int
    example_spec: dict[str, Any]
    label_name: str
    num_parameters: int
    sample_loss: float


def check_model(
    model: LoadedModel | Any,
    *,
    label_name: str | None,
    input_type: int | None = None,
    batch_size: int = SAMPLE_BATCH_SIZE,
) -> ModelCheckResult:
    """Check the model's input spec and run it once on examples parsed like device data.

    ``label_name`` is the task config's (required for input type 2). ``input_type``, when
    given, must match the detected layout (1 or 2). Predictions (training and inference
    mode) and the loss must be finite.
    """
    tf = _tf()
    loaded = as_loaded_model(model)
    example_spec = check_input_spec(loaded.x_spec, loaded.y_spec, label_name=label_name)
    detected = example_spec["input_type"]
    if input_type is not None and input_type != detected:
        raise ModelCheckError(
            f"the config expects input type {input_type} but the model's input_spec is type {detected}",
            hint="type 1 is (features, label); type 2 is (OrderedDict[name, features], label)",
        )
    x, y = sample_batch(example_spec, batch_size)
    weights = loaded.initial_weights()
    where = loaded.path or "the model"
    try:
        losses = []
        for training in (True, False):
            output = loaded.predict(weights, x, training=training)
            loss = loaded.loss(output, y)
            for t in tf.nest.flatten(output) + [loss]:
                if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))):
                    raise ModelCheckError(
                        f"{where} produced non-finite {'loss' if t is loss else 'predictions'} on a "
                        f"sample batch ({'training' if training else 'inference'} mode)",
                        hint="check the model's initial weights and loss function",
                    )
            losses.append(float(loss))
    except ModelCheckError:
        raise
    except (tf.errors.OpError, ValueError, TypeError) as err:
        raise ModelCheckError(
            f"{where} failed on a sample batch parsed from tf.train.Example ({example_spec['features']} "
            f"-> label {example_spec['label']}): {describe_error(err)}",
            hint="the model's input_spec must match what its predict and loss functions accept",
        ) from err
    return ModelCheckResult(
        input_type=detected,
        example_spec=example_spec,
        label_name=example_spec["label"]["name"],
        num_parameters=loaded.num_parameters,
        sample_loss=losses[0],
    )
