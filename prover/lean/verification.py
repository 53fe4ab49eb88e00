"""Re-checking a complete proof: the command Lean elaborates and the axiom audit of its answer.

Shared by every backend (REPL, LeanDojo), so "verified" means the same everywhere:

- `verification_command` builds the theorem with its last name component replaced by a
  fresh one the verifier chose (`dco_verify_<32 hex>`, from `secrets`): `A.b` becomes
  `A.dco_verify_…`, so Lean elaborates the signature exactly as submitted (namespace `A`
  open, the preamble and `open … in` unchanged). Nothing else in any environment can have
  that component, so `#print axioms` cannot resolve to another constant (a `protected`
  declaration in a namespace, a Mathlib lemma of the same short name). `private` and
  `protected` are dropped (they only affect the name's visibility) and so are attributes.
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

__all__ = ["ALLOWED_AXIOMS", "AxiomAudit", "VerificationCommand", "audit_axioms", "fresh_name", "indent_tactics", "parse_axioms", "verification_command"]

ALLOWED_AXIOMS = frozenset({"propext", "Classical.choice", "Quot.sound"})
FRESH_PREFIX = "dco_verify_"

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_']*")  # a component that needs no «guillemets»
_REPORT = re.compile(r"'(?P<name>[^'\n]+)' depends on axioms: \[(?P<axioms>[^\]]*)\]\s*", re.DOTALL)
_NO_AXIOMS = re.compile(r"'(?P<name>[^'\n]+)' does not depend on any axioms\s*")


def fresh_name() -> str:
    """A constant name no environment can already hold (128 random bits)."""
    return FRESH_PREFIX + secrets.token_hex(16)


def indent_tactics(tactics: Sequence[str]) -> str:
    """The tactic block under `:= by` as every backend elaborates it (and `proof_text` shows it)."""
    # Each tactic starts at the block's column: a deeper first line would continue the
    # previous tactic's syntax. Relative indentation inside a tactic is kept.
    return "\n".join(textwrap.indent(textwrap.dedent(t).strip("\n"), "  ", lambda line: True) for t in tactics)


@dataclass(frozen=True)
class VerificationCommand:
    """`text`: the command to elaborate; `query`: the name to give `#print axioms` in the
    environment it produces; `fresh`: the fresh last component the audit must find."""

    text: str
    query: str
    fresh: str


def verification_command(statement: CheckedStatement, tactics: Sequence[str], fresh: str) -> VerificationCommand:
    """The theorem with its last name component replaced by `fresh`, and its tactic proof.

    Only the last component changes, so Lean elaborates the signature exactly as for the
    submitted name (`A.b` opens namespace `A` for it; the preamble, `open ... in` included,
    applies unchanged). `private`/`protected` and attributes are dropped (they only affect
    the name's visibility or tag it). The tactics are indented two spaces under `:= by`.
    """
    text = statement.text
    preamble = text[: statement.modifiers_start]
    prefix: list[str] = []
    rest_start = statement.keyword_start + len(statement.kind)
    if statement.name is not None and statement.name_end is not None:
        parts = list(statement.name_parts or statement.name.split("."))
        prefix = [p if _PLAIN.fullmatch(p) else f"«{p}»" for p in parts[:-1]]
        rest_start = statement.name_end
    declared = ".".join([*prefix, fresh])
    modifiers = " ".join(m for m in statement.modifiers if m not in ("private", "protected"))
    head = (modifiers + " " if modifiers else "") + f"theorem {declared}"
    body = f"{head}{text[rest_start:]} := by\n{indent_tactics(tactics)}"
    query = ".".join([p for p in prefix if p != "_root_"] + [fresh])
    return VerificationCommand(f"{preamble}{body}" if preamble.strip() else body, query, fresh)


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
    """The audit of the messages Lean answered to `#print axioms` of the checked declaration.

    Exactly one message, fully matching one of Lean's two report forms, naming the constant
    whose last component is `expected_name` (the fresh name); every axiom in `ALLOWED_AXIOMS`.
    """
    if len(messages_data) != 1:
        return AxiomAudit(False, f"`#print axioms {expected_name}` gave {len(messages_data)} messages, expected exactly one report")
    data = messages_data[0]
    none = _NO_AXIOMS.fullmatch(data)
    report = none or _REPORT.fullmatch(data)
    if report is None:
        return AxiomAudit(False, f"`#print axioms {expected_name}` gave no axiom report: {data[:300]!r}")
    reported = report.group("name")
    # The full name is the fresh component under the declaration's namespaces; nothing
    # else can end with the fresh component (128 random bits, chosen after submission).
    if not (reported == expected_name or reported.endswith("." + expected_name)):
        return AxiomAudit(False, f"the axiom report names `{reported}`, not the checked declaration `…{expected_name}`")
    axioms = frozenset() if none else frozenset(a.strip() for a in report.group("axioms").split(",") if a.strip())
    extra = axioms - ALLOWED_AXIOMS
    if extra:
        return AxiomAudit(False, "the proof depends on disallowed axioms: " + ", ".join(sorted(extra)), axioms)
    return AxiomAudit(True, "axioms: " + (", ".join(sorted(axioms)) if axioms else "none"), axioms)
