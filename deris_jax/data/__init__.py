"""Data: TFDS builders (RefCOCO/+/g, gRefCOCO, synthetic), the tf.data pipeline, tokenizer, NSC.

Importing this package imports nothing heavy; TensorFlow is only imported by the modules that
need it (builders, pipeline), and only inside this package, through `tf_modules` (one quiet
import).

  entries, deris_format, refer_format   annotation files -> validated entries
  masks                                 COCO polygons / RLE, decoded by pycocotools
  referring_builder, refcoco, grefcoco, synthetic, registry   the TFDS builders
  text, tokenizer, nsc                  expression cleaning, XLM-R ids, NSC
  locations                             the data directory, prepared metadata (no TF)
  order                                 which rows each batch holds (sampler, file order; numpy)
  pipeline_ops, pipeline                tf.data: `pipeline.make_pipeline` (the batch contract)
  prepare                               `python -m deris_jax.data.prepare`
  tf_modules                            TensorFlow and TFDS, imported quietly
"""
