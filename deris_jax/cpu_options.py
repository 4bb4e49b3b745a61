"""XLA:CPU compile options of deris_jax's large programs (the train step and the inference forward).

On the CPU, XLA hands dots and their neighbours to YNNPACK ("library fusions", on by default in
jax 0.10). For DeRIS programs that costs more than it gives (2 cores, jax 0.10.2, measured in
BENCHMARKS.md "XLA:CPU library fusions"): the default job's train step runs ~10% faster
without them and compiles in the same time, and an executable read back from the persistent
compilation cache loads in half the time (XLA rebuilds each YNNPACK thunk by searching the whole
HLO module, so loading grows with thunks x instructions) and runs its first call without
building YNNPACK runtimes. So our programs compile with them off, on the CPU only.

`DERIS_JAX_CPU_LIBRARY_FUSIONS=on` keeps XLA's default (e.g. to compare on another CPU).
Other backends get no options.
"""
import os
from typing import Dict, Optional

import jax

ENV = "DERIS_JAX_CPU_LIBRARY_FUSIONS"
# An empty list of YNNPACK fusion types: none (a DebugOptions field, set per program).
OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def library_fusions_on() -> bool:
  """Whether $DERIS_JAX_CPU_LIBRARY_FUSIONS asks for XLA's default."""
  value = os.environ.get(ENV, "off").strip().lower()
  if value not in ("on", "off", "1", "0", "true", "false", ""):
    raise ValueError(f"${ENV}={value!r}: expected 'on' or 'off'")
  return value in ("on", "1", "true")


def compiler_options(platform: Optional[str] = None) -> Optional[Dict[str, str]]:
  """The `compiler_options` for jax.jit of a large program that runs on `platform` (default:
  jax's default backend): None off the CPU (or when the library fusions are asked for), else
  the options above. Call it when building the jitted function (the default initialises the
  backend), not at import."""
  if (platform or jax.default_backend()) != "cpu" or library_fusions_on():
    return None
  return dict(OFF)
