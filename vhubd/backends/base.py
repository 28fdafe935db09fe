"""What every backend is: ``Backend`` (start and stop a session's sandbox),
``BootSpec`` (what to start), ``BackendError`` (the backend's own words)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..errors import BackendError

__all__ = ["Backend", "BackendError", "BootSpec"]


@dataclasses.dataclass
class BootSpec:
    session: str
    token: str
    addr: str  # VHUB_ADDR the agent dials
    workdir: str  # per-session state directory
    image: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    env: dict = dataclasses.field(default_factory=dict)
    #: the backend says what it is doing ("starting QEMU (tcg)"): boot events, progress lines
    progress: Callable[[str], None] = dataclasses.field(default=lambda phase: None, repr=False)

    def agent_env(self) -> dict:
        return {**self.env, "VHUB_SESSION": self.session, "VHUB_TOKEN": self.token, "VHUB_ADDR": self.addr}


class Backend:
    name = "?"
    sandbox = True
    boots = True  # False: someone else starts the VM
    snapshots = False  # True: snapshot and restore work

    async def start(self, spec: BootSpec):
        """Start the sandbox; returns a handle whose ``exited`` future (or
        None) resolves with a reason if the agent dies before connecting."""
        raise NotImplementedError

    async def stop(self, session: str) -> None:
        raise NotImplementedError

    async def pause(self, session: str) -> None:
        """Standby: stop the sandbox running, keeping its memory (and the agent's connection)."""
        raise BackendError(f"the {self.name} backend has no standby")

    async def resume(self, session: str) -> None:
        """Out of standby: the sandbox runs again from where it was."""
        raise BackendError(f"the {self.name} backend has no standby")

    async def snapshot(self, session: str, directory: str, *, keep_running: bool = True) -> dict:
        """Save the running sandbox's whole state into ``directory``; it runs
        on (``keep_running``) or is left for ``stop``. A failure leaves it as it was."""
        raise BackendError(f"the {self.name} backend has no snapshots")

    async def restore(self, spec: BootSpec, directory: str):
        """Like ``start``, from the state ``snapshot`` saved in ``directory``."""
        raise BackendError(f"the {self.name} backend has no snapshots")

    async def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "sandbox": self.sandbox}
