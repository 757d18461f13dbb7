"""Relay orchestration: config, data, models, engines, interfaces, workers, runtime and
the run, each a subpackage (docs/architecture.md)."""
