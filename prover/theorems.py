"""Theorem sources: LeanDojo benchmark JSON, miniF2F JSONL, and a statement typed by a user.

Every source yields `search.types.Theorem`s. For a miniF2F or typed statement, `statement`
is the declaration up to and including its final `:=` (no proof): backends append the
proof (`by ...`) themselves.
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from search.types import Theorem

MINIF2F_PATH = Path(str(resources.files("prover") / "resources" / "minif2f" / "minif2f.jsonl"))
MINIF2F_SOURCE = "minif2f"

_DECLARATION = re.compile(r"^\s*(?:/--.*?-/\s*)?(?:@\[[^\]]*\]\s*)?(?:(?:private|protected|noncomputable)\s+)*(theorem|lemma|example)\b\s*([^\s:({\[]*)", re.DOTALL)
# A trailing proof stub after the statement: `:= by`, `:= by sorry`, `:= sorry` (any spacing).
_PROOF_STUB = re.compile(r":=\s*(?:by\s*)?(?:sorry\s*)?$")


class TheoremNotFoundError(LookupError):
    """A theorem name is not in the source; the message lists close matches."""


class TheoremSourceError(ValueError):
    """A theorem file is missing or malformed; the message names the file and the line/entry."""


def strip_proof_stub(statement: str) -> str:
    """`theorem X : P := by` / `... := by sorry` / `... :=` / `theorem X : P` → `theorem X : P :=`."""
    text = statement.strip()
    text = _PROOF_STUB.sub("", text).rstrip()
    if not text:
        raise ValueError("empty theorem statement")
    return f"{text} :="


def declaration_name(statement: str) -> str:
    """The declared name of `theorem NAME ...` / `lemma NAME ...`; `example` for examples.

    Read with the untrusted-text lexer (`prover.lean.untrusted.split_statement`), so a
    preamble (`open ... in`, `namespace`), attributes and comments are understood the way
    the Lean backends understand them; the regex is the fallback for text it cannot lex.
    """
    from prover.lean.untrusted import UntrustedInputError, split_statement

    try:
        split = split_statement(statement)
    except UntrustedInputError:
        split = None
    if split is not None:
        if split.kind == "example":
            return "example"
        if split.name:
            return split.name
    match = _DECLARATION.match(statement)
    if match is None:
        raise ValueError(
            "a statement must be one `theorem`, `lemma` or `example` declaration, e.g. "
            "`theorem foo (n : Nat) : n + 0 = n`; got: " + statement.strip()[:120]
        )
    kind, name = match.groups()
    if kind == "example":
        return "example"
    if not name:
        raise ValueError(f"the {kind} declaration has no name: {statement.strip()[:120]}")
    return name


def theorem_from_statement(statement: str, *, header: str = "", theorem_id: str | None = None) -> Theorem:
    """A theorem typed by a user (CLI `--statement`, the service). Checked only for shape here;
    untrusted-input rules are applied by the Lean backends."""
    normalised = strip_proof_stub(statement)
    return Theorem(
        id=theorem_id or declaration_name(normalised),
        statement=normalised,
        header=header,
        metadata={"source": "statement"},
    )


def load_leandojo(path: str | Path | None = None) -> list[Theorem]:
    """Theorems of a LeanDojo benchmark JSON file (default: the bundled sample), in file order.

    `statement` is empty (LeanDojo opens theorems by file and name); `metadata` holds
    `url`, `commit`, `file_path`, `start`, `end`, `traced_tactics` (their count) and `source`.
    """
    from training.data import SAMPLE_PATH, read_benchmark

    file = Path(path) if path is not None else Path(SAMPLE_PATH)
    if not file.is_file():
        raise TheoremSourceError(f"benchmark file {file} does not exist")
    return [
        Theorem(
            id=t.full_name,
            metadata={
                "source": str(file),
                "url": t.url,
                "commit": t.commit,
                "file_path": t.file_path,
                "start": list(t.start),
                "end": list(t.end),
                "traced_tactics": len(t.traced_tactics),
            },
        )
        for t in read_benchmark(file)
    ]


def load_minif2f(path: str | Path | None = None, *, split: str | None = None) -> list[Theorem]:
    """miniF2F theorems from a JSONL file with `name`, `split`, `header`, `formal_statement`.

    `split` (`valid` / `test`) keeps that split only; `metadata` has `split`, `goal` when
    present, and `source`.
    """
    file = Path(path) if path is not None else MINIF2F_PATH
    if not file.is_file():
        raise TheoremSourceError(f"miniF2F file {file} does not exist")
    theorems: list[Theorem] = []
    with file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, statement = record["name"], record["formal_statement"]
                header = record.get("header", "")
                entry_split = record.get("split", "")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise TheoremSourceError(f"{file}:{line_no}: not a miniF2F record ({err})") from err
            if split is not None and entry_split != split:
                continue
            metadata = {"source": str(file), "split": entry_split}
            if "goal" in record:
                metadata["goal"] = record["goal"]
            theorems.append(Theorem(id=name, statement=strip_proof_stub(statement), header=header, metadata=metadata))
    return theorems


def load_theorems(source: str | Path | None = None) -> list[Theorem]:
    """Theorems of a source: `"minif2f"` (bundled), a `.jsonl` miniF2F file, or a LeanDojo
    `.json` benchmark file (default: the bundled LeanDojo sample)."""
    if source is None:
        return load_leandojo()
    if str(source) == MINIF2F_SOURCE:
        return load_minif2f()
    path = Path(source)
    if path.suffix == ".jsonl":
        return load_minif2f(path)
    return load_leandojo(path)


def find_theorem(source: str | Path | Sequence[Theorem] | None, name: str) -> Theorem:
    """The theorem called `name` in `source` (a sequence, or anything `load_theorems` takes).

    Raises `TheoremNotFoundError` naming the source and listing close matches.
    """
    theorems: Iterable[Theorem] = source if isinstance(source, Sequence) and not isinstance(source, str) else load_theorems(source)
    by_id = {t.id: t for t in theorems}
    if name in by_id:
        return by_id[name]
    close = difflib.get_close_matches(name, list(by_id), n=5, cutoff=0.5)
    suffix_matches = [t for t in by_id if t.endswith("." + name) or t.split(".")[-1] == name]
    suggestions = list(dict.fromkeys(suffix_matches + close))[:5]
    where = "the given theorems" if isinstance(source, Sequence) and not isinstance(source, str) else str(source or "the bundled LeanDojo sample")
    message = f"unknown theorem {name!r} in {where} ({len(by_id)} theorems)"
    if suggestions:
        message += "; did you mean: " + ", ".join(suggestions)
    raise TheoremNotFoundError(message)
