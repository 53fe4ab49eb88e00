"""Soak test of the HTTP service: bursty traffic with idle gaps, watching for leaks.

Starts its own `uvicorn` server (replay backend + oracle generator, a simulated Lean
latency per tactic, 2 worker processes, SQLite `synchronous=FULL`) in a temporary data
directory, then repeats cycles until `--minutes` (10; `--quick`: 1) have passed:

1. burst: `--burst` concurrent POST /v1/proofs (the shape that leaked SQLite connections:
   each burst after an idle gap runs on freshly started pool threads);
2. active: `--active-s` seconds of GET /v1/proofs/{id} polls on random accepted jobs from
   `--concurrency` connections, while `--streams` event streams follow this burst's jobs to
   their `result` (half of them disconnect after two events and resume with Last-Event-ID);
3. idle gap: `--gap-s` seconds without requests (longer than AnyIO's 10 s thread idle
   timeout, so the request thread pool retires its threads), then the server's open file
   descriptors and resident memory are sampled.

At the end every accepted job must be found and answered (drained for at most `--drain-s`).
Reported: fds and RSS at start (before traffic), after the first cycle (warm: pools and
caches filled) and at the end; p50/p99 status latency; 5xx count; lost and stuck jobs.
Goals: fds and RSS at the end within 10% of warm, status p99 < 50 ms, zero lost or stuck
jobs, no 5xx.

Loopback only, bounded in time and count (at most cycles x burst jobs); prints one JSON object.
Usage: python benchmarks/service_soak.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from service_load import drain, percentile, start_server  # noqa: E402  (the load benchmark's helpers)


def sample(pid: int) -> dict:
    proc = psutil.Process(pid)
    return {"fds": proc.num_fds(), "rss_mib": round(proc.memory_info().rss / 2**20, 1), "threads": proc.num_threads()}


class Tally:
    def __init__(self) -> None:
        self.status_latencies: list[float] = []
        self.submit_latencies: list[float] = []
        self.server_errors = 0  # 5xx
        self.refused = 0  # 4xx on submit
        self.streams_done = 0
        self.streams_resumed = 0
        self.stream_failures: list[str] = []


async def burst(client: aiohttp.ClientSession, bodies: list[dict], tally: Tally) -> list[str]:
    async def one(body: dict) -> str | None:
        t0 = time.perf_counter()
        async with client.post("/v1/proofs", json=body) as response:
            payload = await response.json()
        tally.submit_latencies.append(time.perf_counter() - t0)
        if response.status >= 500:
            tally.server_errors += 1
        elif response.status != 202:
            tally.refused += 1
        return payload.get("id") if response.status == 202 else None

    ids = await asyncio.gather(*(one(b) for b in bodies))
    return [i for i in ids if i]


async def poll(client: aiohttp.ClientSession, ids: list[str], seconds: float, concurrency: int, tally: Tally, rng: random.Random) -> None:
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with client.get(f"/v1/proofs/{rng.choice(ids)}") as response:
                await response.read()
            tally.status_latencies.append(time.perf_counter() - t0)
            if response.status >= 500:
                tally.server_errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def follow(client: aiohttp.ClientSession, job_id: str, resume: bool, tally: Tally, timeout_s: float = 120.0) -> None:
    """Read a job's event stream to its `result`; with `resume`, drop it after two events and reconnect with Last-Event-ID."""
    last_id: str | None = None
    events = 0
    try:
        async with asyncio.timeout(timeout_s):
            for attempt in range(2):
                headers = {"Last-Event-ID": last_id} if attempt and last_id else {}
                async with client.get(f"/v1/proofs/{job_id}/events", headers=headers) as response:
                    if response.status >= 500:
                        tally.server_errors += 1
                    if response.status != 200:
                        tally.stream_failures.append(f"{job_id}: HTTP {response.status}")
                        return
                    async for raw in response.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                            events += 1
                        if line.startswith("event:") and line[6:].strip() == "result":
                            tally.streams_done += 1
                            tally.streams_resumed += attempt
                            return
                        if resume and attempt == 0 and events >= 2:
                            break  # drop the connection mid-stream
                if not resume:
                    break
            tally.stream_failures.append(f"{job_id}: stream ended without a result")
    except TimeoutError:
        tally.stream_failures.append(f"{job_id}: no result within {timeout_s:g} s")


