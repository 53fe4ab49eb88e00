"""Actor classes for the Ray tests (importable by Ray's worker processes, unlike a test module)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

from search.types import Candidate, GeneratorError


class RayProbe:
    """Reports the GPUs Ray assigned to this actor."""

    def gpu_ids(self):
        return ray.get_gpu_ids()


class RayModel:
    """A generator actor's stand-in: answers after `delay_s`. With `crash_marker` (a file
    path), the first call exits the process and leaves the file, so a restarted actor answers.
    With `error`, every call raises `GeneratorError(error)` (as an out-of-memory model would)."""

    def __init__(self, delay_s: float = 0.0, crash_marker: str | None = None, error: str | None = None) -> None:
        self.delay_s = delay_s
        self.crash_marker = crash_marker
        self.error = error

    def propose(self, states, k, timeout_s=None):
        if self.crash_marker is not None and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).write_text("crashed once")
            os._exit(1)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise GeneratorError(self.error, transient=False)
        return [[Candidate(f"t{i}", -0.1 * (i + 1)) for i in range(k)] for _ in states]
