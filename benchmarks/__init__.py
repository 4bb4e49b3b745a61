"""Benchmarks behind `bench.py` (they are not tests and not part of the deris_jax package).

data_pipeline.py: tf.data examples/s of the training input (`python bench.py --mode data`).
compile_time.py: compile time of the training programs, repeated stacks looped vs scanned.
kernels.py: a compiled program's fused computations and the distinct ones among them.
"""
