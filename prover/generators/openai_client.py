"""A `TacticGenerator` that is a client of an OpenAI-compatible `/v1/completions` server.

In production the server is `vllm serve` (see `dco-prover serve-models`): many searches,
in many threads, workers and jobs, reach one server, and its continuous batching batches
them. One `propose` call is one HTTP request carrying every state's prompt with `n = k`,
`temperature`, `max_tokens`, optional `stop` strings, and `logprobs = 1`.

Prompts are token ids (the completions API takes a list of token-id lists as `prompt`),
built here by `training.prompt.build_prompt` with the served checkpoint's tokenizer and the
prompt budget it was trained with (`training.prompt.generation_prompt_budget`), so the
server sees exactly the tokens the trainer and the in-process generators build for the
state: one format, one truncation rule (header and first goal kept, later goals dropped
first). The client therefore needs the checkpoint's tokenizer: `tokenizer` is a loaded
tokenizer or the checkpoint directory / hub id it is read from (tokenizer files only,
never weights; the endpoints manifest's `checkpoint`). Without one the client refuses to
start (`MissingTokenizer`), unless `text_prompts=True` is set explicitly: then it sends
`format_prompt` text and lets vLLM cut over-long prompts from the left
(`truncate_prompt_tokens`, `truncation_side: left`), a different rule that can drop the
header, and it logs a warning saying so.

Scores: a sample's log-probability is the sum of its `logprobs.token_logprobs` — natural
logs, so <= 0 — over every generated token, the terminating EOS included (vLLM reports the
EOS token among the sampled tokens when it stops on it). vLLM's default
`--logprobs-mode raw_logprobs` reports the model's log-softmax before temperature or other
processing, i.e. the same temperature-1 score the transformers generator computes.

Deadline: `propose(..., timeout_s=T)` returns or raises `search.types.GeneratorError`
within `T` seconds. Each HTTP attempt's timeout is min(`request_timeout_s`, time left); a
transient failure (connection refused or reset, HTTP 429/500/502/503/504, a timeout) is
retried with exponential backoff (at most `max_retries` times and never past the
deadline), then raised as `GeneratorError(transient=True)` naming the cause. A request the
server rejects (400, 401, 403, 404 unknown model, 422) or a malformed answer raises
`GeneratorError(transient=False)` at once. The response body is read in chunks and the
deadline checked between them, so a late answer is dropped.

Text prompts (`text_prompts=True` only) use vLLM's extensions `add_special_tokens: false`
(the prompt is tokenised as the trainer tokenises it) and `truncate_prompt_tokens` with
`truncation_side: left`; `vllm_extensions=False` leaves them out for servers that reject
unknown fields. Token-id prompts need no extension.

The HTTP connection pool (`httpx.Client`, thread-safe) is shared by every generator of the
process that talks to the same server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from search.types import Candidate, GeneratorError
from training.prompt import FROM_CHECKPOINT, build_prompt, format_prompt, generation_prompt_budget

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: overload (429, 503), a restarting or failing engine, a proxy."""

_POOLS: dict[tuple[int, str], httpx.Client] = {}  # keyed by pid too: a forked child never reuses its parent's sockets
_POOLS_LOCK = threading.Lock()


def normalise_base_url(url: str) -> str:
    """`http://host:port` from `http://host:port`, `.../` or `.../v1` (the OpenAI clients'
    convention). Raises `ValueError` for anything that is not an http(s) URL."""
    text = url.strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    parsed = httpx.URL(text)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) URL of a completions server: {url!r} (e.g. http://127.0.0.1:8000)")
    return text


def shared_client(base_url: str, *, max_connections: int = 64) -> httpx.Client:
    """The process-wide connection pool for `base_url` (created on first use)."""
    key = (os.getpid(), base_url)
    with _POOLS_LOCK:
        client = _POOLS.get(key)
        if client is None or client.is_closed:
            client = httpx.Client(
                base_url=base_url,
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
                headers={"Content-Type": "application/json"},
            )
            _POOLS[key] = client
        return client


class MissingTokenizer(ValueError):
    """A completions client without the served checkpoint's tokenizer (and not told to send
    text prompts): it could not build the prompt tokens the model was trained on."""


def load_prompt_tokenizer(source: Any) -> Any:
    """The tokenizer prompts are built with: `source` itself when it is a loaded tokenizer,
    else the `tokenizer.json` of the checkpoint directory `source` (read with the `tokenizers`
    library: no torch), else `tiny-qwen2`'s, else `AutoTokenizer.from_pretrained(source)` (a
    directory or hub id; tokenizer files only). Raises `MissingTokenizer` naming `source` when it
    cannot be loaded."""
    if not isinstance(source, (str, os.PathLike)):
        if not callable(getattr(source, "encode", None)):
            raise MissingTokenizer(f"not a tokenizer: {type(source).__name__} has no encode()")
        return source
    text = str(source)
    path = os.path.expanduser(text)
    try:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            with open(os.path.join(path, "tokenizer.json"), "rb") as handle:
                return _shared_tokenizer_file(hashlib.sha256(handle.read()).hexdigest(), os.path.join(path, "tokenizer.json"))
        if text == "tiny-qwen2":  # training.modeling.TINY_MODEL: built in code, no files
            from training.modeling import load_tokenizer

            return load_tokenizer(text)
        from transformers import AutoTokenizer  # imports torch: model-free workers avoid it with tokenizer.json

        local = os.path.isdir(path)
        return AutoTokenizer.from_pretrained(path if local else text, local_files_only=local)
    except Exception as err:  # OSError, ValueError, the tokenizers library's own errors: all mean no tokenizer
        raise MissingTokenizer(
            f"cannot load the tokenizer of {text!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "give the served checkpoint's directory (the endpoints manifest's 'checkpoint', or --tokenizer)"
        ) from err


