"""Example models for the seed's workflow, saved as TFF functional models.

Importing this package (or its modules) does not import TensorFlow: each builder imports
TF/TFF when called.

- :mod:`fedcompute.models.emnist_cnn` — the seed's EMNIST "original FedAvg CNN" (1,663,370
  parameters) and its input specs for input types 1 and 2.
- :mod:`fedcompute.models.dict_binary` — the seed's type-2 example: two float features,
  a binary label ``my_label``.
- :mod:`fedcompute.models.functional` — save / load TFF functional models.
- :mod:`fedcompute.models.example_models` — :func:`save_example_models` and the catalog of
  example models (name, input type, label_name).
"""
