"""The agent's admin socket (``client.admin_socket``, mode 0600): ``pcsc-bridge status``
on a guest (the link to the server: up or down and why, since when, its round trip; the
readers; the applications using the socket and the cards they hold). The same protocol
and the same command as the server's (server/admin.py)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from pcsc_bridge.admin import CommandSocket, Refused
from pcsc_bridge.pcsc import PROTOCOL_VERSION_MAJOR


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _command(pid) -> str | None:
    """The process's name, where the system says (Linux)."""
    try:
        with open(f"/proc/{int(pid)}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except (OSError, TypeError, ValueError):
        return None


def _link(agent) -> dict:
    """One server's link: up or down and why, since when, as whom, its round trip."""
    link = agent.open_link()
    hello = link.server_hello if link is not None else None
    state = "connected" if link is not None else (
        "connecting" if agent.connecting.is_set() else "down")
    rtt = agent.rtt if link is not None else None
    return {
        "server": agent.server, "link": state,
        "since": _iso(agent.since), "error": agent.error if link is None else None,
        "guest": hello.extra.get("guest") if hello else None,
        "backend": hello.extra.get("backend") if hello else None,
        "wire": link.conn.version if link is not None else None,
        "rtt_ms": round(rtt[0] * 1000, 3) if rtt else None,
        "rtt_at": _iso(rtt[1]) if rtt else None,
        "streams": link.conn.open_streams if link is not None else 0,
    }


class AgentAdmin(CommandSocket):
    COMMANDS: ClassVar[dict] = {"status": "status", "reload": "reload"}

    def __init__(self, backend, facade, path: str, reload=None, vms=()):
        super().__init__(path)
        self.agent, self.facade, self.reload = backend, facade, reload
        self.vms = vms        # the VM readers' links (bridge/vmlink.py)

    async def _reload(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: reload")
        if self.reload is None:
            raise Refused("this agent was started without a configuration file")
        return {"role": "agent", "changed": await self.reload()}

    def _status(self, args: list[str]) -> dict:
        if args:
            raise Refused("usage: status")
        agent = self.agent
        members = getattr(agent, "members", None)
        apps = []
        for app in sorted(self.facade.sessions, key=lambda a: a.info.id):
            st = app.state
            if st.closed:
                continue
            apps.append({
                "app": app.info.id, "pid": app.info.pid, "uid": app.info.uid,
                "command": _command(app.info.pid), "since": _iso(app.since),
                "dialect": f"{PROTOCOL_VERSION_MAJOR}:{st.dialect}" if st.dialect else None,
                "contexts": len(st.contexts),
                "cards": sorted(reader for reader, _ in st.card_readers.values()),
            })
        readers = [{"name": s.readerName, "card": bool(s.cardAtr)}
                   for s in agent.model.states if s.readerName]
        vms = [vm.status() for vm in self.vms]
        if members is None:
            return {"role": "agent", **_link(agent), "readers": readers, "applications": apps,
                    "vms": vms}
        links = []
        for m in members:
            shown = m.names
            links.append({**_link(m.backend), "readers": [
                shown.get(s.readerName, s.readerName) for s in m.backend.model.states
                if s.readerName and s.readerName in shown]})
        return {"role": "agent", "links": links, "readers": readers,
                "over_16": agent.over is not None, "applications": apps,
                "streams": sum(x["streams"] for x in links), "vms": vms}
