"""Datasets, partitioners and the tf.train.Example layouts (fedcompute.data)."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedcompute.data import partition
from fedcompute.data.digits import load_digits, to_28x28
from fedcompute.data.errors import DatasetFormatError, DatasetNotFoundError
from fedcompute.data.examples import (
    ExampleSpec,
    FeatureSpec,
    InputSpecError,
    decode_example,
    encode_examples,
    parse_examples,
)
from fedcompute.data.fashion_mnist import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    load_fashion_mnist,
    read_idx,
)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "an example is on two devices"
    return allidx


def _balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# ---------------------------------------------------------------------------- light imports

def test_data_modules_do_not_import_tensorflow_or_sklearn():
    code = ("import sys, fedcompute.data.examples, fedcompute.data.partition, "
            "fedcompute.data.fashion_mnist, fedcompute.data.digits, fedcompute.models.example_models, "
            "fedcompute.models.functional; "
            "bad = [m for m in ('tensorflow', 'tensorflow_federated', 'sklearn') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------- partitioners

def test_iid_covers_every_example_once_in_balanced_parts():
    parts = partition.iid(1003, 10, rng=1)
    allidx = _assert_disjoint(parts)
    assert sorted(allidx.tolist()) == list(range(1003))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_examples_per_device_takes_a_disjoint_subset():
    parts = partition.iid(1000, 7, rng=2, examples_per_device=100)
    _assert_disjoint(parts)
    assert [len(p) for p in parts] == [100] * 7
    assert np.concatenate(parts).max() < 1000


def test_partitioners_are_reproducible_from_a_seed():
    labels = _balanced_labels(10, 50)
    for fn in (lambda r: partition.iid(500, 8, rng=r),
               lambda r: partition.label_shards(labels, 10, 2, rng=r),
               lambda r: partition.dirichlet(labels, 10, 0.5, rng=r),
               lambda r: partition.dirichlet(labels, 10, 0.5, rng=r, method="per_device")):
        a, b, c = fn(7), fn(7), fn(8)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(len(x) == len(z) and np.array_equal(x, z) for x, z in zip(a, c))
    gen = np.random.default_rng(3)
    assert partition.as_rng(gen) is gen
    with pytest.raises(TypeError):
        partition.as_rng("seed")


def test_label_shards_gives_each_device_at_most_k_labels_when_shards_align():
    labels = _balanced_labels(10, 60)  # 600 examples; 30 devices × 2 shards of 10
    parts = partition.label_shards(labels, 30, shards_per_device=2, rng=0)
    allidx = _assert_disjoint(parts)
    assert sorted(allidx.tolist()) == list(range(600))
    hist = partition.label_histogram(labels, parts, 10)
    assert hist.shape == (30, 10)
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert (hist.sum(axis=1) == 20).all()
    # Non-IID in practice: most devices see exactly 2 labels, not all 10.
    assert ((hist > 0).sum(axis=1) == 2).mean() > 0.5


def test_label_shards_with_k_shards_per_device():
    labels = _balanced_labels(10, 120)
    parts = partition.label_shards(labels, 20, shards_per_device=3, rng=4)  # 60 shards of 20
    hist = partition.label_histogram(labels, parts, 10)
    assert ((hist > 0).sum(axis=1) <= 3).all()
    _assert_disjoint(parts)


def test_label_shards_accepts_n_by_1_labels_and_uneven_sizes():
    labels = _balanced_labels(3, 33)[:, None]  # [N, 1] as the seed's label spec
    parts = partition.label_shards(labels, 4, 2, rng=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(99))


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each device's label mix and the global one."""
    hist = partition.label_histogram(labels, parts, 10).astype(float)
    local = hist / hist.sum(axis=1, keepdims=True)
    glob = np.bincount(labels, minlength=10) / labels.size
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())


