"""A real Prometheus server scraping one target, for tests of what floodd exports.

``Prometheus(target, workdir, netns)`` writes a configuration (job ``floodd``, one static
target ``HOST:PORT``, scraped every second) into a directory of its own under
``workdir``, starts Debian's ``prometheus`` listening on a free port of 127.0.0.1 and
waits for ``/-/ready``.  With ``netns`` (a namespace of lab.netns.Lab, whose loopback is
up) the server runs inside that namespace, so a target on its 127.0.0.1 is reachable,
and every HTTP request to the server's API is made from a thread that joined the
namespace: callers just call :meth:`query` and :meth:`wait_for`.  With ``netns=None``
everything is on the host's loopback.

Timing: Prometheus is ready within a fraction of a second, but the first sample of a
target is queryable only about 6 s after the start, even scraped every second; give
:meth:`wait_for` at least 10 s for it.

    with Prometheus("127.0.0.1:9466", tmp_path, lab.server_ns) as prom:
        prom.wait_for("floodd_up", lambda samples: samples != [])
        [(labels, value)] = prom.query('sum(floodd_bans)')
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, TypeVar

from lab.netns import Lab, Started, in_netns, stop_process

JOB = "floodd"
T = TypeVar("T")
Sample = tuple[dict[str, str], float]  # a series' labels (with __name__) and its value

_CONFIG = """\
# written by lab.prometheus
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["{target}"]
"""


def available() -> bool:
    """Whether Prometheus is installed."""
    return shutil.which("prometheus") is not None


def _free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on now (in the calling thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus(Started):
    """One Prometheus server scraping ``target`` (see the module docstring); a context
    manager, or :meth:`start` then :meth:`stop`."""

    def __init__(self, target: str, workdir: Path, netns: str | None = None) -> None:
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"scrape target must be HOST:PORT, not {target!r}")
        self.target = target
        self.netns = netns
        self._workdir = workdir
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.port = 0
        # No proxy, whatever the environment says: the server is on a loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Prometheus:
        """Write the configuration, start the server and wait until ``/-/ready``."""
        self._dir = Path(tempfile.mkdtemp(prefix="prometheus-", dir=self._workdir))
        config = self._dir / "prometheus.yml"
        config.write_text(_CONFIG.format(job=JOB, target=self.target))
        self.port = self._in_place(_free_port)
        argv = ["prometheus", f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]
        if self.netns is not None:
            argv = Lab.exec_argv(self.netns) + argv  # ip netns exec: the pid is prometheus's
        self._log = open(self._dir / "prometheus.log", "ab")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log_text()
                self.stop()
                raise RuntimeError(f"prometheus exited with status {self._proc.returncode}: "
                                   f"{log[-800:]}")
            if self._in_place(self._ready):
                return self
            time.sleep(0.1)
        log = self.log_text()
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {timeout:g} s: {log[-800:]}")

    def stop(self) -> None:
        """SIGTERM to the server's pid (SIGKILL after 10 s), then remove its directory
        (configuration, data, log). Safe to call again."""
        if self._proc is not None:
            stop_process(self._proc, 10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_text(self) -> str:
        """What the server logged so far ("" once stopped)."""
        if self._dir is None:
            return ""
        try:
            return (self._dir / "prometheus.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- the HTTP API ------------------------------------------------------------
    def query(self, expr: str) -> list[Sample]:
        """PromQL ``expr`` evaluated now (``/api/v1/query``): each series' labels and value;
        a scalar comes back as one sample without labels. Raises RuntimeError when
        Prometheus rejects the expression."""
        reply = self._in_place(lambda: self._get("/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr})))
        # {"status": "success", "data": {"resultType": "vector", "result":
        #   [{"metric": {LABEL: VALUE}, "value": [UNIX_TIME, "VALUE"]}]}}; scalar and string
        # results have "result": [UNIX_TIME, "VALUE"]; values are strings ("NaN", "+Inf").
        if reply.get("status") != "success":
            raise RuntimeError(f"prometheus: {expr}: {reply.get('errorType')}: "
                               f"{reply.get('error')}")
        data = reply["data"]
        if data["resultType"] == "vector":
            return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise RuntimeError(f"prometheus: {expr}: a {data['resultType']}, not an instant vector")

    def wait_for(self, expr: str, predicate: Callable[[list[Sample]], bool],
                 timeout: float = 15.0) -> list[Sample]:
        """Query ``expr`` every 0.25 s until ``predicate`` holds for the result; that result.
        Raises TimeoutError with the last result."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if predicate(samples):
                return samples
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prometheus: {expr} gave {samples} for {timeout:g} s")
            time.sleep(0.25)

    def _ready(self) -> bool:
        try:
            with self._opener.open(self.url + "/-/ready", timeout=2) as reply:
                status: int = reply.status
                return status == 200
        except (OSError, http.client.HTTPException):
            return False  # not listening yet, or a 503 while it starts

    def _get(self, path: str) -> Any:
        try:
            with self._opener.open(self.url + path, timeout=5) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            # A bad expression is a 400 with the same JSON body as a success.
            with exc:
                return json.load(exc)

    def _in_place(self, call: Callable[[], T]) -> T:
        """``call()`` in the server's namespace (a thread that joined it), or here."""
        if self.netns is None:
            return call()
        return in_netns(self.netns, call, timeout=10.0)
