"""Flax NNX modules of DeRIS: perception (Swin + pixel decoder), cognition (BEiT-3), loopback."""
