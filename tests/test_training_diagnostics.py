"""Greedy-completion confidence: correct scoring, JSON and PNG outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.diagnostics import diagnose, greedy_confidences, select_examples, summarize
from training.modeling import TINY_MODEL, load_causal_lm, load_tokenizer
from training.prompt import format_prompt


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "neff-1" / "final"
    load_causal_lm(TINY_MODEL).save_pretrained(path)
    load_tokenizer(TINY_MODEL).save_pretrained(path)
    return path


def test_confidence_is_the_greedy_sequences_probability(checkpoint):
    """Cross-check against generate's own per-step scores: log p(y_greedy | x) is the sum
    of the chosen tokens' log-softmax values, each of them the maximum at its step."""
    model, tokenizer = load_causal_lm(checkpoint), load_tokenizer(checkpoint)
    examples = select_examples(None, "all", 0.0, 0).select(range(3))
    records = greedy_confidences(model, tokenizer, examples, max_new_tokens=12, batch_size=3)
    assert len(records) == 3
    for record, state in zip(records, examples["state_before"]):
        prompt = tokenizer(format_prompt(state), add_special_tokens=False, return_tensors="pt")
        out = model.generate(**prompt, do_sample=False, max_new_tokens=12, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        generated = out.sequences[0, prompt["input_ids"].shape[1]:].tolist()
        step_logps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
        assert all(int(lp.argmax()) == t for lp, t in zip(step_logps, generated))
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        expected = sum(float(lp[t]) for lp, t in zip(step_logps, generated))
        assert record.logp == pytest.approx(expected, abs=1e-3)
        assert record.p == pytest.approx(math.exp(record.logp))
        assert record.finished == (generated[-1] == tokenizer.eos_token_id)


def test_summary_histogram_counts_every_example():
    from training.diagnostics import GreedyConfidence

    records = [GreedyConfidence("t", i, "r", "g", math.log(p), p, True, False) for i, p in enumerate([0.01, 0.5, 0.97, 1.0])]
    summary = summarize(records, bins=4)
    assert summary["histogram"]["counts"] == [1, 0, 1, 2]
    assert summary["mean_p"] == pytest.approx(sum([0.01, 0.5, 0.97, 1.0]) / 4)
    assert summary["fraction_p_above_0.9"] == 0.5


def test_diagnose_writes_json_and_png(checkpoint, tmp_path):
    report = diagnose({"a": checkpoint, "b": checkpoint}, tmp_path / "diag", max_examples=4, max_new_tokens=6)
    data = json.loads(report.json_path.read_text())
    assert set(data["checkpoints"]) == {"a", "b"}
    for entry in data["checkpoints"].values():
        assert entry["examples"] == 4 == len(entry["records"]) == sum(entry["histogram"]["counts"])
        assert all(0.0 <= r["p"] <= 1.0 for r in entry["records"])
    assert data["checkpoints"]["a"]["mean_p"] == data["checkpoints"]["b"]["mean_p"]  # same weights
    assert report.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_diagnose(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from prover.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["diagnose", str(checkpoint), "--output-dir", str(tmp_path), "--max-examples", "2",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "neff-1" in json.loads((tmp_path / "confidence.json").read_text())["checkpoints"]
    bad = runner.invoke(app, ["diagnose", "--manifest", str(tmp_path / "none.json"), "--output-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "not found" in bad.output
