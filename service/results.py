"""What a finished job tells its user, derived from the stored search result record.

- `proof_text`: the verified proof as Lean text to paste, the whole `theorem … := by`
  block. Tactics are laid out as the Lean backends verify them
  (`prover.lean.verification.indent_tactics`): each starts at a two-space block column, its
  own relative indentation kept. The replay backend has no statement text, so its block is
  `theorem <name> := by` and the tactics.
- `axioms`: what the Lean backend's `#print axioms` audit found (its verification message
  reads `verified; axioms: a, b` or `verified; axioms: none`); None when the backend does
  not audit axioms.
- `failure_reason`: why a failed search failed.
- `counters`: the search's work counters.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

_AXIOMS = re.compile(r"^verified; axioms: (.*)$")
COUNTERS = ("expansions", "passes", "lean_calls", "generator_calls", "max_depth_reached", "wall_time_s", "lean_time_s", "generator_time_s")


def proof_text(theorem: dict[str, Any], tactics: Sequence[str]) -> str:
    statement = (theorem.get("statement") or "").strip()
    head = statement if statement else f"theorem {theorem['id']}"
    from prover.lean.verification import indent_tactics

    return f"{head} := by\n{indent_tactics(tactics)}"


def axioms_of(result: dict[str, Any]) -> list[str] | None:
    match = _AXIOMS.match(result.get("verification_message") or "")
    if match is None:
        return None
    names = match.group(1).strip()
    return [] if names == "none" else [n.strip() for n in names.split(",") if n.strip()]


def failure_reason(result: dict[str, Any], budget: dict[str, Any]) -> str | None:
    """budget_exhausted | timeout | depth_cap (every branch failed or was cut at the depth
    cap, and some reached it) | all_branches_failed; None for other statuses."""
    status = result.get("status")
    if status in ("budget_exhausted", "timeout"):
        return status
    if status == "failed":
        if int(result.get("max_depth_reached", 0)) >= int(budget.get("max_depth", 1 << 62)):
            return "depth_cap"
        return "all_branches_failed"
    return None


def counters(result: dict[str, Any]) -> dict[str, Any]:
    return {name: result.get(name, 0) for name in COUNTERS}
