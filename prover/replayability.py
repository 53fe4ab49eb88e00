"""Which LeanDojo theorems the replay environment may open, and why the others may not.

The replay environment (`prover.replay`) proves a theorem by walking recorded transitions
from a *root* goal. That is sound only if the root is the theorem's whole statement and
the walk is a tactic proof of it. This module decides that from LeanDojo Benchmark 4 data
alone (`traced_tactics`: `tactic`, `state_before`, `state_after`), models the goal stack,
and counts the outcome for reports.

How LeanDojo records a proof (LeanDojo 2.0 `TracedTheorem.get_traced_tactics` and the
benchmark script, checked against the bundled sample):

- every element of every tactic sequence in the declaration (`by` blocks of the
  statement, of the proof, nested `by`s, bullet bodies) is one traced tactic; the
  sequences are listed in pre-order of the syntax tree, each sequence's own elements
  contiguous, so a nested sequence comes after all elements of its parent sequence, and
  the statement's `by` blocks come before the proof's;
- identical `(state_before, tactic, state_after)` triples are kept once;
- tactics whose text contains `·` (focusing bullets, and also `(· + ·)` lambdas) and
  tactics run on `no goals` are dropped. A bullet's body is still traced, and its
  `state_before` is the focused goal alone: the goals after the bullet are not shown.

The rule (`analyse_theorem`) — a theorem is replayable iff all of:

1. it has traced tactics (otherwise its proof is a term, or untraced);
2. the *root*, the first traced tactic's `state_before`, is one goal, without a `case`
   tag, without metavariables (`?u.1`, `?m.2`, `?a`) and whose last variable is not an
   anonymous non-instance one (`x✝`). A theorem's initial goal has none of these; a side
   goal made by `refine`, `constructor`, `cases` carries a tag, a `by` block inside the
   statement is elaborated with the statement's universe metavariables still open, and
   `fun _ ↦ by …` in a term-mode proof adds an anonymous variable;
3. the declaration ENDS with a traced tactic: its last line (LeanDojo's `end` position)
   is the last line of a traced tactic standing on a line of its own, at an even
   indentation of 2 to 12 columns (Mathlib's layout of a `:= by` proof). A term-mode
   proof ends with its term (`⟨fun h => …, by …⟩` ends with `⟩`) and a statement whose
   `by` block was traced ends with the untraced rest of the declaration; a declaration on
   one line, or whose proof shares a line with its statement, cannot be checked and is
   refused;
4. the theorem's *own* traced tactics close the root under the goal-stack model below
   (searched breadth-first; the shortest such proof is the recorded proof);
5. every traced tactic of the theorem is accounted for: it applies at a goal list
   reached from the root, or acts on goals that occur in such lists (it is part of, or an
   alternative within, the proof), or its
   text sits inside another traced tactic's text after a nested-block opener (`by`,
   `=>`, `(`, `|`, `;`, a line start, ...), i.e. it proves a side goal of a step of this
   proof.

Why this cannot report a side goal as the theorem: a `by` block in the statement comes
first in the trace, so it becomes the root. If the real proof is traced too, its tactics
start from the statement's goal, which no walk from the side goal reaches and which no
traced tactic contains: rule 5 refuses it (and rule 2 already does when the block was
elaborated with open universe metavariables: `MeasureTheory.OuterMeasure.comap_ofFunction`
in the bundled sample). If the real proof is not traced, or the proof is a term with a
`by` block inside, the declaration does not end with a traced tactic on its own line:
rule 3 refuses it (`Finset.noncommProd_singleton`, whose traced tactics are the
statement's `(by norm_cast; exact …)`, and `antisymm_iff`, proved by
`⟨fun h => …, by rintro rfl; exact …⟩`, in the bundled sample — both were "proved" by the
replay before). A root that is itself a side goal (tagged, several goals, metavariables)
is refused by rule 2, a trace that skips steps (a dropped tactic) by rule 4.

What data alone cannot show, and is therefore a documented limit rather than a check: a
term-mode proof whose LAST part is a `by` block laid out like a tactic proof
(`:= fun x => by` + tactics on their own lines), and a tactic proof whose FIRST tactic was
dropped for containing `·`, look exactly like a tactic proof of a statement whose goal is
that root. Only the statement text (newer LeanDojo versions record `theorem_statement`;
LeanDojo's `corpus.jsonl` has each declaration's code) or Lean itself can tell them apart.
For the bundled sample every theorem the rule accepts (41) was checked against its Mathlib
source (read in public copies of mathlib4 close to the benchmark's commit): 40 are `:= by`
tactic proofs of their statement; the one such case, `SetTheory.PGame.zero_lf_inv'` (a proof by pattern matching,
`| ⟨xl, xr, xL, xR⟩ => by …`), is refused by an annotation
(`prover/resources/replay_exclusions.json`, category `known_not_tactic_proof`).

Goal-stack model (`step`): a state is the goal list, goals separated by a blank line,
each goal with exactly one `⊢` line. A recorded `(state_before, tactic) → state_after`
applies to a state equal to `state_before`; and, focused, to a state whose FIRST goal
equals a one-goal `state_before` (the others are carried along unchanged after the
tactic's new goals), provided the tactic acts on the main goal only (no `all_goals`,
`exacts`, `case`, `swap`, `done`, sequence combinators, ...) and no goal of the state
has a metavariable (closing one goal could then change another). `no goals` for the
focused goal is not `no goals` for the state: the proof is closed only when the list is
empty.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

NO_GOALS = "no goals"
GOAL_SEPARATOR = "\n\n"
TURNSTILE = "⊢"

# Reason categories (stable strings: they appear in error messages and eval summaries).
NO_TRACED_TACTICS = "no_traced_tactics"
ROOT_NOT_STATEMENT = "root_not_statement"
TRACE_INCOMPLETE = "trace_incomplete"
FOREIGN_TACTICS = "foreign_tactics"
PROOF_NOT_AT_END = "proof_not_at_end"
KNOWN_NOT_TACTIC_PROOF = "known_not_tactic_proof"
REASONS = (NO_TRACED_TACTICS, ROOT_NOT_STATEMENT, PROOF_NOT_AT_END, TRACE_INCOMPLETE, FOREIGN_TACTICS, KNOWN_NOT_TACTIC_PROOF)
REASON_TEXT = {
    NO_TRACED_TACTICS: "no traced tactics (a term-mode or untraced proof)",
    ROOT_NOT_STATEMENT: "the first traced goal is not a theorem's initial goal (several goals, a case tag or metavariables: a side goal)",
    TRACE_INCOMPLETE: "the traced tactics do not close the first traced goal (steps missing from the trace, e.g. tactics containing '·' that LeanDojo drops)",
    PROOF_NOT_AT_END: "the declaration does not end with a traced tactic on a line of its own (a term-mode proof, e.g. `⟨fun h => …, by …⟩`, or an untraced proof after a `by` block of the statement)",
    KNOWN_NOT_TACTIC_PROOF: "its Mathlib source shows a proof that is not a tactic proof of the statement, which the data cannot show (`prover/resources/replay_exclusions.json`)",
    FOREIGN_TACTICS: "traced tactics outside the proof of the first traced goal (a `by` block in the statement or a term-mode proof: the first goal is a side goal)",
}

# `start` refuses a theorem with this prefix; eval summaries count it back from records.
NOT_REPLAYABLE = "not replayable"
_REASON_IN_MESSAGE = re.compile(re.escape(NOT_REPLAYABLE) + r" \[([a-z_]+)\]")

_METAVARIABLE = re.compile(r"(?<![\w'.!?])\?[^\W\d]")
_METAVARIABLE_NAME = re.compile(r"\?[\w.]*")
# Tactics that look at or change goals other than the main one: never applied focused.
_GOAL_LIST_WORDS = re.compile(
    r"(?<![\w'.])(?:all_goals|any_goals|exacts|case'?|next|swap|rotate_left|rotate_right|pick_goal|"
    r"on_goal|done|iterate|repeat'?|repeat1|sorry|admit|fail_if_no_progress|focus|solve)(?![\w'])"
)
# Tactics that take a tactic SEQUENCE run on the current goal list (whose later elements
# would act on the next goal once the first is closed): never applied focused.
_SEQUENCE_COMBINATORS = re.compile(r"^\s*(?:\(|try\b|first\b|classical\b|with_reducible\b|any_goals\b|all_goals\b)")
# What may open a nested tactic block inside a tactic's text (followed by the nested tactic).
_NESTED_OPENERS = ("by", "=>", "(", "|", ";", "<;>", "try", "classical", "first", "focus", "all_goals", "any_goals")
MAX_PROOF_INDENT = 12  # columns: a tactic block nested six levels deep at most (rule 3)
MAX_REPLAY_STATES = 20_000  # breadth-first search bound per theorem (goal lists visited)


def collapse_whitespace(tactic: str) -> str:
    """The replay graph's matching key: whitespace runs (spaces, tabs, newlines) → one space, trimmed."""
    return " ".join(tactic.split())


