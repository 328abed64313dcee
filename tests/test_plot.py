"""``floodd analyze FILE --plot OUT``: the vendored captures and a generated flood drawn
through the command line, and the plain data the pictures are drawn from."""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from floodd.cli.analyze import analyze_file, read_timeline
from floodd.cli.plot import (DPI, HEIGHT, MAX_STEPS, WIDTH, Timeline, drawn_sources, picture,
                             plot_step)
from floodd.config import Rule, build_config
from floodd.qtypes import qtype_name
from lab.synth import FloodCapture, generate_flood_capture
from test_analyze import ALL_PCAPS

FLOODD = str(Path(sys.executable).with_name("floodd"))  # the installed command
SIZE = (round(WIDTH * DPI), round(HEIGHT * DPI))
RULES = ("query-flood", "any-queries", "prefix-flood", "rotating-any")  # the shipped ones


def floodd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLOODD, *args], capture_output=True, text=True, timeout=120)


def quiet(stderr: str) -> bool:
    """Nothing on stderr but matplotlib's notice on its first run on a machine."""
    return all(line.startswith("Matplotlib is building the font cache")
               for line in stderr.splitlines())


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def assert_drawn(path: Path, colours: int, coloured: float) -> None:
    """A PNG of the expected size, not blank: at least ``colours`` distinct colours,
    pixels that are not white (axes, text), and a share ``coloured`` of pixels that are
    not grey either (the sources' lines, the query types' areas)."""
    assert png_size(path) == SIZE
    pixels = imread(str(path))
    assert pixels.shape[:2] == (SIZE[1], SIZE[0])
    rgb = pixels[:, :, :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) >= colours
    assert (rgb < 0.95).any(axis=1).mean() > 0.03
    assert (rgb.max(axis=1) - rgb.min(axis=1) > 0.2).mean() >= coloured


def svg_text(path: Path) -> str:
    return " ".join(ET.parse(path).getroot().itertext())


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> FloodCapture:
    # As in test_analyze: 3 sources send 60% of 6,000 queries/s, over query-flood's 500/s.
    path = tmp_path_factory.mktemp("flood") / "flood.pcap"
    return generate_flood_capture(str(path), packets=60_000, sources=2_000, heavy=3,
                                  heavy_share=0.6, rate=6_000.0, seed=7)


@pytest.mark.parametrize("path", ALL_PCAPS, ids=lambda p: p.name)
def test_vendored_captures_are_drawn(tmp_path: Path, path: Path) -> None:
    out = tmp_path / "capture.png"
    proc = floodd("analyze", str(path), "--plot", str(out))
    assert proc.returncode == 0 and quiet(proc.stderr), proc.stderr
    report = floodd("analyze", str(path)).stdout
    assert proc.stdout == report  # the report as before
    queries = "\n  0 packets to the DNS port(s)" not in report
    assert_drawn(out, colours=100, coloured=0.02 if queries else 0.0)


@pytest.mark.parametrize("path", ALL_PCAPS, ids=lambda p: p.name)
def test_timeline_counts_what_the_report_counts(path: Path) -> None:
    config = build_config({})
    rep = analyze_file(str(path), config, top=100)
    sources = [s["source"] for s in rep.sources]
    timeline = read_timeline(str(path), config, sources, 1.0)
    assert {src: sum(n) for src, n in timeline.sources.items()} == {
        s["source"]: s["packets"] for s in rep.sources}
    qtypes = dict(rep.qtypes, **({"malformed": rep.malformed} if rep.malformed else {}))
    assert {qtype: sum(n) for qtype, n in timeline.qtypes.items()} == qtypes
    steps = {len(n) for n in (*timeline.sources.values(), *timeline.qtypes.values())}
    assert steps == ({int(rep.duration) + 1} if rep.total else set())


def test_flood_as_png_and_svg(tmp_path: Path, flood: FloodCapture) -> None:
    heavy = [str(ipaddress.ip_address(h)) for h in flood.heavy]
    png, svg = tmp_path / "flood.png", tmp_path / "flood.svg"
    proc = floodd("analyze", flood.path, "--json", "--plot", str(png))
    assert proc.returncode == 0 and quiet(proc.stderr), proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads(floodd("analyze", flood.path, "--json").stdout)
    assert_drawn(png, colours=300, coloured=0.1)
    assert png.stat().st_size < 150_000

    proc = floodd("analyze", flood.path, "--plot", str(svg))
    assert proc.returncode == 0 and quiet(proc.stderr), proc.stderr
    assert proc.stdout.startswith(f"capture: {flood.path}\n")
    text = svg_text(svg)
    assert all(rule in text for rule in RULES), text
    assert all(f"{src} (" in text for src in heavy), text  # their lines' legend
    assert "ban by query-flood" in text and "60,000 packets" in text
    assert "query-flood: over 5,000 queries in 10 s" in text


