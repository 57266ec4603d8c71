"""Strict JSON (non-finite numbers become null) and the TensorBoard event writer."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcompute import strict_json
from fedcompute.monitoring.metrics import build_run
from fedcompute.monitoring.tensorboard import write_tensorboard


def test_non_finite_numbers_become_null_at_any_depth() -> None:
    value = {"eps": math.inf, "rows": [{"loss": math.nan}, (1.5, -math.inf)], "n": np.float32(np.inf), "ok": 2}
    text = strict_json.dumps(value, sort_keys=True)
    assert strict_json.loads(text) == {"eps": None, "n": None, "ok": 2, "rows": [{"loss": None}, [1.5, None]]}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_strict_loads_rejects_what_python_json_writes(constant: str) -> None:
    assert json.loads(f'{{"x": {constant}}}')  # Python's own parser accepts it ...
    with pytest.raises(ValueError, match=constant):
        strict_json.loads(f'{{"x": {constant}}}')  # ... a strict parser does not


def _read_records(path: Path) -> list[bytes]:
    """TFRecord framing, CRCs checked (what TensorBoard's reader does; the e2e test uses TensorBoard itself)."""
    from fedcompute.monitoring.tensorboard import _masked_crc

    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == _masked_crc(header)
        payload = data[offset + 12:offset + 12 + length]
        assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == _masked_crc(payload)
        records.append(payload)
        offset += 16 + length
    return records


def test_tensorboard_export_writes_one_series_per_metric_by_round(tmp_path: Path) -> None:
    from tensorboard.compat.proto import event_pb2

    run = build_run("pop", 3, {
        1: {"server/client_work/train/loss": 2.5, "server/privacy/epsilon": 0.75},
        2: {"server/client_work/train/loss": 1.25, "server/privacy/epsilon": None},  # null: not finite
        3: {"server/client_work/train/loss": 0.5, "server/privacy/epsilon": 1.5},
    })
    path = write_tensorboard(run, tmp_path, wall_time=1_700_000_000.0)
    assert path.parent == tmp_path / "pop" / "3" and path.name.startswith("events.out.tfevents.1700000000.")
    events = [event_pb2.Event.FromString(r) for r in _read_records(path)]
    assert events[0].file_version == "brain.Event:2"
    series: dict[str, list[tuple[int, float]]] = {}
    for event in events[1:]:
        for value in event.summary.value:
            series.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert series == {"server/client_work/train/loss": [(1, 2.5), (2, 1.25), (3, 0.5)],
                      "server/privacy/epsilon": [(1, 0.75), (3, 1.5)]}
