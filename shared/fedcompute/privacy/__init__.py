"""Differential-privacy accounting for the task builder and the live privacy ledger.

Pure math over plain values (dp_accounting only, no TensorFlow).
"""
from fedcompute.privacy.accounting import (
    DEFAULT_POPULATION_SIZE,
    DEFAULT_TARGET_EPSILON,
    NOISE_MULTIPLIER_STEP,
    DpBudgetExceededError,
    DpCheckResult,
    DpMechanism,
    calibrate_noise_multiplier,
    check_dp,
    compute_epsilon,
    default_delta,
    max_rounds_within,
)

__all__ = [
    "DEFAULT_POPULATION_SIZE",
    "DEFAULT_TARGET_EPSILON",
    "NOISE_MULTIPLIER_STEP",
    "DpBudgetExceededError",
    "DpCheckResult",
    "DpMechanism",
    "calibrate_noise_multiplier",
    "check_dp",
    "compute_epsilon",
    "default_delta",
    "max_rounds_within",
]
