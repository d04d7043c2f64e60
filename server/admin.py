"""The server's admin socket (``server.admin_socket``, mode 0600), and the commands that
use it: ``pcsc-bridge status`` (who is connected, since when, how much), ``pcsc-bridge
kick GUEST`` (disconnect a guest now; its applications get SCARD_E_NO_SERVICE and the
agent connects again unless the guest's certificate is revoked or its policy refuses it)
and ``pcsc-bridge reload`` (the server, the agent or ``local`` reads its files again and
says what changed, or why nothing did). The agent's and ``local``'s admin sockets take
the same lines.
One command per line, one answer per line (``ok <JSON>`` or ``error: <why>``), as on the
virtual readers' control socket (server/control.py)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
import time
from typing import ClassVar

from pcsc_bridge import config
from pcsc_bridge.admin import CommandSocket, Refused, send_command
from pcsc_bridge.framing import Reason

RELOAD_TIMEOUT = 120.0   # seconds `pcsc-bridge reload` waits for the daemon's answer


class AdminServer(CommandSocket):
    COMMANDS: ClassVar[dict] = {"status": "status", "kick": "kick GUEST", "reload": "reload"}

    def __init__(self, server, path: str):
        super().__init__(path)
        self.server = server

    def _status(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: status")
        s = self.server
        guests = [{
            "guest": x.guest, "peer": x.peer,
            "since": dt.datetime.fromtimestamp(x.since, dt.timezone.utc).isoformat(
                timespec="seconds"),
            "streams": len(x.state.streams), "calls": x.state.seq,
            "errors": x.state.errors_total, "wire": x.state.conn.version,
        } for x in sorted(s.sessions, key=lambda x: (x.guest, x.since)) if x.ready]
        model = s.backend.model
        return {"backend": s.backend.name, "pcsc": s.backend.describe(), "guests": guests,
                "readers": reader_status(model, s.readers)}

    def _kick(self, args: list[str]) -> dict:
        if len(args) != 1:
            raise Refused("usage: kick GUEST")
        sessions = list(self.server.by_guest.get(args[0], ()))
        if not sessions:
            raise Refused(f"no guest {args[0]!r} is connected")
        for session in sessions:
            session.fail("disconnected by the operator (pcsc-bridge kick)", Reason.POLICY)
        return {"guest": args[0], "sessions": len(sessions)}

    async def _reload(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: reload")
        return {"role": "server", "changed": await self.server.reload()}


# --- the commands ----------------------------------------------------------------------------
def _common(p) -> None:
    p.add_argument("-c", "--config", help="the server's configuration file (its "
                   "server.admin_socket), or a guest's (client.admin_socket)")
    p.add_argument("--socket", help="the admin socket (instead of -c)")


def register_status(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="the running server's guests, readers and cards, or the running "
        "agent's link and applications", description="Ask the running server (guests "
        "connected, since when, how much; readers and cards) or, with a guest's file, the "
        "running agent (the link to the server and its round trip; readers; applications "
        "and the cards they hold) on its admin socket.")
    _common(p)
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=run_status)


def register_kick(subparsers) -> None:
    p = subparsers.add_parser("kick", help="disconnect a guest now",
                              description="Disconnect every session of GUEST (the name in "
                              "its certificate) from the running server.")
    p.add_argument("guest", metavar="GUEST")
    _common(p)
    p.set_defaults(func=run_kick)


def register_reload(subparsers) -> None:
    p = subparsers.add_parser(
        "reload", help="make the running server, agent or local daemon read its files again",
        description="Ask the running daemon whose file this is (server:, else local:, else "
        "client:) to read its configuration and TLS files again, wait until it has checked "
        "and applied them, and print what changed. Exit status 0: applied; 2: the daemon "
        "refused the files and goes on with the configuration it had; 1: no daemon "
        "answered. systemd's `systemctl reload` runs this.")
    _common(p)
    p.set_defaults(func=run_reload)


def _admin_socket(path: str, name: str, refused: list | None = None) -> str | None:
    """The admin socket a configuration file names: the server's, else ``local``'s, else
    on a guest the agent's."""
    from pcsc_bridge.check import sections
    try:
        found = sections(path)
        if "server" in found:
            cfg, key = config.load_server_config(path), "server.admin_socket"
        elif "local" in found:
            cfg, key = config.load_local_config(path), "local.admin_socket"
        else:
            cfg, key = config.load_client_config(path), "client.admin_socket"
    except config.ConfigError as exc:
        more = "; the running daemon was not asked and goes on as it was" \
            if name == "reload" else ""
        print(f"pcsc-bridge {name}: {exc}{more}", file=sys.stderr)
        if refused is not None:
            refused.append(str(exc))
        return None
    if not cfg.admin_socket:
        print(f"pcsc-bridge {name}: {path} sets no {key}", file=sys.stderr)
    return cfg.admin_socket