@functools.lru_cache(maxsize=16)
def _shared_tokenizer_file(digest: str, path: str) -> "_FastTokenizerFile":
    """One tokenizer per distinct `tokenizer.json` content (sha256 `digest`): the members of an
    ensemble share their base model's tokenizer, so a worker holds it once."""
    return _FastTokenizerFile(path)


class _FastTokenizerFile:
    """A checkpoint's `tokenizer.json` through the `tokenizers` library: the same ids as its
    Hugging Face fast tokenizer (which wraps this very object) without importing transformers,
    whose tokenizer module loads torch (service workers stay model-free)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tokenizer = Tokenizer.from_file(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __repr__(self) -> str:
        return f"_FastTokenizerFile({self.path!r})"


@dataclass
class ClientStats:
    """Counters since construction. `retries`: attempts repeated after a transient failure;
    `empty`: completions dropped because their text was blank; `truncated`: completions
    that stopped at `max_tokens` (kept, their log-prob has no EOS term)."""

    calls: int = 0
    states: int = 0
    retries: int = 0
    errors: int = 0
    empty: int = 0
    truncated: int = 0


class _Transient(Exception):
    """One failed attempt that may succeed when repeated."""


class OpenAICompletionsGenerator:
    """`TacticGenerator` over the OpenAI completions API of one served model.

    `base_url`: the server's root (`http://host:port`; a trailing `/v1` is accepted).
    `model`: the served model name (`--served-model-name`); None asks `/v1/models` once and
    takes the only model served there. `name`: the generator's (member's) name in results.
    `request_timeout_s`: one HTTP attempt's limit when the search gives no deadline.
    `max_retries`: transient failures repeated at most this often per call;
    `backoff_s`: the first retry's wait (doubling, with jitter, capped by `max_backoff_s`).
    `beam_search` is not offered: sample (vLLM's beam search does not return per-sample
    log-probs through this API).
    `tokenizer`: the served checkpoint's tokenizer, or its directory / hub id (see the
    module docstring); required unless `text_prompts=True` (text prompts, server-side
    truncation, a warning at the first request; also for clients that only probe `health`). `max_prompt_tokens`: the prompt
    budget; by default the one recorded in the checkpoint directory named by `tokenizer`
    (else 2048 tokens).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        name: str | None = None,
        temperature: float = 1.0,
        max_new_tokens: int = 96,
        stop: Sequence[str] | None = None,
        max_prompt_tokens: int | str | None = FROM_CHECKPOINT,
        tokenizer: Any = None,
        text_prompts: bool = False,
        request_timeout_s: float = 300.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        vllm_extensions: bool = True,
        seed: int | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 seconds, got {request_timeout_s!r}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be >= 0")
        self.base_url = normalise_base_url(base_url)
        self.model = model
        self.name = name or model or "openai"
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.stop = list(stop) if stop else None
        self.text_prompts = bool(text_prompts)
        if tokenizer is None and not self.text_prompts:
            raise MissingTokenizer(
                f"{self.name}: the completions client needs the served checkpoint's tokenizer to build the "
                "prompt tokens it was trained on: give its directory (the endpoints manifest's 'checkpoint', "
                "or --tokenizer PATH), or set text_prompts explicitly to send text that the server truncates "
                "by another rule"
            )
        checkpoint = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        self.tokenizer = None if tokenizer is None else load_prompt_tokenizer(tokenizer)
        self.max_prompt_tokens = generation_prompt_budget(max_prompt_tokens, checkpoint)
        self._warned_text = False  # the text-prompt warning is logged once, at the first request
        self.request_timeout_s = float(request_timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.vllm_extensions = bool(vllm_extensions)
        self.seed = seed
        self.stats = ClientStats()
        self._client = client if client is not None else shared_client(self.base_url)
        self._model_lock = threading.Lock()
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAICompletionsGenerator(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    # ---------------------------------------------------------------- requests

    def request_body(self, states: Sequence[str], k: int, model: str) -> dict[str, Any]:
        """The JSON body of `/v1/completions` for `states` (one prompt each, `n = k`): token-id
        prompts (`prompt_ids`), or with `text_prompts` and no tokenizer, prompt texts."""
        prompts: list[Any]
        if self.tokenizer is not None:
            prompts = [self.prompt_ids(state) for state in states]
        else:
            if not self._warned_text:
                self._warned_text = True
                logger.warning(
                    "%s: sending text prompts: the server truncates prompts over %s tokens from the left, "
                    "which differs from training's truncation (header and first goal kept); give the "
                    "checkpoint's tokenizer to send the training prompt tokens", self.name, self.max_prompt_tokens,
                )
            prompts = [format_prompt(state) for state in states]
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompts,
            "n": k,
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
            "logprobs": 1,
        }
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        if self.vllm_extensions and self.tokenizer is None:
            body["add_special_tokens"] = False
            if self.max_prompt_tokens is not None:
                body["truncate_prompt_tokens"] = self.max_prompt_tokens
                body["truncation_side"] = "left"  # keep the end (the goal), as the transformers generator does
        return body

    def prompt_ids(self, state: str) -> list[int]:
        """The prompt tokens sent for `state`: `training.prompt.build_prompt` within
        `max_prompt_tokens`, as the trainer and the in-process generators build them."""
        if self.tokenizer is None:
            raise MissingTokenizer(f"{self.name}: text prompts only (no tokenizer)")
        return build_prompt(self.tokenizer, state, self.max_prompt_tokens).ids

    def propose(self, states: Sequence[str], k: int, *, timeout_s: float | None = None) -> list[list[Candidate]]:
        """Up to `k` sampled tactics per state, scored by their summed token log-probs (<= 0).

        Raises `GeneratorError` (see the module docstring) within `timeout_s` seconds."""
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not states:
            return []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.states += len(states)
        try:
            model = self.served_model(deadline)
            answer = self._post_with_retries("/v1/completions", self.request_body(states, k, model), deadline)
            return self._candidates(answer, len(states), k)
        except GeneratorError:
            with self._stats_lock:
                self.stats.errors += 1
            raise

    def served_model(self, deadline: float | None = None) -> str:
        """The model name requests carry: the one given, else the only one `/v1/models` lists."""
        if self.model is not None:
            return self.model
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._model_lock.acquire(timeout=wait):  # another thread is asking; keep to our own deadline
            raise GeneratorError(f"{self.name}: no answer from {self.base_url}/v1/models within the search's time budget")
        try:
            if self.model is None:
                listing = self._request_with_retries("GET", "/v1/models", None, deadline)
                ids = [entry.get("id") for entry in listing.get("data", []) if isinstance(entry, dict)]
                if len(ids) != 1 or not isinstance(ids[0], str):
                    raise GeneratorError(
                        f"{self.name}: {self.base_url} serves {len(ids)} models ({', '.join(map(str, ids)) or 'none'}); "
                        "name the one to use (the endpoints manifest's 'model')",
                        transient=False,
                    )
                self.model = ids[0]
        finally:
            self._model_lock.release()
        return self.model

    def health(self, timeout_s: float = 2.0) -> tuple[bool, str]:
        """(ok, detail): the server answers `GET /health` with 200 and lists the served model
        in `/v1/models` (when a model is named), within `timeout_s`. For readiness probes."""
        try:
            response = self._client.get("/health", timeout=timeout_s)
            if response.status_code != 200:
                return False, f"{self.base_url}/health answered HTTP {response.status_code}"
            if self.model is None:
                return True, "healthy"
            listing = self._client.get("/v1/models", timeout=timeout_s).json()
            ids = [entry.get("id") for entry in listing.get("data", []) if isinstance(entry, dict)]
        except (httpx.HTTPError, ValueError, AttributeError) as err:
            return False, f"{self.base_url} unreachable: {type(err).__name__}: {err}"
        if self.model not in ids:
            return False, f"{self.base_url} does not serve {self.model!r} (it serves {', '.join(map(str, ids)) or 'nothing'})"
        return True, "healthy"

    def _post_with_retries(self, path: str, body: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        return self._request_with_retries("POST", path, json.dumps(body, ensure_ascii=False).encode("utf-8"), deadline)

    def _request_with_retries(self, method: str, path: str, content: bytes | None, deadline: float | None) -> dict[str, Any]:
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise GeneratorError(f"{self.name}: no answer from {self.base_url} within the search's time budget")
            try:
                return self._attempt(method, path, content, remaining)
            except _Transient as err:
                cause = str(err)
            if attempt >= self.max_retries:
                raise GeneratorError(f"{self.name}: {self.base_url} failed {attempt + 1} time(s); last: {cause}")
            wait = min(self.max_backoff_s, self.backoff_s * (2**attempt)) * random.uniform(0.5, 1.0)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise GeneratorError(
                    f"{self.name}: {self.base_url} failed {attempt + 1} time(s) and the search's time budget ends "
                    f"before another try; last: {cause}"
                )
            time.sleep(wait)
            attempt += 1
            with self._stats_lock:
                self.stats.retries += 1

    def _attempt(self, method: str, path: str, content: bytes | None, remaining: float | None) -> dict[str, Any]:
        """One HTTP exchange; the body is read in chunks, checking the deadline between them."""
        limit = self.request_timeout_s if remaining is None else min(self.request_timeout_s, remaining)
        stop_at = time.monotonic() + limit
        try:
            with self._client.stream(method, path, content=content, timeout=httpx.Timeout(limit)) as response:
                chunks = []
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > stop_at:
                        raise _Transient(f"the answer was still arriving after {limit:.3g} s (timed out)")
                raw = b"".join(chunks)
        except httpx.TimeoutException as err:
            raise _Transient(f"timed out after {limit:.3g} s ({type(err).__name__})") from err
        except (httpx.TransportError, httpx.StreamError) as err:  # refused, reset, closed mid-answer
            raise _Transient(f"{type(err).__name__}: {err or 'connection failed'}") from err
        status = response.status_code
        if status in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status} from {path}: {_error_message(raw)}")
        if status >= 400:
            hint = " (is the served model name right? see /v1/models)" if status == 404 else ""
            raise GeneratorError(f"{self.name}: {self.base_url}{path} rejected the request: HTTP {status}: {_error_message(raw)}{hint}", transient=False)
        try:
            answer = json.loads(raw)
        except ValueError as err:
            raise GeneratorError(f"{self.name}: {self.base_url}{path} answered HTTP {status} with invalid JSON: {raw[:200]!r}", transient=False) from err
        if not isinstance(answer, dict):
            raise GeneratorError(f"{self.name}: {self.base_url}{path} answered a JSON {type(answer).__name__}, not an object", transient=False)
        return answer

    # ---------------------------------------------------------------- answers

    def _candidates(self, answer: dict[str, Any], n_states: int, k: int) -> list[list[Candidate]]:
        try:
            rows, empty, truncated = candidates_from_completions(answer, n_states, k)
        except ValueError as err:
            raise GeneratorError(f"{self.name}: unusable answer from {self.base_url}: {err}", transient=False) from err
        with self._stats_lock:
            self.stats.empty += empty
            self.stats.truncated += truncated
        return rows


def candidates_from_completions(answer: dict[str, Any], n_states: int, k: int) -> tuple[list[list[Candidate]], int, int]:
    """Per prompt, the `Candidate`s of a `/v1/completions` answer, with the counts of empty
    (dropped) and length-truncated (kept) completions.

    Choice `index` i belongs to prompt i // k (the API orders a prompt's `n` samples
    together). A candidate's log-prob is the sum of `logprobs.token_logprobs`, clamped to <= 0
    against rounding. Raises `ValueError` for a wrong number of choices or missing log-probs.
    """
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != n_states * k:
        count = len(choices) if isinstance(choices, list) else "no"
        raise ValueError(f"{count} choices for {n_states} prompt(s) × n={k}")
    rows: list[list[Candidate]] = [[] for _ in range(n_states)]
    empty = truncated = 0
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        if not isinstance(index, int) or not 0 <= index < n_states * k:
            raise ValueError(f"choice index {index!r} out of range")
        logprobs = choice.get("logprobs") or {}
        token_logprobs = logprobs.get("token_logprobs")
        if not isinstance(token_logprobs, list) or any(not isinstance(x, (int, float)) for x in token_logprobs):
            raise ValueError("a choice has no per-token log-probs (the request asked logprobs=1)")
        if choice.get("finish_reason") == "length":
            truncated += 1
        text = (choice.get("text") or "").strip()
        if not text:
            empty += 1
            continue
        rows[index // k].append(Candidate(text, min(0.0, float(sum(token_logprobs)))))
    return rows, empty, truncated


def _error_message(raw: bytes) -> str:
    """The server's error text: vLLM/OpenAI `{"error": {"message": ...}}`, `{"message": ...}`
    or `{"detail": ...}`; else the start of the body."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
    return str(data)[:200]
