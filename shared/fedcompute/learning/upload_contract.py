"""The upload contract: what a device's update must look like for its task (light: no TensorFlow).

Result ingestion (a light function) validates every upload with :func:`make_upload_validator`
before accepting it, reading the header only (:func:`check_upload`); the aggregator decodes
the same bytes against the same specs (:func:`decode_upload`), so the contract lives here,
beside the codec, and neither service imports the other.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from fedcompute.learning import metric_stats
from fedcompute.learning.contribution_bounds import check_device_contribution
from fedcompute.learning.tensor_codec import ClientUpdate, decode_client_update, spec_nbytes
from fedcompute.learning.update_header import UpdateHeader, check_client_update_header
from fedcompute.tasks.records import TaskRecord
from fedcompute.tensor_spec import TensorSpec


def metric_statistics_spec(metrics: tuple[str, ...]) -> tuple[TensorSpec, ...]:
    """The flat ``metric/stat`` tensors a device upload carries for ``metrics`` (+ loss, count)."""
    names = list(dict.fromkeys((*metrics, "loss", "num_examples")))
    flat = metric_stats.flatten_stats({m: metric_stats.zero_stats(m) for m in names})
    return tuple(TensorSpec(name, tuple(array.shape), "float64") for name, array in sorted(flat.items()))


def update_spec(task: TaskRecord) -> tuple[TensorSpec, ...]:
    """The model-delta tensors a device upload carries for ``task`` (none for evaluation)."""
    return task.update_spec


def decode_upload(data: bytes, task: TaskRecord, *, max_bytes: int | None = None) -> ClientUpdate:
    """A device upload decoded against ``task``'s shapes and metrics, and checked against what
    one honest device can contribute (:mod:`fedcompute.learning.contribution_bounds`)."""
    update = decode_client_update(data, expected_spec=update_spec(task), max_bytes=max_bytes,
                                  expected_metric_spec=metric_statistics_spec(task.metrics))
    check_device_contribution(update.num_examples, update.metric_statistics, max_examples=task.max_device_examples)
    return update


def check_upload(data: bytes, task: TaskRecord, *, max_bytes: int | None = None) -> UpdateHeader:
    """What :func:`decode_upload` checks, without parsing the model delta's tensor data
    (:mod:`fedcompute.learning.update_header`): the aggregator decodes it anyway."""
    header = check_client_update_header(data, expected_spec=update_spec(task), max_bytes=max_bytes,
                                        expected_metric_spec=metric_statistics_spec(task.metrics))
    check_device_contribution(header.num_examples, header.metric_statistics, max_examples=task.max_device_examples)
    return header


def make_upload_validator(max_bytes: int | None = None) -> Callable[[bytes, TaskRecord], None]:
    """Ingestion's check: the upload is an update of the task's shapes and metrics (header
    only: names, dtypes, shapes, data lengths), and its example count and metric statistics
    are ones one honest device can produce."""

    def validate(data: bytes, task: TaskRecord) -> None:
        check_upload(data, task, max_bytes=max_bytes)

    return validate


# Device-set fields of a ClientUpdate besides its tensors (metadata map, counts, headers).
UPDATE_METADATA_ALLOWANCE = 16 * 1024
# Protobuf framing of one tensor besides its name and data: tags, dtype, shape varints, lengths.
TENSOR_FRAMING_BYTES = 32 + 10 * 8
# The HPKE JSON envelope besides the base64 payload: keys, key id, the sealed assignment id.
ENVELOPE_ALLOWANCE = 1024
HPKE_OVERHEAD_BYTES = 32 + 16  # encapsulated X25519 key + AEAD tag
# The server-wide ceiling (also the cap for an assignment that predates per-task caps).
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def max_upload_bytes(task: TaskRecord) -> int:
    """The most bytes an honest device can store for one update of ``task``.

    The ClientUpdate's raw tensor data (model delta + metric statistics) plus protobuf
    framing and a metadata allowance; gzip's worst case (stored blocks: 5 bytes per
    16 KiB + header); then the HPKE envelope (base64 of encapsulated key, ciphertext and
    tag, in JSON). Used to bound the upload session and checked again at ingestion, so a
    device cannot store more than its update through its upload URL.
    """
    tensors = [*update_spec(task), *metric_statistics_spec(task.metrics)]
    raw = spec_nbytes(tensors) + sum(len(spec.name.encode()) + TENSOR_FRAMING_BYTES for spec in tensors)
    raw += UPDATE_METADATA_ALLOWANCE
    gzipped = raw + 5 * math.ceil(raw / 16384) + 64
    sealed = 4 * math.ceil((gzipped + HPKE_OVERHEAD_BYTES) / 3) + ENVELOPE_ALLOWANCE
    return min(sealed, DEFAULT_MAX_UPLOAD_BYTES)
