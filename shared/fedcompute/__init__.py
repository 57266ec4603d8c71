"""fedcompute: serverless Federated Compute with central DP."""
__version__ = "0.1.0"
