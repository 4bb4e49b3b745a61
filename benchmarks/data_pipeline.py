"""`python bench.py --mode data`: input pipeline throughput, examples/s per core.

Two workloads, each prepared in a temporary folder:
- synthetic: the `shapes64` set at its own sizes (64x64 in and out);
- coco: COCO-sized JPEGs (640x480, ~q90), gRefCOCO-style DeRIS annotations with polygon masks,
  through the full-size pipeline (384x384 + 224x224, 50 tokens, K = max_instances, NSC on).
"Per core" runs tf.data on one thread (private threadpool of 1, no parallel calls); "all
cores" lets tf.data use every core, without and with tf.data's autotuning (`data.autotune`,
off by default). Prints examples/s for each.

  python bench.py --mode data [--images 48] [--expressions_per_image 8] [--batches 20]
"""
import argparse
import io
import itertools
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top
import PIL.Image  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from configs import data_common  # pylint: disable=g-import-not-at-top
from deris_jax.data import deris_format  # pylint: disable=g-import-not-at-top
from deris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from deris_jax.data import prepare  # pylint: disable=g-import-not-at-top
from deris_jax.data import tokenizer as tok  # pylint: disable=g-import-not-at-top

_WORDS = ("the man woman left right red blue shirt on of with near table dog cup two all "
          "people standing behind front white small big car").split()


def _natural_jpeg(rng, height=480, width=640) -> bytes:
  """Smooth colour fields plus fine noise: compresses like a photo (~100-200 kB at q90)."""
  coarse = rng.integers(0, 256, size=(height // 32, width // 32, 3)).astype(np.uint8)
  image = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC),
                     np.int64)
  image = np.clip(image + rng.integers(-20, 21, size=image.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="jpeg", quality=90)
  return buffer.getvalue()


def _polygon(rng, height, width):
  cx, cy = rng.uniform(60, width - 60), rng.uniform(60, height - 60)
  angles = np.sort(rng.uniform(0, 2 * np.pi, size=12))
  radii = rng.uniform(20, 55, size=12)
  return [float(v) for a, r in zip(angles, radii)
          for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def write_coco_like(manual_dir: str, num_images: int, expressions_per_image: int,
                    seed: int = 0) -> list[str]:
  """DeRIS gRefCOCO-format files over COCO-sized JPEGs; returns the expressions."""
  rng = np.random.default_rng(seed)
  images_dir = os.path.join(manual_dir, deris_format.IMAGES_DIR)
  os.makedirs(images_dir, exist_ok=True)
  splits = {s: [] for s in deris_format.GREFCOCO_SPLITS}
  texts = []
  for image_id in range(1, num_images + 1):
    with open(deris_format.coco_image_path(images_dir, image_id), "wb") as f:
      f.write(_natural_jpeg(rng))
    objects = [{"id": image_id * 100 + k, "segmentation": [_polygon(rng, 480, 640)],
                "empty": False} for k in range(4)]
    for _ in range(expressions_per_image):
      text = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9))))
      texts.append(text)
      count = int(rng.integers(0, 3))
      annotations = ([{"id": -1, "empty": True}] if count == 0 else
                     [objects[k] for k in rng.choice(4, size=count, replace=False)])
      entry = {"image_id": image_id, "height": 480, "width": 640, "expressions": {"raw": text},
               "annotations": annotations}
      for split in deris_format.GREFCOCO_SPLITS:
        if split == "train" or image_id == 1:
          splits[split].append(entry)
  path = os.path.join(manual_dir, "annotations", "grefs", "instances.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(splits, f)
  return texts


def _single_core(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return dataset.with_options(options)


def _batches(config, single_core: bool):
  """Training batches over consecutive epochs (each one sampler pass)."""
  for epoch in itertools.count():
    p = pipeline.make_pipeline(config, "train", train=True, batch_size=config.batch_size,
                               epoch=epoch, process_index=0, process_count=1)
    yield from (_single_core(p.dataset) if single_core else p.dataset)


def throughput(config, *, batches: int, single_core: bool, autotune: bool = False) -> float:
  """Training examples/s after two warm-up batches."""
  config = config.copy_and_resolve_references()
  config.autotune = autotune
  if single_core:
    config.num_parallel_calls = 1
  iterator = _batches(config, single_core)
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * config.batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=48, help="COCO-sized JPEGs to generate")
  parser.add_argument("--expressions_per_image", type=int, default=8,
                      help="gRefCOCO has ~14 per image, RefCOCO train ~7; 1 = worst case")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)
  tfds.disable_progress_bar()
  print(f"cores: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as root:
    prepare.prepare("synthetic", data_dir=os.path.join(root, "tfds"), config="shapes64")
    synthetic_config = data_common.synthetic_data()
    synthetic_config.data_dir = os.path.join(root, "tfds")
    synthetic_config.batch_size = args.batch_size
    manual = os.path.join(root, "coco")
    texts = write_coco_like(manual, args.images, args.expressions_per_image)
    prepare.prepare("grefcoco", data_dir=os.path.join(root, "tfds"), manual_dir=manual)
    spm_path = os.path.join(root, "bench.spm")
    with open(spm_path, "wb") as f:
      f.write(tok.train_sentencepiece(texts, 200))
    coco_config = data_common.grefcoco_data()
    coco_config.data_dir = os.path.join(root, "tfds")
    coco_config.tokenizer_path = spm_path
    coco_config.batch_size = args.batch_size
    for name, config in (("synthetic 64x64", synthetic_config),
                         (f"coco-sized JPEG 640x480 -> 384+224, "
                          f"{args.expressions_per_image} expr/image", coco_config)):
      one = throughput(config, batches=args.batches, single_core=True)
      every = throughput(config, batches=args.batches, single_core=False)
      tuned = throughput(config, batches=args.batches, single_core=False, autotune=True)
      print(f"{name}: {one:.1f} examples/s on 1 core, {every:.1f} examples/s on "
            f"{os.cpu_count()} cores ({tuned:.1f} with tf.data autotuning)")


if __name__ == "__main__":
  main()
