"""Parity with the official PyTorch DeRIS, for the command and the tests (not used by training).

check.py: load a fixture, build and convert the model, run it with taps, compare tensors.
fixture_losses.py: the fixture's recorded loss pass (targets, points, matches) as our losses take it.
__main__.py: `python -m deris_jax.parity FIXTURE_DIR`.
"""