def test_top_limits_the_lines(tmp_path: Path, flood: FloodCapture) -> None:
    svg = tmp_path / "top.svg"
    proc = floodd("analyze", flood.path, "--top", "2", "--plot", str(svg))
    assert proc.returncode == 0, proc.stderr
    # the 3 heavy sources are the busiest: 2 lines, no room for another one
    text = svg_text(svg)
    heavy = [str(ipaddress.ip_address(h)) for h in flood.heavy]
    assert sum(f"{src} (" in text for src in heavy) == 2, text


@pytest.mark.parametrize("name", ["out.jpg", "out", "out.png.txt", "."])
def test_other_formats_are_refused_before_the_capture_is_read(tmp_path: Path,
                                                              name: str) -> None:
    out = tmp_path / name
    proc = floodd("analyze", str(tmp_path / "missing.pcap"), "--plot", str(out))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("floodd: analyze: --plot: expected a file name ending in "
                                  ".png or .svg"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert name == "." or not out.exists()


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "no-such-dir" / "out.png", "is not a directory"),
    (lambda p: (p / "dir.svg").mkdir() or p / "dir.svg", "is a directory"),
    # the write itself fails: a full disk
    (lambda p: (p / "full.png").symlink_to("/dev/full") or p / "full.png",
     "No space left on device"),
])
def test_unwritable_paths_are_one_line_errors(tmp_path: Path, make: Any, message: str) -> None:
    out = make(tmp_path)
    proc = floodd("analyze", str(ALL_PCAPS[0]), "--plot", str(out))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"floodd: analyze: --plot: cannot write {out}: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_matplotlib_is_imported_only_to_draw() -> None:
    # analyze without --plot (bench/bench_analyze.py times the whole process) and every
    # other command import floodd.cli, which imports floodd.cli.plot
    code = "import sys, floodd.cli; print(sorted({'matplotlib', 'numpy'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


def test_help_documents_plot() -> None:
    proc = floodd("analyze", "--help")
    assert proc.returncode == 0
    assert "--plot OUT" in proc.stdout and ".svg" in proc.stdout


# --- the data drawn -----------------------------------------------------------------------
def test_picture_of_plain_data() -> None:
    rules = [Rule("query-flood", threshold=5000, window=10.0),
             Rule("any-queries", match="ANY", threshold=4, window=60.0),
             Rule("prefix-flood", aggregate="prefix", threshold=20000, window=10.0),
             Rule("rotating-any", match="ANY", threshold=1, window=10.0,
                  total_threshold=1000),
             Rule("watch", threshold=100, window=5.0, action="warn")]
    qtypes = {qtype_name(code): (code, 0, 1, 0) for code in (1, 28, 15, 16, 12, 2, 33, 6)}
    timeline = Timeline(
        start=1_700_000_000.0, step=2.0,
        sources={"198.51.100.7": (0, 4000, 6000, 10), "2001:db8::7": (10, 0, 8, 0)},
        qtypes=qtypes)
    acted = [
        {"source": "198.51.100.7/32", "rule": "query-flood", "action": "ban", "after": 5.5},
        {"source": "2001:db8::7/128", "rule": "watch", "action": "warn", "after": 2.0},
        {"source": "198.51.100.0/24", "rule": "prefix-flood", "action": "ban", "after": 6.0},
        {"source": "203.0.113.9/32", "rule": "rotating-any", "action": "ban", "after": 3.5},
        {"source": "203.0.113.8/32", "rule": "rotating-any", "action": "ban", "after": 2.5},
        # a per-source rule never marks a drawn line for a prefix of the same address
        {"source": "198.51.100.7/24", "rule": "prefix-flood", "action": "ban", "after": 7.0},
    ]
    pic = picture("/captures/flood.pcap", 10_034, 7.9, timeline, rules, acted)
    assert pic.title == "flood.pcap: 10,034 packets to the DNS port(s) over 7.9 s"
    assert pic.xlabel == "seconds since the first packet (2023-11-14 22:13:20 UTC)"
    assert [(s.label, s.rates) for s in pic.sources] == [
        ("198.51.100.7 (10,010)", (0.0, 2000.0, 3000.0, 5.0)),
        ("2001:db8::7 (18)", (5.0, 0.0, 4.0, 0.0))]
    assert [(t.rule, t.action, t.aggregate, t.rate) for t in pic.thresholds] == [
        ("query-flood", "ban", "source", 500.0), ("any-queries", "ban", "source", 4 / 60),
        ("prefix-flood", "ban", "prefix", 2000.0), ("rotating-any", "ban", "source", 0.1),
        ("watch", "warn", "source", 20.0)]
    assert [t.label for t in pic.thresholds] == [
        "query-flood: over 5,000 queries in 10 s",
        "any-queries: over 4 ANY queries in 60 s",
        "prefix-flood: over 20,000 queries from a /24 or /64 in 10 s",
        "rotating-any: over 1 ANY query in 10 s while all sources send 1,000",
        "watch: over 100 queries in 5 s (warn)"]
    # On a drawn line: the rate of its step (2: 4..6 s); a trigger at the start of a step
    # without packets (2.0 s, step 1) is the end of the previous one.  Elsewhere: on
    # the threshold line, one mark per rule and step, at the first trigger's time.
    assert [(m.rule, m.action, m.time, m.rate, m.source, m.count) for m in pic.marks] == [
        ("query-flood", "ban", 5.5, 3000.0, 0, 1),
        ("watch", "warn", 2.0, 5.0, 1, 1),
        ("rotating-any", "ban", 2.5, 0.1, None, 2),
        ("prefix-flood", "ban", 6.0, 2000.0, None, 2)]
    # 8 query types (queries: the code + 1): the 6 with the most by name, then "other"
    assert [(s.label, s.rates) for s in pic.qtypes] == [
        ("SRV (34)", (16.5, 0.0, 0.5, 0.0)), ("AAAA (29)", (14.0, 0.0, 0.5, 0.0)),
        ("TXT (17)", (8.0, 0.0, 0.5, 0.0)), ("MX (16)", (7.5, 0.0, 0.5, 0.0)),
        ("PTR (13)", (6.0, 0.0, 0.5, 0.0)), ("SOA (7)", (3.0, 0.0, 0.5, 0.0)),
        ("other (5)", (1.5, 0.0, 1.0, 0.0))]  # A (2) and NS (3)
    seven = Timeline(0.0, 1.0, {}, {k: v for k, v in qtypes.items() if k != "A"})
    assert [s.label for s in picture("x.pcap", 1, 0.0, seven, rules, []).qtypes] == [
        "SRV (34)", "AAAA (29)", "TXT (17)", "MX (16)", "PTR (13)", "SOA (7)", "NS (3)"]


