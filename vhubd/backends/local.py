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

from ..paths import agent_dir
from .base import Backend, BootSpec

log = logging.getLogger("vhubd")


def agent_pythonpath() -> str | None:
    """Where blink_agent lives: the checkout's guest-agent/ or the copy in
    this vhubd's wheel (so the agent is the one shipped with the daemon),
    else None (wherever it is installed)."""
    return agent_dir()


class LocalBackend(Backend):
    name = "local"
    sandbox = False

    def __init__(self, state_dir: str, agent_command: str | None = None, **_: object):
        self.state_dir = state_dir
        self.agent_command = shlex.split(agent_command) if agent_command else [
            sys.executable, "-m", "blink_agent", "serve"]
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        log.warning("backend local: agents run as host processes; this is NOT a sandbox")

    async def start(self, spec: BootSpec):
        os.makedirs(spec.workdir, exist_ok=True)
        env = dict(os.environ, **spec.agent_env())
        path = agent_pythonpath()
        if path:
            env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()

    async def close(self) -> None:
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
