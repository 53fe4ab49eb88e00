"""The training data of expert iteration: held-out theorems, replayed proof steps, merging.

Theorems are handled as raw LeanDojo Benchmark 4 records (dicts), so that everything the
trainer reads (`training.data.read_benchmark`) is preserved byte for byte; every file
written here is validated by `read_benchmark` before it is moved into place.

A *pair* is one step of a verified proof, replayed from the theorem's root in the proof
environment: `state_before --tactic--> state_after` (`no goals` after the last step).
Duplicates are decided by the trainer's own key, `(state_before, tactic)` with the
tactic's marks removed, against the whole dataset (old data and earlier new pairs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from search.types import Failed, ProofEnvironment, Progress, Proved, Theorem

NO_GOALS = "no goals"


class ReplayError(RuntimeError):
    """A proof did not replay step by step to `no goals`; the message says where."""


@dataclass(frozen=True)
class Pair:
    """One replayed proof step with its provenance (which iteration, member and theorem)."""

    iteration: int
    member: str
    theorem: str
    step: int  # 0-based index in the proof
    state_before: str
    tactic: str
    state_after: str

    @property
    def key(self) -> tuple[str, str]:
        from training.data import remove_marks

        return (self.state_before, remove_marks(self.tactic))

    def traced_tactic(self) -> dict[str, Any]:
        """The LeanDojo `traced_tactics` entry (no premise annotations), provenance attached."""
        return {
            "tactic": self.tactic,
            "annotated_tactic": [self.tactic, []],
            "state_before": self.state_before,
            "state_after": self.state_after,
            "provenance": {"iteration": self.iteration, "member": self.member, "theorem": self.theorem, "step": self.step},
        }


def read_raw(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a LeanDojo file, validated by the trainer's reader first."""
    from training.data import read_benchmark

    read_benchmark(path)  # raises DataFormatError naming the record and field
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_leandojo(path: str | os.PathLike[str], theorems: Sequence[dict[str, Any]]) -> Path:
    """Write theorems as a LeanDojo JSON file atomically (validated before the rename)."""
    from training.data import read_benchmark

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(theorems), ensure_ascii=False) + "\n", encoding="utf-8")
    read_benchmark(tmp)
    tmp.replace(path)
    return path


def holdout_split(theorems: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training theorems, held-out theorems): `fraction` of the theorems with traced
    tactics (chosen by `training.data.split_theorem_ids`, deterministic in ids and seed)
    lose their proofs to the unproved set; all other records stay in training, in order."""
    from training.data import split_theorem_ids

    with_proofs = [t["full_name"] for t in theorems if t["traced_tactics"]]
    if len(set(with_proofs)) < 2:
        raise ValueError(f"holding out needs at least 2 theorems with traced tactics, the data has {len(set(with_proofs))}")
    _, held = split_theorem_ids(with_proofs, fraction, seed)
    held_set = set(held)
    return [t for t in theorems if t["full_name"] not in held_set], [t for t in theorems if t["full_name"] in held_set]


def initial_split(theorems: Sequence[dict[str, Any]], *, eval_fraction: float, holdout_fraction: float, seed: int,
                  unproved: Sequence[dict[str, Any]] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(training theorems, unproved set, evaluation set) of iteration 0.

    The evaluation set is `eval_fraction` of the theorems with recorded proofs, held out
    first (seed `seed`) and disjoint from everything expert iteration trains on: it is
    neither in the training data nor in the unproved set whose new proofs are harvested.
    The unproved set is then `unproved` (given) or `holdout_fraction` of the rest; with a
    given unproved set, its theorems are taken out of the evaluation set too."""
    rest, evaluation = holdout_split(theorems, eval_fraction, seed)
    if unproved is None:
        train, unproved_set = holdout_split(rest, holdout_fraction, seed)
    else:
        train, unproved_set = rest, list(unproved)
        searched = {t["full_name"] for t in unproved_set}
        evaluation = [t for t in evaluation if t["full_name"] not in searched]
    return train, unproved_set, evaluation


