"""The `data` config sections: RefCOCO/+/g (mixed), gRefCOCO, and the synthetic default.

Values mirror docs/design.md; the comment on each names its section. Consumed
by `deris_jax.data.pipeline.make_pipeline(config.data, split, ...)`.
"""
import ml_collections as mlc

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # §8 Normalize, RGB 0-255, both branches
IMAGENET_STD = (58.395, 57.12, 57.375)  # §8

REFCOCO_EVAL_SPLITS = (  # §8 annotation files: the nine DeRIS splits minus train
    "val_refcoco_unc", "testA_refcoco_unc", "testB_refcoco_unc",
    "val_refcocoplus_unc", "testA_refcocoplus_unc", "testB_refcocoplus_unc",
    "val_refcocog_umd", "test_refcocog_umd",
)
GREFCOCO_EVAL_SPLITS = ("val", "testA", "testB")  # §8


def _nsc(enabled: bool) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      enabled=enabled,  # §7: gRefCOCO train pipelines only (turn_hard_negative.enable)
      rate=0.15,  # §7 turn_hard_negative.rate
      threshold=0.6,  # §7 simlarity_threshold on (Jaccard + cosine) / 2, characters
      max_tries=50,  # §7 (the official loop tests up to 51 candidates)
      min_words=0,  # §7 min_text_length: 0 disables the word-count filter
  ))


def _common(**overrides) -> mlc.ConfigDict:
  config = mlc.ConfigDict(dict(
      name="",  # TFDS builder: refcoco_mixed | grefcoco | deris_synthetic
      builder_config="deris",  # deris | refer (same examples); synthetic: shapes64 | tiny
      data_dir=mlc.config_dict.placeholder(str),  # TFDS data dir; None = $TFDS_DATA_DIR or
                                                  # ~/tensorflow_datasets (str when set)
      train_split="train",
      eval_splits=(),
      image_size=(384, 384),  # §2/§8 HierResize img_scale (perception, Swin)
      cognition_image_size=(224, 224),  # §3/§8 HierResize mini_img_scale (BEiT-3)
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      max_tokens=20,  # §8 max_token: 20 RefCOCO, 50 gRefCOCO
      tokenizer_path="pretrain_weights/beit3.spm",  # §8: XLM-R sentencepiece of BEiT-3
      max_instances=1,  # static K of gt_masks; an error names the split if it is too small
      canvas_size=(640, 640),  # eval: original-resolution GT canvas; COCO images are <= 640
      batch_size=64,  # global train batch = official samples_per_gpu x official_world_size
      # The official GPU count the global batch stands for (the DeRIS README trains on 4; the
      # official configs do not say). The sampler cuts each global batch into this many
      # aspect-homogeneous per-GPU batches (deris_jax.data.order), as mmdet's
      # DistributedGroupSampler does; loss.normalizer='official' uses the same groups.
      official_world_size=1,
      eval_batch_size=16,  # global eval batch; §8 samples_per_gpu 16 (RefCOCO)
      nsc=_nsc(False),
      num_parallel_calls=-1,  # -1 = tf.data.AUTOTUNE (min(16, cores) unless autotune)
      prefetch=2,  # batches
      # tf.data autotuning (its model thread). Off: with TF 2.21 deleting a live iterator
      # (the end of a run, often mid-epoch) waited up to that thread's optimisation period,
      # ~30 s in most runs (BENCHMARKS.md); on 2 cores it tuned nothing faster.
      autotune=False,
  ))
  config.update(overrides)
  return config


def refcoco_data() -> mlc.ConfigDict:
  """RefCOCO/+/g: mixed training set, eight evaluation splits (§8)."""
  return _common(
      name="refcoco_mixed",
      eval_splits=REFCOCO_EVAL_SPLITS,
      max_tokens=20,  # §8
      max_instances=1,  # §8: one referred annotation per RefCOCO entry
      batch_size=64,  # §9: 16 per GPU x 4 GPUs (official_world_size)
      official_world_size=4,
      eval_batch_size=16,  # §8/§4: eval batch 16 (query_SA groups of 16 in the model)
  )


def grefcoco_data() -> mlc.ConfigDict:
  """gRefCOCO: 0, 1 or several targets; NSC on the training split (§7, §8)."""
  return _common(
      name="grefcoco",
      eval_splits=GREFCOCO_EVAL_SPLITS,
      max_tokens=50,  # §8
      max_instances=32,  # gRefCOCO multi-target expressions; preparation records the max
      batch_size=4,  # §9: 1 per GPU x 4 GPUs (official_world_size; 4 in multi_act.sh)
      official_world_size=4,
      eval_batch_size=16,  # §8 used 1 per GPU; the model's compat_group_size=1 keeps samples
                           # independent, so a larger eval batch gives the same numbers
      nsc=_nsc(True),  # §7: gRefCOCO train only
  )


def synthetic_data(variant: str = "shapes64") -> mlc.ConfigDict:
  """The embedded default: coloured shapes, no download, tokenizer stored with the data."""
  size = 32 if variant == "tiny" else 64
  return _common(
      name="deris_synthetic",
      builder_config=variant,  # shapes64 (default) | tiny (tests)
      eval_splits=("val", "test"),
      image_size=(size, size),  # small perception input (Swin patch 4 x 8 = 32 divides it)
      cognition_image_size=(size, size),  # BEiT-3 patch 16 divides it
      max_tokens=12,  # synthetic expressions are <= 5 words
      # None: the sentencepiece model stored in the dataset metadata (str when set)
      tokenizer_path=mlc.config_dict.placeholder(str),
      max_instances=4,  # = the builder's max_objects
      canvas_size=(size, size),
      batch_size=16,
      eval_batch_size=16,
      nsc=_nsc(False),  # the synthetic set has its own no-target expressions
  )
