"""Header-only upload validation (ingestion) agrees with the full decode (aggregator).

Whatever the header check accepts decodes fully to the same names, example count and
metric statistics; whatever the full decode refuses, the header check refuses too. Checked
on hand-made hostile uploads and on thousands of random mutations of a valid one.
"""
from __future__ import annotations

import numpy as np
import pytest

from fedcompute.errors import InvalidRequestError, PayloadTooLargeError
from fedcompute.learning import upload_contract
from fedcompute.learning.tensor_codec import decode_client_update, encode_client_update
from fedcompute.learning.update_header import check_client_update_header
from fedcompute.proto import tensors_pb2

SPEC = [("w", (3, 4), "float32"), ("b", (4,), "float32")]
METRIC_SPEC = upload_contract.metric_statistics_spec(("loss",))


def _stats() -> dict[str, np.ndarray]:
    return {name: np.full(shape, 2.0) for name, shape, _ in METRIC_SPEC}


def _valid(**kwargs) -> bytes:
    delta = [("w", np.arange(12, dtype=np.float32).reshape(3, 4)), ("b", np.ones(4, np.float32))]
    return encode_client_update(delta, 7, _stats(), compress=False, **kwargs)


def _both(data: bytes):
    """(header outcome, full outcome): the parsed fields, or the error class."""
    results = []
    for check in (check_client_update_header, decode_client_update):
        try:
            out = check(data, expected_spec=SPEC, expected_metric_spec=METRIC_SPEC)
            results.append((out.names, out.num_examples, {k: v.tolist() for k, v in out.metric_statistics.items()},
                            dict(out.metadata)))
        except InvalidRequestError as error:
            results.append(type(error))
    return tuple(results)


def test_a_valid_upload_passes_with_the_fields_the_full_decode_reads():
    header, full = _both(_valid(metadata={"non_finite": "1"}))
    assert header == full and header[0] == ("w", "b") and header[1] == 7 and header[3] == {"non_finite": "1"}


def _message(data: bytes) -> tensors_pb2.ClientUpdate:
    return tensors_pb2.ClientUpdate.FromString(data)


@pytest.mark.parametrize("case", ["short data", "wrong shape", "wrong dtype", "missing tensor", "renamed",
                                  "no delta", "bad version", "zero examples", "metric shape"])
def test_hostile_uploads_are_refused_by_the_header_check_with_the_reason(case: str):
    msg = _message(_valid())
    tensor = msg.model_delta.tensors[0]
    if case == "short data":
        tensor.data = tensor.data[:-4]
    elif case == "wrong shape":
        del tensor.shape[:]
        tensor.shape.extend([4, 3])
    elif case == "wrong dtype":
        tensor.dtype = tensors_pb2.DTYPE_INT32
    elif case == "missing tensor":
        del msg.model_delta.tensors[1]
    elif case == "renamed":
        tensor.name = "v"
    elif case == "no delta":
        msg.ClearField("model_delta")
    elif case == "bad version":
        msg.format_version = 2
    elif case == "zero examples":
        msg.num_examples = 0
    elif case == "metric shape":
        msg.metric_statistics.tensors[0].shape.append(2)
    data = msg.SerializeToString()
    with pytest.raises(InvalidRequestError) as header_error:
        check_client_update_header(data, expected_spec=SPEC, expected_metric_spec=METRIC_SPEC)
    with pytest.raises(InvalidRequestError) as full_error:
        decode_client_update(data, expected_spec=SPEC, expected_metric_spec=METRIC_SPEC)
    assert str(header_error.value) == str(full_error.value)  # the same reason for the device's operator


def test_fields_protobuf_would_merge_are_refused_not_guessed():
    data = _valid()
    delta_field = _message(data).model_delta.SerializeToString()
    twice = data + b"\x12" + _varint(len(delta_field)) + delta_field  # model_delta again (field 2, LEN)
    with pytest.raises(InvalidRequestError, match="model_delta occurs more than once"):
        check_client_update_header(twice, expected_spec=SPEC, expected_metric_spec=METRIC_SPEC)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_oversized_and_json_uploads_are_refused_before_any_parsing():
    with pytest.raises(PayloadTooLargeError):
        check_client_update_header(_valid(), expected_spec=SPEC, max_bytes=10)
    with pytest.raises(InvalidRequestError, match="JSON"):
        check_client_update_header(b'{"keyId": 1}', expected_spec=SPEC)


def test_random_mutations_never_pass_the_header_check_when_the_full_decode_refuses():
    rng = np.random.default_rng(5)
    valid = _valid()
    gzipped = encode_client_update([("w", np.zeros((3, 4), np.float32)), ("b", np.zeros(4, np.float32))], 3,
                                   _stats())
    agreed_valid = 0
    for trial in range(3000):
        data = bytearray(valid if trial % 10 else gzipped)
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.integers(3)
            pos = int(rng.integers(len(data)))
            if kind == 0:
                data[pos] = int(rng.integers(256))
            elif kind == 1:
                del data[pos:pos + int(rng.integers(1, 8))]
            else:
                data[pos:pos] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 6)), dtype=np.uint8))
        header, full = _both(bytes(data))
        if not isinstance(header, type):  # accepted by the header check: the full decode agrees on everything
            assert header == full, f"trial {trial}: header {header} vs full {full}"
            agreed_valid += 1
    assert agreed_valid > 50  # many mutations only touch tensor bytes: both accept those


def test_ingestion_validator_reads_the_header_and_checks_contribution_bounds():
    import dataclasses

    from fedcompute.tasks.records import TaskKind, TaskRecord, TaskStatus
    from fedcompute.tensor_spec import TensorSpec

    task = TaskRecord(population="p", task_id=1, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=2,
                      over_selection_rate=0.0, total_rounds=1, metrics=("loss",),
                      update_spec=tuple(TensorSpec(n, tuple(s), d) for n, s, d in SPEC))
    upload_contract.make_upload_validator()(_valid(), task)
    with pytest.raises(InvalidRequestError, match="num_examples 7 is outside 1..5"):
        upload_contract.make_upload_validator()(_valid(), dataclasses.replace(task, max_device_examples=5))


def test_an_unparsable_upload_gets_the_full_decode_s_wording():
    with pytest.raises(InvalidRequestError, match="neither gzip nor a ClientUpdate protobuf"):
        check_client_update_header(b"this is not an update \x00\x01", expected_spec=SPEC)
