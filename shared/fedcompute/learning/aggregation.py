"""Streaming, differentially private aggregation of client updates, and one server round.

Pure core, state in / state out, no I/O:

* :class:`RoundAccumulator` + :func:`start_accumulator` / :func:`add_update` /
  :func:`merge_accumulators`: clip every client's whole update (global L2 over all its
  tensors) and sum, one update at a time, in O(model size) memory.
* :class:`DpAggregator` (protocol) with :class:`NoDpAggregator` and
  :class:`FixedGaussianAggregator`: ``initial_state()``, ``start``, ``add``, ``finish``.
  ``finish`` adds the noise through tensorflow_privacy's ``GaussianSumQuery`` (seeded,
  see :func:`gaussian_sum_query_noise`) and divides by the report goal.
* :func:`server_round`: accumulate the round's updates, finish the DP aggregate, apply the
  server optimizer to ``-mean_delta`` (TFF's convention), return the next ServerState.

Why numpy for the clip/sum: it is the hot loop (thousands of 1.7M-float updates per
round); the tests check it equals ``GaussianSumQuery.preprocess_record`` +
``accumulate_preprocessed_record`` to float tolerance. TensorFlow is imported only when a
noised result is computed (noise > 0), so noise-free rounds never load TF.

Accumulation precision: the clipped sum is accumulated in blocks of ``FLUSH_EVERY``
updates in the weights' dtype (float32: one fused BLAS ``saxpy`` pass per tensor), and
each block is folded into a float64 total. Rounding error then grows with the block size
plus N / block instead of with N (a plain float32 running sum of 10^4 updates loses ~3-4
digits in the worst case), at ~5 % of the cost of a float64 accumulator on every add.
The float64 sum is what the DP query noises; the mean is cast back to the weights' dtype.

Ownership: a RoundAccumulator's arrays are updated in place by ``add_update`` /
``merge_accumulators``; the accumulator passed in must not be used afterwards (the
returned one replaces it). Everything else is immutable.

Determinism: for the same ordered updates and the same noise seed the result is
bit-identical (crash and re-run safety). Summation order matters at the last bit, so the
caller must stream a round's updates in a stable order (e.g. sorted object names).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from fedcompute.errors import ConfigError, InvalidRequestError
from fedcompute.learning import metric_stats
from fedcompute.learning.server_optimizer import OptimizerState, ServerOptimizer
from fedcompute.learning.tensor_codec import (
    NON_FINITE_METADATA_KEY,
    ClientUpdate,
    NamedArrays,
    SpecLike,
    TensorSpec,
    bundle_from_proto,
    bundle_to_proto,
    normalize_spec,
    spec_of,
)
from fedcompute.metric_names import NON_FINITE_METRIC, TRAIN_PREFIX

try:  # scipy ships with scikit-learn; its BLAS axpy is one pass instead of numpy's two.
    from scipy.linalg import blas as _blas
except ImportError:  # pragma: no cover - fallback when scipy is absent
    _blas = None

NO_DP = "NONE"
FIXED_GAUSSIAN = "FIXED_GAUSSIAN"
ADAPTIVE_GAUSSIAN = "ADAPTIVE_GAUSSIAN"
TREE_AGGREGATION = "TREE_AGGREGATION"
ADAPTIVE_TREE = "ADAPTIVE_TREE"
MECHANISMS = (NO_DP, FIXED_GAUSSIAN, ADAPTIVE_GAUSSIAN, TREE_AGGREGATION, ADAPTIVE_TREE)

# Round metrics (flat names, float values, as in the seed's metrics JSON).
METRIC_UPDATE_NON_FINITE = NON_FINITE_METRIC  # "server/finalizer/update_non_finite"
METRIC_UPDATE_REJECTED = "server/finalizer/update_rejected"
METRIC_ACCEPTED = "server/aggregator/accepted_updates"
METRIC_CLIPPED = "server/aggregator/clipped_updates"
METRIC_REPORT_GOAL = "server/aggregator/report_goal"
METRIC_CLIP_NORM = "server/aggregator/clip_norm"
METRIC_NOISE_MULTIPLIER = "server/aggregator/noise_multiplier"
METRIC_NOISE_STDDEV = "server/aggregator/noise_stddev"
METRIC_MEAN_NOISE_STDDEV = "server/aggregator/mean_noise_stddev"
METRIC_METRICS_REJECTED = "server/aggregator/metrics_rejected"
METRIC_NUM_EXAMPLES = TRAIN_PREFIX + "num_examples"

FLUSH_EVERY = 32  # updates per float32 block before folding into the float64 total
_NORM_ROW = 2048  # elements per float32 partial dot product in the norm computation
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- DP params and state


@dataclass(frozen=True)
class DpParams:
    """A task's DP aggregation parameters (validated when an aggregator is built).

    ``clip_norm`` is the L2 bound on each client's whole update (None = no clipping, only
    for ``NONE``); ``noise_multiplier`` z gives noise stddev z * clip_norm on the sum.
    """

    mechanism: str = NO_DP
    clip_norm: float | None = None
    noise_multiplier: float = 0.0


@dataclass(frozen=True)
class DpState:
    """DP mechanism state carried from round to round (stored in the checkpoint).

    ``clip_norm`` is the clip the next round uses (adaptive clipping changes it);
    ``scalars`` / ``tensors`` hold mechanism-specific state (quantile estimate, tree
    buffers); ``last_seed`` is the noise seed of the last release.
    """

    mechanism: str
    clip_norm: float | None
    noise_multiplier: float
    release_count: int = 0
    last_seed: int | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    tensors: tuple[tuple[str, np.ndarray], ...] = ()


def new_noise_secret() -> bytes:
    """32 random bytes to derive a task's noise seeds from. Keep it server-side only."""
    return secrets.token_bytes(32)


