"""Aggregation from storage: single job vs K shards, and vs the raw read + decode rate.

In one run, against fake-gcs-server (the local stack's storage emulator, over HTTP):

1. writes N updates of the seed CNN's shapes (1,663,370 float32 = 6.65 MB each, raw,
   plaintext) to the gradient bucket;
2. **raw**: reads and decodes all N objects with 16 threads, nothing else: the rate the
   aggregator is bounded by;
3. **single job** (K = 1): ``services.aggregator.aggregate_round`` (clip, sum, seeded
   FIXED_GAUSSIAN noise, server optimizer, checkpoint; TensorFlow loaded beforehand, as in a
   warm instance);
4. **sharded** (K = ``--shards``): round-ready (fan-out), K ``aggregate_shard`` calls run at
   once on K threads (as the local stack's aggregator process serves K pushed messages),
   then the combine; checks the checkpoint equals the single job's (same noise seed).

The round's records live in the in-memory store (Firestore is not what is measured here:
a shard makes one batched read of its accept markers); the model bucket is in memory too, the
gradient and aggregate buckets are fake-gcs-server's.

Run: .venv/bin/python benchmarks/bench_sharded_aggregation.py [--n 1000] [--shards 4] [--repeats 3]
[--profile DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_aggregation import CLIP, CNN_SPEC  # noqa: E402

POP = "bench_sharded"
# The CNN's shapes under the names the task builder gives trainable weights.
SPEC = [(f"trainable/{i}", shape, dtype) for i, (_, shape, dtype) in enumerate(CNN_SPEC)]


class RoutedBlobs:
    """The model bucket in memory, every other bucket on the storage emulator."""

    def __init__(self, model_bucket: str, model: Any, storage: Any) -> None:
        self._model_bucket, self._model, self._storage = model_bucket, model, storage

    def _for(self, bucket: str) -> Any:
        return self._model if bucket == self._model_bucket else self._storage

    def read(self, bucket: str, name: str) -> bytes:
        return self._for(bucket).read(bucket, name)

    def write(self, bucket: str, name: str, data: bytes, **kwargs: Any) -> bool:
        return self._for(bucket).write(bucket, name, data, **kwargs)

    def exists(self, bucket: str, name: str) -> bool:
        return self._for(bucket).exists(bucket, name)

    def list(self, bucket: str, prefix: str) -> list[str]:
        return self._for(bucket).list(bucket, prefix)

    def delete(self, bucket: str, name: str) -> None:
        self._for(bucket).delete(bucket, name)

    def create_upload_session(self, bucket: str, name: str, **kwargs: Any) -> tuple[str, dict[str, str]]:
        return self._for(bucket).create_upload_session(bucket, name, **kwargs)

    def download_url(self, bucket: str, name: str) -> str:
        return self._for(bucket).download_url(bucket, name)


def fresh_round(settings: Any, storage: Any, ids: list[str]) -> tuple[Any, Any, Any, Any]:
    """An in-memory task whose round 1 accepted ``ids`` (their updates already in storage), AGGREGATING."""
    from fedcompute.dp import DpMechanism, DpParams
    from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents, InMemoryTaskStore
    from fedcompute.plans import ServerPhase
    from fedcompute.services import task_management as tm
    from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs
    from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundKey, RoundStatus, TaskKind

    store, events = InMemoryTaskStore(), InMemoryRoundEvents()
    blobs = RoutedBlobs(settings.model_bucket, InMemoryBlobStore(), storage)
    goal = len(ids)
    task = tm.create_task(store, tm.NewTask(population=POP, kind=TaskKind.TRAINING, total_rounds=2, report_goal=goal,
                                            max_aggregation_size=goal))
    weights = [np.zeros(shape, np.float32) for _, shape, _ in SPEC]
    dp = DpParams(DpMechanism.FIXED_GAUSSIAN, noise_multiplier=1.0, clip_norm=CLIP, noise_seed=42)
    phase = ServerPhase("FED_AVG", "SGD", 1.0, goal, 0.0, 2, 100 * goal, 1e9, 1e-6, dp,
                        weight_specs(weights), ("loss",))
    publish_artifacts(blobs, settings, POP, task.task_id, artifacts_from_weights(phase, weights))
    tm.open_task(store, blobs, settings, POP, task.task_id)
    for slot, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, POP, task.task_id, 1, AssignmentStatus.UPLOAD_COMPLETED, "1",
                                                 slot, 0, 0))
    key = RoundKey(POP, task.task_id, 1)
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    return store, blobs, events, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="updates in the round")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions (medians reported)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="py-spy record this process during the single job and the sharded run; top frames "
                             "go to the report")
    args = parser.parse_args(argv)
    from bench_load import Profiler

    from fedcompute import layout
    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.clients import make_clients
    from fedcompute.learning import checkpoint, upload_contract
    from fedcompute.learning.tensor_codec import encode_client_update
    from fedcompute.services import aggregator
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack
    from fedcompute.tasks.records import TaskKind, TaskRecord, TaskStatus
    from fedcompute.tensor_spec import TensorSpec

    work = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    stack = LocalStack(work / "stack", task_builder_port=0, functions=())
    stack.start()
    report: dict[str, Any] = {"n": args.n, "shards": args.shards, "update_mb": round(
        sum(int(np.prod(s)) * 4 for _, s, _ in SPEC) / 1e6, 2),
        "machine": f"{os.cpu_count()} cores, shared; ratios are from this one run"}
    try:
        os.environ.update(stack.env())
        settings = Settings.from_env()
        storage = GcsBlobStore(make_clients(settings).storage)
        ids = [f"dev{i:05d}" for i in range(args.n)]
        rng = np.random.default_rng(0)
        stats = {name: np.full(shape, 1.0) for name, shape, _ in upload_contract.metric_statistics_spec(("loss",))}
        pool = [encode_client_update([(n, (rng.standard_normal(s, dtype=np.float32) * np.float32(CLIP / 1290 *
                                                                                             (0.5 + k / 8))))
                                      for n, s, _ in SPEC], 10, stats, compress=False) for k in range(8)]

        def put(i: int) -> None:
            storage.write(settings.gradient_bucket, layout.gradient_path(POP, 1, 1, ids[i]), pool[i % len(pool)])

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as threads:
            for done, _ in enumerate(threads.map(put, range(args.n)), 1):
                if done % 100 == 0:
                    print(f"wrote {done}/{args.n} updates", file=sys.stderr)
        report["write_s"] = round(time.perf_counter() - start, 1)

        task = TaskRecord(population=POP, task_id=1, kind=TaskKind.TRAINING, status=TaskStatus.OPEN,
                          report_goal=args.n, over_selection_rate=0.0, total_rounds=2, metrics=("loss",),
                          update_spec=tuple(TensorSpec(n, tuple(s), d) for n, s, d in SPEC))

        def read_decode(aid: str) -> int:
            data = storage.read(settings.gradient_bucket, layout.gradient_path(POP, 1, 1, aid))
            return upload_contract.decode_upload(data, task).num_examples

        def raw() -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(aggregator.READ_AHEAD) as threads:
                assert sum(threads.map(read_decode, ids)) == 10 * args.n
            return time.perf_counter() - start

        def single_job() -> tuple[float, Any]:
            single = fresh_round(settings, storage, ids)
            start = time.perf_counter()
            outcome = aggregator.aggregate_round(*single[:3], dataclasses.replace(settings, aggregation_shards=1),
                                                 single[3])
            assert outcome.status == "AGGREGATED", outcome
            return time.perf_counter() - start, single[1]

        def sharded() -> tuple[float, Any, dict[str, float]]:
            sharded_settings = dataclasses.replace(settings, aggregation_shards=args.shards)
            store, blobs, events, key = fresh_round(settings, storage, ids)
            start = time.perf_counter()
            assert aggregator.aggregate_round(store, blobs, events, sharded_settings, key).status == "SHARDS_PUBLISHED"
            fan_out_s = time.perf_counter() - start
            shard_times: list[float] = []

            def run_shard(message: tuple[Any, int, int]) -> str:
                t0 = time.perf_counter()
                status = aggregator.aggregate_shard(store, blobs, events, sharded_settings, message[0], message[1],
                                                    message[2]).status
                shard_times.append(time.perf_counter() - t0)
                return status

            with ThreadPoolExecutor(args.shards) as threads:
                statuses = list(threads.map(run_shard, list(events.shards)))
            shards_done = time.perf_counter()
            assert statuses.count("SHARD_DONE_COMBINE_PUBLISHED") == 1 and events.ready == [key], statuses
            assert aggregator.aggregate_round(store, blobs, events, sharded_settings, key).status == "AGGREGATED"
            total = time.perf_counter() - start
            return total, blobs, {"fan_out": round(fan_out_s, 2), "slowest_shard": round(max(shard_times), 2),
                                  "combine": round(time.perf_counter() - shards_done, 2)}

        # Load TensorFlow (the noise draw) and build the round's privacy-loss distribution before
        # timing: a warm aggregator instance has both (the PLD is cached per process).
        from fedcompute.learning.dp_core import gaussian_sum_query_noise

        gaussian_sum_query_noise([np.zeros(1)], clip_norm=1.0, stddev=1.0, seed=0)
        warm = fresh_round(settings, storage, ids)
        from fedcompute.learning import server_round
        from fedcompute.plans import ServerPhase

        warm_phase = ServerPhase.from_json(warm[1].read(settings.model_bucket, layout.server_phase_path(POP, 1)))
        server_round.epsilon_after(warm_phase, 2)
        profiler = Profiler(Path(args.profile) if args.profile else None)
        runs: dict[str, list[float]] = {"raw": [], "single": [], "sharded": []}
        for repeat in range(args.repeats):  # interleaved, so a load change on the machine hits all three
            runs["raw"].append(raw())
            if repeat == 0:
                profiler.start("single_job", os.getpid())
            single_s, single_blobs = single_job()
            runs["single"].append(single_s)
            if repeat == 0:
                report["profile_single_job"] = profiler.stop()
                profiler.start(f"sharded_k{args.shards}", os.getpid())
            sharded_s, sharded_blobs, stages = sharded()
            runs["sharded"].append(sharded_s)
            if repeat == 0:
                report["profile_sharded"] = profiler.stop()
            print(f"repeat {repeat + 1}: raw {runs['raw'][-1]:.1f} s, single {single_s:.1f} s, "
                  f"sharded K={args.shards} {sharded_s:.1f} s {stages}", file=sys.stderr)

        def weights(round_blobs: Any) -> tuple[np.ndarray, ...]:
            return checkpoint.decode_checkpoint(round_blobs.read(settings.model_bucket,
                                                                 layout.checkpoint_path(POP, 1, 1))).weights

        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(single_blobs), weights(sharded_blobs)))
        raw_s, single_s, sharded_s = (statistics.median(runs[k]) for k in ("raw", "single", "sharded"))
        report.update({
            "runs_s": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
            "raw_read_decode_s": round(raw_s, 2), "raw_updates_per_s": round(args.n / raw_s, 1),
            "single_job_s": round(single_s, 2), "single_updates_per_s": round(args.n / single_s, 1),
            "single_vs_raw": round(raw_s / single_s, 3),
            "sharded_s": round(sharded_s, 2), "sharded_updates_per_s": round(args.n / sharded_s, 1),
            "sharded_vs_raw": round(raw_s / sharded_s, 3), "speedup_sharded_vs_single": round(single_s / sharded_s, 3),
            "sharded_stages_s_last": stages,
            "max_abs_diff_sharded_vs_single": diff,
        })
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
