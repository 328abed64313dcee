"""dnsdist, the peer floodd is measured against: PowerDNS's DNS load balancer in the lab's
server namespace, in front of the lab's BIND, with a dynamic-block rule.

It listens on :data:`ADDRESS` (an address of the server veth; BIND keeps 192.0.2.53, so
both can be measured in one lab) and forwards every query to BIND, no packet cache.  Its
rule is ``dynBlockRulesGroup():setQueryRate(rate, window, ...)``, applied every second
by dnsdist's ``maintenance()``: a source that sent more than ``threshold`` queries in the
last ``window`` seconds of the query ring is dropped by dnsdist for ``ban_time``.  The
ring holds ``ring`` entries (``setRingBuffersSize``); dnsdist's default, 10,000, never
sees a fast flooder's whole window.

Its blocks are read from its built-in web server (``/jsonstat?command=dynblocklist``),
listening on the server namespace's loopback: the request is made from a thread that
joined that network namespace (setns(2)).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from lab.netns import GATEWAY_V4, Lab, Started, in_netns, stop_process

ADDRESS = "192.0.2.54"  # where dnsdist listens; BIND stays on Lab.server_v4
WEB_PORT = 8083  # dnsdist's web server, on the server namespace's 127.0.0.1

_CONFIG = """\
-- written by lab.dnsdist
setLocal("{address}:53")
setACL({{"0.0.0.0/0", "::/0"}})
newServer({{address="{backend}:53", checkInterval=3600}})
setRingBuffersSize({ring})
setSecurityPollSuffix("")
webserver("127.0.0.1:{port}")
setWebserverConfig({{apiKey="{key}", acl="127.0.0.0/8"}})
local flood = dynBlockRulesGroup()
flood:setQueryRate({rate}, {window}, "query-flood", {ban_time})
function maintenance()
  flood:apply()
end
"""


def available() -> bool:
    """Whether dnsdist is installed."""
    return shutil.which("dnsdist") is not None


class Dnsdist(Started):
    """dnsdist in ``lab``'s server namespace in front of its BIND (see the module
    docstring): more than ``threshold`` queries in ``window`` seconds from one source
    gets it blocked for ``ban_time`` seconds."""

    address = ADDRESS

    def __init__(self, lab: Lab, workdir: Path, *, threshold: int, window: float,
                 ring: int = 1_000_000, ban_time: int = 600) -> None:
        if threshold < 1 or window <= 0 or ring < 1:
            raise ValueError("dnsdist needs a positive threshold, window and ring size")
        self.lab = lab
        self.key = secrets.token_hex(16)
        self.config = workdir / "dnsdist.conf"
        # setQueryRate takes a rate: queries per second over the window.
        self.config.write_text(_CONFIG.format(
            address=ADDRESS, backend=lab.server_v4, ring=ring, port=WEB_PORT, key=self.key,
            rate=f"{threshold / window:g}", window=f"{window:g}", ban_time=ban_time))
        self.log = workdir / "dnsdist.log"
        self.argv = ["dnsdist", "--supervised", "--disable-syslog", "-C", str(self.config)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Dnsdist:
        """Give the server veth :data:`ADDRESS`, start dnsdist and wait until it answers
        a query (forwarded to BIND) and its web server answers."""
        self._add_address()
        self._log = open(self.log, "ab")
        self._proc = self.lab.popen(self.lab.server_ns, self.argv, stdout=self._log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"dnsdist exited with status {self._proc.returncode}: "
                                   f"{self.log_text()[-800:]}")
            if self.lab.dig(f"www.{self.lab.zone}", source=GATEWAY_V4, server=ADDRESS,
                            timeout=0.5):
                try:
                    self.blocks()
                    return self
                except (OSError, RuntimeError, ValueError):
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dnsdist did not answer on {ADDRESS} in {timeout:g} s: "
                           f"{self.log_text()[-800:]}")

    def _add_address(self) -> None:
        ns, ifname = self.lab.server_ns, self.lab.server_if
        shown = json.loads(self.lab.run(ns, ["ip", "-j", "addr", "show", "dev", ifname],
                                        text=True).stdout)
        have = {a.get("local") for iface in shown for a in iface.get("addr_info", ())}
        if ADDRESS not in have:
            self.lab.run(ns, ["ip", "addr", "add", f"{ADDRESS}/24", "dev", ifname])

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{WEB_PORT}{path}",
                                         headers={"X-API-Key": self.key})
        with urllib.request.urlopen(request, timeout=2) as reply:
            return json.load(reply)

    def blocks(self) -> dict[str, int]:
        """The sources dnsdist blocks now -> queries it dropped for each so far.  dnsdist
        names them as netmasks (``203.0.113.11/32``): the /32 and /128 are taken off."""
        # dynblocklist: {"203.0.113.11/32": {"reason", "seconds", "blocks", "action",
        # "warning", "ebpf"}, ...}
        data = in_netns(self.lab.server_ns, lambda: self._get("/jsonstat?command=dynblocklist"))
        if not isinstance(data, dict):
            raise ValueError(f"dnsdist dynblocklist: not an object: {str(data)[:200]}")
        return {net.removesuffix("/32").removesuffix("/128"): int(entry.get("blocks", 0))
                for net, entry in data.items() if isinstance(entry, dict)}

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s); the address stays (removed with the lab)."""
        if self._proc is not None:
            stop_process(self._proc, 5)
        if self._log is not None:
            self._log.close()
            self._log = None