def replay_proof(env: ProofEnvironment, theorem: Theorem, tactics: Sequence[str], *, iteration: int, member: str,
                 tactic_timeout_s: float | None = None) -> list[Pair]:
    """The steps of `tactics` applied from the root of `theorem` in `env`, in order.

    Raises `ReplayError` when a step fails, when the proof closes before its last step,
    or when goals remain after it."""
    if not tactics:
        raise ReplayError(f"{theorem.id}: empty proof")
    state = env.start(theorem)
    pairs: list[Pair] = []
    for index, tactic in enumerate(tactics):
        result = env.apply(state, tactic, tactic_timeout_s)
        if isinstance(result, Failed):
            raise ReplayError(f"{theorem.id}: step {index + 1} ({tactic!r}) failed on replay: {result.message}")
        after = NO_GOALS if isinstance(result, Proved) else result.state.pp
        pairs.append(Pair(iteration, member, theorem.id, index, state.pp, tactic, after))
        if isinstance(result, Proved):
            if index + 1 < len(tactics):
                raise ReplayError(f"{theorem.id}: proof closed at step {index + 1} of {len(tactics)}")
            return pairs
        assert isinstance(result, Progress)
        state = result.state
    raise ReplayError(f"{theorem.id}: goals remain after the last of {len(tactics)} steps")


@dataclass
class MergeReport:
    """What `merge_pairs` did: `added` pairs joined the data; `duplicates` were already there."""

    added: list[Pair]
    duplicates: list[Pair]
    theorems_added: list[str]

    def counts(self) -> dict[str, Any]:
        per_member: dict[str, int] = {}
        for pair in self.added:
            per_member[pair.member] = per_member.get(pair.member, 0) + 1
        return {"pairs_added": len(self.added), "duplicates_skipped": len(self.duplicates),
                "theorems_added": len(self.theorems_added), "pairs_added_per_member": per_member}


def existing_keys(theorems: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """The trainer's dedup keys of every traced tactic of `theorems`."""
    from training.data import remove_marks

    return {(t["state_before"], remove_marks(t["annotated_tactic"][0])) for th in theorems for t in th["traced_tactics"]}


def merge_pairs(dataset: Sequence[dict[str, Any]], records: dict[str, dict[str, Any]], pairs: Sequence[Pair],
                iteration: int) -> tuple[list[dict[str, Any]], MergeReport]:
    """The dataset with one new record per theorem that gained pairs (appended, its
    LeanDojo fields copied from `records[theorem]`, `traced_tactics` the new pairs).

    Pairs whose key is already in the data (or repeated among `pairs`) are skipped and
    returned as duplicates, never silently dropped."""
    seen = existing_keys(dataset)
    added: list[Pair] = []
    duplicates: list[Pair] = []
    by_theorem: dict[str, list[Pair]] = {}
    for pair in pairs:
        if pair.theorem not in records:
            raise KeyError(f"pair of theorem {pair.theorem!r}, which is not in the unproved set")
        if pair.key in seen:
            duplicates.append(pair)
            continue
        seen.add(pair.key)
        added.append(pair)
        by_theorem.setdefault(pair.theorem, []).append(pair)
    merged = list(dataset)
    for theorem, theorem_pairs in by_theorem.items():
        record = {k: v for k, v in records[theorem].items() if k != "traced_tactics"}
        record["traced_tactics"] = [p.traced_tactic() for p in theorem_pairs]
        record["expert_iteration"] = {"iteration": iteration, "members": sorted({p.member for p in theorem_pairs})}
        merged.append(record)
    return merged, MergeReport(added, duplicates, list(by_theorem))


def write_pairs(path: str | os.PathLike[str], pairs: Iterable[Pair]) -> Path:
    """A JSONL sidecar, one pair (with provenance) per line, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)
    return path


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Pair(**json.loads(line)) for line in lines if line.strip()]
