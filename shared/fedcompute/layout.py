"""The ODP storage layout (pure path arithmetic, no I/O).

Model bucket::

    {pop}/{task}/0/s/0/client_only_plan      client plan (everything a device needs to train)
    {pop}/{task}/0/s/0/server_phase          server phase (algorithm, optimizer, DP, goal)
    {pop}/{task}/0/s/0/eval_plan             evaluation plan (evaluation tasks)
    {pop}/{task}/{n}/s/0/checkpoint          server checkpoint after round n (0 = initial)
    {pop}/{task}/{n}/d/0/client_checkpoint   weights devices of round n+1 download
    {pop}/{task}/{n}/s/0/metrics             flat JSON metrics of round n (n >= 1)

Gradient bucket::

    {pop}/{task}/{n}/d/{assignment_id}/gradient   one device's gzip'd update for round n

Training rounds are numbered from 1; round n trains from checkpoint n-1 and writes
checkpoint n. This keeps the seed's monitoring script (metrics of rounds 1..N) working.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

POPULATION_PATTERN = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"  # no leading dot: never "." or ".."
MAX_POPULATION_NAME_CHARS = 128
# What a population name in a request may be: starts with a letter or digit (never "__x__",
# "." or "-x"), at most 128 ASCII characters (a Firestore id and a storage path segment).
VALID_POPULATION_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MAX_POPULATION_NAME_CHARS - 1}}}")
MAX_ID_DIGITS = 18  # task ids, round numbers and version codes fit an int64


def is_ascii_decimal(text: str, max_digits: int = MAX_ID_DIGITS) -> bool:
    """``"341912000"`` yes; ``"²"``, ``"٣"`` (``str.isdigit`` says yes to both), ``""``, ``"-1"`` no."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def population_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid population name in a request, or None."""
    if VALID_POPULATION_RE.fullmatch(name):
        return None
    if len(name) > MAX_POPULATION_NAME_CHARS:
        return f"population name is {len(name)} characters, over {MAX_POPULATION_NAME_CHARS}"
    return (f"population name {name[:40]!r} must start with a letter or digit and use only ASCII letters, "
            "digits, '_', '-' and '.'")
GRADIENT_PATH_RE = re.compile(
    rf"^(?P<population>{POPULATION_PATTERN})/(?P<task_id>[0-9]+)/(?P<round>[0-9]+)/d/(?P<assignment_id>[A-Za-z0-9\-]+)/gradient$"
)


def _base(population: str, task_id: int, round_number: int) -> str:
    return f"{population}/{task_id}/{round_number}"


def client_plan_path(population: str, task_id: int) -> str:
    return f"{_base(population, task_id, 0)}/s/0/client_only_plan"


def server_phase_path(population: str, task_id: int) -> str:
    return f"{_base(population, task_id, 0)}/s/0/server_phase"


def eval_plan_path(population: str, task_id: int) -> str:
    return f"{_base(population, task_id, 0)}/s/0/eval_plan"


def tflite_training_path(population: str, task_id: int) -> str:
    return f"{_base(population, task_id, 0)}/s/0/client_training.tflite"


def tflite_eval_path(population: str, task_id: int) -> str:
    return f"{_base(population, task_id, 0)}/s/0/client_eval.tflite"


def checkpoint_path(population: str, task_id: int, round_number: int) -> str:
    return f"{_base(population, task_id, round_number)}/s/0/checkpoint"


def client_checkpoint_path(population: str, task_id: int, round_number: int) -> str:
    return f"{_base(population, task_id, round_number)}/d/0/client_checkpoint"


def metrics_path(population: str, task_id: int, round_number: int) -> str:
    return f"{_base(population, task_id, round_number)}/s/0/metrics"


def gradient_path(population: str, task_id: int, round_number: int, assignment_id: str) -> str:
    return f"{_base(population, task_id, round_number)}/d/{assignment_id}/gradient"


def partial_aggregate_path(population: str, task_id: int, round_number: int, shards: int, shard: int) -> str:
    """Shard ``shard`` of ``shards``' partial aggregate (aggregate bucket; create-only)."""
    return f"{_base(population, task_id, round_number)}/s/0/partial/{shards}/{shard}"


def task_prefix(population: str, task_id: int) -> str:
    return f"{population}/{task_id}/"


@dataclass(frozen=True)
class GradientObject:
    """The parts of a gradient object's name."""

    population: str
    task_id: int
    round_number: int
    assignment_id: str


def parse_gradient_path(name: str) -> GradientObject | None:
    """Split a gradient object name, or None when it is not one (a foreign path)."""
    match = GRADIENT_PATH_RE.match(name)
    if not match:
        return None
    return GradientObject(
        population=match["population"],
        task_id=int(match["task_id"]),
        round_number=int(match["round"]),
        assignment_id=match["assignment_id"],
    )
