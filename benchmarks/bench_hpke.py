"""HPKE cost per device update of the seed's CNN (issue 13): seal on the device, open at ingestion.

    .venv/bin/python benchmarks/bench_hpke.py [--repeats 20]

Builds one update of ``create_original_fedavg_cnn_model`` (only_digits=False: 1.69 M
float32 weights, random deltas), encodes it as the device does (ClientUpdate, gzip level 1),
then times, median of ``--repeats``: HPKE seal of the gzip'd update to the stack's key
(X25519 / HKDF-SHA256 / ChaCha20-Poly1305, cryptography's hpke module) plus the JSON
envelope; and ingestion's open (envelope parse + HPKE open) followed by the plaintext
decode it always does, against the decode alone. Prints sizes, medians and the overhead.
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> int:
    import numpy as np

    from fedcompute.crypto.hpke import UploadKeyRing, open_upload, seal_update
    from fedcompute.learning.tensor_codec import decode_client_update, encode_client_update
    from fedcompute.models.emnist_cnn import create_original_fedavg_cnn_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    model = create_original_fedavg_cnn_model(only_digits=False, seed=0)
    rng = np.random.default_rng(0)
    named = [(w.name, (0.01 * rng.standard_normal(w.shape)).astype(np.float32)) for w in model.trainable_weights]
    spec = [(n, tuple(a.shape), "float32") for n, a in named]
    params = sum(a.size for _, a in named)
    update = encode_client_update(named, 100, compress=False)
    body = gzip.compress(update, compresslevel=1, mtime=0)  # what DeviceHttpClient.upload seals
    ring = UploadKeyRing.generate()
    envelope = seal_update(body, ring.current, assignment_id="a-1")
    stored = gzip.compress(envelope, compresslevel=1, mtime=0)
    cap = 64 << 20

    seal_ms = _median_ms(lambda: seal_update(body, ring.current, assignment_id="a-1"), args.repeats)
    open_ms = _median_ms(lambda: open_upload(stored, assignment_id="a-1", ring=ring, required=True, max_bytes=cap),
                         args.repeats)
    decode_ms = _median_ms(lambda: decode_client_update(body, expected_spec=spec), args.repeats)
    print(f"CNN update: {params:,} float32 weights; ClientUpdate {len(update) / 1e6:.2f} MB, "
          f"gzip'd {len(body) / 1e6:.2f} MB, sealed envelope {len(envelope) / 1e6:.2f} MB, "
          f"stored (gzip'd envelope) {len(stored) / 1e6:.2f} MB")
    print(f"device seal (HPKE + envelope):          median {seal_ms:7.1f} ms")
    print(f"ingestion open (gunzip + envelope + HPKE): median {open_ms:7.1f} ms")
    print(f"ingestion decode of the plaintext update:  median {decode_ms:7.1f} ms "
          f"(open adds {open_ms / decode_ms:.2f}x the decode)")
    print(f"stored bytes vs a plaintext upload: {len(stored) / len(body):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
