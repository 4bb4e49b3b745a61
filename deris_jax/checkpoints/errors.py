"""The one error of checkpoints: missing, unreadable, or not fitting the model.

Raised for Orbax checkpoint directories (`deris_jax.checkpoints`) and for the official
PyTorch / detectron2 files the converters read (`deris_jax.convert.readers`), so a command
catches one class.
"""


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model; the message names the
  file or directory and what is wrong."""
