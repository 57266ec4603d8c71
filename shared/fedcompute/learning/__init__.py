"""Server-side learning core: tensor codec, server optimizers, DP aggregation, checkpoints.

Pure modules (no cloud I/O). ``tensor_codec`` needs only numpy and protobuf, so the light
functions (result ingestion) can validate uploads without TensorFlow; ``aggregation``
imports TensorFlow / tensorflow_privacy lazily, only when a noised result is computed.
Importing this package imports nothing.
"""
