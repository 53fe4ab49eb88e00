"""Tactic generators (`search.types.TacticGenerator` implementations).

- `FixedTacticGenerator`: the same scored list for every state (no-model baseline).
- `OracleGenerator`: knows the replay data; a test double with real semantics.
- `TransformersGenerator`: a Hugging Face causal LM, batched sampling or beam search.
- `load_generators`: checkpoints and the trainer's ensemble manifest → named generators.
- `OpenAICompletionsGenerator`: a client of a model server's `/v1/completions` (`vllm serve`);
  `endpoint_generators`: one per member of an endpoints manifest (`dco-prover serve-models`).

The model-backed names import torch lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

from prover.generators.fixed import DEFAULT_TACTICS, FixedTacticGenerator
from prover.generators.oracle import OracleGenerator

__all__ = [
    "DEFAULT_TACTICS",
    "FixedTacticGenerator",
    "OracleGenerator",
    "TransformersGenerator",
    "GeneratorLoadError",
    "load_generators",
    "OpenAICompletionsGenerator",
    "endpoint_generators",
]

_LAZY = {
    "TransformersGenerator": "prover.generators.transformers_gen",
    "GeneratorLoadError": "prover.generators.loading",
    "load_generators": "prover.generators.loading",
    "OpenAICompletionsGenerator": "prover.generators.openai_client",
    "endpoint_generators": "prover.generators.endpoints",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prover.generators' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
