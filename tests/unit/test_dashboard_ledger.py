"""The dashboard's privacy ledger: epsilon after each round and spent in it, from the round metrics."""
from __future__ import annotations

import json
import math

import pytest

from fedcompute.monitoring.metrics import build_run
from fedcompute.privacy import compute_epsilon

NOISE, GOAL, POPULATION, DELTA = 1.0, 100, 1000, 1e-3


def _epsilon(rounds: int) -> float:
    return compute_epsilon("FIXED_GAUSSIAN", noise_multiplier=NOISE, report_goal=GOAL, population_size=POPULATION,
                           rounds=rounds, delta=DELTA)


def test_ledger_lists_cumulative_and_per_round_epsilon() -> None:
    by_round = {r: {"server/privacy/epsilon": _epsilon(r), "server/privacy/delta": DELTA, "loss": 1.0 / r}
                for r in (1, 2, 3)}
    ledger = build_run("p", 1, by_round).to_dict()["ledger"]
    assert [row["round"] for row in ledger] == [1, 2, 3]
    assert [row["epsilon"] for row in ledger] == [_epsilon(r) for r in (1, 2, 3)]
    assert ledger[0]["spent"] == _epsilon(1)
    assert ledger[2]["spent"] == pytest.approx(_epsilon(3) - _epsilon(2))
    assert all(row["spent"] > 0 and row["delta"] == DELTA for row in ledger)  # composition only adds
    json.dumps(ledger, allow_nan=False)  # strict JSON for the browser


def test_infinite_epsilon_is_null_and_a_task_without_dp_has_no_ledger() -> None:
    # The aggregator stores -1 (or inf) when there is no noise.
    run = build_run("p", 1, {1: {"server/privacy/epsilon": -1.0}, 2: {"server/privacy/epsilon": math.inf}})
    assert [(row["epsilon"], row["spent"]) for row in run.privacy_ledger()] == [(None, None), (None, None)]
    assert build_run("p", 1, {1: {"loss": 0.5}}).privacy_ledger() == []
