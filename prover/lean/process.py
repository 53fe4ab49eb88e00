"""One Lean REPL process: spawning, one request at a time with a wall-clock limit, restarts.

Invariants:
- The process runs in its own session/process group (`start_new_session`), so `lake env`
  and the `repl` it spawns are killed together with `killpg`; descendants found with
  psutil are killed too, in case one left the group. Every kill reaps the leader.
- The environment is scrubbed to an allow-list (PATH, HOME, locale, TMPDIR, LEAN*, ELAN*,
  LAKE*) plus `ReplConfig.extra_env`; `RLIMIT_AS` (virtual memory, MiB) and `RLIMIT_CORE=0`
  are set in the child before `exec`.
- A request that times out, a crash (EOF, broken pipe), garbage or an oversized response
  kills the process and raises; the process is *not* restarted implicitly. `generation`
  counts starts, so a caller holding ids from an older generation can tell they are gone.
- The header: imports are sent once per generation (`{"cmd": "import ..."}` in a fresh
  environment); each distinct non-import header body is elaborated once on top of it and
  its environment id cached (`header_env`). With `pickle_dir`, header environments are
  pickled and, on a fresh process, unpickled instead of re-elaborated.
- Reads and writes are non-blocking through one selector over stdin/stdout/stderr, so a
  chatty stderr or a large request can never deadlock the pipe.
- Each process gets its own scratch directory (its `TMPDIR`, removed when it is killed) and,
  where the machine allows, runs in the bubblewrap sandbox (`prover.lean.sandbox`: no
  network, read-only file system except the scratch dir and `sandbox_writable`, own PID
  namespace). `ReplConfig.sandbox`: `auto` / `require` / `off` (None: `$DCO_LEAN_SANDBOX`,
  default `auto`); `ReplProcess.sandboxed` says whether the running process is.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil

from prover.lean.paths import default_repl_command, lean_project_dir
from prover.lean.sandbox import SandboxUnavailable, resolve_mode, wrap_command
from prover.lean.protocol import (
    CommandResponse,
    ErrorResponse,
    ProtocolError,
    Response,
    ResponseFramer,
    TacticResponse,
    command_request,
    decode_response,
    encode_request,
    pickle_env_request,
    tactic_request,
    unpickle_env_request,
)

__all__ = [
    "ReplConfig",
    "ReplProcess",
    "ReplError",
    "ReplStartError",
    "ReplTimeout",
    "ReplCrashed",
    "ReplProtocolError",
    "ReplOutputTooLarge",
    "HeaderError",
    "scrubbed_environment",
    "kill_all_processes",
]

DEFAULT_ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_*", "TZ", "TMPDIR", "LEAN*", "ELAN*", "LAKE*")


@dataclass(frozen=True)
class ReplConfig:
    """How to run REPL processes. Times are wall-clock seconds, sizes bytes, memory MiB.

    `command` defaults to `lake env <lean_project>/.lake/packages/REPL/.lake/build/bin/repl`
    run in `cwd` (default: the Lake project). `memory_limit_mb` bounds virtual memory
    (`RLIMIT_AS`); importing Mathlib maps several GiB of .olean files, so keep it >= 8192
    for Mathlib headers (None: no limit). `max_requests` recycles a process at the next
    theorem start once it has served that many requests (the REPL never frees states).
    """

    command: tuple[str, ...] = field(default_factory=default_repl_command)
    cwd: Path | None = None
    memory_limit_mb: int | None = 16384
    command_timeout_s: float = 60.0
    tactic_timeout_s: float = 30.0
    header_timeout_s: float = 900.0
    verify_timeout_s: float = 300.0
    max_requests: int = 2000
    max_response_bytes: int = 64 * 1024 * 1024
    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW
    extra_env: Mapping[str, str] = field(default_factory=dict)
    pickle_dir: Path | None = None
    stderr_tail_bytes: int = 64 * 1024
    close_grace_s: float = 0.5
    sandbox: str | None = None
    sandbox_writable: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.sandbox is not None:
            object.__setattr__(self, "sandbox", resolve_mode(self.sandbox))
        object.__setattr__(self, "sandbox_writable", tuple(Path(p) for p in self.sandbox_writable))
        # Accept str paths and list commands from callers; store the canonical types.
        object.__setattr__(self, "command", tuple(str(c) for c in self.command))
        if self.cwd is not None:
            object.__setattr__(self, "cwd", Path(self.cwd))
        if self.pickle_dir is not None:
            object.__setattr__(self, "pickle_dir", Path(self.pickle_dir))
        if not self.command:
            raise ValueError("ReplConfig.command is empty")

    def working_dir(self) -> Path:
        return self.cwd if self.cwd is not None else lean_project_dir()


class ReplError(Exception):
    """Base of the REPL client's errors."""


