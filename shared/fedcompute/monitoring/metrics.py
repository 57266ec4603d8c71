"""Model metrics of a run: every round's ``{pop}/{task}/{n}/s/0/metrics`` JSON as series.

The pure part (:func:`build_run`, :func:`run_label`, :func:`compare_labels`) works on plain
data; :func:`load_run` is the adapter that reads the model bucket through a ``BlobStore``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedcompute import layout
from fedcompute.dp import NO_DP_NAME, parse_mechanism
from fedcompute.errors import InvalidRequestError, NotFoundError
from fedcompute.privacy.disclosure import redact_dp

PRIVACY_EPSILON = "server/privacy/epsilon"
PRIVACY_DELTA = "server/privacy/delta"


class ReadableBlobs(Protocol):
    def read(self, bucket: str, name: str) -> bytes: ...
    def list(self, bucket: str, prefix: str) -> list[str]: ...


@dataclass(frozen=True)
class RunMetrics:
    """The metrics of one task: ``series[name][i]`` is the value of round ``rounds[i]`` (NaN if absent)."""

    population: str
    task_id: int
    label: str
    rounds: tuple[int, ...]
    series: dict[str, tuple[float, ...]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.population}/{self.task_id}"

    @property
    def metric_names(self) -> list[str]:
        return list(self.series)

    def select(self, names: Sequence[str] | None) -> RunMetrics:
        """This run restricted to ``names`` (a name may also be a suffix such as ``auc-roc``).

        Raises:
            NotFoundError: a name matches no metric of the run.
        """
        if not names:
            return self
        chosen: dict[str, tuple[float, ...]] = {}
        for wanted in names:
            matches = [n for n in self.series if n == wanted or n.endswith("/" + wanted)]
            if not matches:
                raise NotFoundError(
                    f"run {self.run_id} has no metric {wanted!r}",
                    hint=f"metrics of this run: {', '.join(self.series) or 'none yet'}",
                )
            for name in matches:
                chosen[name] = self.series[name]
        return RunMetrics(self.population, self.task_id, self.label, self.rounds, chosen, dict(self.config))

    def rows(self) -> list[dict[str, Any]]:
        """One row per round: ``{"round": n, <metric>: value, ...}`` (absent values are None)."""
        return [
            {"round": r, **{name: _json_number(values[i]) for name, values in self.series.items()}}
            for i, r in enumerate(self.rounds)
        ]

    def privacy_ledger(self) -> list[dict[str, Any]]:
        """ε after each round and ε spent in it (the dashboard's ledger); [] for a task without DP.

        ``epsilon`` is cumulative (what the aggregator accounted after the round),
        ``spent`` the increase over the previous round; None where ε is infinite (no noise).
        """
        values = self.series.get(PRIVACY_EPSILON)
        if values is None:
            return []
        deltas = self.series.get(PRIVACY_DELTA, (math.nan,) * len(values))
        ledger, previous = [], 0.0
        for r, eps, delta in zip(self.rounds, values, deltas):
            finite = eps is not None and math.isfinite(eps) and eps >= 0
            ledger.append({"round": r, "epsilon": eps if finite else None, "delta": _json_number(delta),
                           "spent": eps - previous if finite else None})
            if finite:
                previous = eps
        return ledger

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes null) used by the CLI and the dashboard API."""
        return {
            "run": self.run_id,
            "population": self.population,
            "task_id": self.task_id,
            "label": self.label,
            "config": self.config,
            "rounds": list(self.rounds),
            "series": {name: [_json_number(v) for v in values] for name, values in self.series.items()},
            "ledger": self.privacy_ledger(),
        }


def _json_number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def flatten_config(phase: Mapping[str, Any] | None) -> dict[str, Any]:
    """The server phase fields that tell runs apart (``dp`` fields prefixed ``dp.``)."""
    if not phase:
        return {}
    keep = ("learning_algo", "server_optimizer", "server_learning_rate", "report_goal", "over_selection_rate",
            "total_rounds", "population_size", "target_epsilon", "delta")
    config = {k: phase[k] for k in keep if k in phase}
    for key, value in sorted(redact_dp(phase.get("dp")).items()):
        if value is not None:
            config[f"dp.{key}"] = value
    return config


def run_label(config: Mapping[str, Any]) -> str:
    """A short label for a run: ``noise_multiplier 0.1`` for DP runs, ``no DP`` otherwise."""
    if parse_mechanism(str(config.get("dp.type", NO_DP_NAME))) is None or not config:
        return "no DP" if config else "unknown config"
    return f"noise_multiplier {float(config.get('dp.noise_multiplier', 0.0)):g}"


def compare_labels(runs: Sequence[RunMetrics]) -> list[str]:
    """Labels that tell ``runs`` apart: the run label, then the config fields that differ, then the id."""
    labels = [r.label for r in runs]
    if len(set(labels)) == len(labels):
        return labels
    keys = sorted({k for r in runs for k in r.config})
    differing = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    differing = [k for k in differing if k not in ("dp.noise_multiplier", "dp.type")]
    labels = [
        ", ".join([r.label, *(f"{k.removeprefix('dp.')} {r.config.get(k)}" for k in differing)]) for r in runs
    ]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{r.run_id}: {label}" for r, label in zip(runs, labels)]


def build_run(population: str, task_id: int, by_round: Mapping[int, Mapping[str, float]],
              phase: Mapping[str, Any] | None = None) -> RunMetrics:
    """Series per metric over the rounds present in ``by_round`` (pure)."""
    rounds = tuple(sorted(by_round))
    names: list[str] = []
    for r in rounds:
        for name in by_round[r]:
            if name not in names:
                names.append(name)
    series = {
        name: tuple(float(by_round[r][name]) if by_round[r].get(name) is not None else math.nan for r in rounds)
        for name in names
    }
    config = flatten_config(phase)
    return RunMetrics(population, int(task_id), run_label(config), rounds, series, config)


def metric_rounds(names: Sequence[str], population: str, task_id: int) -> list[int]:
    """Round numbers (>= 1) that have a metrics object among ``names``."""
    pattern = re.compile(rf"^{re.escape(population)}/{int(task_id)}/([0-9]+)/s/0/metrics$")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n)) and int(m.group(1)) >= 1})


