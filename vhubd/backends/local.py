"""``local``: the guest agent as a plain host subprocess. NOT a sandbox: it
exists so the whole system runs on hosts without KVM (the README's main job
uses it). The daemon says so in its log and in ``vhub.info``."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import sys

from .. import shipped
from .base import Backend, BackendError, BootSpec

log = logging.getLogger("vhubd")


def agent_pythonpath() -> str:
    """Where blink_agent lives: the copy this vhubd ships (package data in a
    wheel, ``guest-agent/`` in a checkout), so the agent is always the one of
    this daemon's version."""
    return shipped.agent_dir()


class LocalBackend(Backend):
    name = "local"
    sandbox = False

    def __init__(self, state_dir: str, agent_command: str | None = None, **_: object):
        self.state_dir = state_dir
        self.agent_command = shlex.split(agent_command) if agent_command else [
            sys.executable, "-m", "blink_agent", "serve"]
        self.shipped_agent = not agent_command  # the default command runs the agent this vhubd ships
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        log.warning("backend local: agents run as host processes; this is NOT a sandbox")

    async def start(self, spec: BootSpec):
        os.makedirs(spec.workdir, exist_ok=True)
        env = dict(os.environ, **spec.agent_env())
        try:
            path: str | None = agent_pythonpath()
        except shipped.NotShipped as exc:
            if self.shipped_agent:
                raise BackendError(str(exc)) from None
            path = None  # --agent-command brings its own agent
        if path:
            env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        spec.progress("starting the agent process")
        logf = open(os.path.join(spec.workdir, "agent.log"), "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.agent_command, cwd=spec.workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=logf, stderr=logf, start_new_session=True)
        finally:
            logf.close()
        self.procs[spec.session] = proc
        log.info("local agent started session=%s pid=%d (not a sandbox)", spec.session, proc.pid)
        return LocalHandle(proc, os.path.join(spec.workdir, "agent.log"))

    async def stop(self, session: str) -> None:
        proc = self.procs.pop(session, None)
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()

    async def pause(self, session: str) -> None:
        """SIGSTOP to the agent's process group (it and everything it started)."""
        self._signal(session, signal.SIGSTOP)

    async def resume(self, session: str) -> None:
        self._signal(session, signal.SIGCONT)

    def _signal(self, session: str, sig: int) -> None:
        proc = self.procs.get(session)
        if proc is None or proc.returncode is not None:
            raise BackendError(f"session {session!r} has no agent process running")
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            raise BackendError(f"session {session!r}: its agent process is gone") from None

    async def close(self) -> None:
        for proc in self.procs.values():  # a stopped group would ignore SIGTERM until continued
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        await asyncio.gather(*(self.stop(s) for s in list(self.procs)))


class LocalHandle:
    def __init__(self, proc: asyncio.subprocess.Process, logpath: str):
        self.proc = proc
        self.exited = asyncio.ensure_future(self._wait(logpath))

    async def _wait(self, logpath: str) -> str:
        code = await self.proc.wait()
        try:
            with open(logpath, "rb") as f:
                f.seek(max(0, os.path.getsize(logpath) - 400))
                tail = f.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        except OSError:
            tail = []
        return f"the agent process exited with code {code} before connecting" + (
            f": {tail[0]}" if tail else "")
