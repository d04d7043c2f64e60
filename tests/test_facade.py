"""The façade's own shortcuts, seen by a real pcsc-lite application (libpcsclite + pyscard).

SCardReleaseContext is answered without waiting for the backend when that cannot be
noticed: the context holds no card handle. With a card handle open, the release changes
sharing state other applications see, so the application waits for the backend's answer.
The backend here is the virtual one with its release held back until the test lets it go.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from conftest import App
from pcsc_bridge.server.emulate import Emulator
from pcsc_bridge.server.virtual import VirtualStream

OK = 0
E_INVALID_HANDLE = 0x80100003
HELD_S = 0.5


@pytest.fixture
def held_release(monkeypatch, tmp_path):
    """An emulator whose backend answers SCardReleaseContext only once ``gate`` is set."""
    gate = threading.Event()
    real = VirtualStream.do_ReleaseContext

    async def held(self, m):
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        return await real(self, m)

    monkeypatch.setattr(VirtualStream, "do_ReleaseContext", held)
    sock = os.path.join(tmp_path, "pcscd.comm")
    emulator = Emulator(sock, cards=True).start()
    apps = []

    def app():
        a = App(sock)
        apps.append(a)
        return a
    yield app, gate, emulator
    gate.set()
    for a in apps:
        a.close()
    emulator.stop()


def test_release_of_a_context_without_cards_is_answered_at_once(held_release):
    new_app, gate, _ = held_release
    app = new_app()
    ctx = app.establish().context
    job = app.submit("release", context=ctx)
    assert job.wait(HELD_S).rv == OK          # while the backend still holds it
    gate.set()
    # the backend's release still happens: the context is freed there too
    deadline = time.monotonic() + 5
    while ctx in VirtualStream._contexts_in_use and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ctx not in VirtualStream._contexts_in_use


def test_release_with_a_card_handle_waits_for_the_backend(held_release):
    new_app, gate, emulator = held_release
    app = new_app()
    ctx = app.establish().context
    r = app.connect(ctx, emulator.reader_names[0])
    assert r.rv == OK
    job = app.submit("release", context=ctx)
    assert job.wait(HELD_S) is None           # others could notice: no shortcut
    gate.set()
    assert job.wait(5.0).rv == OK
    assert app.transmit(r.card, "80ee000001aa").rv == E_INVALID_HANDLE


def test_release_after_disconnect_is_answered_at_once(held_release):
    new_app, gate, emulator = held_release
    app = new_app()
    ctx = app.establish().context
    r = app.connect(ctx, emulator.reader_names[0])
    assert app.disconnect(r.card).rv == OK
    job = app.submit("release", context=ctx)
    assert job.wait(HELD_S).rv == OK
    gate.set()
