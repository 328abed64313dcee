"""The one place where floodd's YAML configuration is loaded, defaulted and validated.

Every other module receives the frozen dataclasses defined here and never reads
YAML itself.  Every rejected value raises :class:`ConfigError` naming the file,
the key path (``rules[1].threshold``) and what was expected.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, TypeVar

import yaml

from floodd.errors import ConfigError
from floodd.qtypes import qtype_code, qtype_name

DEFAULT_PATH = "/etc/floodd/floodd.yaml"
BUILTIN = "built-in defaults"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A rule's "match": every query, malformed packets only, or one query type.
MATCH_ALL = "all"
MATCH_MALFORMED = "malformed"

MAX_DURATION = 365 * 86400.0  # seconds: no duration floodd takes is longer than a year
# Units of a duration, largest first: in "1h30m" each unit follows every larger one.
MAX_EXCLUDED = 256  # banned targets the capture filter can leave out (BPF: 4096 instructions)
MAX_SAMPLING = 1024  # the sparsest kernel sample: 1 packet in this many

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_UNIT_RANK = {unit: rank for rank, unit in enumerate(_UNITS)}
_MAX_DURATION_TEXT = 64  # characters; nothing sensible is longer


def parse_duration(value: object) -> float:
    """Seconds from a number (``30``, ``2.5``) or a text duration, > 0 and finite.

    Text: a bare number of seconds (``"30"``, ``"2.5"``), or numbers each followed
    by a unit, largest unit first, each unit at most once, nothing between them:
    ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"1d12h"``, ``"1.5h"``.  Spaces
    around the whole are ignored, spaces inside are not allowed.  One pass over
    the characters (linear time).  Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= _MAX_DURATION_TEXT:
        seconds = _duration_text(value.strip())
    else:
        raise ValueError(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(value)
    return seconds


def _duration_text(text: str) -> float:
    total = 0.0
    rank = -1  # the rank of the last unit read; units must come in rising rank
    i, n = 0, len(text)
    if n == 0:
        raise ValueError(text)
    while i < n:
        start = i
        while i < n and text[i].isascii() and text[i].isdigit():
            i += 1
        if i < n and text[i] == "." and i > start:
            i += 1
            fraction = i
            while i < n and text[i].isascii() and text[i].isdigit():
                i += 1
            if i == fraction:
                raise ValueError(text)
        if i == start:
            raise ValueError(text)
        number = float(text[start:i])
        if i == n:
            if rank >= 0:  # "1h30": a bare number only on its own
                raise ValueError(text)
            return number
        unit = text[i]
        if _UNIT_RANK.get(unit, -1) <= rank:
            raise ValueError(text)
        rank = _UNIT_RANK[unit]
        total += number * _UNITS[unit]
        i += 1
    return total


def parse_network(value: str) -> Network:
    """An address or CIDR prefix (``192.0.2.7``, ``198.51.100.0/24``, ``2001:db8::/32``).

    Host bits must be zero: ``192.0.2.7/24`` is refused as a likely typo.
    """
    return ipaddress.ip_network(value.strip(), strict=True)


@dataclass(frozen=True)
class CaptureConfig:
    interfaces: tuple[str, ...] = ("any",)
    ports: tuple[int, ...] = (53,)
    protocols: tuple[str, ...] = ("udp", "tcp")
    bpf_filter: str = ""
    snaplen: int = 512
    buffer_size_mb: int = 32
    batch_size: int = 1024
    # The busiest banned sources whose packets the kernel filter keeps from floodd (their
    # drops are read from the ban counters); 0 (the default for now: see the README):
    # every packet reaches floodd.
    exclude_banned: int = 64
    # At most 1 in this many packets counted when floodd cannot count them all (a power of
    # two; 1: never sample, the kernel drops what floodd cannot read).
    max_sampling: int = 64


@dataclass(frozen=True)
class RateTableConfig:
    window: float = 60.0
    bucket: float = 1.0
    capacity: int = 100_000


@dataclass(frozen=True)
class Rule:
    name: str
    match: str = MATCH_ALL
    aggregate: str = "source"
    prefix_v4: int = 24
    prefix_v6: int = 64
    threshold: int = 5000
    window: float = 10.0
    ban_time: float = 600.0
    action: str = "ban"
    # Rotating-source guard: the rule only applies while the total count of
    # matching packets from all sources in the window is above this.
    total_threshold: int | None = None

    @property
    def qtype(self) -> int | None:
        """The query type this rule counts, or None for ``all``/``malformed``."""
        if self.match in (MATCH_ALL, MATCH_MALFORMED):
            return None
        return qtype_code(self.match)


@dataclass(frozen=True)
class FirewallConfig:
    backend: str = "auto"
    dry_run: bool = False
    scope: str = "dns"
    max_bans: int = 10_000
    rescan_interval: float = 60.0
    stale_after: float = 300.0
    extend_active: bool = True
    escalation_factor: float = 2.0
    max_ban_time: float = 86_400.0
    on_exit: str = "keep"


@dataclass(frozen=True)
class FastDropConfig:
    """The kernel's own first response (floodd.enforce.firewall.fastdrop: an nftables
    table, beside either backend): a source and hop value sending over ``factor`` times a
    per-source rule's rate is dropped by a kernel meter at once, its UDP queries only,
    until ``hold`` seconds after it stops running over; floodd's own ban follows."""

    factor: float = 2.0  # 0: off; else at least 1 (the kernel never drops what no rule bans)
    hold: float = 10.0
    max_sources: int = 10_000  # (source, hop value) pairs dropped at once, at most
    meter_size: int = 65_536  # pairs metered at once, per rule and IP version

    @property
    def enabled(self) -> bool:
        return self.factor > 0


@dataclass(frozen=True)
class TrustConfig:
    """How far floodd believes a packet's source address (UDP sources can be forged)."""

    # Learn each source's usual TTL / hop limit; when a flood arrives with other values,
    # ban only the traffic with other values.
    hop_check: bool = True
    # Sources (and prefixes) whose hop values are remembered, per key kind.
    hop_capacity: int = 100_000
    # A hop value seen this long before a flood is usual; a flood starting now cannot
    # teach its own (at least the longest rule window).
    hop_learn_after: float = 60.0
    # What a ban decided on UDP evidence drops: udp, or all the protocols capture watches.
    udp_evidence_bans: str = "udp"
    # Fewest packets a rule that bans all of a source's queries (match all / malformed)
    # may ban on.
    min_whole_evidence: int = 100


@dataclass(frozen=True)
class DaemonConfig:
    tick: float = 1.0
    # Least time between two decisions woken by a key crossing a ban threshold (between
    # ticks); bounds the decision's cost under a flood of new sources.
    react_delay: float = 0.005
    summary_interval: float = 60.0
    log_level: str = "info"
    control_socket: str = "/run/floodd/control.sock"
    state_dir: str = "/var/lib/floodd"


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT of the Prometheus endpoint (/metrics), or None: no endpoint.  HOST is an
    # IP address (IPv6 in brackets), never a name: floodd does not resolve.
    listen: str | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port), IPv6 without its brackets."""
        if self.listen is None:
            return None
        host, port = _listen_address(self.listen)
        return host, port


UPSTREAM_ACTIONS = ("discard", "rate-limit")


@dataclass(frozen=True)
class UpstreamConfig:
    """Drops pushed upstream over BGP by ``floodd exabgp`` (ExaBGP's API process) when the
    inbound traffic nears the link's capacity; the daemon itself never reads this."""

    enabled: bool = False
    link_capacity: int = 0  # bits/s the link carries inbound; required when enabled
    packet_capacity: int = 0  # packets/s the link (or the host) takes; 0: not watched
    trigger: float = 0.8  # the fraction of a capacity that is a flood
    sustain: float = 3.0  # seconds over the trigger before announcing
    hold: float = 600.0  # seconds under the trigger (or without floodd) before withdrawing
    poll_interval: float = 1.0
    max_routes: int = 100  # FlowSpec routes announced at most
    action: str = "discard"
    rate: int = 0  # bits/s a source may keep with action rate-limit
    # The FlowSpec destinations; empty: this host's own addresses (loopback and link-local
    # left out).
    destinations: tuple[Network, ...] = ()
    blackhole: bool = False  # announce blackhole_address with community 65535:666 (RFC 7999)
    blackhole_address: Network | None = None
    blackhole_after: float = 30.0  # seconds still over the trigger after the FlowSpec rules
    dry_run: bool = False  # log what would be announced, announce nothing


# Decision origins a fleet member enforces unless told otherwise: floodd's own pushes, the
# CrowdSec agents' and the operators' (cscli).  CrowdSec's community blocklists (CAPI,
# lists) only when configured.
CROWDSEC_ORIGINS = ("floodd", "crowdsec", "cscli")
CROWDSEC_SCOPES = ("ip", "range")


@dataclass(frozen=True)
class CrowdsecConfig:
    """The fleet link: a CrowdSec Local API (LAPI) as the decision store shared by several
    nameservers.  Off without ``url``."""

    url: str | None = None  # http(s)://HOST:PORT of the LAPI, without /v1
    machine_id: str = ""  # push: this node's machine (cscli machines add)
    password: str = field(default="", repr=False)  # the machine's password (a secret)
    password_file: str | None = None  # where it was read from, if from a file
    api_key: str = field(default="", repr=False)  # pull: this node's bouncer key (a secret)
    api_key_file: str | None = None
    push: bool = True  # send floodd's own bans to the LAPI
    pull: bool = True  # enforce the LAPI's decisions
    pull_interval: float = 10.0
    origins: tuple[str, ...] = CROWDSEC_ORIGINS  # lower case
    scopes: tuple[str, ...] = CROWDSEC_SCOPES  # lower case: ip, range
    max_bans: int = 5_000  # fleet bans at most (the rest of firewall.max_bans is floodd's)

    @property
    def enabled(self) -> bool:
        return self.url is not None and (self.push or self.pull)


DEFAULT_WHITELIST = ("127.0.0.0/8", "::1/128")

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"name": "query-flood", "match": "all", "aggregate": "source", "threshold": 5000,
     "window": 10, "ban_time": 600, "action": "ban"},
    {"name": "any-queries", "match": "ANY", "aggregate": "source", "threshold": 4,
     "window": 60, "ban_time": 600, "action": "ban"},
    {"name": "prefix-flood", "match": "all", "aggregate": "prefix", "prefix_v4": 24,
     "prefix_v6": 64, "threshold": 20000, "window": 10, "ban_time": 600, "action": "ban"},
    {"name": "rotating-any", "match": "ANY", "aggregate": "source", "threshold": 1,
     "window": 10, "ban_time": 600, "action": "ban", "total_threshold": 1000},
)


