"""Privacy accounting (ε for a DP aggregator over a number of rounds) with dp_accounting.

What the task builder checks and what the live privacy ledger uses to stop a task:

* FIXED_GAUSSIAN / ADAPTIVE_GAUSSIAN: each round is a Poisson-sampled Gaussian mechanism
  (sampling rate ``report_goal / population_size``) composed over the rounds, accounted
  with the PLD accountant (default discretization). Like ODP, the adaptive variant is
  accounted as the fixed one (the clip-estimation query's share is not counted separately).
* TREE_AGGREGATION / ADAPTIVE_TREE (DP-FTRL): one tree-aggregation epoch over the rounds,
  accounted with the RDP accountant under the REPLACE_SPECIAL neighbouring relation
  (no sampling amplification, so the population does not matter).

Pure functions over plain numbers; ``dp_accounting`` is imported lazily so that importing
this module stays cheap (the mechanism enum is :class:`fedcompute.dp.DpMechanism`), and nothing here imports TensorFlow.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from fedcompute.dp import DpMechanism
from fedcompute.errors import ArtifactBuildError, ConfigError

DEFAULT_TARGET_EPSILON = 10.0
"""ODP's default ε budget when the config sets no ``dp_target_epsilon``."""
DEFAULT_POPULATION_SIZE = 3_000_000
"""ODP assumes this many devices when turning report_goal into a sampling rate."""
NOISE_MULTIPLIER_STEP = 1e-3
"""Calibrated noise multipliers are rounded up to this grid (so they really pass)."""
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
"""``dp_accounting.pld.PLDAccountant``'s default; kept identical so results match it."""

# Field paths used in error messages (the config the user edits).
_F_NOISE = "differential_privacy.noise_multiplier"
_F_CLIP = "differential_privacy.clip_norm"
_F_ROUNDS = "policies.model_release_policy.num_max_training_rounds"
_F_TARGET = "policies.model_release_policy.dp_target_epsilon"
_F_DELTA = "policies.model_release_policy.dp_delta"
_F_REPORT_GOAL = "federated_learning.learning_process.runtime_config.report_goal"


def default_delta(population_size: int = DEFAULT_POPULATION_SIZE) -> float:
    """ODP's default δ: one over the population size."""
    return 1.0 / population_size


# --------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_noise(noise_multiplier: Any) -> float:
    if not _is_number(noise_multiplier) or noise_multiplier < 0 or math.isinf(noise_multiplier):
        raise ConfigError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}",
            location=_F_NOISE,
        )
    return float(noise_multiplier)


def _check_population(report_goal: Any, population_size: Any) -> float:
    """Validate and return the per-round sampling probability."""
    if not _is_int(report_goal) or report_goal < 1:
        raise ConfigError(
            f"report_goal must be a positive integer, got {report_goal!r}", location=_F_REPORT_GOAL
        )
    if not _is_int(population_size) or population_size < 1:
        raise ConfigError(
            f"population_size must be a positive integer, got {population_size!r}",
            hint="leave it unset to use ODP's assumption of 3,000,000 devices",
        )
    if report_goal > population_size:
        raise ConfigError(
            f"report_goal ({report_goal}) exceeds the population size ({population_size}): the "
            "per-round sampling rate report_goal / population_size must be at most 1",
            location=_F_REPORT_GOAL,
        )
    return report_goal / population_size


def _check_rounds(rounds: Any, field: str = _F_ROUNDS) -> int:
    if not _is_int(rounds) or rounds < 0:
        raise ConfigError(f"the number of rounds must be an integer >= 0, got {rounds!r}", location=field)
    return int(rounds)


def _check_delta(delta: Any) -> float:
    if not _is_number(delta) or not 0 < delta < 1:
        raise ConfigError(f"dp_delta must be strictly between 0 and 1, got {delta!r}", location=_F_DELTA)
    return float(delta)


def _check_target(target_epsilon: Any) -> float:
    if not _is_number(target_epsilon) or target_epsilon <= 0 or math.isinf(target_epsilon):
        raise ConfigError(
            f"dp_target_epsilon must be a finite number > 0, got {target_epsilon!r}", location=_F_TARGET
        )
    return float(target_epsilon)


# --------------------------------------------------------------------------- accounting


PLD_SEARCH_DISCRETIZATION_INTERVAL = 1e-3
"""Coarser grid used only to *search* for the calibrated noise: ~10x faster to build and
slightly pessimistic (ε a few 1e-4 higher), so its root sits at or just above the exact one;
the final value is then checked on the exact (default) grid."""


