from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from floodd.config import build_config
from floodd.cli.analyze import SourceHops, analyze_file, by_bucket, format_report, report_json
from floodd.detect.parse import F_EXTRA, UDP, Records
from lab.synth import dns_query, generate_flood_capture, link_frame, udp_datagram, write_pcap
from test_parse import PCAPS, reference_count

ALL_PCAPS = sorted(PCAPS.glob("*.pcap"))


def floodd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "floodd", *args], capture_output=True,
                          text=True, timeout=120)


def analyze_json(path: Path, *extra: str) -> dict[str, Any]:
    proc = floodd("analyze", str(path), "--json", "--top", "100000", *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


@pytest.mark.parametrize("path", ALL_PCAPS, ids=lambda p: p.name)
def test_shared_captures_agree_with_dpkt(path: Path) -> None:
    report = analyze_json(path)
    ref = reference_count(path)
    assert report["total"] == sum(ref.packets.values())
    assert report["malformed"] == ref.malformed
    assert report["qtypes"] == dict(ref.qtypes)
    got = {s["source"]: s["packets"] for s in report["sources"]}
    want = {str(ipaddress.ip_address(src)): n for src, n in ref.packets.items()}
    assert got == want
    counts = [s["packets"] for s in report["sources"]]
    assert counts == sorted(counts, reverse=True)


def test_batches_are_cut_on_the_captures_bucket_edges() -> None:
    src = bytes([198, 51, 100, 7])
    records = [(ts, src, 17, 1, 0, 64) for ts in (10.0, 10.5, 12.2, 15.9, 15.95)]
    assert [[r[0] for r in part] for part in by_bucket(records, 1.0)] == [
        [10.0, 10.5], [12.2], [15.9, 15.95]]
    assert by_bucket(records[:2], 1.0) == [records[:2]]
    assert [len(part) for part in by_bucket(records, 5.0)] == [3, 2]


def test_json_report_has_a_line_per_field_and_list_item() -> None:
    report = {"file": "a.pcap", "total": 3, "qtypes": {"A": 2, "ANY": 1}, "sources": [
        {"source": "198.51.100.7", "packets": 2, "hops": {"64": 2}},
        {"source": "2001:db8::7", "packets": 1, "hops": {}}], "would_ban": []}
    text = report_json(report)
    assert json.loads(text) == report
    assert text.endswith("}\n")
    assert text.splitlines() == [
        "{", ' "file": "a.pcap",', ' "total": 3,', ' "qtypes": {"A": 2, "ANY": 1},',
        ' "sources": [', '  {"source": "198.51.100.7", "packets": 2, "hops": {"64": 2}},',
        '  {"source": "2001:db8::7", "packets": 1, "hops": {}}', " ],", ' "would_ban": []', "}"]


def test_text_report_of_a_flood(tmp_path: Path) -> None:
    cap = generate_flood_capture(str(tmp_path / "flood.pcap"), packets=60_000, sources=2_000,
                                 heavy=3, heavy_share=0.6, rate=6_000.0, seed=7)
    config = build_config({})
    rep = analyze_file(cap.path, config, top=5)
    assert rep.total == 60_000
    heavy = {str(ipaddress.ip_address(h)) for h in cap.heavy}
    assert {s["source"] for s in rep.sources[:3]} == heavy
    # 3 sources share 60% of 6,000/s: ~1,200/s each, over the 500/s of query-flood.
    flagged = {b["source"] for b in rep.would_ban if b["rule"] == "query-flood"}
    assert flagged == {h + "/32" for h in heavy}
    text = format_report(rep)
    assert "query-flood" in text and "60000 packets" in text
    # The per-source counts are exact here (2,000 sources fit the table).
    for s in rep.sources:
        assert s["packets"] == cap.per_source[ipaddress.ip_address(s["source"]).packed]


def test_rules_from_the_config_are_applied(tmp_path: Path) -> None:
    cap = generate_flood_capture(str(tmp_path / "flood.pcap"), packets=20_000, sources=500,
                                 heavy=2, heavy_share=0.5, rate=2_000.0, seed=3)
    cfg = tmp_path / "floodd.yaml"
    cfg.write_text("rules:\n  - name: strict\n    threshold: 100\n    window: 5\n"
                   "    action: warn\n")
    report = analyze_json(Path(cap.path), "-c", str(cfg))
    acted = Counter((b["rule"], b["action"]) for b in report["would_ban"])
    assert acted == {("strict", "warn"): 2}


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.pcap", "cannot read capture"),
    (lambda p: p, "is a directory"),
    (lambda p: (p / "text.pcap").write_text("not a capture") and p / "text.pcap",
     "not a pcap or pcapng file"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, make: Any, message: str) -> None:
    path = make(tmp_path)
    proc = floodd("analyze", str(path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_arguments(tmp_path: Path) -> None:
    proc = floodd("analyze", str(ALL_PCAPS[0]), "--top", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("floodd: ")
    proc = floodd("analyze")
    assert proc.returncode == 2 and "FILE" in proc.stderr and "Traceback" not in proc.stderr


# --- hop values (IPv4 TTL / IPv6 hop limit) -------------------------------------------------
REAL4, REAL6 = "203.0.113.10", "2001:db8::10"  # real clients, one path: hop value 64
HONEST = "198.51.100.20"  # asks for ANY itself, with its own hop value
NEWCOMER = "198.51.100.30"  # no traffic before its flood
WANDERER = "198.51.100.40"  # a different hop value on every packet
Frames = list[tuple[float, bytes]]


def queries(src: str, qtype: str, hops: int, times: Any) -> Frames:
    """One query from ``src`` arriving with TTL / hop limit ``hops`` at each of ``times``."""
    server = "2001:db8::53" if ":" in src else "192.0.2.53"
    return [(1_700_000_000.0 + t, link_frame(udp_datagram(
        src, server, dns_query("www.example.com", qtype, i), 1024 + i, ttl=hops)))
        for i, t in enumerate(times)]


def capture(path: Path, *parts: Frames) -> str:
    write_pcap(str(path), sorted(frame for part in parts for frame in part))
    return str(path)


def every(rate: float, start: float, end: float) -> list[float]:
    return [start + i / rate for i in range(round((end - start) * rate))]


def test_hop_values_per_source_and_forged_floods_marked(tmp_path: Path) -> None:
    # The shipped rules; a forger borrows the real clients' addresses for 5 ANY queries
    # (any-queries: more than 4 in 60 s) arriving with 50 where theirs come with 64.
    path = capture(
        tmp_path / "forged.pcap",
        queries(REAL4, "A", 64, every(2, 0, 120)),
        queries(REAL6, "AAAA", 64, every(2, 0, 120)),
        queries(REAL4, "ANY", 50, range(90, 95)),
        queries(REAL6, "ANY", 50, range(90, 95)),
        queries(HONEST, "A", 64, every(1, 0, 120)),
        queries(HONEST, "ANY", 64, range(90, 95)),
        queries(NEWCOMER, "ANY", 50, range(90, 95)),
        [frame for hops in range(58, 65) for frame in queries(WANDERER, "A", hops, [hops])])
    report = analyze_json(Path(path))
    sources = {s["source"]: s["hops"] for s in report["sources"]}
    assert sources == {REAL4: {"64": 240, "50": 5}, REAL6: {"64": 240, "50": 5},
                       HONEST: {"64": 125}, NEWCOMER: {"50": 5},
                       WANDERER: {str(h): 1 for h in range(58, 65)}}
    acted = {(b["source"], b["rule"]): b for b in report["would_ban"]}
    marks = {(f"{REAL4}/32", "any-queries"): ([64], [50], True),
             (f"{REAL6}/128", "any-queries"): ([64], [50], True),
             (f"{HONEST}/32", "any-queries"): ([64], [64], False),  # its own usual value
             (f"{NEWCOMER}/32", "any-queries"): ([], [50], False)}  # nothing to compare
    assert set(acted) == set(marks)
    for which, (usual, flood, changed) in marks.items():
        assert acted[which]["hops"] == {"usual": usual, "flood": flood, "changed": changed}
        assert acted[which]["scope"]["qtype"] == "ANY"

    text = format_report(analyze_file(path, build_config({}), top=10)).splitlines()

    def line(*words: str) -> str:
        """The one line of ``text`` about a source (``packets peak/s SOURCE ...``) or a
        trigger (``ban SOURCE ...``)."""
        found = [ln for ln in text if ln.split()[:len(words)] == list(words)
                 or ln.split()[2:3] == list(words)]
        assert len(found) == 1, (words, text)
        return found[0]
    assert line(REAL4).endswith("  A 240, ANY 5; TTL 64 (240), 50 (5)")
    assert line(REAL6).endswith("  AAAA 240, ANY 5; hop limit 64 (240), 50 (5)")
    assert line(WANDERER).endswith("; TTL 58 (1), 59 (1), 60 (1), 61 (1), 62 (1) and 2 more")
    for source in (f"{REAL4}/32", f"{REAL6}/128"):
        ban = line("ban", source)
        assert ban.endswith("; hop values changed: usual 64, flood 50"), ban
        assert f"; {acted[source, 'any-queries']['scope']['text']}" in ban
    for source in (HONEST, NEWCOMER):
        assert "hop values" not in line("ban", f"{source}/32")


def test_hop_values_of_a_flood_of_all_queries(tmp_path: Path) -> None:
    # A forged A flood with the real client's address: the rule counts every packet, so
    # the flood's hop values are those of all of the source's packets in the window.
    cfg = tmp_path / "floodd.yaml"
    cfg.write_text("rules:\n"
                   "  - {name: flood, threshold: 200, window: 10}\n"
                   "  - {name: net, aggregate: prefix, prefix_v4: 24, threshold: 300, "
                   "window: 10}\n")
    path = capture(tmp_path / "flood.pcap", queries(REAL4, "A", 64, every(5, 0, 60)),
                   queries(REAL4, "A", 50, every(50, 40, 50)))
    report = analyze_json(Path(path), "-c", str(cfg))
    acted = {b["rule"]: b for b in report["would_ban"]}
    assert acted["flood"]["source"] == f"{REAL4}/32"
    assert acted["flood"]["hops"] == {"usual": [64], "flood": [50, 64], "changed": True}
    assert 40 < acted["flood"]["after"] < 46
    assert acted["net"]["source"] == "203.0.113.0/24"
    assert acted["net"]["hops"] is None  # hop values are a source's, not a prefix's
    text = format_report(analyze_file(path, build_config({"rules": [
        {"name": "flood", "threshold": 200, "window": 10}]}), top=10))
    assert "rule flood: " in text and "; hop values changed: usual 64, flood 50/64" in text


def test_source_hops_times_and_bound() -> None:
    hops = SourceHops(capacity=100, qtypes=[255])
    real, forged = bytes([203, 0, 113, 10]), bytes([198, 18, 0, 0])

    def rec(ts: float, src: bytes, qtype: int, hop: int, flags: int = 0) -> Any:
        return (ts, src, UDP, qtype, flags, hop)
    # Bucket 0 (times 0 and 0.5) and bucket 30; an F_EXTRA record is a further query of
    # a packet already counted: its qtype counts, not a packet.
    hops.add([rec(0.0, real, 1, 64), rec(0.5, real, 1, 64)])
    hops.add([rec(30.0, real, 1, 63), rec(30.0, real, 255, 63, F_EXTRA)])
    assert hops.top(1) == [(real, 3, {64: 2, 63: 1})]
    # first seen at 0 (64) and 30 (63); ANY last seen at 30, with 63
    assert hops.flood(real, 40.0, 10.0, None) == {"usual": [63, 64], "flood": [],
                                                  "changed": False}
    assert hops.flood(real, 40.0, 20.0, None) == {"usual": [64], "flood": [63],
                                                  "changed": True}
    assert hops.flood(real, 40.0, 20.0, 255) == {"usual": [64], "flood": [63],
                                                 "changed": True}
    assert hops.flood(real, 40.0, 50.0, 255) == {"usual": [], "flood": [63],
                                                 "changed": False}
    # 10,000 forged (source, hop value) pairs, one packet each, among the real client's
    # steady traffic: the times held stay bounded, the real client's are kept.
    for second in range(100):
        part = [rec(100.0 + second, forged[:2] + bytes([i >> 8, i & 0xFF]), 255, second, 0)
                for i in range(100)]
        hops.add(part + [rec(100.5 + second, real, 1, 64)] * 5)
        assert len(hops.first) <= 200 and len(hops.last) <= 200
        assert len(hops.last_of[255]) <= 200
    # (its one packet with 63 counted no more than a forged pair: it went with them)
    assert hops.flood(real, 300.0, 100.0, None)["usual"] == [64]
    assert hops.top(1)[0][:2] == (real, 502)  # its packets with 64
    # Every pair with a first time is indexed under its source, and only those.
    assert {src + bytes((hop,)) for src, values in hops.values.items()
            for hop in values} == set(hops.first)


def test_batches_of_columns_are_cut_on_the_same_edges() -> None:
    src = bytes([198, 51, 100, 7])
    records = [(ts, src, 17, 1, 0, 64) for ts in (10.0, 10.5, 12.2, 15.9, 15.95)]
    parts = by_bucket(Records.of(records), 1.0)
    assert all(isinstance(part, Records) for part in parts)
    assert parts == by_bucket(records, 1.0) == [records[:2], records[2:3], records[3:]]
