"""HTTP routers: proofs (jobs), check (one verification), health (liveness, readiness, metrics)."""