def test_dirichlet_covers_every_example_and_respects_min_size():
    labels = _balanced_labels(10, 200)
    parts = partition.dirichlet(labels, 20, alpha=0.3, rng=5, min_size=20)
    allidx = _assert_disjoint(parts)
    assert sorted(allidx.tolist()) == list(range(2000))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_per_device_scales_to_many_devices_with_equal_sizes():
    labels = _balanced_labels(10, 300)
    # Many devices and a small alpha: the per-class draw cannot give everyone 3 examples ...
    with pytest.raises(ValueError, match="per_device"):
        partition.dirichlet(labels, 1000, alpha=0.05, rng=0, min_size=3, max_attempts=3)
    # ... the per-device draw can, and still covers every example exactly once.
    parts = partition.dirichlet(labels, 1000, alpha=0.05, rng=0, min_size=3, method="per_device")
    assert sorted(np.concatenate(parts).tolist()) == list(range(3000))
    assert {len(p) for p in parts} == {3}
    uneven = partition.dirichlet(labels, 7, alpha=0.5, rng=1, method="per_device")
    assert sorted(np.concatenate(uneven).tolist()) == list(range(3000))
    assert max(map(len, uneven)) - min(map(len, uneven)) <= 1


@pytest.mark.parametrize("method", ["per_class", "per_device"])
def test_dirichlet_skew_grows_as_alpha_shrinks(method):
    labels = _balanced_labels(10, 300)
    skews = [np.mean([_label_skew(labels, partition.dirichlet(labels, 20, alpha, rng=s,
                                                                min_size=5, method=method))
                      for s in range(3)])
             for alpha in (100.0, 1.0, 0.05)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.15 and skews[2] > 0.6


def test_partition_errors_are_clear():
    labels = _balanced_labels(10, 10)
    with pytest.raises(ValueError, match="num_devices"):
        partition.iid(10, 0)
    with pytest.raises(ValueError, match="use fewer devices"):
        partition.iid(3, 5)
    with pytest.raises(ValueError, match="examples needed"):
        partition.iid(100, 10, examples_per_device=11)
    with pytest.raises(ValueError, match="shards"):
        partition.label_shards(labels, 60, shards_per_device=2)
    with pytest.raises(ValueError, match="shards_per_device"):
        partition.label_shards(labels, 5, shards_per_device=0)
    with pytest.raises(ValueError, match="alpha"):
        partition.dirichlet(labels, 5, alpha=0.0)
    with pytest.raises(ValueError, match="min_size"):
        partition.dirichlet(labels, 10, alpha=1.0, min_size=11)
    with pytest.raises(ValueError, match="attempts"):
        # min_size = N / devices needs a perfectly even draw: unreachable at alpha 0.01.
        partition.dirichlet(labels, 10, alpha=0.01, rng=0, min_size=10, max_attempts=5)
    with pytest.raises(ValueError, match="method"):
        partition.dirichlet(labels, 10, alpha=1.0, method="per_label")
    with pytest.raises(ValueError, match="integers"):
        partition.label_shards(np.array([0.5, 1.5, 2.5]), 1, 1)


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST

def _write_idx(path: Path, magic: int, array: np.ndarray, *, gz: bool = True,
               dims: tuple[int, ...] | None = None) -> None:
    dims = array.shape if dims is None else dims
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_fake_fashion_mnist(directory: Path, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", IMAGES_MAGIC, images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", LABELS_MAGIC, labels)
        out[split] = (images, labels)
    return out


def test_idx_loader_reads_small_files(tmp_path):
    written = _write_fake_fashion_mnist(tmp_path)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split, data_dir=tmp_path)
        images, labels = written[split]
        assert x.shape == (len(labels), 28, 28, 1) and x.dtype == np.float32
        assert y.dtype == np.int64
        np.testing.assert_allclose(x[..., 0] * 255.0, images, atol=1e-4)
        np.testing.assert_array_equal(y, labels)


def test_idx_loader_uses_env_var(tmp_path, monkeypatch):
    _write_fake_fashion_mnist(tmp_path, n_train=3)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    x, _ = load_fashion_mnist("train")
    assert x.shape[0] == 3