async def soak(args: argparse.Namespace, base: str, key: str, pid: int) -> dict:
    from prover.replay import ReplayEnvironment

    theorems = ReplayEnvironment.from_benchmark().startable_ids
    rng = random.Random(1)
    tally = Tally()
    samples = {"start": sample(pid)}
    series = []
    all_ids: list[str] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    started = time.monotonic()
    cycles = 0
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {key}"}, connector=connector, timeout=timeout) as client:
        while time.monotonic() - started < args.minutes * 60 or cycles == 0:
            bodies = []
            for i in range(args.burst):
                body = {"theorem_id": rng.choice(theorems), "idempotency_key": f"soak-{cycles}-{i}"}
                if i % 3 == 2:
                    body.update(strategy="sampling", budget={"max_passes": 8, "time_limit_s": 20})
                bodies.append(body)
            ids = await burst(client, bodies, tally)
            all_ids += ids
            followers = [follow(client, job_id, resume=(n % 2 == 1), tally=tally) for n, job_id in enumerate(ids[: args.streams])]
            await asyncio.gather(poll(client, all_ids, args.active_s, args.concurrency, tally, rng), *followers)
            await asyncio.sleep(args.gap_s)
            cycles += 1
            point = {"t_s": round(time.monotonic() - started, 1), **sample(pid)}
            series.append(point)
            if cycles == 1:
                samples["warm"] = point
        samples["end"] = series[-1]
        jobs = await drain(client, all_ids, args.drain_s)
    warm, end = samples["warm"], samples["end"]
    ms = [x * 1000 for x in tally.status_latencies]
    submit_ms = [x * 1000 for x in tally.submit_latencies]
    return {
        "cycles": cycles,
        "elapsed_s": round(time.monotonic() - started, 1),
        "server": samples,
        "server_max": {"fds": max(p["fds"] for p in series), "rss_mib": max(p["rss_mib"] for p in series)},
        "fds_change_warm_to_end_pct": round(100 * (end["fds"] - warm["fds"]) / warm["fds"], 1),
        "rss_change_warm_to_end_pct": round(100 * (end["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"], 1),
        "series": series,
        "status": {"requests": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2),
                   "max_ms": round(max(ms), 2)},
        "submit": {"requests": len(submit_ms), "p50_ms": round(percentile(submit_ms, 0.5), 2),
                   "p99_ms": round(percentile(submit_ms, 0.99), 2), "refused": tally.refused},
        "streams": {"completed": tally.streams_done, "resumed_with_last_event_id": tally.streams_resumed,
                    "failures": tally.stream_failures[:10], "failure_count": len(tally.stream_failures)},
        "server_errors_5xx": tally.server_errors,
        "jobs": {**jobs, "lost": jobs["missing"], "stuck": jobs["unanswered"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 minute instead of 10")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=40, help="concurrent submissions per burst")
    parser.add_argument("--active-s", type=float, default=3.0, help="seconds of status polls after each burst")
    parser.add_argument("--gap-s", type=float, default=12.0, help="idle seconds between bursts (> AnyIO's 10 s thread idle timeout)")
    parser.add_argument("--concurrency", type=int, default=8, help="status-polling connections")
    parser.add_argument("--streams", type=int, default=6, help="event streams per burst")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument("--latency-s", type=float, default=0.02, help="simulated Lean seconds per tactic")
    parser.add_argument("--drain-s", type=float, default=180.0, help="at most this long waiting for jobs to finish")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 1.0
    with tempfile.TemporaryDirectory(prefix="dco-service-soak-") as tmp:
        proc, base, key, _ = start_server(Path(tmp), args.workers, args.latency_s, key_name="soak", max_open_streams=1000)
        try:
            result = asyncio.run(soak(args, base, key, proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result["config"] = {
        "minutes": args.minutes, "burst": args.burst, "active_s": args.active_s, "gap_s": args.gap_s,
        "concurrency": args.concurrency, "streams_per_burst": args.streams, "workers": args.workers,
        "simulated_tactic_latency_s": args.latency_s, "backend": "replay+oracle", "sqlite_synchronous": "FULL",
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }
    result["goals"] = {
        "fds_flat_within_10pct": abs(result["fds_change_warm_to_end_pct"]) <= 10,
        "rss_flat_within_10pct": abs(result["rss_change_warm_to_end_pct"]) <= 10,
        "status_p99_under_50ms": result["status"]["p99_ms"] < 50,
        "zero_lost_or_stuck_jobs": result["jobs"]["lost"] == 0 and result["jobs"]["stuck"] == 0,
        "no_5xx": result["server_errors_5xx"] == 0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
