"""Session backends behind one small interface (DESIGN §5).

A backend starts a session's sandbox with the agent as its entrypoint
(``start``), and stops it (``stop``). ``make_backend`` picks one by name;
``auto`` = boxlite where this host can boot BoxLite VMs, else external.
"""

from __future__ import annotations

import os

from ..errors import BackendError
from .base import Backend, BootSpec

__all__ = ["Backend", "BackendError", "BootSpec", "make_backend"]


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
        return boxlite.BoxliteBackend(os.path.join(state_dir, "boxlite"), image=kw.get("image"), state_dir=state_dir)
    if name == "qemu":
        from . import qemu

        return qemu.QemuBackend(state_dir, **kw)
    raise BackendError(f"unknown backend {name!r}: choose boxlite, qemu, local, external or auto")
