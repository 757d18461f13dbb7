"""Relay execution planner: graph + cluster -> execution plan (pure Python)."""
