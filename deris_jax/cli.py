"""One command-line convention for every entry point, and quiet output by default.

  --config PATH[:ARG]     an ml_collections config file and its argument, e.g.
                          configs/deris.py:variant=l,data=grefcoco
  --config.a.b=VALUE      an override of one field (also `--config.a.b VALUE`), the
                          `config_flags` way of big_vision and scenic; an override of a linked
                          value (model.image_size) moves its partner too
  --verbosity N           0 (default): only our own lines and real errors; 1: the libraries'
                          logs and warnings too (TensorFlow, TFDS, Orbax, JAX); 2: debug logs

train.py takes the same through absl's `config_flags` (same syntax, tests/test_cli.py parses
both); eval.py, predict.py, demo.py, convert.py, bench.py, `python -m deris_jax.data.prepare`
and `python -m deris_jax.parity` use argparse with `parse` below. Commands that read a
checkpoint (eval, predict, demo) take the config the checkpoint stores when `--config` is not
given (`load`).

Quiet means: absl / Python loggers at ERROR, third-party Python warnings off (ours stay),
TensorFlow's C++ logs off (TF_CPP_MIN_LOG_LEVEL, effective because TensorFlow is imported
after the arguments are parsed; a level the user exported is kept, told apart from the '1'
importing jax sets; the lines TensorFlow prints while it is imported, which that level does
not reach, are dropped by `deris_jax.data.tf_modules`), `deris_jax` loggers at
WARNING, and TFDS progress bars and its console prints off while a
dataset is prepared (`deris_jax.data.prepare` asks `verbose()`).
"""
import argparse
import gc
import logging
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import ml_collections
from absl import logging as absl_logging

from deris_jax import checkpoints, config_check, config_loader

PREFIX = "--config."
PREFIXES = (PREFIX, "-config.")  # absl flags take one dash too
# Loggers of the libraries we run (the root logger covers the rest).
LIBRARY_LOGGERS = ("", "absl", "tensorflow", "jax", "jax._src", "orbax", "tensorflow_datasets",
                   "httpx", "gradio")
_LEVELS = {0: logging.ERROR, 1: logging.INFO}
_verbosity = 0


def _user_tf_cpp_level() -> Optional[str]:
  """TF_CPP_MIN_LOG_LEVEL as the user exported it, or None. Importing jax sets it to '1' when
  it is unset (and every command imports jax before this module), so the process's initial
  environment is read where the system shows it (Linux); elsewhere a '1' next to an imported
  jax counts as jax's."""
  try:
    with open("/proc/self/environ", "rb") as f:
      initial = f.read().split(b"\0")
  except OSError:
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    return None if value == "1" and "jax" in sys.modules else value
  for item in initial:
    if item.startswith(b"TF_CPP_MIN_LOG_LEVEL="):
      return item.split(b"=", 1)[1].decode(errors="replace")
  return None


# TensorFlow's C++ log level as the user set it before we ran (theirs wins over --verbosity).
_USER_TF_CPP_LEVEL = _user_tf_cpp_level()


