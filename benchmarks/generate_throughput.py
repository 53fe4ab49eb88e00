"""Tactic-generation throughput of the transformers generator (the issue's GPU item).

Measures `TransformersGenerator.propose(states, k=32)` with a randomly initialised model of
Qwen2.5-Math-1.5B's shape (`training.modeling.qwen2_math_1p5b_config`, bf16, no download)
from 400-token states, `max_new_tokens=48`, with 1 and with 8 states per call. Random
weights almost never emit EOS, so every sample runs the full 48 tokens: the worst case
the issue asks for. `tactics_per_s` = states × 32 / seconds per call (median of the timed
calls, after a warm-up call); the time includes the generator's re-scoring pass, which
computes each tactic's exact log-probability.

The tokenizer is synthetic (one token per character, ids spread over Qwen's 151,936-token
vocabulary; decoding writes the ids): Qwen's tokenizer cannot be downloaded here, and
throughput depends on the token counts and the model's shape only.

Runs on CUDA only; `--cpu-smoke` runs a tiny model of the same family on CPU (2 states,
k=4, 8 tokens) to check the code path, not to measure anything.

Usage: python benchmarks/generate_throughput.py [--quick] [--cpu-smoke] [--calls N]
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.prompt import format_prompt  # noqa: E402


class SyntheticTokenizer:
    """Character-level token ids over a large vocabulary: `len(format_prompt(state))` tokens."""

    def __init__(self, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        span = self.vocab_size - 1000
        return {"input_ids": [1000 + (ord(c) * 7919) % span for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def __len__(self) -> int:
        return self.vocab_size


def make_state(tokens: int) -> str:
    """A goal-like state whose prompt is exactly `tokens` synthetic tokens."""
    overhead = len(format_prompt("x")) - 1
    body = "x y z : ℕ\nh₀ : x + y = z\n⊢ z - y = x ∧ 0 < x + 1\n"
    text = (body * (tokens // len(body) + 1))[: tokens - overhead]
    assert len(format_prompt(text)) == tokens
    return text


def build(smoke: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prover.generators.transformers_gen import TransformersGenerator
    from training.modeling import qwen2_math_1p5b_config

    if smoke:
        config = Qwen2Config(
            vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=4095, bos_token_id=4095, tie_word_embeddings=True,
        )
        device, dtype = torch.device("cpu"), torch.float32
    else:
        config = qwen2_math_1p5b_config()
        device, dtype = torch.device("cuda"), torch.bfloat16
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    tokenizer = SyntheticTokenizer(config.vocab_size, config.eos_token_id)
    return TransformersGenerator(model, tokenizer, name="qwen2.5-math-1.5b-shape", max_new_tokens=8 if smoke else 48,
                                 max_batch_states=16, max_prompt_tokens=None), device


def measure(generator, device, states_per_call: int, k: int, prompt_tokens: int, calls: int) -> dict:
    states = [make_state(prompt_tokens) for _ in range(states_per_call)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = generator.propose(states, k)  # warm-up (allocator, kernels)
    assert len(out) == states_per_call and all(len(c) == k for c in out)
    times = []
    for _ in range(calls):
        sync()
        started = time.perf_counter()
        out = generator.propose(states, k)
        sync()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    lengths = [len(c.tactic.split()) for cands in out for c in cands]
    return {
        "states_per_call": states_per_call,
        "samples_per_state": k,
        "seconds_per_call": round(seconds, 4),
        "tactics_per_s": round(states_per_call * k / seconds, 1),
        "mean_tokens_per_tactic": round(sum(lengths) / len(lengths), 1),
        "calls_timed": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny model on CPU: checks the code path only.")
    parser.add_argument("--quick", action="store_true", help="Fewer timed calls.")
    parser.add_argument("--calls", type=int, default=None, help="Timed calls per setting (default 5, quick 2).")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "generate_throughput", "skipped": "needs a CUDA GPU (use --cpu-smoke to check the code path)"}))
        return
    calls = args.calls or (2 if args.quick or args.cpu_smoke else 5)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny matrices: one thread avoids OpenMP contention on a shared machine
    torch.manual_seed(0)
    generator, device = build(args.cpu_smoke)
    k, prompt_tokens = (4, 64) if args.cpu_smoke else (32, 400)
    settings = (1, 2) if args.cpu_smoke else (1, 8)
    result = {
        "benchmark": "generate_throughput",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke: not a measurement)",
        "model": "tiny qwen2 (smoke)" if args.cpu_smoke else "Qwen2.5-Math-1.5B shape, random weights, bf16",
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": generator.max_new_tokens,
        "torch": torch.__version__,
        "results": [measure(generator, device, n, k, prompt_tokens, calls) for n in settings],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
