"""Ingestion's per-upload validation of a seed-CNN update: header-only check vs full decode.

    .venv/bin/python benchmarks/bench_ingestion_validation.py [--repeats 20]

One update of the seed CNN's shapes (1,663,370 float32 weights, 6.65 MB ClientUpdate, raw as
devices upload by default), HPKE-sealed into ODP's JSON envelope. Medians of ``--repeats``:

* open: envelope parse + HPKE open (unavoidable: the AEAD authenticates the whole payload,
  so nothing can be checked before all of it is decrypted);
* full decode (``upload_contract.decode_upload``: what ingestion did, and what the
  aggregator still does) vs header-only check (``upload_contract.check_upload``: what
  ingestion does now), on the plaintext;
* the bytes each allocates at its peak (tracemalloc), i.e. the memory per upload in flight.
"""
from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_aggregation import CNN_SPEC  # noqa: E402
from bench_hpke import _median_ms  # noqa: E402


def _peak_mb(fn: Any) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


def main() -> int:
    from fedcompute.crypto.hpke import UploadKeyRing, open_upload, seal_update
    from fedcompute.learning import upload_contract
    from fedcompute.learning.tensor_codec import encode_client_update
    from fedcompute.tasks.records import TaskKind, TaskRecord, TaskStatus
    from fedcompute.tensor_spec import TensorSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    spec = [(f"trainable/{i}", shape, dtype) for i, (_, shape, dtype) in enumerate(CNN_SPEC)]
    rng = np.random.default_rng(0)
    stats = {name: np.full(shape, 1.0) for name, shape, _ in upload_contract.metric_statistics_spec(("loss",))}
    update = encode_client_update([(n, rng.standard_normal(s, dtype=np.float32) * np.float32(0.01))
                                   for n, s, _ in spec], 100, stats, compress=False)
    task = TaskRecord(population="p", task_id=1, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=1,
                      over_selection_rate=0.0, total_rounds=1, metrics=("loss",),
                      update_spec=tuple(TensorSpec(n, tuple(s), d) for n, s, d in spec))
    ring = UploadKeyRing.generate()
    envelope = seal_update(update, ring.current, assignment_id="a-1")

    def open_() -> bytes:
        return open_upload(envelope, assignment_id="a-1", ring=ring, required=True, max_bytes=64 << 20)

    def full() -> None:
        upload_contract.decode_upload(update, task)

    def header() -> None:
        upload_contract.check_upload(update, task)

    assert open_() == update
    open_ms, full_ms, header_ms = (_median_ms(fn, args.repeats) for fn in (open_, full, header))
    full_mb, header_mb = _peak_mb(full), _peak_mb(header)
    print(f"CNN update: ClientUpdate {len(update) / 1e6:.2f} MB, sealed envelope {len(envelope) / 1e6:.2f} MB")
    print(f"open (envelope + HPKE):            median {open_ms:8.2f} ms")
    print(f"full decode (before):              median {full_ms:8.2f} ms, peak {full_mb:6.2f} MB allocated")
    print(f"header-only check (now):           median {header_ms:8.2f} ms, peak {header_mb:6.2f} MB allocated")
    print(f"ingestion per upload, open + check: before {open_ms + full_ms:.1f} ms, now {open_ms + header_ms:.1f} ms "
          f"({(open_ms + full_ms) / (open_ms + header_ms):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
