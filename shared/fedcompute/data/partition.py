"""Split a centralized dataset over simulated devices (pure numpy).

Every partitioner returns a list with one int64 index array per device; no example appears
twice (most cover every example exactly once; ``iid(..., examples_per_device=k)`` takes a
subset). Indices inside one device are in random order, so a device that batches its
examples sequentially does not see label-sorted batches.

``rng`` is a ``numpy.random.Generator`` or an int seed (``None`` = fresh entropy): the same
seed gives the same partition.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Rng = np.random.Generator | int | None


def as_rng(rng: Rng) -> np.random.Generator:
    """A Generator from a Generator, an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def _check_devices(num_devices: int) -> None:
    if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")


def _labels_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:  # the seed's label spec is [None, 1]
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must be shaped [N] or [N, 1], got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers (class ids), got dtype {y.dtype}")
    return y


def _shuffled(parts: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(p).astype(np.int64) for p in parts]


def iid(
    num_examples: int,
    num_devices: int,
    rng: Rng = None,
    *,
    examples_per_device: int | None = None,
) -> list[np.ndarray]:
    """Uniformly random split: shuffle, then cut into ``num_devices`` near-equal parts.

    With ``examples_per_device`` each device gets exactly that many examples (a random
    subset of the dataset; requires ``num_devices * examples_per_device <= num_examples``).
    """
    _check_devices(num_devices)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    gen = as_rng(rng)
    order = gen.permutation(num_examples).astype(np.int64)
    if examples_per_device is None:
        if num_examples < num_devices:
            raise ValueError(
                f"cannot give each of {num_devices} devices at least one of {num_examples} "
                "examples; use fewer devices")
        return list(np.array_split(order, num_devices))
    if examples_per_device < 1:
        raise ValueError(f"examples_per_device must be >= 1, got {examples_per_device}")
    needed = num_devices * examples_per_device
    if needed > num_examples:
        raise ValueError(
            f"{num_devices} devices × {examples_per_device} examples = {needed} examples "
            f"needed but the dataset has {num_examples}; lower one of them")
    return list(order[:needed].reshape(num_devices, examples_per_device))


