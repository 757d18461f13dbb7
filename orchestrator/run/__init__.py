"""A run from its folder to its summary: the stages, the RL loop, faults, checkpoints,
logging."""
