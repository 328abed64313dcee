"""lab/prometheus.py: a real Prometheus in a lab namespace scrapes a real exporter
(prometheus_client's HTTP server) listening on that namespace's loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from lab import prometheus
from lab.prometheus import Prometheus

pytestmark = pytest.mark.skipif(not prometheus.available(),
                                reason="needs prometheus (Debian package prometheus)")


def test_scrapes_an_exporter_inside_the_namespace(lab: Any, in_server: Any,
                                                  tmp_path: Path) -> None:
    registry = CollectorRegistry()
    queries = Counter("lab_queries", "queries the test counted", registry=registry)
    queries.inc(42)
    # The listening socket is opened in a thread that joined the server namespace: the
    # exporter is on that namespace's 127.0.0.1 only, out of the host's reach.
    server, _ = in_server(start_http_server, 0, "127.0.0.1", registry)
    target = f"127.0.0.1:{server.server_port}"
    try:
        with Prometheus(target, tmp_path, lab.server_ns) as prom:
            first = prom.wait_for("lab_queries_total", lambda s: s != [])
            queries.inc(8)
            prom.wait_for("lab_queries_total", lambda s: s != [] and s[0][1] == 50,
                          timeout=5)
            [(up_labels, up)] = prom.query('up{job="floodd"}')
            with pytest.raises(RuntimeError, match="bad_data"):
                prom.query("sum(")
            pid = prom.pid
            workdir = next(tmp_path.glob("prometheus-*"))
    finally:
        server.shutdown()
        server.server_close()

    [(labels, value)] = first
    assert labels == {"__name__": "lab_queries_total", "job": "floodd", "instance": target}
    assert value == 42
    assert up_labels["instance"] == target and up == 1
    # Stopped by its pid, its directory (configuration, data, log) removed.
    assert not prom.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()