def label_shards(
    labels: Sequence[int] | np.ndarray,
    num_devices: int,
    shards_per_device: int = 2,
    rng: Rng = None,
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Sort the examples by label (random order within a label), cut the sorted list into
    ``num_devices * shards_per_device`` contiguous shards of near-equal size, and deal each
    device ``shards_per_device`` random shards. When every class size is a multiple of the
    shard size, a device sees at most ``shards_per_device`` distinct labels.
    """
    _check_devices(num_devices)
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, got {shards_per_device}")
    y = _labels_array(labels)
    gen = as_rng(rng)
    num_shards = num_devices * shards_per_device
    if num_shards > y.size:
        raise ValueError(
            f"{num_devices} devices × {shards_per_device} shards = {num_shards} shards but "
            f"only {y.size} examples; every shard needs at least one example")
    order = gen.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = gen.permutation(num_shards).reshape(num_devices, shards_per_device)
    parts = [np.concatenate([shards[s] for s in row]) for row in assignment]
    return _shuffled(parts, gen)


def dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_devices: int,
    alpha: float,
    rng: Rng = None,
    *,
    min_size: int = 1,
    method: str = "per_class",
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split driven by a Dirichlet(alpha) distribution; covers every example once.

    Smaller ``alpha`` gives more skew (alpha → 0: few labels per device; alpha → ∞: the
    global label mix everywhere).

    ``method="per_class"`` (the common implementation of Yurochkin et al. 2019 / Wang et al.
    2020): each class is spread over the devices with Dirichlet(alpha) proportions; a device
    already above the mean size receives no more, and the whole draw is repeated (up to
    ``max_attempts``) until every device has at least ``min_size`` examples. Device sizes
    vary. With many devices and a small alpha most devices get nothing and no draw
    succeeds; use ``"per_device"`` then.

    ``method="per_device"`` (Hsu et al. 2019): every device gets a near-equal number of
    examples and draws its label mix q ~ Dirichlet(alpha · K · p), with p the global label
    distribution over K classes (so alpha is the per-class concentration for balanced data);
    its examples are sampled from the classes without replacement, renormalizing q over the
    classes not yet exhausted. Always succeeds when ``min_size <= N // num_devices``.
    """
    _check_devices(num_devices)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if method not in ("per_class", "per_device"):
        raise ValueError(f"unknown method {method!r}; use 'per_class' or 'per_device'")
    y = _labels_array(labels)
    if min_size * num_devices > y.size:
        raise ValueError(
            f"{num_devices} devices × min_size {min_size} = {min_size * num_devices} examples "
            f"needed but the dataset has {y.size}; lower min_size or num_devices")
    gen = as_rng(rng)
    if method == "per_device":
        return _dirichlet_per_device(y, num_devices, float(alpha), gen)
    classes = np.unique(y)
    mean_size = y.size / num_devices
    best_min = -1
    for _ in range(max(1, max_attempts)):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        sizes = np.zeros(num_devices, dtype=np.int64)
        for c in gen.permutation(classes):
            idx = gen.permutation(np.flatnonzero(y == c))
            p = _dirichlet_draw(gen, np.full(num_devices, float(alpha)))
            masked = p * (sizes < mean_size)
            # Every device full (only possible through rounding): use the raw proportions.
            p = masked if masked.sum() > 0 else p
            p = p / p.sum()
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for device, chunk in enumerate(np.split(idx, cuts)):
                if chunk.size:
                    chunks[device].append(chunk)
                    sizes[device] += chunk.size
        best_min = max(best_min, int(sizes.min()))
        if sizes.min() >= min_size:
            parts = [np.concatenate(c) if c else np.zeros(0, np.int64) for c in chunks]
            return _shuffled(parts, gen)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_attempts} attempts gave every one of "
        f"{num_devices} devices at least {min_size} examples (best smallest device: {best_min}); "
        "use method='per_device' (equal device sizes), raise alpha, or lower min_size or "
        "num_devices")


def _dirichlet_draw(gen: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    p = gen.dirichlet(concentration)
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        # Tiny concentrations can underflow every component: their limit is one-hot.
        p = np.zeros(concentration.size)
        p[gen.choice(concentration.size, p=concentration / concentration.sum())] = 1.0
    return p


def _dirichlet_per_device(y: np.ndarray, num_devices: int, alpha: float,
                          gen: np.random.Generator) -> list[np.ndarray]:
    classes, counts = np.unique(y, return_counts=True)
    pools = [gen.permutation(np.flatnonzero(y == c)) for c in classes]
    taken = np.zeros(classes.size, dtype=np.int64)
    concentration = alpha * classes.size * counts / counts.sum()
    sizes = gen.permutation([len(a) for a in np.array_split(np.arange(y.size), num_devices)])
    parts = []
    for size in sizes:
        q = _dirichlet_draw(gen, concentration)
        want = np.zeros(classes.size, dtype=np.int64)
        need = int(size)
        while need > 0:
            room = counts - taken - want
            q_avail = q * (room > 0)
            if q_avail.sum() <= 0:  # the device's classes are used up: fall back to what is left
                q_avail = (room > 0).astype(float)
            draw = gen.multinomial(need, q_avail / q_avail.sum())
            draw = np.minimum(draw, room)
            want += draw
            need -= int(draw.sum())
        parts.append(np.concatenate([pools[k][taken[k]:taken[k] + want[k]]
                                     for k in range(classes.size)]))
        taken += want
    return _shuffled(parts, gen)


def label_histogram(
    labels: Sequence[int] | np.ndarray,
    partitions: Sequence[np.ndarray],
    num_classes: int | None = None,
) -> np.ndarray:
    """Counts ``[num_devices, num_classes]`` of each label on each device."""
    y = _labels_array(labels)
    k = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    return np.stack([np.bincount(y[p], minlength=k)[:k] for p in partitions]) if partitions \
        else np.zeros((0, k), dtype=np.int64)
