"""Differential-privacy accounting for the task builder and the live privacy ledger.

Pure math over plain values (dp_accounting only, no TensorFlow). The accounting names are
loaded on first use: light functions that only need :mod:`fedcompute.privacy.disclosure`
(dashboard, task management) never import the accountant or its dependencies.
"""
from __future__ import annotations

import importlib
from typing import Any

_ACCOUNTING_NAMES = frozenset({
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
})

__all__ = sorted(_ACCOUNTING_NAMES)


def __getattr__(name: str) -> Any:
    if name in _ACCOUNTING_NAMES:
        return getattr(importlib.import_module("fedcompute.privacy.accounting"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
