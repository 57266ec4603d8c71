"""Streaming, differentially private aggregation of client updates, and one server round.

Pure core, state in / state out, no I/O:

* :class:`RoundAccumulator` + :func:`start_accumulator` / :func:`add_update` /
  :func:`merge_accumulators`: clip every client's whole update (global L2 over all its
  tensors) and sum, one update at a time, in O(model size) memory.
* :class:`DpAggregator` (protocol) with :class:`NoDpAggregator`,
  :class:`FixedGaussianAggregator`, :class:`AdaptiveGaussianAggregator`,
  :class:`TreeAggregationAggregator` and :class:`AdaptiveTreeAggregator`:
  ``initial_state()``, ``start``, ``add``, ``finish``. ``finish`` adds the noise through
  tensorflow_privacy's own queries (``GaussianSumQuery``, ``QuantileAdaptiveClipSumQuery``,
  ``TreeResidualSumQuery``, ``QAdaClipTreeResSumQuery``, optionally in a ``RestartQuery``),
  seeded, and divides by the report goal.
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
    # Adaptive clipping (ADAPTIVE_GAUSSIAN, ADAPTIVE_TREE; Andrew et al. 2019, TFF defaults).
    init_clip_norm: float | None = None  # the first round's clip (None: clip_norm)
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2  # geometric: the clip moves by at most exp(rate) a round
    clipped_count_stddev: float | None = None  # None: 0.05 * report_goal (TFF)
    # Tree restarts (TREE_AGGREGATION, ADAPTIVE_TREE): restart the noise tree every
    # ``restart_period`` releases, the first time after ``restart_warmup`` releases.
    # None = the mechanism's default: TREE_AGGREGATION never restarts, ADAPTIVE_TREE
    # uses TFF's tree_adaptive defaults (period 1024, warmup 128; the clip only moves at restarts).
    restart_period: int | None = None
    restart_warmup: int | None = None


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
    # ADAPTIVE_TREE counts accepted updates with norm <= its quantile estimate, which only
    # becomes the clip when the tree restarts (None: not counted).
    count_threshold: float | None = None
    below_threshold: int = 0


def start_accumulator(
    spec: SpecLike, clip_norm: float | None, count_threshold: float | None = None
) -> RoundAccumulator:
    """An empty accumulator for a model of ``spec`` clipping at ``clip_norm`` (None: no clip),
    also counting updates with norm <= ``count_threshold`` when it is given."""
    specs = normalize_spec(spec)
    for s in specs:
        if np.dtype(s.dtype).kind != "f":
            raise ValueError(f"trainable weight {s.name!r} has dtype {s.dtype}; only float weights can be aggregated")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0 or None, got {clip_norm}")
    return RoundAccumulator(
        spec=specs,
        clip_norm=None if clip_norm is None else float(clip_norm),
        count_threshold=None if count_threshold is None else float(count_threshold),
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
        below_threshold=acc.below_threshold + int(acc.count_threshold is not None and norm <= acc.count_threshold),
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
    if a.spec != b.spec or a.clip_norm != b.clip_norm or a.count_threshold != b.count_threshold:
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
        below_threshold=a.below_threshold + b.below_threshold,
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
    if acc.count_threshold is not None:  # only ADAPTIVE_TREE partials carry these keys
        meta["count_threshold"] = repr(acc.count_threshold)
        meta["below_threshold"] = str(acc.below_threshold)
    meta["spec"] = ";".join(f"{s.name}:{s.dtype}:{','.join(map(str, s.shape))}" for s in acc.spec)
    return bundle_to_proto(named, meta).SerializeToString(deterministic=True)


def decode_partial(data: bytes, spec: SpecLike) -> RoundAccumulator:
    """Inverse of :func:`encode_partial`, checked against the model ``spec``."""
    from fedcompute.proto import tensors_pb2

    bundle = tensors_pb2.TensorBundle.FromString(data)
    named = bundle_from_proto(bundle, what="partial aggregate")
    meta = dict(bundle.metadata)
    clip = float(meta["clip_norm"]) if meta.get("clip_norm") else None
    threshold = float(meta["count_threshold"]) if meta.get("count_threshold") else None
    acc = start_accumulator(spec, clip, threshold)
    if threshold is not None:
        acc = replace(acc, below_threshold=int(meta["below_threshold"]))
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
    counters: dict[str, Any] = {k: int(meta[k]) for k in _PARTIAL_COUNTERS}
    return replace(acc, metric_sums=metrics, **counters)


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
    releases the noised mean and the next DP state. The adaptive and tree variants take
    their extra per-round statistics from the accumulator's counters (``accepted - clipped``
    updates within the clip; ``below_threshold`` for ADAPTIVE_TREE) and carry their state in
    ``DpState.clip_norm`` / ``scalars`` / ``tensors`` (the tree under ``tree/``).
    """

    @property
    def mechanism(self) -> str: ...

    @property
    def params(self) -> DpParams: ...

    def initial_state(self) -> DpState: ...

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator: ...

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator: ...

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]: ...


