"""LeanDojo Benchmark 4 data: reading, (state, tactic) examples, splits, tokenization.

A benchmark file is a JSON list of theorems; each theorem has `traced_tactics`, a list of
steps with `tactic`, `annotated_tactic` (`[text with <a>…</a> marks, premises]`),
`state_before` and `state_after`. Training examples are the steps of theorems that have
any, with the marks removed from the annotated text (as ReProver does; the `tactic` field
differs from it only in the indentation of continuation lines).

Everything dropped on the way is counted: `LoadStats` (theorems without tactics,
duplicates) and `TokenizeStats` (truncated or dropped for length).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from training.prompt import IGNORE_INDEX, PromptTooLong, build_prompt, format_completion, format_prompt

if TYPE_CHECKING:  # torch and datasets load lazily: reading a benchmark needs neither
    import datasets
    import torch

SAMPLE_PATH: Path = Path(
    str(resources.files("training").joinpath("resources", "leandojo_benchmark_4", "random_test_head.json"))
)
"""The bundled sample: first 108 theorems of the official random test split."""

_MARK = re.compile(r"</?a>")

LengthPolicy = Literal["truncate_left", "drop"]


class DataFormatError(ValueError):
    """A benchmark file or record is malformed; the message names file, record and field."""


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class TracedTactic:
    """One recorded proof step. `annotated_tactic` is the source text with marks removed."""

    tactic: str
    annotated_tactic: str
    state_before: str
    state_after: str


@dataclass(frozen=True)
class BenchmarkTheorem:
    """A theorem of the benchmark; `start`/`end` are (line, column) in `file_path`."""

    full_name: str
    file_path: str
    url: str
    commit: str
    start: tuple[int, int]
    end: tuple[int, int]
    traced_tactics: list[TracedTactic] = field(default_factory=list)


def remove_marks(text: str) -> str:
    """Strip LeanDojo's premise marks `<a>` and `</a>`, keeping the text between them."""
    return _MARK.sub("", text)


