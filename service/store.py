"""The durable job store: SQLite in WAL mode, one connection per thread.

A job row is written (and, with `synchronous=FULL`, fsynced) before the API answers 202,
so an accepted job is never lost. Status moves only forward:

    queued -> running -> proved | failed | cancelled | error
    queued -> cancelled
    running -> queued          (server restart or worker death; counted in `attempts`)

Invariants: a job is `running` in at most one worker (claims are `BEGIN IMMEDIATE`
transactions); a terminal row is never changed again (`finish` only moves `running`
rows), so a re-run after a crash cannot answer a job twice.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    request_json TEXT NOT NULL,
    status TEXT NOT NULL,
    result_json TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (key_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_key_status ON jobs (key_id, status);
"""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PROVED = "proved"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class JobRecord:
    """One row of `jobs`. Times are Unix seconds; `request`/`result` are parsed JSON."""

    seq: int
    id: str
    key_id: str
    idempotency_key: str | None
    request: dict[str, Any]
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        return cls(
            seq=row["seq"],
            id=row["id"],
            key_id=row["key_id"],
            idempotency_key=row["idempotency_key"],
            request=json.loads(row["request_json"]),
            status=JobStatus(row["status"]),
            result=json.loads(row["result_json"]) if row["result_json"] is not None else None,
            error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            attempts=row["attempts"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )


class SubmitOutcome(str, enum.Enum):
    CREATED = "created"
    REPLAYED = "replayed"  # same key + idempotency key + request: the existing job
    CONFLICT = "conflict"  # same key + idempotency key, different request
    QUEUE_FULL = "queue_full"
    QUOTA = "quota"  # the key already has its maximum of queued + running jobs


@dataclass(frozen=True)
class Submission:
    outcome: SubmitOutcome
    job: JobRecord | None = None
    active: int = 0  # the key's queued + running jobs (QUOTA) or the queue depth (QUEUE_FULL)


class CancelOutcome(str, enum.Enum):
    CANCELLED = "cancelled"  # was queued: cancelled now
    REQUESTED = "requested"  # is running: its worker is told to stop
    ALREADY = "already"  # cancel was already requested or done
    FINISHED = "finished"  # terminal in another status: nothing to cancel
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class RecoveryReport:
    """What `recover` did with the jobs a dead server left `running`."""

    requeued: list[str]
    cancelled: list[str]
    errored: list[str]


def request_fingerprint(request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a normalised request (idempotency comparisons)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobStore:
    """Thread-safe access to the job table; each thread gets its own connection."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in {"FULL", "NORMAL"}:
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite at {self.path} refused WAL mode (got {mode!r})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"job store {self.path} has schema version {version}; this server reads {SCHEMA_VERSION}")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ----------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A `BEGIN IMMEDIATE` transaction: writers serialise here, readers (WAL) do not wait."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from its own thread already
                    pass
            self._connections.clear()
        self._local = threading.local()

    # ---------------------------------------------------------------- writes

    def submit(
        self,
        key_id: str,
        request: dict[str, Any],
        *,
        idempotency_key: str | None,
        max_queue: int,
        max_active_for_key: int,
    ) -> Submission:
        """Insert a queued job unless the idempotency key, the queue or the key's quota says otherwise.

        The checks and the insert are one transaction, so concurrent submissions cannot
        overshoot `max_queue` or `max_active_for_key`.
        """
        fingerprint = request_fingerprint(request)
        with self._write() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE key_id = ? AND idempotency_key = ?", (key_id, idempotency_key)
                ).fetchone()
                if row is not None:
                    outcome = SubmitOutcome.REPLAYED if row["request_hash"] == fingerprint else SubmitOutcome.CONFLICT
                    return Submission(outcome, JobRecord.from_row(row))
            depth = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if depth >= max_queue:
                return Submission(SubmitOutcome.QUEUE_FULL, active=depth)
            active = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)", (key_id, *ACTIVE)
            ).fetchone()[0]
            if active >= max_active_for_key:
                return Submission(SubmitOutcome.QUOTA, active=active)
            job_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO jobs (id, key_id, idempotency_key, request_hash, request_json, status, created_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, key_id, idempotency_key, fingerprint, json.dumps(request, sort_keys=True), time.time()),
            )
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Submission(SubmitOutcome.CREATED, JobRecord.from_row(row))

    def claim(self) -> JobRecord | None:
        """The oldest queued job, now `running` with `attempts + 1`; None when the queue is empty."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?"
                " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)"
                " RETURNING *",
                (time.time(),),
            ).fetchall()  # fetch every row: a statement still stepping would block COMMIT
        return JobRecord.from_row(row[0]) if row else None

    def finish(self, job_id: str, status: JobStatus, *, result: dict[str, Any] | None, error: str | None = None) -> bool:
        """Record the answer of a running job; False (and no change) unless it was `running`."""
        if not status.terminal:
            raise ValueError(f"finish needs a terminal status, got {status.value}")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, result_json = ?, error = ?, finished_at = ? WHERE id = ? AND status = 'running'",
                (status.value, json.dumps(result) if result is not None else None, error, time.time(), job_id),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str, *, refund_attempt: bool = False) -> bool:
        """Put a running job back in the queue; False unless it was running.

        `refund_attempt`: the run was interrupted by an orderly shutdown, not by a failure,
        so it does not count towards `max_attempts`.
        """
        refund = 1 if refund_attempt else 0
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - ? WHERE id = ? AND status = 'running'",
                (refund, job_id),
            )
        return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> tuple[CancelOutcome, JobRecord | None]:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND, None
            status = JobStatus(row["status"])
            if status is JobStatus.QUEUED:
                conn.execute(
                    "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ?,"
                    " error = 'cancelled before it started' WHERE id = ?",
                    (time.time(), job_id),
                )
                outcome = CancelOutcome.CANCELLED
            elif status is JobStatus.RUNNING:
                outcome = CancelOutcome.ALREADY if row["cancel_requested"] else CancelOutcome.REQUESTED
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            elif status is JobStatus.CANCELLED:
                outcome = CancelOutcome.ALREADY
            else:
                outcome = CancelOutcome.FINISHED
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return outcome, JobRecord.from_row(row)

    def recover(self, max_attempts: int) -> RecoveryReport:
        """At startup: answer or re-queue every job a previous server left `running`.

        Cancel requested ⇒ cancelled; `attempts >= max_attempts` ⇒ error (a job that keeps
        killing its server must not loop forever); otherwise ⇒ queued again.
        """
        now = time.time()
        with self._write() as conn:
            rows = conn.execute("SELECT id, cancel_requested, attempts FROM jobs WHERE status = 'running'").fetchall()
            report = RecoveryReport([], [], [])
            for row in rows:
                if row["cancel_requested"]:
                    conn.execute(
                        "UPDATE jobs SET status = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                        (now, "cancelled; the server stopped while the job was running", row["id"]),
                    )
                    report.cancelled.append(row["id"])
                elif row["attempts"] >= max_attempts:
                    conn.execute(
                        "UPDATE jobs SET status = 'error', finished_at = ?, error = ? WHERE id = ?",
                        (now, f"the server stopped during each of this job's {row['attempts']} runs; not retried", row["id"]),
                    )
                    report.errored.append(row["id"])
                else:
                    conn.execute("UPDATE jobs SET status = 'queued' WHERE id = ?", (row["id"],))
                    report.requeued.append(row["id"])
        return report

    # ----------------------------------------------------------------- reads

    def get(self, job_id: str) -> JobRecord | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row is not None else None

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def counts_by_status(self) -> dict[str, int]:
        """Jobs per status; every status is present (0 when none)."""
        counts = {status.value: 0 for status in JobStatus}
        for status, n in self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = n
        return counts

    def queue_depth(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def active_for_key(self, key_id: str) -> int:
        return self._conn().execute(
            "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)", (key_id, *ACTIVE)
        ).fetchone()[0]
