"""XLA_FLAGS for the commands tests start: conftest's flags with another fake device count."""
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(count: int, xla_flags: str = None) -> str:
  """`xla_flags` (default: this process's $XLA_FLAGS, i.e. conftest's: 8 devices, LLVM level
  0) with `count` fake CPU devices instead."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])
