"""``floodd analyze FILE --plot OUT.png``: a capture drawn for an incident report.

The upper panel shows queries/s over the capture's own time for the busiest sources (log
scale), each rule's threshold as a rate (threshold / window, labelled with the rule) and
a mark where a rule would have acted: on the source's line when that source is drawn,
otherwise on the rule's threshold line (grey, one mark per step for all the sources not
drawn).  The lower panel shows queries/s by query type, stacked.

What is drawn is plain data (:class:`Timeline`, counted by floodd.cli.analyze in a
second pass over the capture, and :class:`Picture`, built from it by :func:`picture`).
matplotlib is imported by :func:`render` alone: importing it takes about half a second,
which every other command, and analyze without --plot, would pay otherwise (floodd.cli
imports the module of every command).  :func:`render` draws on a Figure of its own and
never touches pyplot's global figures.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from floodd.config import MATCH_ALL, MATCH_MALFORMED, Rule
from floodd.errors import FlooddError

FORMATS = ("png", "svg")  # chosen by the output file's extension
MAX_LINES = 8  # sources drawn at most: more lines would not be told apart
MAX_STEPS = 600  # points per line: a longer capture is drawn in wider steps
SHOWN_QTYPES = 6  # query types drawn by name; the rest are summed as "other"

WIDTH, HEIGHT, DPI = 12.0, 7.5, 100  # inches and dots per inch: 1200 x 750 pixels
_MARKERS = "vXDs^P*ph<>"  # one shape per rule, in the configuration's order
# One colour per source drawn: matplotlib's default ones without its grey, which marks
# where a rule acted on sources not drawn.
_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C9")
_ELSEWHERE = "0.55"


def plot_format(path: str) -> str:
    """The format of ``path`` (its extension), checked before the capture is read."""
    fmt = os.path.splitext(path)[1].lower().removeprefix(".")
    if fmt not in FORMATS:
        raise FlooddError(f"analyze: --plot: expected a file name ending in .png or .svg, "
                          f"got {path!r}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FlooddError(f"analyze: --plot: cannot write {path}: {folder} is not a directory")
    if os.path.isdir(path):
        raise FlooddError(f"analyze: --plot: cannot write {path}: is a directory")
    return fmt


def drawn_sources(busiest: Sequence[str], acted: Sequence[Mapping[str, Any]],
                  rules: Sequence[Rule], lines: int) -> list[str]:
    """The ``lines`` sources to draw: the ``busiest`` (the most packets first), but up to
    half of the lines go to sources a per-source rule acted on that are not among them
    (in the order of ``acted``), in place of the least busy ones no rule acted on."""
    per_source = {rule.name for rule in rules if rule.aggregate == "source"}
    flagged = list(dict.fromkeys(trig["source"].split("/")[0] for trig in acted
                                 if trig["rule"] in per_source))
    drawn = list(busiest[:lines])
    missing = [src for src in flagged if src not in drawn][:lines // 2]
    spare = [src for src in reversed(drawn) if src not in flagged]  # least busy first
    gone = set(spare[:max(0, len(drawn) + len(missing) - lines)])
    return [src for src in drawn if src not in gone] + missing[:lines - len(drawn) + len(gone)]


def plot_step(duration: float, bucket: float) -> float:
    """Seconds per point: the rate table's bucket (what the rules count in), or the
    smallest multiple of it that draws ``duration`` in at most MAX_STEPS points (the
    last packet is in step ``duration // step``)."""
    return bucket * (math.floor(duration / bucket / MAX_STEPS) + 1)


@dataclass(frozen=True)
class Timeline:
    """Counts per step of a capture: step ``i`` holds what arrived from ``start + i *
    step`` to ``start + (i + 1) * step``; every tuple has one count per step."""

    start: float  # the first packet's timestamp (0.0 for a capture without queries)
    step: float
    sources: Mapping[str, tuple[int, ...]]  # address -> packets, in the order drawn
    qtypes: Mapping[str, tuple[int, ...]]  # query type ("malformed" too) -> queries


@dataclass(frozen=True)
class Series:
    label: str
    rates: tuple[float, ...]  # queries/s in each step


@dataclass(frozen=True)
class Threshold:
    rule: str
    action: str  # ban or warn
    aggregate: str  # what the rule counts per: source or prefix
    rate: float  # the rule's threshold / window, in queries/s
    label: str


@dataclass(frozen=True)
class Mark:
    """Where a rule would have acted: ``time`` seconds into the capture, at height
    ``rate``; on the line of ``Picture.sources[source]``, or (``source`` None) on the
    rule's threshold line for ``count`` sources not drawn, or prefixes, in that step."""

    rule: str
    action: str
    time: float
    rate: float
    source: int | None
    count: int = 1


@dataclass(frozen=True)
class Picture:
    title: str
    xlabel: str
    step: float
    sources: tuple[Series, ...]
    thresholds: tuple[Threshold, ...]
    marks: tuple[Mark, ...]
    qtypes: tuple[Series, ...]  # stacked, the most queries first, "other" last


def threshold_label(rule: Rule) -> str:
    """``query-flood: over 5,000 queries in 10 s``: when the rule acts."""
    one, more = {MATCH_ALL: ("query", "queries"),
                 MATCH_MALFORMED: ("malformed packet", "malformed packets")}.get(
        rule.match, (f"{rule.match} query", f"{rule.match} queries"))
    what = one if rule.threshold == 1 else more
    per = f" from a /{rule.prefix_v4} or /{rule.prefix_v6}" if rule.aggregate == "prefix" else ""
    label = f"{rule.name}: over {rule.threshold:,} {what}{per} in {rule.window:g} s"
    if rule.total_threshold is not None:
        label += f" while all sources send {rule.total_threshold:,}"
    return label + (f" ({rule.action})" if rule.action != "ban" else "")


def picture(file: str, packets: int, duration: float, timeline: Timeline,
            rules: Sequence[Rule], acted: Sequence[Mapping[str, Any]]) -> Picture:
    """What to draw for a capture: ``packets`` queries over ``duration`` seconds, counted
    in ``timeline``; ``acted`` are the triggers of analyze's report (``would_ban``:
    source or prefix, rule, action, ``after`` seconds into the capture)."""
    step = timeline.step

    def series(label: str, counts: Sequence[int]) -> Series:
        return Series(f"{label} ({sum(counts):,})", tuple(n / step for n in counts))

    sources = tuple(series(src, counts) for src, counts in timeline.sources.items())
    drawn = {src: i for i, src in enumerate(timeline.sources)}
    per_source = {rule.name for rule in rules if rule.aggregate == "source"}
    thresholds = tuple(Threshold(rule.name, rule.action, rule.aggregate,
                                 rule.threshold / rule.window, threshold_label(rule))
                       for rule in rules)
    limit = {t.rule: t.rate for t in thresholds}
    marks: list[Mark] = []
    hidden: Counter[tuple[str, str, int]] = Counter()  # (rule, action, step) -> sources
    first: dict[tuple[str, str, int], float] = {}
    for trig in acted:
        rule, action, after = trig["rule"], trig["action"], float(trig["after"])
        at = int(after // step)
        i = drawn.get(trig["source"].split("/")[0]) if rule in per_source else None
        if i is not None:
            # The trigger came at the last packet of a bucket: at the end of a step,
            # or (its time rounded up) at the start of the next.
            rates = sources[i].rates
            at = min(at, len(rates) - 1)
            rate = rates[at] or rates[max(0, at - 1)] or limit[rule]
            marks.append(Mark(rule, action, after, rate, i))
        else:
            hidden[rule, action, at] += 1
            first[rule, action, at] = min(after, first.get((rule, action, at), after))
    marks += [Mark(rule, action, first[rule, action, at], limit[rule], None, n)
              for (rule, action, at), n in sorted(hidden.items(), key=lambda kv: kv[0][2])]

    totals = Counter({qtype: sum(counts) for qtype, counts in timeline.qtypes.items()})
    named = [q for q, _ in totals.most_common(SHOWN_QTYPES + 1)]
    if len(totals) > SHOWN_QTYPES + 1:  # with one type over, it is drawn by its name
        named = named[:SHOWN_QTYPES]
    qtypes = [series(q, timeline.qtypes[q]) for q in named]
    rest = [counts for q, counts in timeline.qtypes.items() if q not in named]
    if rest:
        qtypes.append(series("other", [sum(column) for column in zip(*rest)]))

    noun = "packet" if packets == 1 else "packets"
    title = (f"{os.path.basename(file)}: {packets:,} {noun} to the DNS port(s) "
             f"over {duration:.1f} s")
    xlabel = "seconds since the first packet"
    if timeline.sources or timeline.qtypes:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timeline.start))
        xlabel += f" ({started} UTC)"
    return Picture(title, xlabel, step, sources, thresholds, tuple(marks), tuple(qtypes))