def test_read_idx_uncompressed_and_bad_files(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok", IMAGES_MAGIC, arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ok", IMAGES_MAGIC), arr)
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(tmp_path / "ok", LABELS_MAGIC)
    _write_idx(tmp_path / "short.gz", IMAGES_MAGIC, arr, dims=(3, 3, 4))
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(tmp_path / "short.gz", IMAGES_MAGIC)
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetFormatError):
        read_idx(tmp_path / "junk.gz", IMAGES_MAGIC)


def test_missing_files_tell_the_user_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FASHION_MNIST_DIR" in message and "make setup" in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_mismatched_counts_are_rejected(tmp_path):
    _write_fake_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", LABELS_MAGIC, np.zeros(4, np.uint8))
    with pytest.raises(DatasetFormatError, match="labels"):
        load_fashion_mnist("train", data_dir=tmp_path)


def test_real_fashion_mnist_shapes():
    x_test, y_test = load_fashion_mnist("test", data_dir=REAL_FASHION_MNIST)
    assert x_test.shape == (10000, 28, 28, 1) and x_test.dtype == np.float32
    assert float(x_test.min()) >= 0.0 and float(x_test.max()) <= 1.0 and x_test.max() > 0.99
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    x_train, y_train = load_fashion_mnist("train", data_dir=REAL_FASHION_MNIST)
    assert x_train.shape == (60000, 28, 28, 1) and y_train.shape == (60000,)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)


# ---------------------------------------------------------------------------- digits

def test_digits_8x8_and_28x28():
    x8, y = load_digits()
    assert x8.shape == (1797, 8, 8, 1) and x8.dtype == np.float32 and y.dtype == np.int64
    assert float(x8.min()) == 0.0 and float(x8.max()) == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
    x28, y28 = load_digits(image_size=28)
    assert x28.shape == (1797, 28, 28, 1) and x28.dtype == np.float32
    np.testing.assert_array_equal(y28, y)
    # Each source pixel becomes a 3×3 block inside a 2-pixel zero border.
    np.testing.assert_array_equal(x28[:, 2:26:3, 2:26:3, 0], x8[..., 0])
    np.testing.assert_array_equal(x28[:, 3:27:3, 3:27:3, 0], x8[..., 0])
    assert x28[:, :2].max() == 0 and x28[:, 26:].max() == 0
    padded = to_28x28(x8[:5], mode="pad")
    np.testing.assert_array_equal(padded[:, 10:18, 10:18], x8[:5])
    assert padded.sum() == pytest.approx(float(x8[:5].sum()))
    with pytest.raises(ValueError):
        load_digits(image_size=16)
    with pytest.raises(ValueError):
        to_28x28(np.zeros((2, 7, 7)))


# ---------------------------------------------------------------------------- tf.train.Example

def _type1_spec() -> ExampleSpec:
    return ExampleSpec.type1((28, 28, 1))


def _type2_spec() -> ExampleSpec:
    return ExampleSpec.type2(OrderedDict([("feature-1", ((1,), "float32")),
                                          ("feature-2", ((1,), "float32"))]), "my_label")


def test_type1_encoding_matches_the_seed_layout_and_round_trips():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.random((6, 28, 28, 1), dtype=np.float32)
    y = np.array([0, 1, 9, 3, 3, 7])
    serialized = encode_examples(_type1_spec(), x, y)
    assert len(serialized) == 6
    # Exactly the seed's tf.train.Example: 'x' float_list (784 values), 'y' int64_list.
    proto = tf.train.Example.FromString(serialized[2])
    assert set(proto.features.feature) == {"x", "y"}
    np.testing.assert_array_equal(np.array(proto.features.feature["x"].float_list.value,
                                           dtype=np.float32), x[2].ravel())
    assert list(proto.features.feature["y"].int64_list.value) == [9]
    reference = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[0].ravel())),
        "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
    })).SerializeToString()
    assert reference == serialized[0]

    bx, by = parse_examples(serialized, _type1_spec())
    assert bx.shape == (6, 28, 28, 1) and bx.dtype == tf.float32
    assert by.shape == (6, 1) and by.dtype == tf.int64
    np.testing.assert_array_equal(bx.numpy(), x)
    np.testing.assert_array_equal(by.numpy()[:, 0], y)
    # Parsing also accepts the seed-built proto and the JSON form of the spec.
    _, ry = parse_examples(tf.constant([reference]), _type1_spec().to_json())
    assert ry.numpy().tolist() == [[0]]


