"""Trained weights back into the task's own model: Keras SavedModel, ``.keras`` and TFLite.

A task's model is the SavedFunctionalModel the operator uploaded (inside the client plan);
a checkpoint holds its weights, trainable then non-trainable. :class:`FederatedKerasModel`
is a Keras model that owns those weights as variables and runs the functional model's
inference function, so the result is an ordinary Keras model:

* ``saved_model``: ``model.save(dir)`` (TensorFlow SavedModel with Keras metadata);
  ``tf.keras.models.load_model(dir)`` works with or without fedcompute installed.
* ``keras``: the Keras v3 archive ``model.keras``; the functional model's graph rides in
  the archive's assets, and ``tf.keras.models.load_model`` finds this class by its module
  (fedcompute must be importable).
* ``tflite``: ``model.tflite`` for inference (float32, TFLite builtin ops).

Every export is verified: the written file is reloaded and must predict what the
in-memory model predicts on the probe batch (see :func:`verify`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fedcompute.errors import InvalidRequestError

FORMATS: tuple[str, ...] = ("saved_model", "keras", "tflite")
# TFLite runs the same float32 graph with different kernels: predictions (probabilities)
# agree to well under 1e-4 on the demo CNN; 1e-4 is the bound the export check holds to.
TFLITE_TOLERANCE = 1e-4
KERAS_TOLERANCE = 1e-6
FILE_NAMES = {"saved_model": "saved_model", "keras": "model.keras", "tflite": "model.tflite"}


@tf.keras.utils.register_keras_serializable(package="fedcompute")
class FederatedKerasModel(tf.keras.Model):
    """A SavedFunctionalModel's inference function with its weights as Keras variables."""

    def __init__(self, weight_specs: Sequence[dict[str, Any]], input_shape: Sequence[int | None],
                 input_dtype: str = "float32", functional_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight_specs = [dict(s) for s in weight_specs]
        self.example_input_shape = list(input_shape)
        self.input_dtype = input_dtype
        self._functional: Any = None
        for i, spec in enumerate(self.weight_specs):
            self.add_weight(name=f"w{i}_{spec['name'].replace('/', '_').replace(':', '_')}",
                            shape=tuple(spec["shape"]), dtype=spec["dtype"], trainable=bool(spec["trainable"]),
                            initializer="zeros")
        self.built = True
        if functional_dir is not None:
            self._attach(functional_dir)

    def _attach(self, functional_dir: str) -> None:
        self._functional_dir = functional_dir
        self._functional = tf.saved_model.load(functional_dir)

    def build(self, input_shape: Any) -> None:
        # The weights exist from __init__; Keras' default build would call the model, which
        # cannot run before load_assets attaches the functional model.
        self.built = True

    def call(self, inputs: Any, training: bool = False) -> Any:
        if self._functional is None:
            raise InvalidRequestError("this FederatedKerasModel has no functional model attached",
                                      hint="load it with tf.keras.models.load_model from a file export_model wrote")
        trainable = tuple(self.trainable_weights)
        non_trainable = tuple(self.non_trainable_weights)
        out = self._functional.predict_on_batch_inference((trainable, non_trainable), inputs, training=False)
        return tf.nest.flatten(out)[0]

    def get_config(self) -> dict[str, Any]:
        return {"weight_specs": self.weight_specs, "input_shape": self.example_input_shape,
                "input_dtype": self.input_dtype, "name": self.name}

    # The functional model's graph travels in the .keras archive's assets.
    def save_assets(self, inner_path: str) -> None:
        shutil.copytree(self._functional_dir, os.path.join(inner_path, "functional_model"), dirs_exist_ok=True)

    def load_assets(self, inner_path: str) -> None:
        self._attach(os.path.join(inner_path, "functional_model"))


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    max_abs_difference: float  # reloaded file vs the in-memory model on the probe batch


def build_keras_model(functional_dir: str | os.PathLike[str], weights: Sequence[np.ndarray]) -> FederatedKerasModel:
    """The Keras model of the SavedFunctionalModel at ``functional_dir`` with ``weights`` set.

    Raises:
        InvalidRequestError: the weights do not match the model (count, shape).
    """
    from fedcompute.learning.client_training import load_model

    device_model = load_model(functional_dir, cache=False)
    specs = [(s, True) for s in device_model.trainable_specs] + [(s, False) for s in device_model.non_trainable_specs]
    if len(weights) != len(specs):
        raise InvalidRequestError(f"the checkpoint has {len(weights)} tensors; the task's model has {len(specs)}",
                                  hint="export a checkpoint of the same task")
    weight_specs = []
    for i, ((spec, trainable), w) in enumerate(zip(specs, weights, strict=True)):
        if tuple(np.shape(w)) != tuple(spec.shape.as_list()):
            raise InvalidRequestError(f"checkpoint tensor {i} has shape {list(np.shape(w))}; the model expects "
                                      f"{spec.shape.as_list()}", hint="export a checkpoint of the same task")
        weight_specs.append({"name": f"weight_{i}", "shape": spec.shape.as_list(), "dtype": spec.dtype.name,
                             "trainable": trainable})
    x_spec = device_model.x_spec
    if not isinstance(x_spec, tf.TensorSpec):
        raise InvalidRequestError("only models with a single input tensor can be exported",
                                  hint="export the raw checkpoint instead (fedcompute metrics / gsutil)")
    model = FederatedKerasModel(weight_specs, x_spec.shape.as_list(), x_spec.dtype.name,
                                functional_dir=os.fspath(functional_dir), name="federated_model")
    model.set_weights([np.asarray(w, dtype=s["dtype"]) for w, s in zip(weights, weight_specs, strict=True)])
    model(tf.zeros([1, *x_spec.shape.as_list()[1:]], x_spec.dtype))  # build: a traced call for saving
    return model


def _serving_function(model: FederatedKerasModel) -> Any:
    spec = tf.TensorSpec([None, *model.example_input_shape[1:]], model.input_dtype, name="inputs")
    return tf.function(lambda x: model(x), input_signature=[spec])


def tflite_bytes(model: FederatedKerasModel) -> bytes:
    """The model as a float32 TFLite flatbuffer (weights frozen in)."""
    concrete = _serving_function(model).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return bytes(converter.convert())


def tflite_predict(model_bytes: bytes | Path, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """Run a TFLite model on ``x`` in batches (the interpreter resizes its input)."""
    content = model_bytes.read_bytes() if isinstance(model_bytes, Path) else model_bytes
    interpreter = tf.lite.Interpreter(model_content=content)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        interpreter.resize_tensor_input(input_index, list(batch.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index).copy())
    return np.concatenate(outputs)


def export_model(model: FederatedKerasModel, fmt: str, out_dir: Path, probe: np.ndarray) -> ExportResult:
    """Write ``model`` to ``out_dir`` in ``fmt``, reload it and compare predictions on ``probe``.

    Raises:
        InvalidRequestError: unknown format, or the reloaded model predicts differently.
    """
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[fmt]
    expected = model.predict_on_batch(probe)
    if fmt == "tflite":
        data = tflite_bytes(model)
        _atomic_write(path, data)
        got, tolerance = tflite_predict(data, probe), TFLITE_TOLERANCE
    else:
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
        try:
            target = staging / FILE_NAMES[fmt]
            model.save(target) if fmt == "keras" else model.save(target, save_format="tf")
            reloaded = tf.keras.models.load_model(target, compile=False)
            got, tolerance = np.asarray(reloaded.predict_on_batch(probe)), KERAS_TOLERANCE
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(target, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    difference = float(np.max(np.abs(np.asarray(got) - np.asarray(expected)))) if len(probe) else 0.0
    if not difference <= tolerance:
        raise InvalidRequestError(f"the exported {fmt} model predicts differently from the checkpoint "
                                  f"(max |difference| {difference:.3g} > {tolerance:g})",
                                  hint="report this as a bug with the model; the saved_model format is the reference")
    return ExportResult(fmt, path, difference)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
