"""Prometheus metrics, collected from the database and Redis at scrape time.

The database is the source of truth, so the gauges are read from it on every scrape (a custom
Collector) rather than counted in one API process: any number of API replicas report the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from loom import jobs as core
from loom.models import ItemStatus, JobStatus, utcnow

if TYPE_CHECKING:
    from api.deps import Runtime

log = logging.getLogger("loom.api")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
THROUGHPUT_WINDOW_SECONDS = 60
# The loom_usage_* series: the last day, rolling (labels tenant x model: no per-day labels).
USAGE_WINDOW_SECONDS = 86400
QUEUE = "loom"


def queue_keys(queue: str = QUEUE) -> list[str]:
    """Redis lists behind one Celery queue with priority steps 0..9 (separator ':')."""
    return [queue] + [f"{queue}:{p}" for p in range(1, 10)]


def queue_depth(broker_url: str) -> int | None:
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        pipe = client.pipeline()
        for key in queue_keys():
            pipe.llen(key)
        return int(sum(pipe.execute()))
    finally:
        client.close()


class LoomCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._from_db()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
            log.warning("metrics: database unavailable: %s", exc)
        try:
            yield from self._usage()
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: usage unavailable: %s", exc)
        try:
            depth = queue_depth(self.runtime.settings.broker_url)
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: broker unavailable: %s", exc)
            depth = None
        if depth is not None:
            g = GaugeMetricFamily("loom_queue_depth", "Chunk messages waiting in the broker queue")
            g.add_metric([], depth)
            yield g

    def _from_db(self) -> Iterator[Metric]:
        with self.runtime.session_factory() as s:
            jobs = GaugeMetricFamily("loom_jobs", "Jobs by status", labels=["status"])
            found = core.job_status_counts(s)
            for st in JobStatus:
                jobs.add_metric([st.value], found.get(st.value, 0))
            yield jobs

            items = GaugeMetricFamily("loom_items", "Items by status", labels=["status"])
            found = core.item_status_counts(s)
            for st in ItemStatus:
                items.add_metric([st.value], found.get(st.value, 0))
            yield items

            count, total, cumulative = core.item_latency(s, buckets=LATENCY_BUCKETS)
            buckets = [(str(b), n) for b, n in zip(LATENCY_BUCKETS, cumulative)]
            buckets.append(("+Inf", count))
            hist = HistogramMetricFamily(
                "loom_item_latency_seconds", "Item run time, claim to completion"
            )
            hist.add_metric([], buckets, total)
            yield hist

            since = utcnow() - timedelta(seconds=THROUGHPUT_WINDOW_SECONDS)
            rate = GaugeMetricFamily(
                "loom_worker_items_per_second",
                f"Items each worker completed per second over the last {THROUGHPUT_WINDOW_SECONDS}s",
                labels=["worker"],
            )
            for worker, n in core.outputs_per_worker(s, since=since).items():
                rate.add_metric([worker], n / THROUGHPUT_WINDOW_SECONDS)
            yield rate

    def _usage(self) -> Iterator[Metric]:
        """Per tenant (its name) and model: what GET /v1/usage counts, over the last
        USAGE_WINDOW_SECONDS instead of per day (items queued or running count now)."""
        with self.runtime.session_factory() as s:
            rows = core.recent_usage(s, seconds=USAGE_WINDOW_SECONDS)
        window = f"over the last {USAGE_WINDOW_SECONDS // 3600}h"
        items = GaugeMetricFamily(
            "loom_usage_items",
            f"Items by tenant, model and status: finished {window}, or queued/running now",
            labels=["tenant", "model", "status"])
        seconds = GaugeMetricFamily(
            "loom_usage_model_seconds",
            f"Model time {window} (each output's share of its batch's model call)",
            labels=["tenant", "model"])
        stored = GaugeMetricFamily(
            "loom_usage_bytes_stored", f"Bytes of outputs written {window}",
            labels=["tenant", "model"])
        for r in rows:
            for st in ItemStatus:
                items.add_metric([r.tenant_name, r.model, st.value], r.items.get(st.value, 0))
            seconds.add_metric([r.tenant_name, r.model], r.model_seconds)
            stored.add_metric([r.tenant_name, r.model], r.bytes_stored)
        yield items
        yield seconds
        yield stored


def build_registry(runtime: Runtime) -> CollectorRegistry:
    """A registry per app (tests build many apps; the global registry would collide)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoomCollector(runtime))
    return registry
