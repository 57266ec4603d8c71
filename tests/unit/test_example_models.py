"""The example models: architecture, saving, loading and feeding from tf.train.Example.

These import TensorFlow/TFF (~10 s), so they are kept few; the models are saved once per
module into a temporary directory.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fedcompute.data.digits import load_digits
from fedcompute.data.examples import ExampleSpec, encode_examples, parse_examples
from fedcompute.models import dict_binary, emnist_cnn
from fedcompute.models.example_models import EXAMPLE_MODELS, save_example_models
from fedcompute.models.functional import kill_tff_worker_children

BATCH = 32
IMAGE_MODELS = ("emnist_cnn", "fashion_logreg")  # 28x28x1 images, softmax over 10 classes


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("example_models")
    start = time.perf_counter()
    paths = save_example_models(out, seed=0)
    seconds = time.perf_counter() - start
    print(f"\nsaving the {len(paths)} example models took {seconds:.1f} s")
    yield paths
    kill_tff_worker_children()


def _batch(name: str):
    """A parsed batch for model ``name``, built from serialized tf.train.Example."""
    model = EXAMPLE_MODELS[name]
    spec = model.example_spec()
    if name.startswith(IMAGE_MODELS):
        images, labels = load_digits(image_size=28)
        images, labels = images[:BATCH], labels[:BATCH]
        features = images if spec.input_type == 1 else {emnist_cnn.TYPE2_FEATURE_NAME: images}
    else:
        features, labels = dict_binary.synthetic_data(BATCH, rng=0)
    x, y = parse_examples(encode_examples(spec, features, labels), spec)
    return x, y, labels


def _numpy_loss(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    if name.startswith(IMAGE_MODELS):
        return float(-np.mean(np.log(predictions[np.arange(len(labels)), labels])))
    p = predictions[:, 0].astype(np.float64)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_cnn_architecture_matches_the_seed():
    for build in (emnist_cnn.create_original_fedavg_cnn_model,
                  emnist_cnn.create_original_fedavg_cnn_dict_model):
        model = build()
        assert model.count_params() == emnist_cnn.NUM_PARAMETERS_DIGITS == 1_663_370
        shapes = [tuple(layer.output_shape[1:]) for layer in model.layers[1:]]
        assert shapes == [(28, 28, 32), (14, 14, 32), (14, 14, 64), (7, 7, 64), (3136,),
                          (512,), (10,)]
    # 62 classes (EMNIST letters + digits): only the last layer grows.
    assert emnist_cnn.create_original_fedavg_cnn_model(only_digits=False).count_params() == \
        1_663_370 - 5130 + 512 * 62 + 62


@pytest.mark.parametrize("name", list(EXAMPLE_MODELS))
def test_saved_model_loads_and_runs_on_parsed_examples(saved_models, name):
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedcompute.models.functional import load_functional_model

    model = EXAMPLE_MODELS[name]
    loaded = tff.learning.models.load_functional_model(saved_models[name])
    # The input spec survives the round trip, so the task builder can derive the same
    # parsing spec from the saved model as from the catalog.
    assert tf.nest.map_structure(lambda s: (tuple(s.shape), s.dtype), loaded.input_spec) == \
        tf.nest.map_structure(lambda s: (tuple(s.shape), s.dtype), model.input_spec())
    spec = ExampleSpec.from_input_spec(loaded.input_spec, model.label_name)
    assert spec == model.example_spec()
    assert spec.input_type == model.input_type

    x, y, labels = _batch(name)
    predictions = loaded.predict_on_batch(loaded.initial_weights, x, training=False)
    probs = predictions.numpy()
    if name.startswith(IMAGE_MODELS):
        assert probs.shape == (BATCH, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    else:
        assert probs.shape == (BATCH, 1) and ((probs > 0) & (probs < 1)).all()
    loss = float(loaded.loss(predictions, y))
    assert loss == pytest.approx(_numpy_loss(name, probs, labels), rel=1e-4)

    # The re-wrapped model (metric-free FunctionalModel) gives the same predictions.
    rewrapped = load_functional_model(saved_models[name])
    again = rewrapped.predict_on_batch(rewrapped.initial_weights, x, False)
    np.testing.assert_allclose(again.numpy(), probs, rtol=1e-6)


@pytest.mark.parametrize("name", list(EXAMPLE_MODELS))
def test_plain_saved_model_trains_with_gradient_tape(saved_models, name):
    import tensorflow as tf

    raw = tf.saved_model.load(saved_models[name])
    weights = raw()  # initial weights: (trainable tuple, non-trainable tuple)
    assert isinstance(weights, tuple) and all(isinstance(w, tuple) for w in weights)
    num_params = sum(int(np.prod(w.shape)) for w in weights[0])
    if name.startswith("emnist_cnn"):
        assert num_params == 1_663_370
    assert len(weights[1]) == 0
    assert tf.saved_model.load(saved_models[name]).serialized_input_spec.dtype == tf.string

    x, y, labels = _batch(name)
    inference = raw.predict_on_batch_inference(model_weights=weights, x=x, training=False)[0]
    assert float(raw.loss(inference, y, None)[0]) == pytest.approx(
        _numpy_loss(name, inference.numpy(), labels), rel=1e-4)

    trainable = [tf.Variable(w) for w in weights[0]]
    lr = 0.5 if name.startswith("dict_binary") else 0.05

    def loss_value():
        model_weights = (tuple(v.read_value() for v in trainable), ())
        out = raw.predict_on_batch_training(model_weights=model_weights, x=x, training=True)[0]
        return raw.loss(out, y, None)[0]

    losses = []
    for _ in range(5):
        with tf.GradientTape() as tape:
            value = loss_value()
        grads = tape.gradient(value, trainable)
        assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
        for v, g in zip(trainable, grads):
            v.assign_sub(lr * g)
        losses.append(float(value))
    assert float(loss_value()) < losses[0]


def test_type1_and_type2_cnn_layouts_feed_the_same_network(saved_models):
    import tensorflow_federated as tff

    m1 = tff.learning.models.load_functional_model(saved_models["emnist_cnn_type1"])
    m2 = tff.learning.models.load_functional_model(saved_models["emnist_cnn_type2"])
    for a, b in zip(m1.initial_weights[0], m2.initial_weights[0]):
        np.testing.assert_array_equal(a, b)  # same seed, same architecture
    x1, y1, _ = _batch("emnist_cnn_type1")
    x2, y2, _ = _batch("emnist_cnn_type2")
    np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    p1 = m1.predict_on_batch(m1.initial_weights, x1, training=False)
    p2 = m2.predict_on_batch(m2.initial_weights, x2, training=False)
    np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-5, atol=1e-7)


def test_save_example_models_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="emnist_cnn_type1"):
        save_example_models(tmp_path, names=["resnet"])


def test_label_casting_loss_casts_int_labels_for_dense_losses_only():
    import tensorflow as tf

    from fedcompute.models.functional import label_casting_loss

    sparse = tf.keras.losses.SparseCategoricalCrossentropy()
    assert label_casting_loss(sparse) is sparse
    labels = tf.constant([[1], [0]], tf.int64)
    probs = tf.constant([[0.8], [0.3]], tf.float32)
    expected = -np.mean([np.log(0.8), np.log(0.7)])
    for loss in (tf.keras.losses.BinaryCrossentropy(), tf.keras.losses.binary_crossentropy):
        value = label_casting_loss(loss)(labels, probs)
        assert float(tf.reduce_mean(value)) == pytest.approx(expected, rel=1e-5)

    def squared_error(y_true, y_pred):  # no cast of its own: int64 - float32 would fail
        return tf.reduce_mean(tf.square(y_true - y_pred))

    value = label_casting_loss(squared_error)(labels, probs)
    assert float(value) == pytest.approx((0.2 ** 2 + 0.3 ** 2) / 2, rel=1e-5)
