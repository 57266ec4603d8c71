"""Numbered positions handed out by sharded counters (pure, no I/O).

A round has a fixed number of positions of two kinds: *slots* (its over-selection cap of
live assignments) and *accept positions* (its report goal). Each is handed out by
atomic increments of a few counter documents instead of a count query or a transaction
on one document: shard ``i`` owns the positions ``offset(i) .. offset(i) + capacity(i) - 1``
and the n-th increment of its counter (n >= 1) grants position ``offset(i) + n - 1`` while
``n <= capacity(i)``. A counter past its capacity says "this shard is exhausted"; when
every shard is exhausted the round is full. Positions are keys of create-only documents,
so at most one holder ever owns one.

Why shards: one Firestore document sustains about one write per second (soft limit, more
with atomic increments, but a hot spot nonetheless); ``PER_SHARD`` keeps every counter at
a few hundred writes per round while ``MAX_SHARDS`` bounds the probes of an unlucky caller
that finds shards exhausted.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

PER_SHARD = 100
MAX_SHARDS = 64


@dataclass(frozen=True)
class ShardedQuota:
    """``total`` positions split as evenly as possible over ``shards`` counters."""

    total: int
    shards: int

    @classmethod
    def for_total(cls, total: int, *, per_shard: int = PER_SHARD, max_shards: int = MAX_SHARDS) -> ShardedQuota:
        if total < 0:
            raise ValueError(f"a quota needs total >= 0, got {total}")
        return cls(total, min(max_shards, max(1, math.ceil(total / per_shard))))

    def capacity(self, shard: int) -> int:
        base, extra = divmod(self.total, self.shards)
        return base + (1 if shard < extra else 0)

    def offset(self, shard: int) -> int:
        base, extra = divmod(self.total, self.shards)
        return shard * base + min(shard, extra)

    def position(self, shard: int, ticket: int) -> int | None:
        """The position the ``ticket``-th increment (1-based) of ``shard`` grants, or None if past it."""
        if not 1 <= ticket <= self.capacity(shard):
            return None
        return self.offset(shard) + ticket - 1

    def shard_of(self, position: int) -> int:
        for shard in range(self.shards):
            if position < self.offset(shard) + self.capacity(shard):
                return shard
        raise ValueError(f"position {position} is outside a quota of {self.total}")

    def probe_order(self, rng: random.Random, skip: Iterable[int] = (), *, window: int = 0) -> list[int]:
        """Shards without known-exhausted ones: in random order (spreads writers over every
        counter), or with ``window`` > 0 the lowest ``window`` of them in random order and then
        the rest ascending, so the shards fill one after another (a filled shard's positions
        are final while the round still collects: see :mod:`fedcompute.learning.sharding`)."""
        skipped = set(skip)
        order = [s for s in range(self.shards) if s not in skipped]
        if window <= 0:
            rng.shuffle(order)
            return order
        head = order[:window]
        rng.shuffle(head)
        return head + order[window:]

    def is_full(self, filled: dict[int, int]) -> bool:
        """True when every shard's ``filled`` count reached its capacity."""
        return all(filled.get(s, 0) >= self.capacity(s) for s in range(self.shards))
