"""External commands: output, a hang killed after the timeout, one-line errors."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from floodd.command import CommandTimeout, run
from floodd.errors import FlooddError


def test_output_and_input() -> None:
    proc = run([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"],
               input="nft")
    assert (proc.returncode, proc.stdout) == (0, "NFT\n")


def test_a_hung_command_is_killed_after_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); " \
           "time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as exc:
        run([sys.executable, "-c", hang], timeout=0.5)
    assert time.monotonic() - started < 5
    assert str(exc.value) == f"{os.path.basename(sys.executable)} -c {hang} did not " \
                             "finish within 0.5 s (killed)"
    assert "\n" not in str(exc.value)
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped, not left behind


def test_a_command_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FlooddError, match=r"^cannot run .*nothere: No such file or directory$"):
        run([str(tmp_path / "nothere")])
