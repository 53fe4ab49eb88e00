"""A model server double that batches like `vllm serve`: an OpenAI-compatible
`/v1/completions` on 127.0.0.1 whose served models are `TacticGenerator`s behind the
project's `BatchingGenerator`, so concurrent requests (from many service workers) become
one model call, as a real server's continuous batching makes them.

- `POST /v1/completions`: each prompt (`training.prompt.format_prompt` of a state) is
  turned back into its state and the served model proposes `n` candidates; the answer is in
  vLLM's format, one choice per sample, a candidate's log-prob as its one token log-prob
  (the client sums them). Fewer candidates than `n` are padded by repeating (samples may
  repeat); none gives empty texts (the client drops them).
- `call_s`: seconds each model call takes whatever its batch size (a GPU forward's fixed
  cost); `expected_clients` / `window_s` set the batcher's release rule.
- Faults: `stall_s` (every completion request sleeps that long first), `fail_next` (HTTP
  statuses answered, in order, before serving again), `healthy` (False: `/health` is 503).
- `stats(name)`: the served model's batching counters (calls, requests, states).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from prover.eval.batching import BatchingGenerator
from search.types import Candidate, TacticGenerator
from tests.openai_double import LoopbackUvicorn
from training.prompt import PROMPT_TEMPLATE

_HEAD, _, _TAIL = PROMPT_TEMPLATE.partition("{state}")


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer() -> Any:
    from training.modeling import TINY_MODEL, load_tokenizer

    return load_tokenizer(TINY_MODEL)


def state_of(prompt: str | list[int]) -> str:
    """The state a prompt was made from (the whole prompt if it is not in the format); a
    token-id prompt (what the completions client sends) is decoded with the tiny tokenizer."""
    if not isinstance(prompt, str):
        prompt = _tiny_tokenizer().decode(prompt)
    if prompt.startswith(_HEAD) and prompt.endswith(_TAIL):
        return prompt[len(_HEAD) : len(prompt) - len(_TAIL)]
    return prompt


class _TimedModel:
    """`inner` whose every call takes at least `call_s` seconds."""

    def __init__(self, inner: TacticGenerator, call_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.call_s = call_s

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        time.sleep(self.call_s)
        return self.inner.propose(states, k)


class BatchingCompletionsServer:
    def __init__(
        self,
        models: Mapping[str, TacticGenerator],
        *,
        call_s: float = 0.02,
        window_s: float = 0.2,
        expected_clients: int | None = None,
    ) -> None:
        self.batchers = {
            name: BatchingGenerator(_TimedModel(model, call_s), max_wait_s=window_s, expected_clients=expected_clients)
            for name, model in models.items()
        }
        self.stall_s = 0.0
        self.fail_next: list[int] = []
        self.healthy = True
        self.requests = 0
        self._lock = threading.Lock()
        self._loopback = LoopbackUvicorn(self._app())
        self.url = self._loopback.url

    def stats(self, name: str) -> dict[str, Any]:
        return self.batchers[name].stats().to_json()

    def __enter__(self) -> "BatchingCompletionsServer":
        self._loopback.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loopback.stop()
        for batcher in self.batchers.values():
            batcher.close()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse({}, status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"} for name in self.batchers]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            with self._lock:
                self.requests += 1
                status = self.fail_next.pop(0) if self.fail_next else None
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            if status is not None:
                return JSONResponse({"error": {"message": f"injected HTTP {status}", "code": status}}, status_code=status)
            batcher = self.batchers.get(body.get("model"))
            if batcher is None:
                return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}, status_code=404)
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            n = int(body.get("n", 1))
            rows = await run_in_threadpool(batcher.propose, [state_of(p) for p in prompts], n)
            choices = []
            for i, row in enumerate(rows):
                samples = [row[j % len(row)] for j in range(n)] if row else [Candidate("", 0.0)] * n
                for j, c in enumerate(samples):
                    choices.append({
                        "index": i * n + j, "text": c.tactic, "finish_reason": "stop",
                        "logprobs": {"tokens": [c.tactic], "token_logprobs": [c.logprob], "text_offset": [0], "top_logprobs": None},
                    })
            return JSONResponse({"id": "cmpl-test", "object": "text_completion", "model": body.get("model"), "choices": choices})

        return app
