"""Trainer: config handling, a real tiny run, resume after a kill, HF checkpoints, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import ConfigError, TrainConfig, config_hash, load_config
from training.modeling import TINY_MODEL


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model gains nothing from threads, and on a shared 2-core box OpenMP
    # threads contending with other processes slow it down tenfold.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=tmp_path / "run", max_length=192, batch_size=8, micro_batch_size=4, max_steps=4,
                  epochs=1, lr=3e-3, warmup_steps=1, save_every_steps=0, progress=False, eval_fraction=0.1)
    values.update(overrides)
    return load_config("tiny", **values)


# ------------------------------------------------------------------------------ config


def test_config_defaults_are_the_papers_recipe():
    config = TrainConfig()
    assert (config.model, config.lr, config.batch_size, config.epochs, config.warmup_steps) == (
        "Qwen/Qwen2.5-Math-1.5B", 1e-5, 64, 3, 20)
    assert config.epsilon == 0.3 and config.n_eff == 1 and config.bf16
    assert load_config("default") == TrainConfig()  # the shipped YAML spells out the defaults


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-qwen2\nn_eff: 8\nlr: 0.001\n")
    config = load_config(path, n_eff=16, lr=None)
    assert (config.model, config.n_eff, config.lr) == ("tiny-qwen2", 16, 0.001)
    assert load_config("tiny").model == TINY_MODEL


@pytest.mark.parametrize(("text", "problem"), [
    ("n_eff: 0\n", "n_eff"),
    ("epsilon: 1.5\n", "epsilon"),
    ("batch_size: 10\nmicro_batch_size: 4\n", "multiple of micro_batch_size"),
    ("lossy: 1\n", "lossy"),
    ("loss: whole\n", "loss"),
    ("data: /nonexistent.json\n", "data file not found"),
    ("- a list\n", "expected a mapping"),
])
def test_invalid_configs_name_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no-such-config.yaml")


def test_config_hash_ignores_bookkeeping_only():
    base = TrainConfig()
    assert config_hash(base) == config_hash(base.with_overrides(output_dir=Path("elsewhere"), progress=False))
    assert config_hash(base) != config_hash(base.with_overrides(n_eff=4))


# -------------------------------------------------------------------------------- runs


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_records(path: Path) -> list[dict]:
    return [r for r in read_metrics(path) if "event" not in r]


def test_resume_after_kill_continues_the_same_run(tmp_path):
    """Kill after step 3 (checkpoint at step 2), restart: same steps, data order and
    weights as an uninterrupted run. Replacement is active (N_eff huge, so short tactics
    have F ~ 0 and get discarded), so its carry-over is part of the resumed state."""
    from training.trainer import train

    common = dict(n_eff=10**12, epsilon=0.5, max_steps=5, save_every_steps=2)
    reference = train(tiny_config(tmp_path / "a", **common))
    killed = tiny_config(tmp_path / "b", **common)

    class Killed(Exception):
        pass

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(killed, on_step=kill_at_3)
    assert (killed.output_dir / "checkpoints" / "step-000002").is_dir()
    assert not (killed.output_dir / "final").exists()
    # A kill during a checkpoint write leaves a `.tmp` directory: never resumed from.
    (killed.output_dir / "checkpoints" / "step-000004.tmp").mkdir()
    resumed = train(killed)

    assert resumed.steps == reference.steps == 5
    a, b = step_records(reference.metrics_path), step_records(resumed.metrics_path)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "mean_F", "epoch", "discarded", "scored", "tokens", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert sum(r["discarded"] for r in a) > 0
    weights_a = load_file(reference.checkpoint / "model.safetensors")
    weights_b = load_file(resumed.checkpoint / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # A finished run is not trained again; a different config in the same dir is refused.
    assert train(killed).steps == 5
    with pytest.raises(ConfigError, match="different config"):
        train(killed.with_overrides(lr=1e-3))


def test_final_checkpoint_loads_with_from_pretrained_and_metrics_are_logged(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.trainer import train

    config = tiny_config(tmp_path, max_steps=3, loss="proof_level", n_eff=4, epsilon=0.0)
    result = train(config)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    assert model.config.model_type == "qwen2" and tokenizer.eos_token_id is not None
    info = json.loads((result.checkpoint / "dco_training.json").read_text())
    assert info["n_eff"] == 4 and info["loss"] == "proof_level"
    from training.diagnostics import training_settings

    assert training_settings(result.checkpoint)["max_length"] == 192  # diagnose truncates prompts as trained

    records = step_records(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert {"loss", "mean_F", "discarded", "tokens_per_s", "lr", "epoch"} <= record.keys()
        assert 0.0 < record["mean_F"] <= 1.0 and record["tokens_per_s"] > 0
    # Warmup over 1 step: step 1 already at the peak (not 0), then linear decay.
    assert records[0]["lr"] == records[1]["lr"] == config.lr > records[2]["lr"] > 0
    events = [r["event"] for r in read_metrics(result.metrics_path) if "event" in r]
    assert events == ["start", "epoch_end", "end", "eval"]  # 3 steps: part of one epoch

    # The saved weights are the trained ones: same completion log-probs as in training.
    trained = load_file(result.checkpoint / "model.safetensors")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_proof_level_objective_weights_each_step_by_its_whole_proofs_factor():
    """Proof-level DCO on a micro-batch holding some steps of multi-step proofs: each
    step's gradient is F(N, p_proof) / batch size times its NLL gradient, where p_proof
    includes the proof's steps outside the batch (scored without gradients)."""
    from training.losses import coverage_weight
    from training.modeling import load_tokenizer
    from training.trainer import Objective, load_splits

    config = TrainConfig(model=TINY_MODEL, max_length=128, micro_batch_size=4, batch_size=4, bf16=False)
    split, _, _ = load_splits(config, load_tokenizer(TINY_MODEL))
    a, b = [t for t, steps in split.steps_of.items() if len(steps) >= 3][:2]
    # Every step's log-prob comes from this table (a model with known outputs).
    table = {i: -0.2 - 0.1 * (i % 5) for i in range(len(split))}

    def no_grad_logprobs(indices):
        return torch.tensor([table[i] for i in indices])

    n_eff = 4
    objective = Objective("proof_level", n_eff, split, no_grad_logprobs)
    batch = [split.steps_of[a][0], split.steps_of[a][2], split.steps_of[b][1]]
    seq_logp = torch.tensor([table[i] for i in batch], requires_grad=True)
    loss, factors = objective(batch, seq_logp)
    loss.backward()

    def proof_factor(theorem):
        return float(coverage_weight(torch.tensor([sum(table[j] for j in split.steps_of[theorem])],
                                                  dtype=torch.float64), n_eff))

    expected = torch.tensor([proof_factor(a), proof_factor(a), proof_factor(b)])
    assert 0.05 < expected.min() and expected.max() < 0.95
    assert torch.allclose(factors.float(), expected, rtol=1e-5)
    assert torch.allclose(seq_logp.grad, -expected / len(batch), rtol=1e-5)
    # Scoring for replacement sees the same per-proof factor.
    assert torch.allclose(objective.score([split.steps_of[b][0]]).float(), expected[2:], rtol=1e-5)


