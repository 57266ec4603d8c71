"""Strict JSON: every document fedcompute writes parses with any JSON parser.

One rule for numbers that are not finite (NaN, +inf, -inf): they are written as ``null``.
``null`` in a metrics object, ``summary.json`` or an API response therefore means "no
finite value": ε of a task without noise (unbounded), a loss that diverged, a metric
with no examples. Python's ``json`` would write ``NaN``/``Infinity``, which
``JSON.parse`` and other strict parsers reject.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        return finite_or_none(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` under the rule above (``allow_nan=False`` guards against anything missed)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def loads(text: str | bytes) -> Any:
    """``json.loads`` that rejects ``NaN``, ``Infinity`` and ``-Infinity`` (what strict parsers do)."""
    return json.loads(text, parse_constant=_reject_constant)
