"""Session backends behind one small interface (DESIGN §5).

A backend starts a session's sandbox with the agent as its entrypoint
(``start``), and stops it (``stop``). ``make_backend`` picks one by name;
``auto`` = boxlite where this host can boot BoxLite VMs, else external.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import BackendError


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

    def agent_env(self) -> dict:
        return {**self.env, "VHUB_SESSION": self.session, "VHUB_TOKEN": self.token, "VHUB_ADDR": self.addr}


class Backend:
    name = "?"
    sandbox = True
    boots = True  # False: someone else starts the VM

    async def start(self, spec: BootSpec):
        """Start the sandbox; returns a handle whose ``exited`` future (or
        None) resolves with a reason if the agent dies before connecting."""
        raise NotImplementedError

    async def stop(self, session: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "sandbox": self.sandbox}


def make_backend(name: str, *, state_dir: str, **kw) -> Backend:
    from . import boxlite, external, local

    if name == "auto":
        ok, _ = boxlite.host_can_boot_vms()
        name = "boxlite" if ok else "external"
    if name == "local":
        return local.LocalBackend(state_dir, **kw)
    if name == "external":
        return external.ExternalBackend()
    if name == "boxlite":
        return boxlite.BoxliteBackend(os.path.join(state_dir, "boxlite"), image=kw.get("image"))
    if name == "qemu":
        from . import qemu

        return qemu.QemuBackend(state_dir, **kw)
    raise BackendError(f"unknown backend {name!r}: choose boxlite, qemu, local, external or auto")
