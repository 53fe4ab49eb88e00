"""`setup-lean` (fails fast offline), readiness checks, and the pinned Lake project files."""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading
import tomllib
from pathlib import Path

import typer
from typer.testing import CliRunner

from prover.cli.lean import probe_urls, setup_lean_command
from prover.lean.paths import LEAN_TOOLCHAIN, MATHLIB_OLEAN_REL, REPL_BINARY_REL, REPL_REV, MATHLIB_REV, toolchain_dir_name
from prover.lean.readiness import lean_readiness

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "lean_project"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(setup_lean_command)
    return app


def test_setup_fails_fast_naming_the_unreachable_host(tmp_path, monkeypatch):
    monkeypatch.setenv("ELAN_HOME", str(tmp_path / "elan"))
    result = CliRunner().invoke(_app(), ["--probe-url", "http://127.0.0.1:9/elan-init.sh", "--probe-url", "http://127.0.0.1:9/cache"])
    assert result.exit_code == 2
    out = result.output
    assert "unreachable" in out and "http://127.0.0.1:9/elan-init.sh" in out and "http://127.0.0.1:9/cache" in out
    assert not (tmp_path / "elan").exists()  # nothing was installed


def test_setup_refuses_a_directory_without_lakefile(tmp_path):
    result = CliRunner().invoke(_app(), ["--project", str(tmp_path), "--skip-network-check"])
    assert result.exit_code == 2 and "not a Lake project" in result.output


def test_any_http_answer_counts_as_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ok, refused = probe_urls([f"http://127.0.0.1:{server.server_port}/x", "http://127.0.0.1:9/"], timeout_s=5)
    finally:
        server.shutdown()
    assert ok.ok and ok.detail == "HTTP 404"
    assert not refused.ok and "refused" in refused.detail.lower()


def _executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_readiness_reports_each_missing_piece_and_how_to_fix_it(tmp_path, monkeypatch):
    elan = tmp_path / "elan"
    monkeypatch.setenv("ELAN_HOME", str(elan))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    project = tmp_path / "proj"
    project.mkdir()
    (project / "lakefile.toml").write_text('name = "x"\n')
    (project / "lean-toolchain").write_text(LEAN_TOOLCHAIN + "\n")
    before = {c.name: c for c in lean_readiness(project)}
    assert before["lean project"].ok
    for name in ("elan", "lake", "lean toolchain", "mathlib cache", "repl binary"):
        assert not before[name].ok and before[name].how_to_fix, name
    assert "lake exe cache get" in before["mathlib cache"].how_to_fix
    assert "lake build repl" in before["repl binary"].how_to_fix

    _executable(elan / "bin" / "elan")
    _executable(elan / "bin" / "lake")
    (elan / "toolchains" / toolchain_dir_name()).mkdir(parents=True)
    (project / MATHLIB_OLEAN_REL).parent.mkdir(parents=True)
    (project / MATHLIB_OLEAN_REL).write_bytes(b"olean")
    _executable(project / REPL_BINARY_REL)
    after = {c.name: c for c in lean_readiness(project)}
    for name in ("elan", "lake", "lean toolchain", "lean project", "mathlib cache", "repl binary"):
        assert after[name].ok, after[name]
    assert "not on PATH" in after["lake"].detail  # found in ~/.elan/bin only
    assert not after["lean_dojo (optional)"].required


def test_lean_project_pins_lean_mathlib_and_repl_v4_24_0():
    assert (PROJECT / "lean-toolchain").read_text().strip() == LEAN_TOOLCHAIN == "leanprover/lean4:v4.24.0"
    lakefile = tomllib.loads((PROJECT / "lakefile.toml").read_text())
    requires = {r["name"]: r for r in lakefile["require"]}
    assert requires["mathlib"]["rev"] == MATHLIB_REV == "v4.24.0"
    assert requires["REPL"]["rev"] == REPL_REV == "v4.24.0"
    assert requires["REPL"]["git"] == "https://github.com/leanprover-community/repl"
    manifest = json.loads((PROJECT / "lake-manifest.json").read_text())
    pinned = {p["name"]: p for p in manifest["packages"]}
    assert pinned["REPL"]["inputRev"] == "v4.24.0" and len(pinned["REPL"]["rev"]) == 40
    assert pinned["mathlib"]["rev"] == "f897ebcf72cd16f89ab4577d0c826cd14afaafc7"
    minif2f = json.loads((ROOT / "prover/resources/minif2f/miniF2F-lean4/lake-manifest.json").read_text())
    assert {p["name"]: p["rev"] for p in minif2f["packages"]}.items() <= {n: p["rev"] for n, p in pinned.items()}.items()
    assert "README.md" in os.listdir(PROJECT) and "GB" in (PROJECT / "README.md").read_text()
