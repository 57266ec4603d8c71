"""Benchmark of ``fedcompute model export`` on the seed's EMNIST CNN (1,663,370 parameters).

Saves the CNN as a SavedFunctionalModel once, sets trained-like weights (the initial ones
plus noise), then times, per format, building the Keras model and writing + reloading +
verifying the file (what the CLI does after downloading the plan and checkpoint), and
reports the file size and the largest prediction difference to the functional model on
100 random inputs (TFLite: float32 kernels of its own).

Run: .venv/bin/python benchmarks/bench_model_export.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from fedcompute.cli.model_cmd import TrainedModel, export_trained_model
    from fedcompute.learning.client_training import load_model
    from fedcompute.models.emnist_cnn import create_original_fedavg_cnn_model, input_spec_type1, loss
    from fedcompute.models.export import FORMATS
    from fedcompute.models.functional import save_functional_model

    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(work) / "cnn"
        save_functional_model(lambda: create_original_fedavg_cnn_model(only_digits=True, seed=0), input_spec_type1(),
                              loss(), str(model_dir))
        device_model = load_model(model_dir)
        rng = np.random.default_rng(0)
        weights = [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in device_model.initial_weights()]
        trained = TrainedModel("bench", 1, 1, model_dir, weights)
        probe = rng.random((100, 28, 28, 1)).astype(np.float32)
        reference = device_model.predict(weights, probe)
        print(f"model: {device_model.num_parameters:,} parameters; probe: 100 inputs")
        for fmt in FORMATS:
            times = []
            for i in range(args.repeat):
                started = time.perf_counter()
                result = export_trained_model(trained, fmt, Path(work) / f"{fmt}{i}", probe)
                times.append(time.perf_counter() - started)
            if fmt == "tflite":
                from fedcompute.models.export import tflite_predict

                got = tflite_predict(result.path, probe)
            else:
                import tensorflow as tf

                got = tf.keras.models.load_model(result.path, compile=False).predict(probe, verbose=0)
            difference = float(np.max(np.abs(got - reference)))
            same_class = float(np.mean(np.argmax(got, 1) == np.argmax(reference, 1)))
            print(f"{fmt:<11} export+verify median {statistics.median(times):6.2f} s (of {args.repeat}); "
                  f"{_size(result.path) / 2**20:6.1f} MiB; max |pred - functional| {difference:.2e}; "
                  f"same argmax {same_class:.0%}")


if __name__ == "__main__":
    main()
