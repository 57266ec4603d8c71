"""Server-side learning core: tensor codec, the server round by stage, checkpoints.

Pure modules (no cloud I/O). A round composes ``accumulator`` (clip + streaming sum),
a DP mechanism (``dp_core``, ``dp_gaussian``, ``dp_tree``, picked by ``dp_mechanisms``) and
``server_round`` (ServerState, optimizer step, metrics, ε ledger, next step). Metrics are
sufficient statistics: ``metric_batch`` computes one batch's on a device, ``metric_stats``
registers, sums, validates and finalizes them.
``tensor_codec`` and ``upload_contract`` need only numpy and protobuf, so the light functions
(result ingestion) validate uploads without TensorFlow; the DP mechanisms import TensorFlow /
tensorflow_privacy lazily, only when a noised result is computed.
Importing this package imports nothing.
"""