class UsageError(ValueError):
  """A malformed command line (the message says what to write instead)."""


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(the other arguments, ['a.b=VALUE', ...]) from `--config.a.b=VALUE` / `--config.a.b VALUE`
  (or `-config.a.b...`, as absl takes it). Arguments after `--` are left as they are."""
  rest, overrides = [], []
  position = 0
  while position < len(argv):
    arg = argv[position]
    if arg == "--":  # the end of the options: the rest is positional
      rest.extend(argv[position:])
      break
    prefix = next((p for p in PREFIXES if arg.startswith(p)), None)
    if prefix is not None:
      body = arg[len(prefix):]
      if "=" not in body:
        if position + 1 >= len(argv):
          raise UsageError(f"{arg} needs a value: {arg}=VALUE")
        position += 1
        body = f"{body}={argv[position]}"
      if not body.partition("=")[0]:
        raise UsageError(f"{arg}: no field name after --config.")
      overrides.append(body)
    elif arg == "--override" or arg.startswith("--override="):
      raise UsageError("--override is gone: override a config field with --config.a.b=VALUE")
    else:
      rest.append(arg)
    position += 1
  return rest, overrides


def add_arguments(parser: argparse.ArgumentParser, *, config: Optional[str] = "required"
                  ) -> None:
  """--verbosity, and the config: `config` is 'required' or 'optional' (--config PATH[:ARG]
  and overrides), 'overrides' (the config comes from elsewhere, e.g. the parity fixture; only
  --config.a.b=VALUE), or None (no config: overrides are an error)."""
  if config in ("required", "optional"):
    parser.add_argument(
        "--config", required=config == "required", default=None, metavar="PATH[:ARG]",
        help="ml_collections config file and argument, e.g. configs/deris.py:variant=b,"
             "data=refcoco; fields are overridden with --config.a.b=VALUE"
             + ("" if config == "required" else
                " (default: the config stored in the checkpoint)"))
  elif config is not None and config != "overrides":
    raise ValueError(f"config={config!r}: expected 'required', 'optional', 'overrides' or None")
  parser.set_defaults(takes_config_overrides=config is not None)
  parser.add_argument("--verbosity", type=int, default=0,
                      help="0: our lines and errors only (default); 1: libraries' logs too; "
                           "2: debug")


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
          ) -> Tuple[argparse.Namespace, List[str]]:
  """(arguments, overrides) of a command line; sets the verbosity before anything is logged."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = split_overrides(argv)
  except UsageError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  if overrides and not getattr(args, "takes_config_overrides", True):
    parser.error(f"{PREFIX}{overrides[0]}: this command takes no config")
  set_verbosity(args.verbosity)
  return args, overrides


def load(config: Optional[str], overrides: Sequence[str] = (), checkpoint=None,
         step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config file `config` (PATH[:ARG]) or, when it is None, the config stored in the
  checkpoint directory `checkpoint`; overrides applied, shared values checked."""
  if config is not None:
    return config_loader.load_config(config, overrides)
  if checkpoint is None:
    raise UsageError("give --config PATH[:ARG]")
  loaded = checkpoints.stored_config(checkpoint, step)
  for item in overrides:
    config_loader.apply_override(loaded, item)
  config_check.check_config(loaded)
  return loaded


def set_verbosity(level: int) -> None:
  """0: quiet (module docstring); 1: the libraries' info logs and warnings; 2: debug."""
  global _verbosity
  _verbosity = int(level)
  python_level = _LEVELS.get(_verbosity, logging.DEBUG)
  if "tensorflow" not in sys.modules and _USER_TF_CPP_LEVEL is None:  # read at TF's import
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3" if _verbosity <= 0 else "0"
  absl_logging.set_verbosity(python_level)
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(python_level)
  # Our own Python loggers keep their warnings when the root logger is quieted.
  logging.getLogger("deris_jax").setLevel(min(python_level, logging.WARNING))
  warnings.resetwarnings()
  if _verbosity <= 0:
    warnings.filterwarnings("ignore")  # the libraries' deprecations and notices
    warnings.filterwarnings("default", module=r"(deris_jax|configs)(\.|$)|__main__$")  # ours


YOUNG_GC_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)


def tune_gc() -> None:
  """Python's garbage collector for a command that traces large programs: every object alive
  now (the modules imported: JAX, Flax, absl, ...) moves into the permanent generation, where
  full collections no longer walk it, and young collections run every 10,000 allocations
  instead of 700, so tracing a train step (tens of thousands of equations) sets off far fewer
  full collections (each walks the whole heap; generations 1 and 2 keep Python's thresholds).
  Commands call it in their main guard, after their imports (not in `main()`, which tests
  call in-process). Measured on the default job, warm compilation cache, 2 cores, 3 runs each
  alternated (2026-12-04, BENCHMARKS.md): 13 -> 3 full collections, time in the collector
  3.7 -> 1.2 s, first step 12.0 -> 10.5 s, the run 27.4 -> 23.7 s (medians)."""
  gc.freeze()
  _, middle, old = gc.get_threshold()
  gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def user_tf_cpp_level() -> Optional[str]:
  """TF_CPP_MIN_LOG_LEVEL as the user exported it (None when they did not)."""
  return _USER_TF_CPP_LEVEL


def verbose() -> bool:
  """Whether the libraries may print (verbosity >= 1)."""
  return _verbosity > 0
