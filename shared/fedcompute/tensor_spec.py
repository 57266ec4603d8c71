"""The one tensor-spec type: name, shape and dtype name of one tensor.

Used for a model's weights (plans' server phase and client plan, with ``trainable``), a task
record's update spec (Firestore), the codec's expected tensors, a TFLite step's inputs and
outputs, and the metric statistics a device uploads. Pure Python (no numpy, no TensorFlow):
every function, light or heavy, may import it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: ``name``, ``shape`` (``-1`` = any size) and numpy dtype name (``"float32"``).

    ``trainable`` only matters for a model's weights: a device update carries the trainable
    ones; non-trainable weights (e.g. BatchNorm statistics) stay in the checkpoint.
    A spec unpacks like the ``(name, shape, dtype)`` triples the codec also accepts.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool = True

    def __iter__(self) -> Iterator[Any]:
        return iter((self.name, self.shape, self.dtype))

    def to_dict(self, *, with_trainable: bool = False) -> dict[str, Any]:
        """JSON/Firestore map. Plans write ``trainable`` (``with_trainable``); a task record's
        update spec (trainable tensors only) does not."""
        data: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if with_trainable or not self.trainable:
            data["trainable"] = self.trainable
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_dict` (no ``trainable``: trainable)."""
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]),
                   bool(data.get("trainable", True)))
