"""Test doubles of a model endpoint, for the default test environment (no vLLM).

`CompletionsDouble` is a real OpenAI-compatible completions server over a real transformers
model: `POST /v1/completions` samples `n` completions per prompt with the model (a prompt is
a text, tokenised without special tokens as vLLM does with `add_special_tokens: false`, or
a list of token ids, taken as they are, as vLLM does; a list of either is several prompts;
over-long prompts keep their last `truncate_prompt_tokens`), and answers in vLLM's response format
with each sampled token's temperature-1 natural-log probability (`token_logprobs`, EOS
included, as vLLM's default `raw_logprobs` mode reports them). `GET /health` and
`GET /v1/models` answer as vLLM's do; an unknown model is vLLM's 404 error body.

Faults for the deadline and retry tests: `fail_next` (HTTP statuses answered, in order,
before serving again), `stall_s` (seconds every request sleeps before answering).
`ResetServer` accepts connections and resets them (TCP RST) without answering.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from prover.generators.transformers_gen import TransformersGenerator


class _RawPromptGenerator(TransformersGenerator):
    """The transformers generator fed with prompt text (the server's input), not states."""

    truncate: int | None = None

    def prompt_ids(self, state: str | list[int]) -> list[int]:
        if isinstance(state, str):
            ids = list(self.tokenizer(state, add_special_tokens=False)["input_ids"])
        else:
            ids = list(state)
        if self.truncate is not None and len(ids) > self.truncate:
            ids = ids[-self.truncate :]
        return ids


def _prompts(prompt: Any) -> list[str | list[int]] | None:
    """The prompts of a completions request, as vLLM reads `prompt`: one text, texts, one
    token-id list, or token-id lists; None when it is none of these."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if is_ids(prompt):
        return [list(prompt)]
    if all(is_ids(p) for p in prompt):
        return [list(p) for p in prompt]
    return None


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status)


class LoopbackUvicorn:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port, in a daemon thread:
    `start()` returns once it accepts connections, `stop()` shuts it down."""

    def __init__(self, app: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, timeout_s: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the loopback server at {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


class CompletionsDouble:
    """A completions server over `model` on 127.0.0.1 (an ephemeral port) in a thread."""

    def __init__(self, model: Any, tokenizer: Any, served_name: str = "tiny", max_model_len: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.fail_next: list[int] = []
        self.stall_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.app = self._build_app()
        self._loopback = LoopbackUvicorn(self.app)
        self.port = self._loopback.port
        self.url = self._loopback.url

    def __enter__(self) -> "CompletionsDouble":
        self._loopback.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loopback.stop()

    # ------------------------------------------------------------------ the app

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse({}, status_code=200)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            with self.lock:
                self.requests.append(body)
                status = self.fail_next.pop(0) if self.fail_next else None
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            if status is not None:
                return _error(status, f"injected HTTP {status}", "ServiceUnavailableError" if status == 503 else "InternalServerError")
            if body.get("model") != self.served_name:
                return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            problem = self._invalid(body)
            if problem:
                return _error(400, problem, "BadRequestError")
            return JSONResponse(await run_in_threadpool(self._complete, body))

        return app

    def _invalid(self, body: dict[str, Any]) -> str | None:
        n, max_tokens = body.get("n", 1), body.get("max_tokens", 16)
        if not isinstance(n, int) or n < 1:
            return f"n must be at least 1, got {n}."
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_model_len:
            return f"max_tokens must be in [1, {self.max_model_len}], got {max_tokens}."
        if not float(body.get("temperature", 1.0)) > 0:
            return "this double samples only: temperature must be > 0"
        prompts = _prompts(body.get("prompt"))
        if prompts is None:
            return "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        vocab = len(self.tokenizer)
        for prompt in prompts:
            if not isinstance(prompt, str) and not all(0 <= t < vocab for t in prompt):
                return f"Token id out of vocabulary (size {vocab})"
            if isinstance(prompt, str) and not prompt or not isinstance(prompt, str) and not prompt:
                return "The prompt cannot be empty"
        return None

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = _prompts(body["prompt"])
        n = int(body.get("n", 1))
        gen = _RawPromptGenerator(
            self.model,
            self.tokenizer,
            temperature=float(body.get("temperature", 1.0)),
            max_new_tokens=int(body.get("max_tokens", 16)),
            max_prompt_tokens=None,
        )
        gen.truncate = body.get("truncate_prompt_tokens")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        with self.lock:  # one forward at a time: the model is shared
            rows = gen.generate(prompts, n)
            choices = []
            for i, (prompt, row) in enumerate(zip(prompts, rows)):
                prompt_ids = gen.prompt_ids(prompt)
                for j, sample in enumerate(row):
                    token_logprobs = self._token_logprobs(prompt_ids, list(sample.token_ids))
                    tokens = [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in sample.token_ids]
                    choices.append(
                        {
                            "index": i * n + j,
                            "text": self.tokenizer.decode(
                                list(sample.token_ids[:-1] if sample.finished else sample.token_ids), skip_special_tokens=True
                            ),
                            "logprobs": {
                                "text_offset": list(range(len(tokens))),
                                "token_logprobs": token_logprobs,
                                "tokens": tokens,
                                "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, token_logprobs)],
                            },
                            "finish_reason": "stop" if sample.finished else "length",
                            "stop_reason": None,
                        }
                    )
        return {"id": "cmpl-double", "object": "text_completion", "created": int(time.time()), "model": self.served_name, "choices": choices,
                "usage": {"prompt_tokens": 0, "completion_tokens": sum(len(c["logprobs"]["tokens"]) for c in choices), "total_tokens": 0}}

    @torch.inference_mode()
    def _token_logprobs(self, prompt_ids: list[int], tokens: list[int]) -> list[float]:
        """Temperature-1 log-softmax of each sampled token given everything before it."""
        ids = torch.tensor([prompt_ids + tokens])
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return [float(logp[i, t]) for i, t in enumerate(tokens)]


class ResetServer:
    """Accepts TCP connections on 127.0.0.1 and resets each at once (SO_LINGER 0 → RST)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                conn.recv(65536)  # the request arrives, then the connection is torn down
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def __enter__(self) -> "ResetServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def free_port() -> int:
    """A port nothing listens on (for connection-refused tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """Serve a checkpoint like `vllm serve` would (a stand-in process for the launcher tests):
    `python tests/openai_double.py --model DIR --served-model-name NAME --port P`."""
    import argparse

    from training.modeling import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    model = load_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    double = CompletionsDouble(model, tokenizer, served_name=args.served_model_name)
    uvicorn.run(double.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