def test_type2_encoding_round_trips_in_feature_order():
    import tensorflow as tf

    feats = {"feature-2": np.full((3, 1), 2.0), "feature-1": np.array([[1.0], [-0.5], [3.25]])}
    labels = np.array([[1], [0], [1]])
    spec = _type2_spec()
    serialized = encode_examples(spec, feats, labels)
    proto = tf.train.Example.FromString(serialized[1])
    assert set(proto.features.feature) == {"feature-1", "feature-2", "my_label"}
    assert list(proto.features.feature["feature-1"].float_list.value) == [-0.5]
    assert list(proto.features.feature["my_label"].int64_list.value) == [0]
    x, y = parse_examples(serialized, spec)
    assert list(x) == ["feature-1", "feature-2"]
    np.testing.assert_array_equal(x["feature-1"].numpy(), feats["feature-1"].astype(np.float32))
    np.testing.assert_array_equal(x["feature-2"].numpy(), feats["feature-2"].astype(np.float32))
    assert y.dtype == tf.int64 and y.numpy().tolist() == [[1], [0], [1]]


def test_parse_examples_works_inside_tf_data():
    import tensorflow as tf

    spec = _type2_spec()
    serialized = encode_examples(spec, {"feature-1": np.arange(10.0)[:, None],
                                        "feature-2": np.zeros((10, 1))}, np.arange(10) % 2)
    ds = tf.data.Dataset.from_tensor_slices(serialized).batch(4).map(
        lambda s: parse_examples(s, spec))
    batches = list(ds)
    assert [int(b[1].shape[0]) for b in batches] == [4, 4, 2]
    assert batches[1][0]["feature-1"].numpy().ravel().tolist() == [4.0, 5.0, 6.0, 7.0]


def test_pure_decoder_reads_int_features_and_negative_labels():
    spec = ExampleSpec.type2([("tokens", (3,), "int64"), ("count", (), "int32"),
                              ("w", (), "float64")], "target", label_shape=(), label_dtype="int64")
    serialized = encode_examples(spec, {"tokens": np.array([[1, 300, 2**40]]),
                                        "count": np.array([7]), "w": np.array([0.25])},
                                 np.array([-3]))
    decoded = decode_example(serialized[0])
    assert decoded["tokens"].tolist() == [1, 300, 2**40]
    assert decoded["count"].tolist() == [7]
    assert decoded["w"].tolist() == [0.25]
    assert decoded["target"].tolist() == [-3]
    x, y = parse_examples(serialized, spec)
    assert x["tokens"].numpy().tolist() == [[1, 300, 2**40]]
    assert x["count"].dtype.name == "int32" and x["count"].numpy().tolist() == [7]
    assert x["w"].dtype.name == "float64" and x["w"].numpy().tolist() == [0.25]
    assert y.shape == (1,) and y.numpy().tolist() == [-3]


def test_encode_rejects_mismatched_data():
    spec = _type1_spec()
    with pytest.raises(ValueError, match="784"):
        encode_examples(spec, np.zeros((2, 27, 28, 1)), [0, 1])
    with pytest.raises(ValueError, match="examples"):
        encode_examples(spec, np.zeros((3, 784)), [0, 1])
    with pytest.raises(ValueError, match="int64_list"):
        encode_examples(spec, np.zeros((2, 784)), np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="missing"):
        encode_examples(_type2_spec(), {"feature-1": np.zeros((1, 1))}, [1])
    with pytest.raises(ValueError, match="dict"):
        encode_examples(_type2_spec(), np.zeros((1, 2)), [1])