def _clip_value(clip_norm: float | None) -> float:
    """A clipping mechanism's clip norm (validation guarantees it is set)."""
    if clip_norm is None:
        raise ValueError("this DP mechanism clips, but its clip_norm is unset")
    return float(clip_norm)


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
        return DpState(FIXED_GAUSSIAN, _clip_value(self.params.clip_norm), float(self.params.noise_multiplier))

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        _check_state(self.mechanism, state)
        if report_goal < 1:
            raise ValueError(f"report_goal must be >= 1, got {report_goal}")
        clip = _clip_value(state.clip_norm)
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


# --------------------------------------------------------------------------- adaptive clipping and tree aggregation

METRIC_NEXT_CLIP_NORM = "server/aggregator/next_clip_norm"
METRIC_UNCLIPPED_FRACTION = "server/aggregator/unclipped_fraction"
METRIC_NOISED_UNCLIPPED_FRACTION = "server/aggregator/noised_unclipped_fraction"
METRIC_VALUE_NOISE_MULTIPLIER = "server/aggregator/value_noise_multiplier"
METRIC_CLIPPED_COUNT_STDDEV = "server/aggregator/clipped_count_stddev"
METRIC_CUMULATIVE_NOISE_STDDEV = "server/aggregator/cumulative_noise_stddev"
METRIC_TREE_LEAVES = "server/aggregator/tree_leaves"

ADAPTIVE_TREE_RESTART_PERIOD = 1024  # TFF tree_adaptive defaults
ADAPTIVE_TREE_RESTART_WARMUP = 128
_TREE_SEED_MASK = 2**62 - 1  # the tree's stateless seeds are incremented per node: keep int64 headroom
_TREE_STATE_PREFIX = "tree/"


def adaptive_noise_split(
    noise_multiplier: float, report_goal: int, clipped_count_stddev: float | None
) -> tuple[float, float]:
    """(value noise multiplier, clipped-count stddev) for adaptive clipping (TFF's
    ``adaptive_clip_noise_params``): the noised sum and the noised clipped count together
    cost as much privacy as one Gaussian sum with multiplier z, so the sum gets
    z_v = (z^-2 - (2 sigma_b)^-2)^-1/2 with sigma_b = 0.05 * report_goal unless given.

    Raises ConfigError when z >= 2 sigma_b (no finite z_v exists), naming the smallest
    report goal that works when sigma_b is the default.
    """
    z = float(noise_multiplier)
    if z <= 0.0:
        return 0.0, 0.0 if clipped_count_stddev is None else float(clipped_count_stddev)
    sigma_b = 0.05 * report_goal if clipped_count_stddev is None else float(clipped_count_stddev)
    if z >= 2 * sigma_b:
        if clipped_count_stddev is None:
            min_goal = max(1, math.floor(10 * z))
            while z >= 2 * (0.05 * min_goal):
                min_goal += 1
            raise ConfigError(
                f"noise_multiplier {z} cannot be split between the sum and the clipped count with "
                f"report goal {report_goal}: the default clipped_count_stddev 0.05 * report_goal = {sigma_b:g} "
                f"must exceed noise_multiplier / 2",
                location="differential_privacy.clipped_count_stddev",
                hint=f"use a report goal of at least {min_goal}, set clipped_count_stddev > {z / 2:g}, "
                     f"or lower noise_multiplier",
            )
        raise ConfigError(
            f"clipped_count_stddev {sigma_b:g} is too low for noise_multiplier {z}: it must exceed "
            f"noise_multiplier / 2 = {z / 2:g}",
            location="differential_privacy.clipped_count_stddev",
            hint=f"set clipped_count_stddev > {z / 2:g} (e.g. 0.05 * report goal) or lower noise_multiplier",
        )
    value_z = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    return value_z, sigma_b


