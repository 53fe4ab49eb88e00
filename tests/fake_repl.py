#!/usr/bin/env python3
"""A stand-in for the Lean REPL that answers with Lean's REAL recorded responses.

Reads requests exactly as the REPL v4.24.0 does (`getLines`: lines are right-trimmed and
concatenated until a blank line; EOF or an empty query ends the process; queries starting
with `#` or `--` are skipped without an answer) and writes each response followed by a blank
line.

Modes:
- replay (default): the recorded sessions `tests/data/lean_repl_transcripts/{core,mathlib}/
  NAME.in` / `NAME.expected.out`. The fake keeps every session whose recorded requests
  start with the requests received so far (compared as JSON values) and answers the next
  request with that session's recorded response, byte for byte. `--session core/NAME`
  (repeatable) restricts the candidates; `--sequential` replays the given (or all) sessions
  one after the other as one stream, as if the REPL restarted between them.
  A request no recorded session explains is answered `{"message": "fake_repl: ..."}`.
- scripted (`--script FILE`): a small simulation of the REPL's bookkeeping for flows the
  recordings do not contain. Environment and proof-state ids are allocated like the REPL
  (indices into ever-growing arrays); unknown ids give the REPL's own error messages;
  commands that only `import`/`open`/`set_option` succeed; other commands and tactics are
  answered from the script: `{"commands": [{"cmd": TEXT, "response": {messages?, sorries?}}],
  "tactics": [{"goals": [..], "tactic": TEXT, "response": {goals, proofStatus, ...}}]}`
  where each `sorries` entry receives a fresh proof state holding its `goal`; `#print axioms`
  is answered as Lean does over the constants the scripted commands declared (see `Scripted`).

Misbehaviour (K counts requests answered by this process, from 1):
`--slow S [--slow-on K...] [--slow-once-marker F]` (only the first process that finds no F
sleeps; it creates F), `--hang-on K`, `--crash-after K` (exit 1 on request K+1 without
answering), `--garbage-on K`, `--truncate-on K` (half a response, then the separator),
`--truncate-exit-on K` (half a response, then exit), `--double-on K` (the answer twice), `--huge-on K [--huge-bytes N]`,
`--stderr-bytes N` (noise on stderr before every answer), `--startup-s S`,
`--child-pid-file F` (start a sleeping child in our process group and write its pid),
`--pid-log F` (append our pid), `--request-log F` (append each request as a JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_TRANSCRIPTS = Path(__file__).resolve().parent / "data" / "lean_repl_transcripts"


def split_requests(text: str) -> list[str]:
    """The queries the REPL's `getLines` would read from `text`, in order."""
    queries: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip() == "":
            if current:
                queries.append("".join(current))
                current = []
            continue
        current.append(line.rstrip())
    if current:
        queries.append("".join(current))
    return [q for q in queries if not (q.startswith("#") or q.startswith("--"))]


def split_responses(text: str) -> list[str]:
    """The recorded responses of an `.expected.out` file (text between blank lines)."""
    return [chunk.strip("\n") for chunk in text.split("\n\n") if chunk.strip()]


def load_sessions(root: Path = DEFAULT_TRANSCRIPTS) -> dict[str, tuple[list[Any], list[str]]]:
    """`{"core/NAME": ([request JSON values], [response texts])}` for sessions with outputs."""
    sessions: dict[str, tuple[list[Any], list[str]]] = {}
    for group in ("core", "mathlib"):
        for path in sorted((root / group).glob("*.in")):
            out = path.with_name(path.name[: -len(".in")] + ".expected.out")
            if not out.exists():
                continue
            requests = [json.loads(q) for q in split_requests(path.read_text(encoding="utf-8"))]
            responses = split_responses(out.read_text(encoding="utf-8"))
            sessions[f"{group}/{path.name[:-3]}"] = (requests, responses)
    return sessions


