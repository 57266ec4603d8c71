"""scikit-learn's bundled 8×8 digits (1,797 images, no download) for fast tests.

With ``image_size=28`` the images take the seed CNN's input shape: each pixel is repeated
3×3 (8×8 → 24×24) and the result is centred with a 2-pixel zero border, which roughly
matches MNIST's framing (a digit box inside a 28×28 canvas).
"""
from __future__ import annotations

import numpy as np

# sklearn's digits are 4-bit intensities.
_MAX_INTENSITY = 16.0


def to_28x28(images_8x8: np.ndarray, mode: str = "upscale") -> np.ndarray:
    """Turn ``[N, 8, 8]`` or ``[N, 8, 8, 1]`` images into ``[N, 28, 28, 1]``.

    ``mode="upscale"``: nearest-neighbour ×3 then a 2-pixel border; ``mode="pad"``: the 8×8
    image centred with a 10-pixel zero border.
    """
    x = np.asarray(images_8x8)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (8, 8):
        raise ValueError(f"expected images shaped [N, 8, 8] or [N, 8, 8, 1], got {x.shape}")
    if mode == "upscale":
        x = np.repeat(np.repeat(x, 3, axis=1), 3, axis=2)
        border = 2
    elif mode == "pad":
        border = 10
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'upscale' or 'pad'")
    x = np.pad(x, ((0, 0), (border, border), (border, border)))
    return x[..., np.newaxis]


def load_digits(image_size: int = 8, mode: str = "upscale") -> tuple[np.ndarray, np.ndarray]:
    """Load the digits as ``(images float32 [N, S, S, 1] in [0, 1], labels int64 [N])``.

    ``image_size`` is 8 (raw) or 28 (see :func:`to_28x28` for ``mode``).
    """
    if image_size not in (8, 28):
        raise ValueError(f"image_size must be 8 or 28, got {image_size}")
    from sklearn.datasets import load_digits as _sk_load_digits  # heavy: import on use

    bunch = _sk_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / np.float32(_MAX_INTENSITY))
    labels = np.asarray(bunch.target, dtype=np.int64)
    if image_size == 28:
        return to_28x28(images, mode).astype(np.float32), labels
    return images[..., np.newaxis], labels
