"""Load test of the HTTP service on loopback: submit and status throughput and latency while
searches run, and a count of lost jobs.

Starts its own `uvicorn` server (replay backend + oracle generator, a simulated Lean
latency per tactic so searches take real time) in a temporary data directory, then:

1. submit: `--jobs` POST /v1/proofs from `--concurrency` connections (SQLite `synchronous=FULL`,
   so each 202 waits for the job to be on disk);
2. status: GET /v1/proofs/{id} on random submitted jobs for `--seconds`, same concurrency,
   while the workers search;
3. drain: waits (at most `--drain-s`) for every job to finish, cancels the rest, and
   checks that every accepted job is there and answered exactly once.

The load generator is `aiohttp` (about 0.15 ms of client CPU per request, against about
2.4 ms for httpx): on a small machine the client shares the CPUs with the server, and a
heavy client would measure itself.

Loopback only, bounded in count and time; prints one JSON object.
Usage: python benchmarks/service_load.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; milliseconds in, milliseconds out."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def summary(latencies_s: list[float], elapsed_s: float) -> dict:
    ms = [x * 1000 for x in latencies_s]
    return {
        "requests": len(ms),
        "elapsed_s": round(elapsed_s, 3),
        "throughput_rps": round(len(ms) / elapsed_s, 1),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    root: Path, workers: int, latency_s: float, *, key_name: str = "bench", **key_limits: int
) -> tuple[subprocess.Popen, str, str, Path]:
    """A real uvicorn process of the service on 127.0.0.1 (replay + oracle backend, each
    tactic taking `latency_s` seconds) once `/readyz` reports `workers` workers; returns the
    process, its base URL, an API key without practical limits (`key_limits` add others)
    and the server's log file."""
    from service.auth import add_key

    data = root / "data"
    key = add_key(data / "api_keys.json", key_name, rate_per_s=1e6, burst=1_000_000, max_concurrent_jobs=1_000_000, **key_limits)
    config = {
        "data_dir": str(data),
        "sqlite_synchronous": "FULL",
        "backend": {"kind": "replay", "latency_s": latency_s, "generators": {"kind": "oracle"}},
        "workers": {"count": workers},
        "limits": {"max_queue": 100_000},
    }
    (root / "service.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = dict(os.environ, DCO_SERVICE_CONFIG=str(root / "service.yaml"), DCO_SERVICE_OVERRIDES="{}")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2)
            if ready.status_code == 200 and ready.json()["workers"] == workers:
                return proc, base, key, root / "server.log"
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not become ready:\n" + (root / "server.log").read_text()[-3000:])


def running_jobs(base: str) -> int:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith('dco_jobs{status="running"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def submit_all(client: aiohttp.ClientSession, bodies: list[dict], concurrency: int) -> tuple[list[str], list[float], float, int]:
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    ids: list[str] = []
    latencies: list[float] = []
    refused = 0

    async def worker():
        nonlocal refused
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            async with client.post("/v1/proofs", json=body) as response:
                payload = await response.json()
            latencies.append(time.perf_counter() - t0)
            if response.status == 202:
                ids.append(payload["id"])
            else:
                refused += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids, latencies, time.perf_counter() - started, refused


async def hammer_status(client: aiohttp.ClientSession, ids: list[str], concurrency: int, seconds: float) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    rng = random.Random(0)

    async def worker():
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with client.get(f"/v1/proofs/{rng.choice(ids)}") as response:
                await response.read()
            latencies.append(time.perf_counter() - t0)
            if response.status != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


async def _status(client: aiohttp.ClientSession, job_id: str) -> str | None:
    async with client.get(f"/v1/proofs/{job_id}") as response:
        return (await response.json())["status"] if response.status == 200 else None


async def drain(client: aiohttp.ClientSession, ids: list[str], drain_s: float) -> dict:
    terminal = {"proved", "failed", "cancelled", "error"}
    deadline = time.monotonic() + drain_s
    states: dict[str, str] = {}
    missing = 0
    while True:
        pending = [i for i in ids if states.get(i) not in terminal]
        missing = 0
        for job_id in pending:
            status = await _status(client, job_id)
            if status is None:
                missing += 1
                continue
            states[job_id] = status
        pending = [i for i in ids if states.get(i) not in terminal]
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    cancelled_at_end = 0
    for job_id in pending:  # out of time: cancel what is left, and see it answered
        async with client.delete(f"/v1/proofs/{job_id}") as response:
            cancelled_at_end += response.status in (200, 202)
    end = time.monotonic() + 30
    while pending and time.monotonic() < end:
        for job_id in list(pending):
            states[job_id] = await _status(client, job_id) or "missing"
            if states[job_id] in terminal:
                pending.remove(job_id)
        await asyncio.sleep(0.2)
    by_status: dict[str, int] = {}
    for status in states.values():
        by_status[status] = by_status.get(status, 0) + 1
    return {"accepted": len(ids), "missing": missing, "unanswered": len(pending), "cancelled_at_end": cancelled_at_end, "by_status": by_status}


async def run(args: argparse.Namespace, base: str, key: str) -> dict:
    from prover.replay import ReplayEnvironment

    theorems = ReplayEnvironment.from_benchmark().startable_ids
    rng = random.Random(1)
    bodies = []
    for i in range(args.jobs):
        body = {"theorem_id": rng.choice(theorems), "idempotency_key": f"bench-{i}"}
        if i % 3 == 2:
            body.update(strategy="sampling", budget={"max_passes": 32, "time_limit_s": 20})
        bodies.append(body)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {key}"}, connector=connector, timeout=timeout) as client:
        ids, submit_lat, submit_s, refused = await submit_all(client, bodies, args.concurrency)
        running_before = running_jobs(base)
        status_lat, status_s, status_errors = await hammer_status(client, ids, args.concurrency, args.seconds)
        running_after = running_jobs(base)
        jobs = await drain(client, ids, args.drain_s)
    return {
        "submit": {**summary(submit_lat, submit_s), "refused": refused},
        "status": {**summary(status_lat, status_s), "errors": status_errors,
                   "jobs_running_at_start": running_before, "jobs_running_at_end": running_after},
        "jobs": {**jobs, "lost": jobs["missing"] + jobs["unanswered"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 jobs, 3 s of status requests")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the status phase (s)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP connections")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--latency-s", type=float, default=0.02, help="simulated Lean seconds per tactic")
    parser.add_argument("--drain-s", type=float, default=120.0, help="at most this long waiting for jobs to finish")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.seconds, args.drain_s = 60, 3.0, 60.0
    with tempfile.TemporaryDirectory(prefix="dco-service-load-") as tmp:
        proc, base, key, log = start_server(Path(tmp), args.workers, args.latency_s)
        try:
            result = asyncio.run(run(args, base, key))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result["config"] = {
        "jobs": args.jobs, "status_seconds": args.seconds, "concurrency": args.concurrency, "workers": args.workers,
        "simulated_tactic_latency_s": args.latency_s, "backend": "replay+oracle", "sqlite_synchronous": "FULL",
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }
    result["goals"] = {
        "status_rps_at_least_500": result["status"]["throughput_rps"] >= 500,
        "status_p99_under_50ms": result["status"]["p99_ms"] < 50,
        "zero_lost_jobs": result["jobs"]["lost"] == 0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
