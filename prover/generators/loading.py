"""Checkpoints and the trainer's ensemble manifest → named `TransformersGenerator`s.

A model is `training.modeling.TINY_MODEL` or a checkpoint directory written by the trainer
(Hugging Face format: `config.json`, weights, tokenizer). The manifest
(`training.ensemble.read_manifest`, a file or the run directory holding `ensemble.json`)
names one checkpoint per `N_eff`; its member names become the generator names, so results
say which member found a proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is imported only when a model is loaded: clients of model servers never need it
    from prover.generators.transformers_gen import TransformersGenerator


class GeneratorLoadError(RuntimeError):
    """A generator could not be built: missing checkpoint, bad manifest, unloadable model."""


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path component(s) that tell the paths apart."""
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _check_checkpoint(path: Path, what: str) -> None:
    if not path.exists():
        raise GeneratorLoadError(f"{what}: checkpoint {path} does not exist")
    if not path.is_dir():
        raise GeneratorLoadError(f"{what}: checkpoint {path} is not a directory (expected a Hugging Face checkpoint)")
    if not (path / "config.json").is_file():
        raise GeneratorLoadError(f"{what}: {path} has no config.json: not a checkpoint written by the trainer")


def _load(path_or_name: str | Path, name: str, what: str, options: dict[str, Any]) -> "TransformersGenerator":
    from prover.generators.transformers_gen import TransformersGenerator
    from training.modeling import ModelLoadError

    try:
        return TransformersGenerator.load(path_or_name, name=name, **options)
    except (ModelLoadError, OSError, ValueError) as err:
        raise GeneratorLoadError(f"{what}: cannot load {path_or_name}: {err}") from err


def load_generators(
    models: Sequence[str | Path] | None = None,
    ensemble_manifest: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    **options: Any,
) -> dict[str, "TransformersGenerator"]:
    """Generators for `models` (checkpoint paths or `tiny-qwen2`) and/or the members of
    `ensemble_manifest`, in that order. `options` go to `TransformersGenerator` (temperature,
    max_new_tokens, beam_search, ...). Raises `GeneratorLoadError` naming the missing or
    unloadable checkpoint, and for duplicate member names.
    """
    from training.modeling import TINY_MODEL

    if not models and ensemble_manifest is None:
        raise GeneratorLoadError("no model given: pass checkpoint paths (or 'tiny-qwen2') or an ensemble manifest")
    load_options = dict(options, device=device, dtype=dtype)
    entries: list[tuple[str, str | Path, str]] = []  # (name, what to load, description for errors)
    paths = [Path(str(m)).expanduser() for m in models or () if str(m) != TINY_MODEL]
    path_names = iter(_unique_names(paths))
    for model in models or ():
        if str(model) == TINY_MODEL:
            entries.append((TINY_MODEL, TINY_MODEL, f"model {TINY_MODEL!r}"))
            continue
        path = Path(str(model)).expanduser()
        _check_checkpoint(path, f"model {str(model)!r}")
        entries.append((next(path_names), path, f"model {str(model)!r}"))
    if ensemble_manifest is not None:
        entries.extend(_manifest_entries(Path(ensemble_manifest)))
    generators: dict[str, "TransformersGenerator"] = {}
    for name, source, what in entries:
        if name in generators:
            raise GeneratorLoadError(f"{what}: generator name {name!r} is used twice; give the checkpoints distinct names")
        generators[name] = _load(source, name, what, load_options)
    return generators


def _manifest_entries(manifest: Path) -> list[tuple[str, Path, str]]:
    """(name, checkpoint, description) per member; `manifest` may be the run directory
    holding `ensemble.json`."""
    if not manifest.exists():
        raise GeneratorLoadError(f"ensemble manifest {manifest} does not exist")
    from training.ensemble import read_manifest

    try:
        members = read_manifest(manifest).members  # checks every checkpoint holds a model
    except (OSError, ValueError) as err:  # ManifestError is a ValueError naming file, member and problem
        raise GeneratorLoadError(f"ensemble manifest cannot be used: {err}") from err
    return [
        (m.name, Path(m.checkpoint), f"ensemble member {m.name!r} (N_eff={m.n_eff}) of {manifest}")
        for m in members
    ]
