"""The CPU experiment: DCO limits confidence where cross-entropy does not (the paper's Figure 1).

The same tiny Qwen2 (same initial weights, same data order) is trained on the bundled
LeanDojo sample with cross-entropy (N_eff = 1) and with step-wise DCO (N_eff = 16) until
cross-entropy has memorised much of it; then both decode every sample tactic greedily.
DCO's gradient factor F collapses once a tactic's probability passes about 1/N_eff, so
its greedy completions end markedly less confident than cross-entropy's.

Threshold replacement is off here (epsilon = 0): with it, late DCO steps score many
candidates per kept example and the run would not fit the test budget; its behaviour is
tested in test_training_replacement.py and test_training_trainer.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from training.config import load_config
from training.diagnostics import diagnose
from training.trainer import train

# About 25 s of CPU per run on one core: 40 epochs of the 157 training examples.
RECIPE = dict(lr=5e-3, epochs=40, batch_size=8, micro_batch_size=8, max_length=128, epsilon=0.0,
              warmup_steps=5, save_every_steps=0, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_dco_ends_less_confident_than_cross_entropy(tmp_path):
    runs = {n: train(load_config("tiny", n_eff=n, output_dir=tmp_path / f"neff-{n}", **RECIPE)) for n in (1, 16)}
    report = diagnose({f"neff-{n}": r.checkpoint for n, r in runs.items()}, tmp_path / "diag",
                      max_length=RECIPE["max_length"], max_new_tokens=48)
    ce, dco = report.summaries["neff-1"], report.summaries["neff-16"]
    print(json.dumps({name: {k: v for k, v in s.items() if k != "histogram"} for name, s in report.summaries.items()}))
    assert ce["examples"] == dco["examples"] == 168
    # Cross-entropy has learnt the sample: many greedy tactics are right and confident.
    assert ce["exact_match"] > 0.4 and ce["mean_p"] > 0.3
    # DCO has learnt it too, but its confidence stays lower.
    assert dco["exact_match"] > 0.3
    assert dco["mean_p"] < 0.8 * ce["mean_p"]
    assert dco["fraction_p_above_0.9"] < ce["fraction_p_above_0.9"]
    # The training signal shows why: DCO's mean F fell well below 1, CE's is exactly 1.
    assert runs[1].final_metrics["last_step"]["mean_F"] == 1.0
    assert runs[16].final_metrics["last_step"]["mean_F"] < 0.9
