"""The search budget: depth cap, wall-clock limit, expansion/pass counts, tactic timeout."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
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
