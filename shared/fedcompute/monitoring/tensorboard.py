"""A run's metrics as TensorBoard event files: one scalar series per metric, step = round.

Writes the TFRecord framing itself (length, masked CRC32C, payload, masked CRC32C) with
TensorBoard's ``Event`` protos, so exporting does not import TensorFlow. Rounds where a
metric is null (not a finite number, e.g. ε without noise) are left out of its series.
"""
from __future__ import annotations

import math
import socket
import struct
import time
from pathlib import Path

from fedcompute.monitoring.metrics import RunMetrics

_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked_crc(header)) + payload + struct.pack("<I", _masked_crc(payload))


def write_tensorboard(run: RunMetrics, log_dir: Path, wall_time: float | None = None) -> Path:
    """Write ``run`` to a new event file under ``log_dir/<population>/<task_id>``; returns the file."""
    from tensorboard.compat.proto import event_pb2, summary_pb2  # type: ignore[import-untyped]

    now = time.time() if wall_time is None else wall_time
    run_dir = log_dir / run.population / str(run.task_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.fedcompute"
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2")]
    for index, round_number in enumerate(run.rounds):
        values = [summary_pb2.Summary.Value(tag=name, simple_value=series[index])
                  for name, series in run.series.items() if math.isfinite(series[index])]
        if values:
            events.append(event_pb2.Event(wall_time=now, step=round_number, summary=summary_pb2.Summary(value=values)))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(_record(e.SerializeToString()) for e in events))
    tmp.replace(path)
    return path
