"""Server optimizers: numpy SGD / Adam against TFF 0.87's own optimizers, run eagerly."""
from __future__ import annotations

import numpy as np
import pytest

from fedcompute.errors import ConfigError
from fedcompute.learning.server_optimizer import Adam, Sgd, build_server_optimizer, optimizer_from_hparams

SPEC = [("w", (7, 5), "float32"), ("b", (5,), "float32"), ("s", (), "float32")]
STEPS = 6


def _weights_and_grads(seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s).astype(np.float32) for _, s, _ in SPEC]
    grads = [
        [(rng.standard_normal(s) * 10 ** rng.uniform(-3, 1)).astype(np.float32) for _, s, _ in SPEC]
        for _ in range(STEPS)
    ]
    return weights, grads


@pytest.fixture(scope="module")
def tff():
    import tensorflow_federated as tff  # ~10 s: only this module pays it

    return tff


def _run_tff(tff, optimizer, weights, grads) -> list[list[np.ndarray]]:
    import tensorflow as tf

    specs = tuple(tf.TensorSpec(s, tf.float32) for _, s, _ in SPEC)
    state = optimizer.initialize(specs)
    w = tuple(tf.constant(a) for a in weights)
    history = []
    for g in grads:
        state, w = optimizer.next(state, w, tuple(tf.constant(a) for a in g))
        history.append([np.asarray(x) for x in w])
    return history


def _run_ours(optimizer, weights, grads) -> list[list[np.ndarray]]:
    state = optimizer.initialize(SPEC)
    w = tuple(weights)
    history = []
    for g in grads:
        state, w = optimizer.next(state, w, g)
        assert state.step == len(history) + 1
        history.append(list(w))
    return history


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: Sgd(0.7), lambda tff: tff.learning.optimizers.build_sgdm(learning_rate=0.7)),
        (lambda: Adam(0.05), lambda tff: tff.learning.optimizers.build_adam(learning_rate=0.05)),
        (
            lambda: Adam(1.0, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
            lambda tff: tff.learning.optimizers.build_adam(learning_rate=1.0, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
        ),
    ],
    ids=["sgd", "adam-default", "adam-custom"],
)
def test_matches_tff(tff, ours, theirs) -> None:
    weights, grads = _weights_and_grads(seed=3)
    expected = _run_tff(tff, theirs(tff), weights, grads)
    got = _run_ours(ours(), weights, grads)
    for step, (e, g) in enumerate(zip(expected, got)):
        for a, b in zip(e, g):
            assert b.dtype == np.float32
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=f"step {step + 1}")
    # the update actually moved the weights (the comparison is not vacuous)
    assert not np.allclose(got[-1][0], weights[0])


def test_adam_state_is_plain_arrays_and_resumes() -> None:
    weights, grads = _weights_and_grads(seed=5)
    opt = Adam(0.1)
    straight = _run_ours(opt, weights, grads)[-1]
    state = opt.initialize(SPEC)
    w = tuple(weights)
    for g in grads[:3]:
        state, w = opt.next(state, w, g)
    # a resumed optimizer (rebuilt from recorded hparams, state copied) continues identically
    resumed = optimizer_from_hparams(opt.name, opt.hparams())
    state = type(state)(state.name, state.step, {k: tuple(np.array(a) for a in v) for k, v in state.slots.items()})
    for g in grads[3:]:
        state, w = resumed.next(state, w, g)
    for a, b in zip(straight, w):
        np.testing.assert_array_equal(a, b)
    assert set(state.slots) == {"accumulator", "preconditioner"}


def test_validation_and_builder() -> None:
    assert isinstance(build_server_optimizer("SGD", 1.0), Sgd)
    assert isinstance(build_server_optimizer("adam", 0.01), Adam)
    with pytest.raises(ConfigError, match="unknown server optimizer 'RMSPROP'"):
        build_server_optimizer("RMSPROP", 1.0)
    with pytest.raises(ConfigError, match="learning rate must be >= 0"):
        Sgd(-1.0)
    with pytest.raises(ConfigError, match="beta_1 must be in"):
        Adam(0.1, beta_1=1.5)
    with pytest.raises(ValueError, match="belongs to 'sgd'"):
        zeros = [np.zeros(s, np.float32) for _, s, _ in SPEC]
        Adam(0.1).next(Sgd(1.0).initialize(SPEC), zeros, zeros)
