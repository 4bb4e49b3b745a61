"""DeRIS-B on gRefCOCO (Swin-S + BEiT3-base; docs/design.md §1), a released name.

An alias of `configs/deris.py:variant=b,data=grefcoco` (the family file holds the recipe).
Usage: `--config configs/deris_b_grefcoco.py`.
"""
from configs import deris


def get_config(arg=None):
  return deris.released("b", "grefcoco", arg)
