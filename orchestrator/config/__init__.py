"""The configuration: the Hydra schema (defaults once), composing it, and every rule."""
