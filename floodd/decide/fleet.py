"""The fleet's side of the policy (pure): what floodd tells a CrowdSec Local API (LAPI)
about its own bans, and which of the LAPI's decisions it enforces.

CrowdSec's model: *machines* push alerts, each with decisions (``ban`` a value of scope
``Ip`` or ``Range`` for a duration); *bouncers* read the stream of decisions.  floodd is
both: it pushes the bans its rules make and enforces the decisions of the fleet (its
peers, the CrowdSec agents, the operators' ``cscli``, and the community blocklists if
configured) in its own kernel sets, through the same ban owner as its own bans.

What a pushed decision says (the stream carries only id, origin, scenario, scope, value,
type and duration, not who pushed it):

- origin ``floodd``; scenario ``floodd/<rule> scope=<scope>``, the scope in the form of
  the kernel comments (floodd.scope): ``udp``, ``udp,qtype=255``, ``all``;
- a ban narrowed to unusual TTL/hop limits (the flood looked forged) is never pushed: the
  usual values are this server's path to the source, not a peer's, and a forged flood at
  one node must not get the real source banned at the others.

What a fleet ban drops: the scope its floodd decision names (a floodd decision without a
readable scope: UDP only, what floodd's UDP evidence proves); any other decision (CrowdSec
scenarios read logs of completed connections) the whole source.  So a forged-source flood
at node A makes node B drop at most what A drops itself (UDP queries, or one query type),
for A's ban time, and never TCP.

Safety: a fleet decision is enforced only if its origin and scope are configured, its type
is ``ban``, its range no wider than /16 (IPv4) or /32 (IPv6), the network not protected
(whitelist, this host's addresses, loopback: floodd.decide.safety), and fewer than
``crowdsec.max_bans`` fleet bans are in place (the rest of ``firewall.max_bans`` stays
floodd's own).  A fleet ban shows rule ``fleet/<scenario>`` in the kernel, so a restarted
floodd adopts it as a fleet ban.

Times: decisions' remaining durations come as Go duration strings (``"9m59.72s"``);
deadlines here are on the monotonic clock of the caller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from floodd.config import CrowdsecConfig, Network
from floodd.decide.policy import covered
from floodd.scope import UDP_ONLY, WHOLE, Scope, Target

ORIGIN = "floodd"  # the origin of the decisions floodd pushes
SCENARIO_PREFIX = "floodd/"
FLEET_PREFIX = "fleet/"  # the rule of a fleet ban: fleet/<scenario>
FLEET = "fleet"  # the rule label of fleet bans in the metrics
_SCOPE_SUFFIX = " scope="
# The widest ranges a fleet decision may ban.
MIN_PREFIX = {4: 16, 6: 32}
# A fleet ban already in the kernel is re-made with a later end only when the fleet's
# decision ends this much later (a LAPI rounds, the kernel keeps whole seconds).
EXTEND_SLACK = 5.0

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
             "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_MAX_TEXT = 64


def parse_go_duration(text: str) -> float:
    """Seconds from a Go ``time.Duration`` string: ``"9m59.72s"``, ``"-4.7ms"``,
    ``"1h0m0s"``, ``"0s"``; negative for a decision already over.  ValueError otherwise."""
    if not isinstance(text, str) or not 0 < len(text) <= _GO_MAX_TEXT:
        raise ValueError(text)
    body = text
    sign = 1.0
    if body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    total = 0.0
    pos = 0
    while pos < len(body):
        m = _GO_PART.match(body, pos)
        if m is None:
            raise ValueError(text)
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or not math.isfinite(total):
        raise ValueError(text)
    return sign * total


# --- what travels between the daemon and the fleet link (plain data) ----------------
@dataclass(frozen=True)
class Decision:
    """One decision of the LAPI's stream, checked (see floodd.service.fleet)."""

    id: int
    origin: str
    scenario: str
    scope: str  # "Ip" or "Range" (other scopes never get this far)
    network: Network  # a /32 or /128 for scope Ip
    type: str  # "ban", "captcha", ...
    seconds: float  # left when the reply arrived (negative: over)


@dataclass(frozen=True)
class FleetUpdate:
    """One reply of the decision stream: ``startup`` replies hold every active decision."""

    at: float  # monotonic time the reply arrived
    startup: bool
    new: tuple[Decision, ...]
    deleted: tuple[int, ...]  # decision ids


