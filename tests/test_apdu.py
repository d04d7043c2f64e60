"""APDU rules and the PIN guard (bridge/apdu.py), at the one enforcement point
(bridge/enforce.py) and through a guest's state machine (server/gueststate.py)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pcsc_bridge import config
from pcsc_bridge.apdu import (
    SW_DENIED,
    SW_GUARDED,
    ApduRule,
    CardKnowledge,
    body,
    channel,
    decide,
)
from pcsc_bridge.enforce import Enforcer
from pcsc_bridge.pcsc import (
    SCARD_LEAVE_CARD,
    SCARD_RESET_CARD,
    SCARD_SHARE_SHARED,
    SCARD_W_RESET_CARD,
    Connect,
    Disconnect,
    Transmit,
)
from pcsc_bridge.policy import Policy
from pcsc_bridge.share import Readers

R0 = "Virtual PCD 00 00"
OPENPGP = bytes.fromhex("D27600012401")
CARD_MANAGER = bytes.fromhex("A000000151000000")


def apdu(text: str) -> bytes:
    return bytes.fromhex(text)


def test_logical_channels_and_data_fields_as_iso_7816_4_codes_them():
    assert [channel(c) for c in (0x00, 0x01, 0x03, 0x0C, 0x40, 0x4F, 0x60, 0x80, 0x83,
                                 0xC5, 0xFF)] == [0, 1, 3, 0, 4, 19, 4, 0, 3, 9, None]
    assert body(apdu("00A4040006D27600012401")) == OPENPGP            # short Lc
    assert body(apdu("00A40400000006D27600012401")) == OPENPGP        # extended Lc
    assert body(apdu("00B00000")) == body(apdu("00B0000010")) == b""  # no data
    assert body(apdu("00A40400FF0102")) == b""                        # Lc past the end


def test_the_first_rule_that_matches_decides_and_none_allows():
    rules = (ApduRule(action="allow", cla=(0x80, 0xFC), ins=(0xCA, 0xFF)),   # GET DATA
             ApduRule(action="deny", cla=(0x80, 0xF0)),                       # 8x: GP
             ApduRule(action="deny", aid=CARD_MANAGER[:5], ins=(0xE4, 0xFF)))
    assert decide(rules, apdu("80CA9F7F"), None)          # allowed by the first
    assert decide(rules, apdu("83CA9F7F"), None)          # the mask: channel bits
    assert not decide(rules, apdu("80E60C00"), None)      # INSTALL [for load]
    assert not decide(rules, apdu("84E40000"), None)
    assert not decide(rules, apdu("00E40000"), CARD_MANAGER)   # by the selected AID
    assert decide(rules, apdu("00E40000"), OPENPGP)
    assert decide(rules, apdu("00A40400"), None) and decide((), apdu("80E60C00"), None)


_MASKED = st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255)).map(
    lambda vm: (vm[0] & vm[1], vm[1]))
_AIDS = st.sampled_from((None, OPENPGP, OPENPGP + b"\x03\x04", CARD_MANAGER, b"\xa0"))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.builds(ApduRule, action=st.sampled_from(("allow", "deny")), cla=_MASKED,
                          ins=_MASKED, p1=_MASKED, p2=_MASKED, aid=_AIDS), max_size=8),
       st.binary(min_size=4, max_size=6), _AIDS)
def test_decide_is_every_field_read_as_the_rules_say(rules, head, aid):
    def matches(rule):     # the rule, field by field, as docs/lab.md says it
        return all(f is None or b & f[1] == f[0] for f, b in zip(
            (rule.cla, rule.ins, rule.p1, rule.p2), head)) and (
            rule.aid is None or (aid is not None and aid.startswith(rule.aid)))
    first = next((r for r in rules if matches(r)), None)
    assert decide(tuple(rules), head, aid) == (first is None or first.action == "allow")


@pytest.mark.parametrize("entry, words", [
    ("{action: deny, ins: E6E6}", 'expected a hex byte or byte/mask like "A4" or "80/F0"'),
    ("{action: deny, cla: 80/G0}", "apdu_rules[0].cla"),
    ("{action: maybe}", "apdu_rules[0].action"),
    ("{action: deny, aid: A0Z}", "apdu_rules[0].aid"),
    ("{action: deny, inz: E6}", "inz"),
])
def test_a_bad_rule_is_refused_naming_its_key(tmp_path, entry, words):
    f = tmp_path / "server.yaml"
    f.write_text("server:\n  cert: a\n  key: b\n  ca: c\n  guests:\n    lab:\n"
                 f"      apdu_rules:\n        - {entry}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load_server_config(str(f))
    assert words in str(e.value) and "server.yaml" in str(e.value)


@pytest.mark.parametrize("value, keep", [("{keep: 2}", 2), ("true", 1), ("false", 0)])
def test_pin_guard_values(tmp_path, value, keep):
    f = tmp_path / "server.yaml"
    f.write_text("server:\n  cert: a\n  key: b\n  ca: c\n  guests:\n"
                 f"    lab: {{pin_guard: {value}}}\n")
    assert config.load_server_config(str(f)).guests["lab"].pin_guard == keep
    f.write_text("server:\n  cert: a\n  key: b\n  ca: c\n  guests:\n"
                 "    lab: {pin_guard: {keep: 0}}\n")
    with pytest.raises(config.ConfigError, match="pin_guard"):
        config.load_server_config(str(f))


# --- at the enforcement point ----------------------------------------------------------
def _card(e: Enforcer, h: int = 7, reader: str = R0):
    e.answered(Connect(1, reader, SCARD_SHARE_SHARED, 3),
               Connect(1, reader, SCARD_SHARE_SHARED, 3, hCard=h, dwActiveProtocol=2),
               "app", 0.0)


def _tx(h: int, text: str) -> Transmit:
    data = apdu(text)
    return Transmit(h, 2, 8, len(data), 2, 8, 258, data=data)


def _card_says(e: Enforcer, msg: Transmit, sw: str, rv: int = 0) -> None:
    e.answered(msg, msg.with_rv(rv, pcbRecvLength=2, data=apdu(sw)) if not rv
               else msg.failed(rv), "app", 0.0)


def test_a_denied_apdu_is_answered_here_and_selections_are_followed_per_channel():
    cards = Readers()
    e = Enforcer(Policy(apdu_rules=(ApduRule(action="deny", aid=CARD_MANAGER),
                                    ApduRule(action="deny", ins=(0xE6, 0xFF)))), cards)
    other = Enforcer(Policy(), cards)      # a client without rules, on the same card
    _card(e)
    _card(other, 8)
    install = _tx(7, "80E60C0000")
    v = e.check(install)
    assert v.denied and v.reply.data == SW_DENIED and v.reply.rv == 0 and "80 E6" in v.why
    assert other.check(_tx(8, "80E60C0000")).reply is None     # its policy allows it
    get_data = _tx(7, "80CA9F7F00")
    assert e.check(get_data).reply is None
    # the other client selects the card manager on channel 0: the card is shared
    select = _tx(8, "00A4040008A000000151000000")
    _card_says(other, select, "9000")
    assert e.check(get_data).reply.data == SW_DENIED
    assert e.check(_tx(7, "01CA9F7F00")).reply is None     # channel 1: nothing selected
    select_pgp = _tx(7, "00A4040006D27600012401")
    _card_says(e, select_pgp, "6A82")                       # not found: nothing changes
    assert e.check(get_data).reply is not None
    _card_says(e, select_pgp, "9000")
    assert e.check(get_data).reply is None
    _card_says(e, _tx(7, "01A4040008A000000151000000"), "9000")   # on channel 1
    assert e.check(_tx(7, "01CA9F7F00")).reply is not None
    _card_says(e, _tx(7, "0070800100"), "9000")             # MANAGE CHANNEL: close 1
    assert e.check(_tx(7, "01CA9F7F00")).reply is None
    _card_says(other, _tx(8, "00B0000000"), "", SCARD_W_RESET_CARD)   # reset: forgotten
    assert cards[R0].card.selected == {}


def test_the_pin_guard_keeps_the_last_try():
    e = Enforcer(Policy(pin_guard=1))
    _card(e)
    wrong = _tx(7, "0020008106313233343536")
    probe = e.check(wrong).probe            # first: how many tries are left?
    assert probe.data == apdu("00200081") and probe.hCard == 7
    _card_says(e, probe, "63C3")
    assert e.check(wrong).reply is None     # 3 left: this attempt may go
    _card_says(e, wrong, "63C2")
    _card_says(e, e.check(wrong).probe, "63C2")
    assert e.check(wrong).reply is None     # 2 left: one more
    _card_says(e, wrong, "63C1")
    _card_says(e, e.check(wrong).probe, "63C1")
    v = e.check(wrong)                      # 1 left: kept
    assert v.denied and v.reply.data == SW_GUARDED and "81" in v.why
    # CHANGE REFERENCE DATA on the same reference is guarded alike; other references not
    change = _tx(7, "002400810C313233343536373839303132")
    _card_says(e, e.check(change).probe, "63C1")
    assert e.check(change).reply.data == SW_GUARDED
    admin = _tx(7, "00200083083132333435363738")
    _card_says(e, e.check(admin).probe, "63C3")
    assert e.check(admin).reply is None
    # a card that does not answer the question is judged by what it said before
    _card_says(e, e.check(wrong).probe, "6700")
    assert e.check(wrong).reply.data == SW_GUARDED
    # the question without data, SELECT, reads: never held
    assert e.check(_tx(7, "00200081")).probe is None
    # a verified PIN (the card's 90 00 to the question) fills the counter again
    _card_says(e, e.check(wrong).probe, "9000")
    assert e.check(wrong).reply is None
    # with keep 2 the same card stops one try earlier; off: no question asked
    e2 = Enforcer(Policy(pin_guard=2), e.readers)
    _card(e2, 9)
    wrong9 = _tx(9, "0020008106313233343536")
    _card_says(e2, e2.check(wrong9).probe, "63C2")
    assert e2.check(wrong9).reply.data == SW_GUARDED
    e3 = Enforcer(Policy(pin_guard=0), e.readers)
    _card(e3, 10)
    assert e3.check(_tx(10, "0020008106313233343536")).probe is None


def test_a_reset_forgets_what_the_guard_learned():
    e = Enforcer(Policy(pin_guard=1))
    _card(e)
    wrong = _tx(7, "0020008106313233343536")
    _card_says(e, e.check(wrong).probe, "63C1")
    assert e.check(wrong).reply is not None
    e.answered(Disconnect(7, SCARD_RESET_CARD), Disconnect(7, SCARD_RESET_CARD), "app", 0.0)
    assert e.readers[R0].card.tries == {}
    _card(e, 8)
    e.answered(Disconnect(8, SCARD_LEAVE_CARD), Disconnect(8, 0), "app", 0.0)


# --- parsers of guest input: never raise, never read past the APDU ---------------------
@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=6)), max_size=20),
       st.binary(max_size=300), st.integers(1, 15))
def test_learning_and_deciding_take_any_bytes(exchanges, last, keep):
    card = CardKnowledge()
    rules = (ApduRule(action="deny", aid=b"\xa0"), ApduRule(action="allow", ins=(0x20, 0xF0)))
    for command, response in exchanges:
        card.learn(command, response)
        if len(command) >= 4:
            decide(rules, command[:4], card.selected.get(channel(command[0])))
    got = card.guard(last, keep, asked=False)
    assert got is None or got == last[:4]
    got = card.guard(last, keep, asked=True)
    assert got in (None, SW_GUARDED)
    if got == SW_GUARDED:
        assert card.tries[card.key(last)] <= keep


# --- the examples of docs/lab.md do what it says ------------------------------------------
LAB = Path(__file__).resolve().parent.parent / "docs" / "lab.md"
EXAMPLES = {   # the example's first words -> (APDUs after SELECTing the AID, denied?)
    "No GlobalPlatform": [("", "80E60C0000", True), ("", "80E8000000", True),
                          ("", "84E4000000", True), ("", "80D8010100", True),
                          ("", "00A4040008A000000151000000", True),
                          ("D27600012401", "00CA006E00", False),
                          ("", "00A4040006D27600012401", False)],
    "Read-only OpenPGP": [("D27600012401", "00DA005E0100", True),
                          ("D27600012401", "00DB3FFF0100", True),
                          ("D27600012401", "0047800001B600", True),
                          ("D27600012401", "00CA006E00", False),
                          ("D27600012401", "0020008106313233343536", False),
                          ("A000000308", "00DB3FFF0100", False)],
    "PIV without management": [("A000000308", "0087039B047C028000", True),
                               ("A000000308", "00DB3FFF0100", True),
                               ("A000000308", "0047009A00", True),
                               ("A000000308", "0087079A047C028100", False),
                               ("A000000308", "00CB3FFF055C035FC10200", False)],
}


def lab_examples() -> dict[str, str]:
    """The example's title -> its YAML, from docs/lab.md's list of examples."""
    text = LAB.read_text()
    out = {}
    for title, block in re.findall(r"- \*\*(.+?)\*\*.*?```yaml\n(.*?)```", text, re.DOTALL):
        out[title] = block
    return out


@pytest.mark.parametrize("title", list(EXAMPLES))
def test_each_example_of_the_lab_page_allows_and_denies_what_it_says(tmp_path, title):
    blocks = {t: b for t, b in lab_examples().items() if t.startswith(title)}
    assert len(blocks) == 1, f"docs/lab.md has no example {title!r}"
    block = next(iter(blocks.values()))
    f = tmp_path / "server.yaml"
    f.write_text("server:\n  cert: a\n  key: b\n  ca: c\n  guests:\n    lab:\n"
                 + textwrap.indent(textwrap.dedent(block), " " * 6))
    policy = config.load_server_config(str(f)).guests["lab"]
    assert policy.apdu_rules
    for aid, command, denied in EXAMPLES[title]:
        e = Enforcer(policy)
        _card(e)
        if aid:
            e.readers[R0].card.selected[0] = bytes.fromhex(aid)
        got = e.check(_tx(7, command)).reply
        assert (got is not None and got.data == SW_DENIED) == denied, (title, aid, command)