def split_goals(state: str) -> list[str] | None:
    """The goals of a pretty-printed state (`[]` for `no goals`); `None` when the text is
    not a list of goals each with exactly one `⊢` line (then nothing is applied focused)."""
    if state == NO_GOALS:
        return []
    goals = state.split(GOAL_SEPARATOR)
    for goal in goals:
        turnstiles = sum(1 for line in goal.split("\n") if line.startswith(TURNSTILE))
        if turnstiles != 1 or not goal.strip():
            return None
    return goals


def join_goals(goals: Sequence[str]) -> str:
    return GOAL_SEPARATOR.join(goals) if goals else NO_GOALS


def has_metavariable(text: str) -> bool:
    """`?u.123`, `?m.4`, `?a`: an unassigned metavariable (not `l.head?`)."""
    return _METAVARIABLE.search(text) is not None


def acts_on_main_goal_only(tactic: str) -> bool:
    """Conservatively: the tactic reads and changes the main goal only, so running it with
    other goals present gives its focused result plus those goals unchanged."""
    return not (_GOAL_LIST_WORDS.search(tactic) or "·" in tactic or _SEQUENCE_COMBINATORS.match(tactic))


Edges = Mapping[tuple[str, str], str]


def step(edges: Edges, state: str, key: str) -> str | None:
    """The goal list after tactic `key` (collapsed text) on `state`, or `None` when no
    recorded transition applies (see the module docstring's goal-stack model)."""
    if state == NO_GOALS:
        return None
    after = edges.get((state, key))
    if after is not None:
        return after
    goals = split_goals(state)
    if goals is None or len(goals) < 2 or not acts_on_main_goal_only(key):
        return None
    if any(has_metavariable(goal) for goal in goals):
        return None
    focused = edges.get((goals[0], key))
    if focused is None:
        return None
    new_goals = split_goals(focused)
    if new_goals is None:
        return None
    return join_goals(new_goals + goals[1:])


