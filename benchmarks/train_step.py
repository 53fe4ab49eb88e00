"""Step time of the trainer's DCO step over its cross-entropy step, in one run.

CPU (default): the tiny Qwen2 on real batches of the bundled LeanDojo sample. Both
objectives run the trainer's own components (`CompletionLogProbs`, `Objective`, AdamW)
on the same micro-batches; measurements are interleaved (the order of CE / DCO /
DCO+replacement is shuffled every round) and repeated, and ratios are of medians.
epsilon = 0 is the pure loss comparison; the "replacement" variant adds what threshold
replacement costs when nothing is discarded: one no-grad scoring forward per micro-batch.

GPU (`--gpu`, needs CUDA): a random-weight model of Qwen2.5-Math-1.5B's shape, fp32
weights + bf16 autocast, fused AdamW, micro-batch 8 x 1024 tokens; tokens/s, model FLOPs
utilisation against 989 TFLOP/s (H100 dense bf16), peak memory, for CE and DCO,
optionally with `torch.compile` of the decoder (`--compile`).

Prints one JSON object. `--quick` runs fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import TrainConfig  # noqa: E402
from training.modeling import TINY_MODEL, load_causal_lm, load_tokenizer, qwen2_math_1p5b_config  # noqa: E402
from training.trainer import CompletionLogProbs, Objective, TokenizedSplit, load_splits  # noqa: E402

H100_BF16_FLOPS = 989e12


def _step(model, optimizer, objective, batches, split, device, score=None, clock=time.perf_counter):
    """One optimizer step over `batches` (lists of indices); returns seconds of `clock`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = clock()
    for indices in batches:
        if score is not None:
            score(indices)
        batch = split.batch(indices, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seq_logp = model(**batch)
        loss, _ = objective(indices, seq_logp)
        (loss / len(batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - started


def _no_grad_logprobs(model, split, device):
    @torch.no_grad()
    def logprobs(indices):
        if not indices:
            return torch.zeros(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(**split.batch(indices, device)).float()
    return logprobs


def _interleaved(variants: dict, rounds: int, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Run every variant once per round, in a shuffled order; drop `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(seed)
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            elapsed = variants[name]()
            if r >= warmup:
                times[name].append(elapsed)
    return times


def cpu_benchmark(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    config = TrainConfig(model=TINY_MODEL, max_length=256, micro_batch_size=args.micro_batch_size,
                         batch_size=args.micro_batch_size * args.accumulation, bf16=False)
    tokenizer = load_tokenizer(TINY_MODEL)
    split, _, _ = load_splits(config, tokenizer)
    model = CompletionLogProbs(load_causal_lm(TINY_MODEL), fused=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    logprobs = _no_grad_logprobs(model, split, device)
    ce = Objective("stepwise", 1, split, logprobs)
    dco = Objective("stepwise", args.n_eff, split, logprobs)
    rng = random.Random(0)
    batches = [rng.sample(range(len(split)), args.micro_batch_size) for _ in range(args.accumulation)]
    tokens = sum(int(split.batch(b, device)["attention_mask"].sum()) for b in batches)

    def scored(indices):  # threshold replacement with nothing discarded: one scoring forward
        return dco.score(indices)

    # On a shared machine wall time carries other processes' load; the process's CPU time
    # (one thread) does not, so it is the primary measure, and wall time is reported too.
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    variants = {}
    for clock_name, clock in clocks.items():
        variants[f"ce/{clock_name}"] = lambda c=clock: _step(model, optimizer, ce, batches, split, device, clock=c)
        variants[f"dco/{clock_name}"] = lambda c=clock: _step(model, optimizer, dco, batches, split, device, clock=c)
        variants[f"dco_replacement/{clock_name}"] = lambda c=clock: _step(
            model, optimizer, dco, batches, split, device, score=scored, clock=c)
    times = _interleaved(variants, rounds=args.rounds, warmup=args.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    paired = [d / c for d, c in zip(times["dco/cpu"], times["ce/cpu"])]
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": TINY_MODEL,
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_eff": args.n_eff,
        "micro_batch_size": args.micro_batch_size,
        "accumulation": args.accumulation,
        "tokens_per_step": tokens,
        "rounds": args.rounds,
        "ce_step_cpu_s": med["ce/cpu"],
        "dco_step_cpu_s": med["dco/cpu"],
        "dco_replacement_step_cpu_s": med["dco_replacement/cpu"],
        "dco_over_ce": med["dco/cpu"] / med["ce/cpu"],
        "dco_over_ce_min": best["dco/cpu"] / best["ce/cpu"],
        "dco_over_ce_paired_median": statistics.median(paired),
        "replacement_over_dco": med["dco_replacement/cpu"] / med["dco/cpu"],
        "wall": {"ce_step_s": med["ce/wall"], "dco_step_s": med["dco/wall"],
                 "dco_over_ce": med["dco/wall"] / med["ce/wall"],
                 "dco_over_ce_min": best["dco/wall"] / best["ce/wall"],
                 "replacement_over_dco": med["dco_replacement/wall"] / med["dco/wall"]},
        "goal_dco_over_ce": 1.03,
    }


def _matmul_params(config) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded; the
    tied output layer counted once)."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    attention = d * d * 2 + d * kv * 2  # q, o; k, v
    mlp = 3 * d * inter
    return layers * (attention + mlp) + config.vocab_size * d


def gpu_benchmark(args, device: torch.device | None = None, config=None) -> dict:
    """`device`/`config` default to CUDA and Qwen2.5-Math-1.5B's shape (others: smoke tests)."""
    if device is None and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; none is visible to torch")
    from transformers import Qwen2ForCausalLM

    device = device or torch.device("cuda")
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    config = config or qwen2_math_1p5b_config()
    lm = Qwen2ForCausalLM(config).to(device)  # fp32 weights; bf16 autocast in the step
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    if args.compile:
        lm.get_decoder().compile()
    model = CompletionLogProbs(lm, fused=not args.no_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    seq, batch = args.seq_len, args.micro_batch_size
    prompt = int(seq * (1 - args.completion_fraction))
    import datasets

    rows = {"input_ids": [], "labels": [], "attention_mask": [], "theorem_id": [], "step": []}
    generator = torch.Generator().manual_seed(0)
    for i in range(batch * args.accumulation):
        ids = torch.randint(0, config.vocab_size, (seq,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * max(prompt, 1) + ids[max(prompt, 1):])
        rows["attention_mask"].append([1] * seq)
        rows["theorem_id"].append(f"t{i}")
        rows["step"].append(0)
    split = TokenizedSplit(datasets.Dataset.from_dict(rows), pad_token_id=0)
    batches = [list(range(k * batch, (k + 1) * batch)) for k in range(args.accumulation)]
    logprobs = _no_grad_logprobs(model, split, device)
    objectives = {"ce": Objective("stepwise", 1, split, logprobs), "dco": Objective("stepwise", args.n_eff, split, logprobs)}
    results = {}
    flops_per_token = 6 * _matmul_params(config) + 6 * config.num_hidden_layers * config.hidden_size * seq
    tokens = seq * batch * args.accumulation
    for _ in range(2):  # warm up (compilation, allocator) before measuring
        for objective in objectives.values():
            _step(model, optimizer, objective, batches, split, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = _interleaved({name: (lambda o=o: _step(model, optimizer, o, batches, split, device))
                          for name, o in objectives.items()}, rounds=args.rounds, warmup=0)
    for name, t in times.items():
        step_s = statistics.median(t)
        results[name] = {"step_s": step_s, "tokens_per_s": tokens / step_s,
                         "mfu": flops_per_token * tokens / step_s / H100_BF16_FLOPS}
    return {
        "device": torch.cuda.get_device_name() if cuda else str(device),
        "model": "Qwen2.5-Math-1.5B shape, random weights",
        "precision": "fp32 weights, bf16 autocast, fused AdamW",
        "compile": args.compile,
        "fused_logprobs": model.fused,
        "gradient_checkpointing": args.gradient_checkpointing,
        "micro_batch": [batch, seq],
        "accumulation": args.accumulation,
        "completion_fraction": args.completion_fraction,
        "flops_per_token": flops_per_token,  # 6 x matmul parameters (output layer included) + causal attention
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "ce": results["ce"],
        "dco": results["dco"],
        "dco_over_ce": results["dco"]["step_s"] / results["ce"]["step_s"],
        "peak_flops": H100_BF16_FLOPS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--gpu", action="store_true", help="the 1.5B-shape GPU benchmark (needs CUDA)")
    parser.add_argument("--compile", action="store_true", help="GPU: torch.compile the decoder")
    parser.add_argument("--no-fused", action="store_true", help="GPU: materialise full logits")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--n-eff", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--accumulation", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--completion-fraction", type=float, default=1.0,
                        help="GPU: fraction of each sequence that is labelled completion")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (CPU time is exact for 1)")
    args = parser.parse_args()
    if args.gpu:
        args.micro_batch_size = args.micro_batch_size or 8
        args.accumulation = args.accumulation or 1
        args.rounds = args.rounds or (5 if args.quick else 20)
        result = gpu_benchmark(args)
    else:
        args.micro_batch_size = args.micro_batch_size or 8
        args.accumulation = args.accumulation or 2
        args.rounds = args.rounds or (10 if args.quick else 40)
        result = cpu_benchmark(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
