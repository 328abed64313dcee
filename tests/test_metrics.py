"""floodd's Prometheus endpoint (floodd.service.metrics): its labels, its exposition, and
a real ``floodd run`` under a flood whose scraped ban and drop counters match the kernel's.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from floodd.decide.safety import protected_reason
from floodd.detect.traffic import MALFORMED_QTYPE
from floodd.errors import Failure
from floodd.scope import UDP_ONLY, WHOLE, Scope
from floodd.service.fastdrop import FastDropCounts
from floodd.service.metrics import (InterfaceCounts, Metrics, Snapshot, qtype_metric_label,
                                    refusal_label, scope_label)

from lab.prometheus import Prometheus

from conftest import InNamespace
from daemon_helpers import (Floodd, daemon_config, finish, flood, nft_elements, packets,
                            wait_until, write_config)

FLOODER = "198.51.100.7"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of one GET of ``url``."""
    headers = {"Accept": accept} if accept else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- labels: bounded sets, whatever the traffic ------------------------------------------
def test_scope_labels_are_a_few_kinds() -> None:
    assert scope_label(WHOLE) == "all"
    assert scope_label(UDP_ONLY) == "udp"
    assert scope_label(Scope(True, 255)) == "udp+qtype"
    assert scope_label(Scope(True, None, (64,))) == "udp+hops"
    assert scope_label(Scope(True, 255, (64, 128))) == "udp+qtype+hops"


def test_qtype_labels_name_the_common_types_and_pool_the_rest() -> None:
    assert qtype_metric_label(1) == "A"
    assert qtype_metric_label(255) == "ANY"
    assert qtype_metric_label(MALFORMED_QTYPE) == "malformed"
    assert {qtype_metric_label(code) for code in range(1000, 65536)} == {"other"}


def test_refusal_labels_follow_the_policy_reasons() -> None:
    import ipaddress
    net = ipaddress.ip_network
    white = [net("192.0.2.0/24")]
    own = [net("203.0.113.5/32")]
    reasons = {
        "192.0.2.9/32": "whitelist", "192.0.2.0/23": "whitelist",
        "203.0.113.5/32": "own-address", "203.0.113.0/24": "own-address",
        "127.0.0.1/32": "loopback",
    }
    for network, label in reasons.items():
        reason = protected_reason(net(network), white, own)
        assert reason is not None and refusal_label(reason) == label, (network, reason)
    assert refusal_label("max_bans (10) reached") == "max_bans"


# --- the exposition ----------------------------------------------------------------------
def test_endpoint_serves_the_snapshot_and_the_events_in_the_text_format() -> None:
    metrics = Metrics()
    metrics.snapshot = Snapshot(
        interfaces=(InterfaceCounts("eth0", 1200, 1300, 7),), sampling=4,
        queries={"A": 1000, "ANY": 150, "malformed": 50},
        bans={("query-flood", "udp"): 2, ("any-queries", "udp+qtype"): 1}, max_bans=10,
        dropped_packets=4321, table_keys={"source": 12},
        fast_drop=FastDropCounts(sources=3, packets=98765))
    metrics.bans_added.labels("query-flood").inc(2)
    metrics.unbans.labels("expired").inc()
    metrics.refused.labels("whitelist").inc()
    metrics.ban_latency.observe(0.004)
    port = free_port()
    metrics.serve("127.0.0.1", port)
    try:
        # Prometheus asks for OpenMetrics first; the answer is the text format, in which
        # the gauge floodd_bans and the counter floodd_bans_total are two names.
        kind, text = scrape(f"http://127.0.0.1:{port}/metrics",
                            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    finally:
        metrics.close()
    assert kind.startswith("text/plain; version=0.0.4"), kind
    got = samples(text)
    expected = {
        ("floodd_up", ()): 1,
        ("floodd_packets_total", (("interface", "eth0"),)): 1200,
        ("floodd_capture_received_total", (("interface", "eth0"),)): 1300,
        ("floodd_capture_drops_total", (("interface", "eth0"),)): 7,
        ("floodd_capture_sampling", ()): 4,
        ("floodd_queries_by_qtype_total", (("qtype", "ANY"),)): 150,
        ("floodd_malformed_total", ()): 50,
        ("floodd_bans", (("rule", "query-flood"), ("scope", "udp"))): 2,
        ("floodd_bans", (("rule", "any-queries"), ("scope", "udp+qtype"))): 1,
        ("floodd_max_bans", ()): 10,
        ("floodd_bans_total", (("rule", "query-flood"),)): 2,
        ("floodd_unbans_total", (("reason", "expired"),)): 1,
        ("floodd_refused_total", (("reason", "whitelist"),)): 1,
        ("floodd_ban_dropped_packets_total", ()): 4321,
        ("floodd_ban_latency_seconds_count", ()): 1,
        ("floodd_ban_latency_seconds_bucket", (("le", "0.005"),)): 1,
        ("floodd_ban_latency_seconds_bucket", (("le", "0.0025"),)): 0,
        ("floodd_rate_table_keys", (("table", "source"),)): 12,
        ("floodd_fast_drop_sources", ()): 3,
        ("floodd_fast_drop_dropped_packets_total", ()): 98765,
    }
    for key, value in expected.items():
        assert got.get(key) == value, (key, got.get(key))
    assert not [name for name, _ in got if name.endswith("_created")]
    assert ("floodd_build_info", (("version", __import__("floodd").__version__),)) in got


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Failure) as err:
            Metrics().serve("127.0.0.1", port)
    assert str(err.value) == f"metrics: cannot listen on 127.0.0.1:{port}: " \
                             "Address already in use"


