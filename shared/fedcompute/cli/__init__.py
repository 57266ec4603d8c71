"""The ``fedcompute`` command line."""