def test_example_spec_json_round_trip_and_validation():
    for spec in (_type1_spec(), _type2_spec()):
        text = spec.to_json()
        again = ExampleSpec.from_json(text)
        assert again == spec and hash(again) == hash(spec)
        assert ExampleSpec.coerce(json.loads(text)) == spec
    assert _type2_spec().label_name == "my_label"
    assert _type2_spec().feature_names == ("feature-1", "feature-2")
    with pytest.raises(InputSpecError, match="type 1"):
        ExampleSpec(1, (FeatureSpec("image", (4,), "float32"),), FeatureSpec("y", (1,), "int64"))
    with pytest.raises(InputSpecError, match="also a feature"):
        ExampleSpec.type2({"a": ((1,), "float32")}, "a")
    with pytest.raises(InputSpecError, match="string"):
        FeatureSpec("s", (1,), "string")
    with pytest.raises(InputSpecError, match="version"):
        ExampleSpec.from_dict({**_type1_spec().to_dict(), "version": 99})
    with pytest.raises(InputSpecError, match="malformed"):
        ExampleSpec.from_dict({"input_type": 1})
    with pytest.raises(InputSpecError, match="JSON"):
        ExampleSpec.from_json("{not json")


def test_example_spec_from_tf_input_specs():
    import tensorflow as tf

    type1 = (tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None, 1], tf.int64))
    assert ExampleSpec.from_input_spec(type1) == _type1_spec()
    assert ExampleSpec.from_input_spec(type1, label_name="ignored") == _type1_spec()
    type2 = (OrderedDict([("feature-1", tf.TensorSpec([None, 1], tf.float32)),
                          ("feature-2", tf.TensorSpec([None, 1], tf.float32))]),
             tf.TensorSpec([None, 1], tf.int64))
    spec = ExampleSpec.from_input_spec(type2, "my_label")
    assert spec == _type2_spec()
    x_spec, y_spec = spec.to_input_spec()
    assert list(x_spec) == ["feature-1", "feature-2"] and y_spec == type2[1]
    assert x_spec["feature-1"] == type2[0]["feature-1"]
    assert _type1_spec().to_input_spec()[0] == type1[0]


def test_example_spec_rejects_unsupported_input_specs():
    import tensorflow as tf

    label = tf.TensorSpec([None, 1], tf.int64)
    with pytest.raises(InputSpecError, match="TFLite"):
        ExampleSpec.from_input_spec((tf.SparseTensorSpec([None, 10], tf.float32), label))
    with pytest.raises(InputSpecError, match="TFLite"):
        ExampleSpec.from_input_spec(
            (OrderedDict(a=tf.RaggedTensorSpec([None, None], tf.float32)), label), "lbl")
    with pytest.raises(InputSpecError, match="batch"):
        ExampleSpec.from_input_spec((tf.TensorSpec([None, None], tf.float32), label))
    with pytest.raises(InputSpecError, match="label_name"):
        ExampleSpec.from_input_spec((OrderedDict(a=tf.TensorSpec([None, 1])), label))
    with pytest.raises(InputSpecError, match="pair"):
        ExampleSpec.from_input_spec(tf.TensorSpec([None, 1]))
    with pytest.raises(InputSpecError, match="unknown rank"):
        ExampleSpec.from_input_spec((tf.TensorSpec(None, tf.float32), label))
    with pytest.raises(InputSpecError, match="nested"):
        ExampleSpec.from_input_spec(
            (OrderedDict(a=OrderedDict(b=tf.TensorSpec([None, 1]))), label), "lbl")
    # The error is a 400-class build error the task builder can report as is.
    assert issubclass(InputSpecError, ValueError)
