"""Everything one running server holds, opened and closed by the app's lifespan."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from typing import IO

from service.auth import KeyRing, RateLimiter
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
        keys = KeyRing(config.keys_path, config.auth)  # a bad key file fails here, before workers start
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
        return cls(
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
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.store.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
