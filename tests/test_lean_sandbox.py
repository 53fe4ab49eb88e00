"""The bubblewrap sandbox around Lean processes, with REAL sandboxed child processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import fake_repl
from prover.lean import sandbox
from prover.lean.process import ReplConfig, ReplProcess, ReplStartError
from prover.lean.repl_env import ReplEnvironment
from search.types import Proved, Theorem

ROOT = Path(__file__).resolve().parents[1]
BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(
    BWRAP is None or not sandbox.sandbox_status("require").active,
    reason="needs a working bubblewrap (apt-get install -y bubblewrap): "
    + (sandbox.sandbox_status("require").detail if BWRAP else "bwrap is not installed"),
)


def run_child(code: str, scratch: Path, *, sandboxed: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    if sandboxed:
        argv, active = sandbox.wrap_command(argv, scratch=scratch, cwd=ROOT, mode="require")
        assert active
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    yield srv.getsockname()[1]
    srv.close()


CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", {port}))
except OSError as e:
    print("blocked", e); sys.exit(3)
print("connected")
"""


@needs_bwrap
def test_sandboxed_child_cannot_reach_loopback(tmp_path, listener):
    control = run_child(CONNECT.format(port=listener), tmp_path, sandboxed=False)
    assert control.returncode == 0 and "connected" in control.stdout  # the test can fail
    boxed = run_child(CONNECT.format(port=listener), tmp_path)
    assert boxed.returncode == 3 and "blocked" in boxed.stdout, boxed