class _Record:
    """Field access on one JSON record that raises `DataFormatError` naming the location."""

    def __init__(self, path: Path, index: int, value: Any, name: str | None = None) -> None:
        self.path, self.index, self.value, self.name = path, index, value, name

    def fail(self, what: str) -> DataFormatError:
        who = f" ({self.name})" if self.name else ""
        return DataFormatError(f"{self.path}: record {self.index}{who}: {what}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
        if not isinstance(obj, dict):
            raise self.fail(f"{where or 'record'} must be a JSON object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(f"missing field {where + '.' if where else ''}{key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(
                f"field {where + '.' if where else ''}{key!r} must be {expected}, "
                f"got {type(value).__name__}"
            )
        return value

    def position(self, key: str) -> tuple[int, int]:
        value = self.get(self.value, key, list)
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(f"field {key!r} must be [line, column] integers, got {value!r}")
        return (value[0], value[1])


def _parse_tactic(record: _Record, raw: Any, j: int) -> TracedTactic:
    where = f"traced_tactics[{j}]"
    annotated = record.get(raw, "annotated_tactic", list, where)
    if len(annotated) != 2 or not isinstance(annotated[0], str) or not isinstance(annotated[1], list):
        raise record.fail(f"field {where}.'annotated_tactic' must be [text, premises]")
    return TracedTactic(
        tactic=record.get(raw, "tactic", str, where),
        annotated_tactic=remove_marks(annotated[0]),
        state_before=record.get(raw, "state_before", str, where),
        state_after=record.get(raw, "state_after", str, where),
    )


def _parse_theorem(path: Path, index: int, raw: Any) -> BenchmarkTheorem:
    record = _Record(path, index, raw)
    record.name = record.get(raw, "full_name", str)
    tactics = record.get(raw, "traced_tactics", list)
    return BenchmarkTheorem(
        full_name=record.name,
        file_path=record.get(raw, "file_path", str),
        url=record.get(raw, "url", str),
        commit=record.get(raw, "commit", str),
        start=record.position("start"),
        end=record.position("end"),
        traced_tactics=[_parse_tactic(record, t, j) for j, t in enumerate(tactics)],
    )


def read_benchmark(path: str | os.PathLike[str]) -> list[BenchmarkTheorem]:
    """All theorems of a LeanDojo Benchmark 4 JSON file, in file order (with or without tactics).

    Raises `FileNotFoundError` for a missing file and `DataFormatError` for invalid JSON or
    a record with a missing or mistyped field.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text: {error}") from error
    if not isinstance(raw, list):
        raise DataFormatError(f"{path}: expected a JSON list of theorems, got {type(raw).__name__}")
    return [_parse_theorem(path, i, item) for i, item in enumerate(raw)]


def write_benchmark_subset(
    source: str | os.PathLike[str], theorem_ids: Iterable[str], destination: str | os.PathLike[str]
) -> int:
    """Copy the records of `theorem_ids` from a LeanDojo JSON file into a new file of the
    same format (records unchanged, file order kept). Returns the number written.

    Raises `KeyError` naming ids that are not in `source` (nothing is silently dropped).
    """
    wanted = set(theorem_ids)
    with Path(source).open(encoding="utf-8") as handle:
        records = json.load(handle)
    kept = [r for r in records if isinstance(r, dict) and r.get("full_name") in wanted]
    missing = wanted - {r["full_name"] for r in kept}
    if missing:
        raise KeyError(f"{source}: no theorem named {', '.join(sorted(missing)[:5])}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    tmp.write_text(json.dumps(kept, ensure_ascii=True), encoding="utf-8")
    tmp.replace(destination)
    return len(kept)


# ----------------------------------------------------------------------------- examples


@dataclass
class LoadStats:
    """Counts from turning a benchmark file into tactic examples."""

    theorems: int = 0
    theorems_without_tactics: int = 0
    examples: int = 0  # kept, after deduplication
    duplicates_removed: int = 0

    def to_json(self) -> dict[str, int]:
        """A JSON-serialisable dict of the counts."""
        return asdict(self)


EXAMPLE_COLUMNS = ("theorem_id", "step", "state_before", "tactic", "state_after", "file_path")


def load_tactic_examples(
    path: str | os.PathLike[str], *, dedup: bool = True
) -> tuple[datasets.Dataset, LoadStats]:
    """(state, tactic) examples of a benchmark file as a `datasets.Dataset`.

    Columns: `theorem_id` (full name), `step` (index in the theorem's traced tactics),
    `state_before`, `tactic` (annotated text, marks removed), `state_after`, `file_path`.
    Theorems without traced tactics are skipped and counted; with `dedup`, later exact
    repeats of a (state_before, tactic) pair are removed and counted.
    """
    import datasets

    columns: dict[str, list[Any]] = {name: [] for name in EXAMPLE_COLUMNS}
    stats = LoadStats()
    seen: set[tuple[str, str]] = set()
    for theorem in read_benchmark(path):
        stats.theorems += 1
        if not theorem.traced_tactics:
            stats.theorems_without_tactics += 1
            continue
        for step, traced in enumerate(theorem.traced_tactics):
            key = (traced.state_before, traced.annotated_tactic)
            if dedup and key in seen:
                stats.duplicates_removed += 1
                continue
            seen.add(key)
            columns["theorem_id"].append(theorem.full_name)
            columns["step"].append(step)
            columns["state_before"].append(traced.state_before)
            columns["tactic"].append(traced.annotated_tactic)
            columns["state_after"].append(traced.state_after)
            columns["file_path"].append(theorem.file_path)
    stats.examples = len(columns["step"])
    features = datasets.Features(
        {name: datasets.Value("int64" if name == "step" else "string") for name in EXAMPLE_COLUMNS}
    )
    return datasets.Dataset.from_dict(columns, features=features), stats


# -------------------------------------------------------------------------------- splits


def split_theorem_ids(
    ids: Iterable[str], eval_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split distinct theorem ids into (train, eval), deterministic in (set of ids, seed).

    `eval_fraction` in [0, 1): the eval side gets `round(fraction · n)` ids, at least one
    when the fraction is positive and there are two or more ids, and never all of them.
    Both lists are sorted.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    unique = sorted(set(ids))
    n_eval = round(eval_fraction * len(unique))
    if eval_fraction > 0 and len(unique) >= 2:
        n_eval = min(max(n_eval, 1), len(unique) - 1)
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_eval:]), sorted(shuffled[:n_eval])


def split_by_theorem(
    dataset: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) datasets with every theorem's examples on one side only.

    Splits the dataset's `theorem_id` values with `split_theorem_ids`; example order is
    kept within each side.
    """
    if "theorem_id" not in dataset.column_names:
        raise ValueError(f"dataset has no 'theorem_id' column (columns: {dataset.column_names})")
    theorem_ids = dataset["theorem_id"]
    _, eval_ids = split_theorem_ids(theorem_ids, eval_fraction, seed)
    eval_set = set(eval_ids)
    eval_rows = [i for i, tid in enumerate(theorem_ids) if tid in eval_set]
    train_rows = [i for i, tid in enumerate(theorem_ids) if tid not in eval_set]
    return dataset.select(train_rows), dataset.select(eval_rows)


# -------------------------------------------------------------------------- tokenization


@dataclass
class TokenizeStats:
    """Counts from tokenizing examples under a length policy."""

    examples: int = 0  # input examples
    kept: int = 0
    truncated: int = 0  # kept with a shortened state (`training.prompt.build_prompt`)
    dropped_too_long: int = 0  # dropped by the "drop" policy
    dropped_tactic_too_long: int = 0  # tactic (+ prompt markers) alone exceeds max_length
    past_prompt_budget: int = 0  # with a prompt budget: kept, prompt cut below it for a long tactic

    def to_json(self) -> dict[str, int]:
        """A JSON-serialisable dict of the counts."""
        return asdict(self)


def tokenize_examples(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int,
    length_policy: LengthPolicy,
    max_prompt_tokens: int | None = None,
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Token ids with completion-only labels, one row per kept example.

    Sequence: `format_prompt(state_before)` tokens, then `format_completion(tactic)` tokens
    and the tokenizer's EOS. `labels` are -100 on the prompt and equal `input_ids` on the
    completion (EOS included). Examples longer than `max_length` tokens are, by
    `length_policy`, either shortened (`truncate_left`: the prompt is
    `training.prompt.build_prompt` of the state within the tokens the tactic leaves, the
    rule generation uses too — later goals go first, then the start of the first goal; the
    whole tactic stays; if not even one state character fits the example is dropped) or
    dropped (`drop`). `max_prompt_tokens` (the trainer's prompt budget, which the generators
    of the checkpoint use too): prompts longer than it are shortened to it by the same rule
    (or, under `drop`, dropped) before the `max_length` check, so a state's prompt is the
    same whatever its tactic; only a tactic longer than `max_length - max_prompt_tokens`
    shortens it further (counted in `past_prompt_budget`). Output columns: `input_ids`, `labels`,
    `attention_mask`, `theorem_id`, `step`.
    """
    import datasets

    if length_policy not in ("truncate_left", "drop"):
        raise ValueError(f"length_policy must be 'truncate_left' or 'drop', got {length_policy!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    for name in ("state_before", "tactic", "theorem_id", "step"):
        if name not in dataset.column_names:
            raise ValueError(f"dataset has no {name!r} column (columns: {dataset.column_names})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token; completions must end with one")

    states = list(dataset["state_before"])

    def token_ids(texts: list[str]) -> list[list[int]]:
        # Fast tokenizers reject an empty batch; an empty split is legitimate (eval_fraction 0).
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts = token_ids([format_prompt(s) for s in states])
    completions = token_ids([format_completion(t) for t in dataset["tactic"]])
    stats = TokenizeStats(examples=len(states))
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "attention_mask", "theorem_id", "step")}
    for row, (state, prompt, completion, theorem_id, step) in enumerate(
        zip(states, prompts, completions, dataset["theorem_id"], dataset["step"], strict=True)
    ):
        completion = [*completion, eos]
        shortened = False
        if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            if length_policy == "drop":
                stats.dropped_too_long += 1
                continue
            try:
                prompt = build_prompt(tokenizer, state, max_prompt_tokens, full_ids=prompt).ids
            except PromptTooLong:
                stats.dropped_tactic_too_long += 1
                continue
            shortened = True
        if len(prompt) + len(completion) > max_length:
            if length_policy == "drop":
                stats.dropped_too_long += 1
                continue
            try:
                prompt = build_prompt(tokenizer, state, max_length - len(completion),
                                      full_ids=None if shortened else prompt).ids
            except PromptTooLong:
                stats.dropped_tactic_too_long += 1
                continue
            shortened = True
            if max_prompt_tokens is not None:
                stats.past_prompt_budget += 1
        if shortened:
            stats.truncated += 1
        out["input_ids"].append([*prompt, *completion])
        out["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
        out["attention_mask"].append([1] * (len(prompt) + len(completion)))
        out["theorem_id"].append(theorem_id)
        out["step"].append(step)
    stats.kept = len(out["step"])
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
            "theorem_id": datasets.Value("string"),
            "step": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(out, features=features), stats


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows into tensors.

    Returns `input_ids` (padded with `pad_token_id`), `attention_mask` (0 on padding) and
    `labels` (-100 on padding), all [batch, longest] int64; plus `step` [batch] when the
    rows have it, and `proof_index` [batch] (dense index of `theorem_id` within the batch,
    in order of first appearance) when they have `theorem_id` — the grouping that
    `training.losses.proof_level_dco_loss` takes.
    """
    import torch

    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(row["input_ids"]) for row in batch)
    shape = (len(batch), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        if len(row["labels"]) != n:
            raise ValueError(f"row {i}: {len(row['labels'])} labels for {n} input ids")
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all("step" in row for row in batch):
        out["step"] = torch.tensor([int(row["step"]) for row in batch], dtype=torch.long)
    if all("theorem_id" in row for row in batch):
        first_seen: dict[str, int] = {}
        out["proof_index"] = torch.tensor(
            [first_seen.setdefault(row["theorem_id"], len(first_seen)) for row in batch],
            dtype=torch.long,
        )
    return out
