"""Relay command-line entry points."""