@functools.lru_cache(maxsize=6)
def _subsampled_gaussian_pld(noise_multiplier: float, sampling_prob: float, interval: float) -> Any:
    """One round's PLD, cached: building it is the expensive part (~9 s at z=0.1),
    composing it over n rounds is cheap, which makes the max-rounds search affordable."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=interval,
        sampling_prob=sampling_prob,
    )


@functools.lru_cache(maxsize=256)
def _gaussian_epsilon(
    noise_multiplier: float, sampling_prob: float, rounds: int, delta: float,
    interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    # Exactly what PLDAccountant() does for
    # SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds), with the
    # single-round PLD cached across calls. The result is cached too: composing 1000
    # rounds at noise 0.1 alone takes seconds, and a task builder sees the same config again.
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    composed = _subsampled_gaussian_pld(noise_multiplier, sampling_prob, interval).self_compose(rounds)
    total = pld_lib.identity(value_discretization_interval=interval).compose(composed)
    return float(total.get_epsilon_for_delta(delta))


def _tree_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, [rounds]))
    return float(accountant.get_epsilon(delta))


def _epsilon(mechanism: DpMechanism, noise_multiplier: float, sampling_prob: float, rounds: int, delta: float) -> float:
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if mechanism.is_tree:
        return _tree_epsilon(noise_multiplier, rounds, delta)
    return _gaussian_epsilon(noise_multiplier, sampling_prob, rounds, delta)


def compute_epsilon(
    mechanism: DpMechanism | str | int,
    *,
    noise_multiplier: float,
    report_goal: int,
    population_size: int = DEFAULT_POPULATION_SIZE,
    rounds: int,
    delta: float | None = None,
) -> float:
    """ε after ``rounds`` rounds of ``mechanism`` at ``delta`` (default 1/population_size).

    Noise 0 gives ``inf``; 0 rounds give 0.
    """
    mech = DpMechanism.coerce(mechanism)
    z = _check_noise(noise_multiplier)
    q = _check_population(report_goal, population_size)
    n = _check_rounds(rounds)
    d = _check_delta(default_delta(population_size) if delta is None else delta)
    return _epsilon(mech, z, q, n, d)


def _event_factory(mechanism: DpMechanism, sampling_prob: float, rounds: int) -> Callable[[float], Any]:
    import dp_accounting

    if mechanism.is_tree:
        return lambda z: dp_accounting.SingleEpochTreeAggregationDpEvent(z, [rounds])
    return lambda z: dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_prob, dp_accounting.GaussianDpEvent(z)), rounds
    )


def _rdp_accountant_factory(mechanism: DpMechanism) -> Callable[[], Any]:
    import dp_accounting
    from dp_accounting import rdp

    relation = (
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        if mechanism.is_tree
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    return lambda: rdp.RdpAccountant(neighboring_relation=relation)


def _bracket(gap: Callable[[float], float], start: float) -> tuple[float, float]:
    """(lo, hi) with gap(lo) > 0 >= gap(hi), by geometric steps from ``start``.

    gap(z) = ε(z) − target decreases in z. Steps are small (×1.25) because the PLD
    gets slow for small z; the start is the (close, slightly pessimistic) RDP answer.
    """
    hi = start
    for _ in range(200):
        if gap(hi) <= 0:
            break
        hi *= 1.25
    else:  # pragma: no cover - ε → 0 as z → ∞, so this cannot happen
        raise ArtifactBuildError(f"could not find a noise multiplier meeting the target (tried up to {hi})")
    lo = hi / 1.25
    for _ in range(200):
        if gap(lo) > 0:
            return lo, hi
        hi, lo = lo, lo / 1.25
    return 0.0, hi  # pragma: no cover - gap(z) → inf as z → 0


def calibrate_noise_multiplier(
    mechanism: DpMechanism | str | int,
    *,
    target_epsilon: float = DEFAULT_TARGET_EPSILON,
    report_goal: int,
    population_size: int = DEFAULT_POPULATION_SIZE,
    rounds: int,
    delta: float | None = None,
) -> float:
    """The smallest noise multiplier (on a grid of :data:`NOISE_MULTIPLIER_STEP`) whose ε
    over ``rounds`` rounds is at most ``target_epsilon``.

    The returned value passes and the value one step below fails (0 rounds → 0.0).
    """
    import dp_accounting

    mech = DpMechanism.coerce(mechanism)
    target = _check_target(target_epsilon)
    q = _check_population(report_goal, population_size)
    n = _check_rounds(rounds)
    d = _check_delta(default_delta(population_size) if delta is None else delta)
    if n == 0:
        return 0.0
    make_event = _event_factory(mech, q, n)

    def gap(z: float) -> float:
        return _epsilon(mech, z, q, n, d) - target

    tol = NOISE_MULTIPLIER_STEP / 10
    try:
        root = _calibrate_root(mech, make_event, target, q, n, d, tol)
    except (ValueError, ArithmeticError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError,
            dp_accounting.mechanism_calibration.NoOptimumFoundError) as err:
        raise ArtifactBuildError(
            f"could not calibrate the noise multiplier of {mech.value} to ε = {target:g} over {n} rounds: {err}",
            hint=f"set {_F_NOISE} explicitly",
        ) from err
    return _snap_up(gap, root)


def _calibrate_root(
    mech: DpMechanism, make_event: Callable[[float], Any], target: float, q: float, n: int, d: float, tol: float
) -> float:
    """A root of ε(z) = target within ``tol`` (not yet on the step grid)."""
    import dp_accounting
    from dp_accounting import pld

    if mech.is_tree:
        # RDP is the exact accountant here and cheap: bracket by doubling from [0, 1].
        return float(dp_accounting.calibrate_dp_mechanism(
            _rdp_accountant_factory(mech), make_event, target, d,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=tol,
        ))
    # Three stages, because building an exact PLD takes seconds: the RDP calibration
    # (milliseconds) is a close, pessimistic estimate that brackets a calibration on a
    # coarse PLD grid (~10x cheaper); _snap_up then settles the grid value on the exact PLD.
    rdp_root = dp_accounting.calibrate_dp_mechanism(
        _rdp_accountant_factory(mech), make_event, target, d,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=tol,
    )

    def coarse_gap(z: float) -> float:
        return _gaussian_epsilon(z, q, n, d, PLD_SEARCH_DISCRETIZATION_INTERVAL) - target

    lo, hi = _bracket(coarse_gap, max(rdp_root, tol))
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: pld.PLDAccountant(value_discretization_interval=PLD_SEARCH_DISCRETIZATION_INTERVAL),
        make_event, target, d,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol,
    ))


def _snap_up(gap: Callable[[float], float], root: float) -> float:
    """Round ``root`` up to the step grid; then make sure the value passes and one step less fails."""
    step = NOISE_MULTIPLIER_STEP
    decimals = max(0, -math.floor(math.log10(step)))
    k = math.ceil(root / step - 1e-9)

    def z(i: int) -> float:
        return round(i * step, decimals)

    while gap(z(k)) > 0:
        k += 1
    while k > 0 and gap(z(k - 1)) <= 0:
        k -= 1
    return z(k)


def max_rounds_within(
    mechanism: DpMechanism | str | int,
    *,
    target_epsilon: float = DEFAULT_TARGET_EPSILON,
    noise_multiplier: float,
    report_goal: int,
    population_size: int = DEFAULT_POPULATION_SIZE,
    delta: float | None = None,
    upper: int,
) -> int:
    """The most rounds (at most ``upper``) whose cumulative ε stays within ``target_epsilon``.

    Binary search (ε grows with the rounds). The live privacy ledger stops a task when the
    next round would go past this number.
    """
    mech = DpMechanism.coerce(mechanism)
    target = _check_target(target_epsilon)
    z = _check_noise(noise_multiplier)
    q = _check_population(report_goal, population_size)
    top = _check_rounds(upper, field="upper")
    d = _check_delta(default_delta(population_size) if delta is None else delta)

    def fits(n: int) -> bool:
        return _epsilon(mech, z, q, n, d) <= target

    if top == 0 or not fits(1):
        return 0
    if fits(top):
        return top
    lo, hi = 1, top  # invariant: fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- the build check


@dataclass(frozen=True)
class DpCheckResult:
    """Outcome of the task builder's DP check (what goes into TaskReport.dp_hyperparameters)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float | None
    rounds: int
    target_epsilon: float
    passed: bool
    message: str
    mechanism: DpMechanism = DpMechanism.FIXED_GAUSSIAN
    report_goal: int = 0
    population_size: int = DEFAULT_POPULATION_SIZE
    noise_calibrated: bool = False
    """True when the config left noise_multiplier unset and it was calibrated to the target."""
    min_noise_multiplier: float | None = None
    """On failure: the smallest noise multiplier that would pass."""
    max_rounds: int | None = None
    """On failure: the most rounds that fit at the configured noise multiplier."""


