"""TFDS builder `refcoco_mixed`: RefCOCO/+/g as DeRIS trains and evaluates (docs/design.md §8).

Configs: `deris` reads the DeRIS files, `refer` the original REFER files; both give the same
examples. Splits: `train` (RefCOCO + RefCOCO+ + RefCOCOg-umd train, mixed, one entry per ref
with all its sentences) and the evaluation splits `val_refcoco_unc`, `testA_refcoco_unc`,
`testB_refcoco_unc`, `val_refcocoplus_unc`, `testA_refcocoplus_unc`, `testB_refcocoplus_unc`,
`val_refcocog_umd`, `test_refcocog_umd` (one entry per sentence).
"""
from deris_jax.data.tf_modules import tfds

from deris_jax.data import deris_format
from deris_jax.data import refer_format
from deris_jax.data import referring_builder

_READERS = {"deris": deris_format.read_refcoco_mixed, "refer": refer_format.read_refcoco_mixed}


class RefcocoMixed(referring_builder.ReferringBuilder):
  """RefCOCO, RefCOCO+ and RefCOCOg (umd) with the DeRIS split names."""

  DESCRIPTION = __doc__
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="deris", description="from the DeRIS JSON annotations"),
      tfds.core.BuilderConfig(name="refer", description="from the REFER refs + COCO instances"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Config `deris` (the files of the official DeRIS README, HF dataset `Dmmm997/DeRIS_Data`, and
  COCO train2014 from cocodataset.org):
    <manual_dir>/annotations/mixed-seg/instances_nogoogle_withid.json
    <manual_dir>/images/mscoco/train2014/COCO_train2014_000000000009.jpg ...
  Use `instances_nogoogle_withid.json`, not `instances_nogoogle.json`: the latter has no
  annotation `id`, which silently zeroes the official mask loss (DeRIS issue #6).

  Config `refer` (the REFER files of github lichengunc/refer: refcoco.zip, refcoco+.zip,
  refcocog.zip, unzipped; same images):
    <manual_dir>/refcoco/refs(unc).p    <manual_dir>/refcoco/instances.json
    <manual_dir>/refcoco+/refs(unc).p   <manual_dir>/refcoco+/instances.json
    <manual_dir>/refcocog/refs(umd).p   <manual_dir>/refcocog/instances.json
    <manual_dir>/images/mscoco/train2014/COCO_train2014_000000000009.jpg ...
  """

  def read_splits(self, manual_dir, report):
    return _READERS[self.builder_config.name](manual_dir, report)
