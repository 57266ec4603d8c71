"""Loading and checking the SavedFunctionalModel given to the task builder."""
from __future__ import annotations

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedcompute.errors import ArtifactBuildError
from fedcompute.taskbuilder import model_check as mc

DENSE_HINT = "TFLite does not support tf.sparse.SparseTensor / tf.RaggedTensor; use dense tf.Tensor inputs"
TYPE1_SPEC = (tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 1], tf.int64))


def _type1_keras(extra_layers=()):
    return tf.keras.Sequential(
        [tf.keras.layers.InputLayer(input_shape=(4,)), *extra_layers, tf.keras.layers.Dense(3, activation="softmax")]
    )


def _type2_keras():
    inputs = collections.OrderedDict(
        (name, tf.keras.Input(shape=(1,), name=name)) for name in ("feature-1", "feature-2")
    )
    merged = tf.keras.layers.Concatenate()(list(inputs.values()))
    return tf.keras.Model(inputs=inputs, outputs=tf.keras.layers.Dense(2, activation="softmax")(merged))


def _save(path, keras_model, input_spec):
    functional = tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn=tf.keras.losses.SparseCategoricalCrossentropy(), input_spec=input_spec
    )
    tff.learning.models.save_functional_model(functional, str(path))
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    tf.keras.utils.set_random_seed(5)
    type2_spec = (
        collections.OrderedDict(
            [("feature-1", tf.TensorSpec([None, 1], tf.float32)), ("feature-2", tf.TensorSpec([None, 1], tf.float32))]
        ),
        tf.TensorSpec([None, 1], tf.int64),
    )
    plain = tmp / "plain_keras"
    tf.saved_model.save(_type1_keras(), str(plain))
    (tmp / "empty").mkdir()
    return {
        "type1": _save(tmp / "type1", _type1_keras(), TYPE1_SPEC),
        "type2": _save(tmp / "type2", _type2_keras(), type2_spec),
        # log(x - 10) of features in [0, 1): NaN predictions at build time.
        "nan": _save(tmp / "nan", _type1_keras([tf.keras.layers.Lambda(lambda x: tf.math.log(x - 10.0))]), TYPE1_SPEC),
        "plain": str(plain),
        "empty": str(tmp / "empty"),
        "missing": str(tmp / "missing"),
    }


# ------------------------------------------------------------------------ models that pass


def test_type1_model_passes(paths):
    model = mc.load_functional_model_checked(paths["type1"])
    result = mc.check_model(model, label_name=None)
    assert result.input_type == 1
    assert result.example_spec == {
        "version": 1,
        "input_type": 1,
        "features": [{"name": "x", "shape": [4], "dtype": "float32"}],
        "label": {"name": "y", "shape": [1], "dtype": "int64"},
    }
    assert result.num_parameters == 4 * 3 + 3
    assert np.isfinite(result.sample_loss) and result.sample_loss > 0
    # What the device would compute on the same batch, straight from the saved model.
    x, y = mc.sample_batch(result.example_spec)
    weights = model.initial_weights()
    assert float(model.loss(model.predict(weights, x, training=True), y)) == pytest.approx(result.sample_loss)


def test_type2_dict_model_with_label_name_passes(paths):
    result = mc.check_model(mc.load_functional_model_checked(paths["type2"]), label_name="my_label", input_type=2)
    assert result.input_type == 2
    assert result.label_name == "my_label"
    assert [f["name"] for f in result.example_spec["features"]] == ["feature-1", "feature-2"]
    assert result.example_spec["label"] == {"name": "my_label", "shape": [1], "dtype": "int64"}


def test_models_loaded_by_tff_or_tf_are_accepted(paths):
    by_tff = mc.as_loaded_model(tff.learning.models.load_functional_model(paths["type1"]))
    by_tf = mc.as_loaded_model(tf.saved_model.load(paths["type1"]))
    for loaded in (by_tff, by_tf):
        assert loaded.x_spec == tf.TensorSpec([None, 4], tf.float32)
        assert loaded.y_spec == tf.TensorSpec([None, 1], tf.int64)


