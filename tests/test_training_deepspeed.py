"""DeepSpeed ZeRO-2 and ZeRO-3 on the CPU: the bundled configs start, train the same steps
as the trainer without DeepSpeed (one process and two under `accelerate launch`), keep fp32
master weights in bf16 mode, and exit with the process group destroyed.

DeepSpeed runs here on its CPU accelerator over gloo; its shared-memory communication op
is JIT-built with g++ on first use (cached in ~/.cache/torch_extensions). Each launch runs
all its trainings in one process group to keep the suite fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_training_trainer import step_records, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "deepspeed_train.py"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="needs DeepSpeed: pip install -e '.[dev]' (DS_BUILD_OPS=0)"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="needs a C++ compiler: DeepSpeed JIT-builds its CPU communication op"),
]


def _launch(command: list[str], tmp_path: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = sorted((tmp_path / "out").glob("report-*.jsonl"))  # one per process (tests/deepspeed_train.py)
    return [json.loads(line) for report in reports for line in report.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The same two steps without DeepSpeed (this process, fp32)."""
    from training.trainer import train

    return step_records(train(tiny_config(tmp_path_factory.mktemp("plain"), max_steps=2)).metrics_path)


def _check(lines: list[dict], runs: list[str], world_size: int, reference: list[dict]) -> None:
    results = [line for line in lines if "run" in line]
    assert sorted((r["run"], r["rank"]) for r in results) == sorted((run, rank) for run in runs
                                                                      for rank in range(world_size))
    assert [line["process_group_at_exit"] for line in lines if "process_group_at_exit" in line] == [False] * world_size
    for result in (r for r in results if r["rank"] == 0):
        assert result["world_size"] == world_size and result["steps"] == 2
        start = result["records"][0]
        assert start["event"] == "start" and start["plan"]["world_size"] == world_size
        steps = [r for r in result["records"] if "event" not in r]
        bf16 = result["run"].endswith("bf16")
        for mine, theirs in zip(steps, reference, strict=True):
            assert mine["lr"] == theirs["lr"] and mine["tokens"] == theirs["tokens"]
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=2e-2 if bf16 else 1e-5), result["run"]
        if bf16:  # DeepSpeed's bf16 mode: bf16 module, fp32 master copies in the ZeRO optimizer
            assert result["precision"] == {"mode": "deepspeed_bf16", "master_weights": "float32",
                                           "module_weights": "bfloat16", "autocast": None, "checkpoint": "bfloat16"}
        else:
            assert result["precision"]["mode"] == "fp32"


def test_zero2_and_zero3_train_in_one_process_like_the_plain_trainer(tmp_path, reference):
    """Reproduces the failure in `accelerator.prepare` ("Can't find `model.config` entry")
    that stopped both bundled configs before the first step."""
    runs = ["2:fp32", "3:fp32", "2:bf16", "3:bf16"]
    lines = _launch([sys.executable, str(SCRIPT), str(tmp_path / "out"), *runs], tmp_path)
    _check(lines, runs, 1, reference)


def test_zero2_and_zero3_train_in_two_processes_under_accelerate_launch(tmp_path, reference):
    from training.trainer import _free_port

    runs = ["2:fp32", "3:fp32"]
    lines = _launch([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                     "--num_machines", "1", "--main_process_port", str(_free_port()), "--use_deepspeed",
                     "--mixed_precision", "no", "--dynamo_backend", "no",
                     str(SCRIPT), str(tmp_path / "out"), *runs], tmp_path)
    _check(lines, runs, 2, reference)


def test_deepspeed_config_must_agree_with_the_training_config(tmp_path):
    from training.config import CONFIG_DIR, ConfigError
    from training.trainer import _deepspeed_json

    for stage in (2, 3):
        values = json.loads((CONFIG_DIR / f"deepspeed_zero{stage}.json").read_text())
        assert values["zero_optimization"]["stage"] == stage and values["bf16"]["enabled"] == "auto"
        _deepspeed_json(tiny_config(tmp_path, deepspeed=CONFIG_DIR / f"deepspeed_zero{stage}.json"))
    for values, problem in (({"bf16": {"enabled": True}}, "bf16.enabled"), ({"fp16": {"enabled": True}}, "fp16"),
                            ({"optimizer": {"type": "Adam"}}, "optimizer")):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **values}))
        with pytest.raises(ConfigError, match=problem):
            _deepspeed_json(tiny_config(tmp_path, deepspeed=path, bf16=False))
