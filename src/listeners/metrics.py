"""Prometheus metrics of one node, in a registry of its own (several nodes per test process).

In the container, every worker process writes its values to a shared directory and a scrape
sees the whole task (listeners.multiproc). Each gauge says how the workers' values combine:
`livesum` for what each worker holds a share of (users, streams, queue), `livemax` for what
each sees whole (cluster members) or the worst of (a stall), `livemin` for what is up only
when it is up everywhere (Redis). Live modes forget a worker once it is gone.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from listeners import multiproc

# The `_created` series: multiprocess mode has none, so a single worker has none either (one
# shape of /metrics whatever WEB_CONCURRENCY is).
disable_created_metrics()  # type: ignore[no-untyped-call]

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attached_users = Gauge(
            "listeners_attached_users", "Users with open streams", multiprocess_mode="livesum", registry=r
        )
        self.open_streams = Gauge(
            "listeners_open_streams", "Open Firestore watch streams", multiprocess_mode="livesum", registry=r
        )
        self.firestore_connections = Gauge(
            "listeners_firestore_connections",
            "gRPC connections carrying watches",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.failed_streams = Gauge(
            "listeners_failed_streams",
            "Streams that failed for good (e.g. permission denied)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.listen_degraded = Gauge(
            "listeners_listen_degraded",
            "Firestore Listen streams held back by a permanent error (retried slowly, no data)",
            multiprocess_mode="livesum",
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
        self.listen_targets = Gauge(
            "listeners_listen_targets",
            "Firestore Listen targets by state (current, pending), counted every 15 s",
            ["state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.listen_relistens = Counter(
            "listeners_listen_relistens",
            "Firestore Listen targets listened to again, by reason (stream, existence_filter)",
            ["reason"],
            registry=r,
        )
        self.listen_target_errors = Counter(
            "listeners_listen_target_errors",
            "Firestore Listen targets removed by the server with an error, by google.rpc.Code",
            ["code"],
            registry=r,
        )
        self.listen_probes = Counter(
            "listeners_listen_probes",
            "Questions asked of quiet Firestore Listen streams, by result (answered, unanswered)",
            ["result"],
            registry=r,
        )
        self.rtdb_streams = Gauge(
            "listeners_rtdb_streams",
            "Realtime Database streams open (connected or reconnecting)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rtdb_reconnects = Counter(
            "listeners_rtdb_reconnects",
            "Realtime Database streams connected again, by cause (unauthorized, http_4xx, http_5xx, "
            "retry, idle_timeout, ended, protocol, network)",
            ["cause"],
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
        self.redis_up = Gauge(
            "listeners_redis_up", "1 when Redis answers", multiprocess_mode="livemin", registry=r
        )
        self.events = Counter("listeners_events", "Events published, by type", ["type"], registry=r)
        self.positions = Counter(
            "listeners_tail_positions",
            "Tail positions published (one per quiet stream after a burst)",
            registry=r,
        )
        self.publish_failures = Counter(
            "listeners_publish_failures",
            "Events not published, by cause (redis_down, queue_full, interrupted: a batch cut mid-write)",
            ["cause"],
            registry=r,
        )
        self.resyncs = Counter(
            "listeners_resyncs",
            "Resyncs the publisher started, by reason: redis_recovered (every user), "
            "publish_gap (the users with an event not confirmed)",
            ["reason"],
            registry=r,
        )
        self.control_requests = Counter(
            "listeners_control_requests",
            "Consumer resync requests on the control channel, by outcome (served, refused, failed)",
            ["outcome"],
            registry=r,
        )
        self.registry_up = Gauge(
            "listeners_registry_up",
            "1 while the registry watch runs (0: no user is attached or detached)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.registry_online = Gauge(
            "listeners_registry_online_users",
            "Users online in the registry, served here or not (counted every 15 s)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.publish_queue = Gauge(
            "listeners_publish_queue",
            "Events waiting to be published",
            multiprocess_mode="livesum",
            registry=r,
        )
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
        self.http_header_timeouts = Counter(
            "listeners_http_header_timeouts",
            "Connections closed because a request's head did not arrive in time",
            registry=r,
        )
        self.attaches = Counter("listeners_user_attaches", "Users attached here", registry=r)
        self.detaches = Counter(
            "listeners_user_detaches", "Users detached here, by reason", ["reason"], registry=r
        )
        self.cluster_members = Gauge(
            "listeners_cluster_members",
            "Live instances in the membership",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.instance = Gauge(
            "listeners_instance",
            "This instance (its id as a label)",
            ["instance_id"],
            multiprocess_mode="livesum",
            registry=r,
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
            multiprocess_mode="livemax",
            registry=r,
        )
        self.loop_stall_max_value = 0.0
        self.asyncio_tasks = Gauge(
            "listeners_asyncio_tasks",
            "Tasks alive on the event loop (a leak shows as a count that only grows)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.lag = Histogram(
            "listeners_publish_lag_seconds",
            "From the Firestore update time of a document to its event's publish",
            buckets=LAG_BUCKETS,
            registry=r,
        )

        # -- WebSocket Direct mode (deliver.websocket): counts per worker, summed per task
        self.ws_sockets = Gauge(
            "listeners_ws_sockets", "Authenticated WebSockets open", multiprocess_mode="livesum", registry=r
        )
        self.ws_users = Gauge(
            "listeners_ws_users",
            "Users with at least one socket open (on each worker, summed over the workers)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ws_max_sockets = Gauge(
            "listeners_ws_max_sockets",
            "The cap on authenticated WebSockets (LISTENERS_WS_MAX_SOCKETS, each worker's)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ws_handshakes = Counter(
            "listeners_ws_handshakes",
            "WebSocket connections by outcome: accepted, or the close code that refused them",
            ["outcome"],
            registry=r,
        )
        self.ws_closes = Counter(
            "listeners_ws_closes",
            "WebSockets closed, by close code sent (client: the client closed first)",
            ["code"],
            registry=r,
        )
        self.ws_messages = Counter("listeners_ws_messages_sent", "Messages written to WebSockets", registry=r)
        self.ws_bytes = Counter(
            "listeners_ws_sent_bytes",
            "Text written to WebSockets, in characters of JSON (bytes for ASCII), before compression",
            registry=r,
        )
        self.ws_queue_bytes = Gauge(
            "listeners_ws_queue_bytes",
            "Text held for sockets whose transport would not take more (characters)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ws_slow_consumers = Counter(
            "listeners_ws_slow_consumer_closes",
            "Sockets closed 4014 because they did not read fast enough",
            registry=r,
        )
        self.ws_delivery = Histogram(
            "listeners_ws_delivery_seconds",
            "From the hub handing a message to a socket to its write to the transport",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 1.0, 5.0, 30.0),
            registry=r,
        )

    def render(self) -> bytes:
        """This process's metrics; under uvicorn's workers (listeners.multiproc), the whole
        task's: every worker's values, combined as each metric's multiprocess mode says."""
        path = multiproc.directory()
        if path is None:
            return generate_latest(self.registry)
        multiproc.forget_dead_workers(path)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def total(metric: Counter) -> float:
    """A counter's value summed over its labels (in this process's registry)."""
    return float(sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total")))
