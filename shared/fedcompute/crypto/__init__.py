"""Cryptography of device uploads (light: the ``cryptography`` package only, no TensorFlow)."""
