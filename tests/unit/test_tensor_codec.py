"""Tensor codec: round trips and every kind of bad upload (numpy + protobuf only, no TF)."""
from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from fedcompute.errors import InvalidRequestError, PayloadTooLargeError
from fedcompute.learning import tensor_codec as tc
from fedcompute.proto import tensors_pb2

SPEC = [("conv/kernel", (3, 3, 1, 2), "float32"), ("conv/bias", (2,), "float32"), ("dense/kernel", (4, 5), "float32")]


def _delta(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(n, rng.standard_normal(s).astype(d)) for n, s, d in SPEC]


def _raw_update(**overrides) -> tensors_pb2.ClientUpdate:
    """A valid ClientUpdate message, to corrupt one field at a time."""
    msg = tensors_pb2.ClientUpdate.FromString(tc.encode_client_update(_delta(), 7, compress=False))
    for key, value in overrides.items():
        setattr(msg, key, value)
    return msg


def test_client_update_round_trip_gzip_and_plain() -> None:
    delta = _delta()
    stats = {"loss/total": np.array(3.5), "loss/count": np.array(7.0), "auc/tp": np.arange(4, dtype=np.int64)}
    blob = tc.encode_client_update(delta, 7, stats, metadata={"client_version": "341912000"})
    assert blob[:2] == tc.GZIP_MAGIC
    plain = tc.encode_client_update(delta, 7, stats, metadata={"client_version": "341912000"}, compress=False)
    assert gzip.decompress(blob) == plain
    for data in (blob, plain):  # GCS may hand back the object already decompressed
        update = tc.decode_client_update(data, expected_spec=SPEC)
        assert update.names == tuple(n for n, _, _ in SPEC)
        for (_, want), got in zip(delta, update.delta):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        assert update.num_examples == 7
        assert set(update.metric_statistics) == set(stats)
        np.testing.assert_array_equal(update.metric_statistics["auc/tp"], stats["auc/tp"])
        assert update.metadata == {"client_version": "341912000"}
        assert update.is_finite() and update.metrics_finite()


def test_encoding_is_deterministic() -> None:
    assert tc.encode_client_update(_delta(), 3) == tc.encode_client_update(_delta(), 3)
    assert tc.encode_client_update(_delta(), 3) != tc.encode_client_update(_delta(1), 3)


def test_bundle_round_trip_all_dtypes_and_scalars() -> None:
    named = [
        ("f32", np.arange(6, dtype=np.float32).reshape(2, 3)),
        ("f64", np.array([1.5, -2.25])),
        ("i32", np.array([[-1, 2]], dtype=np.int32)),
        ("i64", np.array(2**40, dtype=np.int64)),  # a scalar: empty shape
        ("f16", np.array([0.5], dtype=np.float16)),
        ("u8", np.array([255, 0], dtype=np.uint8)),
        ("i8", np.array([-128], dtype=np.int8)),
        ("b", np.array([True, False])),
        ("big_endian", np.array([1.0, 2.0], dtype=">f4")),
        ("non_contiguous", np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]),
    ]
    decoded, meta = tc.decode_bundle(tc.encode_bundle(named, {"k": "v"}))
    assert meta == {"k": "v"}
    assert [n for n, _ in decoded] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, decoded):
        assert got.shape == want.shape
        assert got.dtype.newbyteorder("=") == want.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, want)
    # raw data is little-endian whatever the host or the input byte order
    proto = tc.tensor_to_proto("x", np.array([1.0], dtype=">f4"))
    assert proto.data == np.array([1.0], dtype="<f4").tobytes()


def test_non_finite_values_decode_but_are_flagged() -> None:
    delta = _delta()
    delta[1] = (delta[1][0], np.array([np.nan, 1.0], dtype=np.float32))
    update = tc.decode_client_update(tc.encode_client_update(delta, 2, {"loss/total": np.array(np.inf)}), expected_spec=SPEC)
    assert not update.is_finite()
    assert not update.metrics_finite()


def test_missing_metric_statistics_is_accepted() -> None:
    msg = _raw_update()
    msg.ClearField("metric_statistics")
    update = tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)
    assert update.metric_statistics == {}