def test_training_lowers_the_loss(tmp_path):
    from training.trainer import train

    from training.modeling import load_tokenizer

    result = train(tiny_config(tmp_path, max_steps=12, epochs=10, lr=5e-3))
    # A random-weight model predicts held-out tokens at about log(vocabulary) nats each.
    uniform = math.log(len(load_tokenizer(TINY_MODEL)))
    assert result.final_metrics["eval"]["eval_token_nll"] < 0.85 * uniform


def test_unknown_model_is_a_clear_error(tmp_path):
    from training.modeling import ModelLoadError
    from training.trainer import train

    with pytest.raises(ModelLoadError, match="not found"):
        train(tiny_config(tmp_path, model=str(tmp_path / "missing-model"), tokenizer=TINY_MODEL))


def test_deepspeed_config_without_deepspeed_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from training import trainer
    from training.config import CONFIG_DIR

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(trainer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs DeepSpeed"):
        trainer.train(tiny_config(tmp_path, deepspeed=CONFIG_DIR / "deepspeed_zero2.json"))


# ---------------------------------------------------------------------------------- CLI


def test_cli_train_writes_one_checkpoint_per_n_eff_and_the_manifest(tmp_path):
    from typer.testing import CliRunner

    from prover.cli import app
    from training.ensemble import read_manifest

    out = tmp_path / "ens"
    result = CliRunner().invoke(app, [
        "train", "--config", "tiny", "--n-eff", "1", "4", "--max-steps", "2", "--batch-size", "4",
        "--micro-batch-size", "4", "--output-dir", str(out), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out / "ensemble.json")
    assert [(m.name, m.n_eff, m.steps) for m in manifest.members] == [("neff-1", 1, 2), ("neff-4", 4, 2)]
    assert json.loads((out / "ensemble.json").read_text())["members"][1]["checkpoint"] == "neff-4/final"
    for member in manifest.members:
        assert (Path(member.checkpoint) / "model.safetensors").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--n-eff", "0"], "must be >= 1"),
    (["--n-eff", "two"], "positive integers"),
    (["--loss", "whole"], "loss"),
    (["--model", "/nonexistent/model-dir"], "not found"),
    (["--config", "nope.yaml"], "config file not found"),
])
def test_cli_train_rejects_bad_input_with_a_message(tmp_path, args, message):
    from typer.testing import CliRunner

    from prover.cli import app

    result = CliRunner().invoke(app, ["train", "--config", "tiny", "--output-dir", str(tmp_path), "--no-progress",
                                      "--max-steps", "1", *args])
    assert result.exit_code != 0
    assert message in result.output


