"""Cost of the task builder's model check in its sandboxed child vs in-process (issue 13).

Runs the same job (op allow-list walk, load, sample-batch check, TFLite conversion of the
training and evaluation steps, initial weights) ``--repeats`` times each way on an example
model and prints medians: the in-process runs reuse one warm TensorFlow (what the builder
did before), each sandboxed run is a fresh child (TensorFlow import included, as in
production). The walk alone is timed too. Child CPU time comes from ``RUSAGE_CHILDREN``.

    .venv/bin/python benchmarks/bench_model_sandbox.py --model emnist_cnn_type1 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emnist_cnn_type1",
                        choices=["emnist_cnn_type1", "emnist_cnn_type2", "dict_binary_type2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-flex-ops", action="store_true", help="no TFLite conversion (model check only)")
    args = parser.parse_args(argv)
    # The sandbox logs the child's uid and network (and why it did not drop privileges).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedcompute.taskbuilder.sandbox").setLevel(logging.INFO)

    from fedcompute.models.example_models import EXAMPLE_MODELS, save_example_models
    from fedcompute.taskbuilder import op_allowlist, sandbox

    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        # As the task builder's build directory: traversable by the sandbox user, so that a
        # builder running as root measures the child that drops to it (else it keeps root).
        os.chmod(tmp, 0o711)
        work = Path(tmp)
        print(f"saving {args.model} ...", file=sys.stderr)
        model_dir = save_example_models(work / "models", names=[args.model], seed=0)[args.model]
        job = sandbox.ModelJob(model_dir=model_dir, label_name=EXAMPLE_MODELS[args.model].label_name,
                               flex_ops_check=not args.skip_flex_ops)

        walk = []
        for _ in range(max(args.repeats, 5)):
            started = time.perf_counter()
            op_allowlist.check_saved_model_file(model_dir)
            walk.append(time.perf_counter() - started)

        in_process, in_process_cpu = [], []
        sandbox.inspect_model(job, work / "warmup", in_process=True)  # TF import + first trace, not counted
        for i in range(args.repeats):
            before_self = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            sandbox.inspect_model(job, work / f"inproc{i}", in_process=True)
            in_process.append(time.perf_counter() - started)
            after_self = resource.getrusage(resource.RUSAGE_SELF)
            in_process_cpu.append((after_self.ru_utime - before_self.ru_utime)
                                  + (after_self.ru_stime - before_self.ru_stime))

        sandboxed, child_cpu = [], []
        for i in range(args.repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            sandbox.inspect_model(job, work / f"sandbox{i}")
            sandboxed.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            child_cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            print(f"  sandboxed run {i + 1}: {sandboxed[-1]:.2f} s", file=sys.stderr)

    med_in, med_sb = statistics.median(in_process), statistics.median(sandboxed)
    print(f"model {args.model}, flex-ops conversion {'off' if args.skip_flex_ops else 'on'}, "
          f"{args.repeats} runs each")
    print(f"op allow-list walk (parse saved_model.pb + walk): median {1000 * statistics.median(walk):.1f} ms")
    cpu_in, cpu_sb = statistics.median(in_process_cpu), statistics.median(child_cpu)
    print(f"in-process (warm TensorFlow):      median wall {med_in:.2f} s, CPU {cpu_in:.1f} s")
    print(f"sandboxed child (cold, per build): median wall {med_sb:.2f} s, CPU {cpu_sb:.1f} s")
    print(f"ratio sandboxed / in-process: wall {med_sb / med_in:.2f}x, CPU {cpu_sb / cpu_in:.2f}x; "
          f"CPU overhead {cpu_sb - cpu_in:+.1f} s per build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
