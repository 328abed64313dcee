"""``floodd bans|ban|unban``: argument handling, output, and real bans in lab namespaces."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from typing import Any, Callable

import pytest

from floodd import cli
from floodd.cli.bans import (ban_duration, format_bans, human_duration,
                           source_network)
from floodd.errors import FlooddError
from floodd.enforce.firewall.base import InstalledBan
from floodd.scope import UDP_ONLY, WHOLE, Scope

Cli = Callable[..., "subprocess.CompletedProcess[str]"]
BANNED = "198.51.100.7"
OTHER = "198.51.100.8"
NAME = "www.lab.example"


# --- plain functions ---------------------------------------------------------------------
def test_source_network_accepts_addresses_and_prefixes() -> None:
    assert str(source_network("198.51.100.7")) == "198.51.100.7/32"
    assert str(source_network(" 203.0.113.0/24 ")) == "203.0.113.0/24"
    assert str(source_network("2001:db8:1::/64")) == "2001:db8:1::/64"


@pytest.mark.parametrize("text, message", [
    ("198.51.100.7/24", "198.51.100.7/24 has host bits set (did you mean 198.51.100.0/24?)"),
    ("example.com", "not an address or prefix: 'example.com'"),
    ("300.1.1.1", "not an address or prefix: '300.1.1.1'"),
    ("", "not an address or prefix: ''"),
])
def test_source_network_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(FlooddError) as exc:
        source_network(text)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_ban_duration() -> None:
    assert ban_duration("90s") == 90
    assert ban_duration("1h30m") == 5400
    for bad in ("soon", "0", "-5m", "400d"):
        with pytest.raises(FlooddError, match="--for: "):
            ban_duration(bad)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (59.6, "1m"), (3600, "1h"), (5430, "1h30m30s"), (90000, "1d1h"),
    (float("inf"), "never"), (-5, "0s"),
])
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_format_bans_table() -> None:
    now = 1_700_000_000.0
    client = ipaddress.ip_network("203.0.113.10/32")
    records = [InstalledBan(ipaddress.ip_network("198.51.100.7/32"), "query-flood",
                            now - 60, now + 540, 1234, 98765).as_json(),
               InstalledBan(ipaddress.ip_network("203.0.113.0/24"), "manual",
                            now, float("inf"), 0, 0, scope=UDP_ONLY).as_json(),
               InstalledBan(client, "any-queries", now, now + 600, 5, 300,
                            scope=Scope(True, 255, (64,))).as_json(),
               InstalledBan(client, "query-flood", now, now + 600, 70000, 4200000,
                            scope=Scope(True, None, (63, 64))).as_json()]
    lines = format_bans(records, now)
    assert lines[0].split() == ["SOURCE", "SCOPE", "RULE", "BANNED", "SINCE", "EXPIRES",
                                "IN", "PACKETS", "BYTES"]
    assert lines[1].startswith("198.51.100.7    whole source  ")
    assert lines[1].endswith("   1234    98765") and " 9m " in lines[1]
    assert lines[2].startswith("203.0.113.0/24  UDP only  ") and " never " in lines[2]
    assert lines[3].startswith("203.0.113.10    UDP, ANY queries, TTL/hop limit not 64  ")
    assert lines[4].startswith("203.0.113.10    UDP, TTL/hop limit not 63/64  ")
    assert lines[4].endswith("  70000  4200000")
    # one column each: the rule under RULE, every row as wide as the header
    rule_at = lines[0].index("RULE")
    assert [line[rule_at:].split()[0] for line in lines[1:]] == [
        "query-flood", "manual", "any-queries", "query-flood"]
    assert len({len(line) for line in lines}) == 1
    assert records[1]["expires"] is None
    assert format_bans([], now) == ["no bans"]


def test_usage_errors_exit_2_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["unban"], ["ban"], ["ban", "x.y"], ["ban", "198.51.100.7", "--for", "ever"],
                 ["unban", "198.51.100.7", "--all"], ["bans", "--backend", "pf"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("floodd: ") and err.count("\n") == 1, err


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in (("bans", "packets and bytes"), ("ban", "--force"),
                           ("unban", "--all")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert words in capsys.readouterr().out


# --- real processes in the lab, for each backend ------------------------------------------
def _bans(floodd_cli: Cli, backend: str) -> dict[str, dict[str, Any]]:
    proc = floodd_cli("bans", "--json", backend=backend)
    assert proc.returncode == 0, proc.stderr
    return {r["source"]: r for r in json.loads(proc.stdout)}


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_banned_source_gets_no_answer_until_unbanned(dns_lab: Any, floodd_cli: Cli,
                                                     backend_name: str) -> None:
    lab = dns_lab
    lab.add_client_address(BANNED)
    lab.add_client_address(OTHER)
    assert lab.dig(NAME, source=BANNED)
    out = _ok(floodd_cli("ban", BANNED, "--for", "10m", "--reason", "test flood",
                         backend=backend_name))
    assert out == f"banned {BANNED} for 10m (test flood)\n"
    assert not lab.dig(NAME, source=BANNED)
    assert lab.dig(NAME, source=OTHER)
    bans = _bans(floodd_cli, backend_name)
    assert list(bans) == [f"{BANNED}/32"]
    ban = bans[f"{BANNED}/32"]
    assert ban["rule"] == "test flood"
    assert ban["scope"] == WHOLE.as_json()  # the operator's bans drop all of the source's
    assert ban["expires"] - ban["since"] == pytest.approx(600, abs=1)
    table = _ok(floodd_cli("bans", backend=backend_name)).splitlines()
    assert table[1].split()[:4] == [BANNED, "whole", "source", "test"]
    assert _ok(floodd_cli("unban", BANNED, backend=backend_name)) == f"unbanned {BANNED}\n"
    assert lab.dig(NAME, source=BANNED)
    assert _bans(floodd_cli, backend_name) == {}


def test_counter_shows_exactly_the_dropped_queries(lab: Any, floodd_cli: Cli,
                                                   send_queries: Callable[[str, int], None],
                                                   backend_name: str,
                                                   wait_for: Callable[..., bool]) -> None:
    lab.add_client_address(BANNED)
    lab.add_client_address(OTHER)
    _ok(floodd_cli("ban", BANNED, backend=backend_name))
    send_queries(BANNED, 7)
    send_queries(OTHER, 3)  # not banned: not counted
    assert wait_for(lambda: _bans(floodd_cli, backend_name)[f"{BANNED}/32"]["packets"] == 7)
    ban = _bans(floodd_cli, backend_name)[f"{BANNED}/32"]
    assert ban["bytes"] >= 7 * (20 + 8 + 33)  # IPv4 + UDP headers + the query


def test_ipv6_and_prefix_bans(dns_lab: Any, floodd_cli: Cli,
                              send_queries: Callable[[str, int], None], backend_name: str,
                              wait_for: Callable[..., bool]) -> None:
    lab = dns_lab
    for address in ("2001:db8:1::7", "2001:db8:1::8", "203.0.113.9", "203.0.113.10",
                    "198.51.100.9"):
        lab.add_client_address(address)
    _ok(floodd_cli("ban", "2001:db8:1::7", backend=backend_name))
    _ok(floodd_cli("ban", "203.0.113.0/24", backend=backend_name))
    assert not lab.dig(NAME, source="2001:db8:1::7", qtype="AAAA")
    assert lab.dig(NAME, source="2001:db8:1::8", qtype="AAAA")
    assert not lab.dig(NAME, source="203.0.113.9")
    assert lab.dig(NAME, source="198.51.100.9")
    send_queries("203.0.113.10", 2)
    send_queries("2001:db8:1::7", 4)

    def counted() -> bool:
        bans = _bans(floodd_cli, backend_name)
        # the dig above sent one query from 203.0.113.9, dropped too
        return bans["203.0.113.0/24"]["packets"] == 3 and bans["2001:db8:1::7/128"][
            "packets"] == 5
    assert wait_for(counted)
    _ok(floodd_cli("unban", "--all", backend=backend_name))
    assert lab.dig(NAME, source="203.0.113.9")


def test_bans_survive_a_new_process_unchanged(lab: Any, floodd_cli: Cli,
                                              send_queries: Callable[[str, int], None],
                                              backend_name: str,
                                              wait_for: Callable[..., bool]) -> None:
    lab.add_client_address(BANNED)
    _ok(floodd_cli("ban", BANNED, "--for", "2h", backend=backend_name))
    send_queries(BANNED, 3)
    assert wait_for(lambda: _bans(floodd_cli, backend_name)[f"{BANNED}/32"]["packets"] == 3)
    before = _bans(floodd_cli, backend_name)[f"{BANNED}/32"]
    # more processes, more bans: the first one is neither re-added nor reset
    _ok(floodd_cli("ban", "198.51.100.0/25", backend=backend_name))
    _ok(floodd_cli("ban", "2001:db8:1::/64", backend=backend_name))
    after = _bans(floodd_cli, backend_name)
    assert after[f"{BANNED}/32"] == before
    assert set(after) == {f"{BANNED}/32", "198.51.100.0/25", "2001:db8:1::/64"}


def test_unban_of_a_source_not_banned(lab: Any, floodd_cli: Cli, backend_name: str) -> None:
    _ok(floodd_cli("ban", "203.0.113.0/24", backend=backend_name))
    proc = floodd_cli("unban", "203.0.113.5", backend=backend_name)
    assert proc.returncode == 1
    assert proc.stderr == "203.0.113.5 is not banned (it lies inside the banned prefix " \
                          "203.0.113.0/24)\n"
    assert _ok(floodd_cli("unban", "--all", backend=backend_name)) == "unbanned 1 ban\n"
    assert _ok(floodd_cli("bans", backend=backend_name)) == "no bans\n"


def test_a_prefix_inside_a_banned_prefix_is_refused_by_nftables(lab: Any,
                                                                floodd_cli: Cli) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nft")
    _ok(floodd_cli("ban", "198.51.0.0/16", backend="nftables"))
    inside = floodd_cli("ban", "198.51.100.0/24", backend="nftables")
    assert (inside.returncode, inside.stdout) == (1, "")
    assert inside.stderr == ("floodd: 198.51.100.0/24 was not added: it lies inside the "
                             "banned prefix 198.51.0.0/16\n")
    assert list(_bans(floodd_cli, "nftables")) == ["198.51.0.0/16"]


def test_protected_sources_are_refused_unless_forced(lab: Any, floodd_cli: Cli,
                                                     backend_name: str) -> None:
    for source, why in ((lab.server_v4, "this host's address"),
                        ("192.0.2.0/24", "contains this host's address 192.0.2.53"),
                        ("127.0.0.1", "whitelisted by 127.0.0.0/8"),
                        ("::1", "whitelisted by ::1/128")):
        proc = floodd_cli("ban", source, backend=backend_name)
        assert proc.returncode == 2
        assert proc.stderr == (f"floodd: refusing to ban {source}: {why} "
                               "(use --force to ban it anyway)\n")
    assert _bans(floodd_cli, backend_name) == {}
    _ok(floodd_cli("ban", "192.0.2.0/24", "--force", "--for", "1m", backend=backend_name))
    assert list(_bans(floodd_cli, backend_name)) == ["192.0.2.0/24"]


# --- through a running daemon ---------------------------------------------------------------
def test_commands_go_through_a_running_daemon(tmp_path: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from floodd.service.control import ControlServer

    sock = tmp_path / "control.sock"
    config = tmp_path / "floodd.yaml"
    config.write_text(f"daemon:\n  control_socket: {sock}\n")
    seen: list[dict[str, Any]] = []
    # as the daemon sends them: one network may have several bans, of different scopes
    client = ipaddress.ip_network("203.0.113.10/32")
    bans = [InstalledBan(ipaddress.ip_network("203.0.113.0/24"), "prefix-flood",
                         1_700_000_000.0, 1_700_000_600.0, 12, 720).as_json(),
            InstalledBan(client, "any-queries", 1_700_000_000.0, 1_700_000_600.0, 5, 300,
                         scope=Scope(True, 255)).as_json(),
            InstalledBan(client, "query-flood", 1_700_000_000.0, 1_700_000_600.0, 9000,
                         540000, scope=Scope(True, None, (64,))).as_json()]

    def daemon(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["cmd"] == "bans":
            return {"ok": True, "bans": bans}
        if req["cmd"] == "ban" and req["source"] == "127.0.0.1/32" and not req["force"]:
            raise FlooddError("ban: refusing to ban 127.0.0.1/32: whitelisted by 127.0.0.0/8")
        if req["cmd"] == "unban":  # the bans removed: every ban of the source, or all
            return {"ok": True, "bans": [{"source": b["source"], "scope": b["scope"]}
                                         for b in bans if req.get("all")
                                         or b["source"] == req["source"]]}
        return {"ok": True}
    server = ControlServer(str(sock), daemon)
    server.start()
    try:
        assert cli.main(["bans", "--json", "-c", str(config)]) == 0
        assert json.loads(capsys.readouterr().out) == bans
        assert bans[1]["scope"] == {"protocols": "udp", "qtype": "ANY", "except_hops": [],
                                    "text": "UDP, ANY queries"}
        assert cli.main(["bans", "-c", str(config)]) == 0
        table = capsys.readouterr().out.splitlines()
        scope_at, rule_at = table[0].index("SCOPE"), table[0].index("RULE")
        assert [(row[:scope_at].strip(), row[scope_at:rule_at].strip()) for row in table[1:]] \
            == [("203.0.113.0/24", "whole source"), ("203.0.113.10", "UDP, ANY queries"),
                ("203.0.113.10", "UDP, TTL/hop limit not 64")]
        assert cli.main(["ban", "198.51.100.7", "--for", "10m", "-c", str(config)]) == 0
        assert seen[-1] == {"cmd": "ban", "source": "198.51.100.7/32", "seconds": 600.0,
                            "reason": "manual", "force": False}
        assert cli.main(["ban", "127.0.0.1", "-c", str(config)]) == 2
        assert "whitelisted by 127.0.0.0/8" in capsys.readouterr().err
        assert cli.main(["unban", "198.51.100.7", "-c", str(config)]) == 1  # not in the list
        assert cli.main(["unban", "203.0.113.0/24", "-c", str(config)]) == 0
        assert seen[-1] == {"cmd": "unban", "source": "203.0.113.0/24"}
        assert capsys.readouterr().out.splitlines()[-1] == "unbanned 203.0.113.0/24"
        assert cli.main(["unban", "203.0.113.10", "-c", str(config)]) == 0
        assert seen[-1] == {"cmd": "unban", "source": "203.0.113.10/32"}
        assert capsys.readouterr().out == ("unbanned 203.0.113.10 (UDP, ANY queries; "
                                           "UDP, TTL/hop limit not 64)\n")
        assert cli.main(["unban", "--all", "-c", str(config)]) == 0
        assert seen[-1] == {"cmd": "unban", "all": True}
        assert capsys.readouterr().out.splitlines()[-1] == "unbanned 3 bans"
        count = len(seen)
        assert cli.main(["bans", "-c", str(config), "--backend", "dry-run"]) == 0
        assert len(seen) == count  # --backend: the kernel directly, not the daemon
    finally:
        server.close()
