"""A reader shared by several guests (bridge/share.py), without I/O: guests' GuestStates
over one set of shared readers, each with a fake backend and one fake clock. Fair
waiting (the transaction in the order asked), ``hold_limit`` (a hold past it ended on the
host, the application told its card was reset), ``reset_between_guests`` (a card one
guest used is power-cycled before another's APDU), and what ``status`` and the metrics
read of it."""

from __future__ import annotations

from pcsc_bridge import pcsc as p
from pcsc_bridge.framing import Close
from pcsc_bridge.policy import Policy
from pcsc_bridge.share import GAVE_UP, LOCK_POLL, Readers
from test_gueststate import Harness

T1 = p.SCARD_PROTOCOL_T1
SID = 1


class Lab:
    """Guests with one clock and one set of shared readers."""

    def __init__(self, *names: str, **policy):
        self.held: list[tuple[str, float]] = []
        self.readers = Readers(lambda reader, seconds: self.held.append((reader, seconds)))
        self.guests = {n: Harness(Policy(max_streams=64, **policy), name=n,
                                  readers=self.readers) for n in names}
        self.handles: dict[str, int] = {}
        for n, (name, g) in enumerate(self.guests.items()):
            g.open(SID)
            g.call(SID, p.Connect(1, "R0", p.SCARD_SHARE_SHARED, T1))
            self.handles[name] = 0x100 + n
            g.answer(SID, 0, 0x100 + n)

    def advance(self, seconds: float) -> None:
        """Time passes for every guest, deadline by deadline."""
        end = next(iter(self.guests.values())).now + seconds
        while True:
            due = [(w, g) for g in self.guests.values()
                   if (w := g.state.next_deadline(g.now)) is not None and w <= end]
            if not due:
                break
            when = min(w for w, _ in due)
            for g in self.guests.values():
                g.now = max(g.now, when)
            for w, g in due:
                if w <= when:
                    g.state.tick(when)
        for g in self.guests.values():
            g.now = end

    def call(self, name: str, msg: p.Message) -> None:
        self.guests[name].call(SID, msg)

    def begin(self, name: str) -> None:
        self.call(name, p.BeginTransaction(self.handles[name]))

    def end(self, name: str) -> None:
        self.call(name, p.EndTransaction(self.handles[name], p.SCARD_LEAVE_CARD))
        assert type(self.with_backend(name)) is p.EndTransaction
        self.guests[name].answer(SID)

    def transmit(self, name: str, apdu: str = "00b0000000") -> None:
        data = bytes.fromhex(apdu)
        self.call(name, p.Transmit(self.handles[name], 2, 8, len(data), 2, 8, 258, data=data))

    def with_backend(self, name: str) -> p.Message | None:
        got = self.guests[name].backend.get(SID)
        return got[1] if got else None

    def last_rv(self, name: str, msg: p.Message) -> int:
        return p.read_reply(self.guests[name].replies(SID)[-1], msg, p.WIRE).rv


def test_waiting_guests_get_the_transaction_in_the_order_they_asked():
    lab = Lab("holder", "a", "b", "c")
    lab.begin("holder")
    lab.guests["holder"].answer(SID)                 # the host's pcscd: taken
    granted = []
    for name in ("b", "c", "a"):                     # they ask in this order
        lab.begin(name)
    # b asked first: its Begin is with the backend (pcscd keeps it waiting for the
    # holder); c and a wait here and get what pcscd gives after LOCK_POLL
    assert type(lab.with_backend("b")) is p.BeginTransaction
    assert lab.with_backend("c") is None and lab.with_backend("a") is None
    assert [u.client for u in lab.readers["R0"].waiting] == ["b", "c", "a"]
    for _ in range(3):
        lab.advance(LOCK_POLL)
        for name in ("c", "a"):
            assert lab.last_rv(name, p.BeginTransaction(0)) == p.SCARD_E_SHARING_VIOLATION
            lab.begin(name)                          # asked again, as pcsc-lite does
            assert lab.with_backend(name) is None
    lab.end("holder")
    while len(granted) < 3:
        first = next(n for n in ("a", "b", "c") if type(lab.with_backend(n)) is
                     p.BeginTransaction)
        lab.guests[first].answer(SID)                # the lock is its
        granted.append(first)
        lab.advance(LOCK_POLL)                       # the others' waits end
        for name in {"a", "b", "c"} - set(granted):
            if lab.with_backend(name) is None:
                lab.begin(name)
        status = lab.readers["R0"].status(lab.guests["a"].now)
        assert [h["client"] for h in status["held_by"]] == [first]
        assert status["held_by"][0]["hold"] == "transaction"
        lab.end(first)
    assert granted == ["b", "c", "a"]
    assert not lab.readers["R0"].waiting and not lab.readers["R0"].holders
    assert [r for r, _ in lab.held] == ["R0"] * 4    # four holds ended (metrics)


def test_a_waiter_that_stops_asking_loses_its_place_and_one_that_leaves_at_once():
    lab = Lab("a", "b", "c")
    lab.begin("a")                                   # first: with the backend
    lab.guests["a"].answer(SID, p.SCARD_E_SHARING_VIOLATION)   # pcscd: someone holds it
    lab.begin("b")
    lab.advance(LOCK_POLL)                           # a never asks again (it gave up)
    assert lab.last_rv("b", p.BeginTransaction(0)) == p.SCARD_E_SHARING_VIOLATION
    for _ in range(int(GAVE_UP / LOCK_POLL) + 1):
        if lab.with_backend("b") is not None:
            break
        lab.begin("b")
        lab.advance(LOCK_POLL)
    assert type(lab.with_backend("b")) is p.BeginTransaction, "a's place lapsed"
    # c waits behind b; b's application ends: c is first at once
    lab.begin("c")
    assert lab.with_backend("c") is None
    lab.guests["b"].feed(lab.guests["b"].guest.send(Close(SID)))
    lab.advance(LOCK_POLL)
    lab.begin("c")
    assert type(lab.with_backend("c")) is p.BeginTransaction


