#!/usr/bin/env python
"""Save the example models as TFF functional models (the seed's step 1).

Usage: python examples/models/save_example_models.py OUT_DIR [--seed N] [--only NAME ...]

Writes OUT_DIR/emnist_cnn_type1/, OUT_DIR/emnist_cnn_type2/, OUT_DIR/dict_binary_type2/ and
OUT_DIR/fashion_logreg_type1/ (the small model of `make demo PRIVATE=1`),
each a SavedModel to pass to `task_builder_client --saved_model=...`, and prints each
model's input type, label_name and tf.train.Example layout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    from fedcompute.models.example_models import EXAMPLE_MODEL_NAMES, EXAMPLE_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the SavedModels into")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights (default 0; -1 = random)")
    parser.add_argument("--only", nargs="+", choices=EXAMPLE_MODEL_NAMES, metavar="NAME",
                        help=f"save only these models ({', '.join(EXAMPLE_MODEL_NAMES)})")
    args = parser.parse_args(argv)

    from fedcompute.models.example_models import save_example_models
    from fedcompute.models.functional import kill_tff_worker_children

    try:
        start = time.perf_counter()
        import tensorflow_federated  # noqa: F401  (timed apart from saving)

        imported = time.perf_counter()
        paths = save_example_models(args.out_dir, names=args.only,
                                    seed=None if args.seed < 0 else args.seed)
        done = time.perf_counter()
        for name, path in paths.items():
            model = EXAMPLE_MODELS[name]
            label = f'label_name: "{model.label_name}"' if model.label_name else "label y"
            print(f"{name}: {path}\n  {model.description}; input type {model.input_type}, {label}"
                  f"\n  examples: {model.example_spec().to_json()}")
        print(f"imports {imported - start:.1f} s, saving {done - imported:.1f} s")
    finally:
        kill_tff_worker_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