@dataclass(frozen=True)
class Config:
    source: str = BUILTIN
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    rate_table: RateTableConfig = field(default_factory=RateTableConfig)
    whitelist: tuple[Network, ...] = ()
    rules: tuple[Rule, ...] = ()
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    fast_drop: FastDropConfig = field(default_factory=FastDropConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    crowdsec: CrowdsecConfig = field(default_factory=CrowdsecConfig)

    def settings(self) -> dict[str, Any]:
        """Everything but ``source``, as plain data (for comparison and display)."""
        out = as_plain(self)
        assert isinstance(out, dict)
        out.pop("source")
        return out


def as_plain(value: Any) -> Any:
    """Dataclasses, tuples and networks turned into dicts, lists and strings."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: as_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [as_plain(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


T = TypeVar("T")


class _Section:
    """Typed reads from one mapping of the YAML, remembering the key path for errors."""

    def __init__(self, source: str, path: str, data: object) -> None:
        self.source = source
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, path or "(top level)",
                              f"expected a mapping of keys, got {_show(data)}")
        self.data: dict[Any, Any] = data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(self.source, self.key_path(key), f"expected {expected}, got {_show(value)}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(self.source, self.key_path(str(key)),
                                  f"unknown key (known keys here: {known})")

    def get(self, key: str, default: T, convert: Callable[[object], T], expected: str) -> T:
        if key not in self.data:
            return default
        value = self.data[key]
        try:
            return convert(value)
        except (ValueError, TypeError):
            raise self.fail(key, expected, value) from None

    def int(self, key: str, default: int, lo: int = 1, hi: int = 2**31) -> int:
        what = "a positive integer" if lo == 1 and hi == 2**31 else f"an integer from {lo} to {hi}"

        def conv(v: object) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(v)
            return v
        return self.get(key, default, conv, what)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        def conv(v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(v)
            return float(v)
        return self.get(key, default, conv, f"a number from {lo:g} to {hi:g}")

    def duration(self, key: str, default: float, hi: float = MAX_DURATION) -> float:
        def conv(v: object) -> float:
            seconds = parse_duration(v)
            if seconds > hi:
                raise ValueError(v)
            return seconds
        return self.get(key, default, conv,
                        f"a duration such as 30, '90s', '10m' or '1h' (at most {hi:g} s)")

    def boolean(self, key: str, default: bool) -> bool:
        def conv(v: object) -> bool:
            if not isinstance(v, bool):
                raise ValueError(v)
            return v
        return self.get(key, default, conv, "true or false")

    def string(self, key: str, default: str, allow_empty: bool = False) -> str:
        def conv(v: object) -> str:
            if not isinstance(v, str) or (not allow_empty and not v.strip()):
                raise ValueError(v)
            return v
        return self.get(key, default, conv, "a string" if allow_empty else "a non-empty string")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def conv(v: object) -> str:
            if not isinstance(v, str) or v.lower() not in choices:
                raise ValueError(v)
            return v.lower()
        return self.get(key, default, conv, "one of " + ", ".join(choices))

    def items(self, key: str, default: tuple[T, ...], convert: Callable[[object], T],
              expected: str, allow_empty: bool = False) -> tuple[T, ...]:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected is accepted
        if not isinstance(value, list):
            raise self.fail(key, f"a list of {expected}", value)
        if not value and not allow_empty:
            raise self.fail(key, f"a non-empty list of {expected}", value)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(convert(item))
            except (ValueError, TypeError):
                raise ConfigError(self.source, f"{self.key_path(key)}[{i}]",
                                  f"expected {expected}, got {_show(item)}") from None
        return tuple(out)

    def section(self, key: str) -> _Section:
        return _Section(self.source, self.key_path(key), self.data.get(key))


def _show(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return type(value).__name__ if not value else repr(value)[:60]
    return repr(value)


def _port(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(v)
    return v


def _protocol(v: object) -> str:
    if not isinstance(v, str) or v.lower() not in ("udp", "tcp"):
        raise ValueError(v)
    return v.lower()


def _interface(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", v):
        raise ValueError(v)
    return v


def _network(v: object) -> Network:
    if not isinstance(v, str):
        raise ValueError(v)
    return parse_network(v)


def _listen_address(v: object) -> tuple[str, int]:
    """``127.0.0.1:9466`` or ``[::1]:9466`` -> (host, port); ValueError otherwise."""
    if not isinstance(v, str):
        raise ValueError(v)
    host, sep, port = v.strip().rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(v)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(v)
    elif ipaddress.ip_address(host).version != 4:
        raise ValueError(v)  # an IPv6 address needs its brackets
    return host, int(port)


def _listen(v: object) -> str:
    _listen_address(v)
    assert isinstance(v, str)
    return v.strip()


def _match(v: object) -> str:
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise ValueError(v)
    text = str(v).strip()
    if text.lower() in (MATCH_ALL, MATCH_MALFORMED):
        return text.lower()
    return qtype_name(qtype_code(text))  # canonical spelling: "any" -> "ANY"


_RULE_KEYS = {f.name for f in fields(Rule)}


def _rule(source: str, index: int, data: object, table: RateTableConfig) -> Rule:
    sec = _Section(source, f"rules[{index}]", data)
    sec.check_keys(_RULE_KEYS)
    if "name" not in sec.data:
        raise ConfigError(source, sec.key_path("name"), "every rule needs a name")
    rule = Rule(
        name=sec.string("name", ""),
        match=sec.get("match", MATCH_ALL, _match,
                      "'all', 'malformed' or a query type such as A, AAAA, ANY or TYPE65399"),
        aggregate=sec.choice("aggregate", "source", ("source", "prefix")),
        prefix_v4=sec.int("prefix_v4", 24, 8, 32),
        prefix_v6=sec.int("prefix_v6", 64, 16, 128),
        threshold=sec.int("threshold", 5000),
        window=sec.duration("window", 10.0),
        ban_time=sec.duration("ban_time", 600.0),
        action=sec.choice("action", "ban", ("ban", "warn")),
        total_threshold=sec.get("total_threshold", None, _optional_positive_int,
                                "a positive integer or null"),
    )
    if rule.window > table.window:
        raise ConfigError(source, sec.key_path("window"),
                          f"expected at most rate_table.window ({table.window:g} s), "
                          f"got {rule.window:g}")
    if not _is_multiple(rule.window, table.bucket):
        raise ConfigError(source, sec.key_path("window"),
                          f"expected a multiple of rate_table.bucket ({table.bucket:g} s), "
                          f"got {rule.window:g}")
    if rule.aggregate == "prefix" and rule.match != MATCH_ALL:
        raise ConfigError(source, sec.key_path("match"),
                          f"expected 'all' for a rule with aggregate: prefix, got {rule.match!r}")
    if rule.total_threshold is not None and rule.total_threshold <= rule.threshold:
        raise ConfigError(source, sec.key_path("total_threshold"),
                          f"expected more than threshold ({rule.threshold}), "
                          f"got {rule.total_threshold}")
    return rule


def _optional_positive_int(v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(v)
    return v


def _is_multiple(value: float, step: float) -> bool:
    ratio = value / step
    return abs(ratio - round(ratio)) < 1e-9


_TOP_KEYS = {"capture", "rate_table", "whitelist", "rules", "firewall", "trust", "fast_drop",
             "daemon", "metrics", "upstream", "crowdsec"}


def build_config(data: object, source: str = BUILTIN) -> Config:
    """Validate plain data (as parsed from YAML) into a Config, applying defaults."""
    top = _Section(source, "", data)
    top.check_keys(_TOP_KEYS)

    cap = top.section("capture")
    cap.check_keys({f.name for f in fields(CaptureConfig)})
    d_cap = CaptureConfig()
    capture = CaptureConfig(
        interfaces=cap.items("interfaces", d_cap.interfaces, _interface,
                             "an interface name such as eth0 or any"),
        ports=cap.items("ports", d_cap.ports, _port, "a port number from 1 to 65535"),
        protocols=cap.items("protocols", d_cap.protocols, _protocol, "udp or tcp"),
        bpf_filter=cap.string("bpf_filter", d_cap.bpf_filter, allow_empty=True).strip(),
        snaplen=cap.int("snaplen", d_cap.snaplen, 96, 65535),
        buffer_size_mb=cap.int("buffer_size_mb", d_cap.buffer_size_mb, 1, 4096),
        batch_size=cap.int("batch_size", d_cap.batch_size, 1, 65536),
        exclude_banned=cap.int("exclude_banned", d_cap.exclude_banned, 0, MAX_EXCLUDED),
        max_sampling=cap.int("max_sampling", d_cap.max_sampling, 1, MAX_SAMPLING),
    )
    if capture.max_sampling & (capture.max_sampling - 1):
        raise ConfigError(source, "capture.max_sampling",
                          f"expected a power of two (1, 2, 4 ... {MAX_SAMPLING}), got "
                          f"{capture.max_sampling}")

    rt = top.section("rate_table")
    rt.check_keys({f.name for f in fields(RateTableConfig)})
    d_rt = RateTableConfig()
    rate_table = RateTableConfig(
        window=rt.duration("window", d_rt.window, hi=3600.0),
        bucket=rt.duration("bucket", d_rt.bucket, hi=60.0),
        capacity=rt.int("capacity", d_rt.capacity, 100, 10_000_000),
    )
    if not _is_multiple(rate_table.window, rate_table.bucket):
        raise ConfigError(source, "rate_table.window",
                          f"expected a multiple of rate_table.bucket ({rate_table.bucket:g} s), "
                          f"got {rate_table.window:g}")

    whitelist = top.items("whitelist", tuple(parse_network(n) for n in DEFAULT_WHITELIST),
                          _network, "an address or CIDR prefix such as 192.0.2.0/24",
                          allow_empty=True)

    raw_rules = top.data.get("rules", list(DEFAULT_RULES))
    if not isinstance(raw_rules, list):
        raise top.fail("rules", "a list of rules", raw_rules)
    rules = tuple(_rule(source, i, r, rate_table) for i, r in enumerate(raw_rules))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(source, f"rules[{i}].name",
                              f"expected a unique rule name, got {rule.name!r} again")
        seen.add(rule.name)

    fw = top.section("firewall")
    fw.check_keys({f.name for f in fields(FirewallConfig)})
    d_fw = FirewallConfig()
    firewall = FirewallConfig(
        backend=fw.choice("backend", d_fw.backend, ("auto", "nftables", "iptables", "dry-run")),
        dry_run=fw.boolean("dry_run", d_fw.dry_run),
        scope=fw.choice("scope", d_fw.scope, ("dns", "all")),
        max_bans=fw.int("max_bans", d_fw.max_bans, 1, 1_000_000),
        rescan_interval=fw.duration("rescan_interval", d_fw.rescan_interval, hi=86400.0),
        stale_after=fw.duration("stale_after", d_fw.stale_after),
        extend_active=fw.boolean("extend_active", d_fw.extend_active),
        escalation_factor=fw.number("escalation_factor", d_fw.escalation_factor, 1.0, 100.0),
        max_ban_time=fw.duration("max_ban_time", d_fw.max_ban_time),
        on_exit=fw.choice("on_exit", d_fw.on_exit, ("keep", "flush")),
    )

    tr = top.section("trust")
    tr.check_keys({f.name for f in fields(TrustConfig)})
    d_tr = TrustConfig()
    trust = TrustConfig(
        hop_check=tr.boolean("hop_check", d_tr.hop_check),
        hop_capacity=tr.int("hop_capacity", d_tr.hop_capacity, 100, 10_000_000),
        hop_learn_after=tr.duration("hop_learn_after", d_tr.hop_learn_after, hi=86400.0),
        udp_evidence_bans=tr.choice("udp_evidence_bans", d_tr.udp_evidence_bans,
                                    ("udp", "all")),
        min_whole_evidence=tr.int("min_whole_evidence", d_tr.min_whole_evidence, 1, 2**31),
    )
    longest = max((rule.window for rule in rules), default=0.0)
    if trust.hop_check and trust.hop_learn_after < longest:
        raise ConfigError(source, "trust.hop_learn_after",
                          f"expected at least the longest rule window ({longest:g} s), so "
                          f"that a flood cannot teach its own hop values, got "
                          f"{trust.hop_learn_after:g}")
    for i, rule in enumerate(rules):
        if rule.action == "ban" and rule.qtype is None and \
                rule.threshold < trust.min_whole_evidence:
            raise ConfigError(source, f"rules[{i}].threshold",
                              f"expected at least trust.min_whole_evidence "
                              f"({trust.min_whole_evidence}): a rule with match "
                              f"{rule.match} bans all of a source's queries, which forged "
                              f"packets must not get on a handful of packets; got "
                              f"{rule.threshold}")

    fd = top.section("fast_drop")
    fd.check_keys({f.name for f in fields(FastDropConfig)})
    d_fd = FastDropConfig()
    fast_drop = FastDropConfig(
        factor=fd.number("factor", d_fd.factor, 0.0, 1000.0),
        hold=fd.duration("hold", d_fd.hold, hi=3600.0),
        max_sources=fd.int("max_sources", d_fd.max_sources, 1, 1_000_000),
        meter_size=fd.int("meter_size", d_fd.meter_size, 1024, 16_777_216),
    )
    if 0 < fast_drop.factor < 1:
        raise ConfigError(source, "fast_drop.factor",
                          f"expected 0 (off) or at least 1: below its rule's rate the kernel "
                          f"would drop floods no rule bans, got {fast_drop.factor:g}")
    if fast_drop.hold < 1:
        raise ConfigError(source, "fast_drop.hold",
                          f"expected at least 1 s (the kernel's timeouts are whole seconds), "
                          f"got {fast_drop.hold:g}")

    dm = top.section("daemon")
    dm.check_keys({f.name for f in fields(DaemonConfig)})
    d_dm = DaemonConfig()
    daemon = DaemonConfig(
        tick=dm.duration("tick", d_dm.tick, hi=60.0),
        react_delay=dm.duration("react_delay", d_dm.react_delay, hi=1.0),
        summary_interval=dm.duration("summary_interval", d_dm.summary_interval, hi=86400.0),
        log_level=dm.choice("log_level", d_dm.log_level, ("debug", "info", "warning", "error")),
        control_socket=dm.string("control_socket", d_dm.control_socket),
        state_dir=dm.string("state_dir", d_dm.state_dir),
    )
    # A ban must outlive the rescan that first sees its counter grow, or the kernel's
    # timeout ends it mid-flood before floodd can extend it.
    shortest = 2 * firewall.rescan_interval
    for i, rule in enumerate(rules):
        if rule.action == "ban" and rule.ban_time < shortest:
            raise ConfigError(source, f"rules[{i}].ban_time",
                              f"expected at least twice firewall.rescan_interval "
                              f"({shortest:g} s), got {rule.ban_time:g}")
    mt = top.section("metrics")
    mt.check_keys({f.name for f in fields(MetricsConfig)})
    listen = None
    if mt.data.get("listen") is not None:  # `listen:` left empty is off, as when absent
        listen = mt.get("listen", None, _listen,
                        "HOST:PORT with an IP address, such as 127.0.0.1:9466 or [::1]:9466")
    metrics = MetricsConfig(listen=listen)
    return Config(source=source, capture=capture, rate_table=rate_table, whitelist=whitelist,
                  rules=rules, firewall=firewall, trust=trust, fast_drop=fast_drop,
                  daemon=daemon, metrics=metrics,
                  upstream=_upstream(top.section("upstream")),
                  crowdsec=_crowdsec(top.section("crowdsec"), firewall))


_RATE_UNITS = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_RATE_RE = re.compile(r"(\d{1,15}(?:\.\d{1,6})?)\s?([kKMGT]?)")


def parse_rate(value: object) -> int:
    """A rate (bits or packets per second), > 0: a number, or text with an SI unit
    (``"10G"``, ``"1.5M"``, ``"800k"``: powers of 1000).  Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and (m := _RATE_RE.fullmatch(value.strip())):
        number = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    else:
        raise ValueError(value)
    if not math.isfinite(number) or not 1 <= number <= 1000**5:
        raise ValueError(value)
    return round(number)


def _fraction(v: object) -> float:
    """``0.8`` or ``"80%"``: more than 0, at most 1."""
    if isinstance(v, str) and v.strip().endswith("%"):
        number = float(v.strip()[:-1]) / 100
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        number = float(v)
    else:
        raise ValueError(v)
    if not 0 < number <= 1:
        raise ValueError(v)
    return number


def _host_address(v: object) -> Network:
    if not isinstance(v, str):
        raise ValueError(v)
    return ipaddress.ip_network(ipaddress.ip_address(v.strip()))


def _upstream(up: _Section) -> UpstreamConfig:
    up.check_keys({f.name for f in fields(UpstreamConfig)})
    d = UpstreamConfig()
    bit_rate = "a bit rate such as 10G, 800M or 1M (bits/s)"
    config = UpstreamConfig(
        enabled=up.boolean("enabled", d.enabled),
        link_capacity=up.get("link_capacity", d.link_capacity, parse_rate, bit_rate),
        packet_capacity=up.get("packet_capacity", d.packet_capacity,
                               lambda v: 0 if v == 0 else parse_rate(v),
                               "a packet rate such as 1M or 500k (packets/s), or 0"),
        trigger=up.get("trigger", d.trigger, _fraction,
                       "a fraction of the capacity such as 0.8 or '80%'"),
        sustain=up.duration("sustain", d.sustain, hi=3600.0),
        hold=up.duration("hold", d.hold, hi=86400.0),
        poll_interval=up.duration("poll_interval", d.poll_interval, hi=60.0),
        max_routes=up.int("max_routes", d.max_routes, 1, 10_000),
        action=up.choice("action", d.action, UPSTREAM_ACTIONS),
        rate=up.get("rate", d.rate, parse_rate, bit_rate),
        destinations=up.items("destinations", d.destinations, _network,
                              "an address or CIDR prefix of this server such as 192.0.2.53",
                              allow_empty=True),
        blackhole=up.boolean("blackhole", d.blackhole),
        blackhole_address=up.get("blackhole_address", d.blackhole_address,
                                 lambda v: None if v is None else _host_address(v),
                                 "an IP address such as 192.0.2.53"),
        blackhole_after=up.duration("blackhole_after", d.blackhole_after, hi=3600.0),
        dry_run=up.boolean("dry_run", d.dry_run),
    )
    if config.enabled and not config.link_capacity:
        raise ConfigError(up.source, up.key_path("link_capacity"),
                          f"expected {bit_rate} when upstream.enabled is true, got nothing")
    if config.action == "rate-limit" and not config.rate:
        raise ConfigError(up.source, up.key_path("rate"),
                          f"expected {bit_rate} with action rate-limit, got nothing")
    if config.blackhole and config.blackhole_address is None:
        raise ConfigError(up.source, up.key_path("blackhole_address"),
                          "expected the IP address to blackhole when upstream.blackhole is "
                          "true, got nothing")
    return config


_SECRET_RE = re.compile(r"[\x21-\x7e]{1,512}")  # one line, printable, no spaces
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


def _lapi_url(v: object) -> str:
    """``http(s)://HOST[:PORT][/PATH]`` without query or fragment, no trailing slash."""
    if not isinstance(v, str):
        raise ValueError(v)
    parts = urllib.parse.urlsplit(v.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or \
            parts.fragment or parts.username or parts.password:
        raise ValueError(v)
    parts.port  # ValueError for a port out of range
    return v.strip().rstrip("/")


def _secret(sec: _Section, key: str, role: str, needed: bool) -> tuple[str, str | None]:
    """The secret ``key`` of ``sec`` given inline or as ``key_file`` (exactly one of
    them when ``needed``), with the file it came from; never shown in an error."""
    file_key = f"{key}_file"
    inline, path = sec.data.get(key), sec.data.get(file_key)
    if inline is not None and path is not None:
        raise ConfigError(sec.source, sec.key_path(key),
                          f"expected {key} or {file_key}, not both")
    if inline is None and path is None:
        if needed:
            raise ConfigError(sec.source, sec.key_path(key),
                              f"expected {key} or {file_key} with {role}: true, got nothing")
        return "", None
    if path is not None:
        if not isinstance(path, str) or not path.strip():
            raise sec.fail(file_key, "a file name", path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(sec.source, sec.key_path(file_key),
                              f"cannot read {path}: {why}") from None
        if not _SECRET_RE.fullmatch(text):
            raise ConfigError(sec.source, sec.key_path(file_key),
                              f"expected {path} to hold one line of printable characters "
                              "without spaces")
        return text, path
    if not isinstance(inline, str) or not _SECRET_RE.fullmatch(inline):
        raise ConfigError(sec.source, sec.key_path(key),
                          "expected one line of printable characters without spaces "
                          "(the value is not shown)")
    return inline, None


def _origin(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v.strip()):
        raise ValueError(v)
    return v.strip().lower()


def _crowdsec(cs: _Section, firewall: FirewallConfig) -> CrowdsecConfig:
    cs.check_keys({f.name for f in fields(CrowdsecConfig)})
    d = CrowdsecConfig()
    url = None
    if cs.data.get("url") is not None:
        url = cs.get("url", None, _lapi_url,
                     "the Local API's URL such as http://192.0.2.10:8080")
    push = cs.boolean("push", d.push)
    pull = cs.boolean("pull", d.pull)
    on = url is not None
    machine_id = cs.get("machine_id", d.machine_id, _machine_name,
                        "a machine name such as ns1 (cscli machines add)")
    if on and push and not machine_id:
        raise ConfigError(cs.source, cs.key_path("machine_id"),
                          "expected this node's machine name with push: true, got nothing")
    password, password_file = _secret(cs, "password", "push", on and push)
    api_key, api_key_file = _secret(cs, "api_key", "pull", on and pull)
    config = CrowdsecConfig(
        url=url, machine_id=machine_id, password=password, password_file=password_file,
        api_key=api_key, api_key_file=api_key_file, push=push, pull=pull,
        pull_interval=cs.duration("pull_interval", d.pull_interval, hi=3600.0),
        origins=cs.items("origins", d.origins, _origin,
                         "a decision origin such as floodd, crowdsec, cscli, CAPI or lists"),
        scopes=cs.items("scopes", d.scopes, lambda v: _choice(v, CROWDSEC_SCOPES),
                        "Ip or Range"),
        max_bans=cs.int("max_bans", min(d.max_bans, max(1, firewall.max_bans // 2)),
                        1, firewall.max_bans),
    )
    return config


def _machine_name(v: object) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise ValueError(v)
    return v


def _choice(v: object, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v.strip().lower() not in choices:
        raise ValueError(v)
    return v.strip().lower()


def _crowdsec_summary(c: CrowdsecConfig) -> str:
    """The fleet link for people: never a secret, only where it comes from."""
    roles = []
    if c.push:
        where = f"password from {c.password_file}" if c.password_file else "password inline"
        roles.append(f"push floodd's bans as machine {c.machine_id} ({where})")
    if c.pull:
        where = f"key from {c.api_key_file}" if c.api_key_file else "key inline"
        roles.append(f"pull decisions every {c.pull_interval:g} s ({where}) from origins "
                     f"{', '.join(c.origins)}, scopes {', '.join(c.scopes)}, at most "
                     f"{c.max_bans} fleet bans")
    return f"Local API {c.url}: " + "; ".join(roles)


def default_config() -> Config:
    return build_config({})


def load_config(path: str | None) -> Config:
    """Load ``path``; ``None`` means the default path, or the built-in defaults if absent."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return default_config()
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, where, f"not valid YAML: {problem}") from None
    return build_config(data, source=path)


def summary(config: Config) -> list[str]:
    """Human-readable lines describing the effective configuration."""
    c = config
    lines = [
        f"config: {c.source}",
        f"capture: interfaces {', '.join(c.capture.interfaces)}; "
        f"{'/'.join(c.capture.protocols)} to port(s) {', '.join(map(str, c.capture.ports))}"
        + (f"; extra filter: {c.capture.bpf_filter}" if c.capture.bpf_filter else "")
        + (f"; the {c.capture.exclude_banned} busiest banned sources kept out of the capture"
           if c.capture.exclude_banned else "; banned sources still captured")
        + (f"; sample down to 1 in {c.capture.max_sampling} packets when overloaded"
           if c.capture.max_sampling > 1 else "; never sample"),
        f"rate table: window {c.rate_table.window:g} s in {c.rate_table.bucket:g} s buckets, "
        f"capacity {c.rate_table.capacity} keys",
        "whitelist: " + (", ".join(str(n) for n in c.whitelist) or "(empty)")
        + " (plus this host's own addresses)",
        f"rules: {len(c.rules)}",
    ]
    for r in c.rules:
        per = "source" if r.aggregate == "source" else f"/{r.prefix_v4} (v4), /{r.prefix_v6} (v6)"
        guard = (f", while all sources together send more than {r.total_threshold}"
                 if r.total_threshold else "")
        what = ("queries" if r.match == MATCH_ALL else r.match + " packets"
                if r.match == MATCH_MALFORMED else r.match + " queries")
        drops = (f"; drop its {r.match} queries over UDP" if r.qtype is not None else "") \
            if r.action == "ban" else ""
        lines.append(f"  {r.name}: {r.action} a {per} sending more than {r.threshold} {what}"
                     f" in {r.window:g} s{guard}{drops}; ban {r.ban_time:g} s")
    f = c.firewall
    t = c.trust
    lines += [
        "trust: " + (f"learn usual TTL/hop limits (after {t.hop_learn_after:g} s, "
                     f"{t.hop_capacity} keys), spare them when a flood comes with others"
                     if t.hop_check else "no TTL/hop-limit check")
        + f"; bans on UDP evidence drop {'UDP only' if t.udp_evidence_bans == 'udp' else 'all'}"
        f"; whole-source rules need {t.min_whole_evidence}+ packets",
        "fast drop: " + (f"the kernel drops at once the UDP queries of a source and TTL "
                         f"sending over {c.fast_drop.factor:g} times a per-source rule's rate, "
                         f"until {c.fast_drop.hold:g} s after; at most "
                         f"{c.fast_drop.max_sources} at once (an nftables table)"
                         if c.fast_drop.enabled else "off"),
        f"firewall: backend {f.backend}{' (dry run)' if f.dry_run else ''}, scope {f.scope}, max {f.max_bans} bans, "
        f"rescan every {f.rescan_interval:g} s, stale after {f.stale_after:g} s, "
        f"escalation x{f.escalation_factor:g} up to {f.max_ban_time:g} s, on exit {f.on_exit}",
        f"daemon: tick {c.daemon.tick:g} s (and {c.daemon.react_delay:g} s after a ban "
        f"threshold is crossed), log level {c.daemon.log_level}, "
        f"control socket {c.daemon.control_socket}, state in {c.daemon.state_dir}",
        "metrics: " + (f"Prometheus endpoint http://{c.metrics.listen}/metrics"
                       if c.metrics.listen else "off"),
        "upstream: " + (_upstream_summary(c.upstream) if c.upstream.enabled else "off"),
        "crowdsec: " + (_crowdsec_summary(c.crowdsec) if c.crowdsec.enabled else "off"),
    ]
    return lines


def _upstream_summary(u: UpstreamConfig) -> str:
    packets = f" or {u.packet_capacity:,} packets/s" if u.packet_capacity else ""
    action = "discard" if u.action == "discard" else f"rate-limit to {u.rate:,} bits/s"
    to = ", ".join(str(n) for n in u.destinations) or "this host's addresses"
    blackhole = (f"; blackhole {u.blackhole_address.network_address} {u.blackhole_after:g} s "
                 "later" if u.blackhole and u.blackhole_address else "")
    return (f"over {u.trigger:.0%} of {u.link_capacity:,} bits/s{packets} for {u.sustain:g} s, "
            f"FlowSpec {action} for up to {u.max_routes} banned sources to {to}{blackhole}; "
            f"withdrawn {u.hold:g} s after; polled every {u.poll_interval:g} s"
            + (" (dry run)" if u.dry_run else ""))
