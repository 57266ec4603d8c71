"""What one storage round trip costs on the local stack: the emulators' CPU per call.

    .venv/bin/python benchmarks/bench_storage_ops.py [--calls 400] [--grow 20000]

Starts the local stack, then times, one call at a time from this process, the Firestore calls
the request paths are made of (a create, an atomic increment, a 2-document batch, a read of one
document, a batched read of three) and a small object read from fake-gcs-server, and reports
per call: wall time, this process's CPU (the client) and the emulator's CPU (its process
tree, read before and after). With ``--grow N`` the Firestore calls are timed again after N
more documents are written, to see whether a bigger database costs more per call. Then
``--calls`` creates at concurrency 8 give the emulator's throughput. Last, the wall time to read
10 objects of 8.8 MB (a round of sealed CNN updates) through the storage library and through
``GcsBlobStore.read``, one at a time and on 16 threads.

Counting round trips per request (``tests/unit/test_constant_time_paths.py``) and multiplying
by these figures tells what a function's storage costs on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import component, own_cpu_s, tree_cpu_s  # noqa: E402


def timed(call: Callable[[int], Any], calls: int, server_pid: int) -> dict[str, float]:
    """Per-call wall ms, client CPU ms and server CPU ms of ``calls`` sequential calls (after 20 warm-ups)."""
    for i in range(20):
        call(-1 - i)
    client, server, wall = own_cpu_s(), tree_cpu_s(server_pid), time.perf_counter()
    for i in range(calls):
        call(i)
    return {"wall_ms": round((time.perf_counter() - wall) * 1000 / calls, 2),
            "client_cpu_ms": round((own_cpu_s() - client) * 1000 / calls, 2),
            "emulator_cpu_ms": round((tree_cpu_s(server_pid) - server) * 1000 / calls, 2)}


def firestore_calls(db: Any, tag: str) -> dict[str, Callable[[int], Any]]:
    from google.cloud import firestore

    docs = db.collection(f"bench-{tag}")
    counter = db.collection(f"bench-{tag}-counters").document("c")
    three = [docs.document(f"read-{i}") for i in range(3)]
    for ref in three:
        ref.set({"status": "COLLECTING", "report_goal": 1000, "padding": "x" * 400})

    def batch(i: int) -> None:
        b = db.batch()
        b.create(docs.document(f"batch-{i}"), {"assignment_id": f"a-{i}", "time": time.time()})
        b.set(counter, {"filled": firestore.Increment(1)}, merge=True)
        b.commit()

    return {
        "create": lambda i: docs.document(f"create-{i}").create({"status": "ASSIGNED", "slot": i, "t": time.time()}),
        "increment": lambda i: counter.set({"issued": firestore.Increment(1)}, merge=True),
        "batch of 2 writes": batch,
        "read 1 document": lambda i: three[2].get(),
        "batched read of 3 documents": lambda i: list(db.get_all(three)),
    }


def big_reads(client: Any, blobs: Any, bucket: str, repeats: int = 5) -> dict[str, float]:
    """Wall ms to read 10 objects of 8.8 MB (a round of sealed CNN updates), one after another
    and on 16 threads (the aggregator's read-ahead), by the storage library and by
    ``GcsBlobStore.read``; medians of ``repeats``."""
    import statistics

    names = [f"big-{i}" for i in range(10)]
    for name in names:
        client.bucket(bucket).blob(name).upload_from_string(os.urandom(8_800_000))
    readers = {"Blob.download_as_bytes": lambda n: client.bucket(bucket).blob(n).download_as_bytes(raw_download=True),
               "GcsBlobStore.read": lambda n: blobs.read(bucket, n)}
    result = {}
    for label, read in readers.items():
        for threads in (1, 16):
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    assert sum(len(b) for b in pool.map(read, names)) == 88_000_000
                runs.append((time.perf_counter() - started) * 1000)
            result[f"{label}, {threads} thread{'s' if threads > 1 else ''}"] = round(statistics.median(runs), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--grow", type=int, default=20000, help="documents added before the second pass (0: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import requests
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.clients import make_clients
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack

    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    stack = LocalStack(work / "stack", task_builder_port=0)
    stack.start()
    report: dict[str, Any] = {"calls": args.calls}
    try:
        os.environ.update(stack.env())
        project = stack.project
        db = make_clients(Settings.from_env()).firestore
        fs_pid, gcs = int(component(stack, "firestore").pid), component(stack, "gcs")
        report["firestore"] = {name: timed(call, args.calls, fs_pid) for name, call in firestore_calls(db, "a").items()}
        if args.grow:
            for start in range(0, args.grow, 500):
                b = db.batch()
                for i in range(start, min(start + 500, args.grow)):
                    b.set(db.collection("bench-grow").document(f"g-{i}"), {"n": i, "t": time.time(), "s": "x" * 50})
                b.commit()
            report[f"firestore_after_{args.grow}_more_documents"] = {
                name: timed(call, args.calls, fs_pid) for name, call in firestore_calls(db, "b").items()}
        creates = db.collection("bench-concurrent")
        before, wall = tree_cpu_s(fs_pid), time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: creates.document(f"c-{i}").create({"n": i}), range(args.calls)))
        elapsed = time.perf_counter() - wall
        report["firestore_creates_at_concurrency_8"] = {
            "per_s": round(args.calls / elapsed, 1),
            "emulator_cpu_ms": round((tree_cpu_s(fs_pid) - before) * 1000 / args.calls, 2)}
        client = storage.Client(project=project, credentials=AnonymousCredentials())
        bucket = "bench-storage-ops"
        requests.post(f"{gcs.url}/storage/v1/b?project={project}", json={"name": bucket}, timeout=30)
        client.bucket(bucket).blob("small").upload_from_string(os.urandom(3000))
        session = requests.Session()
        gcs_pid = int(gcs.pid)
        blobs = GcsBlobStore(client)
        report["gcs_read_3_kb"] = {
            "storage client": timed(lambda i: client.bucket(bucket).blob("small").download_as_bytes(raw_download=True),
                                    args.calls, gcs_pid),
            "plain HTTP GET": timed(lambda i: session.get(f"{gcs.url}/storage/v1/b/{bucket}/o/small?alt=media",
                                                          timeout=30).content, args.calls, gcs_pid),
            "GcsBlobStore.read": timed(lambda i: blobs.read(bucket, "small"), args.calls, gcs_pid),
        }
        report["gcs_read_10_objects_of_8_8_mb"] = big_reads(client, blobs, bucket)
    finally:
        stack.stop()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
