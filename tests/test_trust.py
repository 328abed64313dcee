"""The ban-scope decision, from plain data."""

from __future__ import annotations

import pytest

from floodd.config import Rule, TrustConfig
from floodd.decide.trust import ban_scope
from floodd.detect.hops import HopEvidence
from floodd.scope import UDP_ONLY, WHOLE, Scope

FLOOD = Rule("query-flood", threshold=5000, window=10)
ANY = Rule("any-queries", match="ANY", threshold=4, window=60)
TRUST = TrustConfig()


def evidence(usual: tuple[int, ...] = (), at_usual: int = 0, tcp: int = 0,
             verified: bool = False) -> HopEvidence:
    return HopEvidence(usual=usual, verified=verified, at_usual=at_usual, tcp=tcp)


def test_a_source_without_history_is_banned_over_udp_only() -> None:
    assert ban_scope(FLOOD, 6000, evidence(), TRUST) == (UDP_ONLY, None)


def test_a_flood_at_the_usual_hop_value_bans_the_source_over_udp() -> None:
    scope, narrowing = ban_scope(FLOOD, 6000, evidence((64,), at_usual=6000), TRUST)
    assert scope == UDP_ONLY and narrowing is None


def test_a_flood_at_other_hop_values_spares_the_usual_ones() -> None:
    scope, narrowing = ban_scope(FLOOD, 6000, evidence((63, 64), at_usual=900), TRUST)
    assert scope == Scope(udp_only=True, except_hops=(63, 64))
    assert narrowing is not None and narrowing.at_usual == 900 and narrowing.count == 6000
    assert "5100 of 6000 packets" in narrowing.describe()


def test_usual_traffic_exactly_at_the_threshold_is_not_proof() -> None:
    # the rule bans *more* than its threshold: at the threshold the usual part is innocent
    scope, _ = ban_scope(FLOOD, 5001, evidence((64,), at_usual=5000), TRUST)
    assert scope.except_hops == (64,)


def test_a_qtype_rule_drops_only_that_qtype_over_udp() -> None:
    assert ban_scope(ANY, 5, evidence(), TRUST) == (Scope(True, 255), None)
    scope, narrowing = ban_scope(ANY, 5, evidence((64,), at_usual=0), TRUST)
    assert scope == Scope(True, 255, (64,)) and narrowing is not None


def test_verified_tcp_over_the_threshold_closes_every_protocol() -> None:
    assert ban_scope(FLOOD, 6000, evidence((64,), at_usual=6000, tcp=5001,
                                           verified=True), TRUST) == (WHOLE, None)
    # TCP under the threshold is no proof: the UDP part decides
    assert ban_scope(FLOOD, 6000, evidence(tcp=4000), TRUST) == (UDP_ONLY, None)


@pytest.mark.parametrize("rule, scope", [(FLOOD, WHOLE), (ANY, Scope(True, 255))])
def test_udp_evidence_may_close_everything_when_configured(rule: Rule, scope: Scope) -> None:
    trust = TrustConfig(udp_evidence_bans="all")
    assert ban_scope(rule, 6000, evidence(), trust) == (scope, None)


def test_hop_narrowing_is_udp_only_even_when_udp_evidence_closes_everything() -> None:
    trust = TrustConfig(udp_evidence_bans="all")
    scope, _ = ban_scope(FLOOD, 6000, evidence((64,), at_usual=10), trust)
    assert scope == Scope(udp_only=True, except_hops=(64,))