class ReplStartError(ReplError):
    """The process could not be spawned (missing `lake`, missing project directory)."""


class ReplTimeout(ReplError):
    """A request ran past its wall-clock limit; the process group was killed."""


class ReplCrashed(ReplError):
    """The process died, closed its output or is not running."""


class ReplProtocolError(ReplError):
    """The process answered something that is not a response; it was killed."""


class ReplOutputTooLarge(ReplProtocolError):
    """A response exceeded `max_response_bytes`; the process was killed."""


class HeaderError(ReplError):
    """The header (imports, opens, options) did not elaborate."""


_LIVE: "weakref.WeakSet[ReplProcess]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def kill_all_processes() -> None:
    """Kills every REPL process group this interpreter started (registered with atexit)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        p.kill()


atexit.register(kill_all_processes)


def scrubbed_environment(
    allow: tuple[str, ...] = DEFAULT_ENV_ALLOW,
    extra: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables of `source` (default `os.environ`) matching `allow` globs, plus `extra`."""
    src = os.environ if source is None else source
    env = {k: v for k, v in src.items() if any(fnmatch.fnmatchcase(k, pat) for pat in allow)}
    if extra:
        env.update(extra)
    return env


def _child_limits(memory_limit_mb: int | None) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_limit_mb is not None:
            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


