"""The Lean REPL wire protocol (leanprover-community/repl): framing, requests, typed responses.

Framing. A request is one JSON object followed by a blank line. The REPL reads lines until
a blank one and concatenates them *without* the newlines (each line right-trimmed), so a
request must be written on a single line: `encode_request` guarantees that (JSON escapes
every control character). A response is a (possibly pretty-printed, multi-line) JSON object
followed by a blank line; `ResponseFramer` splits the byte stream at `\\n\\n`.

Responses. A command (`{"cmd"}`, `{"path"}`, `{"unpickleEnvFrom"}`, `{"pickleTo", "env"}`)
answers `CommandResponse` (`env` and optional `messages`, `sorries`, `tactics`, `infotree`);
a tactic (`{"tactic", "proofState"}`, `{"unpickleProofStateFrom"}`, `{"pickleTo",
"proofState"}`) answers `TacticResponse` (`proofState`, `goals`, optional `messages`,
`sorries`, `traces`, and `proofStatus`); a failure answers `ErrorResponse` (`message`).
Anything else - invalid UTF-8, invalid JSON, a non-object, unknown shapes, fields of the
wrong type - raises `ProtocolError`. Unknown *extra* fields are kept (`model_extra`) so a
newer REPL that adds fields still parses.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ProtocolError",
    "Pos",
    "Message",
    "Sorry",
    "TacticInfo",
    "CommandResponse",
    "TacticResponse",
    "ErrorResponse",
    "Response",
    "ResponseFramer",
    "command_request",
    "tactic_request",
    "file_request",
    "pickle_env_request",
    "pickle_proof_state_request",
    "unpickle_env_request",
    "unpickle_proof_state_request",
    "encode_request",
    "parse_response",
    "decode_response",
    "PROOF_COMPLETED",
    "PROOF_OPEN_GOALS",
    "PROOF_CONTAINS_SORRY",
    "PROOF_CONTAINS_MVARS",
]

# `proofStatus` values of REPL v4.24.0 (`REPL.getProofStatus`); other values start with
# "Error: " (kernel/type errors) or "Not verified: " (more than one root goal).
PROOF_COMPLETED = "Completed"
PROOF_OPEN_GOALS = "Incomplete: open goals remain"
PROOF_CONTAINS_SORRY = "Incomplete: contains sorry"
PROOF_CONTAINS_MVARS = "Incomplete: contains metavariable(s)"

FRAME_END = b"\n\n"


class ProtocolError(Exception):
    """The REPL's output is not a valid response (garbage, truncated, wrong shape)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class Pos(_Model):
    """A source position: `line` is 1-based (0 for tactic-mode messages), `column` 0-based."""

    line: int
    column: int


class Message(_Model):
    """A Lean message; `severity` is one of trace/info/warning/error."""

    severity: Literal["trace", "info", "warning", "error"]
    pos: Pos
    end_pos: Pos | None = Field(default=None, alias="endPos")
    data: str


class Sorry(_Model):
    """A `sorry` with its goal; `proof_state` is the id usable in tactic mode."""

    goal: str
    proof_state: int | None = Field(default=None, alias="proofState")
    pos: Pos | None = None
    end_pos: Pos | None = Field(default=None, alias="endPos")


class TacticInfo(_Model):
    """One entry of `allTactics`: the tactic text, the goals before it, its proof state."""

    tactic: str
    goals: str
    proof_state: int | None = Field(default=None, alias="proofState")
    pos: Pos
    end_pos: Pos = Field(alias="endPos")
    used_constants: list[str] = Field(default_factory=list, alias="usedConstants")


class CommandResponse(_Model):
    """Answer to a command: the new environment id and what elaboration reported."""

    env: int
    messages: list[Message] = Field(default_factory=list)
    sorries: list[Sorry] = Field(default_factory=list)
    tactics: list[TacticInfo] = Field(default_factory=list)
    infotree: list[Any] | None = None

    @property
    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.severity == "error"]


class TacticResponse(_Model):
    """Answer to a tactic: the new proof state, its goals and the REPL's proof check."""

    proof_state: int = Field(alias="proofState")
    goals: list[str]
    messages: list[Message] = Field(default_factory=list)
    sorries: list[Sorry] = Field(default_factory=list)
    traces: list[str] = Field(default_factory=list)
    proof_status: str | None = Field(default=None, alias="proofStatus")

    @property
    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.severity == "error"]