@dataclass(frozen=True)
class PushBan:
    """A ban floodd made, to push as an alert with its decision."""

    network: Network
    scope: Scope
    rule: str
    seconds: float  # the ban's remaining time
    message: str  # what triggered it, for people (cscli alerts list)

    @property
    def target(self) -> Target:
        return Target(self.network, self.scope)


@dataclass(frozen=True)
class Withdraw:
    """A ban floodd pushed is over (unbanned, expired, replaced): delete its decisions."""

    target: Target


@dataclass(frozen=True)
class Claim:
    """Decisions found in the LAPI at startup that this node pushed before a restart: its
    own, deleted when its ban ends."""

    target: Target
    ids: tuple[int, ...]


Message = PushBan | Withdraw | Claim


# --- push ------------------------------------------------------------------------------
def scenario(rule: str, scope: Scope) -> str:
    return f"{SCENARIO_PREFIX}{rule}{_SCOPE_SUFFIX}{scope.text()}"


def pushable(rule: str, scope: Scope) -> bool:
    """Whether a ban of floodd's is told to the fleet: not one learned from the fleet, and
    not one narrowed to unusual TTL/hop limits (see the module docstring)."""
    return not is_fleet_rule(rule) and not scope.except_hops


def push_ban(network: Network, scope: Scope, rule: str, seconds: float,
             why: str) -> PushBan | None:
    """The push for a ban floodd made (``why``: its evidence), or None when it stays local."""
    if not pushable(rule, scope):
        return None
    return PushBan(network, scope, rule, seconds,
                   f"floodd banned {network} ({scope.describe()}) for {seconds:.0f} s: "
                   f"rule {rule}, {why}")


# --- pull ------------------------------------------------------------------------------
def is_fleet_rule(rule: str) -> bool:
    return rule.startswith(FLEET_PREFIX)


def decision_scope(decision_scenario: str, origin: str) -> Scope:
    """What a fleet ban of this decision drops (see the module docstring)."""
    if not decision_scenario.startswith(SCENARIO_PREFIX) and origin != ORIGIN:
        return WHOLE
    _, sep, text = decision_scenario.rpartition(_SCOPE_SUFFIX)
    if sep:
        try:
            scope = Scope.parse(text)
        except ValueError:
            return UDP_ONLY
        return scope if not scope.except_hops else UDP_ONLY
    return UDP_ONLY


def fleet_rule(decision_scenario: str) -> str:
    """The rule a fleet ban shows in the kernel: ``fleet/<scenario>`` without its scope."""
    name, sep, _ = decision_scenario.rpartition(_SCOPE_SUFFIX)
    return FLEET_PREFIX + (name if sep else decision_scenario)


def floodd_rule(decision_scenario: str) -> str | None:
    """The floodd rule a floodd decision names, else None."""
    if not decision_scenario.startswith(SCENARIO_PREFIX):
        return None
    name, sep, _ = decision_scenario.rpartition(_SCOPE_SUFFIX)
    return (name if sep else decision_scenario)[len(SCENARIO_PREFIX):]


def rejection(decision: Decision, config: CrowdsecConfig) -> str | None:
    """Why the configuration does not enforce ``decision`` (None: it is a candidate)."""
    if decision.origin.lower() not in config.origins:
        return f"origin {decision.origin} is not enforced"
    if decision.scope.lower() not in config.scopes:
        return f"scope {decision.scope} is not enforced"
    if decision.type != "ban":
        return f"type {decision.type} is not a ban"
    widest = MIN_PREFIX[decision.network.version]
    if decision.network.prefixlen < widest:
        return f"range wider than /{widest}"
    return None


def own_claims(update: FleetUpdate, own: Mapping[Target, str]) -> list[Claim]:
    """In a startup reply: the floodd decisions that name a ban this node holds of its own
    (``own``: target -> rule), with the same rule and scope: pushed before a restart."""
    found: dict[Target, list[int]] = {}
    for d in update.new:
        rule = floodd_rule(d.scenario)
        target = Target(d.network, decision_scope(d.scenario, d.origin))
        if rule is not None and own.get(target) == rule:
            found.setdefault(target, []).append(d.id)
    return [Claim(target, tuple(ids)) for target, ids in found.items()]


@dataclass(frozen=True)
class FleetBan:
    """A fleet ban to make (or re-make with a later end)."""

    network: Network
    scope: Scope
    rule: str
    seconds: float

    @property
    def target(self) -> Target:
        return Target(self.network, self.scope)


@dataclass(frozen=True)
class FleetRefusal:
    network: Network
    rule: str
    reason: str