# --- a real daemon, scraped by a real Prometheus -----------------------------------------
def value(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return result[0][1] if result else None


def test_scraped_ban_and_drop_counters_match_the_kernel(dns_lab: Any, in_server: InNamespace,
                                                         tmp_path: Path) -> None:
    """floodd in the lab's server namespace, Prometheus beside it scraping every second:
    under a flood, the endpoint and Prometheus's query API both report the kernel's
    dropped packets and floodd's one ban."""
    port = in_server(free_port)
    url = f"http://127.0.0.1:{port}/metrics"
    cfg = write_config(tmp_path / "floodd.yaml",
                       daemon_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"}))
    dns_lab.add_client_address(FLOODER)
    daemon = Floodd(dns_lab, cfg)
    prom = Prometheus(f"127.0.0.1:{port}", tmp_path, dns_lab.server_ns)
    try:
        daemon.start()
        daemon.wait_ready()
        prom.start()
        before = samples(in_server(scrape, url)[1])
        assert before[("floodd_up", ())] == 1
        assert before[("floodd_max_bans", ())] == 10_000
        dnsperf = flood(dns_lab, tmp_path, FLOODER, seconds=2)
        daemon.wait_log(rf"ban {FLOODER}/32 \(UDP only\) for 30 s")
        finish(dnsperf)
        # The flood is over: once a rescan (every 1 s) has read the counters again, the
        # kernel's and the endpoint's stay put.
        dropped = packets(nft_elements(dns_lab).get(FLOODER))
        assert dropped > 0

        def settled() -> Samples | None:
            got = samples(in_server(scrape, url)[1])
            kernel = packets(nft_elements(dns_lab).get(FLOODER))
            return got if got.get(("floodd_ban_dropped_packets_total", ())) == kernel else None
        got = wait_until(settled, 10, interval=0.5, what="the dropped packets to settle")
        kernel = got[("floodd_ban_dropped_packets_total", ())]
        # Its first sample is queryable some 6 s after Prometheus started.
        prom.wait_for("floodd_ban_dropped_packets_total",
                      lambda found: bool(found) and found[0][1] == kernel, timeout=20)
        assert value(prom, 'sum(floodd_bans{rule="query-flood"})') == 1
        assert value(prom, "sum(floodd_bans_total)") == 1
        assert value(prom, 'up{job="floodd"}') == 1
        assert value(prom, "floodd_max_bans") == 10_000
        assert (value(prom, "floodd_ban_latency_seconds_count") or 0) == 1
    finally:
        prom.stop()
        daemon.close()
    assert got[("floodd_bans", (("rule", "query-flood"), ("scope", "udp")))] == 1
    assert got[("floodd_bans_total", (("rule", "query-flood"),))] == 1
    assert got[("floodd_ban_latency_seconds_count", ())] == 1
    assert got[("floodd_ban_latency_seconds_sum", ())] < 1.0
    assert got[("floodd_tick_duration_seconds_count", ())] > 0
    assert got[("floodd_rescan_duration_seconds_count", ())] > 0
    iface = (("interface", dns_lab.server_if),)
    assert got[("floodd_packets_total", iface)] > 1000
    assert got[("floodd_capture_received_total", iface)] >= got[("floodd_packets_total", iface)]
    assert got[("floodd_queries_by_qtype_total", (("qtype", "A"),))] > 500
    assert got[("floodd_queries_by_qtype_total", (("qtype", "AAAA"),))] > 500
    assert got[("floodd_rate_table_keys", (("table", "source"),))] >= 0