@needs_bwrap
def test_sandboxed_child_writes_only_its_scratch_dir(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    outside = tmp_path / "outside.txt"
    repo_file = ROOT / f"sandbox-escape-{os.getpid()}.txt"
    code = f"""
    import os, sys
    open(os.path.join(os.environ["TMPDIR"], "ok.txt"), "w").write("fine")
    failures = 0
    for target in ({str(outside)!r}, {str(repo_file)!r}, "/etc/dco-escape"):
        try:
            open(target, "w").write("escaped")
        except OSError:
            failures += 1
    print(failures)
    """
    r = run_child(code, scratch)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"
    assert (scratch / "ok.txt").read_text() == "fine"
    assert not outside.exists() and not repo_file.exists() and not Path("/etc/dco-escape").exists()


@needs_bwrap
def test_sandboxed_child_has_no_capabilities_and_cannot_remount(tmp_path):
    # Defect found here: run by root, bwrap kept every capability and `mount -o remount,rw /`
    # let the child write the host's /etc.
    target = Path(f"/etc/dco-sandbox-escape-{os.getpid()}")
    code = f"""
    import subprocess
    caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
    subprocess.run(["mount", "-o", "remount,rw", "/"], capture_output=True)
    try:
        open({str(target)!r}, "w").write("x")
        wrote = True
    except OSError:
        wrote = False
    try:
        open("/proc/sys/kernel/hostname", "w").write("dco")
        sysctl = True
    except OSError:
        sysctl = False
    print(caps, wrote, sysctl)
    """
    try:
        r = run_child(code, tmp_path)
        assert r.stdout.split() == ["0000000000000000", "False", "False"], r
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@needs_bwrap
def test_unix_sockets_under_run_and_tmp_are_hidden(tmp_path):
    path = Path(tempfile.mkdtemp(dir="/tmp")) / "svc.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        code = f"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect({str(path)!r})
        except OSError:
            sys.exit(3)
        """
        assert run_child(code, tmp_path, sandboxed=False).returncode == 0
        assert run_child(code, tmp_path).returncode == 3
    finally:
        srv.close()
        shutil.rmtree(path.parent, ignore_errors=True)


@needs_bwrap
@pytest.mark.parametrize("cwd", [Path("/"), Path("/tmp"), ROOT])
def test_masks_hold_whatever_the_working_directory(tmp_path, cwd):
    # A working directory at or above the masked layers must not re-expose them.
    probe = Path(tempfile.mkdtemp(dir="/tmp")) / "visible"
    probe.write_text("host")
    try:
        argv, _ = sandbox.wrap_command([sys.executable, "-c", f"import os; print(os.path.exists({str(probe)!r}))"],
                                       scratch=tmp_path, cwd=cwd, mode="require")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "False", r
    finally:
        shutil.rmtree(probe.parent, ignore_errors=True)


@needs_bwrap
def test_sandboxed_child_has_its_own_pid_namespace(tmp_path):
    r = run_child(f"import os\ntry:\n    os.kill({os.getpid()}, 0); print('sees host')\nexcept OSError:\n    print('isolated')", tmp_path)
    assert r.stdout.strip() == "isolated", r


@needs_bwrap
def test_fake_repl_inside_the_sandbox_still_proves(tmp_path):
    cfg = ReplConfig(command=fake_repl.fake_command(), cwd=ROOT, memory_limit_mb=2048, close_grace_s=0.1, sandbox="require")
    with ReplEnvironment(cfg, max_processes=1) as env:
        root = env.start(Theorem("complex_and", "theorem complex_and (p q r : Prop) (h1 : p ∧ q) (h2 : q → r) : p ∧ r := by\n"))
        proc = env.pool.processes()[0]
        assert proc.sandboxed
        scratch = proc._scratch
        assert scratch is not None and scratch.is_dir()
        state = root
        for tactic in ["apply And.intro", "exact h1.left", "apply h2"]:
            state = env.apply(state, tactic).state
        assert isinstance(env.apply(state, "exact h1.right"), Proved)
    assert not scratch.exists()  # the scratch dir goes with the process


def test_require_mode_without_bubblewrap_refuses_to_start(monkeypatch, caplog):
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name, *a, **k))
    status = sandbox.sandbox_status("require")
    assert not status.active and "apt-get install -y bubblewrap" in status.detail
    proc = ReplProcess(ReplConfig(command=fake_repl.fake_command(), cwd=ROOT, sandbox="require"))
    with pytest.raises(ReplStartError, match="sandbox is required"):
        proc.start()
    monkeypatch.setattr(sandbox, "_warned", False)
    auto = ReplProcess(ReplConfig(command=fake_repl.fake_command(), cwd=ROOT, sandbox="auto", close_grace_s=0.1))
    with caplog.at_level("WARNING", logger="prover.lean.sandbox"):
        auto.start()
    try:
        assert auto.alive and not auto.sandboxed
        assert "UNSANDBOXED" in caplog.text
    finally:
        auto.close()


def test_mode_comes_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("DCO_LEAN_SANDBOX", "off")
    assert sandbox.resolve_mode() == "off" and not sandbox.sandbox_status().active
    assert sandbox.resolve_mode("require") == "require"
    with pytest.raises(ValueError, match="sandbox mode"):
        ReplConfig(sandbox="sometimes")


def test_doctor_and_readiness_say_whether_the_sandbox_is_active(monkeypatch):
    from prover.doctor import run_checks
    from prover.lean.readiness import sandbox_check

    monkeypatch.setenv("DCO_LEAN_SANDBOX", "off")
    off = sandbox_check()
    assert off.name == "Lean sandbox" and not off.ok and "INACTIVE" in off.detail and not off.required
    monkeypatch.setenv("DCO_LEAN_SANDBOX", "require")
    required = sandbox_check()
    assert required.required and required.ok is sandbox.sandbox_status("require").active
    doctor = {c.name: c for c in run_checks()}
    assert doctor["Lean sandbox"].detail == required.detail


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None or SYSTEM_PYTHON is None,
                    reason="needs root, runuser and a system python3 to run a child as an unprivileged user")
def test_sandbox_works_for_an_unprivileged_user(tmp_path, listener):
    scratch = Path(tempfile.mkdtemp(dir="/tmp", prefix="dco-sbx-"))  # reachable by `nobody`
    os.chmod(scratch, 0o777)
    code = CONNECT.format(port=listener) + "\n"
    argv, _ = sandbox.wrap_command([SYSTEM_PYTHON, "-c", code], scratch=scratch, cwd=Path("/"), mode="require")
    r = subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "blocked" in r.stdout, r
    write = 'import os\nopen(os.environ["TMPDIR"] + "/x", "w").write("1")\ntry:\n    open("/etc/x-escape", "w")\nexcept OSError:\n    print("ro")'
    argv, _ = sandbox.wrap_command([SYSTEM_PYTHON, "-c", write], scratch=scratch, cwd=Path("/"), mode="require")
    r = subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=60)
    try:
        assert r.stdout.strip() == "ro" and (scratch / "x").read_text() == "1", r
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