def tree_noise_seeds(seed: int) -> tuple[int, int]:
    """(sum tree seed, clipped-count tree seed) derived from a round's noise seed.

    The trees draw stateless noise from seed pairs that advance by one per node and
    tensor, so the seeds are kept below 2**62 and the count tree's seed is hashed away
    from the sum tree's (overlapping ranges would correlate the two noises).
    """
    seed = int(seed)
    digest = hashlib.sha256(f"clipped_count/{seed}".encode()).digest()
    return seed & _TREE_SEED_MASK, int.from_bytes(digest[:8], "big") & _TREE_SEED_MASK


def efficient_tree_cumsum_noise_std(leaves: int, node_stddev: float) -> float:
    """Stddev of one coordinate of the efficient tree's noise on a cumulative sum of ``leaves``
    releases (Honaker 2015 as in tensorflow_privacy's EfficientTreeAggregator).

    A complete subtree of height l has node variance v_l = sigma^2 (2 - 2^-l) and weight
    1 / (2 - 2^-l); the cumulative sum uses one subtree per set bit of ``leaves``.
    """
    var, level, n = 0.0, 0, int(leaves)
    while n:
        if n & 1:
            var += 1.0 / (2.0 - 0.5**level)
        n >>= 1
        level += 1
    return float(node_stddev) * math.sqrt(var)


def _validate_noise(p: DpParams) -> None:
    if not (math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0):
        raise ConfigError(
            f"noise_multiplier must be >= 0, got {p.noise_multiplier}",
            location="differential_privacy.noise_multiplier",
        )


def _validate_clip(value: float | None, field_name: str, mechanism: str) -> float:
    if value is None or not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{mechanism} needs {field_name} > 0, got {value}",
            location=f"differential_privacy.{field_name}",
            hint=f"e.g. {field_name}: 0.1",
        )
    return float(value)


def _validate_adaptive(p: DpParams) -> float:
    """Checks the adaptive-clipping fields; returns the initial clip."""
    if p.init_clip_norm is not None:
        clip = _validate_clip(p.init_clip_norm, "init_clip_norm", p.mechanism)
    else:
        clip = _validate_clip(p.clip_norm, "clip_norm", p.mechanism)
    _validate_noise(p)
    q = p.target_unclipped_quantile
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise ConfigError(
            f"target_unclipped_quantile must be in [0, 1], got {q}",
            location="differential_privacy.target_unclipped_quantile",
            hint="0.5 clips at the median update norm (Andrew et al.)",
        )
    lr = p.clip_learning_rate
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(
            f"clip_learning_rate must be >= 0, got {lr}",
            location="differential_privacy.clip_learning_rate",
            hint="0.2 is the recommended geometric rate",
        )
    s = p.clipped_count_stddev
    if s is not None:
        if not (math.isfinite(s) and s >= 0):
            raise ConfigError(
                f"clipped_count_stddev must be >= 0, got {s}",
                location="differential_privacy.clipped_count_stddev",
                hint="leave it unset for 0.05 * report goal",
            )
        adaptive_noise_split(p.noise_multiplier, 1, s)  # an explicit stddev is checkable now
    return clip


def _validate_restart(p: DpParams, default: tuple[int, int | None] | None) -> tuple[int, int | None] | None:
    """(period, warmup) of the tree restarts, or None for no restart."""
    period, warmup = p.restart_period, p.restart_warmup
    if period is None:
        if warmup is not None:
            raise ConfigError(
                "restart_warmup needs restart_period", location="differential_privacy.restart_warmup",
                hint="set restart_period too, or drop restart_warmup",
            )
        return default
    if isinstance(period, bool) or int(period) != period or period < 1:
        raise ConfigError(
            f"restart_period must be an integer >= 1, got {period}", location="differential_privacy.restart_period"
        )
    if warmup is not None and (int(warmup) != warmup or not 1 <= warmup < period):
        raise ConfigError(
            f"restart_warmup must be an integer in [1, restart_period - 1 = {int(period) - 1}], got {warmup}",
            location="differential_privacy.restart_warmup",
        )
    return int(period), None if warmup is None else int(warmup)


