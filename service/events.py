"""Progress fan-out from worker threads to SSE streams on the event loop.

Supervisor threads `publish(job_id, event)`; each SSE stream `subscribe`s an asyncio
queue. Delivery crosses threads with `loop.call_soon_threadsafe`, so publishing never
blocks a worker and never touches asyncio objects off the loop. The last progress event
of each running job is kept, so a stream that connects mid-search starts with it.
Events are dicts with a `type`: `status` (queued/running), `progress`, or `done`.

Every published event gets `seq`, a per-job number counting from 1 (the SSE `id:`); the
last `REPLAY` events of each running job are kept, so a stream resumed with
`Last-Event-ID: n` gets the events after `n` it missed. Numbers live in this process: a
resume after a server restart starts from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

# A subscriber that falls this far behind loses intermediate progress (never `done`).
MAX_PENDING = 256
REPLAY = 64  # events kept per running job for resumed streams


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}
        self._last_progress: dict[str, dict[str, Any]] = {}
        self._seq: dict[str, int] = {}
        self._recent: dict[str, collections.deque] = {}

    def subscribe(self, job_id: str, after: int | None = None) -> tuple[asyncio.Queue, list[dict[str, Any]], int, bool]:
        """Register a stream of `job_id` (call on the event loop).

        Returns `(queue, backlog, seq, complete)`: the queue of future events; the kept
        events numbered after `after` (a resumed stream), or the last progress event (a new
        one); the job's current event number; and whether the backlog covers every event
        after `after` (False: events were missed, send a fresh snapshot).
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_PENDING)
        loop = asyncio.get_running_loop()
        with self._lock:
            self._subscribers.setdefault(job_id, []).append((loop, queue))
            current = self._seq.get(job_id, 0)
            if after is None:
                last = self._last_progress.get(job_id)
                return queue, [last] if last is not None else [], current, False
            recent = list(self._recent.get(job_id, ()))
        backlog = [e for e in recent if e["seq"] > after]
        complete = after == current or (bool(backlog) and backlog[0]["seq"] == after + 1)
        return queue, backlog, current, complete

    def last_progress(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._last_progress.get(job_id)

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subscribers.get(job_id, [])
            self._subscribers[job_id] = [(l, q) for l, q in subs if q is not queue]
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Deliver `event` to every stream of `job_id` (any thread)."""
        with self._lock:
            seq = self._seq.get(job_id, 0) + 1
            event = {**event, "seq": seq}
            if event.get("type") == "done":
                self._last_progress.pop(job_id, None)
                self._seq.pop(job_id, None)
                self._recent.pop(job_id, None)
            else:
                self._seq[job_id] = seq
                self._recent.setdefault(job_id, collections.deque(maxlen=REPLAY)).append(event)
                if event.get("type") == "progress":
                    self._last_progress[job_id] = event
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
