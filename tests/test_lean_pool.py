"""The REPL pool: keying by imports, reuse, eviction, waiting limits, shutdown without orphans."""

from __future__ import annotations

import json
import threading
import time
import tempfile
from pathlib import Path

import pytest

import fake_repl
from prover.lean.pool import PoolBusy, PoolClosed, ReplPool, SlotGone, header_key
from prover.lean.process import ReplConfig
from test_lean_process import assert_group_gone, gone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path) -> ReplConfig:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({}), encoding="utf-8")
    return ReplConfig(command=fake_repl.fake_command("--script", script), cwd=ROOT, memory_limit_mb=1024, close_grace_s=0.1,
                      sandbox_writable=(Path(tempfile.gettempdir()),))


def test_header_key_ignores_order_duplicates_comments_and_the_body():
    a = header_key("import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\nopen Real")
    b = header_key("-- comment\nimport Aesop\nimport Mathlib\nimport Aesop\nopen Nat")
    assert a == b == ("Aesop", "Mathlib")
    assert header_key("") == ()
    assert header_key("import Mathlib.Tactic") != header_key("import Mathlib")


def test_identical_imports_in_any_order_share_one_process(cfg):
    with ReplPool(cfg, max_size=2) as pool:
        with pool.lease("import Mathlib\nimport Aesop\nopen Real") as a:
            a.process.header_env("open Real")
            pid = a.process.pid
        with pool.lease("import Aesop\nimport Mathlib\nopen Nat") as b:
            assert b.slot == a.slot and b.process.pid == pid
            b.process.header_env("open Nat")
        assert pool.started == 1 and pool.slots() == {a.slot: ("Aesop", "Mathlib")}


def test_concurrent_leases_of_one_key_get_different_processes(cfg):
    with ReplPool(cfg, max_size=2) as pool:
        with pool.lease("import Mathlib") as a, pool.lease("import Mathlib") as b:
            assert a.slot != b.slot
        assert pool.started == 2


def test_full_pool_evicts_the_least_recently_used_idle_process(cfg):
    with ReplPool(cfg, max_size=2) as pool:
        with pool.lease("import Mathlib") as a:
            a.process.header_env("")
            pid_a = a.process.pid
        time.sleep(0.01)
        with pool.lease("import Aesop") as b:
            b.process.header_env("")
        with pool.lease("import Batteries") as c:
            c.process.header_env("")
            assert pool.evictions == 1
            assert gone(pid_a)
            assert_group_gone(pid_a)
        assert set(pool.slots().values()) == {("Aesop",), ("Batteries",)}
        with pytest.raises(SlotGone):
            with pool.lease_slot(a.slot):
                pass


def test_waiting_is_limited_and_raises_pool_busy(cfg):
    with ReplPool(cfg, max_size=1, acquire_timeout_s=0.2) as pool:
        with pool.lease("import Mathlib"):
            started = time.monotonic()
            with pytest.raises(PoolBusy, match="gave up after waiting 0.2 s"):
                with pool.lease("import Aesop"):
                    pass
            assert 0.15 <= time.monotonic() - started < 2
            with pytest.raises(PoolBusy):
                with pool.lease("import Mathlib", timeout_s=0.05):
                    pass


def test_a_waiter_gets_the_process_when_it_is_released(cfg):
    with ReplPool(cfg, max_size=1, acquire_timeout_s=5) as pool:
        got = []

        def wait_for(slot: int) -> None:
            with pool.lease_slot(slot) as lease:
                got.append(lease.slot)

        with pool.lease("import Mathlib") as first:
            t = threading.Thread(target=wait_for, args=(first.slot,))
            t.start()
            time.sleep(0.1)
            assert got == []
        t.join(5)
        assert got == [first.slot]


def test_close_kills_every_process_and_refuses_new_leases(cfg, tmp_path):
    pool = ReplPool(cfg, max_size=3)
    pids = []
    with pool.lease("import Mathlib") as a, pool.lease("import Aesop") as b:
        for lease in (a, b):
            lease.process.header_env("")
            pids.append(lease.process.pid)
        held = b
    with pool.lease("import Batteries") as c:
        c.process.header_env("")
        pids.append(c.process.pid)
        pool.close()  # c is leased: it is closed when released
        assert c.process.alive
    assert not held.process.alive
    for pid in pids:
        assert gone(pid)
        assert_group_gone(pid)
    with pytest.raises(PoolClosed):
        with pool.lease("import Mathlib"):
            pass


def test_interpreter_exit_kills_processes_that_were_never_closed(tmp_path):
    """A program that forgets `close()` leaves no REPL (or its children) behind at exit."""
    import subprocess
    import sys

    script = tmp_path / "script.json"
    script.write_text("{}", encoding="utf-8")
    pid_log, child_file = tmp_path / "pids", tmp_path / "child"
    program = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import fake_repl
from prover.lean.pool import ReplPool
from prover.lean.process import ReplConfig
cmd = fake_repl.fake_command("--script", {str(script)!r}, "--pid-log", {str(pid_log)!r}, "--child-pid-file", {str(child_file)!r})
pool = ReplPool(ReplConfig(command=cmd, cwd={str(ROOT)!r}, memory_limit_mb=1024, sandbox="off"), max_size=1)
with pool.lease("import Mathlib") as lease:
    lease.process.header_env("open Real")
print("leaving without close()")
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    repl_pid = int(pid_log.read_text().split()[0])
    child_pid = int(child_file.read_text())
    assert gone(repl_pid) and gone(child_pid)
    assert_group_gone(repl_pid)
