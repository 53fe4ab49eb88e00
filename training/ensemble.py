"""The ensemble manifest: a JSON file naming the checkpoints of one ensemble (one per N_eff).

Written by `dco-prover train` next to the runs (`output_dir/ensemble.json`), read by the
prover. Format (version 1):

    {"version": 1,
     "members": [{"name": "neff-16", "n_eff": 16, "checkpoint": "neff-16/final",
                  "base_model": "Qwen/Qwen2.5-Math-1.5B", "loss": "stepwise",
                  "epsilon": 0.3, "config_hash": "…", "steps": 1234,
                  "metrics": {...}}]}

`checkpoint` is a Hugging Face checkpoint directory, absolute or relative to the
manifest's directory. `read_manifest` resolves it to an absolute path and checks that it
holds a model (`config.json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_VERSION = 1
MANIFEST_NAME = "ensemble.json"


class ManifestError(ValueError):
    """An ensemble manifest that cannot be used; the message names the file and the problem."""


class EnsembleMember(BaseModel):
    """One checkpoint of the ensemble."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    n_eff: int = Field(ge=1)
    checkpoint: str = Field(min_length=1, description="Checkpoint dir; relative paths are relative to the manifest.")
    base_model: str
    loss: Literal["stepwise", "proof_level"] = "stepwise"
    epsilon: float = Field(0.0, ge=0.0, lt=1.0)
    config_hash: str | None = None
    steps: int | None = Field(None, ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)


class EnsembleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = MANIFEST_VERSION
    members: list[EnsembleMember] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "EnsembleManifest":
        names = [m.name for m in self.members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"member names must be unique; repeated: {', '.join(duplicates)}")
        return self


def member_name(n_eff: int) -> str:
    """The conventional member (and run directory) name for an N_eff: `neff-16`."""
    return f"neff-{n_eff}"


def write_manifest(path: str | os.PathLike[str], members: list[EnsembleMember]) -> Path:
    """Write a manifest; checkpoint paths inside the manifest's directory are stored relative."""
    path = Path(path)
    root = path.parent.resolve()
    stored = []
    for member in members:
        checkpoint = Path(member.checkpoint)
        if checkpoint.is_absolute() and checkpoint.resolve().is_relative_to(root):
            checkpoint = checkpoint.resolve().relative_to(root)
        stored.append(member.model_copy(update={"checkpoint": checkpoint.as_posix()}))
    try:
        manifest = EnsembleManifest(members=stored)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {_problems(exc)}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(path: str | os.PathLike[str], *, check_checkpoints: bool = True) -> EnsembleManifest:
    """Parse and validate a manifest; members' `checkpoint` come back as absolute paths.

    Raises `ManifestError` for a missing/invalid file, a bad field, or (with
    `check_checkpoints`) a checkpoint directory that does not exist or holds no model.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"ensemble manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    try:
        manifest = EnsembleManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {_problems(exc)}") from None
    root = path.parent.resolve()
    resolved = []
    for member in manifest.members:
        checkpoint = Path(member.checkpoint)
        checkpoint = checkpoint if checkpoint.is_absolute() else root / checkpoint
        if check_checkpoints:
            if not checkpoint.is_dir():
                raise ManifestError(f"{path}: member {member.name!r}: checkpoint directory not found: {checkpoint}")
            if not (checkpoint / "config.json").is_file():
                raise ManifestError(f"{path}: member {member.name!r}: {checkpoint} holds no model (no config.json)")
        resolved.append(member.model_copy(update={"checkpoint": str(checkpoint)}))
    return manifest.model_copy(update={"members": resolved})


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
