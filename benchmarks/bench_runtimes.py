"""Device runtimes: examples/s of local training, TFLite vs TensorFlow, same run.

    .venv/bin/python benchmarks/bench_runtimes.py [--examples 400] [--repeats 3]

For the dense digits model (passes the flex-ops check) and the seed's EMNIST CNN (select TF
ops), builds the client plan in-process the way the task builder does, then times one local
epoch (FED_AVG, client SGD, batch 10, the accuracy metric's statistics) over the same
serialized examples with :class:`TfliteRuntime` and :class:`TensorflowRuntime`, alternating
the runtimes. The first call of each (interpreter / trace set-up) is timed separately; the
table reports the median of ``--repeats`` warm epochs and the TFLite / TensorFlow ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="examples per local epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()

    from fedcompute.data.digits import load_digits
    from fedcompute.data.examples import ExampleSpec, encode_examples
    from fedcompute.fleet.runtimes import TensorflowRuntime, TfliteRuntime
    from fedcompute.models import dense_digits, emnist_cnn
    from fedcompute.models.functional import save_functional_model
    from fedcompute.taskbuilder.local_plan import build_local_plan

    tmp = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    dense_digits.save(str(tmp / "dense"))
    save_functional_model(lambda: emnist_cnn.create_original_fedavg_cnn_model(only_digits=True, seed=1),
                          emnist_cnn.input_spec_type1(), emnist_cnn.loss(), str(tmp / "cnn"))
    models = {"dense digits (1,210 params)": (tmp / "dense", 8, True),
              "seed EMNIST CNN (1,663,370 params)": (tmp / "cnn", 28, False)}
    rows = []
    for label, (model_dir, size, enforce) in models.items():
        plans, weights = build_local_plan(model_dir, tmp / f"plan-{size}", kinds=("TRAINING",),
                                          batch_size=args.batch_size, enforce_flex_ops=enforce)
        plan = plans["TRAINING"]
        images, labels = load_digits(image_size=size)
        idx = [i % len(labels) for i in range(args.examples)]
        examples = encode_examples(ExampleSpec.from_dict(plan.plan.example_spec), images[idx], labels[idx])
        runtimes = {"tflite": TfliteRuntime(), "tensorflow": TensorflowRuntime()}
        def epoch(runtime, plan=plan, weights=weights, examples=examples) -> None:
            runtime.train(plan, weights, examples)

        first = {name: _time(lambda r=r: epoch(r)) for name, r in runtimes.items()}
        warm: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.repeats):
            for name, runtime in runtimes.items():
                warm[name].append(_time(lambda r=runtime: epoch(r)))
        rates = {name: args.examples / statistics.median(times) for name, times in warm.items()}
        rows.append((label, rates["tflite"], rates["tensorflow"], rates["tflite"] / rates["tensorflow"],
                     first["tflite"], first["tensorflow"]))
        print(f"{label}: tflite {rates['tflite']:.0f} ex/s, tensorflow {rates['tensorflow']:.0f} ex/s", flush=True)

    print(f"\n{args.examples} examples per epoch, batch {args.batch_size}, median of {args.repeats} warm epochs\n")
    print("| model | TFLite examples/s | TensorFlow examples/s | TFLite / TF | first epoch TFLite / TF (s) |")
    print("|---|---|---|---|---|")
    for label, tfl, tf_rate, ratio, first_tfl, first_tf in rows:
        print(f"| {label} | {tfl:,.0f} | {tf_rate:,.0f} | {ratio:.2f}x | {first_tfl:.2f} / {first_tf:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
