"""A CrowdSec Local API (LAPI) of its own for the lab: Debian's ``crowdsec`` started by
hand with a configuration and a SQLite database in a temporary directory, the agent and
the Central API off (``crowdsec -c CFG -no-cs -no-capi``), listening on one address.

Machines (which push alerts) and bouncers (which pull decisions) are registered with
``cscli -c CFG``, which writes the database directly.  The LAPI runs in a network
namespace when one is named (``ip netns exec``), else on this host; it is stopped by its
pid, and :meth:`LocalAPI.stop` / :meth:`LocalAPI.start` kill it and bring it back on the
same database (what a fleet sees when its LAPI restarts).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

from lab.netns import in_netns

CROWDSEC = "crowdsec"
CSCLI = "cscli"

_CONFIG = """\
common:
  daemonize: false
  log_media: stdout
  log_level: warning
  working_dir: {dir}
config_paths:
  config_dir: {dir}
  data_dir: {dir}/data
  simulation_path: {dir}/simulation.yaml
  hub_dir: {dir}/hub
  index_path: {dir}/hub/.index.json
  notification_dir: {dir}/notifications
  plugin_dir: /usr/lib/crowdsec/plugins
db_config:
  type: sqlite
  db_path: {dir}/data/crowdsec.db
  use_wal: false
  flush:
    max_items: 5000
    max_age: 7d
api:
  client:
    credentials_path: {dir}/local_api_credentials.yaml
  server:
    log_level: warning
    listen_uri: {listen}
    profiles_path: {dir}/profiles.yaml
    console_path: {dir}/console.yaml
    trusted_ips: [{trusted}]
prometheus:
  enabled: false
"""

# Used only for alerts that come without decisions; floodd's come with theirs.
_PROFILES = """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"""


def crowdsec_problem() -> str | None:
    """Why a LAPI cannot run here, or None."""
    missing = [tool for tool in (CROWDSEC, CSCLI) if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian package crowdsec)"
    return None


class LocalAPI:
    """A LAPI listening on ``host:port`` (in namespace ``netns`` if given)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 18080,
                 netns: str | None = None, trusted: tuple[str, ...] = ("127.0.0.1", "::1")
                 ) -> None:
        self.host = host
        self.port = port
        self.netns = netns
        self.dir = tempfile.mkdtemp(prefix="floodd-lapi-")
        self.config = os.path.join(self.dir, "config.yaml")
        self.log_path = os.path.join(self.dir, "crowdsec.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._cscli_machine = False
        os.makedirs(os.path.join(self.dir, "data"))
        os.makedirs(os.path.join(self.dir, "hub"))
        os.makedirs(os.path.join(self.dir, "notifications"))
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        files = {"config.yaml": _CONFIG.format(dir=self.dir, listen=listen,
                                              trusted=", ".join(json.dumps(t) for t in trusted)),
                 "profiles.yaml": _PROFILES, "simulation.yaml": "simulation: false\n",
                 "console.yaml": "share_manual_decisions: false\nshare_tainted: false\n"
                                 "share_custom: false\n",
                 "local_api_credentials.yaml": f"url: http://{listen}\n"}
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> LocalAPI:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self, timeout: float = 15.0) -> None:
        """Start the LAPI and wait until ``/health`` answers."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*self._prefix(), CROWDSEC, "-c", self.config, "-no-cs", "-no-capi"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"crowdsec exited with {self._proc.returncode}: "
                                   f"{self.log()[-2000:]}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the LAPI did not answer within {timeout:g} s: "
                           f"{self.log()[-2000:]}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, signum: int = signal.SIGKILL) -> None:
        """Stop the LAPI by its pid (SIGKILL: as if it crashed); the database stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # --- talking to it -----------------------------------------------------------
    def cscli(self, *args: str) -> str:
        """``cscli -c CFG ARGS`` (in the LAPI's namespace): machines and bouncers are
        written to the database, decisions go through the API."""
        argv = [CSCLI, "-c", self.config, *args]
        proc = subprocess.run([*self._prefix(), *argv], capture_output=True, text=True,
                              timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-1000:]}")
        return proc.stdout

    def _as_machine(self) -> None:
        """cscli reads and adds decisions as a machine of its own, over the API."""
        if not self._cscli_machine:
            self.add_machine("lab-cscli",
                             creds=os.path.join(self.dir, "local_api_credentials.yaml"))
            self._cscli_machine = True

    def add_machine(self, name: str, password: str | None = None,
                    creds: str | None = None) -> str:
        """Register a machine (a pusher of alerts); its password (also written to
        ``creds``, a credentials file in cscli's format)."""
        password = password or secrets.token_hex(16)
        creds = creds or os.path.join(self.dir, f"machine-{name}.yaml")
        self.cscli("machines", "add", name, "--password", password, "-f", creds,
                   "--url", self.url)
        return password

    def add_bouncer(self, name: str, key: str | None = None) -> str:
        """Register a bouncer (a reader of the decision stream); its API key."""
        key = key or secrets.token_hex(16)
        self.cscli("bouncers", "add", name, "-k", key)
        return key

    def decisions(self) -> list[dict[str, Any]]:
        """Every active decision, of every origin, as ``cscli decisions list --all -o
        json`` shows them: alerts, each with its decisions."""
        self._as_machine()
        out = self.cscli("decisions", "list", "--all", "-o", "json")
        data = json.loads(out) if out.strip() else None
        return list(data or [])

    def add_decision(self, value: str, duration: str = "4h", scope: str = "ip",
                     reason: str = "lab") -> None:
        """An operator's decision, as ``cscli decisions add`` makes it (origin cscli)."""
        self._as_machine()
        flag = "--ip" if scope == "ip" else "--range"
        self.cscli("decisions", "add", flag, value, "--duration", duration,
                   "--reason", reason)

    def healthy(self) -> bool:
        """Whether the LAPI answers ``/health`` (asked from its own namespace)."""
        def probe() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as reply:
                    return bool(reply.status == 200)
            except (OSError, urllib.error.URLError):
                return False
        return in_netns(self.netns, probe) if self.netns else probe()
