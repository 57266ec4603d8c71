"""``fedcompute demo``: the main job (what ``make demo`` runs)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="local stack + task build + simulated fleet + metrics plot",
                                   description="Run the whole seed workflow locally on Fashion-MNIST.")
    parser.add_argument("--rounds", type=int, default=12, help="training rounds (ROUNDS=)")
    parser.add_argument("--devices", type=int, default=200, help="simulated devices (DEVICES=)")
    parser.add_argument("--report-goal", type=int, default=50, help="devices per round (REPORT_GOAL=)")
    parser.add_argument("--noise", type=float, default=0.0, help="DP noise multiplier (NOISE=)")
    parser.add_argument("--dp", default="fixed", choices=("fixed", "adaptive", "tree", "adaptive_tree", "none"),
                        help="DP aggregator (DP=)")
    parser.add_argument("--clip-norm", type=float, default=10.0, help="DP clip norm (CLIP=)")
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per device")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--partition", choices=("dirichlet", "shards", "iid"), default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skew)")
    parser.add_argument("--workers", type=int, default=2, help="devices training at once")
    parser.add_argument("--eval", action="store_true", help="TRAINING_AND_EVAL: also run evaluation rounds (EVAL=1)")
    parser.add_argument("--runtime", choices=("auto", "tflite", "tensorflow"), default="auto",
                        help="device runtime (RUNTIME=): auto picks TFLite when ODP clients could run the plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--state-dir", type=Path, default=Path(".fedcompute"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcompute.demo import DemoOptions, run_demo

    run_demo(DemoOptions(
        rounds=args.rounds, devices=args.devices, report_goal=args.report_goal, noise=args.noise, dp=args.dp,
        clip_norm=args.clip_norm, client_lr=args.client_lr, epochs=args.epochs, batch_size=args.batch_size, server_lr=args.server_lr, partition=args.partition,
        alpha=args.alpha, workers=args.workers, evaluation=args.eval, seed=args.seed, runtime=args.runtime, out_dir=args.out, state_dir=args.state_dir,
    ))
    return 0
