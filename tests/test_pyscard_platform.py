"""The pyscard backend against a Windows PC/SC API: what WinSCard says differently from
pcsc-lite reaches guests the way pcsc-lite says it.

The backend runs here on a stand-in for pyscard's ``smartcard.scard`` that answers as
WinSCard does (values from the Windows SDK's winscard.h, winsmcrd.h and winerror.h):
64-bit handles, SCARD_E_UNSUPPORTED_FEATURE as 0x80100022, Win32 errors, control codes
made with CTL_CODE(FILE_DEVICE_SMARTCARD, ...), reader names longer than pcsc-lite's
wire takes. The real backend over the real libpcsclite is the bridge-pyscard target.
"""

from __future__ import annotations

import asyncio

from pcsc_bridge import pcsc as p
from pcsc_bridge.backend import AppInfo
from pcsc_bridge.server.pyscard_backend import PNP, Platform, PyscardBackend

LONG_NAME = "Contoso Smart Card Reader with a Very Long Product Name " * 3 + "0"


def WIN_CTL(code: int) -> int:
    return 0x00310000 | code << 2                         # CTL_CODE for smart cards


FEATURE_REQUEST = WIN_CTL(3400)                           # IOCTL_FEATURE_REQUEST on Windows
VERIFY_PIN_DIRECT = WIN_CTL(3401)
ATR = bytes.fromhex("3B8B015043534320425249444745BB")


class WinSCard:
    """A stand-in for smartcard.scard on Windows: one reader, one card, 64-bit handles."""

    SCARD_SCOPE_USER = 0
    SCARD_STATE_UNAWARE = 0

    def __init__(self):
        self.calls: list[tuple] = []
        self.contexts: set[int] = set()
        self.cards: set[int] = set()
        self.next = 0x7FF6_0000_0000_0010       # handles beyond 32 bits
        self.transmit_rv = 0

    def _handle(self) -> int:
        self.next += 0x1_0000_0001
        return self.next

    def SCardEstablishContext(self, scope):
        h = self._handle()
        self.contexts.add(h)
        return 0, h

    def SCardReleaseContext(self, h):
        self.contexts.discard(h)
        return 0

    def SCardCancel(self, h):
        return 0

    def SCardListReaders(self, h, groups):
        return 0, [LONG_NAME]

    def SCardGetStatusChange(self, h, timeout, states):
        out = []
        for reader, _current in states:
            if reader == PNP:
                out.append((reader, 1 << 16, []))
            else:   # present, in use by another application exclusively, 7 events so far
                out.append((reader, 7 << 16 | 0x20 | 0x80 | 0x2, list(ATR)))
        return 0, out

    def SCardConnect(self, h, reader, share, protocols):
        self.calls.append(("connect", h, reader))
        card = self._handle()
        self.cards.add(card)
        return 0, card, 2

    def SCardTransmit(self, card, protocol, apdu):
        self.calls.append(("transmit", card, protocol, bytes(apdu)))
        if self.transmit_rv:
            return self.transmit_rv, []
        return 0, list(apdu) + [0x90, 0x00]

    def SCardControl(self, card, code, data):
        self.calls.append(("control", card, code))
        if code == FEATURE_REQUEST:
            return 0, list(bytes([0x06, 4]) + VERIFY_PIN_DIRECT.to_bytes(4, "big"))
        return 0x80100022, []                   # SCARD_E_UNSUPPORTED_FEATURE (Windows)

    def SCardDisconnect(self, card, disposition):
        self.cards.discard(card)
        return 0


def run(scenario):
    async def main():
        backend = PyscardBackend(scard=WinSCard(), platform=Platform("win32"))
        await backend.start()
        try:
            stream = await backend.open_stream(AppInfo())

            async def call(msg):
                fut = asyncio.get_running_loop().create_future()
                stream.submit(msg, lambda reply, error: fut.set_result((reply, error)))
                reply, error = await asyncio.wait_for(fut, 5)
                assert error is None, error
                return reply
            return await scenario(backend, call)
        finally:
            await backend.close()
    return asyncio.run(main())


