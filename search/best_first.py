"""Best-first proof search (ReProver / BFS-Prover style) over a transposition table.

The search graph
- A `Node` is one proof state; states with equal `pp` are one node (the table maps `pp` to
  its node), so a state reached again is never re-added and cycles cannot loop.
- Each node keeps a *discovery path* (`parent`, `tactic`): the path its depth, priority
  and proof come from. Invariants: discovery parents form a tree rooted at the root,
  `depth == len(discovery path)`, and `depth` is the length of the shortest path to the
  node among the edges discovered so far (a state first reached deep and later reached
  shallower takes the smaller depth, and so does its whole subtree: see `_shorten`).
- `parents` (`first_parent` + `more_parents`) lists every distinct node with an edge into
  this one (for failure propagation); each (parent, child) pair appears once. `children`
  lists the live edges out of an expanded node (for depth propagation).

Priority
- `score` = sum of the tactic log-probabilities along the discovery path (<= 0).
- `priority` = `score / depth**alpha` (BFS-Prover's length normalisation; alpha = 0 is the
  plain cumulative log-prob, ReProver's). The open node of highest priority is expanded
  next; equal priorities expand first-discovered first.
- A node reached again by a strictly shorter path is re-parented onto it, expanded or
  not, and the new depth is propagated to its descendants (their scores and priorities
  follow their new paths; unexpanded ones get fresh heap entries, and nodes that were at
  the depth cap become expandable). Otherwise an unexpanded node reached again at the
  same depth with a higher priority is re-parented onto that path. Re-parenting only onto
  a strictly shallower parent (or a childless node) keeps the discovery tree acyclic.

Expansion
- Pops the best open node (stale heap entries are skipped), asks the generator for
  `tactics_per_expansion` candidates (deduplicated, filtered, at most k), applies them in
  descending score. Expansions are counted exactly: one per generator request, at most
  `max_expansions`; so `lean_calls <= max_expansions * tactics_per_expansion`.
- Nodes at depth `max_depth` are created but never expanded, so a proof has at most
  `max_depth` tactics.
- A generator failure or an empty candidate list makes the node a dead end (recorded).

Failure
- An edge fails when its tactic fails, when it leads back to its own node (no progress),
  when it claims a proof that verification rejects, or when its target node failed.
- An expanded node all of whose edges failed is failed; failure propagates to every
  parent (a node with several parents tells each; a parent fails only when all of its
  children have). Nodes at the depth cap never fail (a shorter path may reach them later);
  nodes on a cycle may never be marked failed, but the search still ends when no open
  node is left (status FAILED: the space is exhausted).
"""

from __future__ import annotations

import heapq
import threading
from typing import Callable

from search.budget import Budget, Deadline
from search.engine import SearchEngine
from search.proposer import MixtureProposer, SingleProposer
from search.result import SearchResult, Status
from search.runtime import SearchContext, error_result, start_root
from search.tactic_filter import TacticFilter
from search.types import Progress, ProofEnvironment, ProofState, Proved, TacticGenerator, Theorem


def check_length_alpha(length_alpha: float) -> None:
    """Raise `ValueError` unless `length_alpha` is a finite number >= 0."""
    if (
        not isinstance(length_alpha, (int, float))
        or isinstance(length_alpha, bool)
        or not 0.0 <= length_alpha < float("inf")
    ):
        raise ValueError(f"length_alpha must be a finite number >= 0, got {length_alpha!r}")


class Node:
    """One proof state of the search graph (see the module docstring for invariants)."""

    __slots__ = (
        "state",
        "depth",
        "score",
        "priority",
        "parent",
        "tactic",
        "member",
        "first_parent",
        "more_parents",
        "live_children",
        "expanded",
        "failed",
        "children",
    )

    def __init__(
        self,
        state: ProofState,
        depth: int,
        score: float,
        priority: float,
        parent: "Node | None",
        tactic: str | None,
        member: str | None,
    ) -> None:
        self.state = state
        self.depth = depth  # length of the discovery path
        self.score = score  # sum of log-probs along the discovery path (<= 0)
        self.priority = priority  # score / depth**alpha
        self.parent = parent  # discovery parent (None for the root)
        self.tactic = tactic  # tactic of the discovery edge
        self.member = member  # ensemble member that proposed that tactic
        # Every distinct node with an edge into this one: the node that created it, then any
        # others (a list only when there are some: most nodes have one parent).
        self.first_parent = parent
        self.more_parents: list[Node] | None = None
        self.live_children = 0  # distinct children not (yet) failed; meaningful once expanded
        self.expanded = False
        self.failed = False
        # Live edges out of this node: (child, tactic, logprob, member); None until expanded.
        self.children: list[tuple[Node, str, float, str | None]] | None = None

    @property
    def parents(self) -> list["Node"]:
        """Every distinct node with an edge into this one."""
        first = [self.first_parent] if self.first_parent is not None else []
        return first + (self.more_parents or [])

    def path(self) -> tuple[list[str], list[str]]:
        """Tactics and members along the discovery path, root first."""
        tactics: list[str] = []
        members: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            tactics.append(node.tactic)  # type: ignore[arg-type]
            members.append(node.member)  # type: ignore[arg-type]
            node = node.parent
        tactics.reverse()
        members.reverse()
        return tactics, members


