"""The Ray generation layer: joining an existing cluster through `RAY_ADDRESS`, generator
actors' GPU requests from the memory plan (placed by a real local Ray), and the remote
generator's deadline and retries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[dist]'")

from prover.eval.config import Distribution, EnvSpec, EvalConfig, MemberSpec, resolve_benchmark  # noqa: E402
from prover.eval.ray_backend import BackendError, RayBackend, RemoteGenerator, plan_gpu_shares  # noqa: E402
from search.api import search  # noqa: E402
from search.budget import Budget  # noqa: E402
from search.result import Status  # noqa: E402
from search.types import Candidate, GeneratorError, GeneratorTimeout, Theorem  # noqa: E402
from tests.ray_doubles import RayModel, RayProbe  # noqa: E402
from tests.search_doubles import GraphEnv, chain  # noqa: E402

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _config(members: int = 2, **distribution) -> EvalConfig:
    bench = resolve_benchmark("leandojo")
    return EvalConfig(
        benchmarks=(bench,),
        members=tuple(MemberSpec(f"m{i}", "tiny-qwen2", "transformers") for i in range(members)) + (MemberSpec("fixed", "fixed", "fixed"),),
        env=EnvSpec("replay", (bench.path,)),
        distribution=Distribution(use_ray=True, **distribution),
    )


# ----------------------------------------------------------------------------- the plan


def test_gpu_shares_are_planned_so_the_engines_fit() -> None:
    five_on_one = plan_gpu_shares(5, 1.0)
    assert five_on_one.num_gpus == 0.2 and five_on_one.memory_fraction == 0.18  # not 5 × 0.2 of the card for vLLM
    assert plan_gpu_shares(5, 2.0).num_gpus == 0.3333  # 3 + 2 per GPU, within Ray's 1e-4 resolution
    assert plan_gpu_shares(2, 4.0) == plan_gpu_shares(4, 4.0) and plan_gpu_shares(2, 4.0).num_gpus == 1.0
    assert plan_gpu_shares(3, 0.0).num_gpus == 0.0  # no GPU: the actors run on CPU
    assert plan_gpu_shares(3, 1.0, requested=0.25).num_gpus == 0.25
    with pytest.raises(ValueError, match="do not fit"):
        plan_gpu_shares(3, 1.0, requested=0.5)


def test_generator_actor_options_come_from_the_plan() -> None:
    backend = RayBackend(_config(members=2))
    plan = backend.generator_actor_plan(cluster_gpus=1.0)
    assert [m.name for m, _, _ in plan] == ["m0", "m1"]  # the model-free member needs no actor
    for _, options, actor_options in plan:
        assert actor_options["num_gpus"] == 0.5 and actor_options["num_cpus"] == 0
        assert options.gpu_memory_fraction == 0.45
    assert all(a["num_gpus"] == 0 for _, _, a in backend.generator_actor_plan(cluster_gpus=0.0))
    with pytest.raises(BackendError, match="do not fit"):
        RayBackend(_config(members=3, gpu_fraction_per_model=0.5)).generator_actor_plan(cluster_gpus=1.0)


# ------------------------------------------------------------------ joining a cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_JOIN_DRIVER = """
import json, ray
from prover.eval.config import Distribution, EnvSpec, EvalConfig, MemberSpec, resolve_benchmark
from prover.eval.ray_backend import RayBackend
bench = resolve_benchmark("leandojo")
config = EvalConfig(benchmarks=(bench,), members=(MemberSpec("fixed", "fixed", "fixed"),), env=EnvSpec("replay", (bench.path,)),
                    distribution=Distribution(use_ray=True, workers=4))
RayBackend(config)._init_ray(ray)
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


