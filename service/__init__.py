"""The HTTP API (FastAPI): submit theorems, get verified proofs. Nothing imports `service`."""
