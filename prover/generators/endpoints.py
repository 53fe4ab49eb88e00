"""The endpoints manifest: which model server serves which ensemble member.

Written by `dco-prover serve-models` once every server answers, read by `prove` / `eval`
(`--endpoints FILE`) and the service, which then build one completions client per member
(`prover.generators.openai_client.OpenAICompletionsGenerator`). Format (version 1):

    {"version": 1,
     "members": [{"name": "neff-16", "base_url": "http://127.0.0.1:8100",
                  "model": "neff-16", "checkpoint": "/runs/neff-16/final",
                  "n_eff": 16, "device": "cuda:0", "gpu_memory_utilization": 0.17}]}

`name` is the member's name in results (the trainer's member name); `base_url` the server's
root (`http://host:port`); `model` the served model name requests carry; `checkpoint` the
served checkpoint's directory, whose tokenizer and recorded prompt budget the clients use to
build prompt tokens (needed unless a tokenizer is given otherwise). The rest records
where the member runs (informational). A hand-written manifest naming servers started some
other way (`vllm serve ... --served-model-name NAME`) is just as valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENDPOINTS_VERSION = 1


class EndpointsError(ValueError):
    """An endpoints manifest that cannot be used; the message names the file and the problem."""


class Endpoint(BaseModel):
    """One member's model server."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1, description="Server root, http(s)://host:port (a trailing /v1 is dropped).")
    model: str = Field(min_length=1, description="The served model name (vLLM's --served-model-name).")
    checkpoint: str | None = None
    n_eff: int | None = Field(None, ge=1)
    device: str | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        from prover.generators.openai_client import normalise_base_url

        return normalise_base_url(value)


class EndpointsManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = ENDPOINTS_VERSION
    members: list[Endpoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "EndpointsManifest":
        names = [m.name for m in self.members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"member names must be unique; repeated: {', '.join(duplicates)}")
        return self


def read_endpoints(path: str | os.PathLike[str]) -> EndpointsManifest:
    """Parse and validate an endpoints manifest; raises `EndpointsError` naming the problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EndpointsError(f"endpoints manifest not found: {path} (written by `dco-prover serve-models`)") from None
    except IsADirectoryError:
        raise EndpointsError(f"endpoints manifest {path} is a directory, not a JSON file") from None
    except json.JSONDecodeError as exc:
        raise EndpointsError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    try:
        return EndpointsManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise EndpointsError(f"{path}: {problems}") from None


def write_endpoints(path: str | os.PathLike[str], members: list[Endpoint]) -> Path:
    """Write the manifest atomically (a reader never sees half a file)."""
    path = Path(path)
    manifest = EndpointsManifest(members=members)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    tmp.replace(path)
    return path


def endpoint_generators(manifest: EndpointsManifest | str | os.PathLike[str], *, tokenizer: Any = None,
                        **options: Any) -> dict[str, Any]:
    """One `OpenAICompletionsGenerator` per member (named as the member), in manifest order;
    `options` go to every client (temperature, max_new_tokens, timeouts). Each client builds
    its prompt tokens with its member's `checkpoint` (tokenizer files and the recorded prompt
    budget), or with `tokenizer` when given (one for all members). A member with neither
    raises `MissingTokenizer` naming it, unless `text_prompts=True` is among `options`."""
    from prover.generators.openai_client import MissingTokenizer, OpenAICompletionsGenerator

    if not isinstance(manifest, EndpointsManifest):
        manifest = read_endpoints(manifest)
    generators = {}
    for m in manifest.members:
        try:
            generators[m.name] = OpenAICompletionsGenerator(
                m.base_url, model=m.model, name=m.name, tokenizer=tokenizer if tokenizer is not None else m.checkpoint,
                **options,
            )
        except MissingTokenizer as err:
            raise MissingTokenizer(f"endpoints member {m.name!r}: {err} (it has no 'checkpoint' in the manifest)"
                                   if tokenizer is None and m.checkpoint is None else f"endpoints member {m.name!r}: {err}") from err
    return generators
