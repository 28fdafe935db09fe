"""Boot on demand, stop and idle stop (DESIGN §5), over one backend.

Single-flight per session: concurrent requests share one boot future. The
boot timeout covers the backend's start and the agent's handshake; every
failure reaches every waiter as ``boot_failed`` with the backend's words,
the session becomes ``failed``, and the sandbox is stopped so nothing is left
running. It knows sessions only through the registry (it watches their
states: an agent that connects resolves its boot) and answers with futures;
the relay waits on those, and never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from .backends import Backend, BackendError, BootSpec
from .errors import BootFailed, CallFailed
from .sessions import Session, SessionRegistry, State, new_token, validate_name
from .snapshots import Snapshots, SnapshotStore

log = logging.getLogger("vhubd")


MAX_IMAGE = 4096  # characters of an image reference or path
MAX_ENV = 256  # variables a boot may set


def check_boot_params(params: dict) -> None:
    """``CallFailed bad_params`` unless the boot's ``image``, ``cpus``,
    ``memory_mib`` and ``env`` are what a backend takes (a client chose them)."""
    image = params.get("image")
    if image is not None and (not isinstance(image, str) or not image or len(image) > MAX_IMAGE or "\0" in image):
        raise CallFailed("bad_params", f"image must be an OCI reference or a directory (a string of 1 to "
                                       f"{MAX_IMAGE} characters)")
    for key, top in (("cpus", 256), ("memory_mib", 1 << 20)):
        v = params.get(key)
        if v is not None and (type(v) is not int or not 0 < v <= top):
            raise CallFailed("bad_params", f"{key} must be an integer from 1 to {top}")
    env = params.get("env")
    if env is not None and (not isinstance(env, dict) or len(env) > MAX_ENV
                            or not all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items())):
        raise CallFailed("bad_params", f"env must be an object of at most {MAX_ENV} string values")
    warm = params.get("warm")
    if warm is not None and not isinstance(warm, bool):
        raise CallFailed("bad_params", "warm must be true or false")


class BootManager:
    def __init__(self, registry: SessionRegistry, backend: Backend, *, state_dir: str,
                 agent_addr: str | Callable[[str], str],
                 boot_timeout: float = 120.0, idle_stop: float | None = None,
                 standby_after: float | None = None, stop_after: float | None = None,
                 snapshot_after: float | None = None):
        self.registry = registry
        self.backend = backend
        self.state_dir = state_dir
        self.agent_addr = agent_addr
        self.boot_timeout = boot_timeout
        self.idle_stop = idle_stop
        self.standby_after = standby_after  # idle this long: standby
        self.stop_after = stop_after  # in standby this long: stopped
        self.pausing: dict[str, asyncio.Future] = {}  # standby or wake under way, by session
        self.boots: dict[str, asyncio.Future] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.stops: dict[str, asyncio.Task] = {}
        self.booted: set[str] = set()  # sessions whose sandbox we started
        self.warm: set[str] = set()  # booted with "warm": kept booted, exempt from idle stop
        self.boot_count = 0
        #: gets each boot phase of a session as a ``{"type": "boot", ...}`` event (the daemon publishes them)
        self.on_event: Callable[[Session, dict], None] | None = None
        #: snapshots of sessions (vhub.snapshot, restore, the --snapshot-after policy)
        self.snapshots = Snapshots(self, SnapshotStore(state_dir), snapshot_after=snapshot_after)
        registry.watch(self._state_changed)

    # -- boot --
    def boot(self, name: str, params: dict | None = None, *, restore: str | None = None) -> asyncio.Future:
        """Boot ``name`` (single-flight); with ``restore``, from that snapshot
        directory. A session the --snapshot-after policy stopped comes back
        from its ``auto`` snapshot."""
        validate_name(name)
        check_boot_params(params or {})
        sess = self.registry.get(name) or self.registry.create(name, self.backend.name)
        if (params or {}).get("warm") is not None:
            (self.warm.add if params["warm"] else self.warm.discard)(name)  # type: ignore[index]
        fut = self.boots.get(name)
        if fut is not None:
            return fut
        busy = self.snapshots.busy.get(name)
        if busy is not None and restore is None:  # a snapshot or restore under way: then see
            return asyncio.ensure_future(self._after_snapshot(busy, name, params, restore))
        loop = asyncio.get_running_loop()
        if sess.agent is not None:
            done = loop.create_future()
            done.set_result({"session": name, "state": sess.state.value, "booted": False})
            return done
        if restore is None and not any((params or {}).get(k) for k in ("image", "cpus", "memory_mib", "env")):
            restore = self.snapshots.resume_point(name)  # the policy stopped it after a snapshot
        sess.outboxes.clear()  # the VM's agent starts over, or from a snapshot: its frames are new again
        sess.generation += 1  # and what its old connections took, reported later, does not count
        fut = asyncio.ensure_future(self._boot(sess, dict(params or {}), restore))
        self.boots[name] = fut
        fut.add_done_callback(lambda f: self.boots.pop(name, None))
        fut.add_done_callback(_consume)
        return fut

    async def _after_snapshot(self, busy: asyncio.Future, name: str, params: dict | None,
                              restore: str | None) -> dict:
        try:
            await asyncio.shield(busy)
        except Exception:
            pass
        return await self.boot(name, params, restore=restore)

    async def _boot(self, sess: Session, params: dict, restore: str | None = None) -> dict:
        name = sess.name
        if name in self.stops:
            await asyncio.shield(self.stops[name])
        t0 = time.monotonic()
        self.boot_count += 1
        sess.backend = self.backend.name
        if sess.token is None and not sess.anonymous:
            sess.token = new_token()
        self.registry.set_state(sess, State.BOOTING, f"booting with backend {self.backend.name}")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[name] = waiter
        addr = self.agent_addr(name) if callable(self.agent_addr) else self.agent_addr

        def phase(what: str, **extra: object) -> None:
            self._phase(sess, t0, what, **extra)

        spec = BootSpec(session=name, token=sess.token or "", addr=addr,
                        workdir=os.path.join(self.state_dir, "sessions", name), image=params.get("image"),
                        cpus=params.get("cpus"), memory_mib=params.get("memory_mib"),
                        env={str(k): str(v) for k, v in (params.get("env") or {}).items()}, progress=phase)
        phase("starting")
        stage = "starting the sandbox"
        try:
            async with asyncio.timeout(self.boot_timeout):
                self.booted.add(name)
                if restore is not None:
                    handle = await self.backend.restore(spec, restore)
                else:
                    handle = await self.backend.start(spec)
                stage = "waiting for the agent's handshake"
                if sess.agent is None:
                    phase("waiting for the agent to connect")
                    if sess.state is State.BOOTING:
                        self.registry.set_state(sess, State.WAITING_AGENT, "sandbox started; waiting for its agent")
                    exited = getattr(handle, "exited", None)
                    done, _ = await asyncio.wait([waiter] + ([exited] if exited else []),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if waiter not in done and exited is not None:
                        raise BackendError(exited.result())
        except TimeoutError:
            msg = f"boot of {name!r} timed out after {self.boot_timeout:g} s while {stage}"
            phase("failed", reason=msg)
            await self._fail(sess, msg, keep=restore is not None)
            raise BootFailed(msg) from None
        except (BackendError, OSError) as exc:
            phase("failed", reason=str(exc))
            await self._fail(sess, str(exc), keep=restore is not None)
            raise BootFailed(str(exc)) from None
        except asyncio.CancelledError:
            phase("failed", reason="boot cancelled (session stopping)")
            raise
        finally:
            self.waiters.pop(name, None)
        phase("ready")
        self.snapshots.resumed(name)  # booted or restored: the policy's snapshot, if any, is behind it now
        ms = (time.monotonic() - t0) * 1000
        log.info("session %s session=%s backend=%s in %.0f ms", "restored" if restore else "booted", name,
                 self.backend.name, ms)
        sess.last_activity = time.monotonic()
        return {"session": name, "state": sess.state.value, "booted": True, "boot_ms": round(ms, 1),
                **({"restored_from": os.path.basename(restore)} if restore else {})}

    def _phase(self, sess: Session, t0: float, what: str, **extra: object) -> None:
        if self.on_event is not None:
            try:
                self.on_event(sess, {"type": "boot", "phase": what, "elapsed": round(time.monotonic() - t0, 2),
                                     "backend": self.backend.name, **extra})
            except Exception:
                log.exception("publishing a boot event of %s", sess.name)

    async def _fail(self, sess: Session, msg: str, keep: bool = False) -> None:
        """The boot failed: its sandbox stops, and is removed unless ``keep``
        (a failed restore keeps the box its snapshots live in)."""
        log.warning("boot failed session=%s: %s", sess.name, msg)
        self.booted.discard(sess.name)
        try:
            await self.backend.stop(sess.name)
            remove = None if keep else getattr(self.backend, "remove", None)
            if remove is not None:
                await remove(sess.name)
        except Exception:
            log.exception("cleanup after failed boot of %s", sess.name)
        if sess.state is not State.FAILED:
            self.registry.set_state(sess, State.FAILED, msg)

    # -- stop --
    def stop(self, name: str) -> asyncio.Task:
        task = self.stops.get(name)
        if task is None:
            task = asyncio.ensure_future(self._stop(name))
            self.stops[name] = task
            task.add_done_callback(lambda t: self.stops.pop(name, None))
            task.add_done_callback(_consume)
        return task

    async def _stop(self, name: str) -> dict:
        sess = self.registry.get(name)
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        boot = self.boots.get(name)
        if boot is not None:
            boot.cancel()
        if sess.state in (State.STOPPED,):
            return {"session": name, "state": "stopped"}
        if sess.state is State.STANDBY:  # a paused sandbox must run to stop cleanly
            try:
                await self.backend.resume(name)
            except BackendError as exc:
                log.warning("resuming %s to stop it: %s", name, exc)
        self.registry.set_state(sess, State.STOPPING, "stop requested")  # the relay closes its agent
        await self.backend.stop(name)
        self.booted.discard(name)
        self.warm.discard(name)
        self.registry.set_state(sess, State.STOPPED, "stopped")
        log.info("session stopped session=%s", name)
        return {"session": name, "state": "stopped"}

    # -- standby --
    def standby(self, name: str) -> asyncio.Future:
        """Pause a booted, ready session (its sandbox keeps its memory)."""
        return self._pause_op(name, True)

    def wake(self, name: str) -> asyncio.Future:
        """Resume a session in standby (nothing to do for one that is not)."""
        return self._pause_op(name, False)

    def _pause_op(self, name: str, pause: bool) -> asyncio.Future:
        fut = self.pausing.get(name)
        if fut is not None and not fut.done():
            if pause or getattr(fut, "vhub_pause", False) is False:
                return fut
            # a wake while going to standby: after it
            prev = fut
            fut = asyncio.ensure_future(self._after(prev, name))
        else:
            fut = asyncio.ensure_future(self._pause(name) if pause else self._wake(name))
        fut.vhub_pause = pause  # type: ignore[attr-defined]
        self.pausing[name] = fut
        fut.add_done_callback(lambda f: self.pausing.pop(name, None) if self.pausing.get(name) is f else None)
        fut.add_done_callback(_consume)
        return fut

    async def _after(self, prev: asyncio.Future, name: str) -> dict:
        try:
            await asyncio.shield(prev)
        except Exception:
            pass
        return await self._wake(name)

    async def _pause(self, name: str) -> dict:
        sess = self.registry.get(name)
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        if sess.state is State.STANDBY:
            return {"session": name, "state": "standby"}
        if (sess.state is not State.READY or name not in self.booted or name in self.boots or name in self.stops
                or name in self.snapshots.busy):
            raise CallFailed("bad_state", f"session {name!r} is {sess.state.value}: only a ready session this "
                                          "daemon booted, with no snapshot under way, can go to standby")
        t0 = time.monotonic()
        try:
            await self.backend.pause(name)
        except BackendError as exc:
            raise CallFailed("standby_failed", str(exc)) from None
        if sess.state is State.READY:
            sess.standby_since = time.monotonic()
            self.registry.set_state(sess, State.STANDBY, "standby")
        ms = (time.monotonic() - t0) * 1000
        log.info("session standby session=%s in %.1f ms", name, ms)
        return {"session": name, "state": sess.state.value, "ms": round(ms, 2)}

    async def _wake(self, name: str) -> dict:
        sess = self.registry.get(name)
        if sess is None:
            raise CallFailed("unknown_session", f"no session named {name!r}")
        if sess.state is not State.STANDBY:
            return {"session": name, "state": sess.state.value, "woken": False}
        t0 = time.monotonic()
        try:
            await self.backend.resume(name)
        except BackendError as exc:
            raise CallFailed("wake_failed", str(exc)) from None
        sess.last_activity = time.monotonic()
        if sess.state is State.STANDBY:
            self.registry.set_state(sess, State.READY, "woken")
        ms = (time.monotonic() - t0) * 1000
        log.info("session woken session=%s in %.1f ms", name, ms)
        return {"session": name, "state": sess.state.value, "woken": True, "ms": round(ms, 2)}

    def forget(self, name: str) -> None:
        """The session was removed (vhub.remove): nothing of it is kept, its snapshots neither."""
        self.booted.discard(name)
        self.snapshots.store.remove_all(name)

    def _state_changed(self, sess: Session, old: State) -> None:
        """An agent connected: the boot waiting for it is done."""
        if sess.state is State.READY:
            w = self.waiters.get(sess.name)
            if w is not None and not w.done():
                w.set_result(True)
        elif sess.state is State.AGENT_LOST:
            sess.last_activity = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self.standby_after or self.stop_after:
            self._standby_policy(now)
        self.snapshots.tick(now)
        if not self.idle_stop:
            return
        for sess in self.registry:
            if (sess.name in self.booted and sess.name not in self.boots and sess.name not in self.stops
                    and sess.name not in self.warm and sess.name not in self.snapshots.busy
                    and not sess.clients and not sess.channels  # an open connection or copy: in use
                    and sess.state in (State.READY, State.AGENT_LOST)
                    and now - sess.last_activity > self.idle_stop):
                log.info("idle stop session=%s after %.0f s without clients, channels or traffic", sess.name,
                         now - sess.last_activity)
                self.stop(sess.name)

    def _standby_policy(self, now: float) -> None:
        """Idle ``standby_after`` seconds: standby; in standby ``stop_after`` seconds: stopped."""
        for sess in self.registry:
            name = sess.name
            if (name not in self.booted or name in self.boots or name in self.stops or name in self.pausing
                    or name in self.warm or name in self.snapshots.busy):  # warm: kept booted and running
                continue
            if (self.standby_after and sess.state is State.READY
                    and now - sess.last_activity > self.standby_after):
                log.info("idle standby session=%s after %.0f s without traffic", name,
                         now - sess.last_activity)
                self.standby(name)
            elif (self.stop_after and sess.state is State.STANDBY
                  and now - sess.standby_since > self.stop_after):
                log.info("stop session=%s after %.0f s in standby", name, now - sess.standby_since)
                self.stop(name)

    async def close(self) -> None:
        """Daemon shutdown: stop every sandbox this daemon started."""
        for f in list(self.boots.values()):
            f.cancel()
        for name in list(self.booted):
            try:
                await self.backend.stop(name)
            except Exception:
                log.exception("stopping %s at shutdown", name)
        await self.backend.close()


def _consume(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()



