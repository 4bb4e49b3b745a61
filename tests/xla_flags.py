"""XLA_FLAGS for the commands tests start: conftest's flags with another fake device count."""
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(count: int) -> str:
  """This process's $XLA_FLAGS (conftest's: 8 devices, LLVM level 0) with `count` fake CPU
  devices instead."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])
