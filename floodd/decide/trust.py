"""Trust stage (pure): how much of a source's traffic a trigger's evidence lets floodd drop.

UDP source addresses can be forged; the principle is that a ban never does more harm than
its evidence proves.  From a trigger (a rule over its threshold) and the evidence the
tables hold about the key (:class:`~floodd.detect.hops.HopEvidence`), :func:`ban_scope`
chooses the narrowest :class:`~floodd.scope.Scope` that still drops the abusive traffic:

1. A rule about one query type drops only that type (over UDP: the kernel matches the
   question at a fixed offset of the UDP payload).
2. Packets of handshake-verified TCP connections cannot be forged: when they alone exceed
   the threshold, the source itself floods and the ban may close every protocol.
   Otherwise the evidence is UDP and the ban drops UDP only (``trust.udp_evidence_bans``).
3. When the key's usual hop values (TTL / hop limit, learned before the flood) are known
   and the packets arriving with them do not alone exceed the threshold, the excess came
   with other hop values: the ban spares the usual ones, so a real client whose address
   a forger borrows keeps being answered.  A key without history, or a flood arriving
   with its usual values, is banned as a whole (UDP only).

What a forger who matches a real source's hop value exactly can still do is bounded by
the rules' thresholds (``trust.min_whole_evidence`` for rules that ban all queries) and by
the scope: UDP only, and the qtype for qtype rules; such bans do not escalate unless
they cover all of the source's queries (``Scope.whole_source``).
"""

from __future__ import annotations

from dataclasses import dataclass

from floodd.config import Rule, TrustConfig
from floodd.detect.hops import HopEvidence
from floodd.scope import WHOLE, Scope


@dataclass(frozen=True)
class Narrowing:
    """Why a ban spares the key's usual hop values: the evidence, for the journal."""

    usual: tuple[int, ...]  # the key's usual hop values, which the ban lets through
    at_usual: int  # the rule's packets in its window that arrived with them
    count: int  # all the rule's packets in its window
    verified: bool  # the usual values come from completed TCP handshakes

    def describe(self) -> str:
        how = "from TCP handshakes" if self.verified else "learned"
        return (f"usual TTL/hop limit {'/'.join(map(str, self.usual))} ({how}); "
                f"{self.count - self.at_usual} of {self.count} packets came with other "
                "values")


def ban_scope(rule: Rule, count: int, evidence: HopEvidence,
              trust: TrustConfig) -> tuple[Scope, Narrowing | None]:
    """The scope of a ban for ``rule``'s trigger (``count`` packets in its window) and,
    when hop values were spared, why."""
    if evidence.tcp > rule.threshold:
        return WHOLE, None  # verified TCP alone is over the threshold: the source floods
    qtype = rule.qtype
    hops: tuple[int, ...] = ()
    narrowing = None
    if evidence.usual and evidence.at_usual <= rule.threshold:
        hops = evidence.usual
        narrowing = Narrowing(evidence.usual, evidence.at_usual, count, evidence.verified)
    if qtype is None and not hops and trust.udp_evidence_bans == "all":
        return WHOLE, None
    return Scope(udp_only=True, qtype=qtype, except_hops=hops), narrowing
