"""``external``: someone else runs the VM (Blink's model). The daemon only
registers sessions and hands out tokens; a boot request explains itself."""

from __future__ import annotations

from .base import Backend, BackendError, BootSpec


class ExternalBackend(Backend):
    name = "external"
    boots = False

    async def start(self, spec: BootSpec):
        from .boxlite import host_can_boot_vms

        ok, why = host_can_boot_vms()
        hint = ("start the daemon with --backend boxlite" if ok else
                f"this host cannot boot BoxLite VMs ({why}); start the daemon with --backend local "
                "(agents as host processes, not a sandbox) or start the VM yourself")
        raise BackendError(f"the external backend does not boot sessions: the agent of {spec.session!r} "
                           f"must connect by itself with its token; {hint}")

    async def stop(self, session: str) -> None:
        return None
