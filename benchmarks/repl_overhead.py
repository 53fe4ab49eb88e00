"""Client-side cost per REPL request, measured against the fake REPL in one run.

Three ways of sending the same tactic request to identical fake REPL processes
(`tests/fake_repl.py --script`, which answers each tactic with a new proof state):

- raw: write the encoded bytes and block on `os.read` until the blank line (no parsing):
  the pipe + fake's own answer time;
- client: `ReplProcess.run_tactic` (encoding, selector loop with timeout, framing, JSON +
  pydantic decoding);
- environment: `ReplEnvironment.apply` (tactic screening, pool lease, generation check,
  classification, new handle) on top of the client.

Reported per request in microseconds (median over interleaved rounds), both wall-clock and
CPU time of this (client) process. The overheads are differences to raw, so the fake's
processing time cancels out; the CPU-time difference is the client's own cost and is not
disturbed by other load on the machine, the wall-clock difference also includes scheduling.
Goal: environment overhead under 1000 us. Prints one JSON object. `--quick`: fewer requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fake_repl  # noqa: E402
from prover.lean.process import ReplConfig, ReplProcess  # noqa: E402
from prover.lean.protocol import decode_response, encode_request, tactic_request  # noqa: E402
from prover.lean.repl_env import ReplEnvironment  # noqa: E402
from search.types import Progress, Theorem  # noqa: E402

GOAL = "x y : ℕ\nh₀ : x + y = 10\nh₁ : x - y = 2\n⊢ x = 6"
STATEMENT = "theorem bench (x y : ℕ) (h₀ : x + y = 10) (h₁ : x - y = 2) : x = 6 := by"
TACTIC = "have h₂ : x + y = 10 := h₀"
SCRIPT = {
    "commands": [{"cmd": STATEMENT + " sorry", "response": {"sorries": [{"goal": GOAL, "pos": {"line": 1, "column": 75}, "endPos": {"line": 1, "column": 80}}]}}],
    "tactics": [{"goals": [GOAL], "tactic": TACTIC, "response": {"goals": [GOAL], "proofStatus": "Incomplete: open goals remain"}}],
}


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per request of `fn(*args, n)`."""
    n = args[-1]
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def _raw_round(proc: ReplProcess, ps: int, n: int) -> None:
    """Seconds per request with a bare blocking pipe (uses the process's pipes directly)."""
    p = proc._proc  # noqa: SLF001 - the baseline deliberately bypasses the client
    assert p is not None and p.stdin is not None and p.stdout is not None
    fd_in, fd_out = p.stdin.fileno(), p.stdout.fileno()
    os.set_blocking(fd_out, True)
    os.set_blocking(fd_in, True)
    payload = encode_request(tactic_request(TACTIC, ps))
    for _ in range(n):
        os.write(fd_in, payload)
        buf = b""
        while not buf.endswith(b"\n\n"):
            buf += os.read(fd_out, 65536)


def _client_round(proc: ReplProcess, ps: int, n: int) -> None:
    for _ in range(n):
        proc.run_tactic(TACTIC, ps, timeout_s=30)


def _env_round(env: ReplEnvironment, root, n: int) -> None:
    for _ in range(n):
        result = env.apply(root, TACTIC, timeout_s=30)
        assert isinstance(result, Progress), result


def _decode_only(n: int) -> float:
    frames = [f.encode() for f in fake_repl.load_sessions()["core/proof_branching"][1]]
    started = time.perf_counter()
    for i in range(n):
        decode_response(frames[i % len(frames)])
    return (time.perf_counter() - started) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, per_round = (3, 100) if args.quick else (7, 400)

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "script.json"
        script.write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
        config = ReplConfig(command=fake_repl.fake_command("--script", script), cwd=ROOT, memory_limit_mb=2048)

        def started_process() -> tuple[ReplProcess, int]:
            proc = ReplProcess(config)
            proc.start()
            resp = proc.run_command(STATEMENT + " sorry", timeout_s=30)
            return proc, resp.sorries[0].proof_state

        raw_proc, raw_ps = started_process()
        client_proc, client_ps = started_process()
        env = ReplEnvironment(config, max_processes=1)
        root = env.start(Theorem("bench", STATEMENT))
        # Warm-up (imports, caches, first allocations).
        _client_round(client_proc, client_ps, 20)
        _env_round(env, root, 20)
        raw, client, environment = [], [], []
        for _ in range(rounds):
            client.append(_timed(_client_round, client_proc, client_ps, per_round))
            environment.append(_timed(_env_round, env, root, per_round))
            raw.append(_timed(_raw_round, raw_proc, raw_ps, per_round))
        decode = _decode_only(per_round * 5)
        raw_proc.kill()
        client_proc.close()
        env.close()

    def us(xs: list[tuple[float, float]], i: int) -> float:
        return round(statistics.median(x[i] for x in xs) * 1e6, 1)

    raw_us, client_us, env_us = us(raw, 0), us(client, 0), us(environment, 0)
    raw_cpu, client_cpu, env_cpu = us(raw, 1), us(client, 1), us(environment, 1)
    result = {
        "benchmark": "repl_overhead",
        "requests_per_variant": rounds * per_round,
        "wall_us_per_request": {"raw_pipe": raw_us, "client": client_us, "environment": env_us},
        "cpu_us_per_request": {"raw_pipe": raw_cpu, "client": client_cpu, "environment": env_cpu},
        "client_overhead_cpu_us": round(client_cpu - raw_cpu, 1),
        "environment_overhead_cpu_us": round(env_cpu - raw_cpu, 1),
        "client_overhead_wall_us": round(client_us - raw_us, 1),
        "environment_overhead_wall_us": round(env_us - raw_us, 1),
        "decode_only_us": round(decode * 1e6, 1),
        "environment_over_raw_wall_ratio": round(env_us / raw_us, 3),
        "goal_overhead_us": 1000,
        "meets_goal": (env_cpu - raw_cpu) < 1000 and (env_us - raw_us) < 1000,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