def _need_seed(seed: int | None, noisy: bool, mechanism: str) -> int:
    if seed is None:
        if noisy:
            raise ValueError(f"a noise seed is required for {mechanism} with noise (see derive_noise_seed)")
        return 0
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"noise seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _metrics_base(acc: RoundAccumulator, report_goal: int) -> dict[str, float]:
    metrics = _counter_metrics(acc, report_goal)
    metrics[METRIC_UNCLIPPED_FRACTION] = (acc.accepted - acc.clipped) / acc.accepted if acc.accepted else 0.0
    return metrics


@dataclass(frozen=True)
class AdaptiveGaussianAggregator(_ClippedSumAggregator):
    """Gaussian sum with the clip adapted to a target quantile of update norms
    (tensorflow_privacy's ``QuantileAdaptiveClipSumQuery``, geometric update, as TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive``).

    Round t clips at ``state.clip_norm`` and its sum gets noise z_v * clip_t (see
    :func:`adaptive_noise_split`); the noised fraction of unclipped updates moves the clip
    for round t+1, which the returned DpState carries (it is the quantile estimator's whole
    mutable state: the other fields of the query's state follow from the parameters).
    """

    mechanism: str = field(default=ADAPTIVE_GAUSSIAN, init=False)

    def __post_init__(self) -> None:
        if self.params.mechanism != ADAPTIVE_GAUSSIAN:
            raise ConfigError(f"AdaptiveGaussianAggregator built with mechanism {self.params.mechanism}")
        _validate_adaptive(self.params)

    def initial_state(self) -> DpState:
        return DpState(ADAPTIVE_GAUSSIAN, _validate_adaptive(self.params), float(self.params.noise_multiplier))

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        _check_state(self.mechanism, state)
        if report_goal < 1:
            raise ValueError(f"report_goal must be >= 1, got {report_goal}")
        p = self.params
        value_z, sigma_b = adaptive_noise_split(state.noise_multiplier, report_goal, p.clipped_count_stddev)
        noisy = value_z > 0 or sigma_b > 0
        tf_seed = _need_seed(seed, noisy, self.mechanism)
        clip = _clip_value(state.clip_norm)
        metrics = _metrics_base(acc, report_goal)
        sums = clipped_sum(acc)

        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import (
            QuantileAdaptiveClipSumQuery,
        )

        query = QuantileAdaptiveClipSumQuery(
            initial_l2_norm_clip=clip,
            noise_multiplier=value_z,
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_learning_rate,
            clipped_count_stddev=sigma_b,
            expected_num_records=report_goal,
            geometric_update=True,
        )
        global_state = query.initial_global_state()
        # The estimator's per-record value is 1[norm <= clip] - 0.5 (our ``clipped`` is norm > clip).
        below = float(acc.accepted - acc.clipped) - 0.5 * acc.accepted
        sample_state = query._SampleState(  # the query's own sample-state type (private name, TFP 0.9.0)
            [tf.convert_to_tensor(s) for s in sums], tf.constant(below, tf.float32)
        )
        with _tf_global_seed(tf_seed):
            result, new_global, _event = query.get_noised_result(sample_state, global_state)
        new_clip = float(new_global.sum_state.l2_norm_clip.numpy())
        if not (math.isfinite(new_clip) and new_clip > 0):
            raise ValueError(f"adaptive clip became {new_clip}; check clip_learning_rate")
        mean = tuple((r.numpy() / report_goal).astype(s.dtype) for r, s in zip(result, acc.spec))
        new_state = replace(
            state,
            clip_norm=new_clip,
            release_count=state.release_count + 1,
            last_seed=tf_seed if (seed is not None and noisy) else state.last_seed,
            scalars={"quantile_estimate": new_clip},
        )
        metrics.update({
            METRIC_CLIP_NORM: clip,
            METRIC_NEXT_CLIP_NORM: new_clip,
            METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
            METRIC_VALUE_NOISE_MULTIPLIER: value_z,
            METRIC_CLIPPED_COUNT_STDDEV: sigma_b,
            METRIC_NOISE_STDDEV: value_z * clip,
            METRIC_MEAN_NOISE_STDDEV: value_z * clip / report_goal,
        })
        if p.clip_learning_rate > 0:  # the DP estimate the clip moved on: clip' = clip exp(-lr (b - q))
            metrics[METRIC_NOISED_UNCLIPPED_FRACTION] = float(np.clip(
                p.target_unclipped_quantile - math.log(new_clip / clip) / p.clip_learning_rate, 0.0, 1.0
            ))
        return mean, new_state, metrics


