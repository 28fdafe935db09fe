"""Snapshots of sessions: the whole sandbox saved to disk, restored later.

``SnapshotStore`` owns ``STATE_DIR/snapshots/<session>/<snapshot>/``: the
backend's files (qemu: ``vm.state``, ``machine.json``, the kernel and
initramfs it ran) and ``snapshot.json`` (name, time, size, backend). A
snapshot is written into a ``.partial-*`` directory and renamed into place
when complete, so a listed snapshot is always a whole one.

``Snapshots`` runs the operations over the boot manager: ``take`` (the
session keeps running, or is stopped after it: ``stop``), ``restore`` (the
session's sandbox, stopped first if it runs, comes back as it was at the
snapshot; its agent reconnects into the same session), ``remove``, the
``--snapshot-after`` policy (idle that long: a snapshot named ``auto``, then
stopped; the next boot restores it instead of booting cold, then drops it).
One operation per session at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import time
from typing import TYPE_CHECKING

from .errors import BackendError, CallFailed, InvalidName
from .sessions import State, validate_name

if TYPE_CHECKING:
    from .boot import BootManager

log = logging.getLogger("vhubd")

MAX_PER_SESSION = 64
AUTO = "auto"  # the --snapshot-after policy's snapshot
META = "snapshot.json"
READY_TIMEOUT = 60.0  # after a live snapshot, the agent is back within this long


def snapshot_name(name: object) -> str:
    """``bad_params`` unless ``name`` is a snapshot name (the session name rule)."""
    try:
        return validate_name(name)
    except InvalidName as exc:
        raise CallFailed("bad_params", str(exc).replace("session name", "snapshot name")) from None


class SnapshotStore:
    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "snapshots")

    def dir(self, session: str, snap: str) -> str:
        return os.path.join(self.root, session, snap)

    def exists(self, session: str, snap: str) -> bool:
        return os.path.isfile(os.path.join(self.dir(session, snap), META))

    def meta(self, session: str, snap: str) -> dict:
        try:
            with open(os.path.join(self.dir(session, snap), META)) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            return meta
        except FileNotFoundError:
            raise CallFailed("unknown_snapshot", f"session {session!r} has no snapshot {snap!r}") from None
        except (OSError, ValueError) as exc:
            raise CallFailed("unknown_snapshot", f"snapshot {snap!r} of {session!r} is unreadable: {exc}") from None

    def list(self, session: str) -> list[dict]:
        """Newest first."""
        try:
            names = os.listdir(os.path.join(self.root, session))
        except OSError:
            return []
        found = []
        for snap in names:
            if not snap.startswith(".") and self.exists(session, snap):
                try:
                    found.append(self.meta(session, snap))
                except CallFailed:
                    continue
        return sorted(found, key=lambda m: (-float(m.get("created_at", 0)), str(m.get("name"))))

    def begin(self, session: str) -> str:
        """A fresh directory to write a snapshot into (``commit`` puts it in place)."""
        base = os.path.join(self.root, session)
        os.makedirs(base, mode=0o700, exist_ok=True)
        for old in os.listdir(base):  # what a crash mid-snapshot left
            if old.startswith((".partial-", ".removing-")):
                shutil.rmtree(os.path.join(base, old), ignore_errors=True)
        path = os.path.join(base, f".partial-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(path, 0o700)
        return path

    def commit(self, partial: str, session: str, snap: str, meta: dict) -> None:
        with open(os.path.join(partial, META), "w") as f:
            json.dump(meta, f)
        dest = self.dir(session, snap)
        if os.path.isdir(dest):  # replacing one (the policy's "auto"): the old one goes
            shutil.rmtree(dest)
        os.rename(partial, dest)

    def remove(self, session: str, snap: str) -> str:
        """Take it out of the list at once; the directory it is now in (for ``discard``)."""
        self.meta(session, snap)
        gone = os.path.join(self.root, session, f".removing-{snap}-{time.monotonic_ns()}")
        os.rename(self.dir(session, snap), gone)
        return gone

    @staticmethod
    def discard(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def remove_all(self, session: str) -> None:
        shutil.rmtree(os.path.join(self.root, session), ignore_errors=True)

    def count(self, session: str) -> int:
        try:
            return sum(1 for n in os.listdir(os.path.join(self.root, session)) if not n.startswith("."))
        except OSError:
            return 0


class Snapshots:
    def __init__(self, boots: BootManager, store: SnapshotStore, *, snapshot_after: float | None = None):
        self.boots = boots
        self.store = store
        self.snapshot_after = snapshot_after
        self.busy: dict[str, asyncio.Future] = {}

    def _supported(self) -> None:
        if not getattr(self.boots.backend, "snapshots", False):
            raise CallFailed("not_supported", f"the {self.boots.backend.name} backend has no snapshots")

    def _op(self, name: str, coro) -> asyncio.Future:
        if name in self.busy:
            coro.close()
            raise CallFailed("bad_state", f"a snapshot or restore of {name!r} is under way")
        fut = asyncio.ensure_future(coro)
        self.busy[name] = fut
        fut.add_done_callback(lambda f: self.busy.pop(name, None))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    # -- the daemon calls --
    def take(self, name: str, snap: object, *, stop: bool = False, auto: bool = False) -> asyncio.Future:
        self._supported()
        snap = snapshot_name(snap)
        sess = self.boots.registry.get(name)
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        if not self.store.exists(name, snap) and self.store.count(name) >= MAX_PER_SESSION:
            raise CallFailed("too_many_snapshots", f"session {name!r} has {MAX_PER_SESSION} snapshots; remove one "
                                                   "first (blink rm-snapshot)")
        if self.store.exists(name, snap) and snap != AUTO:
            raise CallFailed("snapshot_exists", f"session {name!r} already has a snapshot {snap!r}")
        return self._op(name, self._take(name, snap, stop, auto))

    async def _take(self, name: str, snap: str, stop: bool, auto: bool) -> dict:
        boots = self.boots
        sess = boots.registry.get(name)
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        if sess.state is State.STANDBY:
            await boots.wake(name)
        if sess.state is not State.READY or name not in boots.booted or name in boots.boots or name in boots.stops:
            raise CallFailed("bad_state", f"session {name!r} is {sess.state.value}: only a ready session this "
                                          "daemon booted can be snapshotted")
        t0 = time.monotonic()
        self._event(sess, "saving")
        partial = self.store.begin(name)
        boots.registry.set_state(sess, State.SAVING, f"saving snapshot {snap}")
        try:
            info = await boots.backend.snapshot(name, partial, keep_running=not stop)
            meta = {"name": snap, "id": secrets.token_hex(6), "session": name, "created_at": int(time.time()),
                    "backend": boots.backend.name,
                    "size_bytes": _du(partial), "resume": auto, **info}
            self.store.commit(partial, name, snap, meta)
        except BackendError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            self._event(sess, "failed", reason=str(exc))
            await self._back(name)
            raise CallFailed("snapshot_failed", str(exc)) from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            await self._back(name)
            raise
        saved_ms = (time.monotonic() - t0) * 1000
        if stop:
            await boots.stop(name)
        else:
            await self._back(name)
        ms = (time.monotonic() - t0) * 1000
        self._event(sess, "saved", snapshot=snap, size_bytes=meta["size_bytes"])
        log.info("session snapshot session=%s snapshot=%s %d bytes in %.0f ms (saved in %.0f ms)%s", name, snap,
                 meta["size_bytes"], ms, saved_ms, "; stopped" if stop else "")
        return {"session": name, "snapshot": snap, "id": meta["id"], "state": sess.state.value,
                "size_bytes": meta["size_bytes"],
                "created_at": meta["created_at"], "ms": round(ms, 1), "saved_ms": round(saved_ms, 1)}

    async def _back(self, name: str) -> None:
        """After a live snapshot (or a failed one): the agent redials (it
        keeps its link if the unplug never happened); ``agent_lost`` if it does not."""
        sess = self.boots.registry.get(name)
        if sess is None or sess.state is not State.SAVING:
            return
        if sess.agent is not None:
            self.boots.registry.set_state(sess, State.READY, "snapshot done")
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while sess.state is State.SAVING and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if sess.state is State.SAVING:
            self.boots.registry.set_state(sess, State.AGENT_LOST, f"the agent did not come back within "
                                                                 f"{READY_TIMEOUT:g} s of the snapshot")

    def restore(self, name: str, snap: object) -> asyncio.Future:
        self._supported()
        snap = snapshot_name(snap)
        if self.boots.registry.get(name) is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        meta = self.store.meta(name, snap)
        if meta.get("backend") != self.boots.backend.name:
            raise CallFailed("restore_failed", f"snapshot {snap!r} was taken by the {meta.get('backend')} "
                                               f"backend; this daemon runs {self.boots.backend.name}")
        return self._op(name, self._restore(name, snap))

    async def _restore(self, name: str, snap: str) -> dict:
        sess = self.boots.registry.get(name)
        if sess is not None and sess.state not in (State.STOPPED, State.FAILED) and (
                sess.agent is not None or name in self.boots.booted):
            await self.boots.stop(name)
        fut = self.boots.boot(name, {}, restore=self.store.dir(name, snap))
        try:
            res = await fut
        except Exception as exc:
            raise CallFailed("restore_failed", str(exc)) from None
        return {**res, "snapshot": snap, "restored": True}

    def remove(self, name: str, snap: object) -> dict:
        snap = snapshot_name(snap)
        if name in self.busy:
            raise CallFailed("bad_state", f"a snapshot or restore of {name!r} is under way")
        gone = self.store.remove(name, snap)
        forget = getattr(self.boots.backend, "forget_snapshot", None)
        if forget is None:
            self.store.discard(gone)
        else:  # the backend's own part of it (BoxLite's snapshot), then the files
            task = asyncio.ensure_future(forget(name, gone))
            task.add_done_callback(lambda _: self.store.discard(gone))
        return {"session": name, "snapshot": snap, "removed": True}

    def list(self, name: str) -> list[dict]:
        return self.store.list(name)

    # -- boot from the policy's snapshot --
    def resume_point(self, name: str) -> str | None:
        """The ``auto`` snapshot a boot of ``name`` restores, if the policy left one."""
        if not self.store.exists(name, AUTO):
            return None
        try:
            meta = self.store.meta(name, AUTO)
        except CallFailed:
            return None
        if meta.get("resume") and meta.get("backend") == self.boots.backend.name:
            return self.store.dir(name, AUTO)
        return None

    def resumed(self, name: str) -> None:
        """The session booted (from the policy's ``auto`` snapshot or not):
        that snapshot is spent, the session moved on from it."""
        if self.resume_point(name) is not None:
            try:
                self.store.discard(self.store.remove(name, AUTO))
            except CallFailed:
                pass

    def tick(self, now: float) -> None:
        if not self.snapshot_after or not getattr(self.boots.backend, "snapshots", False):
            return
        boots = self.boots
        for sess in boots.registry:
            name = sess.name
            if (name in boots.booted and name not in boots.boots and name not in boots.stops
                    and name not in boots.pausing and name not in boots.warm and name not in self.busy
                    and sess.state in (State.READY, State.STANDBY) and not sess.clients and not sess.channels
                    and now - sess.last_activity > self.snapshot_after):
                log.info("idle snapshot session=%s after %.0f s without traffic: saving it and stopping", name,
                         now - sess.last_activity)
                try:
                    self.take(name, AUTO, stop=True, auto=True)
                except CallFailed as exc:
                    log.warning("idle snapshot of %s: %s", name, exc)

    def _event(self, sess, phase: str, **extra: object) -> None:
        if self.boots.on_event is not None:
            self.boots.on_event(sess, {"type": "snapshot", "phase": phase, **extra})


def _du(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat().st_blocks * 512
    return total