def test_examples_round_trip_in_both_layouts():
    spec = mc.check_input_spec(
        {"b": tf.TensorSpec([None, 2, 2], tf.float32), "a": tf.TensorSpec([None], tf.int32)},
        tf.TensorSpec([None], tf.float32), label_name="target",
    )
    assert [f["name"] for f in spec["features"]] == ["a", "b"]
    rng = np.random.default_rng(1)
    feats = {"a": rng.integers(0, 9, (3,)), "b": rng.random((3, 2, 2)).astype(np.float32)}
    labels = rng.random((3,)).astype(np.float32)
    x, y = mc.parse_examples(spec, mc.serialize_examples(spec, feats, labels))
    assert x["a"].dtype == tf.int32 and x["b"].shape == (3, 2, 2)
    np.testing.assert_array_equal(x["a"].numpy(), feats["a"])
    np.testing.assert_allclose(x["b"].numpy(), feats["b"])
    np.testing.assert_allclose(y.numpy(), labels)


# ------------------------------------------------------------------------ loading errors


def test_missing_directory(paths):
    with pytest.raises(ArtifactBuildError, match="does not exist.*save_functional_model"):
        mc.load_functional_model_checked(paths["missing"])


def test_directory_without_saved_model_pb(paths):
    with pytest.raises(ArtifactBuildError) as info:
        mc.load_functional_model_checked(paths["empty"])
    assert f"no saved_model.pb in {paths['empty']}" in str(info.value)
    assert "tff.learning.models.save_functional_model" in str(info.value)


def test_plain_keras_saved_model_is_not_a_functional_model(paths):
    with pytest.raises(ArtifactBuildError) as info:
        mc.load_functional_model_checked(paths["plain"])
    text = str(info.value)
    assert "not a TFF SavedFunctionalModel" in text and "predict_on_batch_training" in text
    assert "functional_model_from_keras" in text


# ------------------------------------------------------------------------ check errors


def test_type2_without_label_name(paths):
    model = mc.load_functional_model_checked(paths["type2"])
    with pytest.raises(ArtifactBuildError, match="register label_name in the task builder config"):
        mc.check_model(model, label_name=None)


def test_type2_label_name_equal_to_a_feature(paths):
    model = mc.load_functional_model_checked(paths["type2"])
    with pytest.raises(ArtifactBuildError, match="label_name 'feature-2' is also one of the model's feature names"):
        mc.check_model(model, label_name="feature-2")


def test_input_type_mismatch(paths):
    model = mc.load_functional_model_checked(paths["type1"])
    with pytest.raises(ArtifactBuildError, match="expects input type 2 but the model's input_spec is type 1"):
        mc.check_model(model, label_name=None, input_type=2)


def test_non_finite_predictions_fail(paths):
    with pytest.raises(ArtifactBuildError, match="non-finite predictions"):
        mc.check_model(mc.load_functional_model_checked(paths["nan"]), label_name=None)


@pytest.mark.parametrize(
    ("x_spec", "y_spec"),
    [
        (tf.RaggedTensorSpec([None, None], tf.float32), tf.TensorSpec([None, 1], tf.int64)),
        ({"f": tf.SparseTensorSpec([None, 8], tf.float32)}, tf.TensorSpec([None, 1], tf.int64)),
        (tf.TensorSpec([None, 4], tf.float32), tf.RaggedTensorSpec([None, None], tf.int64)),
    ],
)
def test_sparse_and_ragged_specs_are_rejected(x_spec, y_spec):
    with pytest.raises(ArtifactBuildError) as info:
        mc.check_input_spec(x_spec, y_spec, label_name="label")
    assert DENSE_HINT in str(info.value)


@pytest.mark.parametrize(
    ("x_spec", "y_spec", "fragment"),
    [
        (tf.TensorSpec([None, 4]), tf.TensorSpec([None, 2], tf.int64), "must be \\[None, 1\\] or \\[None\\]"),
        (tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1], tf.string), "integer or floating"),
        (tf.TensorSpec([None, None]), tf.TensorSpec([None, 1], tf.int64), "except the batch one must be fixed"),
        (tf.TensorSpec([None, 4], tf.string), tf.TensorSpec([None, 1], tf.int64), "float_list"),
        ((tf.TensorSpec([None, 4]), tf.TensorSpec([None, 4])), tf.TensorSpec([None, 1], tf.int64), "sequence"),
    ],
)
def test_bad_specs_are_rejected_with_specific_messages(x_spec, y_spec, fragment):
    with pytest.raises(ArtifactBuildError, match=fragment):
        mc.check_input_spec(x_spec, y_spec, label_name=None)
