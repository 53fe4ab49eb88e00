"""Prometheus metrics of one app: a registry per app, so tests can build several apps.

Gauges that mirror the job store (jobs by status, queue depth) are read from SQLite at
scrape time by a custom collector, so they are right after a restart too. Latencies are
histograms in seconds.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SEARCH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _StoreCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]], workers_ready: Callable[[], int]) -> None:
        self._counts = counts
        self._workers_ready = workers_ready

    def collect(self) -> Iterable[Metric]:
        counts = self._counts()
        jobs = GaugeMetricFamily("dco_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("dco_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        yield GaugeMetricFamily("dco_workers_ready", "Worker processes ready to run jobs", value=self._workers_ready())


class ServiceMetrics:
    def __init__(self, counts: Callable[[], dict[str, int]], workers_ready: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(counts, workers_ready))
        r = self.registry
        self.submitted = Counter("dco_jobs_submitted", "Jobs accepted (202)", registry=r)
        self.rejected = Counter("dco_requests_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.finished = Counter("dco_jobs_finished", "Jobs answered, by job status", ["status"], registry=r)
        self.search_seconds = Histogram(
            "dco_search_seconds", "Wall-clock seconds of a search, by search status", ["status"], buckets=SEARCH_BUCKETS, registry=r
        )
        self.lean_seconds = Histogram(
            "dco_lean_seconds", "Seconds a search spent in the Lean backend", buckets=SEARCH_BUCKETS, registry=r
        )
        self.generator_seconds = Histogram(
            "dco_generator_seconds", "Seconds a search spent in tactic generators", buckets=SEARCH_BUCKETS, registry=r
        )
        self.check_seconds = Histogram(
            "dco_check_seconds", "Seconds to verify a complete proof (POST /v1/check)", buckets=SEARCH_BUCKETS, registry=r
        )
        self.worker_restarts = Counter("dco_worker_restarts", "Worker processes restarted, by reason", ["reason"], registry=r)
        self.http_seconds = Histogram(
            "dco_http_request_seconds", "HTTP request latency", ["method", "route", "code"], buckets=HTTP_BUCKETS, registry=r
        )

    def observe_result(self, result: dict) -> None:
        """Record a finished search's timings (a `SearchResult.to_json()` record)."""
        self.search_seconds.labels(result.get("status", "unknown")).observe(float(result.get("wall_time_s", 0.0)))
        self.lean_seconds.observe(float(result.get("lean_time_s", 0.0)))
        self.generator_seconds.observe(float(result.get("generator_time_s", 0.0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
