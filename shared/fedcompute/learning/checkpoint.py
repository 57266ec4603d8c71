"""ServerState <-> ``fedcompute.v1.Checkpoint`` bytes (versioned protobuf, never pickle).

Layout: ``model_weights`` holds the trainable weights in model order; ``optimizer_state``
holds the optimizer slots as ``<slot>/<weight name>`` tensors (slot-major, model order)
with metadata ``optimizer``, ``step``, ``slots`` and ``hparam/<name>``; ``dp_state`` holds
mechanism tensors and ``dp_info`` the DP scalars (current clip, noise multiplier, release
count, last noise seed). numpy + protobuf only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from google.protobuf.message import DecodeError

from fedcompute.dp import mechanism_name, parse_mechanism
from fedcompute.errors import InvalidRequestError, InvariantError
from fedcompute.learning.dp_core import DpState
from fedcompute.learning.server_optimizer import OptimizerState, ServerOptimizer
from fedcompute.learning.server_round import ServerState
from fedcompute.learning.tensor_codec import (
    GZIP_MAGIC,
    SpecLike,
    bundle_from_proto,
    bundle_to_proto,
    gunzip_capped,
    normalize_spec,
    spec_of,
)
from fedcompute.proto import tensors_pb2

CHECKPOINT_FORMAT_VERSION = 1
MAX_CHECKPOINT_BYTES = 2**31 - 1  # protobuf's own message size limit


def encode_checkpoint(
    state: ServerState,
    *,
    optimizer: ServerOptimizer | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialized Checkpoint of ``state``; ``optimizer`` (if given) records its hyperparameters."""
    opt = state.optimizer_state
    slot_names = sorted(opt.slots)
    opt_meta = {"optimizer": opt.name, "step": str(opt.step), "slots": ",".join(slot_names)}
    if optimizer is not None:
        if optimizer.name != opt.name:
            raise InvariantError(f"optimizer {optimizer.name!r} does not own state of {opt.name!r}")
        opt_meta.update({f"hparam/{k}": repr(float(v)) for k, v in optimizer.hparams().items()})
    opt_tensors = [
        (f"{slot}/{s.name}", arr) for slot in slot_names for s, arr in zip(state.spec, opt.slots[slot])
    ]
    dp = state.dp_state
    info = tensors_pb2.DpStateInfo(
        mechanism=mechanism_name(dp.mechanism),
        clip_norm=0.0 if dp.clip_norm is None else float(dp.clip_norm),
        noise_multiplier=float(dp.noise_multiplier),
        release_count=int(dp.release_count),
        has_last_seed=dp.last_seed is not None,
        last_seed=0 if dp.last_seed is None else int(dp.last_seed),
    )
    info.scalars.update({k: float(v) for k, v in dp.scalars.items()})
    msg = tensors_pb2.Checkpoint(format_version=CHECKPOINT_FORMAT_VERSION, round=int(state.round), dp_info=info)
    msg.model_weights.CopyFrom(bundle_to_proto(state.named_weights()))
    msg.optimizer_state.CopyFrom(bundle_to_proto(opt_tensors, opt_meta))
    msg.dp_state.CopyFrom(bundle_to_proto(list(dp.tensors)))
    msg.metadata.update(metadata or {})
    return msg.SerializeToString(deterministic=True)


def decode_checkpoint_with_metadata(
    data: bytes, *, expected_spec: SpecLike | None = None
) -> tuple[ServerState, dict[str, str]]:
    """(ServerState, checkpoint metadata) from Checkpoint bytes (gzip'd or not).

    ``expected_spec`` checks the weights against the task's model. Arrays are writable copies.
    """
    raw = gunzip_capped(data, max_bytes=MAX_CHECKPOINT_BYTES) if bytes(data[:2]) == GZIP_MAGIC else data
    msg = tensors_pb2.Checkpoint()
    try:
        msg.ParseFromString(raw)
    except DecodeError as err:
        raise InvalidRequestError(f"not a fedcompute Checkpoint protobuf: {err}") from err
    if msg.format_version != CHECKPOINT_FORMAT_VERSION:
        raise InvalidRequestError(
            f"checkpoint has format_version {msg.format_version}, this server reads {CHECKPOINT_FORMAT_VERSION}",
            hint="is this a fedcompute server checkpoint ({pop}/{task}/{round}/s/0/checkpoint)?",
        )
    weights = bundle_from_proto(msg.model_weights, expected_spec=expected_spec, what="checkpoint model_weights")
    spec = spec_of(weights)

    opt_bundle = msg.optimizer_state
    meta = dict(opt_bundle.metadata)
    slot_names = [s for s in meta.get("slots", "").split(",") if s]
    expected_opt = [(f"{slot}/{s.name}", s.shape, s.dtype) for slot in slot_names for s in spec]
    opt_tensors = bundle_from_proto(opt_bundle, expected_spec=expected_opt, what="checkpoint optimizer_state")
    n = len(spec)
    slots = {
        slot: tuple(np.array(a) for _, a in opt_tensors[i * n : (i + 1) * n]) for i, slot in enumerate(slot_names)
    }
    optimizer_state = OptimizerState(meta.get("optimizer", ""), int(meta.get("step", "0")), slots)

    info = msg.dp_info
    clip = info.clip_norm if info.clip_norm > 0 and math.isfinite(info.clip_norm) else None
    dp_state = DpState(
        mechanism=parse_mechanism(info.mechanism),
        clip_norm=clip,
        noise_multiplier=info.noise_multiplier,
        release_count=int(info.release_count),
        last_seed=int(info.last_seed) if info.has_last_seed else None,
        scalars=dict(info.scalars),
        tensors=tuple((name, np.array(a)) for name, a in bundle_from_proto(msg.dp_state, what="checkpoint dp_state")),
    )
    state = ServerState(
        round=int(msg.round),
        spec=normalize_spec(spec),
        weights=tuple(np.array(a) for _, a in weights),
        optimizer_state=optimizer_state,
        dp_state=dp_state,
    )
    return state, dict(msg.metadata)


def decode_checkpoint(data: bytes, *, expected_spec: SpecLike | None = None) -> ServerState:
    """ServerState from Checkpoint bytes; see :func:`decode_checkpoint_with_metadata`."""
    return decode_checkpoint_with_metadata(data, expected_spec=expected_spec)[0]


def optimizer_hparams(data: bytes) -> tuple[str, dict[str, float]]:
    """(optimizer name, hyperparameters) recorded in a checkpoint, to rebuild or verify the optimizer."""
    raw = gunzip_capped(data, max_bytes=MAX_CHECKPOINT_BYTES) if bytes(data[:2]) == GZIP_MAGIC else data
    msg = tensors_pb2.Checkpoint.FromString(raw)
    meta = dict(msg.optimizer_state.metadata)
    return meta.get("optimizer", ""), {k[7:]: float(v) for k, v in meta.items() if k.startswith("hparam/")}
