"""Monitoring: model metrics per round, run comparison and operations views (no TensorFlow).

* :mod:`fedcompute.monitoring.metrics` reads every round's metrics JSON of a task;
* :mod:`fedcompute.monitoring.ops` summarises the stored task, round and assignment records;
* :mod:`fedcompute.monitoring.plots` draws both with matplotlib (Agg) and dumps tables;
* ``static/`` holds the dashboard page served by ``functions/dashboard``.
"""
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