@dataclass(frozen=True)
class Replayability:
    """The verdict on one theorem. When `replayable`, `root` is its statement's goal and
    `tactics` a proof of it (original spellings, in order); otherwise `category` (one of
    `REASONS`) and `detail` say why not."""

    theorem_id: str
    replayable: bool
    root: str | None = None
    tactics: tuple[str, ...] = ()
    category: str = ""
    detail: str = ""

    @property
    def message(self) -> str:
        """`not replayable [category]: detail` (empty when replayable)."""
        return "" if self.replayable else f"{NOT_REPLAYABLE} [{self.category}]: {self.detail}"


def _refuse(theorem_id: str, category: str, detail: str, root: str | None = None) -> Replayability:
    return Replayability(theorem_id, False, root=root, category=category, detail=detail)


EXCLUSIONS_PATH = Path(str(resources.files("prover") / "resources" / "replay_exclusions.json"))


def load_exclusions(path: str | Path | None = None) -> dict[str, str]:
    """Full name → why its proof is not a tactic proof of the statement, for theorems the
    data-only rule cannot refuse (read from `path`, default the bundled annotations)."""
    data = json.loads(Path(path or EXCLUSIONS_PATH).read_text(encoding="utf-8"))
    theorems = data.get("theorems") if isinstance(data, dict) else None
    if not isinstance(theorems, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in theorems.items()):
        raise ValueError(f"{path or EXCLUSIONS_PATH}: expected {{\"theorems\": {{full name: reason}}}}")
    return dict(theorems)


def excluded(theorem_id: str, why: str, verdict: Replayability) -> Replayability:
    """`verdict` overridden by an exclusion annotation (only ever from replayable to not)."""
    if not verdict.replayable:
        return verdict
    return _refuse(theorem_id, KNOWN_NOT_TACTIC_PROOF, f"its Mathlib source is not a tactic proof of the statement: {why}", verdict.root)


