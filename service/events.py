"""Progress fan-out from worker threads to SSE streams on the event loop.

Supervisor threads `publish(job_id, event)`; each SSE stream `subscribe`s an asyncio
queue. Delivery crosses threads with `loop.call_soon_threadsafe`, so publishing never
blocks a worker and never touches asyncio objects off the loop. The last progress event
of each running job is kept, so a stream that connects mid-search starts with it.
Events are dicts with a `type`: `status` (queued/running), `progress`, or `done`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

# A subscriber that falls this far behind loses intermediate progress (never `done`).
MAX_PENDING = 256


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._last_progress: dict[str, dict[str, Any]] = {}

    def subscribe(self, job_id: str) -> asyncio.Queue:
        """A queue of this job's future events (call on the event loop); seeded with its last progress."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_PENDING)
        loop = asyncio.get_running_loop()
        with self._lock:
            self._subscribers.setdefault(job_id, []).append((loop, queue))
            last = self._last_progress.get(job_id)
        if last is not None:
            queue.put_nowait(last)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subscribers.get(job_id, [])
            self._subscribers[job_id] = [(l, q) for l, q in subs if q is not queue]
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Deliver `event` to every stream of `job_id` (any thread)."""
        with self._lock:
            if event.get("type") == "progress":
                self._last_progress[job_id] = event
            elif event.get("type") == "done":
                self._last_progress.pop(job_id, None)
            subs = list(self._subscribers.get(job_id, ()))
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(_offer, queue, event)
            except RuntimeError:  # the loop has closed (server shutting down)
                pass

    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._subscribers.values())


def _offer(queue: asyncio.Queue, event: dict[str, Any]) -> None:
    if event.get("type") == "done":
        while queue.full():  # `done` must arrive: drop the oldest progress to make room
            queue.get_nowait()
    elif queue.full():
        return
    queue.put_nowait(event)