def derive_noise_seed(secret: bytes, round_index: int, *, label: str = "") -> int:
    """A round's noise seed in [0, 2**63): HMAC-SHA256(secret, label/round).

    Deterministic, so a crashed round re-runs with the same noise; unpredictable without
    the secret. Whoever learns a round's seed (or the secret) can subtract that round's
    noise from the released model, so never publish either.
    """
    digest = hmac.new(secret, f"{label}/{int(round_index)}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


# --------------------------------------------------------------------------- accumulator


@dataclass(frozen=True, eq=False)
class RoundAccumulator:
    """Running clipped sum of one round's updates, plus counters. See module notes on ownership."""

    spec: tuple[TensorSpec, ...]
    clip_norm: float | None
    totals: tuple[np.ndarray, ...]  # float64, flat, folded blocks
    partials: tuple[np.ndarray, ...]  # weights' dtype, flat, the current block
    pending: int = 0  # updates in ``partials`` not yet folded into ``totals``
    accepted: int = 0
    non_finite: int = 0
    clipped: int = 0
    num_examples: int = 0
    metric_sums: Mapping[str, np.ndarray] = field(default_factory=dict)  # float64
    metric_clients: int = 0
    metrics_rejected: int = 0  # clients whose metric statistics were invalid or non-finite


def start_accumulator(spec: SpecLike, clip_norm: float | None) -> RoundAccumulator:
    """An empty accumulator for a model of ``spec`` clipping at ``clip_norm`` (None: no clip)."""
    specs = normalize_spec(spec)
    for s in specs:
        if np.dtype(s.dtype).kind != "f":
            raise ValueError(f"trainable weight {s.name!r} has dtype {s.dtype}; only float weights can be aggregated")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0 or None, got {clip_norm}")
    return RoundAccumulator(
        spec=specs,
        clip_norm=None if clip_norm is None else float(clip_norm),
        totals=tuple(np.zeros(math.prod(s.shape), np.float64) for s in specs),
        partials=tuple(np.zeros(math.prod(s.shape), s.dtype) for s in specs),
    )


def _exact_sq_norm(x: np.ndarray) -> float:
    """Sum of squares in float64, in chunks (no model-sized temporary)."""
    total = 0.0
    for i in range(0, x.size, 1 << 16):
        chunk = x[i : i + (1 << 16)].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    return total


def _sq_norm(x: np.ndarray) -> float:
    """Squared L2 norm of a flat float array: non-finite iff ``x`` has a non-finite element.

    float32 rows of 2,048 elements (batched BLAS dots, relative error ~1e-9 on 1.7M
    floats, vs ~1e-5 for one float32 dot) summed in float64; an overflow of the float32
    rows falls back to an exact float64 pass so finite updates are never called non-finite.
    """
    if x.dtype != np.float32:
        x64 = x.astype(np.float64, copy=False)
        return float(np.dot(x64, x64))
    m = x.size - x.size % _NORM_ROW
    total = 0.0
    if m:
        rows = x[:m].reshape(-1, 1, _NORM_ROW)
        total = float(np.matmul(rows, rows.transpose(0, 2, 1)).sum(dtype=np.float64))
    tail = x[m:].astype(np.float64)
    total += float(np.dot(tail, tail))
    if not math.isfinite(total):
        total = _exact_sq_norm(x)
    return total


def _axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    """y += a * x in place (flat arrays of the same dtype)."""
    if a == 1.0:
        np.add(y, x, out=y)
        return
    fn = None
    if _blas is not None:
        fn = _blas.saxpy if y.dtype == np.float32 else _blas.daxpy if y.dtype == np.float64 else None
    if fn is not None:
        out = fn(x, y, a=a)
        if out is not y:  # BLAS wrapper had to copy; keep the buffer identity
            y[...] = out
    else:
        y += x * y.dtype.type(a)


def _flush(acc: RoundAccumulator) -> RoundAccumulator:
    if acc.pending == 0:
        return acc
    for total, part in zip(acc.totals, acc.partials):
        np.add(total, part, out=total)
        part.fill(0)
    return replace(acc, pending=0)


def _check_shapes(acc: RoundAccumulator, delta: Sequence[np.ndarray]) -> None:
    if len(delta) != len(acc.spec):
        raise InvalidRequestError(f"update has {len(delta)} tensors, the model has {len(acc.spec)}")
    for s, a in zip(acc.spec, delta):
        if tuple(np.shape(a)) != s.shape or np.asarray(a).dtype.name != s.dtype:
            raise InvalidRequestError(
                f"update tensor {s.name!r} is {np.asarray(a).dtype.name}{list(np.shape(a))}, "
                f"expected {s.dtype}{list(s.shape)}"
            )


def _add_metrics(acc: RoundAccumulator, stats: Mapping[str, np.ndarray]) -> RoundAccumulator:
    if not stats:
        return acc
    try:  # untrusted device input: known metrics, right keys and shapes, finite, counts >= 0
        arrays = metric_stats.flatten_stats(metric_stats.unflatten_stats(stats))
    except InvalidRequestError:
        return replace(acc, metrics_rejected=acc.metrics_rejected + 1)
    sums = dict(acc.metric_sums)
    for key, value in arrays.items():
        if key in sums:
            sums[key] += value
        else:
            sums[key] = value.astype(np.float64, copy=True)
    return replace(acc, metric_sums=sums, metric_clients=acc.metric_clients + 1)


def add_update(acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
    """Fold one client update into ``acc`` (consumed): exclude it if non-finite, else clip and add.

    The whole update is scaled by min(1, clip_norm / ||update||) (``tf.clip_by_global_norm``
    semantics). An update is non-finite when any element is NaN/Inf or when the device
    flagged it (metadata ``non_finite``: it zeroed a diverged delta, as TFF's client does).
    Its metric statistics are validated and summed separately, even when the model delta
    is excluded, as TFF does.
    """
    delta = update.delta
    _check_shapes(acc, delta)
    acc = _add_metrics(acc, update.metric_statistics)
    if str(update.metadata.get(NON_FINITE_METADATA_KEY, "")).lower() in ("1", "true"):
        return replace(acc, non_finite=acc.non_finite + 1)
    flat = [np.ravel(a) for a in delta]
    sq = sum(_sq_norm(x) for x in flat)
    if not math.isfinite(sq):
        return replace(acc, non_finite=acc.non_finite + 1)
    norm = math.sqrt(sq)
    scale, clipped = 1.0, False
    if acc.clip_norm is not None and norm > acc.clip_norm:
        scale, clipped = acc.clip_norm / norm, True
    for x, part in zip(flat, acc.partials):
        _axpy(x, part, scale)
    acc = replace(
        acc,
        pending=acc.pending + 1,
        accepted=acc.accepted + 1,
        clipped=acc.clipped + int(clipped),
        num_examples=acc.num_examples + int(update.num_examples),
    )
    return _flush(acc) if acc.pending >= FLUSH_EVERY else acc


def accumulate(acc: RoundAccumulator, updates: Iterable[ClientUpdate]) -> RoundAccumulator:
    """``add_update`` over an iterable (e.g. a generator reading uploads one at a time)."""
    iterator: Iterator[ClientUpdate] = iter(updates)
    for update in iterator:
        acc = add_update(acc, update)
        del update  # drop the reference before the generator builds the next one
    return acc


def merge_accumulators(a: RoundAccumulator, b: RoundAccumulator) -> RoundAccumulator:
    """The accumulator of both shards' updates (``a`` and ``b`` are consumed). Noise is added once, later."""
    if a.spec != b.spec or a.clip_norm != b.clip_norm:
        raise ValueError("cannot merge accumulators of different models or clip norms")
    a, b = _flush(a), _flush(b)
    for ta, tb in zip(a.totals, b.totals):
        np.add(ta, tb, out=ta)
    acc = replace(
        a,
        accepted=a.accepted + b.accepted,
        non_finite=a.non_finite + b.non_finite,
        clipped=a.clipped + b.clipped,
        num_examples=a.num_examples + b.num_examples,
        metric_clients=a.metric_clients + b.metric_clients,
        metrics_rejected=a.metrics_rejected + b.metrics_rejected,
    )
    sums = dict(a.metric_sums)
    for key, value in b.metric_sums.items():
        sums[key] = sums[key] + value if key in sums else value
    return replace(acc, metric_sums=sums)


def clipped_sum(acc: RoundAccumulator) -> tuple[np.ndarray, ...]:
    """The float64 sum of the clipped accepted updates, shaped like the model (acc consumed)."""
    acc = _flush(acc)
    return tuple(t.reshape(s.shape) for t, s in zip(acc.totals, acc.spec))


_PARTIAL_COUNTERS = ("accepted", "non_finite", "clipped", "num_examples", "metric_clients", "metrics_rejected")


def encode_partial(acc: RoundAccumulator) -> bytes:
    """A shard's partial aggregate as TensorBundle bytes (for the aggregate bucket)."""
    acc = _flush(acc)
    named = [(f"sum/{s.name}", t.reshape(s.shape)) for s, t in zip(acc.spec, acc.totals)]
    named += [(f"metric/{k}", v) for k, v in sorted(acc.metric_sums.items())]
    meta = {k: str(getattr(acc, k)) for k in _PARTIAL_COUNTERS}
    meta["clip_norm"] = "" if acc.clip_norm is None else repr(acc.clip_norm)
    meta["spec"] = ";".join(f"{s.name}:{s.dtype}:{','.join(map(str, s.shape))}" for s in acc.spec)
    return bundle_to_proto(named, meta).SerializeToString(deterministic=True)


def decode_partial(data: bytes, spec: SpecLike) -> RoundAccumulator:
    """Inverse of :func:`encode_partial`, checked against the model ``spec``."""
    from fedcompute.proto import tensors_pb2

    bundle = tensors_pb2.TensorBundle.FromString(data)
    named = bundle_from_proto(bundle, what="partial aggregate")
    meta = dict(bundle.metadata)
    clip = float(meta["clip_norm"]) if meta.get("clip_norm") else None
    acc = start_accumulator(spec, clip)
    sums = {n[4:]: a for n, a in named if n.startswith("sum/")}
    if set(sums) != {s.name for s in acc.spec}:
        raise InvalidRequestError(f"partial aggregate holds {sorted(sums)}, the model has {[s.name for s in acc.spec]}")
    for s, total in zip(acc.spec, acc.totals):
        if sums[s.name].shape != s.shape:
            raise InvalidRequestError(
                f"partial aggregate tensor {s.name!r} has shape {sums[s.name].shape}, expected {s.shape}"
            )
        total[...] = sums[s.name].reshape(-1)
    metrics = {n[7:]: a.astype(np.float64) for n, a in named if n.startswith("metric/")}
    return replace(acc, metric_sums=metrics, **{k: int(meta[k]) for k in _PARTIAL_COUNTERS})


# --------------------------------------------------------------------------- noise through tensorflow_privacy

_TF_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def _tf_global_seed(seed: int) -> Iterator[None]:
    """Run with TF's global seed set to ``seed``; restore the previous seed afterwards.

    ``GaussianSumQuery`` (tensorflow_privacy 0.9.0) draws its noise with
    ``tf.random_normal_initializer()``, i.e. the stateful ``tf.random.normal`` with no op
    seed: in eager mode its (global, op) seed pair comes from the global seed and a
    ``random.Random(seed)`` sequence, and ``set_seed`` clears the kernel cache, so the draw
    is a function of ``seed`` (both 31-bit halves depend on it: ~62 bits of key). The
    global seed is process state, hence the lock and the best-effort restore.
    """
    import tensorflow as tf
    from tensorflow.python.eager import context  # private, pinned TF 2.14.1

    with _TF_SEED_LOCK:
        ctx = context.context()
        prev_seed = getattr(ctx, "_seed", None)
        prev_rng = getattr(ctx, "_rng", None)
        prev_rng_state = prev_rng.getstate() if prev_rng is not None else None
        tf.random.set_seed(seed)
        try:
            yield
        finally:
            tf.random.set_seed(prev_seed)
            if prev_seed is not None and prev_rng_state is not None and getattr(ctx, "_rng", None) is not None:
                ctx._rng.setstate(prev_rng_state)


def gaussian_sum_query_noise(
    sums: Sequence[np.ndarray], *, clip_norm: float, stddev: float, seed: int
) -> tuple[list[np.ndarray], Any]:
    """``GaussianSumQuery(clip_norm, stddev).get_noised_result`` of a summed sample state.

    The noise draw is reproducible: it runs right after ``tf.random.set_seed(seed)``.
    Returns (noised sums as numpy, in the dtype of ``sums``; the query's DpEvent).
    """
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"noise seed must be in [0, 2**63), got {seed}")
    import tensorflow as tf
    from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

    query = GaussianSumQuery(l2_norm_clip=clip_norm, stddev=stddev)
    global_state = query.initial_global_state()
    sample_state = [tf.convert_to_tensor(s) for s in sums]
    with _tf_global_seed(int(seed)):
        result, _, event = query.get_noised_result(sample_state, global_state)
    return [r.numpy() for r in result], event


# --------------------------------------------------------------------------- DP aggregators


class DpAggregator(Protocol):
    """A DP aggregation mechanism. Built from :class:`DpParams` (validated); stateless itself.

    ``start`` reads the clip from the DP state (adaptive clipping moves it); ``finish``
    releases the noised mean and the next DP state. Adaptive and tree variants (issue 5)
    implement the same four methods: their extra per-round statistics come from the
    accumulator's counters (e.g. ``accepted - clipped`` updates within the clip) and their
    carried state lives in ``DpState.scalars`` / ``DpState.tensors``.
    """

    mechanism: str
    params: DpParams

    def initial_state(self) -> DpState: ...

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator: ...

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator: ...

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]: ...


