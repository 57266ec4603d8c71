"""Tasks, rounds (Firestore collection `iterations`) and assignments: records, domain values and state machines
(``records``, pure), slot quotas (``quota``). The Firestore store is an adapter
(:mod:`fedcompute.adapters.firestore_store`); its in-memory fake is :mod:`fedcompute.memory`."""
