"""Converts official PyTorch checkpoints to deris-jax Orbax checkpoints (torch is not needed).

  # a released DeRIS checkpoint, for eval / predict / fine-tuning
  python convert.py deris --checkpoint DeRIS-B-refcoco.pth --config configs/deris_b_refcoco.py \
      --out ckpt/deris_b_refcoco
  # the paper's initial weights, for `train.py --init_from` (docs/pretrained.md lists the files)
  python convert.py pretrained --mask2former model_final_1e7f22.pkl \
      --beit3 beit3_base_patch16_224.zip --config configs/deris_b_refcoco.py --out ckpt/init_b

Every file is first checked key by key and shape by shape against the model built from the
config (before any weight is read), then converted and written with its metadata (source
files, sha256, report). Any unknown key, missing key or shape mismatch stops with an error that
names the file, the key and both shapes. `--config.a.b=VALUE` overrides a config field
(deris_jax/cli.py), e.g. `--config.model.compat_group_size=1`; the written checkpoint stores
the config, so eval.py, predict.py and demo.py need only `--checkpoint`.
"""
import argparse
import pathlib
import sys
import time

from flax import nnx

from deris_jax import checkpoints, cli
from deris_jax.convert import deris_checkpoint, pretrained, readers, torch_to_nnx
from deris_jax.models.deris import abstract_model


def convert_deris(args, config) -> int:
  src = pathlib.Path(args.checkpoint)
  t0 = time.time()
  shapes = {k: shape for k, (shape, _) in readers.read_checkpoint_shapes(src).items()}
  deris_checkpoint.plan_for_model(abstract_model(config.model),
                                  deris_checkpoint.deris_keys.strip_module_prefix(shapes),
                                  source=src.name)  # fails fast, before reading weights
  params, plan = deris_checkpoint.convert_state_dict(readers.read_checkpoint(src), config.model,
                                                     source=src.name)
  digest = readers.sha256(src)
  out = checkpoints.save_params(
      args.out, params,
      metadata={"kind": "converted", "source": str(src), "sha256": digest,
                "loaded": len(plan.assignments), "dropped": plan.dropped,
                "config": config.to_dict()})
  print(f"{src.name} (sha256 {digest})")
  print(deris_checkpoint.report(plan))
  print(f"wrote {out} in {time.time() - t0:.1f}s")
  return 0


def convert_pretrained(args, config) -> int:
  t0 = time.time()
  files = {pretrained.MASK2FORMER: pathlib.Path(args.mask2former),
           pretrained.BEIT3: pathlib.Path(args.beit3)}
  names = {role: path.name for role, path in files.items()}
  model_shapes = torch_to_nnx.flat_shapes(nnx.state(abstract_model(config.model), nnx.Param))
  pretrained.plan_pretrained(  # fails fast, before reading weights or initialising
      config.model, model_shapes,
      {role: pretrained.read_shapes(path) for role, path in files.items()}, names)
  digests = {role: readers.sha256(path) for role, path in files.items()}
  arrays = {role: pretrained.read_arrays(path) for role, path in files.items()}
  params, plan = pretrained.convert(config.model, arrays, seed=args.seed, names=names)
  del arrays
  sources = {role: {"path": str(path), "sha256": digests[role],
                    "keys": plan.sources[role].num_keys} for role, path in files.items()}
  out = checkpoints.save_params(
      args.out, params,
      metadata={"kind": "pretrained", "sources": sources, "seed": args.seed,
                "config": config.to_dict(), **pretrained.metadata(plan)})
  for role, path in files.items():
    print(f"--{role} {path.name}: sha256 {digests[role]}, {plan.sources[role].num_keys} keys")
  print(pretrained.report(plan, seed=args.seed))
  print(f"wrote {out} in {time.time() - t0:.1f}s")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("deris", help="an official DeRIS checkpoint (.pth / .safetensors)")
  p.add_argument("--checkpoint", required=True, help="DeRIS-{B,L}-{refcoco,grefcoco}.pth")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  cli.add_arguments(p)  # --config of the same variant, e.g. configs/deris.py:variant=b,...
  p.set_defaults(run=convert_deris)
  p = sub.add_parser("pretrained", help="the paper's initial weights: Mask2Former .pkl + BEiT-3")
  p.add_argument("--mask2former", required=True,
                 help="Mask2Former COCO-instance Swin checkpoint, e.g. model_final_1e7f22.pkl")
  p.add_argument("--beit3", required=True,
                 help="BEiT-3 pretrained checkpoint, e.g. beit3_base_patch16_224.zip (or .pth)")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--seed", type=int, default=0,
                 help="build_model seed of the parameters no file provides")
  cli.add_arguments(p)
  p.set_defaults(run=convert_pretrained)
  args, overrides = cli.parse(parser, argv)
  try:
    return args.run(args, cli.load(args.config, overrides))
  except (checkpoints.CheckpointError, torch_to_nnx.ConversionError, FileNotFoundError,
          KeyError, TypeError, ValueError) as e:  # ValueError: the config and its overrides
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
