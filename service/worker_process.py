"""One worker process: loads the backend once, then runs the jobs its supervisor sends.

Run as `python -m service.worker_process`. Protocol: JSON lines. The supervisor writes
to stdin, the worker answers on its original stdout; everything else the process prints
goes to stderr (fd 1 is pointed at stderr at start, so a library's print cannot corrupt
the protocol).

    → {"op": "init", "config": {...}, "backend": "replay" | "repl"}
    ← {"event": "ready", "generators": [...], "pid": N}  |  {"event": "startup_error", "message": ...}
    → {"op": "prove", "job_id": ..., "request": {...}}
    ← {"event": "progress", "job_id": ..., "data": {...}}*   (at most every PROGRESS_INTERVAL_S)
    ← {"event": "result", "job_id": ..., "result": SearchResult JSON}  |  {"event": "job_error", "job_id": ..., "message": ...}
    → {"op": "check", "task_id": ..., "theorem": {...}, "tactics": [...]}
    ← {"event": "check_result", "task_id": ..., "ok": bool, "message": ...}
    → {"op": "cancel", "job_id": ...}       (any time; sets the running job's cancel event)
    → {"op": "shutdown"}                    (when idle: close the backend and exit)

EOF on stdin (the supervisor died or closed the pipe) ends the process at once.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, TextIO

PROGRESS_INTERVAL_S = 0.1  # seconds between progress messages of one job


class _Channel:
    """The protocol's output: one JSON object per line, written under a lock."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _listen(channel_in: TextIO, tasks: "queue.Queue[dict]", cancels: dict[str, threading.Event], lock: threading.Lock) -> None:
    for line in channel_in:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("op") == "cancel":
            with lock:
                event = cancels.get(message.get("job_id"))
            if event is not None:
                event.set()
        else:
            tasks.put(message)
    os._exit(0)  # the supervisor is gone: nobody will read our answers


def main() -> None:
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(protocol_out)
    init = json.loads(sys.stdin.readline() or "{}")
    if init.get("op") != "init":
        channel.send({"event": "startup_error", "message": "the first message must be init"})
        sys.exit(2)

    from service.backend import build_worker_backend
    from service.config import ServiceConfig

    try:
        config = ServiceConfig.model_validate(init["config"])
        backend = build_worker_backend(init["backend"], config)
    except Exception as err:  # reported to the supervisor, which shows it in /readyz
        traceback.print_exc()
        channel.send({"event": "startup_error", "message": f"{type(err).__name__}: {err}"})
        sys.exit(1)
    channel.send({"event": "ready", "generators": backend.generator_names, "pid": os.getpid()})

    tasks: queue.Queue[dict] = queue.Queue()
    cancels: dict[str, threading.Event] = {}
    lock = threading.Lock()
    threading.Thread(target=_listen, args=(sys.stdin, tasks, cancels, lock), daemon=True).start()
    while True:
        message = tasks.get()
        if message["op"] == "prove":
            _run_prove(channel, backend, message, cancels, lock)
        elif message["op"] == "check":
            _run_check(channel, backend, message)
        elif message["op"] == "shutdown":
            backend.close()
            return


def _run_prove(channel: _Channel, backend, message: dict, cancels: dict, lock: threading.Lock) -> None:
    job_id = message["job_id"]
    cancel = threading.Event()
    with lock:
        cancels[job_id] = cancel
    last_sent = 0.0

    def progress(data: dict[str, Any]) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if now - last_sent >= PROGRESS_INTERVAL_S:
            last_sent = now
            channel.send({"event": "progress", "job_id": job_id, "data": data})

    try:
        result = backend.prove(message["request"], progress=progress, cancel=cancel)
        channel.send({"event": "result", "job_id": job_id, "result": result})
    except Exception as err:
        traceback.print_exc()
        channel.send({"event": "job_error", "job_id": job_id, "message": f"{type(err).__name__}: {err}"})
    finally:
        with lock:
            cancels.pop(job_id, None)


def _run_check(channel: _Channel, backend, message: dict) -> None:
    try:
        ok, text = backend.check(message["theorem"], message["tactics"])
        channel.send({"event": "check_result", "task_id": message["task_id"], "ok": ok, "message": text})
    except Exception as err:
        traceback.print_exc()
        channel.send({"event": "check_error", "task_id": message["task_id"], "message": f"{type(err).__name__}: {err}"})


if __name__ == "__main__":
    main()
