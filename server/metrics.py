"""The server's counters, and ``server.metrics_listen``: a Prometheus text endpoint.

``Metrics`` holds what the guests' sessions count as they go (calls per guest and call,
failed calls, sessions, bytes; calls, APDUs, card uses and policy denials per reader;
each call's time from its arrival to its answer, as a histogram per call; how long
readers were held to one application, as a histogram per reader). It lives as
long as the server process: reloads keep it, and a guest's counters stay when it
disconnects (they are totals). Gauges (guests connected, streams, cards in use,
applications waiting for a reader's transaction) are read from the sessions and the
shared readers (bridge/share.py) at scrape time, so a guest that is gone shows 0.

``MetricsEndpoint`` serves ``GET /metrics`` over plain HTTP/1.1 (text exposition format
0.0.4), one request per connection, with a bounded request, a bounded time for the whole
exchange and a bounded number of connections: a scraper that is slow or hostile holds at
most a few file descriptors for a few seconds, and costs the guests nothing else.
"""

from __future__ import annotations

import asyncio
import platform
import time
from bisect import bisect_left

from pcsc_bridge import __version__, log, netio
from pcsc_bridge.commands import CARD_CALLS
from pcsc_bridge.pcsc import rv_name

# seconds; card calls take from ~100 µs (virtual card, a cached answer) to seconds (key
# generation on a card, a transaction waiting for another application's)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# seconds a reader was held (a transaction, an exclusive connection): from one APDU's
# transaction to a job that keeps the reader (hold_limit ends those)
HOLD_BUCKETS = (0.01, 0.1, 1.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
MAX_REQUEST = 8192          # bytes of request line and headers
EXCHANGE_TIMEOUT = 10.0     # seconds from accept to the answer written, else cut off
MAX_CONNECTIONS = 8         # connections kept at once; a new one cuts off the oldest
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def call_name(kind: type) -> str:
    """The pcsc-lite call a message class stands for: Transmit -> SCardTransmit."""
    return "SCard" + kind.__name__


class Histogram:
    """Observations per bucket (not cumulative: one increment per observation); the
    last count is above the largest bound (+Inf only)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def samples(self, labels: tuple) -> list:
        """Its samples in the exposition format (cumulative buckets, sum, count)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, "+Inf"), self.counts):
            total += n
            out.append(("_bucket", (*labels, ("le", _number(bound))), total))
        out.append(("_sum", labels, self.sum))
        out.append(("_count", labels, total))
        return out


class GuestCounters:
    """One guest's totals (all its sessions, since the server started)."""

    __slots__ = ("accepted", "calls", "errors", "received", "refused", "sent")

    def __init__(self):
        self.calls = dict.fromkeys(CARD_CALLS, 0)   # message class -> calls received
        self.errors: dict[tuple[type, int], int] = {}   # (class, rv) -> answers
        self.accepted = self.refused = 0   # sessions (HELLO exchanged / refused)
        self.received = self.sent = 0      # bytes of wire frames (inside TLS)

    def error(self, kind: type, rv: int) -> None:
        key = (kind, rv)
        self.errors[key] = self.errors.get(key, 0) + 1


class ReaderCounters:
    """One reader's totals, for the calls of every guest."""

    __slots__ = ("apdus", "calls", "denials", "uses")

    def __init__(self):
        self.calls = self.apdus = self.uses = self.denials = 0