class ErrorResponse(_Model):
    """The REPL refused the request (`Unknown environment.`, `Lean error:\\n...`, ...)."""

    message: str


Response = Union[CommandResponse, TacticResponse, ErrorResponse]


# --- requests -------------------------------------------------------------------------------


def command_request(
    cmd: str,
    env: int | None = None,
    *,
    all_tactics: bool = False,
    root_goals: bool = False,
    infotree: str | None = None,
) -> dict[str, Any]:
    """`{"cmd"}`: without `env` the command runs in a fresh environment (may `import`)."""
    req: dict[str, Any] = {"cmd": cmd}
    if env is not None:
        req["env"] = env
    if all_tactics:
        req["allTactics"] = True
    if root_goals:
        req["rootGoals"] = True
    if infotree is not None:
        req["infotree"] = infotree
    return req


def tactic_request(tactic: str, proof_state: int) -> dict[str, Any]:
    return {"tactic": tactic, "proofState": proof_state}


def file_request(path: str, env: int | None = None, *, all_tactics: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {"path": path}
    if env is not None:
        req["env"] = env
    if all_tactics:
        req["allTactics"] = True
    return req


def pickle_env_request(path: str, env: int) -> dict[str, Any]:
    return {"pickleTo": path, "env": env}


def pickle_proof_state_request(path: str, proof_state: int) -> dict[str, Any]:
    return {"pickleTo": path, "proofState": proof_state}


def unpickle_env_request(path: str) -> dict[str, Any]:
    return {"unpickleEnvFrom": path}


def unpickle_proof_state_request(path: str, env: int | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"unpickleProofStateFrom": path}
    if env is not None:
        req["env"] = env
    return req


def encode_request(req: dict[str, Any]) -> bytes:
    """One line of JSON plus the blank line. Non-ASCII stays raw UTF-8 (the REPL's JSON
    parser is given no `\\u` escapes to decode, e.g. surrogate pairs for 𝕜)."""
    line = json.dumps(req, ensure_ascii=False, separators=(", ", ": "))
    if not line.startswith("{"):
        raise ValueError("a REPL request must be a JSON object")
    return line.encode("utf-8") + FRAME_END


# --- responses ------------------------------------------------------------------------------


def parse_response(obj: Any) -> Response:
    """Types a decoded JSON value; raises `ProtocolError` for anything not a known shape."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"response is a JSON {type(obj).__name__}, not an object")
    try:
        if "proofState" in obj and "goals" in obj:
            return TacticResponse.model_validate(obj)
        if "env" in obj:
            return CommandResponse.model_validate(obj)
        if set(obj) == {"message"}:
            return ErrorResponse.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError(f"malformed response: {e.errors(include_url=False)[:3]}") from e
    raise ProtocolError(f"unrecognised response with keys {sorted(obj)[:10]}")


def decode_response(frame: bytes | str) -> Response:
    """Parses one frame (the bytes before a blank line)."""
    if isinstance(frame, bytes):
        try:
            text = frame.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"response is not UTF-8: {e}") from e
    else:
        text = frame
    if not text.strip():
        raise ProtocolError("empty response")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        snippet = text[:200].replace("\n", "\\n")
        raise ProtocolError(f"response is not valid JSON ({e.msg} at char {e.pos}): {snippet!r}") from e
    return parse_response(obj)


class ResponseFramer:
    """Splits the REPL's stdout byte stream into frames at blank lines.

    `feed` returns the completed frames (without the separator, leading blank lines
    dropped); `pending` is the size in bytes of the incomplete tail.
    """

    __slots__ = ("_buf", "_scan_from")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan_from = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    def clear(self) -> None:
        self._buf.clear()
        self._scan_from = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while True:
            # Leading newlines are the tail of the previous separator, not content.
            strip = 0
            while strip < len(self._buf) and self._buf[strip] in (10, 13):
                strip += 1
            if strip:
                del self._buf[:strip]
                self._scan_from = 0
            idx = self._buf.find(FRAME_END, max(0, self._scan_from - 1))
            if idx < 0:
                self._scan_from = len(self._buf)
                return frames
            frames.append(bytes(self._buf[:idx]))
            del self._buf[: idx + len(FRAME_END)]
            self._scan_from = 0
