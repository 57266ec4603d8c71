"""``fedcompute demo``: the main job (what ``make demo`` runs)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="local stack + task build + simulated fleet + metrics plot",
                                   description="Run the whole seed workflow locally on Fashion-MNIST.")
    parser.add_argument("--rounds", type=int, default=None, help="training rounds (ROUNDS=; 12, private 25)")
    parser.add_argument("--devices", type=int, default=None, help="simulated devices (DEVICES=; 200, private 10000)")
    parser.add_argument("--report-goal", type=int, default=None,
                        help="devices per round (REPORT_GOAL=; 50, private 1000)")
    parser.add_argument("--noise", type=float, default=None, help="DP noise multiplier (NOISE=; 0, private 1.0)")
    parser.add_argument("--dp", default="fixed", choices=("fixed", "adaptive", "tree", "adaptive_tree", "none"),
                        help="DP aggregator (DP=)")
    parser.add_argument("--clip-norm", type=float, default=None, help="DP clip norm (CLIP=; 10, private 1.0)")
    parser.add_argument("--client-lr", type=float, default=None, help="client SGD learning rate (0.1, private 0.3)")
    parser.add_argument("--epochs", type=int, default=None, help="local epochs per device (2, private 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="device batch size (10, private 6)")
    parser.add_argument("--server-lr", type=float, default=None,
                        help="server learning rate (SGD 1.0; private: ADAM 0.05)")
    parser.add_argument("--partition", choices=("dirichlet", "shards", "iid"), default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skew)")
    parser.add_argument("--workers", type=int, default=2, help="devices training at once")
    parser.add_argument("--eval", action="store_true", help="TRAINING_AND_EVAL: also run evaluation rounds (EVAL=1)")
    parser.add_argument("--runtime", choices=("auto", "tflite", "tensorflow"), default="auto",
                        help="device runtime (RUNTIME=): auto picks TFLite when ODP clients could run the plan")
    parser.add_argument("--seed", type=int, default=0)
    private = parser.add_argument_group(
        "private demo (make demo PRIVATE=1)",
        "10,000 devices x 6 Fashion-MNIST examples, 1,000 per round, FIXED_GAUSSIAN DP, a small model; "
        "--devices/--report-goal/--rounds/--noise/--clip-norm/--client-lr/--epochs/--batch-size/--server-lr "
        "apply when given")
    private.add_argument("--private", action="store_true", help="run the private demo (PRIVATE=1)")
    private.add_argument("--baseline", choices=("reference", "stack", "none"), default="reference",
                         help="the non-private run beside the private one (BASELINE=): reference = the same task "
                         "without noise run in-process (default), stack = through the stack like the private run "
                         "(doubles the time), none = skipped")
    private.add_argument("--no-baseline", dest="baseline", action="store_const", const="none",
                         help="same as --baseline none (BASELINE=0)")
    private.add_argument("--tradeoff", metavar="NOISES", default="",
                         help="comma-separated noise multipliers: train each, draw final epsilon vs accuracy "
                              "(make demo-tradeoff; e.g. 0,0.5,1.0,1.5)")
    private.add_argument("--processes", type=int, default=2, help="fleet worker processes (PROCESSES=)")
    private.add_argument("--threads", type=int, default=6, help="device sessions at once per worker process")
    private.add_argument("--over-selection", dest="over_selection_rate", type=float, default=0.05,
                         help="over_selection_rate of the private task (0.05: simulated phones do not drop out)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--state-dir", type=Path, default=Path(".fedcompute"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.private or args.tradeoff:
        return run_private(args)
    from fedcompute.demo import DemoOptions, run_demo

    run_demo(DemoOptions(
        **_given(args), dp=args.dp, partition=args.partition,
        alpha=args.alpha, workers=args.workers, evaluation=args.eval, seed=args.seed, runtime=args.runtime, out_dir=args.out, state_dir=args.state_dir,
    ))
    return 0


_KNOBS = ("rounds", "devices", "report_goal", "noise", "clip_norm", "client_lr", "epochs", "batch_size", "server_lr")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs set on the command line (the others keep the options' defaults)."""
    return {k: getattr(args, k) for k in _KNOBS if getattr(args, k) is not None}


def run_private(args: argparse.Namespace) -> int:
    from fedcompute.private_demo import (
        PrivateDemoOptions,
        run_private_demo,
        run_tradeoff,
    )

    out = args.out if args.out != Path("out/demo") else Path("out/demo_private")
    options = PrivateDemoOptions(**_given(args), baseline=args.baseline, over_selection_rate=args.over_selection_rate,
                                 processes=args.processes, threads=args.threads, seed=args.seed, out_dir=out,
                                 state_dir=args.state_dir)
    if args.tradeoff:
        noises = tuple(float(n) for n in args.tradeoff.split(","))
        run_tradeoff(options, noises)
    else:
        run_private_demo(options)
    return 0