def test_multi_member_gzip_is_accepted() -> None:
    raw = tc.encode_client_update(_delta(), 4, compress=False)
    data = gzip.compress(raw[:100], mtime=0) + gzip.compress(raw[100:], mtime=0)
    assert tc.decode_client_update(data, expected_spec=SPEC).num_examples == 4


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b'{"keyId": "k", "encryptedPayload": "..."}', "upload is JSON"),
        (b"\xff\xff\xff\xff\xff", "neither gzip nor a ClientUpdate"),
        (b"", "not a fedcompute ClientUpdate"),
        (tc.GZIP_MAGIC + b"\x08\x00garbage-garbage", "not a valid gzip stream"),
    ],
)
def test_not_gzip_or_not_protobuf(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        tc.decode_client_update(data, expected_spec=SPEC)


def test_truncated_gzip_and_trailing_garbage() -> None:
    blob = tc.encode_client_update(_delta(), 3)
    with pytest.raises(InvalidRequestError, match="truncated gzip"):
        tc.decode_client_update(blob[:-20], expected_spec=SPEC)
    with pytest.raises(InvalidRequestError, match="trailing bytes"):
        tc.decode_client_update(blob + b"junk", expected_spec=SPEC)


def test_wrong_format_versions() -> None:
    with pytest.raises(InvalidRequestError, match="format_version 2"):
        tc.decode_client_update(_raw_update(format_version=2).SerializeToString(), expected_spec=SPEC)
    msg = _raw_update()
    msg.model_delta.format_version = 9
    with pytest.raises(InvalidRequestError, match="model_delta has format_version 9"):
        tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)


@pytest.mark.parametrize("count", [0, -3])
def test_non_positive_example_count(count: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"reports {count} examples"):
        tc.decode_client_update(_raw_update(num_examples=count).SerializeToString(), expected_spec=SPEC)
    with pytest.raises(ValueError):
        tc.encode_client_update(_delta(), count)


def test_spec_mismatches() -> None:
    delta = _delta()
    cases = [
        (delta[:2], "has 2 tensors, expected 3"),
        ([delta[1], delta[0], delta[2]], "tensor 'conv/bias' where 'conv/kernel' was expected"),
        ([delta[0], delta[1], ("dense/kernel", delta[2][1].reshape(5, 4))], r"shape \[5, 4\], expected \[4, 5\]"),
        ([delta[0], delta[1], ("dense/kernel", delta[2][1].astype(np.float64))], "dtype float64, expected float32"),
    ]
    for bad, fragment in cases:
        with pytest.raises(InvalidRequestError, match=fragment):
            tc.decode_client_update(tc.encode_client_update(bad, 1), expected_spec=SPEC)


def test_data_length_mismatch_and_bad_dtype_code() -> None:
    msg = _raw_update()
    msg.model_delta.tensors[1].data = msg.model_delta.tensors[1].data[:-1]
    with pytest.raises(InvalidRequestError, match="has 7 bytes of data, expected 8"):
        tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)
    msg = _raw_update()
    msg.metric_statistics.tensors.add(name="x", dtype=77, shape=[1], data=b"\0" * 4)
    with pytest.raises(InvalidRequestError, match="unknown dtype code 77"):
        tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)
    msg = _raw_update()
    msg.metric_statistics.tensors.add(name="neg", dtype=tensors_pb2.DTYPE_FLOAT32, shape=[-1], data=b"")
    with pytest.raises(InvalidRequestError, match="negative dimension"):
        tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)
    msg = _raw_update()
    msg.model_delta.tensors[0].name = msg.model_delta.tensors[1].name
    with pytest.raises(InvalidRequestError, match="unique"):
        tc.decode_client_update(msg.SerializeToString(), expected_spec=SPEC)


def test_oversized_upload_and_decompression_bomb() -> None:
    blob = tc.encode_client_update(_delta(), 3)
    with pytest.raises(PayloadTooLargeError, match="more than the 100 allowed"):
        tc.decode_client_update(blob, expected_spec=SPEC, max_bytes=100)
    # 64 MiB of zeros gzip to ~64 KiB; the cap must stop inflation long before 64 MiB.
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9, mtime=0)
    assert len(bomb) < 1 << 20
    with pytest.raises(PayloadTooLargeError, match="decompresses to more than"):
        tc.decode_client_update(bomb, expected_spec=SPEC, max_bytes=1 << 20)
    assert PayloadTooLargeError.http_status == 413
    # the default cap is the model's raw size plus headroom
    assert tc.default_max_bytes(SPEC) == (18 + 2 + 20) * 4 + tc.DEFAULT_OVERHEAD_BYTES


def test_gunzip_cap_bounds_memory() -> None:
    import tracemalloc

    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9, mtime=0)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLargeError):
            tc.gunzip_capped(bomb, max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes while refusing a bomb"


def test_learning_modules_do_not_import_tensorflow() -> None:
    import subprocess

    code = (
        "import sys, fedcompute.learning.tensor_codec, fedcompute.learning.accumulator, "
        "fedcompute.learning.dp_mechanisms, fedcompute.learning.server_round, fedcompute.learning.upload_contract, "
        "fedcompute.learning.checkpoint, fedcompute.learning.server_optimizer; "
        "print(sorted(m for m in ('tensorflow', 'tensorflow_privacy', 'tensorflow_federated') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
