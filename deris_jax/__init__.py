"""deris-jax: DeRIS (referring image segmentation) in JAX / Flax NNX."""

__version__ = "0.1.0"
