"""The one shared tactic filter and the candidate-list normaliser.

Every component that decides whether a proposed tactic may reach Lean calls this module
(search, the prover's generators, the service's checks), so the forbidden list has one
owner.

Forbidden by default: unfinished proofs (`sorry`, `admit`, `stop`, `sorryAx`) and every
native-evaluation form, which makes the kernel trust compiled code (`native_decide`,
`decide +native`, `decide (config := {native := true})`, `(config := .native)`,
`Lean.ofReduceBool`, `Lean.reduceBool`, `Lean.trustCompiler`) or runs it (`plausible`,
`slim_check`, `polyrith`, `bv_decide`). The Lean backends' screen
(`prover.lean.untrusted`) and the verifier's axiom audit catch these too; dropping them
here saves the wasted calls.

Matching is on whole Lean identifiers: a forbidden name matches only where it is not part
of a longer identifier. `exact sorry`, `sorry`, `(admit)` and `native_decide` are rejected;
`sorry_lemma`, `my_admit'`, `Foo.sorry` (a different, qualified name) and `admitted` are
allowed; a leading-dot name (`.native`) matches. Identifier characters are Unicode word characters plus `'`, `!`, `?`, and `.`
joins qualified names. Occurrences inside comments or strings also match: the filter is
deliberately conservative (a rejected candidate costs nothing, a `sorry` reaching Lean costs
a wasted call and verification catches it anyway).
"""

from __future__ import annotations

import math
import re
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from search.types import Candidate

DEFAULT_FORBIDDEN: tuple[str, ...] = (
    "sorry", "admit", "stop", "sorryAx",
    "native_decide", "native", "ofReduceBool", "Lean.ofReduceBool", "reduceBool", "Lean.reduceBool",
    "trustCompiler", "Lean.trustCompiler", "plausible", "slim_check", "polyrith", "bv_decide",
)

# A forbidden entry is a (possibly qualified) identifier: no whitespace, no punctuation
# other than identifier characters.
_IDENTIFIER = re.compile(r"[\w'!?]+(?:\.[\w'!?]+)*")

_SCORE = itemgetter(1)

# Positive log-probabilities are invalid; tiny positives from float rounding are clamped.
LOGPROB_TOLERANCE = 1e-6


class TacticFilter:
    """Rejects tactics that mention a forbidden identifier (default: `DEFAULT_FORBIDDEN`).

    Immutable after construction; cheap to share between threads and searches.
    """

    __slots__ = ("forbidden", "_pattern")

    def __init__(self, forbidden: Iterable[str] = DEFAULT_FORBIDDEN) -> None:
        if isinstance(forbidden, str):
            raise TypeError("forbidden must be a collection of identifiers, not a single string")
        names = tuple(dict.fromkeys(forbidden))
        for name in names:
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"forbidden tactic entry must be a Lean identifier, got {name!r}")
        self.forbidden: tuple[str, ...] = names
        if names:
            alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            # Not preceded by an identifier char or by `<identifier char>.` (a qualified
            # name's component); a leading-dot shorthand `.native` does match.
            self._pattern: re.Pattern[str] | None = re.compile(
                rf"(?<![\w'!?])(?<![\w'!?]\.)(?:{alternatives})(?![\w'!?])"
            )
        else:
            self._pattern = None

    def reason(self, tactic: str) -> str | None:
        """Why `tactic` is rejected (naming the forbidden identifier), or None if allowed."""
        if self._pattern is None:
            return None
        match = self._pattern.search(tactic)
        if match is None:
            return None
        return f"forbidden identifier {match.group(0)!r}"

    def allows(self, tactic: str) -> bool:
        return self._pattern is None or self._pattern.search(tactic) is None

    def __repr__(self) -> str:
        return f"TacticFilter(forbidden={self.forbidden!r})"


@dataclass
class PreparedCandidates:
    """The usable candidates of one proposal, best first, and what was dropped (counts).

    `candidates` holds distinct stripped tactic strings sorted by descending log-probability
    (ties keep first-proposed order); `dropped` counts by reason: `empty`, `duplicate`,
    `forbidden`, `invalid` (not a Candidate, non-string tactic, NaN or positive log-prob).
    """

    candidates: list[Candidate]
    dropped: dict[str, int] = field(default_factory=dict)
    invalid_example: str | None = None  # repr of the first invalid item, for error messages


def normalize_pairs(candidates: Sequence[object]) -> tuple[list[tuple[str, float]], dict[str, int], str | None]:
    """The normaliser on plain pairs (the search's hot path): returns `(tactic, logprob)`
    pairs best first, the dropped counts by reason, and the repr of the first invalid item.

    Strips tactics, drops empty and invalid items, keeps the max log-prob per distinct
    string, sorts by descending log-prob (stable: ties keep first-proposed order).
    """
    best: dict[str, float] = {}
    empty = duplicate = invalid = 0
    invalid_example: str | None = None
    for item in candidates:
        if type(item) is Candidate:
            tactic, logprob = item.tactic, item.logprob
            # Fast path: the common well-formed case (NaN fails `<=` and takes the slow path).
            if type(tactic) is str and type(logprob) is float and logprob <= 0.0:
                tactic = tactic.strip()
                if not tactic:
                    empty += 1
                    continue
                previous = best.get(tactic)
                if previous is None:
                    best[tactic] = logprob
                else:
                    duplicate += 1
                    if logprob > previous:
                        best[tactic] = logprob
                continue
        elif not isinstance(item, Candidate):
            invalid += 1
            invalid_example = invalid_example or repr(item)[:200]
            continue
        tactic, logprob = item.tactic, item.logprob
        if (
            not isinstance(tactic, str)
            or not isinstance(logprob, (int, float))
            or math.isnan(logprob)
            or logprob > LOGPROB_TOLERANCE
        ):
            invalid += 1
            invalid_example = invalid_example or repr(item)[:200]
            continue
        logprob = float(logprob) if logprob <= 0.0 else 0.0
        tactic = tactic.strip()
        if not tactic:
            empty += 1
            continue
        previous = best.get(tactic)
        if previous is None:
            best[tactic] = logprob
        else:
            duplicate += 1
            if logprob > previous:
                best[tactic] = logprob
    # Stable even with reverse=True: equal scores keep first-proposed order.
    ordered = sorted(best.items(), key=_SCORE, reverse=True)
    dropped: dict[str, int] = {}
    if empty:
        dropped["empty"] = empty
    if duplicate:
        dropped["duplicate"] = duplicate
    if invalid:
        dropped["invalid"] = invalid
    return ordered, dropped, invalid_example


def normalize_candidates(candidates: Sequence[object]) -> PreparedCandidates:
    """`normalize_pairs` returning `Candidate`s. Every dropped item is counted."""
    pairs, dropped, invalid_example = normalize_pairs(candidates)
    return PreparedCandidates([Candidate(t, lp) for t, lp in pairs], dropped, invalid_example)


def prepare_candidates(candidates: Sequence[object], tactic_filter: TacticFilter) -> PreparedCandidates:
    """`normalize_candidates`, then remove tactics the filter rejects (counted as `forbidden`)."""
    prepared = normalize_candidates(candidates)
    allows = tactic_filter.allows
    kept = [c for c in prepared.candidates if allows(c.tactic)]
    forbidden = len(prepared.candidates) - len(kept)
    if forbidden:
        prepared.dropped["forbidden"] = forbidden
        prepared.candidates = kept
    return prepared
