"""Conversion of official PyTorch checkpoints to deris-jax parameters, without torch."""