def render(pic: Picture, path: str, fmt: str) -> None:
    """Draw ``pic`` into ``path`` as ``fmt`` (one of FORMATS), WIDTH x HEIGHT inches."""
    from matplotlib import colormaps, rc_context
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    fig.suptitle(pic.title)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    steps = max((len(s.rates) for s in (*pic.sources, *pic.qtypes)), default=0)
    edges = [i * pic.step for i in range(steps + 1)]

    heights = [r for s in pic.sources for r in s.rates if r > 0]
    heights += [t.rate for t in pic.thresholds] + [m.rate for m in pic.marks]
    for i, s in enumerate(pic.sources):
        # log scale: a step without packets is a gap, not a drop to zero
        top.stairs([r if r > 0 else math.nan for r in s.rates], edges, baseline=None,
                   color=_COLOURS[i % len(_COLOURS)], linewidth=1.6, label=s.label)
    for n, t in enumerate(sorted(pic.thresholds, key=lambda t: t.rate)):
        top.axhline(t.rate, color="0.3", linewidth=0.9, linestyle="--" if t.action == "ban"
                    else ":")
        # labels alternate sides, so those of nearby thresholds do not overlap
        top.text(0.995 if n % 2 else 0.005, t.rate, t.label, fontsize=8, color="0.2",
                 ha="right" if n % 2 else "left", va="bottom",
                 transform=top.get_yaxis_transform(),
                 bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
    shape = {t.rule: _MARKERS[i % len(_MARKERS)] for i, t in enumerate(pic.thresholds)}
    per = {t.rule: t.aggregate for t in pic.thresholds}
    keys: dict[tuple[str, str, bool], int] = {}  # legend entries: marks of each kind
    for m in pic.marks:
        if m.source is None:
            color, size = _ELSEWHERE, 7
        else:
            color, size = _COLOURS[m.source % len(_COLOURS)], 9
        top.plot([m.time], [m.rate], marker=shape[m.rule], markersize=size, linestyle="none",
                 markeredgecolor="black",
                 markerfacecolor=color if m.action == "ban" else "white", zorder=5)
        kind = (m.rule, m.action, m.source is None)
        keys[kind] = keys.get(kind, 0) + m.count
    handles: list[Any] = top.get_legend_handles_labels()[0]
    order = {rule: i for i, rule in enumerate(shape)}
    for (rule, action, elsewhere), n in sorted(keys.items(),
                                               key=lambda kv: (order[kv[0][0]], kv[0])):
        label, fill = f"{action} by {rule}", "0.85"
        if elsewhere:
            what = {"source": ("source not drawn", "sources not drawn"),
                    "prefix": ("prefix", "prefixes")}[per[rule]][n != 1]
            label, fill = f"{label}: {n:,} {what}", _ELSEWHERE
        handles.append(Line2D([], [], marker=shape[rule], linestyle="none",
                              markeredgecolor="black", label=label,
                              markerfacecolor=fill if action == "ban" else "white"))
    top.set_yscale("log")
    top.set_ylim(min(heights, default=1.0) / 2, max(heights, default=1.0) * 4)
    top.set_ylabel("queries/s per source")
    top.grid(True, axis="y", which="major", alpha=0.3)
    if handles:
        top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=8, frameon=False)
    if not steps:
        top.text(0.5, 0.5, "no queries in this capture", ha="center", va="center",
                 transform=top.transAxes)

    if pic.qtypes:
        palette = colormaps["Set2"]  # not the sources' colours: a type is not a source
        bottom.stackplot(edges, *[[*s.rates, s.rates[-1]] for s in pic.qtypes], step="post",
                         labels=[s.label for s in pic.qtypes],
                         colors=[palette(i % palette.N) for i in range(len(pic.qtypes))])
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      frameon=False, reverse=True)
    bottom.set_xlim(0.0, edges[-1] if steps else 1.0)
    bottom.set_ylim(bottom=0.0)
    bottom.set_ylabel("queries/s by type")
    bottom.set_xlabel(pic.xlabel)
    try:
        # text stays text in an SVG (searchable, selectable), not outlines
        with rc_context({"svg.fonttype": "none"}):
            fig.savefig(path, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    except OSError as exc:
        raise FlooddError(f"analyze: --plot: cannot write {path}: {exc.strerror or exc}") \
            from None