def test_gpu_out_of_memory_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    """An OOM in step 3 stops the run with what to change and the step it resumes from;
    re-running (memory now sufficing) resumes from the step-2 checkpoint and finishes."""
    from training import trainer

    config = tiny_config(tmp_path, max_steps=4, save_every_steps=2)
    real_step = trainer._optimizer_step

    def oom_at_3(*args, **kwargs):
        if args[-1] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "_optimizer_step", oom_at_3)
    with pytest.raises(trainer.TrainingOutOfMemory, match=r"step 3 .*micro-batch-size.*resumes from step 2"):
        trainer.train(config)
    events = [json.loads(l) for l in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == {"step": 3, "event": "out_of_memory", "resume_from_step": 2}

    monkeypatch.setattr(trainer, "_optimizer_step", real_step)
    steps_seen: list[int] = []
    result = trainer.train(config, on_step=lambda record: steps_seen.append(record["step"]))
    assert steps_seen == [3, 4] and result.steps == 4


# ---------------------------------------------------------------------------- precision


def test_bf16_checkpoint_trains_fp32_master_weights_that_move_at_lr_1e_5(tmp_path):
    """transformers 5 loads a bf16 checkpoint in bf16; AdamW on bf16 weights loses updates
    of 1e-5 to rounding. The trainer keeps fp32 master weights (bf16 autocast) and says so."""
    from training.modeling import build_tiny_qwen2, load_tokenizer
    from training.trainer import train

    tokenizer = load_tokenizer(TINY_MODEL)
    base = tmp_path / "bf16-base"
    build_tiny_qwen2(tokenizer).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    initial = load_file(base / "model.safetensors")
    assert initial["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16

    config = tiny_config(tmp_path, model=str(base), bf16=True, lr=1e-5, warmup_steps=0, lr_schedule="constant",
                         max_grad_norm=None, max_steps=3, save_every_steps=2)
    result = train(config)
    expected = {"mode": "fp32_master_bf16_autocast", "master_weights": "float32", "module_weights": "float32",
                "autocast": "bfloat16", "checkpoint": "bfloat16"}
    start = read_metrics(result.metrics_path)[0]
    assert start["event"] == "start" and start["precision"] == expected
    assert json.loads((result.checkpoint / "dco_training.json").read_text())["precision"] == expected
    assert load_file(result.checkpoint / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16

    # The resumable checkpoint holds the master weights: fp32, moved by about lr per step.
    master = load_file(config.output_dir / "checkpoints" / "step-000002" / "model.safetensors")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert master["lm." + name].dtype == torch.float32
        change = (master["lm." + name] - initial[name].float()).abs()
        assert (change > 0).float().mean() > 0.9, name
        assert 1e-5 <= change.median() <= 3e-5, name  # two Adam steps of lr 1e-5


# ------------------------------------------------------------------- schedule and epochs


def test_learning_rate_warms_up_from_step_one_then_stays_or_decays():
    from training.trainer import LearningRateSchedule

    constant = LearningRateSchedule("constant", warmup_steps=4, total_steps=10)
    assert [constant(s) for s in range(10)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1]
    linear = LearningRateSchedule("linear", warmup_steps=4, total_steps=10)
    assert [round(linear(s), 4) for s in range(10)] == [0.25, 0.5, 0.75, 1, 1, 0.8333, 0.6667, 0.5, 0.3333, 0.1667]
    assert LearningRateSchedule("constant", 0, 5)(0) == 1.0
    assert TrainConfig().lr_schedule == "constant" and TrainConfig().warmup_steps == 20


def test_epochs_are_passes_replacement_draws_from_them_and_the_run_takes_fewer_steps(tmp_path):
    """Two epochs with threshold replacement discarding short tactics: replacements come
    from the same passes, so the run ends after exactly two passes of draws, in fewer
    steps than without discards; the log has one record per epoch."""
    from training.trainer import train

    common = dict(max_steps=None, epochs=2, warmup_steps=3, lr_schedule="constant", lr=1e-3)
    plain = train(tiny_config(tmp_path / "plain", **common))
    replaced = train(tiny_config(tmp_path / "replaced", n_eff=10**12, epsilon=0.5, **common))

    start = read_metrics(plain.metrics_path)[0]
    n_train, planned = start["train_examples"], start["plan"]["total_steps"]
    assert planned == 2 * n_train // 8 and plain.steps == planned
    records = step_records(replaced.metrics_path)
    assert [r["lr"] for r in records[:5]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    discarded = sum(r["discarded"] for r in records)
    assert discarded > 0 and replaced.steps == len(records) < planned
    # The draws: exactly two passes, each example of a pass used, discarded, or carried.
    assert sum(r["drawn"] for r in records) <= 2 * n_train and replaced.final_metrics["passes"] == 2.0
    totals = replaced.final_metrics["replacement_totals"]  # including the step the passes ran out in
    assert totals["drawn"] == 2 * n_train and totals["discarded"] >= discarded
    assert replaced.steps * 8 + totals["discarded"] <= 2 * n_train < (replaced.steps + 1) * 8 + totals["discarded"]

    events = {name: [r for r in read_metrics(replaced.metrics_path) if r.get("event") == name]
              for name in ("epoch_end", "end")}
    epochs = events["epoch_end"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["passes"] == 2.0
    assert sum(e["steps"] for e in epochs) == replaced.steps
    assert sum(e["discarded"] for e in epochs) == totals["discarded"] and all(e["discarded"] > 0 for e in epochs)
    assert [e["examples"] for e in epochs] == [8 * e["steps"] for e in epochs]
    assert events["end"] == [{"step": replaced.steps, "event": "end", "steps": replaced.steps, "passes": 2.0,
                              "planned_steps": planned}]
    plain_epochs = [r for r in read_metrics(plain.metrics_path) if r.get("event") == "epoch_end"]
    assert [e["discarded"] for e in plain_epochs] == [0, 0] and sum(e["steps"] for e in plain_epochs) == planned
