"""Upper bounds on what one task may make the servers compute, store and account for.

Shared by the task config validation (task builder) and task management (which also takes
tasks straight over HTTP), so both refuse the same values. A round of 100,000 reports is
far above cross-device practice (hundreds to a few thousands per round) and still fits the
aggregator; a million rounds bounds the privacy ledger and the ε accounting.
"""
from __future__ import annotations

MAX_REPORT_GOAL = 100_000
# max_aggregation_size = report goal x (1 + over-selection rate), over-selection at most 1.
MAX_AGGREGATION_SIZE = 2 * MAX_REPORT_GOAL
MAX_TRAINING_ROUNDS = 1_000_000
MAX_POPULATION_SIZE = 10_000_000_000
MAX_BATCH_SIZE = 65_536
MAX_EPOCHS = 1_000
