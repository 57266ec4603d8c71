"""Devices holding a partition of a dataset (the fleet CLI and the demo share this)."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

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


DATASETS = ("fashion_mnist", "digits")


@dataclass(frozen=True)
class PopulationSpec:
    """A fleet's data, described by a few numbers so that any worker process can rebuild it.

    The dataset is read and partitioned once per process (deterministic in ``seed``);
    ``examples(device_id)`` is then that device's own slice. ``examples_per_device`` > 0
    gives every device exactly that many examples (IID only), e.g. 10,000 devices × 6.
    """

    num_devices: int
    dataset: str = "fashion_mnist"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    examples_per_device: int = 0
    version_code: str = "341912000"

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {self.partition!r}; use one of {', '.join(PARTITIONS)}")
        if self.examples_per_device and self.partition != "iid":
            raise ValueError("examples_per_device needs partition 'iid'")

    def examples(self, device_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Device ``device_id``'s images and labels (``[n, 1]``), from the per-process cache."""
        images, labels, parts = _partitioned(self)
        idx = parts[device_id]
        return images[idx], labels[idx].reshape(-1, 1)


@functools.lru_cache(maxsize=2)
def _partitioned(spec: PopulationSpec) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    if spec.dataset == "digits":
        from fedcompute.data.digits import load_digits

        images, labels = load_digits(image_size=28)
    else:
        from fedcompute.data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
    if spec.examples_per_device:
        from fedcompute.data import partition as partitions

        parts = partitions.iid(len(labels), spec.num_devices, np.random.default_rng(spec.seed),
                               examples_per_device=spec.examples_per_device)
    else:
        parts = partition_indices(labels, spec.num_devices, spec.partition, alpha=spec.alpha, seed=spec.seed)
    return images, labels, parts
