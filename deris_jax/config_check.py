"""The values two config sections share, and the one check that they agree.

Some values are read by two sections: the model's input sizes and text length by the data
pipeline, the official GPU count by the sampler (data) and the loss, the eval batch and splits
by the data and eval sections. The configs hold each as one ml_collections FieldReference
(`link_shared` below), so one override (`model.image_size=...`) moves both;
`check_config` catches configs assembled another way (by hand, or with a reference replaced)
where the two differ. It runs once when a config loads (`config_loader.load_config`, train.py)
and where a config enters a library entry point (`evaluation.settings_from_config`, the dry
run). Sections a config lacks (the tiny config has no data) are not compared.
"""
from typing import Any, Tuple

import ml_collections

# (owner field, linked field, what would go wrong): `link_shared` points the linked field at
# the owner's FieldReference.
SHARED_FIELDS: Tuple[Tuple[str, str, str], ...] = (
    ("model.image_size", "data.image_size", "the model would see another input size"),
    ("model.cognition_image_size", "data.cognition_image_size",
     "the model would see another input size"),
    ("model.max_tokens", "data.max_tokens", "the model would see another text length"),
    ("data.official_world_size", "loss.official_world_size",
     "the sampler's per-GPU batches and the loss's per-GPU groups would differ"),
    ("data.eval_batch_size", "eval.batch_size", "evaluation reads eval.batch_size"),
    ("data.eval_splits", "eval.splits", "evaluation reads eval.splits"),
)


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Tuple[bool, Any]:
  """'model.image_size' -> (present, value); absent when a section or the field is missing."""
  section, field = dotted.split(".")
  if section not in config or field not in config[section]:
    return False, None
  return True, config[section][field]


def _comparable(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming both fields when two sections hold different shared values."""
  for owner, linked, consequence in SHARED_FIELDS:
    has_owner, owner_value = lookup(config, owner)
    has_linked, linked_value = lookup(config, linked)
    if has_owner and has_linked and _comparable(owner_value) != _comparable(linked_value):
      raise ValueError(f"config {linked} {_comparable(linked_value)} differs from {owner} "
                       f"{_comparable(owner_value)}: {consequence}")


def link_shared(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes every value two sections share (`SHARED_FIELDS`) one FieldReference.

  The linked field then follows the owner field whatever is overridden, so `model.image_size`
  and `data.image_size` cannot disagree. Both must hold the same value before (a ValueError
  naming both otherwise: nothing is silently dropped); pairs already linked are kept.
  """
  check_config(config)
  for owner, linked, _ in SHARED_FIELDS:
    if lookup(config, owner)[0] and lookup(config, linked)[0]:
      (owner_section, owner_field), (section, field) = owner.split("."), linked.split(".")
      ref = config[owner_section].get_ref(owner_field)
      # Only a plain field takes the reference itself (a reference field would chain to it,
      # or form a cycle if it is this one), so read the field without resolving it.
      current = dict(config[section].items(preserve_field_references=True))[field]
      if current is not ref:
        if isinstance(current, ml_collections.FieldReference):
          raise ValueError(f"config {linked} already holds a FieldReference of its own; "
                           f"build it as a plain value to link it to {owner}")
        config[section][field] = ref
  return config
