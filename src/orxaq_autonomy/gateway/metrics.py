"""Prometheus metrics for `mesh-serve`.

Two kinds, kept apart on purpose:

- what this process sees (requests, their latency, rate limiting, group commits) is
  counted in memory;
- what the node has done (events in the log, dispatched, failed, dead-lettered, forwarded,
  import rejections) is read from the node's files at scrape time. Those counts then include
  the work of `mesh-dispatch` and `mesh-sync` run from cron, and survive restarts.

A scrape reads only small state files and the index's tail row: its cost does not grow
with the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..mesh import Mesh

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384)


class GatewayMetrics:
    """The in-process instruments, in a registry of their own (one per gateway)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "orxaq_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ("route", "method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "orxaq_http_request_duration_seconds",
            "Time from request start to the end of the response.",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.published = Counter(
            "orxaq_gateway_events_published",
            "Events appended to the log through the gateway.",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "orxaq_gateway_events_duplicate",
            "Events the gateway answered with an earlier event (repeated idempotency key).",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "orxaq_http_rate_limited",
            "Requests refused with 429.",
            registry=self.registry,
        )
        self.group_size = Histogram(
            "orxaq_gateway_group_commit_events",
            "Events appended per group commit (one fsync each).",
            buckets=GROUP_BUCKETS,
            registry=self.registry,
        )

    def watch(self, mesh: Mesh) -> None:
        self.registry.register(NodeCollector(mesh))


class NodeCollector(Collector):
    """Gauges and counters read from the node's files when scraped."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registering must not read files (nor open SQLite in this thread)

    def collect(self) -> Iterator[Metric]:
        status = self.mesh.status()
        log = status["log"]
        yield _gauge("orxaq_log_events", "Events in the local log.", log["events"])
        yield _gauge("orxaq_log_bytes", "Committed size of the local log.", log["bytes"])
        yield _gauge("orxaq_log_clock", "Highest Lamport clock in the log.", log["clock"])
        quarantined = CounterMetricFamily(
            "orxaq_log_quarantine_incidents",
            "Uncommitted tails moved to quarantine/ (writers that crashed).",
        )
        quarantined.add_metric([], status["quarantined"]["incidents"])
        yield quarantined
        yield _gauge(
            "orxaq_unexported_events", "Own events not yet exported.", status["unexported"]
        )
        dispatch = status["dispatch"]
        dispatched = CounterMetricFamily(
            "orxaq_dispatch_events", "Events the dispatcher has moved past."
        )
        dispatched.add_metric([], dispatch["dispatched"])
        yield dispatched
        yield _gauge(
            "orxaq_dispatch_lag_events", "Events not yet dispatched.", dispatch["lag_events"]
        )
        runs = _handler_counter("orxaq_dispatch_handler_runs", "Handler runs that succeeded.")
        failed = _handler_counter("orxaq_dispatch_handler_failures", "Handler runs that raised.")
        dead = _handler_counter(
            "orxaq_dispatch_dead_lettered", "Events dead-lettered after their attempts."
        )
        for name, stats in sorted(dispatch["stats"].items()):
            runs.add_metric([name], stats.get("ok", 0))
            failed.add_metric([name], stats.get("failed", 0))
            dead.add_metric([name], stats.get("dead_lettered", 0))
        yield from (runs, failed, dead)
        pending = GaugeMetricFamily(
            "orxaq_dispatch_pending", "Handler runs waiting to be retried.", labels=["handler"]
        )
        for name, count in sorted(dispatch["pending_by_handler"].items()):
            pending.add_metric([name], count)
        yield pending
        letters = GaugeMetricFamily(
            "orxaq_dead_letters", "Dead letters held now (mesh-dlq list).", labels=["handler"]
        )
        for name, count in sorted(dispatch["dead_by_handler"].items()):
            letters.add_metric([name], count)
        yield letters
        delivered = _consumer_counter("orxaq_forward_delivered", "Webhook deliveries accepted.")
        failures = _consumer_counter(
            "orxaq_forward_failures", "Webhook delivery attempts that failed."
        )
        waiting = GaugeMetricFamily(
            "orxaq_forward_pending", "Deliveries waiting to be retried.", labels=["consumer"]
        )
        dead_forward = GaugeMetricFamily(
            "orxaq_forward_dead_letters", "Deliveries dead-lettered.", labels=["consumer"]
        )
        for consumer, counts in status["forwarding"].items():
            delivered.add_metric([consumer], counts["delivered"])
            failures.add_metric([consumer], counts["failed_attempts"])
            waiting.add_metric([consumer], counts["pending"])
            dead_forward.add_metric([consumer], counts["dead_letters"])
        yield from (delivered, failures, waiting, dead_forward)
        yield _gauge(
            "orxaq_import_rejected",
            "Ledger files refused by the last imports (import_rejected.json).",
            status["import_rejected"],
        )
        yield _gauge("orxaq_import_forks", "Forks detected in the ledger.", status["forks"])
        tasks = GaugeMetricFamily(
            "orxaq_tasks",
            "Tasks on this node by lane and state (running, queued, completed, failed).",
            labels=["lane", "state"],
        )
        for lane, counts in sorted(status.get("tasks", {}).items()):
            for state, count in sorted(counts.items()):
                tasks.add_metric([lane, state], count)
        yield tasks
        exchange = status.get("exchange")
        if exchange:  # [nats]: the real-time exchange, from the listener's state file
            yield _gauge(
                "orxaq_exchange_connected",
                "1 when the NATS listener runs and is connected.",
                int(bool(exchange["connected"])),
            )
            yield _gauge(
                "orxaq_exchange_lag",
                "Stream messages not yet consumed, plus those waiting unacknowledged.",
                exchange["lag"] or 0,
            )
            yield _gauge(
                "orxaq_exchange_stream_last_seq",
                "The stream's last sequence number, as last seen.",
                exchange["stream_position"].get("last_seq", 0),
            )
            yield _gauge(
                "orxaq_exchange_published_seq",
                "This node's last event published to the stream.",
                exchange["published_seq"],
            )


def _gauge(name: str, help_text: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _handler_counter(name: str, help_text: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, labels=["handler"])


def _consumer_counter(name: str, help_text: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, labels=["consumer"])
