"""Proof search over a proof environment: best-first and pass@N sampling, budgets, ensembles.

A leaf package: it imports nothing from `training`, `prover` or `service`.
"""
