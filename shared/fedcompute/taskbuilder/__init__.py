"""The task builder's checks and artifact building.

Submodules (import them directly; the TensorFlow-using ones import TensorFlow lazily):

* :mod:`fedcompute.taskbuilder.model_check`: load and check the SavedFunctionalModel.
* :mod:`fedcompute.taskbuilder.flex_ops`: the TFLite flex-ops check and ``min_client_version``.

This package ``__init__`` stays import-light (no TensorFlow).
"""
