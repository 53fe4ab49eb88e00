"""The durable job store: SQLite in WAL mode, a bounded set of connections.

Connections: one writer connection behind a lock (SQLite serialises writers anyway, so
writers wait on the lock without holding anything else) and a bounded pool of reader
connections (WAL readers never wait for the writer). The number of connections, and so of
open file descriptors, is fixed however many threads call the store; `close()` closes
them all. The database and its WAL/SHM files are created readable by their owner only.

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
import os
import queue
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
CREATE INDEX IF NOT EXISTS jobs_by_key_seq ON jobs (key_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finished ON jobs (finished_at);
"""

READ_POOL_SIZE = 4  # reader connections (each holds ~3 file descriptors: db, -wal, -shm)
POOL_WAIT_S = 30.0  # seconds a caller waits for a free reader connection before StoreUnavailable


class StoreUnavailable(RuntimeError):
    """The job store cannot be used (no connection, database missing or unreadable)."""



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
    """Thread-safe access to the job table through a fixed set of connections."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL", read_pool_size: int = READ_POOL_SIZE) -> None:
        if synchronous not in {"FULL", "NORMAL"}:
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        if read_pool_size < 1:
            raise ValueError(f"read_pool_size must be >= 1, got {read_pool_size}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self._closed = False
        self._write_lock = threading.Lock()
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._reader_slots = threading.BoundedSemaphore(read_pool_size)
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # owner-only from the first byte
        os.close(fd)
        self._writer = self._connect()
        conn = self._writer
        fresh = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if fresh:  # retention frees pages without a full VACUUM (must precede the first table)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite at {self.path} refused WAL mode (got {mode!r})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"job store {self.path} has schema version {version}; this server reads {SCHEMA_VERSION}")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._inode = os.stat(self.path).st_ino
        for _ in range(read_pool_size):  # opened now: the store's file descriptors are fixed from the start
            self._readers.put(self._connect())
        self.restrict_permissions()

    # ----------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._all_lock:
            self._all.append(conn)
        return conn

    def restrict_permissions(self) -> None:
        """Make the database and its WAL/SHM files readable by their owner only (0600)."""
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(f"{self.path}{suffix}", 0o600)
            except FileNotFoundError:
                pass

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A reader connection from the pool (`read_pool_size` of them, opened with the store)."""
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        if not self._reader_slots.acquire(timeout=POOL_WAIT_S):
            raise StoreUnavailable(f"no job store connection became free within {POOL_WAIT_S:g} s")
        conn = None
        try:
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                conn = self._connect()
            yield conn
        finally:
            if conn is not None:
                if self._closed:
                    conn.close()
                else:
                    self._readers.put(conn)
            self._reader_slots.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A `BEGIN IMMEDIATE` transaction on the writer connection (writers serialise on its lock)."""
        with self._write_lock:
            if self._closed:
                raise StoreUnavailable("the job store is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def connection_count(self) -> int:
        """Open connections (bounded by 1 + read_pool_size)."""
        with self._all_lock:
            return len(self._all)

    def _require_same_file(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except OSError as err:
            raise StoreUnavailable(f"the database file {self.path.name} is gone ({err.strerror}); restart the server") from err
        if inode != self._inode:
            raise StoreUnavailable(f"the database file {self.path.name} was replaced under the server; restart it")

    def probe(self) -> None:
        """Raise `StoreUnavailable` unless the store works now: the database file is the one
        this server opened, a new connection can open it (file descriptors, permissions) and
        read the jobs table, and the write lock can be taken."""
        self._require_same_file()
        try:
            fresh = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=5.0)
            try:
                fresh.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            finally:
                fresh.close()
            with self._write():
                pass
        except sqlite3.Error as err:
            raise StoreUnavailable(f"the job store cannot be used: {err}") from err

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
        with self._all_lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass
            self._all.clear()

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
        return self.submit_many(
            key_id, [(request, idempotency_key)], max_queue=max_queue, max_active_for_key=max_active_for_key
        )[0]

    def submit_many(
        self,
        key_id: str,
        items: list[tuple[dict[str, Any], str | None]],
        *,
        max_queue: int,
        max_active_for_key: int,
    ) -> list[Submission]:
        """`submit` for each `(request, idempotency_key)` in order, in one transaction (one fsync)."""
        out: list[Submission] = []
        self._require_same_file()  # an accepted job must be in the file a restart reads
        with self._write() as conn:
            depth = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            active = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)", (key_id, *ACTIVE)
            ).fetchone()[0]
            for request, idempotency_key in items:
                fingerprint = request_fingerprint(request)
                if idempotency_key is not None:
                    row = conn.execute(
                        "SELECT * FROM jobs WHERE key_id = ? AND idempotency_key = ?", (key_id, idempotency_key)
                    ).fetchone()
                    if row is not None:
                        outcome = SubmitOutcome.REPLAYED if row["request_hash"] == fingerprint else SubmitOutcome.CONFLICT
                        out.append(Submission(outcome, JobRecord.from_row(row)))
                        continue
                if depth >= max_queue:
                    out.append(Submission(SubmitOutcome.QUEUE_FULL, active=depth))
                    continue
                if active >= max_active_for_key:
                    out.append(Submission(SubmitOutcome.QUOTA, active=active))
                    continue
                job_id = uuid.uuid4().hex
                row = conn.execute(
                    "INSERT INTO jobs (id, key_id, idempotency_key, request_hash, request_json, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING *",
                    (job_id, key_id, idempotency_key, fingerprint, json.dumps(request, sort_keys=True), time.time()),
                ).fetchall()[0]
                depth += 1
                active += 1
                out.append(Submission(SubmitOutcome.CREATED, JobRecord.from_row(row)))
        return out

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
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row is not None else None

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def counts_by_status(self) -> dict[str, int]:
        """Jobs per status; every status is present (0 when none)."""
        counts = {status.value: 0 for status in JobStatus}
        with self._read() as conn:
            for status, n in conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall():
                counts[status] = n
        return counts

    def queue_depth(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def active_for_key(self, key_id: str) -> int:
        with self._read() as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)", (key_id, *ACTIVE)
            ).fetchone()[0]

    def queue_position(self, job: JobRecord) -> int | None:
        """1 for the next job a worker claims; None unless `job` is queued (claims take the oldest first)."""
        if job.status is not JobStatus.QUEUED:
            return None
        with self._read() as conn:
            ahead = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?", (job.seq,)).fetchone()[0]
        return ahead + 1

    def list_for_key(
        self, key_id: str, *, status: str | None = None, limit: int = 50, before_seq: int | None = None
    ) -> tuple[list[JobRecord], int | None]:
        """A key's jobs, newest first: up to `limit` with `seq < before_seq`, and the cursor
        (`seq` of the last one) when more may follow, else None."""
        sql = "SELECT * FROM jobs WHERE key_id = ?"
        args: list[Any] = [key_id]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        jobs = [JobRecord.from_row(r) for r in rows[:limit]]
        return jobs, (jobs[-1].seq if len(rows) > limit else None)

    def purge_finished(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete finished jobs whose `finished_at` is more than `older_than_s` seconds ago,
        then give the freed pages back to the file system. Returns the number deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        terminal = tuple(s.value for s in JobStatus if s.terminal)
        marks = ",".join("?" * len(terminal))
        with self._write() as conn:
            deleted = conn.execute(
                f"DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? AND status IN ({marks})",
                (cutoff, *terminal),
            ).rowcount
        if deleted:
            self.compact()
        return deleted

    def compact(self) -> None:
        """Free unused pages (incremental vacuum; a full VACUUM once for a database made
        before auto_vacuum was set) and truncate the WAL."""
        with self._write_lock:
            if self._closed:
                raise StoreUnavailable("the job store is closed")
            conn = self._writer
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("VACUUM")
            else:
                conn.executescript("PRAGMA incremental_vacuum;")  # stepped to the end: the whole freelist
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.restrict_permissions()
