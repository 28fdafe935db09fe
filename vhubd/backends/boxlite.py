"""``boxlite``: sessions as BoxLite micro-VMs (the real sandbox).

One ``boxlite.Boxlite`` runtime per daemon (home under the state dir); box
``vhub-<session>``, persistent (``auto_remove=False``); the guest agent is
the entrypoint, mounted read-only at /opt/blink-agent from the copy this vhubd ships, with
VHUB_SESSION / VHUB_TOKEN / VHUB_ADDR in its env. Facts of boxlite 0.10.8:
create is instant; a start() that cannot boot fails after ~13-20 s with
EngineError; a cancelled start() keeps the VM going, so failures always stop
and remove the box.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from typing import Any

from ..paths import env
from .base import Backend, BackendError, BootSpec
from .local import agent_pythonpath

log = logging.getLogger("vhubd")
GUEST_AGENT_DIR = "/opt/blink-agent"
DEFAULT_IMAGE = "python:3.12-slim"
INSTALL_HINT = "pip install 'vhubd[boxlite]'"


def host_can_boot_vms() -> tuple[bool, str]:
    """Cheap check (no boot attempt): can BoxLite VMs start on this host?
    ``BLINK_BOXLITE_VMS=yes|no`` overrides."""
    forced = env("BLINK_BOXLITE_VMS").strip().lower()
    if forced in ("1", "yes", "true"):
        return True, "BLINK_BOXLITE_VMS=yes"
    if forced in ("0", "no", "false"):
        return False, "BLINK_BOXLITE_VMS=no"
    if importlib.util.find_spec("boxlite") is None:
        return False, f"BoxLite is not installed ({INSTALL_HINT})"
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is the nested kvm-pvm device, on which BoxLite VMs fail to start"
    if not any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return False, "no hardware KVM module (kvm_intel/kvm_amd) is loaded"
    return True, "hardware KVM available"


def box_name(session: str) -> str:
    return f"vhub-{session}"


def explain(exc: BaseException) -> str:
    """BoxLite's own words, with the kind of failure named."""
    kind = type(exc).__name__
    text = str(exc) or kind
    if kind == "EngineError":
        ok, why = host_can_boot_vms()
        hint = "" if ok else f" ({why})"
        return f"BoxLite could not start the VM: {text}{hint}"
    if kind == "ImageError":
        return f"BoxLite could not get the image: {text}"
    if kind in ("InvalidArgumentError", "ConfigError"):
        return f"BoxLite rejected the box options: {text}"
    return f"BoxLite {kind}: {text}"


class BoxliteBackend(Backend):
    name = "boxlite"

    def __init__(self, home_dir: str, image: str | None = None):
        try:
            import boxlite
        except ImportError as exc:
            raise BackendError(f"the boxlite backend needs BoxLite, which is not installed: {INSTALL_HINT} "
                               f"({exc})") from None

        self.boxlite = boxlite
        self.home_dir = home_dir
        os.makedirs(home_dir, exist_ok=True)
        self.runtime = boxlite.Boxlite(boxlite.Options(home_dir=home_dir))
        self.image = image or DEFAULT_IMAGE
        self.boxes: dict[str, Any] = {}

    def options(self, spec: BootSpec):
        image = spec.image or self.image
        kw: dict = {}
        if os.path.isdir(image):
            kw["rootfs_path"] = image
        else:
            kw["image"] = image
        volumes = [(agent_pythonpath(), GUEST_AGENT_DIR, True)]
        env = {**spec.agent_env(), "PYTHONPATH": GUEST_AGENT_DIR}
        return self.boxlite.BoxOptions(
            cpus=spec.cpus, memory_mib=spec.memory_mib, env=sorted(env.items()), volumes=volumes,
            auto_remove=False, entrypoint=["python3", "-m", "blink_agent", "serve"], working_dir="/", **kw)

    async def create_box(self, spec: BootSpec):
        """Get or create the session's box (no VM work)."""
        try:
            box, created = await self.runtime.get_or_create(self.options(spec), name=box_name(spec.session))
        except Exception as exc:  # boxlite.errors.*
            raise BackendError(explain(exc)) from exc
        self.boxes[spec.session] = box
        return box, created

    async def start(self, spec: BootSpec):
        spec.progress("creating the box")
        box, _ = await self.create_box(spec)
        spec.progress("starting the VM (BoxLite: pulls the image the first time)")
        try:
            await box.start()
        except asyncio.CancelledError:
            await self.remove(spec.session)
            raise
        except Exception as exc:
            await self.remove(spec.session)
            raise BackendError(explain(exc)) from exc
        return None

    async def stop(self, session: str) -> None:
        box = self.boxes.get(session)
        if box is not None:
            try:
                await box.stop()
            except Exception as exc:
                log.warning("boxlite stop session=%s: %s", session, explain(exc))

    async def remove(self, session: str) -> None:
        """Stop and remove the box so no VM process is left behind."""
        await self.stop(session)
        self.boxes.pop(session, None)
        try:
            await self.runtime.remove(box_name(session), force=True)
        except Exception as exc:
            if type(exc).__name__ != "NotFoundError":
                log.warning("boxlite remove session=%s: %s", session, explain(exc))

    async def info(self, session: str):
        return await self.runtime.get_info(box_name(session))

    async def close(self) -> None:
        for s in list(self.boxes):
            await self.stop(s)
