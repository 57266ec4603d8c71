"""Server checkpoints: ServerState <-> Checkpoint bytes, exact and versioned (no TF)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from fedcompute.dp import DpMechanism, DpParams
from fedcompute.errors import InvalidRequestError
from fedcompute.learning import dp_core, dp_mechanisms, server_round
from fedcompute.learning.checkpoint import (
    decode_checkpoint,
    decode_checkpoint_with_metadata,
    encode_checkpoint,
    optimizer_hparams,
)
from fedcompute.learning.server_optimizer import Adam, Sgd, optimizer_from_hparams
from fedcompute.learning.tensor_codec import ClientUpdate
from fedcompute.proto import tensors_pb2

SPEC = [("dense/kernel:0", (6, 3), "float32"), ("dense/bias:0", (3,), "float32")]


def _random_update(rng: np.random.Generator, num_examples: int) -> ClientUpdate:
    return ClientUpdate.from_arrays([(n, rng.standard_normal(s).astype(np.float32)) for n, s, _ in SPEC], num_examples)


def _state_after_rounds(optimizer, rounds: int = 2) -> server_round.ServerState:
    rng = np.random.default_rng(0)
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=0.3, noise_multiplier=0.0))
    state = server_round.initial_server_state([(n, rng.standard_normal(s).astype(np.float32)) for n, s, _ in SPEC], optimizer, dp)
    for _ in range(rounds):
        updates = [_random_update(rng, 4) for _ in range(3)]
        state, _, _ = server_round.server_round(state, updates, server_round.RoundConfig(report_goal=3, optimizer=optimizer, dp=dp))
    return state


def _assert_same(a: server_round.ServerState, b: server_round.ServerState) -> None:
    assert (a.round, a.spec) == (b.round, b.spec)
    for x, y in zip(a.weights, b.weights):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert (a.optimizer_state.name, a.optimizer_state.step) == (b.optimizer_state.name, b.optimizer_state.step)
    assert set(a.optimizer_state.slots) == set(b.optimizer_state.slots)
    for slot in a.optimizer_state.slots:
        for x, y in zip(a.optimizer_state.slots[slot], b.optimizer_state.slots[slot]):
            assert x.tobytes() == y.tobytes()
    da, db = a.dp_state, b.dp_state
    assert (da.mechanism, da.clip_norm, da.noise_multiplier, da.release_count, da.last_seed, dict(da.scalars)) == (
        db.mechanism, db.clip_norm, db.noise_multiplier, db.release_count, db.last_seed, dict(db.scalars))
    assert [(n, t.tobytes()) for n, t in da.tensors] == [(n, t.tobytes()) for n, t in db.tensors]


@pytest.mark.parametrize("optimizer", [Adam(0.01), Sgd(1.0)], ids=["adam", "sgd"])
def test_round_trip_is_exact(optimizer) -> None:
    state = _state_after_rounds(optimizer)
    # mechanism state of a future variant (seed, quantile estimate, tree buffers) survives too
    state = server_round.ServerState(
        state.round, state.spec, state.weights, state.optimizer_state,
        dp_core.DpState(DpMechanism.FIXED_GAUSSIAN, 0.3, 1.1, release_count=2, last_seed=2**63 - 5,
                   scalars={"quantile_estimate": 0.42}, tensors=(("tree/level0", np.arange(4.0)),)),
    )
    data = encode_checkpoint(state, optimizer=optimizer, metadata={"task": "t1"})
    decoded, meta = decode_checkpoint_with_metadata(data, expected_spec=SPEC)
    _assert_same(state, decoded)
    assert meta == {"task": "t1"}
    assert decoded.weights[0].flags.writeable
    name, hparams = optimizer_hparams(data)
    assert optimizer_from_hparams(name, hparams) == optimizer
    assert encode_checkpoint(decoded, optimizer=optimizer, metadata={"task": "t1"}) == data  # stable bytes
    _assert_same(state, decode_checkpoint(gzip.compress(data)))  # stored gzip'd is fine too


def test_resumed_training_matches_uninterrupted() -> None:
    opt = Adam(0.05)
    straight = _state_after_rounds(opt, rounds=2)
    resumed = decode_checkpoint(encode_checkpoint(straight, optimizer=opt))
    rng = np.random.default_rng(1)
    updates = [_random_update(rng, 1) for _ in range(2)]
    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=0.3, noise_multiplier=0.0))
    cfg = server_round.RoundConfig(report_goal=2, optimizer=opt, dp=dp)
    a = server_round.server_round(straight, updates, cfg)[0]
    b = server_round.server_round(resumed, updates, cfg)[0]
    _assert_same(a, b)
    assert a.optimizer_state.step == 3


def test_bad_checkpoints_are_refused() -> None:
    data = encode_checkpoint(_state_after_rounds(Sgd(1.0), rounds=1))
    with pytest.raises(InvalidRequestError, match="tensor 'dense/kernel:0' has shape"):
        decode_checkpoint(data, expected_spec=[("dense/kernel:0", (3, 6), "float32"), ("dense/bias:0", (3,), "float32")])
    msg = tensors_pb2.Checkpoint.FromString(data)
    msg.format_version = 2
    with pytest.raises(InvalidRequestError, match="checkpoint has format_version 2"):
        decode_checkpoint(msg.SerializeToString())
    with pytest.raises(InvalidRequestError, match="not a fedcompute Checkpoint"):
        decode_checkpoint(b"\xff\xff\xff")
