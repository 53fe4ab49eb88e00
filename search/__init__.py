"""Proof search over a proof environment: best-first and pass@N sampling, budgets, ensembles.

A leaf package: it imports nothing from `training`, `prover` or `service`.

Entry point: `search.api.search`. Modules: `types` (contracts), `budget`, `result`,
`tactic_filter` (the one forbidden-tactic filter), `runtime` (budget checks, counters),
`proposer` (generator calls, mixtures), `engine` (shared stepping/verification rules),
`best_first`, `sampling`, `ensemble` (union, mixture), `api`.
"""
