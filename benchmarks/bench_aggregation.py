"""Benchmark of the streaming DP aggregation core (fedcompute.learning.accumulator, dp_mechanisms, server_round).

Figures printed:
1. throughput: clip + sum of N updates of the seed's EMNIST CNN (1,663,370 float32
   parameters) through ``DpAggregator.add``, vs a plain numpy clip + float32 sum of the
   same updates in the same run (goal: >= 0.5x). The updates come from a pool of
   ``--pool`` distinct in-memory updates (more than the CPU caches) cycled to N.
2. the one-off cost per round of ``finish`` with noise (GaussianSumQuery draw, TF loaded).
3. codec: encode (gzip) and decode of one update (what the aggregator pays per upload).
4. memory: peak RSS of a child process aggregating N=100 vs N=1000 updates generated on
   the fly (goal: < 10 % growth).

Run: .venv/bin/python benchmarks/bench_aggregation.py [--n 1000] [--pool 16] [--skip-noise]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The seed's "original FedAvg CNN" for EMNIST (10 classes): 1,663,370 trainable parameters.
CNN_SPEC = [
    ("conv2d/kernel", (5, 5, 1, 32), "float32"),
    ("conv2d/bias", (32,), "float32"),
    ("conv2d_1/kernel", (5, 5, 32, 64), "float32"),
    ("conv2d_1/bias", (64,), "float32"),
    ("dense/kernel", (3136, 512), "float32"),
    ("dense/bias", (512,), "float32"),
    ("dense_1/kernel", (512, 10), "float32"),
    ("dense_1/bias", (10,), "float32"),
]
CLIP = 0.1


def _make_update(rng: np.random.Generator, scale: float):
    from fedcompute.learning.tensor_codec import ClientUpdate

    return ClientUpdate.from_arrays(
        [(n, (rng.standard_normal(s, dtype=np.float32) * np.float32(scale))) for n, s, _ in CNN_SPEC], 100
    )


def _scales(n: int, rng: np.random.Generator) -> np.ndarray:
    # update norms spread around the clip (norm of N(0, s^2) in 1.66M dims = s * 1290): ~half clipped
    return rng.uniform(0.5, 1.5, n) * CLIP / 1290.0


def numpy_baseline(pool, n: int) -> tuple[float, list[np.ndarray]]:
    """Plain numpy: global L2 norm (float32 dots), scale, float32 running sum."""
    acc = [np.zeros(s, np.float32) for _, s, _ in CNN_SPEC]
    start = time.perf_counter()
    for i in range(n):
        delta = pool[i % len(pool)].delta
        norm = float(np.sqrt(sum(np.vdot(t, t) for t in delta)))
        scale = np.float32(min(1.0, CLIP / norm))
        for a, t in zip(acc, delta):
            a += t * scale
    return time.perf_counter() - start, acc


def aggregator_run(pool, n: int):
    from fedcompute.dp import DpMechanism, DpParams
    from fedcompute.learning import accumulator, dp_mechanisms

    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=CLIP, noise_multiplier=1.0))
    state = dp.initial_state()
    start = time.perf_counter()
    acc = dp.start(CNN_SPEC, state)
    for i in range(n):
        acc = dp.add(acc, pool[i % len(pool)])
    sums = accumulator.clipped_sum(acc)
    return time.perf_counter() - start, sums, acc


def bench_throughput(n: int, pool_size: int) -> dict:
    rng = np.random.default_rng(0)
    pool = [_make_update(rng, s) for s in _scales(pool_size, rng)]
    aggregator_run(pool, min(n, 8))  # warm-up (BLAS, page faults)
    numpy_baseline(pool, min(n, 8))
    t_np, ref = numpy_baseline(pool, n)
    t_ag, sums, acc = aggregator_run(pool, n)
    t_np2, _ = numpy_baseline(pool, n)  # again, to average out drift on a shared machine
    t_np = (t_np + t_np2) / 2
    max_rel = max(float(np.max(np.abs(s - r))) / max(float(np.max(np.abs(r))), 1e-30) for s, r in zip(sums, ref))
    return {
        "n": n,
        "pool": pool_size,
        "clipped": acc.clipped,
        "aggregator_updates_per_s": n / t_ag,
        "numpy_updates_per_s": n / t_np,
        "ratio": t_np / t_ag,
        "max_rel_diff_vs_numpy": max_rel,
    }


def bench_noise() -> dict:
    from fedcompute.learning import dp_core

    t0 = time.perf_counter()
    import tensorflow_privacy  # noqa: F401

    t_import = time.perf_counter() - t0
    sums = [np.zeros(s, np.float64) for _, s, _ in CNN_SPEC]
    dp_core.gaussian_sum_query_noise(sums, clip_norm=CLIP, stddev=CLIP, seed=1)  # warm-up
    t0 = time.perf_counter()
    reps = 5
    for seed in range(reps):
        dp_core.gaussian_sum_query_noise(sums, clip_norm=CLIP, stddev=CLIP, seed=seed)
    return {"tf_privacy_import_s": t_import, "noise_draw_ms": (time.perf_counter() - t0) / reps * 1e3}


def bench_codec() -> dict:
    from fedcompute.learning.tensor_codec import decode_client_update, encode_client_update

    rng = np.random.default_rng(1)
    delta = [(n, rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3)) for n, s, _ in CNN_SPEC]
    out = {}
    for level in (1, 6):
        t0 = time.perf_counter()
        blob = encode_client_update(delta, 10, compresslevel=level)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(3):
            decode_client_update(blob, expected_spec=CNN_SPEC)
        out[f"gzip{level}"] = {"encode_ms": t_enc * 1e3, "decode_ms": (time.perf_counter() - t0) / 3 * 1e3,
                               "bytes": len(blob)}
    plain = encode_client_update(delta, 10, compress=False)
    t0 = time.perf_counter()
    for _ in range(3):
        decode_client_update(plain, expected_spec=CNN_SPEC)
    out["plain"] = {"decode_ms": (time.perf_counter() - t0) / 3 * 1e3, "bytes": len(plain)}
    return out


def rss_child(n: int) -> None:
    """Aggregate ``n`` updates generated on the fly; print peak RSS (KiB) as JSON."""
    from fedcompute.dp import DpMechanism, DpParams
    from fedcompute.learning import accumulator, dp_core, dp_mechanisms

    rng = np.random.default_rng(2)
    base = _make_update(rng, 1e-4)
    scales = _scales(n, rng)

    def updates():
        from fedcompute.learning.tensor_codec import ClientUpdate

        for s in scales:  # a fresh model-sized update each time, as if read from storage
            yield ClientUpdate.from_arrays([(nm, a * np.float32(s * 1e4)) for nm, a in zip(base.names, base.delta)], 10)

    dp = dp_mechanisms.build_dp_aggregator(DpParams(DpMechanism.FIXED_GAUSSIAN, clip_norm=CLIP, noise_multiplier=0.0))
    acc = accumulator.accumulate(dp.start(CNN_SPEC, dp.initial_state()), updates())
    mean, _, metrics = dp.finish(acc, dp.initial_state(), report_goal=n, seed=None)
    print(json.dumps({"n": n, "peak_rss_kib": _peak_rss_kib(), "accepted": metrics[dp_core.METRIC_ACCEPTED]}))


def _peak_rss_kib() -> int:
    """This process's peak RSS. Linux's VmHWM is per address space; ru_maxrss is not reset by
    exec, so it would report the (TF-loaded) parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_rss() -> dict:
    out: dict[Any, Any] = {}
    for n in (100, 1000):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True, check=True)
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["growth"] = out[1000]["peak_rss_kib"] / out[100]["peak_rss_kib"] - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="updates per throughput run")
    parser.add_argument("--pool", type=int, default=16, help="distinct in-memory updates cycled to N")
    parser.add_argument("--skip-noise", action="store_true", help="skip the TF noise timing (saves ~10 s)")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return

    params = sum(int(np.prod(s)) for _, s, _ in CNN_SPEC)
    print(f"model: {params:,} float32 parameters ({params * 4 / 1e6:.1f} MB per update), clip {CLIP}")
    tp = bench_throughput(args.n, args.pool)
    print(f"throughput (N={tp['n']}, pool={tp['pool']}, clipped {tp['clipped']}):")
    print(f"  aggregator  {tp['aggregator_updates_per_s']:8.0f} updates/s")
    print(f"  numpy       {tp['numpy_updates_per_s']:8.0f} updates/s (plain clip + float32 sum)")
    print(f"  ratio       {tp['ratio']:8.2f}x  (goal >= 0.5x)   max rel diff vs numpy sum {tp['max_rel_diff_vs_numpy']:.1e}")
    if not args.skip_noise:
        nz = bench_noise()
        print(f"noise: tensorflow_privacy import {nz['tf_privacy_import_s']:.1f} s (once per process), "
              f"GaussianSumQuery noise on the sum {nz['noise_draw_ms']:.0f} ms per round")
    codec = bench_codec()
    for key, v in codec.items():
        enc = f"encode {v['encode_ms']:6.0f} ms, " if "encode_ms" in v else ""
        print(f"codec {key:6s}: {enc}decode {v['decode_ms']:6.1f} ms, {v['bytes'] / 1e6:.2f} MB")
    rss = bench_rss()
    print(f"peak RSS: N=100 {rss[100]['peak_rss_kib'] / 1024:.0f} MiB, N=1000 {rss[1000]['peak_rss_kib'] / 1024:.0f} MiB, "
          f"growth {rss['growth'] * 100:+.1f} %  (goal < 10 %)")
    print(f"rerun: cd {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))} && "
          f".venv/bin/python benchmarks/bench_aggregation.py --n {args.n} --pool {args.pool}")


if __name__ == "__main__":
    main()
