"""A plan executed: planning a config, the runtime that dispatches a graph's calls to the
plan's workers, one step of a graph."""
