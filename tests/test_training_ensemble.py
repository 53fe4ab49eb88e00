"""Ensemble manifest: roundtrip, relative checkpoint paths, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.ensemble import EnsembleMember, ManifestError, member_name, read_manifest, write_manifest


def fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def member(n_eff: int, checkpoint: Path | str, **extra) -> EnsembleMember:
    return EnsembleMember(name=member_name(n_eff), n_eff=n_eff, checkpoint=str(checkpoint),
                          base_model="tiny-qwen2", **extra)


def test_roundtrip_with_relative_and_absolute_checkpoints(tmp_path):
    inside = fake_checkpoint(tmp_path / "runs" / "neff-1" / "final")
    outside = fake_checkpoint(tmp_path / "elsewhere" / "ckpt")
    path = write_manifest(tmp_path / "runs" / "ensemble.json",
                          [member(1, inside, epsilon=0.3, steps=7, metrics={"loss": 1.5}), member(16, outside)])
    stored = json.loads(path.read_text())
    assert stored["version"] == 1
    assert stored["members"][0]["checkpoint"] == "neff-1/final"  # relative to the manifest
    assert stored["members"][1]["checkpoint"] == str(outside.resolve())

    manifest = read_manifest(path)
    assert [(m.name, m.n_eff) for m in manifest.members] == [("neff-1", 1), ("neff-16", 16)]
    assert manifest.members[0].checkpoint == str(inside.resolve())
    assert manifest.members[0].metrics == {"loss": 1.5} and manifest.members[0].steps == 7
    assert read_manifest(tmp_path / "runs").members == manifest.members  # a directory means its ensemble.json


def test_manifest_moves_with_its_directory(tmp_path):
    fake_checkpoint(tmp_path / "a" / "neff-4" / "final")
    write_manifest(tmp_path / "a" / "ensemble.json", [member(4, tmp_path / "a" / "neff-4" / "final")])
    (tmp_path / "a").rename(tmp_path / "b")
    assert read_manifest(tmp_path / "b" / "ensemble.json").members[0].checkpoint == str(
        (tmp_path / "b" / "neff-4" / "final").resolve())


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    path = write_manifest(tmp_path / "ensemble.json", [member(8, "neff-8/final")])
    with pytest.raises(ManifestError, match=r"member 'neff-8': checkpoint directory not found"):
        read_manifest(path)
    (tmp_path / "neff-8" / "final").mkdir(parents=True)
    with pytest.raises(ManifestError, match="holds no model"):
        read_manifest(path)
    assert read_manifest(path, check_checkpoints=False).members[0].n_eff == 8


@pytest.mark.parametrize(("content", "problem"), [
    ("not json", "invalid JSON"),
    ('{"version": 2, "members": []}', "version"),
    ('{"version": 1, "members": []}', "members"),
    ('{"version": 1, "members": [{"name": "x", "n_eff": 0, "checkpoint": "c", "base_model": "m"}]}', "n_eff"),
    ('{"version": 1, "members": [{"name": "x", "n_eff": 1, "base_model": "m"}]}', "checkpoint"),
])
def test_invalid_manifests(tmp_path, content, problem):
    path = tmp_path / "ensemble.json"
    path.write_text(content)
    with pytest.raises(ManifestError, match=problem):
        read_manifest(path, check_checkpoints=False)


def test_duplicate_names_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="repeated: neff-1"):
        write_manifest(tmp_path / "ensemble.json", [member(1, "a"), member(1, "b")])
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.json")
