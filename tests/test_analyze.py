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
from floodd.cli.analyze import analyze_file, by_bucket, format_report
from lab.synth import generate_flood_capture
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
    records = [(ts, src, 17, 1, 0) for ts in (10.0, 10.5, 12.2, 15.9, 15.95)]
    assert [[r[0] for r in part] for part in by_bucket(records, 1.0)] == [
        [10.0, 10.5], [12.2], [15.9, 15.95]]
    assert by_bucket(records[:2], 1.0) == [records[:2]]
    assert [len(part) for part in by_bucket(records, 5.0)] == [3, 2]


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
