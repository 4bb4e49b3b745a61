"""Converts official PyTorch checkpoints to deris-jax Orbax checkpoints (torch is not needed).

  python convert.py deris --checkpoint DeRIS-B-refcoco.pth --config configs/deris_b_refcoco.py \
      --out ckpt/deris_b_refcoco

The checkpoint is first checked key by key and shape by shape against the model built from
the config (before any weight is read), then converted and written with its metadata (source
file, sha256, report). Any unknown key, missing key or shape mismatch stops with an error that
names the key and both shapes.
"""
import argparse
import pathlib
import sys
import time

from deris_jax import checkpoint
from deris_jax.config_loader import load_config
from deris_jax.convert import deris_checkpoint, readers, torch_to_nnx


def convert_deris(args) -> int:
  config = load_config(args.config, args.override)
  src = pathlib.Path(args.checkpoint)
  t0 = time.time()
  from deris_jax.models.deris import abstract_model
  shapes = {k: shape for k, (shape, _) in readers.read_checkpoint_shapes(src).items()}
  deris_checkpoint.plan_for_model(abstract_model(config.model),
                                  deris_checkpoint.deris_keys.strip_module_prefix(shapes),
                                  source=src.name)  # fails fast, before reading weights
  params, plan = deris_checkpoint.convert_state_dict(readers.read_checkpoint(src), config.model,
                                                     source=src.name)
  digest = readers.sha256(src)
  out = checkpoint.save_params(
      args.out, params,
      metadata={"kind": "converted", "source": str(src), "sha256": digest,
                "loaded": len(plan.assignments), "dropped": plan.dropped,
                "config": config.to_dict()})
  print(f"{src.name} (sha256 {digest})")
  print(deris_checkpoint.report(plan))
  print(f"wrote {out} in {time.time() - t0:.1f}s")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("deris", help="an official DeRIS checkpoint (.pth / .safetensors)")
  p.add_argument("--checkpoint", required=True, help="DeRIS-{B,L}-{refcoco,grefcoco}.pth")
  p.add_argument("--config", required=True, help="configs/deris_*.py[:arg] of the same variant")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.compat_group_size=1")
  p.set_defaults(run=convert_deris)
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (readers.CheckpointError, torch_to_nnx.ConversionError, checkpoint.CheckpointError,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
