"""Stage bookkeeping of an expert-iteration run directory.

Layout: `iter-<i>/<stage>/manifest.json` per stage, `iter-<i>/manifest.json` per
iteration, `events.jsonl` (one line per stage start, completion or skip) at the root.

Invariant: a stage manifest with `status == "completed"` is written (atomically, by
rename) only after every output of the stage is in place; such a stage is never run
again. A stage found `running` was interrupted and is run again: each stage's work is
itself resumable (evaluations skip recorded theorems, the trainer resumes from its last
checkpoint and returns finished members as they are, the data stage is a pure function
of its inputs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

COMPLETED = "completed"
RUNNING = "running"


def atomic_write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


StageWork = Callable[[Path], tuple[Mapping[str, Any], Mapping[str, Any]]]


class StageStore:
    """Runs stages once each; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.events_path = self.root / "events.jsonl"

    def stage_dir(self, iteration: int, stage: str) -> Path:
        return self.root / f"iter-{iteration}" / stage

    def manifest_path(self, iteration: int, stage: str) -> Path:
        return self.stage_dir(iteration, stage) / "manifest.json"

    def read(self, iteration: int, stage: str) -> dict[str, Any] | None:
        path = self.manifest_path(iteration, stage)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise RuntimeError(f"{path}: unreadable stage manifest ({err}); delete it to rerun the stage") from err

    def completed(self, iteration: int, stage: str) -> dict[str, Any] | None:
        manifest = self.read(iteration, stage)
        return manifest if manifest is not None and manifest.get("status") == COMPLETED else None

    def run(self, iteration: int, stage: str, inputs: Mapping[str, Any], work: StageWork) -> dict[str, Any]:
        """The stage's completed manifest: read back if done, else `work(stage_dir)` ->
        (outputs, counts) is run and recorded."""
        done = self.completed(iteration, stage)
        if done is not None:
            self._event(iteration, stage, "skipped")
            return done
        previous = self.read(iteration, stage)
        attempt = (previous or {}).get("attempt", 0) + 1
        manifest: dict[str, Any] = {"iteration": iteration, "stage": stage, "status": RUNNING, "attempt": attempt,
                                    "started_at": time.time(), "inputs": dict(inputs)}
        atomic_write_json(self.manifest_path(iteration, stage), manifest)
        self._event(iteration, stage, "started", attempt=attempt)
        started = time.monotonic()
        outputs, counts = work(self.stage_dir(iteration, stage))
        manifest.update(status=COMPLETED, completed_at=time.time(), elapsed_s=time.monotonic() - started,
                        outputs=dict(outputs), counts=dict(counts))
        atomic_write_json(self.manifest_path(iteration, stage), manifest)
        self._event(iteration, stage, "completed")
        return manifest

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def _event(self, iteration: int, stage: str, event: str, **extra: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "iteration": iteration, "stage": stage, "event": event, **extra})
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
