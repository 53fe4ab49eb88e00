"""Connects search to the world: Lean environments, tactic generators, evaluation, the CLI."""
