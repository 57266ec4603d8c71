"""Adapters at the edge: Google Cloud clients (Firestore, Cloud Storage, Pub/Sub) and the
implementations of the ports in :mod:`fedcompute.ports` built on them (``firestore_store``,
``blobs``, ``events``). Their in-memory fakes are not adapters: :mod:`fedcompute.memory`.

Nothing here is imported eagerly: ``import fedcompute.adapters`` stays cheap, and each
module imports its Google client library inside the functions that need it.
"""