class ReplProcess:
    """A REPL process for one import set. Not thread-safe: use it under a pool lease."""

    def __init__(self, config: ReplConfig, imports: tuple[str, ...] = ()) -> None:
        self.config = config
        self.imports = tuple(imports)
        self.generation = 0
        self.request_count = 0
        self.last_elapsed_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._framer = ResponseFramer()
        self._stderr_tail = bytearray()
        self._import_env: int | None = None
        self._imported = False
        self._header_envs: dict[str, int] = {}
        self._scratch: Path | None = None
        self.sandboxed = False
        with _LIVE_LOCK:
            _LIVE.add(self)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawns a fresh process (killing any previous one); header envs are re-created lazily."""
        self.kill()
        cwd = self.config.working_dir()
        if not cwd.is_dir():
            raise ReplStartError(f"Lean project directory {cwd} does not exist (run `dco-prover setup-lean`)")
        program = self.config.command[0]
        if shutil.which(program, path=scrubbed_environment(("PATH",)).get("PATH")) is None and not (
            os.sep in program and os.access(cwd / program, os.X_OK)
        ):
            # Checked here: inside the sandbox a missing program would only show as an exit.
            raise ReplStartError(f"could not start the REPL with {list(self.config.command)!r} in {cwd}: {program} not found")
        self._scratch = Path(tempfile.mkdtemp(prefix="dco-lean-"))
        writable = [*self.config.sandbox_writable]
        if self.config.pickle_dir is not None:
            self.config.pickle_dir.mkdir(parents=True, exist_ok=True)
            writable.append(self.config.pickle_dir)
        try:
            argv, self.sandboxed = wrap_command(
                self.config.command, scratch=self._scratch, writable=writable, cwd=cwd, mode=self.config.sandbox
            )
        except SandboxUnavailable as e:
            self._remove_scratch()
            raise ReplStartError(str(e)) from e
        env = scrubbed_environment(self.config.env_allow, self.config.extra_env)
        env["TMPDIR"] = str(self._scratch)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=str(cwd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=_child_limits(self.config.memory_limit_mb),
                close_fds=True,
            )
        except OSError as e:
            self._remove_scratch()
            raise ReplStartError(f"could not start the REPL with {list(self.config.command)!r} in {cwd}: {e}") from e
        assert proc.stdin and proc.stdout and proc.stderr
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        self._proc, self._selector = proc, sel
        self.generation += 1
        self.request_count = 0
        self._framer.clear()
        self._stderr_tail.clear()
        self._import_env, self._imported = None, False
        self._header_envs.clear()

    def ensure_started(self) -> None:
        if not self.alive:
            self.start()

    def recycle_if_needed(self) -> bool:
        """Restarts the process if it served `max_requests`; True when it did."""
        if self.alive and self.request_count >= self.config.max_requests:
            self.start()
            return True
        return False

    def kill(self) -> None:
        """Kills the whole process group and reaps it; idempotent."""
        proc, self._proc = self._proc, None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if proc is None:
            self._remove_scratch()
            return
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for d in descendants:
            try:
                d.kill()
            except psutil.Error:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait on us
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        """Ends the process: EOF on stdin (the REPL exits on EOF), a short grace, then kill."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=self.config.close_grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", errors="replace")

    # --- requests --------------------------------------------------------------------------

    def request(self, req: dict[str, Any], timeout_s: float | None = None) -> Response:
        """Sends one request and returns its typed response.

        Raises `ReplCrashed` if the process is not running (no implicit restart),
        `ReplTimeout`/`ReplCrashed`/`ReplProtocolError` after killing it.
        """
        if not self.alive:
            code = None if self._proc is None else self._proc.poll()
            self.kill()
            raise ReplCrashed(f"REPL process is not running (exit code {code})")
        self._check_quiet()
        timeout = self.config.command_timeout_s if timeout_s is None else timeout_s
        payload = encode_request(req)
        started = time.monotonic()
        self.request_count += 1
        try:
            frame = self._exchange(payload, started + timeout)
        finally:
            self.last_elapsed_s = time.monotonic() - started
        try:
            return decode_response(frame)
        except ProtocolError as e:
            self.kill()
            raise ReplProtocolError(f"{e} (process killed)") from e

    def _check_quiet(self) -> None:
        """Between requests the REPL must be silent: unsolicited output means the stream is
        out of step (a later answer could be taken for this request's), so the process goes."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            extra = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            extra = None
        if extra == b"":
            raise self._crashed("the REPL closed its output (process died)")
        if (extra and extra.strip()) or self._framer.pending:
            self.kill()
            raise ReplProtocolError("the REPL wrote output nobody asked for (process killed)")

    def _exchange(self, payload: bytes, deadline: float) -> bytes:
        proc, sel = self._proc, self._selector
        assert proc is not None and sel is not None and proc.stdin is not None
        # Most requests fit in the pipe buffer: write directly, wait for writability only if not.
        try:
            offset = os.write(proc.stdin.fileno(), payload)
        except BlockingIOError:
            offset = 0
        except OSError:
            raise self._crashed("broken pipe while writing the request") from None
        writing = offset < len(payload)
        if writing:
            sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise ReplTimeout("no response within the wall-clock limit (process group killed)")
                for key, _ in sel.select(remaining):
                    if key.data == "in":
                        try:
                            offset += os.write(key.fd, payload[offset : offset + 65536])
                        except BlockingIOError:
                            continue
                        except OSError:
                            raise self._crashed("broken pipe while writing the request") from None
                        if offset >= len(payload):
                            sel.unregister(proc.stdin)
                            writing = False
                    elif key.data == "out":
                        try:
                            data = os.read(key.fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            raise self._crashed("the REPL closed its output (process died)")
                        frames = self._framer.feed(data)
                        if frames:
                            if len(frames) > 1 or self._framer.pending:
                                self.kill()
                                raise ReplProtocolError("the REPL answered one request with more than one response (process killed)")
                            return frames[0]
                        if self._framer.pending > self.config.max_response_bytes:
                            self.kill()
                            raise ReplOutputTooLarge(
                                f"response exceeded {self.config.max_response_bytes} bytes (process killed)"
                            )
                    else:
                        try:
                            data = os.read(key.fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            sel.unregister(key.fileobj)
                            continue
                        self._stderr_tail += data
                        excess = len(self._stderr_tail) - self.config.stderr_tail_bytes
                        if excess > 0:
                            del self._stderr_tail[:excess]
        finally:
            if writing and self._selector is not None and proc.stdin is not None:
                try:
                    self._selector.unregister(proc.stdin)
                except (KeyError, ValueError):
                    pass

    def _crashed(self, what: str) -> ReplCrashed:
        proc = self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
        self._drain_stderr()
        tail = self.stderr_tail().strip()[-2000:]
        self.kill()
        detail = f"{what}; exit code {code}"
        if code is not None and code < 0:
            detail += f" (signal {-code})"
        if tail:
            detail += f"; stderr: {tail}"
        return ReplCrashed(detail)

    def _drain_stderr(self) -> None:
        """Reads what a dead process left on stderr (its last words often explain the crash)."""
        proc = self._proc
        if proc is None or proc.stderr is None:
            return
        for _ in range(64):
            try:
                data = os.read(proc.stderr.fileno(), 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._stderr_tail += data
        excess = len(self._stderr_tail) - self.config.stderr_tail_bytes
        if excess > 0:
            del self._stderr_tail[:excess]

    def run_command(
        self, cmd: str, env: int | None = None, timeout_s: float | None = None, **options: Any
    ) -> CommandResponse | ErrorResponse:
        resp = self.request(command_request(cmd, env, **options), timeout_s)
        if isinstance(resp, TacticResponse):
            self.kill()
            raise ReplProtocolError("a command was answered with a tactic response (process killed)")
        return resp

    def run_tactic(self, tactic: str, proof_state: int, timeout_s: float | None = None) -> TacticResponse | ErrorResponse:
        t = self.config.tactic_timeout_s if timeout_s is None else timeout_s
        resp = self.request(tactic_request(tactic, proof_state), t)
        if isinstance(resp, CommandResponse):
            self.kill()
            raise ReplProtocolError("a tactic was answered with a command response (process killed)")
        return resp

    # --- header ----------------------------------------------------------------------------

    def header_env(self, body: str = "") -> int | None:
        """The environment id of `imports + body` in the current generation (None: fresh env).

        Starts the process if needed. Raises `HeaderError` if the header does not elaborate.
        """
        self.ensure_started()
        body = body.strip()
        if body in self._header_envs:
            return self._header_envs[body]
        pickle = self._pickle_path(body)
        if pickle is not None and pickle.exists() and not self._imported:
            resp = self.request(unpickle_env_request(str(pickle)), self.config.header_timeout_s)
            if isinstance(resp, CommandResponse) and not resp.errors:
                self._header_envs[body] = resp.env
                return resp.env
            pickle.unlink(missing_ok=True)  # stale or foreign pickle: fall back to elaboration
        base = self._ensure_imports()
        if not body:
            return base
        resp = self.run_command(body, base, self.config.header_timeout_s)
        env = self._header_result(resp, "header body")
        self._header_envs[body] = env
        if pickle is not None:
            self.request(pickle_env_request(str(pickle), env), self.config.header_timeout_s)
        return env

    def _ensure_imports(self) -> int | None:
        if not self._imported:
            if self.imports:
                cmd = "\n".join(f"import {m}" for m in sorted(set(self.imports)))
                resp = self.run_command(cmd, None, self.config.header_timeout_s)
                self._import_env = self._header_result(resp, "imports")
            self._imported = True
        return self._import_env

    @staticmethod
    def _header_result(resp: CommandResponse | ErrorResponse, what: str) -> int:
        if isinstance(resp, ErrorResponse):
            raise HeaderError(f"{what} failed: {resp.message}")
        if resp.errors:
            raise HeaderError(f"{what} failed: " + "; ".join(m.data for m in resp.errors))
        return resp.env

    def _pickle_path(self, body: str) -> Path | None:
        if self.config.pickle_dir is None:
            return None
        key = hashlib.sha256(("\n".join(sorted(set(self.imports))) + "\n--\n" + body).encode()).hexdigest()[:32]
        self.config.pickle_dir.mkdir(parents=True, exist_ok=True)
        return self.config.pickle_dir / f"header-{key}.olean"

    def __del__(self) -> None:  # pragma: no cover - safety net; close()/kill() is the API
        try:
            self.kill()
        except Exception:
            pass
