"""Datasets, partitioners and `tf.train.Example` encoding for the simulated device fleet.

Every module here imports only numpy at import time; TensorFlow (parsing) and
scikit-learn (digits) are imported inside the functions that need them.

- :mod:`fedcompute.data.fashion_mnist` — Fashion-MNIST from the Debian package's IDX files.
- :mod:`fedcompute.data.digits` — scikit-learn's 8×8 digits, optionally as 28×28×1 images.
- :mod:`fedcompute.data.partition` — IID, label-shard and Dirichlet partitions over devices.
- :mod:`fedcompute.data.examples` — the seed's two `tf.train.Example` layouts and
  :class:`~fedcompute.data.examples.ExampleSpec`, the JSON parsing spec stored in the plan.
"""
