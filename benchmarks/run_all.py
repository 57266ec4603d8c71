"""``make bench``: the standard benchmark scenarios, short enough for a shared machine.

Each scenario prints its JSON / figures; BENCHMARKS.md quotes them with these commands:

    .venv/bin/python -m benchmarks.bench_load --checkins 2000 --goal 1000
    .venv/bin/python benchmarks/bench_aggregation.py --n 200 --pool 8 --skip-noise
    .venv/bin/python benchmarks/bench_storage_ops.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = [
    [sys.executable, "-m", "benchmarks.bench_load", "--checkins", "2000", "--goal", "1000"],
    [sys.executable, str(ROOT / "benchmarks" / "bench_aggregation.py"), "--n", "200", "--pool", "8", "--skip-noise"],
    [sys.executable, str(ROOT / "benchmarks" / "bench_storage_ops.py")],
]


def main() -> int:
    failed = 0
    for command in SCENARIOS:
        print(f"$ {' '.join(command[1:])}", flush=True)
        failed += subprocess.run(command, cwd=ROOT).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