def _ask(args, line: str, name: str, timeout: float | None = None,
         refused: list | None = None) -> dict | None:
    """The daemon's answer to ``line``, or None (the reason printed; an answer that
    refuses the command is added to ``refused``)."""
    path = args.socket
    if path is None:
        if not args.config:
            print(f"pcsc-bridge {name}: give -c FILE or --socket PATH", file=sys.stderr)
            return None
        path = _admin_socket(args.config, name, refused)
        if not path:
            return None
    try:
        answer = send_command(path, line, *(() if timeout is None else (timeout,)))
    except OSError as exc:
        print(f"pcsc-bridge {name}: {path}: {exc.strerror or exc} (is the server or agent "
              "running, and are you its user?)", file=sys.stderr)
        return None
    if not answer.startswith("ok "):
        print(f"pcsc-bridge {name}: {answer or 'no answer'}", file=sys.stderr)
        if answer and refused is not None:
            refused.append(answer)
        return None
    return json.loads(answer[3:])


def run_status(args) -> int:
    st = _ask(args, "status", "status")
    if st is None:
        return 1
    if args.json:
        print(json.dumps(st, indent=1))
    elif st.get("role") == "agent":
        _print_agent(st)
    elif st.get("role") == "local":
        _print_local(st)
    else:
        _print_server(st)
    return 0


def reader_status(model, shared) -> list[dict]:
    """Each reader: a card in it or not, who holds it and who waits (bridge/share.py)."""
    now = time.time()
    return [{"name": st.readerName, "card": bool(st.cardAtr),
             **(shared[st.readerName].status(now) if st.readerName in shared
                else {"held_by": [], "waiting": []})}
            for st in model.states if st.readerName]


def _print_readers(readers: list[dict]) -> None:
    for r in readers:
        print(f"reader  {r['name']}: {'card' if r['card'] else 'no card'}")
        for h in r.get("held_by", ()):
            print(f"  held by {h['client']} ({h['app']}), {h['hold']}, since {h['since']} "
                  f"({h['seconds']} s)")
        for n, w in enumerate(r.get("waiting", ()), 1):
            print(f"  waiting {n}. {w['client']} ({w['app']}) since {w['since']} "
                  f"({w['seconds']} s)")


def _print_server(st: dict) -> None:
    print(f"backend {st['backend']}: {st['pcsc']}")
    _print_readers(st["readers"])
    print(f"{len(st['guests'])} guest session(s)")
    for g in st["guests"]:
        print(f"guest   {g['guest']} from {g['peer']} since {g['since']}: {g['streams']} "
              f"stream(s), {g['calls']} call(s), {g['errors']} error(s), wire {g['wire']}")


def _print_local(st: dict) -> None:
    print(f"backend {st['backend']}: {st['pcsc']}")
    _print_readers(st["readers"])
    for sc in st["sockets"]:
        print(f"socket  {sc['path']}: {sc['applications']} application(s), readers "
              f"{', '.join(sc['readers'])}")
    _print_vms(st.get("vms", ()))


def _print_vms(vms) -> None:
    for vm in vms:
        card = f"card {vm['card']}" if vm["card"] else "no card"
        print(f"vm      {vm['vm']}: {'linked' if vm['linked'] else 'no VM linked'}, reader "
              f"{vm['reader'] or 'none'}, {card}, {vm['links']} link(s)")


def _print_link(st: dict) -> None:
    if st["link"] == "connected":
        rtt = f", round trip {st['rtt_ms']:.1f} ms at {st['rtt_at']}" if st["rtt_ms"] else ""
        print(f"server  {st['server']}: connected since {st['since']} as {st['guest']} "
              f"(backend {st['backend']}, wire {st['wire']}{rtt})")
    else:
        why = f": {st['error']}" if st["error"] else ""
        print(f"server  {st['server']}: {st['link']} since {st['since']}{why}")


def _print_agent(st: dict) -> None:
    for link in st.get("links", [st]):
        _print_link(link)
        if "links" in st:
            print(f"  its readers: {', '.join(link['readers']) or 'none'}")
    if st.get("over_16"):
        print(f"note    {len(st['readers'])} readers: applications of pcsc-lite before 2.5.0 "
              "see the first 16")
    for r in st["readers"]:
        print(f"reader  {r['name']}: {'card' if r['card'] else 'no card'}")
    print(f"{len(st['applications'])} application(s), {st['streams']} stream(s) to the server")
    for a in st["applications"]:
        cards = ", ".join(a["cards"]) or "no card"
        print(f"app     {a['app']}: pid {a['pid']} ({a['command'] or '?'}) uid {a['uid']} "
              f"since {a['since']}, {a['dialect'] or 'no version yet'}, "
              f"{a['contexts']} context(s), {cards}")
    _print_vms(st.get("vms", ()))


def run_reload(args) -> int:
    refused = []
    out = _ask(args, "reload", "reload", RELOAD_TIMEOUT, refused)
    if out is None:
        return 2 if refused else 1
    changes = out["changed"]
    print(f"{out['role']}: reloaded" + ("" if changes else ", nothing changed"))
    for line in changes:
        print(f"  {line}")
    return 0


def run_kick(args) -> int:
    out = _ask(args, shlex.join(["kick", args.guest]), "kick")
    if out is None:
        return 1
    print(f"disconnected {out['guest']} ({out['sessions']} session(s))")
    return 0