class Metrics:
    def __init__(self, server):
        self.server = server
        self.started = time.time()
        self._started = time.monotonic()   # uptime, whatever the clock does
        self.guests: dict[str, GuestCounters] = {}
        self.readers: dict[str, ReaderCounters] = {}
        self.latency = {kind: Histogram() for kind in CARD_CALLS}
        self.holds: dict[str, Histogram] = {}   # reader -> how long it was held
        self.tls_refused = 0   # connections refused at the TLS handshake (no name yet)
        self.handshakes_dropped = 0   # dropped before TLS for a newer one (max_handshakes)

    def guest(self, name: str) -> GuestCounters:
        """The counters of guest ``name`` (a certificate the CA signed: a bounded set)."""
        counters = self.guests.get(name)
        if counters is None:
            counters = self.guests[name] = GuestCounters()
        return counters

    def reader(self, name: str) -> ReaderCounters | None:
        """The counters of reader ``name``, if the backend has such a reader (a guest's
        made-up reader name makes no series)."""
        counters = self.readers.get(name)
        if counters is None and name in self.server.backend.model.names():
            counters = self.readers[name] = ReaderCounters()
        return counters

    def held(self, reader: str, seconds: float) -> None:
        """A hold of ``reader`` ended after ``seconds`` (bridge/share.py's ``Readers``)."""
        if self.reader(reader) is not None:
            hist = self.holds.get(reader)
            if hist is None:
                hist = self.holds[reader] = Histogram(HOLD_BUCKETS)
            hist.observe(seconds)

    # --- exposition ---------------------------------------------------------------------
    def render(self) -> str:
        """Every metric in the text exposition format 0.0.4."""
        server = self.server
        out: list[str] = []
        for name in server.backend.model.names():   # every reader, used or not yet
            self.reader(name)

        def family(name: str, kind: str, text: str, samples) -> None:
            out.append(f"# HELP pcsc_bridge_{name} {_help(text)}")
            out.append(f"# TYPE pcsc_bridge_{name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"pcsc_bridge_{name}{suffix}{_labels(labels)} {_number(value)}")

        ready = [s for s in server.sessions if s.ready and not s.closed]
        connected = dict.fromkeys(self.guests, 0)
        streams = dict.fromkeys(self.guests, 0)
        for s in ready:
            connected[s.guest] = connected.get(s.guest, 0) + 1
            streams[s.guest] = streams.get(s.guest, 0) + len(s.state.streams)
        in_use = dict.fromkeys(self.readers, 0)
        for s in server.sessions:
            for use in s.state.enforcer.handles.values() if s.state is not None else ():
                if use.reader in in_use:
                    in_use[use.reader] += 1
        guests = sorted(self.guests.items())
        readers = sorted(self.readers.items())

        family("build_info", "gauge", "Version of this server (value 1).",
               [("", (("version", __version__),
                      ("python", platform.python_version())), 1)])
        family("start_time_seconds", "gauge", "When the server started (Unix time).",
               [("", (), self.started)])
        family("uptime_seconds", "gauge", "Seconds since the server started.",
               [("", (), time.monotonic() - self._started)])
        family("guests_connected", "gauge", "Guest sessions connected now.",
               [("", (), len(ready))])
        family("tls_refused_total", "counter",
               "Connections refused at the TLS handshake (no guest name known).",
               [("", (), self.tls_refused)])
        family("handshakes_dropped_total", "counter",
               "Connections dropped before finishing TLS to make room for newer ones "
               "(limits.max_handshakes, limits.handshakes_per_address).",
               [("", (), self.handshakes_dropped)])
        family("guest_connected", "gauge", "Sessions of this guest connected now.",
               [("", (("guest", g),), connected.get(g, 0)) for g, _ in guests])
        family("guest_streams", "gauge", "Applications of this guest with a stream now.",
               [("", (("guest", g),), streams.get(g, 0)) for g, _ in guests])
        family("guest_sessions_accepted_total", "counter",
               "Sessions of this guest accepted (HELLO exchanged).",
               [("", (("guest", g),), c.accepted) for g, c in guests])
        family("guest_sessions_refused_total", "counter",
               "Sessions of this guest refused (policy, limits, handshake).",
               [("", (("guest", g),), c.refused) for g, c in guests])
        family("guest_calls_total", "counter", "PC/SC calls received from this guest.",
               [("", (("guest", g), ("call", call_name(k))), n)
                for g, c in guests for k, n in sorted(c.calls.items(), key=_by_name)])
        family("guest_call_errors_total", "counter",
               "Calls of this guest answered with an error (rv is not SCARD_S_SUCCESS).",
               [("", (("guest", g), ("call", call_name(k)), ("rv", rv_name(rv))), n)
                for g, c in guests
                for (k, rv), n in sorted(c.errors.items(), key=_by_error)])
        family("guest_received_bytes_total", "counter",
               "Bytes of wire frames received from this guest (inside TLS).",
               [("", (("guest", g),), c.received) for g, c in guests])
        family("guest_sent_bytes_total", "counter",
               "Bytes of wire frames sent to this guest (inside TLS).",
               [("", (("guest", g),), c.sent) for g, c in guests])
        family("reader_calls_total", "counter",
               "Calls the backend answered on this reader (SCardConnect, calls on its "
               "card handles).",
               [("", (("reader", r),), c.calls) for r, c in readers])
        family("reader_apdus_total", "counter", "SCardTransmit calls answered on this reader.",
               [("", (("reader", r),), c.apdus) for r, c in readers])
        family("reader_card_uses_total", "counter",
               "Card handles opened on this reader (successful SCardConnect).",
               [("", (("reader", r),), c.uses) for r, c in readers])
        family("reader_cards_in_use", "gauge", "Card handles open on this reader now.",
               [("", (("reader", r),), in_use.get(r, 0)) for r, _ in readers])
        family("reader_policy_denials_total", "counter",
               "Calls on this reader a guest's policy refused.",
               [("", (("reader", r),), c.denials) for r, c in readers])
        shared = server.readers
        family("reader_waiters", "gauge",
               "Applications waiting now for this reader's transaction, in line.",
               [("", (("reader", r),), len(shared[r].waiting) if r in shared else 0)
                for r, _ in readers])
        family("reader_hold_seconds", "histogram",
               "How long this reader was held to one application (a transaction, an "
               "exclusive connection), for holds that ended.",
               [s for r, _ in readers
                for s in self.holds.get(r, Histogram(HOLD_BUCKETS)).samples((("reader", r),))])
        family("call_duration_seconds", "histogram",
               "Server-side time of a call, from its arrival to its answer.",
               [s for kind, h in sorted(self.latency.items(), key=_by_name)
                for s in h.samples((("call", call_name(kind)),))])
        return "\n".join(out) + "\n"


def _by_name(item) -> str:
    return item[0].__name__


def _by_error(item) -> tuple:
    return item[0][0].__name__, item[0][1]


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


# --- the endpoint ------------------------------------------------------------------------
class MetricsEndpoint:
    """``GET /metrics`` on the sockets of one address (``server.metrics_listen``)."""

    def __init__(self, metrics: Metrics, address):
        self.metrics = metrics
        self.address = address
        self.servers: list[netio.UnixServer] = []
        self.connections: dict[_Scrape, None] = {}   # oldest first

    async def start(self) -> MetricsEndpoint:
        """Listen; a ConfigError naming ``server.metrics_listen`` if the address cannot
        be listened on."""
        socks = netio.listening_sockets(self.address.host, self.address.port,
                                  "server.metrics_listen")
        for sock in socks:   # the project's accept loop: errors back off, one line
            self.servers.append(netio.UnixServer(sock, on_accept=self._accepted))
        log.info("metrics.listen", address=str(self.address), path="/metrics")
        return self

    def _accepted(self, sock) -> None:
        loop = asyncio.get_running_loop()
        loop.create_task(loop.connect_accepted_socket(lambda: _Scrape(self), sock))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.transport.abort()
        self.servers = []


class _Scrape(asyncio.Protocol):
    """One HTTP/1.1 exchange: the request line and headers (at most MAX_REQUEST bytes,
    within EXCHANGE_TIMEOUT), one answer, then the connection closes."""

    def __init__(self, endpoint: MetricsEndpoint):
        self.endpoint = endpoint
        self.buffer = b""
        self.transport = None
        self.timer = None
        self.answered = False

    def connection_made(self, transport):
        self.transport = transport
        connections = self.endpoint.connections
        if len(connections) >= MAX_CONNECTIONS:   # the oldest makes room
            oldest = next(iter(connections))
            connections.pop(oldest)
            oldest.transport.abort()
        connections[self] = None
        self.timer = asyncio.get_running_loop().call_later(EXCHANGE_TIMEOUT, transport.abort)

    def connection_lost(self, exc):
        self.endpoint.connections.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data):
        if self.answered:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            end = self.buffer.find(b"\n\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST:
                self._answer(431, "request header fields too large\n")
            return
        if end > MAX_REQUEST:
            self._answer(431, "request header fields too large\n")
            return
        line = self.buffer[:end].split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(400, "bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._answer(405, "method not allowed\n", (("Allow", "GET, HEAD"),))
        elif path != b"/metrics":
            self._answer(404, "not found; the metrics are at /metrics\n")
        else:
            self._answer(200, self.endpoint.metrics.render(),
                         (("Content-Type", CONTENT_TYPE),), head=method == b"HEAD")

    def eof_received(self):
        return False   # a request cut short: close

    def _answer(self, status: int, body: str, headers=(), head: bool = False) -> None:
        self.answered = True
        data = body.encode()
        headers = (("Content-Type", "text/plain; charset=utf-8"), *headers) \
            if status != 200 else headers
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}",
                 *(f"{k}: {v}" for k, v in headers),
                 f"Content-Length: {len(data)}", "Connection: close", "", ""]
        self.transport.write("\r\n".join(lines).encode() + (b"" if head else data))
        self.transport.close()   # after the answer is written (EXCHANGE_TIMEOUT bounds it)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}

