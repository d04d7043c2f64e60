"""One guest's mutual-TLS session on the host: the I/O shell of GuestState (which makes
every decision, server/gueststate.py): the TLS transport, the guest's identity and
admission, a backend stream per guest stream, one timer, keepalive, and flow control:
while the guest does not read what it is sent, its connection and backend streams are not
read and STATE waits, so it costs bounded memory (the write buffer, one reply a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from functools import partial

from pcsc_bridge import log, netio, tls
from pcsc_bridge.backend import Backend, BackendError, BackendStream
from pcsc_bridge.framing import ALPN, Hello, Ping, Reason

from .gueststate import GuestState, GuestStream


class GuestSession(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.backend: Backend = server.backend
        self.limits = server.config.limits
        self.loop = asyncio.get_running_loop()
        self.state: GuestState | None = None   # once the peer speaks the wire protocol
        self.transport = None
        self.guest = self.peer = "?"
        self.serial = 0
        self.cert: dict = {}
        self.not_after: float | None = None
        # accept time: TLS handshake and HELLO must be done by accepted + handshake_timeout
        self.accepted = self.loop.time()
        self.since = time.time()      # for `pcsc-bridge status`
        self.counters = None          # this guest's in server.metrics, once it is known
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None   # GuestState's next deadline
        self._timer_at = 0.0
        self._keepalive: netio.KeepaliveTimer | None = None
        self._unlisten = None

    closed = property(lambda self: self._closed or bool(self.state and self.state.closed))
    ready = property(lambda self: self.state is not None and self.state.ready)

    # --- connection ---------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        self.guest = self.server.identity(ssl_object)
        self.counters = self.server.metrics.guest(self.guest)
        cert = (ssl_object.getpeercert() if ssl_object else None) or {}
        self.cert = cert                    # for a reload's CRL
        self.serial = tls.serial_of(cert)
        self.not_after = ssl.cert_time_to_seconds(cert["notAfter"]) \
            if cert.get("notAfter") else None
        if alpn != ALPN:
            return self.fail(f"peer did not negotiate ALPN {ALPN} (got {alpn})")
        policy = self.server.config.policy_for(self.guest)
        self.state = GuestState(self, self.guest, policy, self.limits, self.backend.model,
                                self.server.metrics, self.counters, self.loop.time(),
                                time.time(), self.server.readers)
        if self.server.tls.is_revoked(cert):
            return self.fail(f"its certificate (serial {self.serial:x}) is revoked; a new "
                             f"one: pcsc-bridge certs client {self.guest} --force on the CA "
                             "host", Reason.POLICY)
        if not policy.allow:
            return self.fail("guest not allowed by policy", Reason.POLICY)
        refused = self.server.admit(self)
        if refused:
            return self.fail(refused[0], Reason.LIMIT, limit=refused[1])
        transport.set_write_buffer_limits(self.limits.write_buffer)
        self._keepalive = netio.KeepaliveTimer(
            self.state.keepalive, lambda token: self.state.send(Ping(token)), self._dead,
            lambda: self.ready and not self.closed)
        self.loop.call_at(self.accepted + self.limits.handshake_timeout, self._handshake_end)

    def _handshake_end(self):
        if not self.ready and not self.closed:
            self.fail("no HELLO within the handshake timeout", Reason.TIMEOUT)

    def fail(self, reason: str, code: int = Reason.PROTOCOL_ERROR, limit: str | None = None):
        """End the connection: GOAWAY with ``code`` and ``reason`` (when the peer speaks
        the wire protocol), then close. Before HELLO this is a refusal. A guest can have
        this happen again and again (reconnecting): logged through the server's Repeats."""
        event = "guest.refused" if not self.ready else "guest.dropped"
        if not self.ready and not self.closed and self.counters is not None:
            self.counters.refused += 1
        # keyed by who (the certificate's name, else the address) and why in our terms
        # (the GOAWAY code, the limit): never by text the peer's bytes chose
        who = self.guest if self.guest != "?" else self.peer.rpartition(":")[0]
        self.server.refusals(log.warning, event, (event, who, code, limit),
                             guest=self.guest, peer=self.peer, reason=reason, limit=limit)
        if self.transport is None or self.closed:
            return
        if self.state is None:
            self._closed = True
            self.transport.abort()
            return
        self.state.abort(code, reason)
        self.close()
        # a peer that does not answer the TLS close is cut off at the handshake bound
        self.loop.call_later(self.limits.handshake_timeout, self.transport.abort)

    def connection_lost(self, exc):
        if self.transport is None:
            return
        self._closed = True
        self.server.release(self)
        for undo in (self._unlisten, self._keepalive and self._keepalive.cancel,
                     self._timer and self._timer.cancel):
            if undo:
                undo()
        if self.state is not None:
            self.state.disconnected(self.loop.time())
            if self.state.ready:
                log.info("guest.disconnected", guest=self.guest, peer=self.peer,
                         error=str(exc) if exc else None)

    def data_received(self, data):
        state = self.state
        if state is not None and not self.closed:
            self.counters.received += len(data)
            state.receive(data, self.loop.time())
            self._arm()

    def pause_writing(self):
        self.state.pause(self.loop.time())
        self.transport.pause_reading()
        for stream in self.state.streams.values():
            if stream.backend is not None:
                stream.backend.pause_reading()

    def resume_writing(self):
        self.state.resume(self.loop.time())
        for stream in self.state.streams.values():
            if stream.backend is not None:
                stream.backend.resume_reading()
        if not self.closed:
            self.transport.resume_reading()

    # --- GuestShell ---------------------------------------------------------------------
    def write(self, data: bytes, more: bool = False) -> None:
        self.counters.sent += len(data)
        if more:
            self.transport.write_batched(data)
        else:
            self.transport.write(data)

    def greeted(self, hello: Hello) -> Hello:
        self.counters.accepted += 1
        server, backend = self.server, self.backend
        log.info("guest.connected", guest=self.guest, peer=self.peer, agent=hello.software,
                 host=hello.extra.get("host"), wire=self.state.conn.version,
                 backend=backend.name, dialect=server.backend_dialect())
        self._unlisten = backend.model.listen(self._states_changed)
        return Hello(software=server.software, dialect=server.backend_dialect(),
                     keepalive=self.limits.keepalive_interval,
                     extra={"guest": self.guest, "backend": backend.name,
                            "pcsc": backend.describe()})

    def submit(self, stream: GuestStream, msg) -> None:
        if stream.done is None:    # the backend stream's ``done(reply, error)``
            stream.done = partial(self._call, self.state.answered, stream)
        backend = stream.backend
        if backend is None:
            self.loop.create_task(self._open_and_submit(stream, msg))
            return
        try:
            backend.submit(msg, stream.done)
        except BackendError as exc:
            stream.done(None, exc)

    async def _open_and_submit(self, stream: GuestStream, msg) -> None:
        try:
            backend = await self.backend.open_stream(stream.app)
        except BackendError as exc:
            stream.done(None, exc)
            return
        if stream.ended:
            await _close_quietly(backend)
            return
        stream.backend = backend
        backend.watch(lambda: self._call(self.state.lost, stream))
        if self.state.paused:
            backend.pause_reading()
        self.submit(stream, msg)

    def ended(self, stream: GuestStream) -> None:
        backend, stream.backend = stream.backend, None
        if backend is not None:
            self.loop.create_task(_close_quietly(backend))

    def close(self) -> None:
        self._closed = True
        if self.state is not None:
            self.state.closed = True
        self.transport.close()

    # --- time, STATE, reload, GOAWAY ----------------------------------------------------
    def _call(self, method, *args) -> None:
        """``method(*args, now)`` of the state, then its next deadline armed."""
        method(*args, self.loop.time())
        self._arm()

    def _arm(self) -> None:
        """One timer for GuestState's next deadline (call_timeout, a hold's end)."""
        state = self.state
        if not state.timed():
            return
        when = state.next_deadline(self.loop.time())
        if when is not None and (self._timer is None or when < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self.loop.call_at(when, self._tick), when

    def _tick(self) -> None:
        self._timer = None
        if not self.closed:
            self._call(self.state.tick)

    def _states_changed(self) -> None:
        if self.state.states_changed():   # STATE with the next REPLY, or on its own soon
            self.loop.call_soon(self.state.send_states)

    def reconfigure(self, policy) -> None:
        """A reload's policy for this guest (GuestState.reconfigure)."""
        if self.state.reconfigure(policy, self.loop.time()):
            self.loop.call_soon(self.state.send_states)
        self._arm()

    def go_away(self, code: int = Reason.SHUTDOWN, text: str = "server shutting down"):
        if self.state is not None:
            self.state.go_away(code, text)

    def _dead(self, reason: str) -> None:
        if not self.closed:
            log.warning("guest.timeout", guest=self.guest, peer=self.peer, reason=reason)
            self.close()
            self.transport.abort()


async def _close_quietly(backend: BackendStream) -> None:
    with contextlib.suppress(Exception):
        await backend.close()