class DpBudgetExceededError(ArtifactBuildError):
    """ε over the configured rounds is above the target; says how to fix it."""

    def __init__(self, result: DpCheckResult) -> None:
        self.result = result
        fixes = [f"raise {_F_NOISE} to at least {result.min_noise_multiplier:g}"]
        if result.max_rounds:
            fixes.append(f"lower {_F_ROUNDS} to {result.max_rounds}")
        fixes.append(f"raise {_F_TARGET}")
        super().__init__(
            result.message, hint=", or ".join(fixes) + "; --skip_dp_check skips this check"
        )


def _fmt_eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def check_dp(
    mechanism: DpMechanism | str | int,
    *,
    noise_multiplier: float | None,
    clip_norm: float | None = None,
    report_goal: int,
    rounds: int,
    target_epsilon: float | None = None,
    delta: float | None = None,
    population_size: int | None = None,
    raise_on_failure: bool = True,
    explain_failure: bool = True,
) -> DpCheckResult:
    """The task builder's DP check.

    ``None`` means "unset in the config": target ε 10, δ = 1/population_size, population
    3,000,000; an unset noise multiplier is calibrated to the target. Raises
    :class:`DpBudgetExceededError` when ε exceeds the target (unless ``raise_on_failure``
    is False, in which case the failed result is returned). ``explain_failure=False``
    (with ``raise_on_failure=False``) skips working out the noise multiplier and rounds
    that would pass: seconds of PLD calibration that a caller who ignores the failure
    (``--skip_dp_check``) does not need.
    """
    mech = DpMechanism.coerce(mechanism)
    population = DEFAULT_POPULATION_SIZE if population_size is None else population_size
    target = _check_target(DEFAULT_TARGET_EPSILON if target_epsilon is None else target_epsilon)
    q = _check_population(report_goal, population)
    n = _check_rounds(rounds)
    d = _check_delta(default_delta(population) if delta is None else delta)
    if clip_norm is not None and (not _is_number(clip_norm) or clip_norm <= 0 or math.isinf(clip_norm)):
        raise ConfigError(f"clip_norm must be a finite number > 0, got {clip_norm!r}", location=_F_CLIP)
    common: dict[str, Any] = dict(
        delta=d, clip_norm=None if clip_norm is None else float(clip_norm), rounds=n,
        target_epsilon=target, mechanism=mech, report_goal=report_goal, population_size=population,
    )
    setting = (
        f"{mech.value} over {n} rounds, report_goal {report_goal} of a population of "
        f"{population} (sampling rate {q:.3g}), δ = {d:.3g}"
    )
    if noise_multiplier is None:
        z = calibrate_noise_multiplier(
            mech, target_epsilon=target, report_goal=report_goal, population_size=population,
            rounds=n, delta=d,
        )
        eps = _epsilon(mech, z, q, n, d)
        return DpCheckResult(
            epsilon=eps, noise_multiplier=z, passed=True, noise_calibrated=True,
            message=(
                f"DP check passed: noise_multiplier was unset and is calibrated to {z:g} "
                f"(ε = {_fmt_eps(eps)} ≤ target {target:g}; {setting})"
            ),
            **common,
        )
    z = _check_noise(noise_multiplier)
    eps = _epsilon(mech, z, q, n, d)
    if eps <= target:
        return DpCheckResult(
            epsilon=eps, noise_multiplier=z, passed=True,
            message=(
                f"DP check passed: ε = {_fmt_eps(eps)} ≤ target {target:g} at noise_multiplier "
                f"{z:g} ({setting})"
            ),
            **common,
        )
    if not explain_failure and not raise_on_failure:
        return DpCheckResult(
            epsilon=eps, noise_multiplier=z, passed=False,
            message=(
                f"DP check failed: ε = {_fmt_eps(eps)} exceeds the target ε = {target:g} "
                f"(noise_multiplier {z:g}, {setting})."
            ),
            **common,
        )
    min_z = calibrate_noise_multiplier(
        mech, target_epsilon=target, report_goal=report_goal, population_size=population,
        rounds=n, delta=d,
    )
    fit = max_rounds_within(
        mech, target_epsilon=target, noise_multiplier=z, report_goal=report_goal,
        population_size=population, delta=d, upper=n,
    )
    rounds_text = (
        f"at noise_multiplier {z:g} not a single round fits the budget"
        if fit == 0
        else f"at noise_multiplier {z:g} only {fit} of the {n} rounds fit the budget"
    )
    result = DpCheckResult(
        epsilon=eps, noise_multiplier=z, passed=False, min_noise_multiplier=min_z, max_rounds=fit,
        message=(
            f"DP check failed: ε = {_fmt_eps(eps)} exceeds the target ε = {target:g} "
            f"(noise_multiplier {z:g}, {setting}). The smallest noise_multiplier that passes is "
            f"{min_z:g}; {rounds_text}."
        ),
        **common,
    )
    if raise_on_failure:
        raise DpBudgetExceededError(result)
    return result