def analyse_theorem(
    theorem_id: str, traced: Sequence[Any], span: tuple[tuple[int, int], tuple[int, int]] | None = None
) -> Replayability:
    """Apply the module docstring's rule to one theorem's traced tactics (objects with
    `tactic`, `state_before`, `state_after`, in file order). `span` is the declaration's
    LeanDojo `(start, end)` `(line, column)` positions; without it the end check (rule 3)
    cannot be made and the theorem is refused."""
    if not traced:
        return _refuse(theorem_id, NO_TRACED_TACTICS, REASON_TEXT[NO_TRACED_TACTICS])
    root = traced[0].state_before
    goals = split_goals(root)
    if goals is None or len(goals) != 1:
        count = "an unparsable goal list" if goals is None else f"{len(goals)} goals"
        return _refuse(theorem_id, ROOT_NOT_STATEMENT, f"the first traced state has {count}, a theorem starts with one goal")
    if root.startswith("case "):
        tag = root.split("\n", 1)[0]
        return _refuse(theorem_id, ROOT_NOT_STATEMENT, f"the first traced goal is tagged ({tag!r}): a side goal, not the statement")
    anonymous = _anonymous_last_variable(root)
    if anonymous:
        return _refuse(
            theorem_id, ROOT_NOT_STATEMENT,
            f"the first traced goal's last variable is anonymous ({anonymous!r}), as `fun _ ↦ by …` in a term-mode proof "
            "introduces: not trusted as the statement's goal",
        )
    if has_metavariable(root):
        found = _METAVARIABLE.search(root)
        assert found is not None
        return _refuse(
            theorem_id, ROOT_NOT_STATEMENT,
            f"the first traced goal has a metavariable ({_METAVARIABLE_NAME.match(root, found.start()).group(0)!r}), "
            "as a `by` block elaborated inside the statement has: not trusted as the statement's goal",
        )

    ending = _proof_ends_declaration(traced, span)
    if ending:
        return _refuse(theorem_id, PROOF_NOT_AT_END, ending, root)

    edges: dict[tuple[str, str], str] = {}
    spelling: dict[str, str] = {}
    for t in traced:
        key = collapse_whitespace(t.tactic)
        edges.setdefault((t.state_before, key), t.state_after)
        spelling.setdefault(key, t.tactic)
    keys = list(spelling)
    path, visited = _shortest_proof(edges, keys, root)
    if path is None:
        why = "the search over goal lists hit its bound" if len(visited) >= MAX_REPLAY_STATES else "no sequence of them reaches `no goals`"
        return _refuse(theorem_id, TRACE_INCOMPLETE, f"{len(traced)} traced tactics do not close the first goal ({why})", root)
    foreign = [t.tactic for t in traced if not _accounted(t, edges, visited, traced)]
    if foreign:
        shown = ", ".join(repr(collapse_whitespace(t))[:80] for t in foreign[:3])
        return _refuse(
            theorem_id, FOREIGN_TACTICS,
            f"{len(foreign)} traced tactic(s) prove goals that the proof of the first goal never reaches ({shown}): "
            "the first goal is a side goal (a `by` block in the statement or in a term-mode proof)",
            root,
        )
    return Replayability(theorem_id, True, root=root, tactics=tuple(spelling[k] for k in path))


def _anonymous_last_variable(goal: str) -> str:
    """The last local variable's name when it is inaccessible (`x✝`) but not an instance
    (`inst✝`): a binder the statement did not name; "" otherwise."""
    declarations = [line for line in goal.split("\n") if " : " in line and not line.startswith((" ", TURNSTILE, "case "))]
    if not declarations:
        return ""
    last = declarations[-1].split(" : ", 1)[0].split()[-1]
    return last if "✝" in last and not last.startswith("inst✝") else ""


def _proof_ends_declaration(traced: Sequence[Any], span: tuple[tuple[int, int], tuple[int, int]] | None) -> str:
    """Rule 3: "" when the declaration's last line is the last line of a traced tactic
    standing on a line of its own (what precedes it is an indentation: an even number of
    columns from 2 to `MAX_PROOF_INDENT`), else why not. LeanDojo columns are 1-based and `end` points just past the
    last character; continuation lines of a traced tactic keep only their indentation
    relative to the tactic's first column."""
    if span is None:
        return "the declaration's position is unknown, so where its proof ends cannot be checked"
    (start_line, _), (end_line, end_column) = span
    if end_line <= start_line:
        return "the declaration is one line: a tactic proof cannot be told from a term-mode proof with a `by` block"
    last_line_length = end_column - 1
    for t in traced:
        lines = t.tactic.rstrip().split("\n")
        indent = last_line_length - len(lines[-1])
        if len(lines) <= end_line - start_line and 2 <= indent <= MAX_PROOF_INDENT and indent % 2 == 0:
            return ""
    return (
        f"its last line ({last_line_length} characters, line {end_line}) is not a traced tactic at an indentation "
        f"(even, 2 to {MAX_PROOF_INDENT} columns): "
        "the declaration ends with something else (a term-mode proof, or an untraced proof after a `by` block of the statement)"
    )


