"""What a task may say about its privacy, and what it must never reveal.

* :func:`check_noise_seed`: a config that fixes ``differential_privacy.noise_seed`` makes
  the noise reproducible by whoever reads the config, so it is no privacy at all. The
  task builder refuses it unless the build is explicitly a non-private test run.
* :func:`redact_dp`: the DP fields safe to show (dashboard, metrics, task records, task
  management): everything but the noise seed. The per-task noise secret lives only on the
  task record and is never put into an API answer.
* :func:`privacy_assumptions`: the assumptions behind the reported ε, in one paragraph
  (the task builder's report and the README say the same).

Pure functions, no I/O, no TensorFlow.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcompute.errors import ConfigError

SECRET_DP_FIELDS = frozenset({"noise_seed", "noise_secret"})
"""DP fields that would let anyone recompute (and subtract) the noise."""

NON_PRIVATE_TEST_RUN_FLAG = "--non_private_test_run"


def check_noise_seed(noise_seed: int | None, *, non_private_test_run: bool) -> None:
    """Refuse a fixed noise seed unless the build is a declared non-private test run."""
    if noise_seed is None or non_private_test_run:
        return
    raise ConfigError(
        f"differential_privacy.noise_seed is set ({noise_seed}): anyone who reads the config can "
        "regenerate the noise and remove it, so the task would have no privacy",
        location="differential_privacy.noise_seed",
        hint=f"delete noise_seed (the server draws a secret per task), or build with {NON_PRIVATE_TEST_RUN_FLAG} "
             "for a reproducible test run whose epsilon is not a guarantee",
    )


def redact_dp(dp: Mapping[str, Any] | None) -> dict[str, Any]:
    """``dp`` without the fields that reveal the noise (a copy; the input is unchanged)."""
    return {k: v for k, v in (dp or {}).items() if k not in SECRET_DP_FIELDS}


def privacy_assumptions(mechanism: str, *, report_goal: int, population_size: int,
                        over_selection_rate: float = 0.0) -> str:
    """The assumptions under which the task's ε holds, as one paragraph of plain text."""
    q = report_goal / population_size if population_size else float("nan")
    if mechanism in ("TREE_AGGREGATION", "ADAPTIVE_TREE"):
        sampling = ("tree aggregation (DP-FTRL) is accounted without sampling amplification "
                    "(REPLACE_SPECIAL adjacency), so the population size does not enter epsilon")
    else:
        sampling = (f"each round is accounted as a Poisson-sampled Gaussian with q = report_goal / "
                    f"population_size = {report_goal}/{population_size} = {q:.4g}; the server does not "
                    "sample: devices check in first-come, and over-selection "
                    f"({over_selection_rate:.0%}) lets more devices start than report, so q is an "
                    "assumption about which devices happen to check in (ODP has the same gap)")
    return (f"epsilon is client-level (adjacent datasets differ in one device's whole data, every "
            f"round it joins); {sampling}; the noise is drawn from a per-task server secret and is "
            f"never published; population_size must be the real number of eligible devices or "
            f"epsilon is wrong")
