"""Train the tiny model under DeepSpeed, one run per argument, in this process (group).

Run by tests/test_training_deepspeed.py, as one process (`python tests/deepspeed_train.py`)
or under `accelerate launch --num_processes 2`. Arguments: OUTPUT_DIR then runs as
`STAGE:PRECISION` (PRECISION `fp32` or `bf16`), e.g. `out 2:fp32 3:fp32`. Prints, per run
and process, one JSON line `{"run", "rank", "world_size", "steps", "records", "precision"}`
where `records` are the run's `metrics.jsonl` records (main process), and at exit one line
`{"process_group_at_exit": bool}`.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_training_trainer import tiny_config  # noqa: E402
from training.config import CONFIG_DIR  # noqa: E402
from training.trainer import train  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # One result file per process: lines of two processes sharing a stdout pipe can
    # interleave (writes over PIPE_BUF bytes are not atomic).
    report = out / f"report-{os.environ.get('RANK', '0')}.jsonl"

    def emit(record: dict) -> None:
        with report.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # Registered first, so it runs last at exit: after the trainer's own exit handler.
    atexit.register(lambda: emit({"process_group_at_exit": torch.distributed.is_initialized()}))
    for run in sys.argv[2:]:
        stage, precision = run.split(":")
        config = tiny_config(out / run.replace(":", "-"), deepspeed=CONFIG_DIR / f"deepspeed_zero{stage}.json",
                             bf16=precision == "bf16", max_steps=2)
        result = train(config)
        rank = torch.distributed.get_rank()
        records = []
        if rank == 0:
            records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        emit({"run": run, "rank": rank, "world_size": torch.distributed.get_world_size(),
              "steps": result.steps, "records": records, "precision": result.final_metrics["precision"]})


if __name__ == "__main__":
    main()