class Replay:
    def __init__(self, sessions: dict[str, tuple[list[Any], list[str]]], sequential: bool) -> None:
        if sequential:
            reqs: list[Any] = []
            outs: list[str] = []
            for r, o in sessions.values():
                reqs += r
                outs += o
            sessions = {"<sequential>": (reqs, outs)}
        self.sessions = sessions
        self.candidates = list(sessions)
        self.step = 0

    def answer(self, request: Any) -> str:
        alive = [
            name
            for name in self.candidates
            if self.step < len(self.sessions[name][0]) and self.sessions[name][0][self.step] == request
        ]
        if not alive:
            self.candidates = []
            return json.dumps({"message": f"fake_repl: no recorded session explains request {self.step + 1}: {json.dumps(request, ensure_ascii=False)[:300]}"})
        answers = {self.sessions[name][1][self.step] for name in alive if self.step < len(self.sessions[name][1])}
        if len(answers) != 1:
            self.candidates = []
            return json.dumps({"message": f"fake_repl: recorded sessions {alive[:4]} disagree or lack a response at step {self.step + 1}"})
        self.candidates = alive
        self.step += 1
        return answers.pop()


class Scripted:
    """Id bookkeeping of the REPL (`cmdStates`/`proofStates` arrays) with scripted outcomes,
    and Lean's own answer to `#print axioms` over the constants each environment holds.

    Constants: `script["constants"]` (`{"name", "axioms", "protected"?}`: what the imports
    hold, e.g. Mathlib's root lemmas) plus every `theorem`/`lemma` a scripted command
    declares without an error message; its axioms are the entry's `"axioms"` (default
    none). The full name follows Lean: `_root_.x` is `x`, otherwise the open `namespace`s
    prefix the declared name. `#print axioms N` resolves N as Lean does - `ns.N` for the
    current namespace and each enclosing one (innermost first; a `protected` constant is
    not reachable by its last component alone), then the root `N` - and answers Lean's
    message: `'FULL' depends on axioms: [a, b]` / `'FULL' does not depend on any axioms`
    (info, like the REPL) or `unknown constant 'N'` (error). Commands may be matched by
    `"cmd"` (exact) or `"cmd_regex"` (full match; for texts holding a verifier's fresh name).
    """

    PREAMBLE = ("import ", "open ", "set_option ", "namespace ", "section", "end", "universe ", "variable ")
    _DECL = re.compile(r"^(?P<mods>(?:@\[[^\]]*\]\s*)?(?:(?:private|protected|noncomputable|nonrec)\s+)*)(?:theorem|lemma)\s+(?P<name>[^\s(:{\[]+)")

    def __init__(self, script: dict[str, Any]) -> None:
        self.commands = {c["cmd"]: c for c in script.get("commands", []) if "cmd" in c}
        self.patterns = [(re.compile(c["cmd_regex"], re.DOTALL), c) for c in script.get("commands", []) if "cmd_regex" in c]
        self.tactics = {(tuple(t["goals"]), t["tactic"]): t["response"] for t in script.get("tactics", [])}
        self.base_constants = {c["name"]: (tuple(c.get("axioms", [])), bool(c.get("protected"))) for c in script.get("constants", [])}
        self.envs: list[str] = []
        self.env_namespaces: list[tuple[str, ...]] = []
        self.env_constants: list[dict[str, tuple[tuple[str, ...], bool]]] = []
        self.proof_states: list[list[str]] = []

    def _new_state(self, goals: list[str]) -> int:
        self.proof_states.append(goals)
        return len(self.proof_states) - 1

    def _with_sorries(self, resp: dict[str, Any]) -> dict[str, Any]:
        out = dict(resp)
        if "sorries" in resp:
            out["sorries"] = [dict(s, proofState=self._new_state([s["goal"]])) for s in resp["sorries"]]
        return out

    def _scope(self, env: int | None) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, ...], bool]]]:
        if env is None:
            return (), dict(self.base_constants)
        return self.env_namespaces[env], dict(self.env_constants[env])

    def _elaborate(self, cmd: str, env: int | None, axioms: tuple[str, ...], ok: bool) -> tuple[tuple[str, ...], dict]:
        """The namespace stack and constants after `cmd` (line-based, like our commands)."""
        ns, consts = self._scope(env)
        ns = list(ns)
        for line in cmd.splitlines():
            words = line.split()
            if words[:1] == ["namespace"] and len(words) > 1:
                ns.extend(words[1].split("."))
            elif words[:1] == ["end"] and len(words) > 1:
                del ns[len(ns) - len(words[1].split(".")):]
            m = self._DECL.match(line.strip())
            if m and ok:
                name = m.group("name")
                full = name[len("_root_."):] if name.startswith("_root_.") else ".".join([*ns, name])
                consts[full] = (axioms, "protected" in m.group("mods"))
        return tuple(ns), consts

    def _print_axioms(self, query: str, env: int | None) -> dict[str, Any]:
        ns, consts = self._scope(env)
        pos, end = {"line": 1, "column": 0}, {"line": 1, "column": 13}
        candidates = [".".join([*ns[:k], query]) for k in range(len(ns), 0, -1)]
        found = None
        for c in candidates:
            if c in consts and not (consts[c][1] and "." not in query):
                found = c
                break
        if found is None and query.removeprefix("_root_.") in consts:
            found = query.removeprefix("_root_.")
        if found is None:
            return {"messages": [{"severity": "error", "pos": pos, "endPos": end, "data": f"unknown constant '{query}'"}]}
        axioms = sorted(set(consts[found][0]))
        data = f"'{found}' depends on axioms: [{', '.join(axioms)}]" if axioms else f"'{found}' does not depend on any axioms"
        return {"messages": [{"severity": "info", "pos": pos, "endPos": end, "data": data}]}

    def answer(self, req: Any) -> str:
        if not isinstance(req, dict):
            return json.dumps({"message": "Could not parse as a valid JSON command"})
        if "tactic" in req and "proofState" in req:
            ps = req["proofState"]
            if not (isinstance(ps, int) and 0 <= ps < len(self.proof_states)):
                return json.dumps({"message": "Unknown proof state."})
            rule = self.tactics.get((tuple(self.proof_states[ps]), req["tactic"]))
            if rule is None:
                return json.dumps({"message": f"fake_repl: no scripted answer for tactic {req['tactic']!r}"})
            out = self._with_sorries(rule)
            out["proofState"] = self._new_state(list(rule["goals"]))
            return json.dumps(out, ensure_ascii=False, indent=1)
        if "pickleTo" in req and "env" in req:
            if not (0 <= req["env"] < len(self.envs)):
                return json.dumps({"message": "Unknown environment."})
            Path(req["pickleTo"]).write_text(json.dumps({"cmd": self.envs[req["env"]]}), encoding="utf-8")
            return json.dumps({"env": req["env"]})
        if "unpickleEnvFrom" in req:
            saved = json.loads(Path(req["unpickleEnvFrom"]).read_text(encoding="utf-8"))
            self.envs.append(saved["cmd"])
            self.env_namespaces.append(())
            self.env_constants.append(dict(self.base_constants))
            return json.dumps({"env": len(self.envs) - 1})
        if "cmd" in req:
            env = req.get("env")
            if env is not None and not (isinstance(env, int) and 0 <= env < len(self.envs)):
                return json.dumps({"message": "Unknown environment."})
            cmd = req["cmd"]
            entry = self.commands.get(cmd) or next((c for rx, c in self.patterns if rx.fullmatch(cmd)), None)
            axioms: tuple[str, ...] = ()
            if cmd.startswith("#print axioms ") and entry is None:
                out = self._print_axioms(cmd[len("#print axioms "):].strip(), env)
            elif entry is not None:
                out = self._with_sorries(entry["response"])
                axioms = tuple(entry.get("axioms", ()))
            elif all(not line.strip() or line.strip().startswith(self.PREAMBLE) for line in cmd.splitlines()):
                out = {}
            else:
                return json.dumps({"message": f"fake_repl: no scripted answer for command {cmd[:200]!r}"})
            ok = not any(m.get("severity") == "error" for m in out.get("messages", []))
            ns, consts = self._elaborate(cmd, env, axioms, ok)
            self.envs.append(cmd)
            self.env_namespaces.append(ns)
            self.env_constants.append(consts)
            out["env"] = len(self.envs) - 1
            return json.dumps(out, ensure_ascii=False, indent=1)
        return json.dumps({"message": "fake_repl: unsupported request"})


