"""Forged DNS queries for the lab: raw IP frames with a chosen source address, IPv4 TTL
or IPv6 hop limit, query type and name, sent onto the client end of the veth with
tcpreplay at a bounded rate, count and time.

A forger elsewhere on the network can write any source address into a UDP query, not
the hop value its packets arrive with: that is the initial TTL minus the path length.
In the lab the real clients (dnsperf, dig) sit on the server's link, so their packets
arrive with the kernel's initial TTL, :data:`REAL_HOPS`; forged ones carry whatever the
scenario chooses, the real value included (a forger who matches the path).

Forged queries leave from :data:`FORGED_PORTS`, source ports no real client of the lab
uses (dnsperf and dig take ephemeral ports, 32768-60999 on Linux): the server's replies
to them are counted apart with ``load.ReplyCounter(lab, None, ports=FORGED_PORTS)``,
also when they carry a real client's address.  Such an address must be one of the
client namespace's (``load.add_address``), as for any replayed frame (see lab.load).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from floodd.config import parse_duration
from lab import load, synth
from lab.netns import Lab

REAL_HOPS = 64  # Linux's initial TTL and hop limit: the real clients' packets, one link away
FORGED_PORTS = (1024, 9999)  # source ports of forged queries (replies counted apart)
_PORT_SPAN = FORGED_PORTS[1] - FORGED_PORTS[0] + 1
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "etc" / "floodd.yaml"
# A faster variant of a rule keeps its rate (the threshold shrinks with the window),
# except a threshold under this, which counts a handful of packets and is kept as it is.
HANDFUL = 100


def forged_queries(wire: load.Wire, source: str, count: int, *, hops: int,
                   qtype: str = "A", qname: str = "www.lab.example") -> list[bytes]:
    """``count`` queries claiming to come from ``source`` that arrive with TTL / hop limit
    ``hops`` (query id and source port vary)."""
    server = Lab.server_v6 if ":" in source else Lab.server_v4
    return [load.ethernet(wire, synth.udp_datagram(
        source, server, synth.dns_query(qname, qtype, i & 0xFFFF),
        FORGED_PORTS[0] + i % _PORT_SPAN, ttl=hops)) for i in range(count)]


def rotating_queries(wire: load.Wire, sources: Sequence[str], rounds: int, *, hops: int,
                     qtype: str = "ANY", qname: str = "lab.example") -> list[bytes]:
    """``rounds`` queries from each of ``sources``, in rounds (every source sends one
    before any sends its next), all arriving with TTL / hop limit ``hops``."""
    frames = []
    for r in range(rounds):
        payload = synth.dns_query(qname, qtype, r)
        for i, source in enumerate(sources):
            server = Lab.server_v6 if ":" in source else Lab.server_v4
            sport = FORGED_PORTS[0] + (r * len(sources) + i) % _PORT_SPAN
            frames.append(load.ethernet(wire, synth.udp_datagram(source, server, payload,
                                                                 sport, ttl=hops)))
    return frames


class Forger:
    """Sends ``frames`` from the client namespace: ``loops`` times over at ``pps`` frames
    a second, stopped after ``duration`` seconds when given (tcpreplay; see load.Replay).
    At most ``len(frames) * loops`` frames leave."""

    def __init__(self, lab: Lab, frames: Sequence[bytes], capture: Path, *, pps: float,
                 loops: int = 1, duration: float | None = None) -> None:
        if not frames or loops < 1 or pps <= 0:
            raise ValueError("a forger sends at least one frame, at a positive rate")
        self.limit = len(frames) * loops
        self.replay = load.Replay(lab, load.write_frames(capture, frames), pps=pps,
                                  loops=loops, duration=duration)

    @property
    def started(self) -> float:
        """Unix time the frames began to leave (0 before :meth:`start`)."""
        return self.replay.started

    @property
    def running(self) -> bool:
        return self.replay.running

    def start(self) -> Forger:
        self.replay.start()
        return self

    def wait(self) -> load.ReplayReport:
        """Until the last frame left (or the duration ended): what tcpreplay sent."""
        return self.replay.wait()


# --- floodd configured as shipped ------------------------------------------------------
def fast_rules(rules: Sequence[dict[str, Any]], window: float) -> list[dict[str, Any]]:
    """The rules with every window cut to at most ``window`` seconds: rates kept (the
    thresholds cut in proportion, rounded up), thresholds under :data:`HANDFUL` kept."""
    out = []
    for rule in rules:
        fast = dict(rule)
        seconds = parse_duration(rule["window"])
        if seconds > window:
            fast["window"] = window
            for key in ("threshold", "total_threshold"):
                if key in rule and rule[key] >= HANDFUL:
                    fast[key] = math.ceil(rule[key] * window / seconds)
        out.append(fast)
    return out


def shipped_config(workdir: Path, *, backend: str = "nftables", fast_window: float | None = None,
                   trust: dict[str, Any] | None = None,
                   firewall: dict[str, Any] | None = None) -> Path:
    """floodd's shipped configuration (:data:`SHIPPED_CONFIG`) for the lab, written to
    ``workdir``: control socket and state there, the given firewall backend, rescans every
    second, bans flushed on exit; with ``fast_window``, :func:`fast_rules` and hop values
    learned after that many seconds.  ``trust`` and ``firewall`` update those sections."""
    data: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    trust_section = {**data.get("trust", {})}
    if fast_window is not None:
        data["rules"] = fast_rules(data["rules"], fast_window)
        data["rate_table"] = {**data.get("rate_table", {}), "window": max(
            parse_duration(r["window"]) for r in data["rules"])}
        trust_section["hop_learn_after"] = fast_window
    trust_section.update(trust or {})
    if trust_section:
        data["trust"] = trust_section
    data["firewall"] = {**data.get("firewall", {}), "backend": backend, "rescan_interval": 1,
                        "on_exit": "flush", **(firewall or {})}
    data["daemon"] = {**data.get("daemon", {}), "control_socket": str(workdir / "control.sock"),
                      "state_dir": str(workdir / "state")}
    path = workdir / "floodd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