def load_run(blobs: ReadableBlobs, bucket: str, population: str, task_id: int) -> RunMetrics:
    """Read every round's metrics of ``population/task_id`` from ``bucket``.

    Raises:
        NotFoundError: the task has neither a server phase nor any metrics in the bucket.
    """
    names = blobs.list(bucket, layout.task_prefix(population, task_id))
    phase: dict[str, Any] | None = None
    phase_name = layout.server_phase_path(population, task_id)
    if phase_name in names:
        try:
            phase = json.loads(blobs.read(bucket, phase_name))
        except (ValueError, NotFoundError):
            phase = None  # an unreadable phase only costs the label
    by_round: dict[int, dict[str, float]] = {}
    for r in metric_rounds(names, population, task_id):
        by_round[r] = json.loads(blobs.read(bucket, layout.metrics_path(population, task_id, r)))
    if phase is None and not by_round:
        raise NotFoundError(
            f"no artifacts or metrics for task {population}/{task_id} in gs://{bucket}",
            hint="check the population and task id (`fedcompute status` lists them) and FEDCOMPUTE_MODEL_BUCKET",
        )
    return build_run(population, task_id, by_round, phase)


def parse_run_ref(text: str) -> tuple[str, int]:
    """``"population/task"`` -> ``("population", task)``.

    Raises:
        InvalidRequestError: not of that form.
    """
    population, sep, task = text.rpartition("/")
    if not sep or not population or not layout.is_ascii_decimal(task) or layout.population_name_problem(population):
        raise InvalidRequestError(f"run {text!r} is not POPULATION/TASK_ID", hint="e.g. my_new_population/1")
    return population, int(task)