def test_windows_return_codes_become_pcsc_lites():
    w = Platform("win32")
    assert w.rv(0x80100022) == p.SCARD_E_UNSUPPORTED_FEATURE == 0x8010001F
    assert w.rv(-2146435062) == p.SCARD_E_TIMEOUT          # pyscard's signed LONG
    assert w.rv(6) == p.SCARD_E_INVALID_HANDLE              # ERROR_INVALID_HANDLE
    assert w.rv(0x80100031) == p.SCARD_E_NO_SERVICE        # SCARD_E_SERVER_TOO_BUSY
    assert w.rv(0x80100070) == p.SCARD_F_UNKNOWN_ERROR     # SCARD_W_CACHE_ITEM_NOT_FOUND
    assert w.rv(1223) == p.SCARD_F_UNKNOWN_ERROR           # another Win32 error
    assert w.rv(0x8010006A) == p.SCARD_W_SECURITY_VIOLATION and w.rv(0) == 0
    lite = Platform("linux")
    assert lite.rv(0x80100022) == 0x80100022 and lite.rv(-2146435062) == p.SCARD_E_TIMEOUT


def test_control_codes_cross_both_ways():
    w = Platform("win32")
    assert w.control_code(0x42000000 + 3400) == FEATURE_REQUEST == 0x00313520
    assert w.guest_control_code(VERIFY_PIN_DIRECT) == 0x42000000 + 3401
    assert w.control_code(0x1234) == 0x1234                 # not an SCARD_CTL_CODE: as is
    tlv = bytes([0x06, 4]) + VERIFY_PIN_DIRECT.to_bytes(4, "big") \
        + bytes([0x12, 4]) + WIN_CTL(3500).to_bytes(4, "big")
    assert w.features(tlv) == bytes([0x06, 4, 0x42, 0, 0x0D, 0x49, 0x12, 4, 0x42, 0, 0x0D, 0xAC])
    assert Platform("linux").control_code(0x42000D48) == 0x42000D48


def test_reader_states_and_long_names():
    w = Platform("win32")
    st = w.reader_state("R", 7 << 16 | 0x20 | 0x80, ATR, 2)
    assert (st.eventCounter, st.readerSharing, st.cardAtr, st.cardProtocol) == (7, -1, ATR, 2)
    assert st.readerState == p.SCARD_PRESENT | p.SCARD_POWERED | p.SCARD_NEGOTIABLE
    assert w.reader_state("R", 0x10, b"", 0).readerState == p.SCARD_ABSENT
    assert w.reader_state("R", 0x20 | 0x200, ATR, 0).readerState & p.SCARD_SWALLOWED
    wire = w.wire_name(LONG_NAME)
    assert len(wire.encode()) < p.MAX_READERNAME and wire != w.wire_name(LONG_NAME + "1")


def test_64_bit_handles_long_names_and_codes_through_the_backend():
    async def scenario(backend, call):
        await asyncio.sleep(0.1)   # the monitor's first reading
        (entry,) = backend.model.states
        assert len(entry.readerName.encode()) < p.MAX_READERNAME
        assert (entry.readerSharing, entry.eventCounter) == (-1, 7)
        ctx = (await call(p.EstablishContext(0))).hContext
        assert 0 < ctx < 2**31
        conn = await call(p.Connect(ctx, entry.readerName, 2, 3))
        assert conn.rv == 0 and 0 < conn.hCard < 2**31 and conn.dwActiveProtocol == 2
        api = backend.scard
        assert api.calls[-1][2] == LONG_NAME      # the host's name, not the wire's
        (host_card,) = api.cards
        echo = await call(p.Transmit(conn.hCard, 2, 8, 4, 2, 8, 258, 0, b"\x80\xee\0\0"))
        assert (echo.rv, echo.data) == (0, b"\x80\xee\0\0\x90\x00")
        assert api.calls[-1][1] == host_card > 2**32   # 64 bits on the host
        feat = await call(p.Control(conn.hCard, 0x42000D48, 0, 256))
        assert api.calls[-1][2] == FEATURE_REQUEST
        assert feat.data == bytes([0x06, 4, 0x42, 0, 0x0D, 0x49])
        other = await call(p.Control(conn.hCard, 0x42000000 + 3500, 0, 256))
        assert other.rv == p.SCARD_E_UNSUPPORTED_FEATURE
        api.transmit_rv = 6                       # ERROR_INVALID_HANDLE from WinSCard
        bad = await call(p.Transmit(conn.hCard, 2, 8, 1, 2, 8, 258, 0, b"\0"))
        assert bad.rv == p.SCARD_E_INVALID_HANDLE
        assert (await call(p.Transmit(conn.hCard + 1, 2, 8, 1, 2, 8, 258, 0, b"\0"))).rv \
            == p.SCARD_E_INVALID_HANDLE           # not a handle of this application
        assert (await call(p.Disconnect(conn.hCard, 0))).rv == 0
        assert not api.cards
    run(scenario)