def _check_state(mechanism: str, state: DpState) -> None:
    if state.mechanism != mechanism:
        raise ConfigError(
            f"DP state is for {state.mechanism}, but the task aggregates with {mechanism}",
            hint="a checkpoint cannot change DP mechanism mid-task; start a new task",
        )


def _counter_metrics(acc: RoundAccumulator, report_goal: int) -> dict[str, float]:
    return {
        METRIC_UPDATE_NON_FINITE: float(acc.non_finite),
        METRIC_ACCEPTED: float(acc.accepted),
        METRIC_CLIPPED: float(acc.clipped),
        METRIC_REPORT_GOAL: float(report_goal),
        METRIC_METRICS_REJECTED: float(acc.metrics_rejected),
    }


@dataclass(frozen=True)
class _ClippedSumAggregator:
    params: DpParams
    mechanism: str = field(default=NO_DP, init=False)

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        _check_state(self.mechanism, state)
        return start_accumulator(spec, state.clip_norm)

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator:
        return add_update(acc, update)


@dataclass(frozen=True)
class NoDpAggregator(_ClippedSumAggregator):
    """No DP: no clipping, no noise; the mean is over the accepted updates (TFF's unweighted mean)."""

    mechanism: str = field(default=NO_DP, init=False)

    def __post_init__(self) -> None:
        p = self.params
        if p.mechanism != NO_DP:
            raise ConfigError(f"NoDpAggregator built with mechanism {p.mechanism}")
        if p.noise_multiplier != 0.0:
            raise ConfigError(
                f"noise_multiplier {p.noise_multiplier} needs a DP mechanism",
                location="differential_privacy.type",
                hint="set type: FIXED_GAUSSIAN with a clip_norm",
            )
        if p.clip_norm is not None and not (math.isfinite(p.clip_norm) and p.clip_norm > 0):
            raise ConfigError(f"clip_norm must be > 0, got {p.clip_norm}", location="differential_privacy.clip_norm")

    def initial_state(self) -> DpState:
        return DpState(NO_DP, self.params.clip_norm, 0.0)

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None = None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        _check_state(self.mechanism, state)
        metrics = _counter_metrics(acc, report_goal)
        denominator = max(acc.accepted, 1)
        sums = clipped_sum(acc)
        mean = tuple((t / denominator).astype(s.dtype) for t, s in zip(sums, acc.spec))
        metrics.update({METRIC_CLIP_NORM: float(state.clip_norm or 0.0), METRIC_NOISE_MULTIPLIER: 0.0,
                        METRIC_NOISE_STDDEV: 0.0, METRIC_MEAN_NOISE_STDDEV: 0.0})
        return mean, state, metrics


