"""GPU check of the training step and the transformers generator, in one run (<= 8 min on
one H100/H200). Prints one JSON object.

Training: a random-weight model of Qwen2.5-Math-1.5B's shape (built from its config, no
download), the trainer's own pieces (`CompletionLogProbs` with fused completion
log-probs, `Objective`, fused AdamW) in the trainer's precision mode: fp32 master weights,
bf16 autocast. One micro-batch of 8 x 1024 tokens per optimizer step (all labelled, so
the model FLOPs count every position). CE (N_eff 1) and DCO (N_eff 16) steps alternate in
a shuffled order; per objective: median step time, tokens/s, MFU against the card's
dense bf16 peak, and peak memory; eagerly and with `torch.compile` of the decoder.

Generation: `prover.generators.transformers_gen.TransformersGenerator` on the same shape
in bf16: 32 samples x 48 new tokens per state from 400-token states, 1 and 8 states per
call; tactics/s. The tokenizer is a word-level one with the model's vocabulary size
(built in-process; random weights rarely sample EOS, so every sample runs 48 tokens).

Goals (checked in `goals`): MFU >= 0.45 with DCO, peak memory <= 41 GiB, DCO step within
2% of CE, >= 600 tactics/s at 8 states per call.

`--tiny`: the tiny Qwen2 shape and small sizes on the CPU (bf16 autocast there too;
`torch.compile` with the aot_eager backend, no C++ code generation), to test the script
itself; its times say nothing about a GPU. Without CUDA and without
`--tiny` it prints `{"status": "skipped", ...}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import _interleaved, _matmul_params  # noqa: E402
from training.modeling import qwen2_math_1p5b_config, tiny_qwen2_config  # noqa: E402
from training.trainer import CompletionLogProbs, Objective, TokenizedSplit  # noqa: E402

BUDGET_S = 8 * 60
DENSE_BF16_TFLOPS = {  # vendor figures, dense (no sparsity)
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "H100": 756.0, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
}
GOALS = {"mfu_dco": 0.45, "peak_memory_gib": 41.0, "dco_over_ce": 1.02, "tactics_per_s_8_states": 600.0}


def peak_bf16_flops(name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 FLOP/s of the card named `name` (longest matching key), or the override."""
    if override_tflops:
        return override_tflops * 1e12
    matches = [key for key in DENSE_BF16_TFLOPS if key in name]
    return DENSE_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def word_level_tokenizer(vocab_size: int, eos_token_id: int) -> Any:
    """A real fast tokenizer with `vocab_size` tokens `t0`..`t{n-1}` (whitespace-separated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    eos = f"t{eos_token_id}"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ training


def _random_split(vocab: int, rows: int, seq: int) -> TokenizedSplit:
    import datasets

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq), generator=generator).tolist()
    return TokenizedSplit(datasets.Dataset.from_dict({
        "input_ids": ids, "labels": [[-100] + row[1:] for row in ids], "attention_mask": [[1] * seq] * rows,
        "theorem_id": [f"t{i}" for i in range(rows)], "step": [0] * rows}), pad_token_id=0)


def train_section(config: Any, device: torch.device, args: argparse.Namespace, compile_decoder: bool,
                  peak_flops: float | None) -> dict[str, Any]:
    """CE and DCO step times of one model (fp32 master weights, bf16 autocast)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains (a 1.5B model is slow to build on the CPU)
        lm = Qwen2ForCausalLM(config).to(torch.float32)
    if compile_decoder:
        lm.get_decoder().compile(backend=args.compile_backend)
    model = CompletionLogProbs(lm, fused=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    master = {str(p.dtype).removeprefix("torch.") for group in optimizer.param_groups for p in group["params"]}
    split = _random_split(config.vocab_size, args.batch, args.seq)
    indices = list(range(args.batch))
    batch = split.batch(indices, device)

    @torch.no_grad()
    def no_grad_logprobs(rows):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(**split.batch(rows, device)).float()

    objectives = {"ce": Objective("stepwise", 1, split, no_grad_logprobs),
                  "dco": Objective("stepwise", args.n_eff, split, no_grad_logprobs)}

    def step(objective: Objective) -> float:
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            seq_logp = model(**batch)
        loss, _ = objective(indices, seq_logp)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - started

    compile_started = time.perf_counter()
    for _ in range(args.warmup):  # compilation, allocator, cuBLAS heuristics
        for objective in objectives.values():
            step(objective)
    warmup_s = time.perf_counter() - compile_started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _interleaved({name: (lambda o=o: step(o)) for name, o in objectives.items()},
                         rounds=args.rounds, warmup=0)
    tokens = args.batch * args.seq
    flops_per_token = 6 * _matmul_params(config) + 6 * config.num_hidden_layers * config.hidden_size * args.seq
    out: dict[str, Any] = {"compile": args.compile_backend if compile_decoder else None,
                           "master_weights": sorted(master), "autocast": "bfloat16",
                           "warmup_s": round(warmup_s, 2)}
    for name, values in times.items():
        step_s = statistics.median(values)
        out[name] = {"step_s": step_s, "tokens_per_s": tokens / step_s,
                     "mfu": flops_per_token * tokens / step_s / peak_flops if peak_flops else None}
    out["dco_over_ce"] = out["dco"]["step_s"] / out["ce"]["step_s"]
    out["dco_over_ce_paired_median"] = statistics.median(d / c for d, c in zip(times["dco"], times["ce"]))
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    out["flops_per_token"] = flops_per_token
    del model, lm, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------- generation


def generation_section(config: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Qwen2ForCausalLM

    from prover.generators.transformers_gen import TransformersGenerator

    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tokenizer = word_level_tokenizer(config.vocab_size, config.eos_token_id)
    generator = TransformersGenerator(lm, tokenizer, max_new_tokens=args.new_tokens,
                                      max_batch_states=max(args.states_per_call), max_prompt_tokens=None)
    rng = random.Random(0)
    vocab = [i for i in range(config.vocab_size) if i != config.eos_token_id]
    # One token per word; the prompt adds `[GOAL]` and `[PROOFSTEP]` (one unknown token each).
    states = [" ".join(f"t{rng.choice(vocab)}" for _ in range(args.state_tokens - 2)) for _ in range(64)]
    prompt_tokens = len(generator.prompt_ids(states[0]))
    out: dict[str, Any] = {"samples": args.samples, "new_tokens": args.new_tokens, "prompt_tokens": prompt_tokens}
    generator.generate(states[:1], args.samples)  # warm-up
    for n in args.states_per_call:
        elapsed, tactics, calls = 0.0, 0, 0
        while calls < args.generation_calls:
            batch = states[calls * n % len(states):][:n]
            _sync(device)
            started = time.perf_counter()
            rows = generator.generate(batch, args.samples)
            _sync(device)
            elapsed += time.perf_counter() - started
            tactics += sum(len(row) for row in rows)
            calls += 1
        out[f"states_per_call_{n}"] = {"tactics_per_s": tactics / elapsed, "call_s": elapsed / calls,
                              "truncated_fraction": generator.stats.truncated / max(generator.stats.sequences, 1)}
    return out


# ---------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        config = tiny_qwen2_config(2048, eos_token_id=0, pad_token_id=1, bos_token_id=0)
        name = "cpu (--tiny)"
    else:
        config = qwen2_math_1p5b_config()
        name = torch.cuda.get_device_name()
    peak = None if args.tiny else peak_bf16_flops(name, args.peak_tflops)
    result: dict[str, Any] = {
        "status": "ok", "device": name, "torch": torch.__version__,
        "model": "tiny-qwen2 shape" if args.tiny else "Qwen2.5-Math-1.5B shape, random weights",
        "micro_batch": [args.batch, args.seq], "n_eff": args.n_eff, "peak_bf16_flops": peak, "train": {},
        "skipped": [],
    }
    variants = [False] + ([] if args.no_compile else [True])
    for compile_decoder in variants:
        label = "compiled" if compile_decoder else "eager"
        if time.perf_counter() - started > BUDGET_S * 0.6:
            result["skipped"].append(f"train/{label}: time budget")
            continue
        result["train"][label] = train_section(config, device, args, compile_decoder, peak)
    if time.perf_counter() - started > BUDGET_S * 0.8:
        result["skipped"].append("generation: time budget")
    else:
        result["generation"] = generation_section(config, device, args)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)

    eager = result["train"].get("eager", {})
    best = min(result["train"].values(), key=lambda v: v["dco"]["step_s"]) if result["train"] else {}
    gen8 = result.get("generation", {}).get(f"states_per_call_{max(args.states_per_call)}", {})
    measured = {"mfu_dco": best.get("dco", {}).get("mfu"), "peak_memory_gib": eager.get("peak_memory_gib"),
                "dco_over_ce": best.get("dco_over_ce"), "tactics_per_s_8_states": gen8.get("tactics_per_s")}
    result["goals"] = {
        key: {"goal": goal, "measured": measured[key],
              "met": None if measured[key] is None or args.tiny else
              (measured[key] <= goal if key in ("peak_memory_gib", "dco_over_ce") else measured[key] >= goal)}
        for key, goal in GOALS.items()}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes on the CPU (tests the script)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; aot_eager with --tiny: no C++ codegen on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the card is not known")
    parser.add_argument("--n-eff", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = dict(batch=2, seq=64, warmup=1, rounds=3, samples=4, new_tokens=8, state_tokens=40,
                 states_per_call=[1, 2], generation_calls=2, compile_backend="aot_eager") if args.tiny else \
        dict(batch=8, seq=1024, warmup=3, rounds=15, samples=32, new_tokens=48, state_tokens=400,
             states_per_call=[1, 8], generation_calls=4, compile_backend="inductor")
    for key, value in sizes.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        emit(json.dumps({"status": "skipped", "reason": "needs a CUDA GPU; none is visible to torch "
                         "(--tiny runs the same script on the CPU with a tiny model)"}))
        return 0
    try:
        result = run(args)
    except Exception as exc:  # one JSON object whatever happens
        emit(json.dumps({"status": "error", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    emit(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