class BestFirstSearch(SearchEngine):
    """One best-first search of one theorem; `step()` is one expansion."""

    strategy = "best_first"

    def __init__(
        self,
        ctx: SearchContext,
        root: ProofState,
        proposer: SingleProposer | MixtureProposer,
        *,
        length_alpha: float = 0.0,
    ) -> None:
        super().__init__(ctx, proposer)
        check_length_alpha(length_alpha)
        self.alpha = float(length_alpha)
        self.max_depth = ctx.budget.max_depth
        self.max_expansions = ctx.budget.max_expansions
        self.k = ctx.budget.tactics_per_expansion
        self.root = Node(root, 0, 0.0, 0.0, None, None, None)
        self.table: dict[str, Node] = {root.pp: self.root}
        # Priority queue of (-priority, seq): `_pushed[seq]` is the node pushed, and seq (the
        # push order) breaks ties first-pushed-first. Entries hold no object references, so
        # the cyclic GC untracks them instead of rescanning every entry on each collection.
        self._pushed: list[Node] = [self.root]
        self._heap: list[tuple[float, int]] = [(-0.0, 0)]

    @property
    def nodes(self) -> int:
        """Distinct proof states discovered (root included)."""
        return len(self.table)

    def _priority(self, score: float, depth: int) -> float:
        if self.alpha == 0.0 or depth == 0:
            return score
        return score / depth**self.alpha

    def _pop(self) -> Node | None:
        heap = self._heap
        while heap:
            neg_priority, seq = heapq.heappop(heap)
            node = self._pushed[seq]
            # Stale entries: the node was expanded, or re-parented to a new priority.
            if not node.expanded and -neg_priority == node.priority:
                return node
        return None

    def _step(self) -> Status | None:
        node = self._pop()
        if node is None:
            return Status.FAILED  # no open node left: the space is exhausted
        if self.expansions >= self.max_expansions:
            return Status.BUDGET_EXHAUSTED
        ctx = self.ctx
        proposals = self.proposer.propose([node.state.pp], self.k)[0]
        self.expansions += 1  # counted once the generator was asked (propose checked the budget)

        table = self.table
        heap = self._heap
        pushed = self._pushed
        max_depth = self.max_depth
        child_depth = node.depth + 1
        alpha = self.alpha
        apply = ctx.apply
        seen: set[str] = set()  # pp of the distinct children of this node
        children: list[tuple[Node, str, float, str | None]] = []
        live = 0
        for tactic, logprob, member in proposals:
            result = apply(node.state, tactic)
            kind = type(result)
            if kind is Progress or (kind is not Proved and isinstance(result, Progress)):
                state = result.state
                pp = state.pp
                if pp in seen:
                    continue  # another tactic of this node already leads there
                child = table.get(pp)
                if child is node:
                    continue  # no progress: a failed edge
                seen.add(pp)
                score = node.score + logprob
                if child is None:
                    priority = score if alpha == 0.0 else score / child_depth**alpha
                    child = Node(state, child_depth, score, priority, node, tactic, member)
                    table[pp] = child
                    if child_depth < max_depth:
                        heapq.heappush(heap, (-priority, len(pushed)))
                        pushed.append(child)
                    if child_depth > ctx.max_depth_reached:
                        ctx.max_depth_reached = child_depth
                else:
                    if child.failed:
                        continue  # a failed child: a failed edge
                    if child_depth < child.depth:
                        self._shorten(child, node, tactic, logprob, member)
                    elif not child.expanded:
                        self._maybe_reparent(child, node, tactic, member, score, child_depth)
                    if child.more_parents is None:
                        child.more_parents = [node]
                    else:
                        child.more_parents.append(node)
                children.append((child, tactic, logprob, member))
                live += 1
            elif kind is Proved or isinstance(result, Proved):
                tactics, members = node.path()
                tactics.append(tactic)
                members.append(member)
                if child_depth > ctx.max_depth_reached:
                    ctx.max_depth_reached = child_depth
                if self.found(tactics, members):
                    self.report_progress()
                    return Status.PROVED
                # rejected by verification: a failed edge, the search goes on
            # else Failed: a failed edge
        node.expanded = True
        node.children = children
        node.live_children = live
        if live == 0:
            self._fail(node)
        self.report_progress()
        return None

    def _maybe_reparent(self, child: Node, parent: Node, tactic: str, member: str, score: float, depth: int) -> None:
        """Move an unexpanded `child` onto the path through `parent` (same depth) if that
        path has a higher priority."""
        priority = self._priority(score, depth)
        if priority <= child.priority:
            return
        child.parent, child.tactic, child.member = parent, tactic, member
        child.depth, child.score, child.priority = depth, score, priority
        if depth < self.max_depth:
            heapq.heappush(self._heap, (-priority, len(self._pushed)))
            self._pushed.append(child)

    def _shorten(self, child: Node, parent: Node, tactic: str, logprob: float, member: str | None) -> None:
        """`child` was reached through `parent` by a path shorter than its discovery path:
        re-parent it and relax every edge below it (breadth-first) so that each descendant
        whose shortest known path now runs through it takes the smaller depth.

        Acyclic: along discovery edges `depth(n) >= depth(parent(n)) + 1` holds throughout
        (parents shrink first, children catch up), so a node's descendants are deeper than
        it and never qualify as a strictly shallower parent."""
        max_depth = self.max_depth
        work = [(child, parent, tactic, logprob, member)]
        while work:
            node, via, edge_tactic, edge_logprob, edge_member = work.pop()
            depth = via.depth + 1
            if depth >= node.depth:
                continue  # already as short (relaxed through another edge meanwhile)
            score = via.score + edge_logprob
            node.parent, node.tactic, node.member = via, edge_tactic, edge_member
            node.depth, node.score, node.priority = depth, score, self._priority(score, depth)
            if not node.expanded and not node.failed and depth < max_depth:
                heapq.heappush(self._heap, (-node.priority, len(self._pushed)))
                self._pushed.append(node)
            for grandchild, t, lp, m in node.children or ():
                if depth + 1 < grandchild.depth:
                    work.append((grandchild, node, t, lp, m))

    def _fail(self, node: Node) -> None:
        """Mark `node` failed and propagate to every parent whose children have all failed."""
        stack = [node]
        while stack:
            current = stack.pop()
            current.failed = True
            parent = current.first_parent
            if parent is not None:
                parent.live_children -= 1
                if parent.live_children == 0 and parent.expanded and not parent.failed:
                    stack.append(parent)
            if current.more_parents is not None:
                for parent in current.more_parents:
                    parent.live_children -= 1
                    if parent.live_children == 0 and parent.expanded and not parent.failed:
                        stack.append(parent)

    def _progress_payload(self) -> dict:
        ctx = self.ctx
        return {
            "strategy": self.strategy,
            "expansions": self.expansions,
            "nodes": len(self.table),
            "max_depth": ctx.max_depth_reached,
            "lean_calls": ctx.lean_calls,
            "elapsed_s": ctx.deadline.elapsed(),
        }


def best_first_search(
    theorem: Theorem,
    env: ProofEnvironment,
    generator: TacticGenerator,
    budget: Budget,
    *,
    tactic_filter: TacticFilter | None = None,
    length_alpha: float = 0.0,
    progress: Callable[[dict], None] | None = None,
    cancel: threading.Event | None = None,
    member: str | None = None,
) -> SearchResult:
    """Best-first search of `theorem` with one generator (named `member`, default its `name`).

    Starts the environment itself (the caller owns its lifecycle / context manager); the
    wall-clock limit includes the start. A start failure gives status ERROR.
    """
    check_length_alpha(length_alpha)
    deadline = Deadline(budget.time_limit_s)
    name = member if member is not None else getattr(generator, "name", "generator")
    root = start_root(env, theorem)
    if not isinstance(root, ProofState):
        return error_result(theorem, BestFirstSearch.strategy, root, deadline.elapsed(), name)
    ctx = SearchContext(
        env, theorem, budget, tactic_filter=tactic_filter or TacticFilter(), deadline=deadline, cancel=cancel, progress=progress
    )
    return BestFirstSearch(ctx, root, SingleProposer(name, generator, ctx), length_alpha=length_alpha).run()