@dataclass(frozen=True)
class FixedGaussianAggregator(_ClippedSumAggregator):
    """Central DP with a fixed clip: clip, sum, add N(0, (z*C)^2) per coordinate via
    ``GaussianSumQuery``, divide by the report goal (not the realized count; DESIGN §5)."""

    mechanism: str = field(default=FIXED_GAUSSIAN, init=False)

    def __post_init__(self) -> None:
        p = self.params
        if p.mechanism != FIXED_GAUSSIAN:
            raise ConfigError(f"FixedGaussianAggregator built with mechanism {p.mechanism}")
        if p.clip_norm is None or not (math.isfinite(p.clip_norm) and p.clip_norm > 0):
            raise ConfigError(
                f"FIXED_GAUSSIAN needs clip_norm > 0, got {p.clip_norm}",
                location="differential_privacy.clip_norm",
                hint="e.g. clip_norm: 0.1",
            )
        if not (math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0):
            raise ConfigError(
                f"noise_multiplier must be >= 0, got {p.noise_multiplier}",
                location="differential_privacy.noise_multiplier",
            )

    def initial_state(self) -> DpState:
        return DpState(FIXED_GAUSSIAN, float(self.params.clip_norm), float(self.params.noise_multiplier))

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        _check_state(self.mechanism, state)
        if report_goal < 1:
            raise ValueError(f"report_goal must be >= 1, got {report_goal}")
        clip = float(state.clip_norm)
        stddev = state.noise_multiplier * clip
        metrics = _counter_metrics(acc, report_goal)
        sums = clipped_sum(acc)
        if stddev > 0:
            if seed is None:
                raise ValueError("a noise seed is required when noise_multiplier > 0 (see derive_noise_seed)")
            noised, _event = gaussian_sum_query_noise(sums, clip_norm=clip, stddev=stddev, seed=seed)
        else:  # zero noise: the query would add exactly 0.0; skip loading TensorFlow
            noised = list(sums)
        mean = tuple((n / report_goal).astype(s.dtype) for n, s in zip(noised, acc.spec))
        new_state = replace(
            state,
            release_count=state.release_count + 1,
            last_seed=int(seed) if (seed is not None and stddev > 0) else state.last_seed,
        )
        metrics.update({
            METRIC_CLIP_NORM: clip,
            METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
            METRIC_NOISE_STDDEV: stddev,
            METRIC_MEAN_NOISE_STDDEV: stddev / report_goal,
        })
        return mean, new_state, metrics


