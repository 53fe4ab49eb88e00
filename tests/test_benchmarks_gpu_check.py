"""benchmarks/gpu_check.py: its CPU path (`--tiny`) runs every section, and without CUDA
the real check says it was skipped (one JSON object either way)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks/ folder is not installed

from benchmarks.gpu_check import main, peak_bf16_flops  # noqa: E402


def run(argv: list[str]) -> tuple[int, dict]:
    lines: list[str] = []
    code = main(argv, emit=lines.append)
    assert len(lines) == 1
    return code, json.loads(lines[0])


def test_tiny_run_measures_training_and_generation_on_the_cpu():
    code, result = run(["--tiny"])
    assert code == 0 and result["status"] == "ok" and result["skipped"] == []
    for label, backend in (("eager", None), ("compiled", "aot_eager")):
        section = result["train"][label]
        assert section["compile"] == backend
        assert section["master_weights"] == ["float32"] and section["autocast"] == "bfloat16"
        for objective in ("ce", "dco"):
            assert section[objective]["step_s"] > 0 and section[objective]["tokens_per_s"] > 0
        assert section["dco_over_ce"] > 0
    for n in (1, 2):
        assert result["generation"][f"states_per_call_{n}"]["tactics_per_s"] > 0
    assert set(result["goals"]) == {"mfu_dco", "peak_memory_gib", "dco_over_ce", "tactics_per_s_8_states"}
    assert all(goal["met"] is None for goal in result["goals"].values())  # a CPU run checks no GPU goal


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is visible: the real check would run")
def test_without_cuda_the_check_is_skipped_with_a_reason():
    code, result = run([])
    assert code == 0 and result["status"] == "skipped" and "CUDA" in result["reason"]


def test_peak_flops_of_known_cards():
    assert peak_bf16_flops("NVIDIA H200", None) == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA H100 PCIe", None) == pytest.approx(756e12)
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3", None) == pytest.approx(989.4e12)
    assert peak_bf16_flops("Some Card", None) is None and peak_bf16_flops("Some Card", 100) == 1e14
