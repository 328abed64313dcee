"""The offences file: round trip, what is forgotten, damaged files, atomic replacement,
unix times in the file and monotonic ones in memory."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floodd.decide.policy import Network, Offence, Offences
from floodd.enforce.clock import Instant
from floodd.enforce.state import FILE_NAME, StateWriter, load_offences, save_offences

NOW = 1_700_000_000.0
DAY = 86_400.0
AT = Instant(NOW, NOW)  # both clocks alike: times in memory and in the file are the same


def load(path: Path, at: Instant = AT) -> dict[Network, Offence]:
    return dict(load_offences(str(path), at, DAY))


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def test_round_trip_and_format(tmp_path: Path) -> None:
    offences = {net("198.51.100.7/32"): Offence(1, NOW - 60),
                net("203.0.113.0/24"): Offence(3, NOW - 10),
                net("2001:db8:1::5/128"): Offence(2, NOW)}
    save_offences(str(tmp_path), offences, AT, DAY)
    assert load(tmp_path) == offences
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert data["version"] == 1
    assert data["offences"]["203.0.113.0/24"] == [3, NOW - 10]
    assert list(data["offences"]) == ["2001:db8:1::5/128", "203.0.113.0/24",
                                      "198.51.100.7/32"]  # newest first


def test_old_offences_are_forgotten(tmp_path: Path) -> None:
    offences = {net("198.51.100.7/32"): Offence(5, NOW - DAY - 1),
                net("198.51.100.8/32"): Offence(1, NOW - DAY)}
    save_offences(str(tmp_path), offences, AT, DAY)
    assert load(tmp_path) == {net("198.51.100.8/32"): Offence(1, NOW - DAY)}


def test_times_are_unix_in_the_file_and_monotonic_in_memory(tmp_path: Path) -> None:
    running = Instant(5000.0, NOW)  # monotonic clock: 5000 s since boot
    save_offences(str(tmp_path), {net("198.51.100.7/32"): Offence(2, 4900.0)}, running, DAY)
    assert json.loads((tmp_path / FILE_NAME).read_text())["offences"] == {
        "198.51.100.7/32": [2, NOW - 100]}
    after_reboot = Instant(30.0, NOW + 60)  # a minute later, 30 s after boot
    assert load(tmp_path, after_reboot) == {net("198.51.100.7/32"): Offence(2, 30.0 - 160)}


def test_loaded_offences_are_oldest_first_and_old_ones_forgotten(tmp_path: Path) -> None:
    entries = {f"198.51.{i // 250}.{i % 250}/32": [1, NOW - i] for i in range(1000)}
    entries["203.0.113.0/24"] = [4, NOW - DAY - 1]  # forgotten by now
    (tmp_path / FILE_NAME).write_text(json.dumps({"version": 1, "offences": entries}))
    offences = load_offences(str(tmp_path), AT, DAY)
    assert len(offences) == 1000 and net("203.0.113.0/24") not in offences
    assert list(offences)[-1] == net("198.51.0.0/32")  # newest last: evicted last


def test_missing_file_or_directory_means_no_history(tmp_path: Path) -> None:
    assert load(tmp_path) == {}
    assert load(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("content", [
    b"",
    b"{\"version\": 1, \"offences\": {\"198.51.100.7/32\": [1, 17",  # cut short
    b"\xff\xfe not text",
    b"[]",
    b"{\"version\": 1}",
    b"{\"version\": 1, \"offences\": []}",
    b"{\"version\": 1, \"offences\": \"198.51.100.7/32\"}",
    b"{\"version\": 1, \"offences\": {\"not a network\": [1, 2]}}",
    b"{\"version\": 1, \"offences\": {\"198.51.100.7/24\": [1, 2]}}",
    b"{\"version\": 1, \"offences\": {\"198.51.100.7/32\": [1]}}",
    b"{\"version\": 1, \"offences\": {\"198.51.100.7/32\": [\"one\", 2]}}",
    b"{\"version\": 1, \"offences\": {\"198.51.100.7/32\": null}}",
])
def test_damaged_file_means_no_history(tmp_path: Path, content: bytes) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    assert load(tmp_path) == {}


def test_directory_is_created_private_and_no_temporary_file_stays(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "floodd"
    save_offences(str(state_dir), {net("198.51.100.7/32"): Offence(1, NOW)}, AT, DAY)
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    save_offences(str(state_dir), {}, AT, DAY)
    assert os.listdir(state_dir) == [FILE_NAME]
    assert load(state_dir) == {}


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = {net("198.51.100.7/32"): Offence(1, NOW)}
    save_offences(str(tmp_path), old, AT, DAY)

    def no_space(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        save_offences(str(tmp_path), {net("198.51.100.8/32"): Offence(1, NOW)}, AT, DAY)
    assert os.listdir(tmp_path) == [FILE_NAME]
    assert load(tmp_path) == old


networks = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
              st.ip_addresses(v=4), st.integers(8, 32)),
    st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
              st.ip_addresses(v=6), st.integers(16, 128)))
offence_maps = st.dictionaries(
    networks, st.builds(Offence, st.integers(1, 1000),
                        st.floats(NOW - DAY, NOW, allow_nan=False)), max_size=20)


@settings(max_examples=50, deadline=None)
@given(offences=offence_maps)
def test_property_round_trip(tmp_path_factory: pytest.TempPathFactory,
                             offences: dict[Network, Offence]) -> None:
    state_dir = tmp_path_factory.mktemp("state")
    save_offences(str(state_dir), offences, AT, DAY)
    assert load(state_dir) == offences


def _offences(*pairs: tuple[str, Offence]) -> Offences:
    return Offences(DAY, [(net(n), o) for n, o in pairs])


def test_writer_saves_in_the_background_the_newest_snapshot(tmp_path: Path) -> None:
    failures: list[OSError] = []
    writer = StateWriter(str(tmp_path), DAY, failures.append)
    offences = _offences(("198.51.100.7/32", Offence(1, NOW - 60)))
    writer.submit(offences, AT)
    offences.record(net("203.0.113.0/24"), NOW)  # after submit: not in that snapshot
    writer.submit(offences, AT)
    offences.record(net("192.0.2.0/24"), NOW)  # changed after the last submit
    writer.close()
    assert not failures
    assert load(tmp_path) == {net("198.51.100.7/32"): Offence(1, NOW - 60),
                              net("203.0.113.0/24"): Offence(1, NOW)}
    assert writer.idle()


def test_writer_reports_a_failed_save_and_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a state_dir that is a file: every save fails
    failures: list[OSError] = []
    writer = StateWriter(str(blocked / "state"), DAY, failures.append)
    writer.submit(_offences(("198.51.100.7/32", Offence(1, NOW))), AT)
    writer.close()
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    writer = StateWriter(str(tmp_path / "state"), DAY, failures.append)
    writer.submit(_offences(("198.51.100.7/32", Offence(1, NOW))), AT)
    writer.close()
    assert len(failures) == 1
    assert load(tmp_path / "state") == {net("198.51.100.7/32"): Offence(1, NOW)}


def test_copy_is_a_snapshot() -> None:
    offences = _offences(("198.51.100.7/32", Offence(1, NOW - 60)))
    twin = offences.copy()
    offences.record(net("198.51.100.7/32"), NOW)
    assert twin[net("198.51.100.7/32")] == Offence(1, NOW - 60)
    assert offences[net("198.51.100.7/32")] == Offence(2, NOW)
    assert (twin.forget_after, twin.cap) == (offences.forget_after, offences.cap)