def build_dp_aggregator(params: DpParams) -> DpAggregator:
    """The aggregator for ``params.mechanism`` (validates the parameters)."""
    mechanism = params.mechanism.upper()
    if mechanism == "TREE":  # the seed's spelling of ODP's TREE_AGGREGATION
        mechanism = TREE_AGGREGATION
    params = replace(params, mechanism=mechanism)
    if mechanism == NO_DP:
        return NoDpAggregator(params)
    if mechanism == FIXED_GAUSSIAN:
        return FixedGaussianAggregator(params)
    if mechanism in (ADAPTIVE_GAUSSIAN, TREE_AGGREGATION, ADAPTIVE_TREE):
        raise ConfigError(
            f"DP aggregator {mechanism} is not implemented yet",
            location="differential_privacy.type",
            hint="use FIXED_GAUSSIAN for now",
        )
    raise ConfigError(
        f"unknown DP aggregator {params.mechanism!r}",
        location="differential_privacy.type",
        hint=f"one of {', '.join(MECHANISMS)}",
    )


# --------------------------------------------------------------------------- server round

MetricsFinalizer = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]


def default_metrics_finalizer(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``{metric: value}`` from the round's summed ``"<metric>/<stat>"`` statistics
    (:mod:`fedcompute.learning.metric_stats`: e.g. loss = sum / count over all examples,
    AUC from summed confusion buckets; never a mean of per-client values)."""
    return metric_stats.finalize_all(metric_stats.unflatten_stats(sums))


@dataclass(frozen=True)
class ServerState:
    """Everything the aggregator carries between rounds (one checkpoint).

    ``round`` counts completed aggregation rounds (0 = the initial checkpoint).
    """

    round: int
    spec: tuple[TensorSpec, ...]
    weights: tuple[np.ndarray, ...]
    optimizer_state: OptimizerState
    dp_state: DpState

    def named_weights(self) -> list[tuple[str, np.ndarray]]:
        return [(s.name, w) for s, w in zip(self.spec, self.weights)]


def initial_server_state(weights: NamedArrays, optimizer: ServerOptimizer, dp: DpAggregator) -> ServerState:
    """Round-0 state from the model's initial trainable weights (ordered names -> arrays)."""
    spec = spec_of(weights)
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    return ServerState(
        round=0,
        spec=spec,
        weights=tuple(np.array(a, copy=True) for _, a in items),
        optimizer_state=optimizer.initialize(spec),
        dp_state=dp.initial_state(),
    )


@dataclass(frozen=True)
class RoundConfig:
    """Per-round inputs besides the state and the updates.

    ``noise_seed`` is required when there is noise; derive it with
    :func:`derive_noise_seed` so a re-run of the same round adds the same noise.
    """

    report_goal: int
    optimizer: ServerOptimizer
    dp: DpAggregator
    noise_seed: int | None = None
    metrics_finalizer: MetricsFinalizer | None = default_metrics_finalizer


@dataclass(frozen=True)
class RoundResult:
    """What a round produced besides the new state. ``round`` is the new state's round."""

    round: int
    mean_delta: tuple[np.ndarray, ...]
    accepted: int
    non_finite: int
    clipped: int
    num_examples: int
    metric_sums: Mapping[str, np.ndarray]
    noise_seed: int | None
    update_rejected: bool


def finish_round(
    state: ServerState, acc: RoundAccumulator, config: RoundConfig
) -> tuple[ServerState, RoundResult, dict[str, float]]:
    """Release the DP mean of ``acc`` and apply the server optimizer (for merged shards too)."""
    if config.report_goal < 1:
        raise ValueError(f"report_goal must be >= 1, got {config.report_goal}")
    counters = (acc.accepted, acc.non_finite, acc.clipped, acc.num_examples)
    metric_sums = dict(acc.metric_sums)
    mean, dp_state, metrics = config.dp.finish(
        acc, state.dp_state, report_goal=config.report_goal, seed=config.noise_seed
    )
    # TFF's FedAvg hands the server optimizer initial-minus-trained deltas as the gradient.
    gradient = tuple(np.negative(m) for m in mean)
    rejected = not all(bool(np.isfinite(g).all()) for g in gradient)
    if rejected:  # like TFF's reject_non_finite_update: keep weights and optimizer state
        opt_state, weights = state.optimizer_state, state.weights
    else:
        opt_state, weights = config.optimizer.next(state.optimizer_state, state.weights, gradient)
    new_state = ServerState(state.round + 1, state.spec, tuple(weights), opt_state, dp_state)
    metrics[METRIC_UPDATE_REJECTED] = float(rejected)
    metrics[METRIC_NUM_EXAMPLES] = float(counters[3])
    if config.metrics_finalizer is not None:
        for name, value in config.metrics_finalizer(metric_sums).items():
            metrics[TRAIN_PREFIX + name] = float(value)
    result = RoundResult(
        round=new_state.round,
        mean_delta=mean,
        accepted=counters[0],
        non_finite=counters[1],
        clipped=counters[2],
        num_examples=counters[3],
        metric_sums=metric_sums,
        noise_seed=config.noise_seed if metrics.get(METRIC_NOISE_STDDEV, 0.0) > 0 else None,
        update_rejected=rejected,
    )
    return new_state, result, metrics


def server_round(
    state: ServerState, updates: Iterable[ClientUpdate], config: RoundConfig
) -> tuple[ServerState, RoundResult, dict[str, float]]:
    """One aggregation round: stream ``updates`` (any iterable, consumed once) through the
    DP aggregator, release the mean delta, step the server optimizer on ``-mean_delta``."""
    acc = config.dp.start(state.spec, state.dp_state)
    for update in updates:
        acc = config.dp.add(acc, update)
        del update  # hold one update at a time
    return finish_round(state, acc, config)
