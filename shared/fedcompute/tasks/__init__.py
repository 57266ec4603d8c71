"""Tasks, iterations (rounds) and assignments: records, domain values and state machines
(``records``, pure), and ``memory_store``, the in-memory fake of the ``TaskStore`` port.
The Firestore store is an adapter: :mod:`fedcompute.adapters.firestore_store`."""
