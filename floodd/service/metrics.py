"""The Prometheus endpoint: floodd's numbers in the text exposition format, through
prometheus-client, served by its own thread (``metrics.listen``).

Two kinds of numbers, and no label per address (the busiest sources are
``floodd top``'s):

* Events the main loop counts as they happen (:class:`Metrics`' counters and
  histograms): bans added, unbans, refusals, ban latency, tick and rescan durations.
* State read at scrape time from a :class:`Snapshot` the main loop publishes (one
  attribute replaced whole, so a scrape never sees half an update): packets, capture
  counters, query types, bans in the kernel, table sizes.  The status line and the
  journal's summary are written from the same snapshot.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from floodd import __version__
from floodd.detect.traffic import MALFORMED_QTYPE, qtype_label
from floodd.errors import Failure
from floodd.scope import Scope
from floodd.service.fastdrop import FastDropCounts

# Seconds from a threshold crossing to the kernel dropping: milliseconds when floodd
# reacts at once, up to a tick when it waits for one, more when the firewall is slow.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Query types reported by name (malformed packets as "malformed"); the rest, RFC 3597
# TYPEnnn included, together as "other": a flood of random types adds no series.
NAMED_QTYPES = frozenset({1, 2, 5, 6, 12, 15, 16, 28, 33, 35, 43, 48, 52, 64, 65, 99, 252,
                          255, 257, MALFORMED_QTYPE})
MALFORMED = qtype_label(MALFORMED_QTYPE)
# The rule label of a ban no configured rule made: an operator's (their reason is free
# text), or one of a rule since removed from the configuration.
OPERATOR = "operator"


def qtype_metric_label(code: int) -> str:
    return qtype_label(code) if code in NAMED_QTYPES else "other"


def scope_label(scope: Scope) -> str:
    """A bounded label for what a ban drops: ``all`` or ``udp``, then ``+qtype`` for
    one query type and ``+hops`` for unusual TTL/hop limits only."""
    return ("udp" if scope.udp_only else "all") + ("+qtype" if scope.qtype is not None else "") \
        + ("+hops" if scope.except_hops else "")


def refusal_label(reason: str) -> str:
    """The kind of a refusal (floodd.decide.policy's reason texts) as a bounded label."""
    if reason.startswith("max_bans"):
        return "max_bans"
    if "whitelist" in reason:
        return "whitelist"
    if "host's address" in reason:
        return "own-address"
    if reason == "loopback":
        return "loopback"
    return "other"


@dataclass(frozen=True)
class InterfaceCounts:
    interface: str
    packets: int  # queries counted (scaled by the sampling)
    received: int  # the kernel's capture counters
    dropped: int


@dataclass(frozen=True)
class Snapshot:
    """What the daemon sees now, as the main loop last published it."""

    interfaces: tuple[InterfaceCounts, ...] = ()
    sampling: int = 1
    queries: Mapping[str, int] = field(default_factory=dict)  # by qtype label
    bans: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (rule, scope) -> n
    max_bans: int = 0
    dropped_packets: int = 0  # dropped by the bans since start, from kernel counters
    table_keys: Mapping[str, int] = field(default_factory=dict)
    fast_drop: FastDropCounts = FastDropCounts()

    @property
    def packets(self) -> int:
        return sum(i.packets for i in self.interfaces)

    @property
    def received(self) -> int:
        return sum(i.received for i in self.interfaces)

    @property
    def dropped(self) -> int:
        return sum(i.dropped for i in self.interfaces)


class _SnapshotCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.snapshot
        up = GaugeMetricFamily("floodd_up", "1 while floodd runs its main loop")
        up.add_metric([], 1)
        info = GaugeMetricFamily("floodd_build_info", "floodd's version", labels=["version"])
        info.add_metric([__version__], 1)
        packets = CounterMetricFamily("floodd_packets", "DNS queries counted",
                                      labels=["interface"])
        received = CounterMetricFamily("floodd_capture_received",
                                       "packets the kernel's capture received",
                                       labels=["interface"])
        drops = CounterMetricFamily("floodd_capture_drops",
                                    "packets the kernel's capture dropped (floodd too slow)",
                                    labels=["interface"])
        for i in snap.interfaces:
            packets.add_metric([i.interface], i.packets)
            received.add_metric([i.interface], i.received)
            drops.add_metric([i.interface], i.dropped)
        sampling = GaugeMetricFamily("floodd_capture_sampling",
                                     "1: every packet counted; N: 1 in N (overloaded)")
        sampling.add_metric([], snap.sampling)
        qtypes = CounterMetricFamily("floodd_queries_by_qtype", "DNS queries by query type",
                                     labels=["qtype"])
        for label, n in sorted(snap.queries.items()):
            qtypes.add_metric([label], n)
        malformed = CounterMetricFamily("floodd_malformed",
                                        "packets to the DNS ports that are no valid query")
        malformed.add_metric([], snap.queries.get(MALFORMED, 0))
        bans = GaugeMetricFamily("floodd_bans", "bans in the kernel now",
                                 labels=["rule", "scope"])
        for (rule, scope), n in sorted(snap.bans.items()):
            bans.add_metric([rule, scope], n)
        cap = GaugeMetricFamily("floodd_max_bans", "the configured cap on bans (max_bans)")
        cap.add_metric([], snap.max_bans)
        dropped = CounterMetricFamily("floodd_ban_dropped_packets",
                                      "packets floodd's bans dropped (kernel counters, read "
                                      "at each rescan)")
        dropped.add_metric([], snap.dropped_packets)
        keys = GaugeMetricFamily("floodd_rate_table_keys", "keys a rate table tracks",
                                 labels=["table"])
        for table, n in sorted(snap.table_keys.items()):
            keys.add_metric([table], n)
        fast_sources = GaugeMetricFamily("floodd_fast_drop_sources",
                                         "sources (and TTL/hop limits) the kernel's fast "
                                         "drop dropped lately, read at each rescan")
        fast_sources.add_metric([], snap.fast_drop.sources)
        fast_packets = CounterMetricFamily("floodd_fast_drop_dropped_packets",
                                           "queries the kernel's fast drop dropped (its "
                                           "counters, read at each rescan)")
        fast_packets.add_metric([], snap.fast_drop.packets)
        return [up, info, packets, received, drops, sampling, qtypes, malformed, bans, cap,
                dropped, keys, fast_sources, fast_packets]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape a second would flood the journal


def text_format_only(app: Callable[..., Any]) -> Callable[..., Any]:
    """The WSGI ``app`` answering in the text format 0.0.4 whatever the scraper
    accepts.  In OpenMetrics a counter's family is named without ``_total``, so the
    counter ``floodd_bans_total`` and the gauge ``floodd_bans`` would be one name."""
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)
    return serve


