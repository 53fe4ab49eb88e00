"""The search budget: depth cap, wall-clock limit, expansion/pass counts, tactic timeout."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Budget:
    """Limits of one proof search of one theorem (per ensemble member for `union`).

    - `max_depth`: proof steps on a path; nodes at this depth are never expanded.
    - `time_limit_s`: wall-clock seconds for the whole theorem, checked before every
      generator call and every environment call.
    - `max_expansions` × `tactics_per_expansion`: best-first's budget.
    - `max_passes`: the sampling strategy's pass@N.
    - `tactic_timeout_s`: wall-clock seconds for one tactic in the environment.
    """

    max_depth: int = 50
    time_limit_s: float = 600.0
    max_expansions: int = 100
    tactics_per_expansion: int = 8
    max_passes: int = 64
    tactic_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_expansions", "tactics_per_expansion", "max_passes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"budget {name} must be a positive integer, got {value!r}")
        for name in ("time_limit_s", "tactic_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"budget {name} must be a positive number of seconds, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def split(self, parts: int, counter: str = "max_passes") -> list["Budget | None"]:
        """This budget shared by `parts` searches (the `shared` ensemble): passes and
        expansions divided as evenly as possible (the first ones get the remainder), the
        wall clock divided equally; depth cap, k and tactic timeout unchanged. A part left
        without any of `counter` (`max_passes` for sampling, `max_expansions` for
        best-first) is None: that member does not search, so the total stays exact."""
        if not isinstance(parts, int) or parts < 1:
            raise ValueError(f"a budget is split into a positive number of parts, got {parts!r}")
        if counter not in ("max_passes", "max_expansions"):
            raise ValueError(f"counter must be max_passes or max_expansions, got {counter!r}")
        out: list[Budget | None] = []
        for index in range(parts):
            passes = self.max_passes // parts + (1 if index < self.max_passes % parts else 0)
            expansions = self.max_expansions // parts + (1 if index < self.max_expansions % parts else 0)
            if (passes if counter == "max_passes" else expansions) < 1:
                out.append(None)
                continue
            out.append(
                replace(
                    self,
                    max_passes=max(passes, 1),
                    max_expansions=max(expansions, 1),
                    time_limit_s=self.time_limit_s / parts,
                )
            )
        return out

    def scaled(self, factor: int) -> "Budget":
        """`factor` times the passes, expansions and wall clock (the equal-compute baseline:
        one member with the compute of `factor` members)."""
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"a budget is scaled by a positive integer, got {factor!r}")
        return replace(
            self,
            max_passes=self.max_passes * factor,
            max_expansions=self.max_expansions * factor,
            time_limit_s=self.time_limit_s * factor,
        )


class Deadline:
    """A wall-clock deadline on the monotonic clock (seconds)."""

    def __init__(self, seconds: float, clock=time.monotonic) -> None:
        self._clock = clock
        self.start = clock()
        self.end = self.start + seconds

    def remaining(self) -> float:
        """Seconds left; <= 0 once expired."""
        return self.end - self._clock()

    def expired(self) -> bool:
        return self._clock() >= self.end

    def elapsed(self) -> float:
        return self._clock() - self.start
