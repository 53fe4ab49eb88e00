"""Re-checking a complete proof: the command Lean elaborates and the axiom audit of its answer.

Shared by every backend (REPL, LeanDojo), so "verified" means the same everywhere:

- `verification_command` builds the theorem *under a fresh name* the verifier chose
  (`dco_verify_<32 hex>`, from `secrets`), declared as `_root_.<fresh>`: nothing else in
  any environment can have that name, so `#print axioms <fresh>` cannot resolve to another
  constant (a `protected` declaration in a namespace, a Mathlib lemma of the same short
  name). The statement keeps its meaning: a dotted name `A.B.c` elaborates its signature with
  namespace `A.B` open, so the command is wrapped in `namespace A.B ... end A.B`; `private`
  and `protected` are dropped (they only affect visibility of the name) and so are the
  attributes (they only tag the name).
- `audit_axioms` accepts Lean's answer only when it is exactly one report
  (`'<fresh>' depends on axioms: [...]` or `'<fresh>' does not depend on any axioms`) that
  names the fresh constant, and every axiom is in `ALLOWED_AXIOMS` (so `sorryAx`,
  `Lean.ofReduceBool`, `Lean.trustCompiler` and any user axiom fail).
"""

from __future__ import annotations

import re
import secrets
import textwrap
from dataclasses import dataclass
from typing import Sequence

from prover.lean.untrusted import CheckedStatement

__all__ = ["ALLOWED_AXIOMS", "AxiomAudit", "audit_axioms", "fresh_name", "parse_axioms", "verification_command"]

ALLOWED_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})
FRESH_PREFIX = "dco_verify_"

_REPORT = re.compile(r"'(?P<name>[^'\n]+)' depends on axioms: \[(?P<axioms>[^\]]*)\]\s*", re.DOTALL)
_NO_AXIOMS = re.compile(r"'(?P<name>[^'\n]+)' does not depend on any axioms\s*")


def fresh_name() -> str:
    """A constant name no environment can already hold (128 random bits)."""
    return FRESH_PREFIX + secrets.token_hex(16)


def _indent_tactics(tactics: Sequence[str]) -> str:
    # Each tactic starts at the block's column: a deeper first line would continue the
    # previous tactic's syntax. Relative indentation inside a tactic is kept.
    return "\n".join(textwrap.indent(textwrap.dedent(t).strip("\n"), "  ", lambda line: True) for t in tactics)


def verification_command(statement: CheckedStatement, tactics: Sequence[str], name: str) -> str:
    """The whole theorem, renamed to `_root_.<name>`, with its tactic proof (indented two spaces).

    Raises ValueError when the statement's name cannot be reproduced under a fresh name
    (`_root_.A.b` inside a `namespace` of the preamble).
    """
    text = statement.text
    preamble = text[: statement.modifiers_start]
    namespace = ""
    rest_start = statement.keyword_start + len(statement.kind)
    if statement.name is not None and statement.name_end is not None:
        declared = statement.name
        if declared.startswith("_root_."):
            declared = declared[len("_root_."):]
            if re.search(r"(^|\s)namespace\s", preamble):
                raise ValueError("a `_root_.` name inside a `namespace` cannot be re-checked under a fresh name")
        namespace = declared.rpartition(".")[0]
        rest_start = statement.name_end
    modifiers = " ".join(m for m in statement.modifiers if m not in ("private", "protected"))
    head = (modifiers + " " if modifiers else "") + f"theorem _root_.{name}"
    body = f"{head}{text[rest_start:]} := by\n{_indent_tactics(tactics)}"
    if namespace:
        body = f"namespace {namespace}\n{body}\nend {namespace}"
    return f"{preamble}{body}" if preamble.strip() else body


@dataclass(frozen=True)
class AxiomAudit:
    """`ok`: the report names `expected_name` and lists only allowed axioms; `axioms` as reported."""

    ok: bool
    message: str
    axioms: frozenset[str] = frozenset()


def parse_axioms(messages_data: Sequence[str]) -> frozenset[str] | None:
    """Axioms named by the first `#print axioms` report among messages; None without one.

    Only for display: verification uses `audit_axioms`, which also checks the name.
    """
    for data in messages_data:
        m = _NO_AXIOMS.search(data)
        if m:
            return frozenset()
        m = _REPORT.search(data)
        if m:
            return frozenset(a.strip() for a in m.group("axioms").split(",") if a.strip())
    return None


def audit_axioms(messages_data: Sequence[str], expected_name: str) -> AxiomAudit:
    """The audit of the messages Lean answered to `#print axioms <expected_name>`.

    Exactly one message, fully matching one of Lean's two report forms, naming
    `expected_name`; every axiom in `ALLOWED_AXIOMS`.
    """
    if len(messages_data) != 1:
        return AxiomAudit(False, f"`#print axioms {expected_name}` gave {len(messages_data)} messages, expected exactly one report")
    data = messages_data[0]
    none = _NO_AXIOMS.fullmatch(data)
    report = none or _REPORT.fullmatch(data)
    if report is None:
        return AxiomAudit(False, f"`#print axioms {expected_name}` gave no axiom report: {data[:300]!r}")
    if report.group("name") != expected_name:
        return AxiomAudit(False, f"the axiom report names `{report.group('name')}`, not the checked declaration `{expected_name}`")
    axioms = frozenset() if none else frozenset(a.strip() for a in report.group("axioms").split(",") if a.strip())
    extra = axioms - ALLOWED_AXIOMS
    if extra:
        return AxiomAudit(False, "the proof depends on disallowed axioms: " + ", ".join(sorted(extra)), axioms)
    return AxiomAudit(True, "axioms: " + (", ".join(sorted(axioms)) if axioms else "none"), axioms)