class Metrics:
    """floodd's metrics: events counted by the main loop, state from its snapshot.

    Counters and histograms are prometheus-client's (thread-safe); ``snapshot`` is
    replaced whole by the main loop and read by the endpoint's thread.
    """

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: every counter starts with floodd
        # Not auto-described: the registry's name check takes the counter floodd_bans_total
        # and the gauge floodd_bans for one name (see text_format_only).
        self.registry = CollectorRegistry(auto_describe=False)
        self.snapshot = Snapshot()
        r = self.registry
        self.bans_added = Counter("floodd_bans", "bans added, by rule (operator: by hand)",
                                  ["rule"], registry=r)
        self.unbans = Counter("floodd_unbans", "bans removed, by reason", ["reason"],
                              registry=r)
        self.refused = Counter("floodd_refused", "bans not made, by reason", ["reason"],
                               registry=r)
        self.ban_latency = Histogram("floodd_ban_latency_seconds",
                                     "threshold crossing seen by the capture to the kernel "
                                     "dropping", buckets=LATENCY_BUCKETS, registry=r)
        self.tick_duration = Histogram("floodd_tick_duration_seconds",
                                       "one policy decision (rules evaluated, bans made)",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.rescan_duration = Histogram("floodd_rescan_duration_seconds",
                                         "one rescan (counters read, bans expired, repaired)",
                                         buckets=DURATION_BUCKETS, registry=r)
        r.register(_SnapshotCollector(self))
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from a thread of its own."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._server = make_server(host, port, text_format_only(make_wsgi_app(
                self.registry)), Server, handler_class=_Quiet)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise Failure(f"metrics: cannot listen on {where}: "
                          f"{exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="floodd-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
