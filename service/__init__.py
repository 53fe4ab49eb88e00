"""The HTTP API (FastAPI): submit theorems, get verified proofs. Nothing imports `service`.

Modules, one concept each:
- `config`: the service configuration (YAML/TOML), every limit with its unit.
- `schemas`: request/response models (the OpenAPI schema at /docs).
- `requests`: untrusted request → normalised job request, or 422 naming the problem.
- `backend`: the one place that calls `prover` (backend choice, theorem lookup, running a job).
- `store`: the durable SQLite (WAL) job store (bounded connections, retention purge).
- `auth`: hashed API keys, scopes, per-key limits, the key file and its revocation list.
- `results`: what a finished job tells its user (`proof_text`, axioms, failure reason).
- `workers` / `worker_process`: supervisor threads and the worker processes that search.
- `events`: progress fan-out to server-sent-event streams.
- `metrics`: Prometheus metrics.
- `routers/`: the HTTP routes; `app`: `create_app(config)` and uvicorn's factory.
- `manage`: `python -m service.manage keys list|add|revoke|rotate` (what `dco-prover keys` and
  `dco-prover serve --add-key` run).
"""