_QUERY_CACHE: dict[Any, Any] = {}
_QUERY_CACHE_LOCK = threading.Lock()
_QUERY_CACHE_SIZE = 8


def _cached_query(key: Any, build: Callable[[], Any]) -> Any:
    """A process-wide cache of built tree queries: their ``tf.function``s trace once per
    query object (~1 s), so a warm aggregator reuses the query of its task and model."""
    with _QUERY_CACHE_LOCK:
        hit = _QUERY_CACHE.get(key)
        if hit is None:
            hit = build()
            while len(_QUERY_CACHE) >= _QUERY_CACHE_SIZE:
                _QUERY_CACHE.pop(next(iter(_QUERY_CACHE)))
            _QUERY_CACHE[key] = hit
        return hit


def flatten_query_state(global_state: Any, prefix: str = _TREE_STATE_PREFIX) -> tuple[tuple[str, np.ndarray], ...]:
    """A tensorflow_privacy global state (tf.nest structure) as named numpy arrays for DpState.tensors."""
    from tensorflow.python.util import nest  # public tf.nest has no path variant (pinned TF 2.14.1)

    return tuple((prefix + path, np.array(t)) for path, t in nest.flatten_with_joined_string_paths(global_state))


def restore_query_state(
    template: Any, tensors: Sequence[tuple[str, np.ndarray]], prefix: str = _TREE_STATE_PREFIX
) -> Any:
    """Inverse of :func:`flatten_query_state` given a state of the same structure (shapes may differ)."""
    import tensorflow as tf
    from tensorflow.python.util import nest

    paths = [(prefix + path, t) for path, t in nest.flatten_with_joined_string_paths(template)]
    stored = {name: a for name, a in tensors if name.startswith(prefix)}
    names = [n for n, _ in paths]
    if set(names) != set(stored):
        missing = sorted(set(names) - set(stored))
        extra = sorted(set(stored) - set(names))
        raise ConfigError(
            f"DP tree state does not match the task's DP configuration (missing {missing[:3]}, unexpected {extra[:3]})",
            hint="the restart settings or the model changed mid-task; start a new task",
        )
    flat = [tf.convert_to_tensor(np.asarray(stored[n]), dtype=t.dtype) for n, t in paths]
    return tf.nest.pack_sequence_as(template, flat)


