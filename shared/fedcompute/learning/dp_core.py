"""What every DP mechanism shares: its state, its protocol, noise seeds and Gaussian noise.

* :class:`DpState`: a mechanism's state between rounds (stored in the checkpoint).
* :class:`DpAggregator`: the protocol each mechanism implements (``initial_state``,
  ``start``, ``add``, ``finish``); the mechanisms live in :mod:`.dp_gaussian` and
  :mod:`.dp_tree`, and :func:`fedcompute.learning.dp_mechanisms.build_dp_aggregator` picks one.
* Noise seeds (:func:`derive_noise_seed`) and the seeded ``GaussianSumQuery`` draw
  (:func:`gaussian_sum_query_noise`); TensorFlow is imported only when noise is drawn.
* The round metrics every mechanism reports (``server/aggregator/...``) and the parameter
  checks the mechanisms run when they are built.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedcompute.dp import DpMechanism, DpParams, mechanism_name, parse_mechanism
from fedcompute.errors import ConfigError, InvariantError
from fedcompute.learning.accumulator import RoundAccumulator, start_accumulator
from fedcompute.learning.tensor_codec import ClientUpdate, SpecLike
from fedcompute.metric_names import NON_FINITE_METRIC

# Round metrics a mechanism reports (flat names, float values, as in the seed's metrics JSON).
METRIC_UPDATE_NON_FINITE = NON_FINITE_METRIC  # "server/finalizer/update_non_finite"
METRIC_ACCEPTED = "server/aggregator/accepted_updates"
METRIC_CLIPPED = "server/aggregator/clipped_updates"
METRIC_REPORT_GOAL = "server/aggregator/report_goal"
METRIC_CLIP_NORM = "server/aggregator/clip_norm"
METRIC_NOISE_MULTIPLIER = "server/aggregator/noise_multiplier"
METRIC_NOISE_STDDEV = "server/aggregator/noise_stddev"
METRIC_MEAN_NOISE_STDDEV = "server/aggregator/mean_noise_stddev"
METRIC_METRICS_REJECTED = "server/aggregator/metrics_rejected"
METRIC_NEXT_CLIP_NORM = "server/aggregator/next_clip_norm"
METRIC_UNCLIPPED_FRACTION = "server/aggregator/unclipped_fraction"
METRIC_NOISED_UNCLIPPED_FRACTION = "server/aggregator/noised_unclipped_fraction"
METRIC_VALUE_NOISE_MULTIPLIER = "server/aggregator/value_noise_multiplier"
METRIC_CLIPPED_COUNT_STDDEV = "server/aggregator/clipped_count_stddev"
METRIC_CUMULATIVE_NOISE_STDDEV = "server/aggregator/cumulative_noise_stddev"
METRIC_TREE_LEAVES = "server/aggregator/tree_leaves"

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class DpState:
    """DP mechanism state carried from round to round (stored in the checkpoint).

    ``clip_norm`` is the clip the next round uses (adaptive clipping changes it);
    ``scalars`` / ``tensors`` hold mechanism-specific state (quantile estimate, tree
    buffers); ``last_seed`` is the noise seed of the last release.
    """

    mechanism: DpMechanism | None  # None: no DP
    clip_norm: float | None
    noise_multiplier: float
    release_count: int = 0
    last_seed: int | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    tensors: tuple[tuple[str, np.ndarray], ...] = ()

    def __post_init__(self) -> None:  # accept the wire spelling (checkpoints store the name)
        object.__setattr__(self, "mechanism", parse_mechanism(self.mechanism))


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


_TF_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def tf_global_seed(seed: int) -> Iterator[None]:
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
        raise InvariantError(f"noise seed must be in [0, 2**63), got {seed}")
    import tensorflow as tf
    from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

    query = GaussianSumQuery(l2_norm_clip=clip_norm, stddev=stddev)
    global_state = query.initial_global_state()
    sample_state = [tf.convert_to_tensor(s) for s in sums]
    with tf_global_seed(int(seed)):
        result, _, event = query.get_noised_result(sample_state, global_state)
    return [r.numpy() for r in result], event


class DpAggregator(Protocol):
    """A DP aggregation mechanism. Built from :class:`DpParams` (validated); stateless itself.

    ``start`` reads the clip from the DP state (adaptive clipping moves it); ``finish``
    releases the noised mean and the next DP state. The adaptive and tree variants take
    their extra per-round statistics from the accumulator's counters (``accepted - clipped``
    updates within the clip; ``below_threshold`` for ADAPTIVE_TREE) and carry their state in
    ``DpState.clip_norm`` / ``scalars`` / ``tensors`` (the tree under ``tree/``).
    """

    @property
    def mechanism(self) -> DpMechanism | None: ...

    @property
    def params(self) -> DpParams: ...

    def initial_state(self) -> DpState: ...

    def start(self, spec: SpecLike, state: DpState) -> RoundAccumulator: ...

    def add(self, acc: RoundAccumulator, update: ClientUpdate) -> RoundAccumulator: ...

    def finish(
        self, acc: RoundAccumulator, state: DpState, *, report_goal: int, seed: int | None
    ) -> tuple[tuple[np.ndarray, ...], DpState, dict[str, float]]: ...


def clip_value(clip_norm: float | None) -> float:
    """A clipping mechanism's clip norm (validation guarantees it is set)."""
    if clip_norm is None:
        raise InvariantError("this DP mechanism clips, but its clip_norm is unset")
    return float(clip_norm)


