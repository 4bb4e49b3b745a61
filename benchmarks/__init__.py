"""Benchmarks behind `bench.py` (they are not tests and not part of the deris_jax package).

data_pipeline.py: tf.data examples/s of the training input (`python bench.py --mode data`).
"""