@dataclass(frozen=True)
class TreeAggregationAggregator(_ClippedSumAggregator):
    """DP-FTRL noise (Kairouz et al. 2021): tensorflow_privacy's ``TreeResidualSumQuery``
    (efficient tree, Gaussian node noise z * clip), optionally in a ``RestartQuery``.

    The release of round t is the noised *residual* x_t + N_t - N_{t-1}, where N_t is the
    tree's noise on the cumulative sum of rounds 1..t. Summed over rounds the releases are
    the tree-noised cumulative sum, so the server's plain SGD on ``-release / report_goal``
    (what :func:`finish_round` does) gives w_t = w_0 + lr * (S_t + N_t) / report_goal: the
    DP-FTRL update. (Server momentum or adaptive optimizers then act on the residuals.)

    The tree (noise buffers, node seeds, previous noise) lives in ``DpState.tensors`` under
    ``tree/``; it is created at the first release from that round's noise seed, and every
    later node's noise is a function of the stored seeds (later rounds' seeds are unused).
    """

    mechanism: str = field(default=TREE_AGGREGATION, init=False)

    def __post_init__(self) -> None:
        if self.params.mechanism != TREE_AGGREGATION:
            raise ConfigError(f"TreeAggregationAggregator built with mechanism {self.params.mechanism}")
        self._validate()

    def _validate(self) -> tuple[float, tuple[int, int | None] | None]:
        clip = _validate_clip(self.params.clip_norm, "clip_norm", self.mechanism)
        _validate_noise(self.params)
        return clip, _validate_restart(self.params, None)

    def initial_state(self) -> DpState:
        return DpState(self.mechanism, self._validate()[0], float(self.params.noise_multiplier))

    def _noise_split(self, report_goal: int) -> tuple[float, float]:
        return float(self.params.noise_multiplier), 0.0

    def build_query(self, spec: SpecLike, report_goal: int, noise_seed: int | None) -> Any:
        """The tensorflow_privacy query this aggregator runs (public so tests can run it directly)."""
        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query import restart_query

        record_specs = [tf.TensorSpec(s.shape, tf.float32) for s in normalize_spec(spec)]
        query = self._inner_query(record_specs, report_goal, noise_seed)
        restart = self._validate()[1]
        if restart is not None:
            period, warmup = restart
            query = restart_query.RestartQuery(query, restart_query.PeriodicRoundRestartIndicator(period, warmup))
        return query

    def _inner_query(self, record_specs: list[Any], report_goal: int, noise_seed: int | None) -> Any:
        from tensorflow_privacy.privacy.dp_query.tree_aggregation_query import TreeResidualSumQuery

        return TreeResidualSumQuery.build_l2_gaussian_query(
            clip_norm=_clip_value(self.params.clip_norm),
            noise_multiplier=float(self.params.noise_multiplier),
            record_specs=record_specs,
            noise_seed=None if noise_seed is None else tree_noise_seeds(noise_seed)[0],
            use_efficient=True,
        )

    def sample_state(self, query: Any, sums: Sequence[np.ndarray], acc: RoundAccumulator) -> Any:
        """The query's sample state for the round's clipped sums (float32, as the tree's noise)."""
        import tensorflow as tf

        return [tf.convert_to_tensor(np.asarray(s, np.float32)) for s in sums]

    def _sum_state(self, global_state: Any) -> Any:
        return global_state.inner_query_state if self._validate()[1] is not None else global_state

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]:
        _check_state(self.mechanism, state)
        if report_goal < 1:
            raise ValueError(f"report_goal must be >= 1, got {report_goal}")
        value_z, sigma_b = self._noise_split(report_goal)
        noisy = value_z > 0 or sigma_b > 0
        clip = _clip_value(state.clip_norm)
        metrics = _metrics_base(acc, report_goal)
        sums = clipped_sum(acc)

        def build() -> tuple[Any, Any]:
            q = self.build_query(acc.spec, report_goal, None)
            return q, q.initial_global_state()

        query, template = _cached_query((self.mechanism, self.params, acc.spec, report_goal), build)
        if any(name.startswith(_TREE_STATE_PREFIX) for name, _ in state.tensors):
            global_state = restore_query_state(template, state.tensors)
            used_seed = None
        else:  # first release: plant the tree from this round's seed
            used_seed = _need_seed(seed, noisy, self.mechanism)
            global_state = self.build_query(acc.spec, report_goal, used_seed).initial_global_state()
        sum_state = self._tree_sum_state(global_state)
        if abs(float(sum_state.clip_value.numpy()) - clip) > 1e-6 * clip:
            raise ConfigError(
                f"DP state clip {clip} disagrees with the tree's clip {float(sum_state.clip_value.numpy())}",
                hint="the checkpoint's DP state is inconsistent; start a new task",
            )
        node_std = float(sum_state.tree_state.value_generator_state.stddev.numpy())
        leaves = int(sum(2 ** int(i) for i in sum_state.tree_state.level_buffer_idx.numpy()))
        result, new_global, _event = query.get_noised_result(self.sample_state(query, sums, acc), global_state)
        new_sum_state = self._tree_sum_state(new_global)
        new_clip = float(new_sum_state.clip_value.numpy())
        mean = tuple(
            (np.asarray(r.numpy(), np.float64) / report_goal).astype(s.dtype) for r, s in zip(result, acc.spec)
        )
        new_state = replace(
            state,
            clip_norm=new_clip,
            release_count=state.release_count + 1,
            last_seed=used_seed if (used_seed is not None and seed is not None and noisy) else state.last_seed,
            tensors=flatten_query_state(new_global),
            scalars=self._scalars(new_global),
        )
        metrics.update({
            METRIC_CLIP_NORM: clip,
            METRIC_NEXT_CLIP_NORM: new_clip,
            METRIC_NOISE_MULTIPLIER: float(state.noise_multiplier),
            METRIC_VALUE_NOISE_MULTIPLIER: value_z,
            METRIC_NOISE_STDDEV: node_std,
            METRIC_MEAN_NOISE_STDDEV: node_std / report_goal,
            METRIC_TREE_LEAVES: float(leaves),
            METRIC_CUMULATIVE_NOISE_STDDEV: efficient_tree_cumsum_noise_std(leaves, node_std),
        })
        if sigma_b > 0 or self.mechanism == ADAPTIVE_TREE:
            metrics[METRIC_CLIPPED_COUNT_STDDEV] = sigma_b
        return mean, new_state, metrics

    def _tree_sum_state(self, global_state: Any) -> Any:
        return self._sum_state(global_state)

    def _scalars(self, global_state: Any) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class AdaptiveTreeAggregator(TreeAggregationAggregator):
    """DP-FTRL with adaptive clipping: tensorflow_privacy's ``QAdaClipTreeResSumQuery`` in a
    ``RestartQuery`` (TFF's ``tree_adaptive``). The clipped count is tree-noised too; the
    clip estimate moves every round but the sum's clip (and noise) only adopt it when
    the tree restarts (every ``restart_period`` releases, first after ``restart_warmup``).
    """

    mechanism: str = field(default=ADAPTIVE_TREE, init=False)

    def __post_init__(self) -> None:
        if self.params.mechanism != ADAPTIVE_TREE:
            raise ConfigError(f"AdaptiveTreeAggregator built with mechanism {self.params.mechanism}")
        self._validate()

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator:
        # The estimator counts norms <= its current estimate, not <= the (older) clip in use.
        _check_state(self.mechanism, state)
        return start_accumulator(spec, state.clip_norm, state.scalars.get("quantile_estimate", state.clip_norm))

    def _validate(self) -> tuple[float, tuple[int, int | None] | None]:
        clip = _validate_adaptive(self.params)
        return clip, _validate_restart(self.params, (ADAPTIVE_TREE_RESTART_PERIOD, ADAPTIVE_TREE_RESTART_WARMUP))

    def _noise_split(self, report_goal: int) -> tuple[float, float]:
        return adaptive_noise_split(self.params.noise_multiplier, report_goal, self.params.clipped_count_stddev)

    def _inner_query(self, record_specs: list[Any], report_goal: int, noise_seed: int | None) -> Any:
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery

        p = self.params
        value_z, sigma_b = self._noise_split(report_goal)
        seeds = None if noise_seed is None else tree_noise_seeds(noise_seed)
        query = QAdaClipTreeResSumQuery(
            initial_l2_norm_clip=self._validate()[0],
            noise_multiplier=value_z,
            record_specs=record_specs,
            target_unclipped_quantile=p.target_unclipped_quantile,
            learning_rate=p.clip_learning_rate,
            clipped_count_stddev=sigma_b,
            expected_num_records=report_goal,
            geometric_update=True,
            noise_seed=None if seeds is None else seeds[0],
        )
        if seeds is not None:
            # TFP 0.9.0 builds the clipped-count tree with a clock seed; seed it (private attributes, pinned).
            count_tree = query._quantile_estimator_query._below_estimate_query._numerator._tree_aggregator
            count_tree.value_generator._seed = seeds[1]
        return query

    def sample_state(self, query: Any, sums: Sequence[np.ndarray], acc: RoundAccumulator) -> Any:
        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery

        if acc.count_threshold is None:
            raise ValueError("ADAPTIVE_TREE needs an accumulator from its own start()")
        below = float(acc.below_threshold) - 0.5 * acc.accepted
        return QAdaClipTreeResSumQuery._SampleState(
            [tf.convert_to_tensor(np.asarray(s, np.float32)) for s in sums], tf.constant(below, tf.float32)
        )

    def _tree_sum_state(self, global_state: Any) -> Any:
        return self._sum_state(global_state).sum_state

    def _scalars(self, global_state: Any) -> dict[str, float]:
        estimate = self._sum_state(global_state).quantile_estimator_state.current_estimate
        return {"quantile_estimate": float(estimate.numpy())}


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
    if mechanism == ADAPTIVE_GAUSSIAN:
        return AdaptiveGaussianAggregator(params)
    if mechanism == TREE_AGGREGATION:
        return TreeAggregationAggregator(params)
    if mechanism == ADAPTIVE_TREE:
        return AdaptiveTreeAggregator(params)
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
