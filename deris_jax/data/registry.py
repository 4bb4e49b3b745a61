"""Name -> TFDS builder class, and opening a prepared dataset with a clear error if it is not."""
from deris_jax.data.tf_modules import tfds

from deris_jax.data import grefcoco
from deris_jax.data import locations
from deris_jax.data import refcoco
from deris_jax.data import synthetic

BUILDERS = {
    "refcoco_mixed": refcoco.RefcocoMixed,
    "grefcoco": grefcoco.Grefcoco,
    "deris_synthetic": synthetic.DerisSynthetic,
}


def builder_class(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset '{name}' (config data.name); known: {sorted(BUILDERS)}")
  return BUILDERS[name]


def open_builder(name: str, config: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of a prepared dataset; raises FileNotFoundError saying how to prepare it."""
  data_dir = locations.data_dir(data_dir)
  builder = builder_class(name)(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {name}/{config} is not prepared under {data_dir} (config data.data_dir): run "
        f"python -m deris_jax.data.prepare --dataset {name} --format {config} "
        f"--data_dir {data_dir} [--manual_dir DIR]")
  return builder
