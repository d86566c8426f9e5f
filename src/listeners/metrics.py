"""Prometheus metrics of one node, in a registry of its own (several nodes per test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attached_users = Gauge("listeners_attached_users", "Users with open streams", registry=r)
        self.open_streams = Gauge("listeners_open_streams", "Open Firestore watch streams", registry=r)
        self.firestore_connections = Gauge(
            "listeners_firestore_connections", "gRPC connections carrying watches", registry=r
        )
        self.failed_streams = Gauge(
            "listeners_failed_streams", "Streams that failed for good (e.g. permission denied)", registry=r
        )
        self.listen_degraded = Gauge(
            "listeners_listen_degraded",
            "Firestore Listen streams held back by a permanent error (retried slowly, no data)",
            registry=r,
        )
        self.listen_stream_errors = Counter(
            "listeners_listen_stream_errors",
            "Firestore Listen calls that ended, by gRPC status (or SILENT, CLIENT)",
            ["code"],
            registry=r,
        )
        self.listen_undecodable = Counter(
            "listeners_listen_undecodable_documents",
            "Firestore documents that could not be decoded (their watches failed)",
            registry=r,
        )
        self.stream_restarts = Counter(
            "listeners_stream_restarts", "Watches replaced after they ended", ["kind"], registry=r
        )
        self.redis_reconnects = Counter(
            "listeners_redis_reconnects",
            "Times Redis came back after being unreachable",
            registry=r,
        )
        self.pubsub_reconnects = Counter(
            "listeners_pubsub_reconnects",
            "Pub/Sub connections made again after a loss or a missed heartbeat, by consumer",
            ["connection"],
            registry=r,
        )
        self.task_restarts = Counter(
            "listeners_task_restarts",
            "Long-lived tasks restarted after they died, by task",
            ["task"],
            registry=r,
        )
        self.redis_up = Gauge("listeners_redis_up", "1 when Redis answers", registry=r)
        self.events = Counter("listeners_events", "Events published, by type", ["type"], registry=r)
        self.positions = Counter(
            "listeners_tail_positions",
            "Tail positions published (one per quiet stream after a burst)",
            registry=r,
        )
        self.publish_failures = Counter(
            "listeners_publish_failures",
            "Events not published (Redis down or queue full)",
            registry=r,
        )
        self.publish_queue = Gauge("listeners_publish_queue", "Events waiting to be published", registry=r)
        self.malformed_registry = Counter(
            "listeners_registry_malformed", "Registry documents skipped as malformed", registry=r
        )
        self.rejected_inputs = Counter(
            "listeners_rejected_inputs",
            "Items of outside input refused and skipped, by where they came from",
            ["source"],
            registry=r,
        )
        self.ws_refusals = Counter(
            "listeners_ws_refusals",
            "WebSocket upgrades refused with an HTTP status before the handshake, by reason",
            ["reason"],
            registry=r,
        )
        self.attaches = Counter("listeners_user_attaches", "Users attached here", registry=r)
        self.detaches = Counter(
            "listeners_user_detaches", "Users detached here, by reason", ["reason"], registry=r
        )
        self.cluster_members = Gauge(
            "listeners_cluster_members", "Live instances in the membership", registry=r
        )
        self.instance = Gauge(
            "listeners_instance", "This instance (its id as a label)", ["instance_id"], registry=r
        )
        self.loop_lag = Histogram(
            "listeners_loop_lag_seconds",
            "How late a 50 ms timer on the event loop fires: how long the loop was kept busy",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.loop_stall_max = Gauge(
            "listeners_loop_stall_max_seconds",
            "The longest the event loop was kept busy since start",
            registry=r,
        )
        self.loop_stall_max_value = 0.0
        self.asyncio_tasks = Gauge(
            "listeners_asyncio_tasks",
            "Tasks alive on the event loop (a leak shows as a count that only grows)",
            registry=r,
        )
        self.lag = Histogram(
            "listeners_publish_lag_seconds",
            "From the Firestore update time of a document to its event's publish",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