def test_a_hold_past_hold_limit_is_ended_on_the_host():
    lab = Lab("job", "other", hold_limit=2.0)
    job = lab.guests["job"]
    h = lab.handles["job"]
    lab.begin("job")
    job.answer(SID)
    lab.advance(1.9)
    assert lab.with_backend("job") is None
    lab.advance(0.2)
    # the server's own call: the transaction ends and the card is powered off and on
    stream, own = job.backend[SID]
    assert own == p.EndTransaction(h, p.SCARD_UNPOWER_CARD) and stream.quiet
    job.answer(SID)
    assert lab.held == [("R0", 2.0)]
    assert not lab.readers["R0"].holders
    # the application's calls: what pcscd gives after another application reset the
    # card, until it reconnects; then its calls go to the card again
    for _ in range(2):
        lab.transmit("job")
        assert lab.with_backend("job") is None
        assert lab.last_rv("job", p.Transmit(h, 2, 8, 5, 2, 8, 258)) == p.SCARD_W_RESET_CARD
    lab.call("job", p.Reconnect(h, p.SCARD_SHARE_SHARED, T1, p.SCARD_LEAVE_CARD))
    assert type(lab.with_backend("job")) is p.Reconnect
    job.answer(SID)
    lab.transmit("job")
    assert type(lab.with_backend("job")) is p.Transmit
    job.answer(SID)
    # an exclusive connection is a hold too: it is made shared, the card power-cycled
    other = lab.guests["other"]
    other.call(SID, p.Connect(1, "R1", p.SCARD_SHARE_EXCLUSIVE, T1))
    other.answer(SID, 0, 0x200)
    lab.advance(2.5)
    assert other.backend[SID][1] == p.Reconnect(0x200, p.SCARD_SHARE_SHARED, T1,
                                                 p.SCARD_UNPOWER_CARD)


def test_without_hold_limit_a_hold_is_never_ended():
    lab = Lab("job")
    lab.begin("job")
    lab.guests["job"].answer(SID)
    assert lab.guests["job"].state.next_deadline(lab.guests["job"].now) is None
    lab.advance(3600)
    assert lab.with_backend("job") is None and lab.readers["R0"].holders


def test_a_card_another_guest_used_is_power_cycled_before_this_guests_apdu():
    lab = Lab("a", "b")
    lab.transmit("a")
    lab.guests["a"].answer(SID)
    assert lab.readers["R0"].used_by == "a"
    lab.transmit("a")                                # its own card state: no reset
    assert type(lab.with_backend("a")) is p.Transmit
    lab.guests["a"].answer(SID)
    lab.transmit("b")
    stream, own = lab.guests["b"].backend[SID]
    assert own == p.Reconnect(lab.handles["b"], p.SCARD_SHARE_SHARED, T1,
                              p.SCARD_UNPOWER_CARD) and stream.quiet
    lab.guests["b"].answer(SID)
    assert type(lab.with_backend("b")) is p.Transmit  # then its APDU
    lab.guests["b"].answer(SID)
    assert lab.readers["R0"].used_by == "b"
    # a's handle: the card was reset under it since its last call, which pcscd tells it
    # (a reset made on its handle now would hide that): its APDU goes as it is
    lab.transmit("a")
    assert type(lab.with_backend("a")) is p.Transmit
    lab.guests["a"].answer(SID, p.SCARD_W_RESET_CARD)
    ha = lab.handles["a"]
    lab.call("a", p.Reconnect(ha, p.SCARD_SHARE_SHARED, T1, p.SCARD_LEAVE_CARD))
    lab.guests["a"].answer(SID)
    # then the reset; one that fails (another application's transaction): the APDU
    # fails with it
    lab.transmit("a")
    assert type(lab.with_backend("a")) is p.Reconnect
    lab.guests["a"].answer(SID, p.SCARD_E_SHARING_VIOLATION)
    assert lab.with_backend("a") is None
    assert lab.last_rv("a", p.Transmit(0, 2, 8, 5, 2, 8, 258)) == \
        p.SCARD_E_SHARING_VIOLATION


def test_reset_between_guests_off_passes_the_card_as_it_is():
    lab = Lab("a", "b", reset_between_guests=False)
    lab.transmit("a")
    lab.guests["a"].answer(SID)
    lab.transmit("b")
    assert type(lab.with_backend("b")) is p.Transmit


def test_the_lab_pages_policies_load_as_they_say(tmp_path):
    import re
    from pathlib import Path

    from pcsc_bridge import config
    page = (Path(__file__).parent.parent / "docs" / "lab.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.DOTALL)
              if b.startswith("server:")]
    assert len(blocks) >= 4
    for n, block in enumerate(blocks):
        f = tmp_path / f"{n}.yaml"
        f.write_text(block.replace("server:\n", "server:\n  cert: a\n  key: b\n  ca: c\n", 1))
        guests = config.load_server_config(str(f)).guests
        assert guests
    lab, admin = guests["default"], guests["admin"]      # the last: one policy for a lab
    assert (lab.hold_limit, lab.reset_between_guests, lab.pin_guard, lab.exclusive) \
        == (120.0, True, 1, False)
    assert (admin.hold_limit, admin.pin_guard) == (None, 0)
    assert len(lab.apdu_rules) == 2
