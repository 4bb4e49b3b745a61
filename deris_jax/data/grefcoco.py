"""TFDS builder `grefcoco`: gRefCOCO (0, 1 or several targets per expression; docs/design.md §8).

Configs: `deris` reads the DeRIS file, `refer` the original gRefCOCO files; both give the same
examples. Splits `train`, `val`, `testA`, `testB`, one entry per sentence.
"""
from deris_jax.data.tf_modules import tfds

from deris_jax.data import deris_format
from deris_jax.data import refer_format
from deris_jax.data import referring_builder

_READERS = {"deris": deris_format.read_grefcoco, "refer": refer_format.read_grefcoco}


class Grefcoco(referring_builder.ReferringBuilder):
  """gRefCOCO (generalized referring expressions, with no-target expressions)."""

  DESCRIPTION = __doc__
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="deris", description="from the DeRIS JSON annotations"),
      tfds.core.BuilderConfig(name="refer", description="from grefs(unc).json + instances.json"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Config `deris` (the files of the official DeRIS README, HF dataset `Dmmm997/DeRIS_Data`, and
  COCO train2014 from cocodataset.org):
    <manual_dir>/annotations/grefs/instances.json   (the README's spelling instance.json works)
    <manual_dir>/images/mscoco/train2014/COCO_train2014_000000000009.jpg ...

  Config `refer` (the gRefCOCO release of github henghuiding/gRefCOCO; same images):
    <manual_dir>/grefcoco/grefs(unc).json
    <manual_dir>/grefcoco/instances.json
    <manual_dir>/images/mscoco/train2014/COCO_train2014_000000000009.jpg ...
  """

  def read_splits(self, manual_dir, report):
    return _READERS[self.builder_config.name](manual_dir, report)
