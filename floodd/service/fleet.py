"""The fleet link: floodd's client of a CrowdSec Local API (LAPI), in a thread of its own.

The main loop never waits for the LAPI: it hands the link plain messages
(floodd.decide.fleet: :class:`PushBan`, :class:`Withdraw`, :class:`Claim`) and takes the
stream's replies (:class:`FleetUpdate`) once a tick; the link's state for ``floodd
status`` is one frozen :class:`LinkState`, replaced whole.  Every HTTP call has a
timeout; a LAPI that is down, slow or answers garbage costs only this thread's time.

The LAPI's API (CrowdSec 1.4), as used here:

- ``POST /v1/watchers/login`` ``{"machine_id", "password", "scenarios": []}`` -> ``{"code":
  200, "token": JWT, "expire": RFC 3339}``; the token (``Authorization: Bearer``) lasts an
  hour and is renewed ``RENEW_BEFORE`` ahead, or after a 401.
- ``POST /v1/alerts`` ``[alert]`` -> 201 ``["ALERT_ID"]``; ``GET /v1/alerts/ID`` -> the
  alert with ``decisions: [{"id", ...}]``: the ids a withdrawal deletes, one by one, with
  ``DELETE /v1/decisions/ID`` (a machine's token may; a delete by value would also remove
  other machines' and operators' decisions of the same address).
- ``GET /v1/decisions/stream[?startup=true]`` with ``X-Api-Key`` -> ``{"new": [decision] |
  null, "deleted": [decision] | null}``; the LAPI remembers each key's position: deltas
  after the first reply.  ``deleted`` repeats decisions already reported.  A startup
  reply is asked for at start and again after every loss of the link, and replaces what
  floodd knew.

Pushes wait in a bounded queue (the oldest dropped, and counted, when full) and are
retried with back-off; a reply the LAPI refuses for good (4xx other than 401) drops that
one message.  The journal says once when the link is lost, with why, and once when it is
back.  Every field of a reply is checked; a bad reply is one line in the journal.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

from floodd import __version__
from floodd.config import CrowdsecConfig
from floodd.decide.fleet import (ORIGIN, SCENARIO_PREFIX, Claim, Decision, FleetUpdate,
                                 Message, PushBan, Withdraw, parse_go_duration, scenario)
from floodd.scope import Target
from floodd.service.journal import EventLog

TIMEOUT = 5.0  # seconds: any one HTTP call
RENEW_BEFORE = 300.0  # seconds before the token's expiry it is renewed
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0  # seconds between attempts while the LAPI fails
QUEUE_MAX = 10_000  # messages waiting for the LAPI
MAX_REPLY = 64 * 1024 * 1024  # bytes: a startup stream with community blocklists is large
USER_AGENT = f"floodd/{__version__}"


class LapiError(Exception):
    """The LAPI could not be reached or answered something unusable (one line)."""

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status

    @property
    def permanent(self) -> bool:
        """A refusal that asking again will not change (a 4xx other than 401 and 429)."""
        return self.status is not None and 400 <= self.status < 500 and \
            self.status not in (401, 429)


# --- reading replies: every field checked ---------------------------------------------
def _field(obj: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(obj, dict):
        raise LapiError(f"{what}: expected an object, got {type(obj).__name__}")
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise LapiError(f"{what}: field {key!r} missing or not "
                        f"{getattr(kind, '__name__', kind)}")
    return value


def parse_login(data: Any) -> tuple[str, float]:
    """(token, unix time it expires) from a login reply."""
    token = _field(data, "token", str, "login reply")
    expire = _field(data, "expire", str, "login reply")
    if not token or len(token) > 8192 or not token.isascii() or not token.isprintable():
        raise LapiError("login reply: the token is not printable text")
    try:
        when = datetime.fromisoformat(expire.replace("Z", "+00:00"))
    except ValueError:
        raise LapiError(f"login reply: expire {expire[:40]!r} is not a time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return token, when.timestamp()


def parse_alert_ids(data: Any) -> list[int]:
    """The alert ids of a ``POST /v1/alerts`` reply (a list of decimal strings)."""
    if not isinstance(data, list) or not data:
        raise LapiError("alerts reply: expected a non-empty list of alert ids")
    return [_id(v, "alerts reply") for v in data]


def parse_alert_decisions(data: Any) -> list[int]:
    """The decision ids of a ``GET /v1/alerts/ID`` reply."""
    decisions = _field(data, "decisions", list, "alert")
    return [_id(_field(d, "id", int, "alert decision"), "alert decision") for d in decisions]


def _id(value: Any, what: str) -> int:
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise LapiError(f"{what}: {str(value)[:40]!r} is not an id")
    return value


@dataclass(frozen=True)
class Stream:
    """One decision-stream reply, read: what was usable, and what was not."""

    new: tuple[Decision, ...]
    deleted: tuple[int, ...]
    other_scopes: int  # decisions of scopes floodd cannot ban (Country, AS, ...)
    bad: int  # entries with a missing or malformed field
    first_bad: str  # what was wrong with the first of them


def parse_stream(data: Any) -> Stream:
    """The decisions of a stream reply; LapiError if the reply itself is malformed."""
    if not isinstance(data, dict):
        raise LapiError(f"decision stream: expected an object, got {type(data).__name__}")
    lists = {}
    for key in ("new", "deleted"):
        value = data.get(key)
        if value is not None and not isinstance(value, list):
            raise LapiError(f"decision stream: {key!r} is not a list")
        lists[key] = value or []
    new: list[Decision] = []
    deleted: list[int] = []
    other = bad = 0
    first_bad = ""
    for key, out in (("new", new), ("deleted", deleted)):
        for raw in lists[key]:
            try:
                decision = parse_decision(raw)
            except LapiError as exc:
                bad += 1
                first_bad = first_bad or str(exc)
                continue
            if decision is None:
                other += 1
            elif key == "new":
                new.append(decision)
            else:
                deleted.append(decision.id)
    return Stream(tuple(new), tuple(deleted), other, bad, first_bad)


def parse_decision(raw: Any) -> Decision | None:
    """One decision of the stream (None: a scope other than Ip and Range)."""
    what = "decision"
    key = _id(_field(raw, "id", int, what), what)
    what = f"decision {key}"
    fields = {name: _field(raw, name, str, what)
              for name in ("origin", "scenario", "scope", "type", "value", "duration")}
    for name, text in fields.items():
        if len(text) > 1024 or not text.isprintable():
            raise LapiError(f"{what}: {name} is not printable text of at most 1024 "
                            "characters")
    scope = fields["scope"].lower()
    if scope not in ("ip", "range"):
        return None
    try:
        if scope == "ip":
            network = ipaddress.ip_network(ipaddress.ip_address(fields["value"]))
        else:
            network = ipaddress.ip_network(fields["value"], strict=True)
    except ValueError:
        raise LapiError(f"{what}: value {fields['value'][:50]!r} is not an "
                        f"{'address' if scope == 'ip' else 'address range'}") from None
    try:
        seconds = parse_go_duration(fields["duration"])
    except ValueError:
        raise LapiError(f"{what}: duration {fields['duration'][:40]!r} is not a "
                        "duration") from None
    return Decision(key, fields["origin"], fields["scenario"],
                    "Ip" if scope == "ip" else "Range", network, fields["type"], seconds)


def alert_body(push: PushBan, machine_id: str, now: float) -> list[dict[str, Any]]:
    """The alert (with its one decision) for a ban floodd made, at unix time ``now``."""
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    single = push.network.prefixlen == push.network.max_prefixlen
    scope = "Ip" if single else "Range"
    value = str(push.network.network_address) if single else str(push.network)
    name = scenario(push.rule, push.scope)
    return [{
        "scenario": name, "scenario_hash": "", "scenario_version": __version__,
        "message": push.message, "events_count": 1, "capacity": 0, "leakspeed": "0",
        "simulated": False, "start_at": stamp, "stop_at": stamp,
        "events": [{"timestamp": stamp, "meta": [{"key": "machine", "value": machine_id}]}],
        "source": {"scope": scope, "value": value},
        "decisions": [{"origin": ORIGIN, "type": "ban", "scope": scope, "value": value,
                       "duration": f"{max(1, round(push.seconds))}s", "scenario": name}],
    }]


# --- HTTP -----------------------------------------------------------------------------
class LapiClient:
    """Blocking calls to one LAPI (only the link's thread uses it)."""

    def __init__(self, config: CrowdsecConfig, timeout: float = TIMEOUT) -> None:
        assert config.url is not None
        self.config = config
        self.base = config.url + "/v1"
        self.timeout = timeout
        self._token: str | None = None
        self._token_until = 0.0  # unix time to renew by

    def _call(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "User-Agent": USER_AGENT, "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {}),
            **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                raw = reply.read(MAX_REPLY + 1)
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = str(json.loads(exc.read(4096)).get("message", ""))[:120]
            except (ValueError, AttributeError, OSError):
                pass
            raise LapiError(f"{method} {path.split('?')[0]}: HTTP {exc.code}"
                            + (f" ({detail})" if detail else ""), exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LapiError(f"{method} {path.split('?')[0]}: {reason}") from None
        if len(raw) > MAX_REPLY:
            raise LapiError(f"{method} {path.split('?')[0]}: reply over {MAX_REPLY} bytes")
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise LapiError(f"{method} {path.split('?')[0]}: reply is not JSON") from None

    # machines
    def _auth(self) -> dict[str, str]:
        if self._token is None or time.time() >= self._token_until:
            self.login()
        assert self._token is not None
        return {"Authorization": f"Bearer {self._token}"}

    def login(self) -> None:
        self._token = None
        reply = self._call("POST", "/watchers/login", {
            "machine_id": self.config.machine_id, "password": self.config.password,
            "scenarios": []})
        token, expire = parse_login(reply)
        self._token = token
        self._token_until = min(expire, time.time() + 3600) - RENEW_BEFORE

    def _as_machine(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self._call(method, path, body, self._auth())
        except LapiError as exc:
            if exc.status != 401:
                raise
            self.login()  # the token was refused (a LAPI restarted with a new secret)
            return self._call(method, path, body, self._auth())

    def push(self, push: PushBan) -> int:
        """Send the alert; its id."""
        ids = parse_alert_ids(self._as_machine(
            "POST", "/alerts", alert_body(push, self.config.machine_id, time.time())))
        return ids[0]

    def decision_ids(self, alert: int) -> list[int]:
        return parse_alert_decisions(self._as_machine("GET", f"/alerts/{alert}"))

    def delete(self, decision: int) -> None:
        try:
            self._as_machine("DELETE", f"/decisions/{decision}")
        except LapiError as exc:
            if exc.status != 404:  # gone already (expired and flushed, deleted by hand)
                raise

    # bouncers
    def stream(self, startup: bool) -> Stream:
        return parse_stream(self._call(
            "GET", "/decisions/stream" + ("?startup=true" if startup else ""),
            headers={"X-Api-Key": self.config.api_key}))


# --- the link --------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkState:
    """The fleet link as ``floodd status`` shows it."""

    url: str
    push: bool
    pull: bool
    up: bool | None = None  # None: not tried yet
    since: float = 0.0  # unix time of the last change of ``up``
    error: str = ""  # why it is down
    queued: int = 0  # messages waiting for the LAPI
    dropped: int = 0  # messages dropped because the queue was full
    pushed: int = 0  # bans sent
    withdrawn: int = 0  # decisions deleted
    pulled: int = 0  # decisions received
    last_pull: float | None = None  # unix time of the last good stream reply

    def as_json(self) -> dict[str, Any]:
        return {"url": self.url, "push": self.push, "pull": self.pull,
                "state": "connecting" if self.up is None else "up" if self.up else "down",
                "since": self.since, "error": self.error, "queued": self.queued,
                "dropped": self.dropped, "pushed": self.pushed, "withdrawn": self.withdrawn,
                "pulled": self.pulled, "last_pull": self.last_pull}


@dataclass
class _Pushed:
    """What the LAPI holds of one of floodd's bans."""

    decisions: list[int] = field(default_factory=list)  # its live decisions
    alerts: list[int] = field(default_factory=list)  # alerts sent, decision ids not read yet
    stale: list[int] = field(default_factory=list)  # decisions a newer push replaces
    sent: PushBan | None = None  # the last push sent


class FleetLink:
    """The thread that talks to the LAPI; see the module docstring."""

    def __init__(self, config: CrowdsecConfig, log: EventLog,
                 client: LapiClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.log = log
        self.client = client or LapiClient(config)
        self.clock = clock
        assert config.url is not None
        self.state = LinkState(config.url, config.push, config.pull)
        self._state_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: collections.deque[Message] = collections.deque()
        self._updates: collections.deque[FleetUpdate] = collections.deque()
        self._stop = False
        self._own: dict[Target, _Pushed] = {}  # this node's bans the LAPI holds
        self._own_ids: set[int] = set()
        self._startup = True  # the next stream request asks for everything
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._next_pull = 0.0
        self._thread = threading.Thread(target=self._run, name="floodd-fleet", daemon=True)

    # --- the main loop's side --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = TIMEOUT + 1) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, messages: list[Message]) -> None:
        """Queue messages for the LAPI; returns at once.  A withdrawal cancels the pushes
        of the same target still waiting."""
        if not messages or not self.config.push:
            return
        with self._cond:
            for msg in messages:
                if isinstance(msg, Withdraw):
                    kept = [m for m in self._queue
                            if not (isinstance(m, PushBan) and m.target == msg.target)]
                    if len(kept) != len(self._queue):
                        self._queue = collections.deque(kept)
                self._queue.append(msg)
                if len(self._queue) > QUEUE_MAX:
                    self._queue.popleft()
                    self._count("dropped")
            self._set(queued=len(self._queue))
            self._cond.notify()

    def updates(self) -> list[FleetUpdate]:
        """The stream replies that arrived since the last call, oldest first."""
        with self._cond:
            out = list(self._updates)
            self._updates.clear()
        return out

    # --- the thread ------------------------------------------------------------------
    def _set(self, **changes: Any) -> None:
        with self._state_lock:
            self.state = replace(self.state, **changes)

    def _count(self, name: str, n: int = 1) -> None:
        with self._state_lock:
            self.state = replace(self.state, **{name: getattr(self.state, name) + n})

    def _run(self) -> None:
        while True:
            with self._cond:
                now = self.clock()
                wake = self._retry_at if self._queue else float("inf")
                if self.config.pull:
                    wake = min(wake, max(self._next_pull, self._retry_at))
                if not self._stop and wake > now:
                    self._cond.wait(min(wake - now, 1.0))
                if self._stop:
                    return
            now = self.clock()
            if now < self._retry_at:
                continue
            problems = []
            for wanted, step in ((self.config.push, self._deliver),
                                 (self.config.pull and now >= self._next_pull, self._pull)):
                if not wanted:
                    continue
                try:
                    step()
                except LapiError as exc:
                    problems.append(str(exc))
                except Exception as exc:  # a bug here must not end the link for good
                    problems.append(f"internal error: {type(exc).__name__}: {exc}")
            if problems:
                self._failed("; ".join(problems))
            else:
                self._working()

    def _working(self) -> None:
        self._backoff = BACKOFF_MIN
        if self.state.up is not True:
            if self.state.up is False:
                self.log.notice(f"fleet link to {self.config.url} is back "
                                f"({len(self._queue)} messages waiting)", action="fleet")
            else:
                self.log.info(f"fleet link to {self.config.url} is up", action="fleet")
            self._set(up=True, since=time.time(), error="")

    def _failed(self, why: str) -> None:
        self._retry_at = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._startup = True  # whatever was missed: everything again once back
        if self.state.up is not False:
            self.log.warning(f"fleet link to {self.config.url} lost: {why}; floodd keeps "
                             "banning on its own and retries", action="fleet")
            self._set(up=False, since=time.time(), error=why)
        elif why != self.state.error:
            self._set(error=why)

    def _deliver(self) -> None:
        """Send the queued messages in order; on a failure the message stays first."""
        while True:
            with self._cond:
                if not self._queue:
                    return
                msg = self._queue[0]
            try:
                self._send(msg)
            except LapiError as exc:
                if not exc.permanent:
                    raise
                self.log.warning(f"fleet: the LAPI refused {_describe(msg)}, dropped: {exc}",
                                 action="fleet")
            with self._cond:
                if self._queue and self._queue[0] is msg:
                    self._queue.popleft()
                self._set(queued=len(self._queue))

    def _send(self, msg: Message) -> None:
        entry = self._own.setdefault(msg.target, _Pushed())
        if isinstance(msg, Claim):
            entry.decisions.extend(i for i in msg.ids if i not in entry.decisions)
            self._own_ids.update(msg.ids)
            return
        if isinstance(msg, PushBan) and entry.sent is not msg:
            # A push replacing an earlier one of the same ban (an extension): the new
            # decision first, then the old ones go, so that the fleet never sees a gap.
            entry.stale.extend(entry.decisions)
            entry.decisions = []
            entry.alerts.append(self.client.push(msg))
            entry.sent = msg
            self._count("pushed")
        while entry.alerts:  # a retry resumes here
            ids = self.client.decision_ids(entry.alerts[0])
            entry.decisions.extend(ids)
            self._own_ids.update(ids)
            entry.alerts.pop(0)
        if isinstance(msg, Withdraw):
            entry.stale.extend(entry.decisions)
            entry.decisions = []
        while entry.stale:
            self.client.delete(entry.stale[0])
            self._own_ids.discard(entry.stale.pop(0))
            self._count("withdrawn")
        if not entry.decisions:
            del self._own[msg.target]

    def _pull(self) -> None:
        startup = self._startup
        reply = self.client.stream(startup)
        at = self.clock()
        self._next_pull = at + self.config.pull_interval
        self._startup = False
        if reply.bad:
            self.log.warning(f"fleet: {reply.bad} malformed decisions in the LAPI's reply "
                             f"skipped (first: {reply.first_bad})", action="fleet")
        # This node's own decisions coming back: by id, or a floodd decision of a ban the
        # LAPI holds for this node (its ids not read yet).
        mine = {t.network for t in self._own}
        new = tuple(d for d in reply.new if d.id not in self._own_ids and not (
            d.scenario.startswith(SCENARIO_PREFIX) and d.network in mine))
        with self._cond:
            self._updates.append(FleetUpdate(at, startup, new, reply.deleted))
        self._count("pulled", len(reply.new))
        self._set(last_pull=time.time())


def _describe(msg: Message) -> str:
    if isinstance(msg, PushBan):
        return f"the ban of {msg.target}"
    if isinstance(msg, Withdraw):
        return f"the withdrawal of {msg.target}"
    return f"the claim of {msg.target}"


def fleet_line(fleet: dict[str, Any]) -> str:
    """The fleet link in one line, from the ``fleet`` object of the status reply."""
    since = time.strftime("%H:%M:%S", time.localtime(fleet["since"])) if fleet["since"] else ""
    state = fleet["state"] + (f" since {since}" if since else "")
    if fleet["state"] == "down":
        state += f" ({fleet['error']})"
    parts = []
    if fleet["pull"]:
        parts.append(f"{fleet['bans']} fleet bans from {fleet['decisions']} decisions")
    if fleet["push"]:
        parts.append(f"{fleet['pushed']} bans pushed, {fleet['queued']} waiting"
                     + (f", {fleet['dropped']} dropped (queue full)" if fleet["dropped"]
                        else ""))
    return f"fleet: {fleet['url']} {state}: " + "; ".join(parts)
