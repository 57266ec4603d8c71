"""Deployment helpers: packaging the Cloud Functions for Google Cloud (see ``infra/``).

No TensorFlow and no cloud client here: packaging is file copying and lock-file reading.
"""
