"""Device-side local training of a TFF SavedFunctionalModel (what a simulated phone runs).

The model is a directory written by ``tff.learning.models.save_functional_model``. It is
loaded with plain ``tf.saved_model.load`` (~30 ms, no TensorFlow Federated import), which
exposes:

- ``__call__()`` -> ``((trainable...), (non_trainable...))``: the initial weights;
- ``predict_on_batch_training(model_weights, x, training=True)`` and
  ``predict_on_batch_inference(model_weights, x, training=False)`` -> flat list of outputs;
  ``model_weights`` must be a tuple of tuples ``(trainable, non_trainable)``;
- ``loss(output, label, sample_weight)`` (``sample_weight`` passed as ``None``) -> ``[loss]``,
  the mean loss over the batch;
- ``serialized_input_spec`` (a TFF type proto; the specs are read from the function
  signatures instead, so TFF is not needed at run time).

Conventions (they mirror TFF 0.87 so that a round here equals a TFF round):

- Weights are flat lists of numpy arrays, trainable then non-trainable, in the model's
  order. Local training never changes non-trainable weights (as in TFF's functional
  client work), so ``LocalResult.delta`` covers the **trainable weights only**.
- ``FED_AVG``: ``epochs`` passes over the batches (at most ``max_batches`` optimizer steps
  in total), each step the client optimizer on that batch's mean loss; SGD is
  ``w - lr * g``; ADAM is TFF's ``build_adam(lr)`` (beta1 0.9, beta2 0.999, eps 1e-7),
  with fresh optimizer state every round. ``delta = trained - initial``. TFF's client
  sends ``initial - trained`` and its server optimizer treats that as a gradient; so the
  server here must treat ``-mean(delta)`` as the gradient: with server SGD(lr 1.0) the new
  model is ``w + mean(delta)`` (``build_unweighted_fed_avg``).
- ``FED_SGD``: one gradient of the mean loss over all the device's examples (computed batch
  by batch, each batch gradient weighted by its size, like ``tff.learning.algorithms.
  build_fed_sgd``), no local step, no client learning rate, epochs ignored. The device
  sends ``delta = -gradient`` (unscaled); the server's ``-mean(delta)`` is the gradient and
  its learning rate does the scaling. TFF's FedSGD averages client gradients *weighted by
  example count*; weight by ``num_examples`` to reproduce it exactly.
- Non-finite results: like TFF, a delta with any NaN/Inf is zeroed and its training
  metrics reset; ``non_finite`` is set so the server can skip it.
- Training metrics are computed like TFF's: on each batch's predictions made with the
  weights *before* that batch's step, accumulated over all steps (epochs included), as
  sufficient statistics (:mod:`fedcompute.learning.metric_stats`). ``loss`` and
  ``num_examples`` statistics are always included, besides the requested metrics.
- ``num_examples`` counts examples trained on (an example seen in two epochs counts twice,
  as in TFF with a repeated dataset).

TensorFlow is imported inside functions only. The compiled step functions are built once
per loaded model, with input signatures whose batch dimension is ``None``: one trace per
function, whatever the batch sizes.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcompute.errors import InvalidRequestError, NotFoundError
from fedcompute.learning import metric_stats as ms

ALGORITHMS = ("FED_AVG", "FED_SGD")
OPTIMIZERS = ("SGD", "ADAM")
# TFF build_adam defaults.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
ALWAYS_REPORTED = ("loss", "num_examples")

Batch = Any  # (x, y) tuple or {"x": ..., "y": ...}
MetricStats = dict[str, dict[str, np.ndarray]]


class ModelLoadError(InvalidRequestError):
    """The directory is not a loadable TFF SavedFunctionalModel."""


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


@dataclass(frozen=True)
class LocalResult:
    """What one device reports after local training.

    ``delta``: trainable weights only, model order (see the module docstring for the
    FED_AVG / FED_SGD conventions). ``loss``: mean training loss over the examples.
    ``metric_stats``: ``{metric: {stat: array}}`` sufficient statistics.
    """

    delta: list[np.ndarray]
    num_examples: int
    metric_stats: MetricStats
    loss: float
    num_batches: int
    non_finite: bool = False


_REQUIRED_ATTRS = ("predict_on_batch_training", "predict_on_batch_inference", "loss")


class DeviceModel:
    """A loaded SavedFunctionalModel and its compiled device computations (cached)."""

    def __init__(self, module: Any, path: str | None = None) -> None:
        tf = _tf()
        missing = [a for a in _REQUIRED_ATTRS if not hasattr(module, a)]
        if missing:
            raise ModelLoadError(
                f"{path or 'The model'} is not a TFF SavedFunctionalModel: it lacks {missing}.",
                hint="save the model with tff.learning.models.save_functional_model",
            )
        self.module = module
        self.path = path
        (weights_spec, x_spec, _training), _ = module.predict_on_batch_training.structured_input_signature
        (output_spec, y_spec, _sample_weight), _ = module.loss.structured_input_signature

        def unnamed(spec: Any) -> Any:
            return tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape, s.dtype), spec)

        trainable_spec, non_trainable_spec = weights_spec
        self.trainable_specs: tuple[Any, ...] = tuple(unnamed(s) for s in trainable_spec)
        self.non_trainable_specs: tuple[Any, ...] = tuple(unnamed(s) for s in non_trainable_spec)
        self.x_spec = unnamed(x_spec)
        self.y_spec = unnamed(y_spec)
        self.output_spec = unnamed(output_spec)
        self._fns: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- weights -----------------------------------------------------------------

    @property
    def num_trainable(self) -> int:
        return len(self.trainable_specs)

    @property
    def num_weights(self) -> int:
        return len(self.trainable_specs) + len(self.non_trainable_specs)

    @property
    def num_parameters(self) -> int:
        return int(sum(np.prod(s.shape.as_list()) for s in self.trainable_specs + self.non_trainable_specs))

    def initial_weights(self) -> list[np.ndarray]:
        """The model's saved initial weights, trainable then non-trainable."""
        trainable, non_trainable = self.module()
        return [t.numpy() for t in trainable] + [t.numpy() for t in non_trainable]

    def _split_weights(self, weights: Sequence[np.ndarray]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        tf = _tf()
        specs = self.trainable_specs + self.non_trainable_specs
        if len(weights) != len(specs):
            raise InvalidRequestError(
                f"The model has {len(specs)} weight tensors ({self.num_trainable} trainable); got {len(weights)}.",
                hint="pass trainable then non-trainable weights in the model's order",
            )
        tensors = []
        for i, (w, spec) in enumerate(zip(weights, specs)):
            arr = np.asarray(w, dtype=spec.dtype.as_numpy_dtype)
            if tuple(arr.shape) != tuple(spec.shape.as_list()):
                raise InvalidRequestError(
                    f"Weight {i} has shape {list(arr.shape)}; the model expects {spec.shape.as_list()}.",
                    hint="the checkpoint does not belong to this model",
                )
            tensors.append(tf.constant(arr))
        return tuple(tensors[: self.num_trainable]), tuple(tensors[self.num_trainable :])

    def predict(self, weights: Sequence[np.ndarray], x: Any) -> np.ndarray:
        """The inference outputs (first output tensor) on ``x`` with ``weights``."""
        trainable, non_trainable = self._split_weights(weights)
        out = self.module.predict_on_batch_inference((trainable, non_trainable), x, training=False)
        return np.asarray(_tf().nest.flatten(out)[0])

    # -- batches -----------------------------------------------------------------

    def _convert(self, value: Any, spec: Any, what: str) -> Any:
        tf = _tf()

        def one(s: Any, v: Any) -> np.ndarray:
            arr = np.asarray(v, dtype=s.dtype.as_numpy_dtype)
            if arr.ndim == s.shape.rank - 1 and s.shape.rank >= 1 and s.shape[-1] == 1:
                arr = arr.reshape(arr.shape + (1,))  # labels [N] for a [None, 1] spec
            if not s.shape.is_compatible_with(arr.shape):
                raise InvalidRequestError(
                    f"Batch {what} has shape {list(arr.shape)}; the model expects {s.shape.as_list()}.",
                    hint="reshape the examples to the model's input spec",
                )
            return arr

        if isinstance(spec, tf.TensorSpec):
            return one(spec, value)
        return tf.nest.map_structure(one, spec, value)

    def convert_batch(self, batch: Batch) -> tuple[Any, Any]:
        if isinstance(batch, Mapping):
            x, y = batch["x"], batch["y"]
        else:
            x, y = batch
        return self._convert(x, self.x_spec, "x"), self._convert(y, self.y_spec, "y")

    # -- compiled functions ------------------------------------------------------

    def fn(self, name: str) -> Any:
        """The compiled function ``name`` (built on first use, then reused)."""
        with self._lock:
            if not self._fns:
                self._fns.update(self._build_fns())
            return self._fns[name]

    def _build_fns(self) -> dict[str, Any]:
        tf = _tf()
        module = self.module
        output_spec = self.output_spec
        tr, nt = self.trainable_specs, self.non_trainable_specs
        scalar = tf.TensorSpec([], tf.float32)

        def forward(trainable: Any, non_trainable: Any, x: Any, y: Any, training: bool) -> tuple[Any, Any]:
            predict = module.predict_on_batch_training if training else module.predict_on_batch_inference
            flat = tf.nest.flatten(predict((trainable, non_trainable), x, training=training))
            loss = tf.nest.flatten(module.loss(tf.nest.pack_sequence_as(output_spec, flat), y, None))[0]
            return flat[0], loss

        def gradients(trainable: Any, non_trainable: Any, x: Any, y: Any) -> tuple[Any, Any, Any]:
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                pred, loss = forward(trainable, non_trainable, x, y, True)
            grads = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads, pred, loss

        @tf.function(input_signature=[tr, nt, self.x_spec, self.y_spec, scalar])
        def sgd_step(trainable, non_trainable, x, y, lr):
            grads, pred, loss = gradients(trainable, non_trainable, x, y)
            new = tuple(w - tf.cast(lr, g.dtype) * g for w, g in zip(trainable, grads))
            return new, pred, loss

        @tf.function(input_signature=[tr, nt, self.x_spec, self.y_spec, scalar, tr, tr, scalar])
        def adam_step(trainable, non_trainable, x, y, lr, acc, precond, step):
            # tff.learning.optimizers.build_adam, step already incremented (1-based).
            grads, pred, loss = gradients(trainable, non_trainable, x, y)
            beta_1 = tf.constant(ADAM_BETA_1, tf.float32)
            beta_2 = tf.constant(ADAM_BETA_2, tf.float32)
            eps = tf.constant(ADAM_EPSILON, tf.float32)
            normalized_lr = lr * tf.math.sqrt(1.0 - tf.math.pow(beta_2, step)) / (1.0 - tf.math.pow(beta_1, step))
            new_w, new_a, new_p = [], [], []
            for w, a, p, g in zip(trainable, acc, precond, grads):
                a = a + (g - a) * (1.0 - tf.cast(beta_1, a.dtype))
                p = p + (tf.math.square(g) - p) * (1.0 - tf.cast(beta_2, p.dtype))
                w = w - tf.cast(normalized_lr, a.dtype) * a / (tf.math.sqrt(p) + tf.cast(eps, p.dtype))
                new_w.append(w)
                new_a.append(a)
                new_p.append(p)
            return tuple(new_w), pred, loss, tuple(new_a), tuple(new_p)

        @tf.function(input_signature=[tr, nt, self.x_spec, self.y_spec, tr])
        def accumulate_gradient(trainable, non_trainable, x, y, acc):
            grads, pred, loss = gradients(trainable, non_trainable, x, y)
            n = tf.cast(tf.shape(pred)[0], tf.float32)
            return tuple(a + n * g for a, g in zip(acc, grads)), pred, loss

        @tf.function(input_signature=[tr, nt, self.x_spec, self.y_spec])
        def evaluate(trainable, non_trainable, x, y):
            return forward(trainable, non_trainable, x, y, False)

        return {
            "sgd_step": sgd_step,
            "adam_step": adam_step,
            "accumulate_gradient": accumulate_gradient,
            "evaluate": evaluate,
        }


_MODEL_CACHE: dict[str, DeviceModel] = {}
_MODEL_CACHE_LOCK = threading.Lock()


def load_model(path: str | os.PathLike[str], *, cache: bool = True) -> DeviceModel:
    """Load a SavedFunctionalModel directory (cached per resolved path by default)."""
    key = os.path.realpath(os.fspath(path))
    if cache:
        with _MODEL_CACHE_LOCK:
            if key in _MODEL_CACHE:
                return _MODEL_CACHE[key]
    if not os.path.isdir(key):
        raise NotFoundError(
            f"No saved model directory at {key}.",
            hint="pass the directory written by tff.learning.models.save_functional_model",
        )
    tf = _tf()
    try:
        module = tf.saved_model.load(key)
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise ModelLoadError(
            f"Cannot load the saved model at {key}: {err}",
            hint="the directory must be a TensorFlow SavedModel written by save_functional_model",
        ) from err
    model = DeviceModel(module, key)
    if cache:
        with _MODEL_CACHE_LOCK:
            model = _MODEL_CACHE.setdefault(key, model)
    return model


def clear_model_cache() -> None:
    """Forget the cached models (e.g. between tests)."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


@dataclass
class StatsAccumulator:
    """Sums a device's per-batch metric statistics (and its loss) over its batches."""

    metrics: tuple[str, ...]
    from_logits: bool
    stats: MetricStats = field(default_factory=dict)
    loss_sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.stats = {m: ms.zero_stats(m) for m in self.metrics}

    def add(self, y: np.ndarray, pred: np.ndarray, loss: float) -> None:
        batch = ms.compute_all(self.metrics, y, pred, from_logits=self.from_logits, batch_loss=loss)
        self.stats = ms.sum_all(self.stats, batch)
        n = int(pred.shape[0])
        self.loss_sum += loss * n
        self.count += n

    def reset(self) -> None:
        self.stats = {m: ms.zero_stats(m) for m in self.metrics}


def metric_list(metrics: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(list(metrics) + list(ALWAYS_REPORTED)))
    for name in names:
        ms.get_spec(name)  # rejects names outside the allow-list, with a hint
    return names


def epoch_batches(batches: Iterable[Batch], epochs: int) -> Iterator[Batch]:
    if epochs <= 1:
        yield from batches
        return
    if iter(batches) is batches:  # a one-shot iterator cannot be replayed: keep it
        batches = list(batches)
    for _ in range(epochs):
        yield from batches


def _finite(arrays: Sequence[np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


def train_on_device(
    model: DeviceModel,
    weights: Sequence[np.ndarray],
    batches: Iterable[Batch],
    *,
    algorithm: str = "FED_AVG",
    optimizer: str = "SGD",
    learning_rate: float = 0.1,
    epochs: int = 1,
    max_batches: int | None = None,
    metrics: Iterable[str] = (),
    from_logits: bool = False,
) -> LocalResult:
    """Train locally from ``weights`` on ``batches`` and return the update and statistics.

    ``batches`` yields ``(x, y)`` (or ``{"x", "y"}``) numpy batches; ``max_batches`` caps
    the optimizer steps (FED_AVG) or the batches in the gradient (FED_SGD), 0/None = no
    cap. ``from_logits``: the model outputs logits (only affects metric statistics).
    """
    algorithm, optimizer, lr_value, cap = check_training_args(algorithm, optimizer, learning_rate, epochs, max_batches)

    tf = _tf()
    trainable, non_trainable = model._split_weights(weights)
    initial = [t.numpy() for t in trainable]
    acc = StatsAccumulator(metric_list(metrics), from_logits)
    steps = 0
    source = epoch_batches(batches, 1 if algorithm == "FED_SGD" else epochs)

    if algorithm == "FED_SGD":
        step_fn = model.fn("accumulate_gradient")
        grad_sum = tuple(tf.zeros_like(t) for t in trainable)
        for batch in source:
            if cap is not None and steps >= cap:
                break
            x, y = model.convert_batch(batch)
            grad_sum, pred, loss = step_fn(trainable, non_trainable, x, y, grad_sum)
            acc.add(y, pred.numpy(), float(loss))
            steps += 1
        count = max(acc.count, 1)  # no data: a zero update rather than 0/0
        # -(sum_b n_b g_b / n): TFF's average gradient, negated into a "delta".
        delta = [-(g.numpy() / np.float32(count)) for g in grad_sum]
    else:
        lr = tf.constant(lr_value, tf.float32)
        if optimizer == "SGD":
            step_fn = model.fn("sgd_step")
            for batch in source:
                if cap is not None and steps >= cap:
                    break
                x, y = model.convert_batch(batch)
                trainable, pred, loss = step_fn(trainable, non_trainable, x, y, lr)
                acc.add(y, pred.numpy(), float(loss))
                steps += 1
        else:
            step_fn = model.fn("adam_step")
            moment = tuple(tf.zeros_like(t) for t in trainable)
            precond = tuple(tf.zeros_like(t) for t in trainable)
            for batch in source:
                if cap is not None and steps >= cap:
                    break
                x, y = model.convert_batch(batch)
                step = tf.constant(float(steps + 1), tf.float32)
                trainable, pred, loss, moment, precond = step_fn(
                    trainable, non_trainable, x, y, lr, moment, precond, step
                )
                acc.add(y, pred.numpy(), float(loss))
                steps += 1
        delta = [t.numpy() - w0 for t, w0 in zip(trainable, initial)]

    return local_result(delta, acc, steps)


def check_training_args(algorithm: str, optimizer: str, learning_rate: Any, epochs: int,
                        max_batches: int | None) -> tuple[str, str, float, int | None]:
    """``(ALGORITHM, OPTIMIZER, learning rate, batch cap or None)``, or a clear error."""
    algorithm = algorithm.upper()
    optimizer = optimizer.upper()
    if algorithm not in ALGORITHMS:
        raise InvalidRequestError(f"Unknown learning algorithm {algorithm!r}.", hint=f"use one of {ALGORITHMS}")
    if optimizer not in OPTIMIZERS:
        raise InvalidRequestError(f"Unknown client optimizer {optimizer!r}.", hint=f"use one of {OPTIMIZERS}")
    try:
        lr_value = float(learning_rate)
    except (TypeError, ValueError):
        lr_value = math.nan
    if not (math.isfinite(lr_value) and lr_value >= 0):
        raise InvalidRequestError(
            f"Client learning rate must be a finite number >= 0, got {learning_rate!r}.",
            hint="set client_learning_rate in the task config (ODP default 0.1)",
        )
    if epochs < 1:
        raise InvalidRequestError(f"epochs must be >= 1, got {epochs}.")
    return algorithm, optimizer, lr_value, (max_batches if max_batches and max_batches > 0 else None)


def local_result(delta: list[np.ndarray], acc: StatsAccumulator, steps: int) -> LocalResult:
    """The device's report from its delta and statistics (a non-finite delta is zeroed and
    its training metrics dropped, as in TFF)."""
    non_finite = not _finite(delta)
    if non_finite:
        delta = [np.zeros_like(d) for d in delta]
        acc.reset()
    mean_loss = acc.loss_sum / acc.count if acc.count else 0.0
    return LocalResult(
        delta=delta,
        num_examples=acc.count,
        metric_stats=acc.stats,
        loss=float(mean_loss),
        num_batches=steps,
        non_finite=non_finite,
    )


def evaluate_on_device(
    model: DeviceModel,
    weights: Sequence[np.ndarray],
    batches: Iterable[Batch],
    metrics: Iterable[str] = (),
    *,
    max_batches: int | None = None,
    from_logits: bool = False,
) -> MetricStats:
    """Forward pass only (inference mode): ``{metric: stats}`` incl. loss and num_examples."""
    trainable, non_trainable = model._split_weights(weights)
    fn = model.fn("evaluate")
    acc = StatsAccumulator(metric_list(metrics), from_logits)
    cap = max_batches if max_batches and max_batches > 0 else None
    for i, batch in enumerate(batches):
        if cap is not None and i >= cap:
            break
        x, y = model.convert_batch(batch)
        pred, loss = fn(trainable, non_trainable, x, y)
        acc.add(y, pred.numpy(), float(loss))
    return acc.stats


def batches_from_arrays(x: Any, y: np.ndarray, batch_size: int) -> list[tuple[Any, np.ndarray]]:
    """Consecutive ``(x, y)`` batches of ``batch_size`` (the last one may be smaller);
    ``x`` is an array or a dict name -> array (input type 2)."""
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}.")
    out = []
    for i in range(0, len(y), batch_size):
        part = slice(i, i + batch_size)
        out.append(({k: v[part] for k, v in x.items()} if isinstance(x, Mapping) else x[part], y[part]))
    return out
