"""Batch evaluation: the paper's Table-2 workflow as a resumable, distributed job.

- `records`: one JSON line per theorem per ensemble member and one for the ensemble.
- `rundir`: the run directory (config, append-only results, crash repair, resume).
- `summary`, `report`: pass rates recomputed from the results file (errors apart from
  failures, the compute per row, pass@n), the Table-2 and Table-4 Markdown and the plots.
- `batching`: a generator proxy that merges concurrent `propose` calls into one.
- `worker`: proves one theorem (every member, then the ensemble record).
- `local_backend`, `ray_backend`: run workers in threads or as Ray actors, with retries.
- `runner`: ties it together (`run_eval`); `prover/cli/evaluate.py` is the command line.
"""
