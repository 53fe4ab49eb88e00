"""LeanDojo loading, splits, tokenization with completion-only labels, and collation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from training.data import (
    SAMPLE_PATH,
    DataFormatError,
    collate,
    load_tactic_examples,
    read_benchmark,
    split_by_theorem,
    split_theorem_ids,
    tokenize_examples,
)
from training.losses import IGNORE_INDEX
from training.modeling import TINY_MODEL, load_tokenizer
from training.prompt import format_completion, format_prompt


@pytest.fixture(scope="module")
def sample():
    return load_tactic_examples(SAMPLE_PATH)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


def _raw_sample() -> list[dict]:
    return json.loads(SAMPLE_PATH.read_text(encoding="utf-8"))


def _write(tmp_path: Path, data, name: str = "bench.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_bundled_sample_counts(sample) -> None:
    dataset, stats = sample
    assert stats.to_json() == {
        "theorems": 108,
        "theorems_without_tactics": 53,
        "examples": 168,
        "duplicates_removed": 0,  # the sample's 168 (state, tactic) pairs are all distinct
    }
    assert len(dataset) == 168
    assert len(set(dataset["theorem_id"])) == 55
    assert dataset.column_names == ["theorem_id", "step", "state_before", "tactic", "state_after", "file_path"]
    theorems = read_benchmark(SAMPLE_PATH)
    assert len(theorems) == 108 and sum(len(t.traced_tactics) for t in theorems) == 168
    first = next(t for t in theorems if t.traced_tactics)
    assert first.full_name == "CategoryTheory.Equivalence.invFunIdAssoc_hom_app"
    assert first.start == (344, 1) and first.end == (347, 12)


def test_marks_removed_and_steps_indexed(sample) -> None:
    dataset, _ = sample
    assert not any("<a>" in t or "</a>" in t for t in dataset["tactic"])
    row = dataset[0]
    assert (row["theorem_id"], row["step"], row["tactic"]) == (
        "CategoryTheory.Equivalence.invFunIdAssoc_hom_app", 0, "dsimp [invFunIdAssoc]"
    )
    assert dataset[1]["step"] == 1 and dataset[1]["tactic"] == "aesop_cat"
    raw_marked = sum("<a>" in s["annotated_tactic"][0] for t in _raw_sample() for s in t["traced_tactics"])
    assert raw_marked > 10  # the marks really were there


def test_duplicates_removed_and_counted(tmp_path: Path) -> None:
    raw = _raw_sample()
    with_tactics = [t for t in raw if t["traced_tactics"]][:3]
    copy_theorem = copy.deepcopy(with_tactics[0])
    copy_theorem["full_name"] = "Copy.of.first"
    repeated_step = copy.deepcopy(with_tactics[1]["traced_tactics"][0])
    with_tactics[1]["traced_tactics"].append(repeated_step)
    path = _write(tmp_path, [*with_tactics, copy_theorem])
    n_steps = sum(len(t["traced_tactics"]) for t in with_tactics) + len(copy_theorem["traced_tactics"])
    dataset, stats = load_tactic_examples(path)
    expected_dups = len(copy_theorem["traced_tactics"]) + 1
    assert stats.duplicates_removed == expected_dups
    assert stats.examples == len(dataset) == n_steps - expected_dups
    assert "Copy.of.first" not in dataset["theorem_id"]
    kept_all, stats_all = load_tactic_examples(path, dedup=False)
    assert len(kept_all) == n_steps and stats_all.duplicates_removed == 0


def test_split_keeps_theorems_whole(sample) -> None:
    dataset, _ = sample
    train, evaluation = split_by_theorem(dataset, 0.2, seed=7)
    train_ids, eval_ids = set(train["theorem_id"]), set(evaluation["theorem_id"])
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == set(dataset["theorem_id"])
    assert len(eval_ids) == round(0.2 * 55)
    assert len(train) + len(evaluation) == len(dataset)
    again_train, again_eval = split_by_theorem(dataset, 0.2, seed=7)
    assert again_eval["theorem_id"] == evaluation["theorem_id"]
    _, other_eval = split_by_theorem(dataset, 0.2, seed=8)
    assert set(other_eval["theorem_id"]) != eval_ids
    # Independent of input order and multiplicity.
    ids = sorted(set(dataset["theorem_id"]))
    assert split_theorem_ids(ids, 0.2, 7) == split_theorem_ids(list(reversed(ids)) * 2, 0.2, 7)
    assert split_theorem_ids(["a", "b"], 0.01, 0)[1] != []  # a positive fraction gets one
    assert split_theorem_ids(["a", "b"], 0.0, 0) == (["a", "b"], [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_theorem_ids(ids, 1.0, 0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("[{\"full_name\": ", r"bench\.json: invalid JSON at line 1"),
        ({"full_name": "x"}, r"bench\.json: expected a JSON list"),
        ([{"full_name": "A.b"}], r"bench\.json: record 0 \(A\.b\): missing field 'traced_tactics'"),
        (["text"], r"bench\.json: record 0: record must be a JSON object"),
    ],
)
def test_malformed_file_errors_name_the_file(tmp_path: Path, data, match: str) -> None:
    with pytest.raises(DataFormatError, match=match):
        read_benchmark(_write(tmp_path, data))


def test_malformed_record_errors_name_file_record_and_field(tmp_path: Path) -> None:
    raw = _raw_sample()[:12]
    index = next(i for i, t in enumerate(raw) if t["traced_tactics"])
    name = raw[index]["full_name"]

    broken = copy.deepcopy(raw)
    del broken[index]["traced_tactics"][1]["state_before"]
    with pytest.raises(DataFormatError) as info:
        load_tactic_examples(_write(tmp_path, broken))
    message = str(info.value)
    assert "bench.json" in message and f"record {index} ({name})" in message
    assert "traced_tactics[1].'state_before'" in message

    broken = copy.deepcopy(raw)
    broken[3]["start"] = "344:1"
    with pytest.raises(DataFormatError, match=r"record 3 \(.+\): field 'start' must be list, got str"):
        read_benchmark(_write(tmp_path, broken))

    broken = copy.deepcopy(raw)
    broken[index]["traced_tactics"][0]["tactic"] = 7
    with pytest.raises(DataFormatError, match=r"traced_tactics\[0\]\.'tactic' must be str, got int"):
        read_benchmark(_write(tmp_path, broken))

    broken = copy.deepcopy(raw)
    broken[index]["traced_tactics"][0]["annotated_tactic"] = ["rfl"]
    with pytest.raises(DataFormatError, match=r"annotated_tactic' must be \[text, premises\]"):
        read_benchmark(_write(tmp_path, broken))

    with pytest.raises(FileNotFoundError):
        read_benchmark(tmp_path / "missing.json")


def _lengths(dataset, tokenizer) -> tuple[list[int], list[int]]:
    prompts = tokenizer([format_prompt(s) for s in dataset["state_before"]], add_special_tokens=False)
    completions = tokenizer([format_completion(t) for t in dataset["tactic"]], add_special_tokens=False)
    return [len(p) for p in prompts["input_ids"]], [len(c) + 1 for c in completions["input_ids"]]


def test_labels_mask_exactly_the_prompt(sample, tokenizer) -> None:
    dataset, _ = sample
    tokenized, stats = tokenize_examples(dataset, tokenizer, max_length=4096, length_policy="drop")
    assert stats.kept == stats.examples == 168 and stats.truncated == stats.dropped_too_long == 0
    prompt_lengths, _ = _lengths(dataset, tokenizer)
    for row, example, n_prompt in zip(tokenized, dataset, prompt_lengths, strict=True):
        labels, ids = row["labels"], row["input_ids"]
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and IGNORE_INDEX not in labels[n_prompt:]
        assert ids[-1] == tokenizer.eos_token_id and row["attention_mask"] == [1] * len(ids)
        assert tokenizer.decode(ids[:n_prompt]) == format_prompt(example["state_before"])
        assert tokenizer.decode(ids[n_prompt:-1]) == format_completion(example["tactic"])
        assert (row["theorem_id"], row["step"]) == (example["theorem_id"], example["step"])


def test_length_policies_are_counted(sample, tokenizer) -> None:
    dataset, _ = sample
    max_length = 48
    prompt_lengths, completion_lengths = _lengths(dataset, tokenizer)
    fixed = len(tokenizer(format_prompt(""), add_special_tokens=False)["input_ids"])
    too_long = [p + c > max_length for p, c in zip(prompt_lengths, completion_lengths, strict=True)]
    tactic_too_long = [fixed + 1 + c > max_length for c in completion_lengths]
    assert 0 < sum(tactic_too_long) < sum(too_long) < len(dataset)

    dropped, stats = tokenize_examples(dataset, tokenizer, max_length=max_length, length_policy="drop")
    assert stats.dropped_too_long == sum(too_long) and stats.truncated == 0
    assert stats.kept == len(dropped) == len(dataset) - sum(too_long)

    cut, stats = tokenize_examples(dataset, tokenizer, max_length=max_length, length_policy="truncate_left")
    assert stats.dropped_tactic_too_long == sum(tactic_too_long)
    assert stats.truncated == sum(too_long) - sum(tactic_too_long)
    assert stats.kept == len(cut) == stats.examples - stats.dropped_tactic_too_long
    kept_examples = [e for e, bad in zip(dataset, tactic_too_long, strict=True) if not bad]
    for row, example, long in zip(cut, kept_examples, [t for t, b in zip(too_long, tactic_too_long) if not b]):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) <= max_length
        n_prompt = labels.count(IGNORE_INDEX)
        prompt = tokenizer.decode(ids[:n_prompt])
        assert tokenizer.decode(ids[n_prompt:-1]) == example["tactic"].strip()  # whole tactic
        assert prompt.startswith("[GOAL]\n") and prompt.endswith("\n[PROOFSTEP]\n")
        state = prompt[len("[GOAL]\n"):-len("\n[PROOFSTEP]\n")]
        # The shared rule (training.prompt.build_prompt): later goals go first, then the
        # start of the first goal.
        goals = example["state_before"].strip().split("\n\n")
        kept_goals = ["\n\n".join(goals[:k]) for k in range(1, len(goals) + 1)]
        assert state and (state in kept_goals or goals[0].endswith(state))
        assert (state != example["state_before"].strip()) == long
    assert stats.to_json()["truncated"] == stats.truncated

    with pytest.raises(ValueError, match="length_policy"):
        tokenize_examples(dataset, tokenizer, max_length=64, length_policy="truncate_right")  # type: ignore[arg-type]


def test_collate_pads_right(sample, tokenizer) -> None:
    dataset, _ = sample
    tokenized, _ = tokenize_examples(dataset.select(range(5)), tokenizer, max_length=512, length_policy="drop")
    rows = [tokenized[i] for i in range(5)]
    batch = collate(rows, tokenizer.pad_token_id)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == batch["labels"].shape == (5, max(lengths))
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
    assert batch["input_ids"].dtype == torch.long
    ids = [r["theorem_id"] for r in rows]
    expected = [sorted(set(ids), key=ids.index).index(t) for t in ids]
    assert expected == [0, 0, 1, 1, 1]  # two theorems among the first five steps
    assert batch["proof_index"].tolist() == expected and batch["step"].tolist() == [r["step"] for r in rows]
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)


def test_tokenize_examples_accepts_an_empty_split() -> None:
    """eval_fraction 0 leaves an empty eval side; tokenizing it gives an empty dataset."""
    from training.data import SAMPLE_PATH, load_tactic_examples, tokenize_examples
    from training.modeling import TINY_MODEL, load_tokenizer

    examples, _ = load_tactic_examples(SAMPLE_PATH)
    empty = examples.select([])
    tokenized, stats = tokenize_examples(
        empty, load_tokenizer(TINY_MODEL), max_length=64, length_policy="truncate_left"
    )
    assert len(tokenized) == 0
    assert stats.examples == 0 and stats.kept == 0