def test_ray_address_in_the_environment_joins_that_cluster() -> None:
    """With `RAY_ADDRESS` set and no `--ray-address`, the backend joins the running cluster
    (it used to call `ray.init(num_cpus=...)`, which Ray refuses when RAY_ADDRESS names one).
    Head and driver are processes of their own: Ray's process-wide state stays untouched here."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # a loopback test cluster: no token to share
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}", "--object-store-memory=80000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the head's GCS port answers once it is up
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or head.poll() is not None:
                pytest.fail("the Ray head did not start")
            time.sleep(0.5)
        driver = subprocess.run([sys.executable, "-c", _JOIN_DRIVER], env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"),
                                capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert driver.returncode == 0, driver.stderr[-3000:]
        joined = json.loads(driver.stdout.strip().splitlines()[-1])
        assert joined["cpus"] == 1.0  # the head's CPUs, not a local cluster of 4
        assert joined["gcs"].endswith(f":{port}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- actors on local Ray


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    # One declared GPU: Ray schedules fractional requests against it (nothing runs on it).
    ray.init(
        num_cpus=2, num_gpus=1, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def test_planned_shares_are_placed_by_ray(local_ray) -> None:
    backend = RayBackend(_config(members=2))
    plan = backend.generator_actor_plan(float(ray.cluster_resources()["GPU"]))
    probe = ray.remote(RayProbe)
    actors = [probe.options(**{k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus")}).remote() for _, _, opts in plan]
    try:
        assert [ray.get(a.gpu_ids.remote(), timeout=60) for a in actors] == [[0], [0]]  # two halves of GPU 0
        assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-6)  # the card is fully planned
    finally:
        for actor in actors:
            ray.kill(actor)


def test_a_stalled_generator_actor_ends_the_search_at_its_deadline(local_ray) -> None:
    stalled = ray.remote(RayModel).options(num_cpus=0, max_concurrency=4).remote(delay_s=30.0)
    try:
        remote = RemoteGenerator("m0", stalled)
        started = time.monotonic()
        with pytest.raises(GeneratorTimeout, match="no answer within"):
            remote.propose(["⊢ True"], 2, timeout_s=0.5)
        assert time.monotonic() - started < 2.0
        result = search(Theorem("thm"), GraphEnv(chain(2)), remote, strategy="best_first", budget=Budget(time_limit_s=1.0, tactic_timeout_s=0.5))
        assert result.status is Status.TIMEOUT and result.wall_time_s <= 1.5
        assert any("generator actor gave no answer" in e for e in result.errors)
    finally:
        ray.kill(stalled)


def test_a_restarting_actor_is_retried_and_a_dead_one_is_an_error(local_ray, tmp_path: Path) -> None:
    crashing = ray.remote(RayModel).options(num_cpus=0, max_restarts=1, max_task_retries=0).remote(crash_marker=str(tmp_path / "crashed"))
    try:
        answer = RemoteGenerator("m0", crashing, backoff_s=(0.5, 1.0, 2.0)).propose(["⊢ True"], 1, timeout_s=60.0)
        assert answer == [[Candidate("t0", -0.1)]] and (tmp_path / "crashed").exists()
    finally:
        ray.kill(crashing)
    dead = ray.remote(RayModel).options(num_cpus=0, max_restarts=0).remote()
    ray.kill(dead, no_restart=True)
    started = time.monotonic()
    with pytest.raises(GeneratorError, match="unavailable after 3 tries") as info:
        RemoteGenerator("m1", dead, backoff_s=(0.05, 0.05)).propose(["⊢ True"], 1, timeout_s=30.0)
    assert info.value.transient and time.monotonic() - started < 10.0


def test_a_generator_error_in_the_actor_reaches_the_search_in_its_own_words(local_ray) -> None:
    failing = ray.remote(RayModel).options(num_cpus=0).remote(error="m0: GPU out of memory for one state")
    try:
        with pytest.raises(GeneratorError) as info:
            RemoteGenerator("m0", failing).propose(["⊢ True"], 1, timeout_s=30.0)
        assert str(info.value) == "m0: GPU out of memory for one state" and not info.value.transient
    finally:
        ray.kill(failing)
