"""Relay orchestration: Ray controller, model workers, engines, checkpoints."""
