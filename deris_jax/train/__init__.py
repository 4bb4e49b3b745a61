"""Training: optimizer and schedule, sharding, the jitted train step, checkpoints, the loop."""
