"""End to end: the trainer fine-tunes the tiny model on a few sample theorems (CE, and
step-wise DCO with N_eff = 4), the transformers generator loads the checkpoints, and both
search strategies prove those theorems through the replay environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prover.cli import app
from prover.replay import ReplayEnvironment
from prover.runner import GeneratorSpec, ProveSettings, make_generators, prove
from prover.theorems import find_theorem, load_leandojo
from search.budget import Budget
from training.config import TrainConfig
from training.data import SAMPLE_PATH, split_theorem_ids
from training.ensemble import MANIFEST_NAME, EnsembleMember, member_name, write_manifest
from training.trainer import train

# Short replayable proofs (1-2 steps) with short tactics; one of them is held out by the
# trainer's eval split, the others are the training (and proving) set.
CHOSEN = ["CategoryTheory.MorphismProperty.LeftFraction.map_ofHom", "Finmap.erase_toFinmap", "Convex.thickening",
          "Fin.cons_rev", "CategoryTheory.Equivalence.invFunIdAssoc_hom_app"]
EVAL_FRACTION = 0.1
SEED = 0


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    records = [t for t in json.loads(Path(SAMPLE_PATH).read_text()) if t["full_name"] in CHOSEN]
    assert len(records) == len(CHOSEN)
    path = tmp_path_factory.mktemp("e2e") / "few.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def trained_ids() -> list[str]:
    train_ids, eval_ids = split_theorem_ids(CHOSEN, EVAL_FRACTION, SEED)
    assert len(train_ids) == len(CHOSEN) - 1 and len(eval_ids) == 1
    return train_ids


@pytest.fixture(scope="module")
def checkpoints(benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One checkpoint per N_eff, trained until the model has memorised the training tactics
    (CE) or DCO's coverage factor stops pulling (N_eff = 4 stops early by replacement)."""
    out = {}
    root = tmp_path_factory.mktemp("runs")
    for n_eff, steps in ((1, 60), (4, 100)):
        config = TrainConfig(
            model="tiny-qwen2", data=benchmark, eval_fraction=EVAL_FRACTION, seed=SEED, max_length=256,
            n_eff=n_eff, lr=3e-3, lr_schedule="constant", warmup_steps=2, batch_size=6, micro_batch_size=6,
            epochs=1000, max_steps=steps, bf16=False, output_dir=root / f"neff{n_eff}", progress=False,
            save_every_steps=0,
        )
        result = train(config)
        assert (result.checkpoint / "config.json").is_file()
        out[n_eff] = result.checkpoint
    return out


@pytest.mark.parametrize("n_eff", [1, 4])
@pytest.mark.parametrize("strategy", ["best_first", "sampling"])
def test_trained_model_proves_its_training_theorems(
    checkpoints: dict[int, Path], benchmark: Path, trained_ids: list[str], n_eff: int, strategy: str
) -> None:
    torch.manual_seed(SEED)
    replay = ReplayEnvironment.from_benchmark(benchmark)
    theorems = load_leandojo(benchmark)
    settings = ProveSettings(
        strategy=strategy,
        budget=Budget(max_expansions=20, tactics_per_expansion=8, max_passes=64, time_limit_s=120),
        benchmark=str(benchmark),
        generator=GeneratorSpec(kind="model", models=(str(checkpoints[n_eff]),), max_new_tokens=32),
    )
    generators = make_generators(settings.generator, env=replay)
    for theorem_id in trained_ids:
        theorem = find_theorem(theorems, theorem_id)
        result = prove(theorem, replay, generators, settings)
        assert result.proved and result.verified, (theorem_id, result.status, result.errors[:3])
        assert replay.verify(theorem, result.proof).ok
        assert result.generator_calls >= 1 and result.lean_calls >= len(result.proof)


def test_union_of_ce_and_dco_and_the_cli(checkpoints: dict[int, Path], benchmark: Path, trained_ids: list[str]) -> None:
    torch.manual_seed(SEED)
    replay = ReplayEnvironment.from_benchmark(benchmark)
    settings = ProveSettings(
        strategy="sampling",
        budget=Budget(max_passes=64, time_limit_s=120),
        generator=GeneratorSpec(kind="model", models=(str(checkpoints[1]), str(checkpoints[4])), max_new_tokens=32),
    )
    generators = make_generators(settings.generator, env=replay)
    assert set(generators) == {"neff1/final", "neff4/final"}
    theorem = find_theorem(load_leandojo(benchmark), trained_ids[0])
    result = prove(theorem, replay, generators, settings)
    assert result.proved and result.member in generators and set(result.members) == set(generators)

    cli = CliRunner().invoke(app, [
        "prove", "--benchmark", str(benchmark), "--name", trained_ids[-1], "--models", str(checkpoints[1]),
        "--max-new-tokens", "32", "--json",
    ])
    assert cli.exit_code == 0, cli.output
    record = json.loads(cli.stdout)
    assert record["status"] == "proved" and record["member"] == "final"

    # The trainer's ensemble manifest: members named by N_eff, union and mixture.
    manifest = write_manifest(
        checkpoints[1].parent.parent / MANIFEST_NAME,
        [EnsembleMember(name=member_name(n), n_eff=n, checkpoint=str(path), base_model="tiny-qwen2") for n, path in checkpoints.items()],
    )
    for mode in ("union", "mixture"):
        cli = CliRunner().invoke(app, [
            "prove", "--benchmark", str(benchmark), "--name", trained_ids[0], "--ensemble", str(manifest),
            "--ensemble-mode", mode, "--strategy", "sampling", "--max-new-tokens", "32", "--json",
        ])
        assert cli.exit_code == 0, cli.output
        record = json.loads(cli.stdout)
        assert record["status"] == "proved" and record["member"] in ("neff-1", "neff-4")
        assert set(record["members"]) == ({"neff-1", "neff-4"} if mode == "union" else set())


def test_untrained_model_does_not_prove_them(benchmark: Path, trained_ids: list[str]) -> None:
    """The control: the same search with the random-weight tiny model finds nothing, so the
    proofs above come from training."""
    torch.manual_seed(SEED)
    replay = ReplayEnvironment.from_benchmark(benchmark)
    settings = ProveSettings(
        strategy="sampling",
        budget=Budget(max_passes=16, time_limit_s=60),
        generator=GeneratorSpec(kind="model", models=("tiny-qwen2",), max_new_tokens=16),
    )
    generators = make_generators(settings.generator, env=replay)
    for theorem_id in trained_ids:
        result = prove(find_theorem(load_leandojo(benchmark), theorem_id), replay, generators, settings)
        assert not result.proved and result.passes == 16