def check_state(mechanism: DpMechanism | None, state: DpState) -> None:
    if state.mechanism != mechanism:
        raise ConfigError(
            f"DP state is for {mechanism_name(state.mechanism)}, but the task aggregates with "
            f"{mechanism_name(mechanism)}",
            hint="a checkpoint cannot change DP mechanism mid-task; start a new task",
        )


def start_at_state_clip(mechanism: DpMechanism | None, spec: SpecLike, state: DpState) -> RoundAccumulator:
    """An empty accumulator clipping at the DP state's clip (adaptive clipping moves it)."""
    check_state(mechanism, state)
    return start_accumulator(spec, state.clip_norm)


def counter_metrics(acc: RoundAccumulator, report_goal: int) -> dict[str, float]:
    return {
        METRIC_UPDATE_NON_FINITE: float(acc.non_finite),
        METRIC_ACCEPTED: float(acc.accepted),
        METRIC_CLIPPED: float(acc.clipped),
        METRIC_REPORT_GOAL: float(report_goal),
        METRIC_METRICS_REJECTED: float(acc.metrics_rejected),
    }


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


def validate_noise(p: DpParams) -> None:
    if not (math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0):
        raise ConfigError(
            f"noise_multiplier must be >= 0, got {p.noise_multiplier}",
            location="differential_privacy.noise_multiplier",
        )


def validate_clip(value: float | None, field_name: str, mechanism: DpMechanism | None) -> float:
    if value is None or not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{mechanism_name(mechanism)} needs {field_name} > 0, got {value}",
            location=f"differential_privacy.{field_name}",
            hint=f"e.g. {field_name}: 0.1",
        )
    return float(value)


def validate_adaptive(p: DpParams) -> float:
    """Checks the adaptive-clipping fields; returns the initial clip."""
    if p.init_clip_norm is not None:
        clip = validate_clip(p.init_clip_norm, "init_clip_norm", p.mechanism)
    else:
        clip = validate_clip(p.clip_norm, "clip_norm", p.mechanism)
    validate_noise(p)
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


def validate_restart(p: DpParams, default: tuple[int, int | None] | None) -> tuple[int, int | None] | None:
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


def need_seed(seed: int | None, noisy: bool, mechanism: DpMechanism | None) -> int:
    if seed is None:
        if noisy:
            raise InvariantError(f"a noise seed is required for {mechanism_name(mechanism)} with noise (see derive_noise_seed)")
        return 0
    if not 0 <= int(seed) <= MAX_SEED:
        raise InvariantError(f"noise seed must be in [0, 2**63), got {seed}")
    return int(seed)


def counter_metrics_with_unclipped_fraction(acc: RoundAccumulator, report_goal: int) -> dict[str, float]:
    metrics = counter_metrics(acc, report_goal)
    metrics[METRIC_UNCLIPPED_FRACTION] = (acc.accepted - acc.clipped) / acc.accepted if acc.accepted else 0.0
    return metrics