def _shortest_proof(edges: Edges, keys: Sequence[str], root: str) -> tuple[list[str] | None, set[str]]:
    """Breadth-first over goal lists from `root` with `keys` in trace order: the first
    shortest tactic sequence reaching `no goals` (or None), and every goal list reached."""
    parent: dict[str, tuple[str, str] | None] = {root: None}
    queue = deque([root])
    while queue and len(parent) < MAX_REPLAY_STATES:
        state = queue.popleft()
        for key in keys:
            after = step(edges, state, key)
            if after is None or after in parent:
                continue
            parent[after] = (state, key)
            if after == NO_GOALS:
                path: list[str] = []
                node = after
                while parent[node] is not None:
                    node, tactic = parent[node]  # type: ignore[misc]
                    path.append(tactic)
                return path[::-1], set(parent)
            queue.append(after)
    return None, set(parent)


def _accounted(t: Any, edges: Edges, visited: set[str], traced: Sequence[Any]) -> bool:
    key = collapse_whitespace(t.tactic)
    if any(step(edges, state, key) is not None for state in visited if state != NO_GOALS):
        return True
    own_goals = split_goals(t.state_before)
    if own_goals:
        reached = {goal for state in visited for goal in (split_goals(state) or ())}
        if all(goal in reached for goal in own_goals):
            return True  # it acts on goals of this proof (e.g. inside a bullet), just not as a step here
    return any(other is not t and nested_in(t.tactic, other.tactic) for other in traced)


def nested_in(child: str, parent: str) -> bool:
    """Whether tactic `child` occurs inside `parent` as a nested block's tactic: right after
    an opener (`by`, `=>`, `(`, `|`, `;`, ...) or at the start of one of `parent`'s lines
    after the first, and followed by a token boundary. Whitespace-insensitive."""
    inner = collapse_whitespace(child)
    outer = collapse_whitespace(parent)
    if not inner or inner == outer:
        return False
    start = 0
    while (index := outer.find(inner, start)) >= 0:
        start = index + 1
        end = index + len(inner)
        if end < len(outer) and _identifier_char(outer[end]):
            continue
        if index > 0 and _ends_with_opener(outer[:index].rstrip()):
            return True
    lines = parent.split("\n")
    for i in range(1, len(lines)):
        rest = collapse_whitespace("\n".join(lines[i:]))
        if rest.startswith(inner) and (len(rest) == len(inner) or not _identifier_char(rest[len(inner)])):
            return True
    return False


def _identifier_char(char: str) -> bool:
    return char.isalnum() or char in "_'.?!"


def _ends_with_opener(text: str) -> bool:
    for opener in _NESTED_OPENERS:
        if text.endswith(opener):
            before = text[: len(text) - len(opener)]
            if opener[0].isalpha() and before and _identifier_char(before[-1]):
                continue
            return True
    return False


# --------------------------------------------------------------------------- reporting


def count_reasons(verdicts: Iterable[Replayability]) -> dict[str, Any]:
    """`{"theorems", "replayable", "not_replayable", "reasons": {category: n}}`."""
    verdicts = list(verdicts)
    reasons = Counter(v.category for v in verdicts if not v.replayable)
    return {
        "theorems": len(verdicts),
        "replayable": sum(v.replayable for v in verdicts),
        "not_replayable": sum(reasons.values()),
        "reasons": {r: reasons[r] for r in REASONS if reasons[r]},
    }


def reason_in_message(message: str | None) -> str | None:
    """The category of a `not replayable [category]` refusal quoted in `message`, else None."""
    match = _REASON_IN_MESSAGE.search(message or "")
    return match.group(1) if match else None


def replayability_of_records(records: Sequence[Any], message_of: Callable[[Any], str | None]) -> dict[str, Any]:
    """Replayability counts of one benchmark's records (one per theorem), in the shape of
    `count_reasons`: a record whose message (`message_of(record)`) quotes a replay refusal
    is not replayable, by category; the others count as replayable (on an environment
    other than replay nothing is refused, so there `replayable == theorems` says nothing).
    Every record stays in the denominator."""
    reasons: Counter[str] = Counter()
    for record in records:
        category = reason_in_message(message_of(record))
        if category is not None:
            reasons[category] += 1
    not_replayable = sum(reasons.values())
    return {
        "theorems": len(records),
        "replayable": len(records) - not_replayable,
        "not_replayable": not_replayable,
        "reasons": {r: reasons[r] for r in REASONS if reasons[r]} | {r: n for r, n in sorted(reasons.items()) if r not in REASONS},
    }