@dataclass(frozen=True)
class FleetPlan:
    bans: tuple[FleetBan, ...]
    unbans: tuple[Target, ...]  # fleet bans no decision asks for any more
    refused: tuple[FleetRefusal, ...]


@dataclass
class _Entry:
    target: Target
    rule: str
    deadline: float  # monotonic


class FleetBook:
    """The fleet decisions floodd enforces, by decision id, each with its target and end.

    Fed the stream's replies (:meth:`apply`); :meth:`plan` compares them with the bans in
    the kernel.  A ``deleted`` id may come again in later replies: removing is idempotent.
    An operator's unban dismisses the decisions behind it (:meth:`dismiss`): they are not
    enforced again.  Until the first startup reply (``synced``), fleet bans found in the
    kernel are kept; from then on, one no decision asks for is removed.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._dismissed: dict[int, float] = {}  # id -> when it would have ended
        self.synced = False

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, update: FleetUpdate, config: CrowdsecConfig,
              own: Iterable[int] = ()) -> int:
        """Take in a reply (``own``: ids to leave out, this node's); the number of
        decisions the configuration does not enforce."""
        skip = set(own)
        if update.startup:
            self._entries.clear()
            self.synced = True
        for key in update.deleted:
            self._entries.pop(key, None)
        filtered = 0
        for d in update.new:
            if d.id in skip or d.id in self._dismissed:
                continue
            if rejection(d, config) is not None:
                filtered += 1
                continue
            self._entries[d.id] = _Entry(
                Target(d.network, decision_scope(d.scenario, d.origin)),
                fleet_rule(d.scenario), update.at + d.seconds)
        return filtered

    def dismiss(self, networks: Iterable[Network] | None) -> None:
        """The operator unbanned ``networks`` (None: everything): forget their decisions."""
        wanted = None if networks is None else set(networks)
        for key, entry in list(self._entries.items()):
            if wanted is None or entry.target.network in wanted:
                self._dismissed[key] = entry.deadline
                del self._entries[key]

    def plan(self, now: float, banned: Mapping[Target, tuple[str, float]],
             protected: Callable[[Network], str | None], max_fleet: int,
             room: int) -> FleetPlan:
        """What to ban and unban so that the kernel enforces the decisions.

        ``banned``: every ban in the kernel, target -> (rule, deadline); ``room``: how many
        more bans firewall.max_bans allows.  Invariants: a protected network is never
        banned; a target another ban covers is not banned again (floodd's own ban of it
        stays as it is); fleet bans never exceed ``max_fleet`` nor ``room``; a fleet ban
        lasts as long as the longest decision for it."""
        for key, entry in list(self._entries.items()):
            if entry.deadline <= now:
                del self._entries[key]
        for key, deadline in list(self._dismissed.items()):
            if deadline <= now:
                del self._dismissed[key]
        wanted: dict[Target, _Entry] = {}
        for entry in self._entries.values():
            best = wanted.get(entry.target)
            if best is None or entry.deadline > best.deadline:
                wanted[entry.target] = entry
        current: dict[Network, list[Scope]] = {}
        for net, scope in banned:
            current.setdefault(net, []).append(scope)
        prefixes = [n for n in current if n.prefixlen < n.max_prefixlen]
        fleet = sum(1 for rule, _ in banned.values() if is_fleet_rule(rule))
        bans: list[FleetBan] = []
        refused: list[FleetRefusal] = []
        for target, entry in sorted(wanted.items(), key=lambda kv: -kv[1].deadline):
            held = banned.get(target)
            if held is not None:
                rule, deadline = held
                if is_fleet_rule(rule) and entry.deadline > deadline + EXTEND_SLACK:
                    bans.append(FleetBan(*target, entry.rule, entry.deadline - now))
                continue
            if covered(target, current, prefixes):
                continue
            reason = protected(target.network)
            if reason is None and (fleet >= max_fleet or room <= 0):
                reason = f"max_bans ({max_fleet} fleet bans) reached" if fleet >= max_fleet \
                    else "max_bans reached"
            if reason is not None:
                refused.append(FleetRefusal(target.network, entry.rule, reason))
                continue
            bans.append(FleetBan(*target, entry.rule, entry.deadline - now))
            current.setdefault(target.network, []).append(target.scope)
            if target.network.prefixlen < target.network.max_prefixlen:
                prefixes.append(target.network)
            fleet += 1
            room -= 1
        unbans = tuple(t for t, (rule, _) in banned.items()
                       if self.synced and is_fleet_rule(rule) and t not in wanted)
        return FleetPlan(tuple(bans), unbans, tuple(refused))
