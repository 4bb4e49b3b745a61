"""`python -m deris_jax.parity FIXTURE_DIR [--only REGEX]`: deris-jax against the official numbers.

The model is built from the fixture's own config.json; `--config.model.a.b=VALUE` overrides a
field of it (deris_jax/cli.py), e.g. to check a switch such as `model.remat` against the same
numbers.

Prints one line per tensor of the fixture's outputs.npz that deris-jax produces (name, shape,
max abs error, max rel error, verdict), one line per tensor it does not produce (with the
reason), then a final verdict. Exit status 1 if any tensor fails (`check.py` has the tolerances).
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import sys

import ml_collections

from deris_jax import cli, config_loader
from deris_jax.parity import check


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("fixture_dir")
  parser.add_argument("--only", help="regex: compare only matching tensor names")
  cli.add_arguments(parser, config="overrides")  # of the fixture's own config
  args, overrides = cli.parse(parser, argv)
  try:
    fixture = check.load_fixture(args.fixture_dir)
    config = ml_collections.ConfigDict({"model": fixture.model_config.to_dict()})
    for item in overrides:
      config_loader.apply_override(config, item)
  except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  comparisons, skipped = check.run_parity(fixture, args.only, config.model)
  width = max([len(c.name) for c in comparisons] + [20])
  print(f"{'tensor':<{width}}  {'shape':<22} {'max_abs':>10} {'max_rel':>10}  verdict")
  for c in comparisons:
    verdict = "pass" if c.passed else "FAIL"
    note = f"  ({c.note})" if c.note else ""
    print(f"{c.name:<{width}}  {str(c.shape):<22} {c.max_abs:10.3e} {c.max_rel:10.3e}  "
          f"{verdict}{note}")
  failed = [c.name for c in comparisons if not c.passed]
  for name in skipped:
    print(f"{name:<{width}}  not produced: {check.not_produced_reason(name)}")
  worst = max((c.max_abs for c in comparisons if c.is_float), default=0.0)
  print(f"\n{len(comparisons)} tensors compared, {len(comparisons) - len(failed)} passed, "
        f"{len(failed)} failed, {len(skipped)} not produced; tolerance atol {check.ATOL} + "
        f"rtol {check.RTOL} (boxes {check.BOX_ATOL} px), worst float max_abs {worst:.3e}")
  print("PARITY: PASS" if not failed and comparisons else "PARITY: FAIL")
  return 0 if not failed and comparisons else 1


if __name__ == "__main__":
  sys.exit(main())
