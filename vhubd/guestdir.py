"""Per-session guest sockets, for hybrid-vsock VMMs (``--guest-dir DIR``).

Firecracker, cloud-hypervisor and libkrun map each VM's vsock port to a Unix
socket of its own. With ``--guest-dir`` the daemon creates ``DIR/<session>.sock``
when a session is registered or boots, and removes it when the session stops
or is removed. A connection through it belongs to that session and needs no
token, like a connection through a VM's own device: the socket names it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from .errors import ListenError
from .listeners import ListenerSpec, bind_unix
from .sessions import Session, SessionRegistry, State

log = logging.getLogger("vhubd")
OPEN_IN = (State.BOOTING, State.WAITING_AGENT)  # registered (waiting for its VM) or booting


class GuestDir:
    def __init__(self, path: str, server, registry: SessionRegistry, mode: int | None = None):
        self.path = path
        self.server = server
        self.mode = mode
        self.specs: dict[str, ListenerSpec] = {}
        self.tasks: set[asyncio.Task] = set()
        registry.watch(self._state_changed)
        registry.removal_watchers.append(lambda sess: self.close(sess.name))

    def socket_path(self, session: str) -> str:
        return os.path.join(self.path, f"{session}.sock")

    @staticmethod
    def address_in(path: str, session: str) -> str:
        """What the session's agent dials (VHUB_ADDR) when it runs beside the daemon."""
        return f"unix:{os.path.join(path, session + '.sock')}"

    def _state_changed(self, sess: Session, old: State) -> None:
        if sess.anonymous:
            return
        if sess.state in OPEN_IN:
            self.open(sess.name)
        elif sess.state is State.STOPPED:
            self.close(sess.name)

    def open(self, name: str) -> None:
        if name in self.specs:
            return
        path = self.socket_path(name)
        try:
            sock = bind_unix(path, self.mode)  # listening now: its VM may dial before we accept
        except ListenError as exc:
            log.warning("guest-dir: no socket for session=%s: %s", name, exc)
            return
        spec = ListenerSpec("guest-dir", "guest", sock, owned_path=path, fixed_session=name)
        self.specs[name] = spec
        task = asyncio.ensure_future(self.server.add_listener(spec))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        log.info("guest-dir: session=%s listens on %s", name, path)

    def close(self, name: str) -> None:
        spec = self.specs.pop(name, None)
        if spec is not None:
            self.server.remove_listener(spec)
            log.info("guest-dir: session=%s socket removed", name)

    def close_all(self) -> None:
        for name in list(self.specs):
            self.close(name)
