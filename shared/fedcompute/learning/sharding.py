"""How a closed round's aggregation is split into shards (pure, no I/O).

A round of ``report_goal`` accept positions (``0 .. report_goal - 1``: one marker document
per accepted report, see :mod:`fedcompute.tasks.quota`) is aggregated by K jobs; job ``i``
reads the positions of :func:`shard_positions` ``(report_goal, K, i)``, clips and sums them
into a partial aggregate, and one combine merges the K partials and adds the noise once.

Choosing K (:func:`shard_count`): a job should finish well inside its Pub/Sub ack deadline
and its function timeout (600 s), and K jobs should not exceed the instances the aggregator
may run at once (the *instance budget*, ``max_shards``). A job's work is estimated as the
bytes it decodes plus a fixed per-object cost for the storage round trip
(:data:`PER_OBJECT_COST_BYTES`): measured on the local stack, one CNN update (6.2 MB) took
~60 ms to read, decode, clip and add, and one tiny update ~7 ms, i.e. ~100 MB/s plus ~5 ms
per object. With the default budget of 1 GiB per shard a shard runs ~10-20 s; so

    K = clamp(ceil(report_goal * (update_bytes + PER_OBJECT_COST_BYTES) / shard_bytes), 1, max_shards)

and never more shards than reports. E.g. the seed CNN (6.2 MB) at report goal 1,000 -> 7
shards; a 31 KB model at 10,000 reports -> 3; at 100 reports -> 1 (today's single job).
``FEDCOMPUTE_AGGREGATION_SHARDS`` forces K (tests force K >= 4).

Streamed (:func:`streamed_shards`, the default for a round of more than one accept counter):
K is the number of the round's accept counters (:class:`~fedcompute.tasks.quota.ShardedQuota`,
~100 positions each), so shard ``i``'s positions are exactly counter ``i``'s. Ingestion fills
the counters one after another (a window of :data:`ACCEPT_WINDOW` at a time) and publishes
shard ``i`` as soon as counter ``i`` is full: every one of its positions then holds a create-
only marker, so its slice of the accepted set is final while the round still collects. The
partial sums run during collection, and at the close only the last counter's shard and the
combine remain (the close re-sends whichever shards are not finished). The trade: ~2 counter
documents take the round's accepts at a time instead of all of them (tens of increments a
second each, well inside what Firestore's atomic increments sustain).
"""
from __future__ import annotations

import math

from fedcompute.errors import InvariantError
from fedcompute.tasks.quota import ShardedQuota

# Accept counters that take a round's accepts at once when its aggregation is streamed.
ACCEPT_WINDOW = 2
# Storage round trip of one object, expressed as the bytes one could decode meanwhile (~5 ms).
PER_OBJECT_COST_BYTES = 256 * 1024


def streamed_shards(report_goal: int, *, streaming: bool, forced: int = 0) -> int:
    """K for a round aggregated while it collects (one shard per accept counter), else 0:
    streaming off, K forced, or a round of a single counter (nothing to do early)."""
    if not streaming or forced >= 1 or report_goal < 1:
        return 0
    counters = ShardedQuota.for_total(report_goal).shards
    return counters if counters > 1 else 0


def shard_count(report_goal: int, update_bytes: int, *, shard_bytes: int, max_shards: int, forced: int = 0,
                streaming: bool = False) -> int:
    """The number of shards a round is aggregated in (see the module docstring); ``forced`` >= 1
    wins, then a streamed round's (:func:`streamed_shards`), then the estimate from the bytes."""
    if report_goal < 1:
        raise InvariantError(f"report_goal must be >= 1, got {report_goal}")
    if forced >= 1:
        return min(forced, report_goal)
    streamed = streamed_shards(report_goal, streaming=streaming)
    if streamed:
        return streamed
    if shard_bytes < 1 or max_shards < 1:
        raise InvariantError(f"shard_bytes and max_shards must be >= 1, got {shard_bytes} and {max_shards}")
    wanted = math.ceil(report_goal * (max(0, update_bytes) + PER_OBJECT_COST_BYTES) / shard_bytes)
    return max(1, min(wanted, max_shards, report_goal))


def shard_positions(report_goal: int, shards: int, shard: int) -> range:
    """The accept positions shard ``shard`` of ``shards`` aggregates (an even split, in order)."""
    if not 0 <= shard < shards:
        raise InvariantError(f"shard {shard} is outside 0..{shards - 1}")
    quota = ShardedQuota(report_goal, shards)
    start = quota.offset(shard)
    return range(start, start + quota.capacity(shard))
