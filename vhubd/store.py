"""Sessions that outlive the daemon: their names, backends and tokens, kept
in ``STATE_DIR/sessions.json`` (mode 0600), so that a restarted daemon knows
the sessions it had and their agents get back in with the tokens they hold,
and their exposed ports (bound again at the same address).

Writes are coalesced (at most one every ``delay`` seconds, and one at
shutdown) and atomic (a temporary file renamed over the old one): ten
thousand registrations cost a handful of writes, and a crash leaves either
the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from .errors import CallFailed, InvalidName
from .sessions import Session, SessionRegistry, State

log = logging.getLogger("vhubd")
VERSION = 1


class SessionStore:
    def __init__(self, path: str, registry: SessionRegistry, call_later: Callable[[float, Callable], Any],
                 delay: float = 0.5):
        self.path = path
        self.registry = registry
        self.call_later = call_later
        self.delay = delay
        self._pending: Any = None
        self.exposed: list[tuple[str, int, str, int]] = []  # loaded: (session, guest port, host, port)
        registry.creation_watchers.append(self._changed)
        registry.removal_watchers.append(self._changed)

    def load(self, backend: str) -> int:
        """Recreate the stored sessions (waiting for their agents); how many."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("session store %s unreadable (%s): starting without it", self.path, exc)
            return 0
        n = 0
        for entry in data.get("sessions", []) if isinstance(data, dict) else []:
            try:
                sess = self.registry.create(entry["name"], entry.get("backend") or backend, token=entry["token"])
            except (KeyError, TypeError, InvalidName, CallFailed) as exc:
                log.warning("session store: entry skipped (%s)", exc)
                continue
            if isinstance(entry.get("attach_token"), str):
                sess.attach_token = entry["attach_token"]
            for e in entry.get("exposed") or []:
                if isinstance(e, list) and len(e) == 3 and type(e[0]) is int and isinstance(e[1], str) \
                        and type(e[2]) is int:
                    self.exposed.append((sess.name, e[0], e[1], e[2]))
            self.registry.set_state(sess, State.WAITING_AGENT, "restored; waiting for its agent")
            n += 1
        if n:
            log.info("session store: %d sessions restored from %s", n, self.path)
        return n

    def changed(self, sess: Session) -> None:
        """Something kept about ``sess`` changed (its exposures): save soon."""
        self._changed(sess)

    def _changed(self, sess: Session) -> None:
        if sess.anonymous:
            return
        if self._pending is None:
            self._pending = self.call_later(self.delay, self.save)

    def save(self) -> None:
        self._pending = None
        entries = [{"name": s.name, "backend": s.backend, "token": s.token, "attach_token": s.attach_token,
                    "exposed": [[gp, e.host, e.port] for gp, e in sorted(s.exposed.items()) if e.ready]}
                   for s in self.registry if not s.anonymous]
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "sessions": entries}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("session store %s not written: %s", self.path, exc)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self.save()