def fake_command(*flags: object) -> tuple[str, ...]:
    """The argv that runs this fake with `flags` (for `ReplConfig.command`)."""
    return (sys.executable, str(Path(__file__).resolve()), *map(str, flags))


def read_query(stdin: Any) -> str | None:
    """One query per the REPL's `getLines`; None at EOF."""
    parts: list[str] = []
    while True:
        raw = stdin.readline()
        if not raw:
            return "".join(parts) if parts else None
        line = raw.decode("utf-8")
        if line.strip() == "":
            if parts:
                return "".join(parts)
            # The REPL would try to parse the blank query and die; so do we.
            sys.stderr.write("fake_repl: uncaught exception: Could not parse JSON: empty query\n")
            sys.exit(1)
        parts.append(line.rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transcripts", type=Path, default=DEFAULT_TRANSCRIPTS)
    p.add_argument("--session", action="append", default=[])
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--script", type=Path)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--slow-on", type=int, action="append", default=[])
    p.add_argument("--slow-once-marker", type=Path)
    p.add_argument("--hang-on", type=int, action="append", default=[])
    p.add_argument("--crash-after", type=int)
    p.add_argument("--garbage-on", type=int, action="append", default=[])
    p.add_argument("--truncate-on", type=int, action="append", default=[])
    p.add_argument("--truncate-exit-on", type=int, action="append", default=[])
    p.add_argument("--double-on", type=int, action="append", default=[])
    p.add_argument("--huge-on", type=int, action="append", default=[])
    p.add_argument("--huge-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--stderr-bytes", type=int, default=0)
    p.add_argument("--startup-s", type=float, default=0.0)
    p.add_argument("--child-pid-file", type=Path)
    p.add_argument("--pid-log", type=Path)
    p.add_argument("--request-log", type=Path)
    args = p.parse_args(argv)

    if args.pid_log:
        with args.pid_log.open("a") as f:
            f.write(f"{os.getpid()}\n")
    if args.child_pid_file:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        args.child_pid_file.write_text(str(child.pid))
    if args.startup_s:
        time.sleep(args.startup_s)

    if args.script:
        engine: Replay | Scripted = Scripted(json.loads(args.script.read_text(encoding="utf-8")))
    else:
        sessions = load_sessions(args.transcripts)
        if args.session:
            missing = [s for s in args.session if s not in sessions]
            if missing:
                sys.stderr.write(f"fake_repl: unknown sessions {missing}\n")
                return 2
            sessions = {s: sessions[s] for s in args.session}
        engine = Replay(sessions, args.sequential)

    stdin = sys.stdin.buffer
    out = sys.stdout.buffer
    k = 0
    while True:
        query = read_query(stdin)
        if query is None or query == "":
            return 0
        if query.startswith("#") or query.startswith("--"):
            continue
        k += 1
        if args.request_log:
            with args.request_log.open("a", encoding="utf-8") as f:
                f.write(query + "\n")
        if args.crash_after is not None and k > args.crash_after:
            sys.stderr.write("fake_repl: simulated crash (INTERNAL PANIC)\n")
            sys.stderr.flush()
            os._exit(1)
        try:
            request = json.loads(query)
        except json.JSONDecodeError as e:
            sys.stderr.write(f'uncaught exception: {{"message": "Could not parse JSON:\\n{e}"}}\n')
            return 1
        answer = engine.answer(request)
        if args.stderr_bytes:
            sys.stderr.write("w" * args.stderr_bytes + "\n")
            sys.stderr.flush()
        if k in args.hang_on:
            time.sleep(3600)
        if args.slow and (not args.slow_on or k in args.slow_on):
            marker = args.slow_once_marker
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.write_text(str(os.getpid()))
                time.sleep(args.slow)
        if k in args.garbage_on:
            out.write(b"PANIC at Lean.Elab.Command 0xdeadbeef not json\n\n")
        elif k in args.truncate_on or k in args.truncate_exit_on:
            data = answer.encode("utf-8")
            out.write(data[: max(1, len(data) // 2)])
            if k in args.truncate_exit_on:
                out.flush()
                os._exit(1)
            out.write(b"\n\n")
        elif k in args.double_on:
            out.write(answer.encode("utf-8") + b"\n\n" + answer.encode("utf-8") + b"\n\n")
        elif k in args.huge_on:
            out.write(b'{"message": "' + b"x" * args.huge_bytes + b'"}\n\n')
        else:
            out.write(answer.encode("utf-8") + b"\n\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
