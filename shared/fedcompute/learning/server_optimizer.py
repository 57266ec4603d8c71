"""Server optimizers in numpy, matching TFF 0.87's ``tff.learning.optimizers`` update rules.

``Sgd`` = ``build_sgdm(learning_rate)`` (no momentum): ``w -= lr * g``.
``Adam`` = ``build_adam(learning_rate, beta_1, beta_2, epsilon)``::

    t += 1
    acc  += (g - acc) * (1 - beta_1)
    s    += (g**2 - s) * (1 - beta_2)
    lr_t  = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)
    w    -= lr_t * acc / (sqrt(s) + epsilon)

computed in the weights' dtype like TFF. As in TFF's FedAvg, the "gradient" given to the
server optimizer is the negative of the averaged model delta (our deltas are
trained-minus-initial; TFF's are initial-minus-trained), see ``aggregation.server_round``.

State is plain data (step + named slot arrays), so it round-trips through a checkpoint;
hyperparameters belong to the optimizer object (they come from the task config).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedcompute.errors import ConfigError, InvariantError
from fedcompute.learning.tensor_codec import SpecLike, normalize_spec


@dataclass(frozen=True)
class OptimizerState:
    """``name`` of the optimizer, its ``step`` count and per-weight slot arrays by slot name."""

    name: str
    step: int = 0
    slots: Mapping[str, tuple[np.ndarray, ...]] = field(default_factory=dict)


class ServerOptimizer(Protocol):
    """What ``server_round`` needs from a server optimizer."""

    @property
    def name(self) -> str: ...

    def hparams(self) -> dict[str, float]: ...

    def initialize(self, spec: SpecLike) -> OptimizerState: ...

    def next(
        self, state: OptimizerState, weights: Sequence[np.ndarray], gradient: Sequence[np.ndarray]
    ) -> tuple[OptimizerState, tuple[np.ndarray, ...]]: ...


def _check_state(state: OptimizerState, name: str, weights: Sequence[np.ndarray], gradient: Sequence[np.ndarray]) -> None:
    if state.name != name:
        raise InvariantError(f"optimizer state belongs to {state.name!r}, not {name!r}")
    if len(weights) != len(gradient):
        raise InvariantError(f"{len(weights)} weights but {len(gradient)} gradients")
    for i, (w, g) in enumerate(zip(weights, gradient)):
        if np.shape(w) != np.shape(g):
            raise InvariantError(f"weight {i} has shape {np.shape(w)} but its gradient {np.shape(g)}")
    for slot, arrays in state.slots.items():
        if len(arrays) != len(weights) or any(np.shape(a) != np.shape(w) for a, w in zip(arrays, weights)):
            raise InvariantError(f"optimizer slot {slot!r} does not match the weights' shapes")


@dataclass(frozen=True)
class Sgd:
    """Plain SGD, as ``tff.learning.optimizers.build_sgdm(learning_rate)``."""

    learning_rate: float
    name: str = field(default="sgd", init=False)

    def __post_init__(self) -> None:
        if not self.learning_rate >= 0.0:
            raise ConfigError(f"SGD learning rate must be >= 0, got {self.learning_rate}", location="server_learning_rate")

    def hparams(self) -> dict[str, float]:
        return {"learning_rate": float(self.learning_rate)}

    def initialize(self, spec: SpecLike) -> OptimizerState:
        normalize_spec(spec)
        return OptimizerState(self.name, 0, {})

    def next(
        self, state: OptimizerState, weights: Sequence[np.ndarray], gradient: Sequence[np.ndarray]
    ) -> tuple[OptimizerState, tuple[np.ndarray, ...]]:
        _check_state(state, self.name, weights, gradient)
        new = tuple(
            np.asarray(w) - np.asarray(w).dtype.type(self.learning_rate) * np.asarray(g, dtype=np.asarray(w).dtype)
            for w, g in zip(weights, gradient)
        )
        return OptimizerState(self.name, state.step + 1, {}), new


@dataclass(frozen=True)
class Adam:
    """Adam, as ``tff.learning.optimizers.build_adam(learning_rate, beta_1, beta_2, epsilon)``."""

    learning_rate: float
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    name: str = field(default="adam", init=False)

    def __post_init__(self) -> None:
        if not self.learning_rate >= 0.0:
            raise ConfigError(f"Adam learning rate must be >= 0, got {self.learning_rate}", location="server_learning_rate")
        for key in ("beta_1", "beta_2"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"Adam {key} must be in [0, 1], got {value}")
        if not self.epsilon >= 0.0:
            raise ConfigError(f"Adam epsilon must be >= 0, got {self.epsilon}")

    def hparams(self) -> dict[str, float]:
        return {
            "learning_rate": float(self.learning_rate),
            "beta_1": float(self.beta_1),
            "beta_2": float(self.beta_2),
            "epsilon": float(self.epsilon),
        }

    def initialize(self, spec: SpecLike) -> OptimizerState:
        specs = normalize_spec(spec)
        zeros = lambda: tuple(np.zeros(s.shape, s.dtype) for s in specs)  # noqa: E731
        return OptimizerState(self.name, 0, {"accumulator": zeros(), "preconditioner": zeros()})

    def next(
        self, state: OptimizerState, weights: Sequence[np.ndarray], gradient: Sequence[np.ndarray]
    ) -> tuple[OptimizerState, tuple[np.ndarray, ...]]:
        _check_state(state, self.name, weights, gradient)
        step = state.step + 1
        new_w, new_a, new_p = [], [], []
        for w, a, p, g in zip(weights, state.slots["accumulator"], state.slots["preconditioner"], gradient):
            w = np.asarray(w)
            t = w.dtype.type  # TFF computes in the weight's dtype (float32 for Keras models)
            g = np.asarray(g, dtype=w.dtype)
            b1, b2 = t(self.beta_1), t(self.beta_2)
            normalized_lr = t(self.learning_rate) * np.sqrt(t(1) - np.power(b2, t(step))) / (t(1) - np.power(b1, t(step)))
            a = a + (g - a) * (t(1) - b1)
            p = p + (np.square(g) - p) * (t(1) - b2)
            new_w.append(w - normalized_lr * a / (np.sqrt(p) + t(self.epsilon)))
            new_a.append(a)
            new_p.append(p)
        slots = {"accumulator": tuple(new_a), "preconditioner": tuple(new_p)}
        return OptimizerState(self.name, step, slots), tuple(new_w)


_BUILDERS = {"SGD": Sgd, "ADAM": Adam}


def build_server_optimizer(kind: str, learning_rate: float) -> ServerOptimizer:
    """The server optimizer for a task config's ``server_optimizer`` (``SGD`` or ``ADAM``)."""
    try:
        return _BUILDERS[kind.upper()](learning_rate)
    except KeyError:
        raise ConfigError(
            f"unknown server optimizer {kind!r}", location="server_optimizer", hint="use SGD or ADAM"
        ) from None


def optimizer_from_hparams(name: str, hparams: Mapping[str, float]) -> ServerOptimizer:
    """Rebuild an optimizer from ``name`` and ``hparams()`` (as stored in a checkpoint)."""
    if name == "sgd":
        return Sgd(float(hparams["learning_rate"]))
    if name == "adam":
        return Adam(**{k: float(v) for k, v in hparams.items()})
    raise InvariantError(f"unknown optimizer {name!r} in checkpoint; expected 'sgd' or 'adam'")
