"""Devices holding a partition of a dataset (the fleet CLI and the demo share this)."""
from __future__ import annotations

import random

import numpy as np

from fedcompute.fleet.device import ArrayApp, SimulatedDevice

PARTITIONS = ("dirichlet", "shards", "iid")


def partition_indices(labels: np.ndarray, num_devices: int, partition: str, *, alpha: float = 0.5,
                      seed: int = 0) -> list[np.ndarray]:
    """Example indices per device: Dirichlet(α) label skew, 2 label shards each, or IID."""
    from fedcompute.data import partition as partitions

    rng = np.random.default_rng(seed)
    if partition == "iid":
        return partitions.iid(len(labels), num_devices, rng)
    if partition == "shards":
        return partitions.label_shards(labels, num_devices, 2, rng)
    if partition == "dirichlet":
        return partitions.dirichlet(labels, num_devices, alpha, rng, min_size=10, method="per_device")
    raise ValueError(f"unknown partition {partition!r}; use one of {', '.join(PARTITIONS)}")


def make_devices(images: np.ndarray, labels: np.ndarray, num_devices: int, partition: str, *, alpha: float = 0.5,
                 seed: int = 0, version_code: str = "341912000", runtime: str = "auto") -> list[SimulatedDevice]:
    """One simulated device per partition, each with its own seeded random source.

    ``runtime``: ``auto`` (the plan's TFLite model when ODP clients could run it, else
    TensorFlow), ``tflite`` or ``tensorflow`` (:mod:`fedcompute.fleet.runtimes`)."""
    parts = partition_indices(labels, num_devices, partition, alpha=alpha, seed=seed)
    return [SimulatedDevice(device_id=i, app=ArrayApp(images[idx], labels[idx].reshape(-1, 1)),
                            version_code=version_code, rng=random.Random(seed * 100_003 + i), runtime=runtime)
            for i, idx in enumerate(parts)]
