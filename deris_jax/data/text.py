"""Expression text cleaning, exactly as the official `loading.py::clean_string`.

docs/design.md §8.
"""
import re

_DROPPED = re.compile(r"[.,'!?\"()*#:;]")


def clean_expression(text: str) -> str:
  """Lowercase, drop .,'!?"()*#:; and turn '-' and '/' into spaces (spaces are not collapsed)."""
  return _DROPPED.sub("", text.lower()).replace("-", " ").replace("/", " ")


def is_empty_expression(text: str) -> bool:
  """True when nothing but whitespace is left after cleaning (no token could come out)."""
  return not clean_expression(text).strip()
