"""Relay Hydra configuration tree (YAML files only override the dataclass schema)."""
