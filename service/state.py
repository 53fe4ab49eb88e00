"""Everything one running server holds, opened and closed by the app's lifespan."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from service.auth import ConcurrencyLimiter, KeyRing, RateLimiter
from service.backend import BackendPlan, TheoremCatalog, plan_backend
from service.config import ServiceConfig
from service.events import EventHub
from service.metrics import ServiceMetrics
from service.store import JobStore
from service.workers import WorkerPool

log = logging.getLogger("service")


class DataDirInUse(RuntimeError):
    """Another live server holds this data directory (jobs would be run twice)."""


@dataclass
class ServiceState:
    config: ServiceConfig
    store: JobStore
    hub: EventHub
    metrics: ServiceMetrics
    keys: KeyRing
    limiter: RateLimiter
    plan: BackendPlan
    catalog: TheoremCatalog | None
    catalog_error: str | None
    pool: WorkerPool | None
    started_at: float
    _lock_file: IO[str]
    streams: ConcurrencyLimiter = field(default_factory=ConcurrencyLimiter)  # open event streams per key
    checks: ConcurrencyLimiter = field(default_factory=ConcurrencyLimiter)  # /v1/check in flight per key
    _pool_ref: list = field(default_factory=list)  # the metrics' view of the pool
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock)
    _last_refresh: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _retention: threading.Thread | None = None
    last_purge: str = "not run yet"

    BACKEND_RECHECK_S = 2.0  # seconds between re-checks for a backend installed after startup

    @classmethod
    def open(cls, config: ServiceConfig) -> "ServiceState":
        """Take the data directory, recover the previous server's running jobs, start the workers."""
        config.data_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(config.data_dir / "server.lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock_file.close()
            raise DataDirInUse(f"another server is using data directory {config.data_dir}") from err
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()

        store = JobStore(config.db_path, synchronous=config.sqlite_synchronous)
        report = store.recover(config.workers.max_attempts)
        if report.requeued or report.cancelled or report.errored:
            log.warning(
                "recovered jobs left running by the previous server: %d re-queued, %d cancelled, %d errored",
                len(report.requeued), len(report.cancelled), len(report.errored),
            )
        plan = plan_backend(config)
        keys = KeyRing(config.keys_path, config.auth)  # a bad key file: every key refused, readyz says why
        hub = EventHub()
        pool_ref: list[WorkerPool] = []
        metrics = ServiceMetrics(store.counts_by_status, lambda: pool_ref[0].ready_count if pool_ref else 0)
        pool = None
        if plan.kind is not None:
            # Workers load the backend while this process loads the catalog below.
            pool = WorkerPool(config, plan.kind, store, hub, metrics)
            pool_ref.append(pool)
            pool.start()
        else:
            log.error("no backend can run: %s", plan.reason)
        catalog, catalog_error = None, None
        try:
            catalog = TheoremCatalog.build(plan.kind, plan.theorem_source, config)
        except Exception as err:  # a theorem source that cannot load disables theorem_id, not the server
            catalog_error = f"{type(err).__name__}: {err}"
            log.error("theorem source %s could not load: %s", plan.theorem_source, catalog_error)
        state = cls(
            config=config,
            store=store,
            hub=hub,
            metrics=metrics,
            keys=keys,
            limiter=RateLimiter(),
            plan=plan,
            catalog=catalog,
            catalog_error=catalog_error,
            pool=pool,
            started_at=time.time(),
            _lock_file=lock_file,
            _pool_ref=pool_ref,
        )
        state._last_refresh = time.monotonic()
        if config.retention.max_age_days is not None:
            state._retention = threading.Thread(target=state._retention_loop, name="retention", daemon=True)
            state._retention.start()
        return state

    # ------------------------------------------------------------ backend

    def refresh_backend(self) -> None:
        """Without a backend: re-check (at most every `BACKEND_RECHECK_S`) whether one can run
        now, e.g. after `dco-prover setup-lean`, and start the workers when it can."""
        if self.pool is not None or self._stop.is_set():
            return
        if not self._refresh_lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now - self._last_refresh < self.BACKEND_RECHECK_S:
                return
            self._last_refresh = now
            plan = plan_backend(self.config)
            self.plan = plan
            if plan.kind is None:
                return
            log.info("a %s backend can run now; starting the workers", plan.kind)
            pool = WorkerPool(self.config, plan.kind, self.store, self.hub, self.metrics)
            self._pool_ref.append(pool)
            pool.start()
            self.pool = pool
        finally:
            self._refresh_lock.release()

    # ---------------------------------------------------------- retention

    def _retention_loop(self) -> None:
        retention = self.config.retention
        assert retention.max_age_days is not None
        while not self._stop.is_set():
            try:
                deleted = self.store.purge_finished(retention.max_age_days * 86400.0)
                self.last_purge = f"{deleted} finished jobs older than {retention.max_age_days:g} days deleted at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                if deleted:
                    log.info("retention: %s", self.last_purge)
            except Exception as err:  # a failed purge is retried next interval; readyz shows the store's state
                if self._stop.is_set():
                    return
                self.last_purge = f"failed: {type(err).__name__}: {err}"
                log.error("retention purge failed: %s", err)
            self._stop.wait(retention.interval_s)

    def close(self) -> None:
        self._stop.set()
        with self._refresh_lock:
            pool = self.pool
        if pool is not None:
            pool.stop()
        if self._retention is not None:
            self._retention.join(timeout=30)
        self.store.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
