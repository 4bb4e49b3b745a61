"""`python -m deris_jax.data.prepare`: prepare a dataset and print what each split holds.

Per split: entries (examples), images and the largest number of referred instances of one
expression (compare it with the config's data.max_instances and model.num_queries). Then
any warning: JPEGs with an EXIF orientation, training images that also appear in an
evaluation split.

  python -m deris_jax.data.prepare --dataset synthetic --data_dir ~/tensorflow_datasets
  python -m deris_jax.data.prepare --dataset refcoco_mixed --format deris \\
      --manual_dir /data/seqtr_type --data_dir ~/tensorflow_datasets
  python -m deris_jax.data.prepare --dataset grefcoco --format refer --manual_dir /data/refer \\
      --data_dir ~/tensorflow_datasets [--skip_invalid]
  python -m deris_jax.data.prepare --config configs/deris_b_grefcoco.py --manual_dir /data/deris
      # the dataset, format and data_dir the config reads (--config.data.x=VALUE overrides)
"""
import argparse
import os
import sys

from deris_jax import cli
from deris_jax.data import entries as E
from deris_jax.data import locations
from deris_jax.data import referring_builder
from deris_jax.data import registry
from deris_jax.data.tf_modules import tfds  # quiet until the arguments say otherwise

# --dataset value -> (builder name, builder configs allowed, default config)
DATASETS = {
    "refcoco_mixed": ("refcoco_mixed", ("deris", "refer"), "deris"),
    "grefcoco": ("grefcoco", ("deris", "refer"), "deris"),
    "synthetic": ("deris_synthetic", ("shapes64", "tiny"), "shapes64"),
}


def prepare(dataset: str, *, data_dir: str | None, manual_dir: str | None = None,
            config: str | None = None, skip_invalid: bool = False) -> dict[str, int]:
  """Prepares `dataset` (idempotent) and returns {split: number of examples (expressions)}."""
  name, configs, default = DATASETS[dataset]
  config = config or default
  if config not in configs:
    raise ValueError(f"--format {config!r} is not valid for {dataset}; use one of "
                     f"{configs}")
  builder_cls = registry.builder_class(name)
  if builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS and not manual_dir:
    raise ValueError(f"{dataset} needs --manual_dir:{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if manual_dir and not os.path.isdir(manual_dir):
    raise E.DataError(f"missing folder {manual_dir} (--manual_dir)")
  builder = builder_cls(config=config, data_dir=locations.data_dir(data_dir),
                        skip_invalid=skip_invalid)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if not cli.verbose():  # tqdm bars print escape codes when the output is not a terminal
    tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=download_config)
  splits = builder.info.metadata["splits"]
  return {split: len(splits[split]["rows"]["image_id"])
          for split in builder.info.metadata["split_names"]}


def summary_lines(dataset: str, *, data_dir: str | None, config: str | None = None
                  ) -> list[str]:
  """What `main` prints about a prepared dataset: one line per split, then the warnings."""
  name, _, default = DATASETS[dataset]
  metadata = registry.open_builder(name, config or default, data_dir).info.metadata
  lines = []
  for split in metadata["split_names"]:
    index = metadata["splits"][split]
    lines.append(f"{split}: {len(index['rows']['image_id'])} examples, "
                 f"{len(index['images']['image_id'])} images, up to {index['max_targets']} "
                 "referred instances per expression")
  return lines + referring_builder.preparation_notes(
      metadata["splits"], metadata.get("train_images_in_eval_splits", {}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                      help="the dataset (default: the one --config reads)")
  parser.add_argument("--format", default=None,
                      help="deris|refer for the COCO sets (default deris); shapes64|tiny for "
                      "the synthetic set (default shapes64; with --config: its "
                      "data.builder_config)")
  parser.add_argument("--manual_dir", default=None, help="folder with the downloaded files")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: --config's "
                      "data.data_dir, else $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--skip_invalid", action="store_true",
                      help="skip unreadable images, bad masks, ids or empty expressions instead "
                      "of stopping; the counts and reasons are printed")
  cli.add_arguments(parser, config="optional")  # the dataset a config reads, and --verbosity
  args, overrides = cli.parse(parser, argv)
  try:
    dataset, data_format, data_dir = args.dataset, args.format, args.data_dir
    if args.config is not None:
      data = cli.load(args.config, overrides).data
      by_builder = {name: key for key, (name, _, _) in DATASETS.items()}
      if data.name not in by_builder:
        raise ValueError(f"{args.config}: data.name {data.name!r} is not a dataset prepare "
                         f"knows ({sorted(by_builder)})")
      dataset = dataset or by_builder[data.name]
      data_format = data_format or data.builder_config
      data_dir = data_dir or data.get("data_dir")
    if dataset is None:
      parser.error("give --dataset (or --config, whose data section names it)")
    prepare(dataset, data_dir=data_dir, manual_dir=args.manual_dir, config=data_format,
            skip_invalid=args.skip_invalid)
  except (E.DataError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for line in summary_lines(dataset, data_dir=data_dir, config=data_format):
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
