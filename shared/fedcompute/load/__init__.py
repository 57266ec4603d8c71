"""Load generation against a fedcompute server (``fedcompute load``); no TensorFlow."""
from fedcompute.load.harness import LoadConfig, peak_rss_mib, percentiles, round_stages, run_load

__all__ = ["LoadConfig", "peak_rss_mib", "percentiles", "round_stages", "run_load"]
