"""DeRIS-L on gRefCOCO (Swin-B (384) + BEiT3-large; docs/design.md §1), a released name.

An alias of `configs/deris.py:variant=l,data=grefcoco` (the family file holds the recipe).
Usage: `--config configs/deris_l_grefcoco.py`.
"""
from configs import deris


def get_config(arg=None):
  return deris.released("l", "grefcoco", arg)