def test_an_empty_capture_is_plain_data_too() -> None:
    pic = picture("empty.pcap", 0, 0.0, Timeline(0.0, 1.0, {}, {}), [], [])
    assert pic.title == "empty.pcap: 0 packets to the DNS port(s) over 0.0 s"
    assert pic.xlabel == "seconds since the first packet"
    assert not (pic.sources or pic.qtypes or pic.thresholds or pic.marks)


def test_sources_a_rule_acted_on_get_up_to_half_the_lines() -> None:
    rules = [Rule("flood"), Rule("net", aggregate="prefix")]
    busiest = [f"198.51.100.{i}" for i in range(1, 11)]

    def acted(*sources: str, rule: str = "flood") -> list[dict[str, Any]]:
        return [{"source": f"{src}/32", "rule": rule} for src in sources]
    assert drawn_sources(busiest, [], rules, 8) == busiest[:8]
    # 198.51.100.9 is drawn instead of the least busy one no rule acted on
    assert drawn_sources(busiest, acted("198.51.100.9", "198.51.100.8"), rules, 8) == \
        busiest[:6] + ["198.51.100.8", "198.51.100.9"]
    many = acted(*[f"203.0.113.{i}" for i in range(10)])
    assert drawn_sources(busiest, many, rules, 8) == busiest[:4] + [
        f"203.0.113.{i}" for i in range(4)]
    assert drawn_sources(busiest[:2], many, rules, 8) == busiest[:2] + [
        f"203.0.113.{i}" for i in range(4)]
    assert drawn_sources(busiest, acted("203.0.113.1", rule="net"), rules, 3) == busiest[:3]
    assert drawn_sources(busiest, acted(*busiest[:3], "203.0.113.1"), rules, 3) == busiest[:3]


def test_steps_keep_the_points_bounded() -> None:
    assert plot_step(0.0, 1.0) == plot_step(10.0, 1.0) == plot_step(599.9, 1.0) == 1.0
    assert plot_step(600.0, 1.0) == 2.0
    assert plot_step(3600.0, 0.5) == 6.5
    for duration in (0.0, 1.5, 599.0, 600.0, 1234.5, 3600.0, 86_400.0):
        for bucket in (0.5, 1.0, 2.0):
            step = plot_step(duration, bucket)
            assert (step / bucket).is_integer() and duration // step + 1 <= MAX_STEPS
