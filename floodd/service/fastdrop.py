"""The daemon's side of the kernel's fast drop (``fast_drop``, see
floodd.enforce.firewall.fastdrop): sets the meters up, keeps the spared networks current,
reads what the kernel dropped at each rescan, logs and counts it, removes the table on
exit.  Main loop only.

The kernel decides alone, so the record of what it did is what it reports: each pair
(source, hop value) dropped in the last ``hold`` seconds with its counter.  floodd logs a
pair when it first sees it and counts the counters' growth into the metrics; its own ban
of the same source, when the rules make one, follows as for any flood.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Sequence

from floodd.config import Config, Network
from floodd.decide.safety import LOOPBACK
from floodd.enforce.firewall.fastdrop import KernelFastDrop, Meter, meters
from floodd.command import CommandTimeout
from floodd.errors import FlooddError
from floodd.service.journal import EventLog

LOGGED = 10  # new pairs logged one by one per rescan; the rest in one line


@dataclass(frozen=True)
class FastDropCounts:
    """What the snapshot shows of the fast drop."""

    sources: int = 0  # pairs dropped in the last hold seconds
    packets: int = 0  # packets dropped since floodd started (counters' growth)


def spared_networks(config: Config, own: Sequence[Network]) -> tuple[Network, ...]:
    """What the kernel's meters never drop: the whitelist, this host's addresses and
    loopback, the networks floodd never bans."""
    return tuple(dict.fromkeys([*config.whitelist, *own, *LOOPBACK]))


def _describe(meter: Meter) -> str:
    return f"{meter.rule} over {meter.per_second:,.0f} q/s"


class FastDrop:
    """The fast drop while floodd runs; inactive (every call a no-op) when it is off, on
    a backend other than nftables, or in a dry run."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.kernel: KernelFastDrop | None = None
        self.meters: list[Meter] = []
        self._spared: tuple[Network, ...] = ()
        self._ports: tuple[int, ...] = ()
        self._seen: dict[tuple[Network, int], int] = {}  # pair -> its counter last read
        self.counts = FastDropCounts()
        self._failed = False

    @property
    def active(self) -> bool:
        return self.kernel is not None

    def start(self, config: Config, dry_run: bool, own: Sequence[Network]) -> None:
        """Set the table up for ``config`` (replacing one left by an earlier floodd), or
        say why not.  Whatever the bans' backend: the meters are nftables' alone, beside
        iptables too.  FlooddError if nft refuses it."""
        settings = config.fast_drop
        wanted = meters(config)
        have_nft = shutil.which("nft") is not None
        if not wanted:
            if settings.enabled:
                self.log.warning("fast_drop is on but no rule counts every query per "
                                 "source without a guard: nothing for the kernel to meter",
                                 action="fast-drop")
            if have_nft and not dry_run:
                # one left by a floodd that stopped without removing it drops no more
                (self.kernel or KernelFastDrop(settings)).teardown()
            self.kernel = None
            return
        what = ", ".join(_describe(m) for m in wanted)
        if dry_run:
            self.log.info(f"dry run: the kernel would drop at once a source and TTL sending "
                          f"{what}", action="dry-run")
            return
        if not have_nft:
            self.log.notice("fast_drop needs nft (install nftables): off", action="fast-drop")
            return
        self.kernel, self.meters = KernelFastDrop(settings), wanted
        self._ports = config.capture.ports
        self._spared = spared_networks(config, own)
        self._seen = {}
        try:
            self._setup()
        except BaseException:
            self.kernel = None
            raise
        self.log.info(f"fast drop: the kernel drops at once the UDP queries of a source and "
                      f"TTL sending {what} (x{settings.factor:g} the rule's rate), until "
                      f"{settings.hold:g} s after; at most {settings.max_sources} at once",
                      action="fast-drop")

    def _setup(self) -> None:
        assert self.kernel is not None
        self.kernel.setup(self.meters, self._ports, self._spared)

    def follow(self, config: Config, own: Sequence[Network]) -> None:
        """Keep the spared networks those of ``config`` and ``own`` (addresses change)."""
        spared = spared_networks(config, own)
        if self.kernel is None or spared == self._spared:
            return
        try:
            self.kernel.spare(spared)
            self._spared = spared
        except FlooddError as exc:
            self.log.error(f"fast drop: cannot update the spared networks: {exc}",
                           action="fast-drop")

    def rescan(self) -> None:
        """Read the pairs the kernel dropped lately; log the new ones, count the packets.
        Called after the bans' rescan, and not while the firewall does not answer."""
        if self.kernel is None:
            return
        try:
            pairs = self.kernel.dropped()
        except CommandTimeout as exc:  # nft hangs: no repair, which would hang as long
            if not self._failed:
                self.log.warning(f"fast drop: cannot read what the kernel dropped: {exc}",
                                 action="fast-drop")
            self._failed = True
            return
        except FlooddError as exc:
            self._repair(exc)
            return
        self._failed = False
        grown = 0
        new = []
        seen = {}
        for pair in pairs:
            key = (pair.network, pair.hop)
            last = self._seen.get(key)
            if last is None:
                new.append(pair)
            grown += max(0, pair.packets - (last or 0))
            seen[key] = pair.packets
        self._seen = seen
        self.counts = FastDropCounts(len(pairs), self.counts.packets + grown)
        what = " or ".join(_describe(m) for m in self.meters)
        new.sort(key=lambda p: -p.packets)
        for pair in new[:LOGGED]:
            self.log.info(f"fast drop: the kernel dropped {pair.packets} UDP queries from "
                          f"{pair.network.network_address} (TTL/hop limit {pair.hop}): "
                          f"{what}", action="fast-drop", source=pair.network,
                          packets=pair.packets)
        if len(new) > LOGGED:
            self.log.info(f"fast drop: and {len(new) - LOGGED} more sources "
                          f"({sum(p.packets for p in new[LOGGED:])} queries)",
                          action="fast-drop", packets=len(new) - LOGGED)

    def _repair(self, problem: FlooddError) -> None:
        """The table could not be read: set it up again (someone removed it), once per
        failure; if that fails too, say so once until it works again."""
        try:
            self._setup()
        except FlooddError as exc:
            if not self._failed:
                self.log.warning(f"fast drop: cannot read what the kernel dropped "
                                 f"({problem}) nor set its table up again ({exc}); "
                                 "trying again at each rescan",
                                 action="fast-drop")
            self._failed = True
            return
        self._failed = False
        self._seen = {}
        self.log.warning(f"repair: the fast drop's table could not be read ({problem}); "
                         "set up again", action="repair")

    def status(self) -> dict[str, Any] | None:
        """For the status reply: the meters and what the last rescan read."""
        if self.kernel is None:
            return None
        return {"meters": [{"rule": m.rule, "rate": m.per_second, "burst": m.burst}
                           for m in self.meters],
                "sources": self.counts.sources, "packets": self.counts.packets}

    def stop(self) -> None:
        """Remove the table: the meters drop nothing once floodd is gone."""
        kernel, self.kernel = self.kernel, None
        if kernel is None:
            return
        try:
            kernel.teardown()
        except FlooddError as exc:
            self.log.error(f"fast drop: cannot remove its table: {exc}", action="fast-drop")
