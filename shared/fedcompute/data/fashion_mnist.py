"""Fashion-MNIST from the IDX ``.gz`` files of the Debian package ``dataset-fashion-mnist``.

The images have the shape of the seed's EMNIST digits CNN input (28×28×1, 10 classes), so
the seed's model trains on them unchanged. Only numpy and the standard library are used.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from fedcompute.data.errors import DatasetFormatError, DatasetNotFoundError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def dataset_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory to read: ``data_dir``, else ``$FASHION_MNIST_DIR``, else the Debian path."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip-compressed if the name ends in ``.gz``).

    Returns a uint8 array shaped by the file's header. Raises DatasetFormatError on a wrong
    magic number or a truncated/oversized payload.
    """
    path = Path(path)
    opener: Callable[..., IO[bytes]] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]  # both open binary files
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on corrupt or truncated input
        raise DatasetFormatError(f"cannot read IDX file {path}: {err}",
                                 hint="re-install the dataset files") from err
    if len(raw) < 4:
        raise DatasetFormatError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DatasetFormatError(
            f"{path} has IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}",
            hint="is this the right file (images vs labels) and an unsigned-byte IDX file?",
        )
    rank = magic & 0xFF
    header_len = 4 + 4 * rank
    if len(raw) < header_len:
        raise DatasetFormatError(f"{path}: IDX header truncated")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise DatasetFormatError(
            f"{path}: header says {dims} = {expected} bytes of data but the file holds {payload}",
            hint="the file is truncated or corrupt; re-install the dataset",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Returns ``(images, labels)``: images float32 ``[N, 28, 28, 1]`` scaled to [0, 1], labels
    int64 ``[N]`` in 0..9. ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000).
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = dataset_dir(data_dir)
    image_file, label_file = (directory / name for name in _FILES[split])
    missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}",
            hint=("install them with `sudo apt-get install dataset-fashion-mnist` (or `make setup`), "
                  f"or set {ENV_VAR} to a directory holding the four *-ubyte.gz IDX files"),
        )
    images = read_idx(image_file, IMAGES_MAGIC)
    labels = read_idx(label_file, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetFormatError(
            f"unexpected IDX ranks: images {images.shape}, labels {labels.shape} "
            "(want [N, rows, cols] and [N])")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{image_file} holds {images.shape[0]} images but {label_file} holds "
            f"{labels.shape[0]} labels")
    x = (images.astype(np.float32) / np.float32(255.0))[..., np.newaxis]
    return x, labels.astype(np.int64)
