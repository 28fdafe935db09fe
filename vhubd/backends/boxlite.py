"""``boxlite``: sessions as BoxLite micro-VMs (the real sandbox).

One ``boxlite.Boxlite`` runtime per daemon (home under the state dir); box
``vhub-<session>``, persistent (``auto_remove=False``); the guest agent is
the entrypoint, with VHUB_SESSION / VHUB_TOKEN / VHUB_ADDR in its env.

The image, unless ``--image`` or the boot names one, is the OCI layout
``vhubd.guest.oci`` builds from Debian packages (the agent baked in, as its
entrypoint): built on first use, with progress in the log, in a thread, once
for all the sessions booting meanwhile, and cached in ``STATE_DIR/oci``. A
layout whose entrypoint is the agent (``blink build-image DIR [--base]``)
is used as it is. A registry reference, or a layout without the agent, gets it
mounted read-only at /opt/blink-agent from the copy this vhubd ships and ``python3 -m
blink_agent serve`` as its entrypoint.

Facts of boxlite 0.10.8: create is instant; a start() that cannot boot fails
after ~10-20 s with EngineError; a cancelled start() keeps the VM going, so
failures always stop and remove the box.

Snapshots map to BoxLite's: ``box.snapshot.create`` on the stopped box (it
moves the disk file aside, so never under a running VM), then ``box.export``
of that disk into the snapshot's directory (the snapshot stays whole if the
box goes); a restore stops the box, ``snapshot.restore`` (or ``import_box``
from the export when the box or its BoxLite snapshot is gone) and starts it.
BoxLite 0.10.8 snapshots disks, not memory: processes start again from a boot.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import secrets
import time
from typing import Any

from ..paths import env
from .base import Backend, BackendError, BootSpec
from .local import agent_pythonpath

log = logging.getLogger("vhubd")
GUEST_AGENT_DIR = "/opt/blink-agent"
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


def explain(exc: BaseException, image: str | None = None, after: float | None = None) -> str:
    """BoxLite's own words, with the kind of failure named (and, for a VM
    that did not start, how long it tried)."""
    kind = type(exc).__name__
    text = " ".join((str(exc) or kind).split())[:600]
    if kind == "EngineError":
        ok, why = host_can_boot_vms()
        hint = "" if ok else f" ({why})"
        took = f" after {after:.1f} s" if after is not None else ""
        return f"BoxLite could not start the VM{took}: {text}{hint}"
    if kind in ("ImageError", "StorageError") and image and not os.path.isdir(image):
        return (f"BoxLite could not get the image {image[:200]!r}: {text} (a registry image needs that registry; "
                "without --image the daemon uses an OCI layout it builds from Debian packages)")
    if kind == "ImageError":
        return f"BoxLite could not get the image: {text}"
    if kind in ("InvalidArgumentError", "ConfigError"):
        return f"BoxLite rejected the box options: {text}"
    return f"BoxLite {kind}: {text}"


def baked_in(image: str) -> bool:
    """Whether ``image`` is a local layout whose entrypoint is the agent."""
    if not os.path.isdir(image):
        return False
    from ..errors import GuestImageError
    from ..guest import layout

    try:
        entry = (layout.read(image).config.get("config") or {}).get("Entrypoint") or []
    except GuestImageError:
        return False
    return isinstance(entry, list) and "blink_agent" in entry


SNAPSHOT_FILE = "boxlite.json"  # in a snapshot's directory: the box, BoxLite's snapshot name, the export
EXPORT_FILE = "box.boxlite"


class BoxliteBackend(Backend):
    name = "boxlite"
    snapshots = True

    def __init__(self, home_dir: str, image: str | None = None, state_dir: str | None = None):
        try:
            import boxlite
        except ImportError as exc:
            raise BackendError(f"the boxlite backend needs BoxLite, which is not installed: {INSTALL_HINT} "
                               f"({exc})") from None

        self.boxlite = boxlite
        self.home_dir = home_dir
        self.state_dir = state_dir or os.path.dirname(os.path.abspath(home_dir))
        os.makedirs(home_dir, exist_ok=True)
        self.runtime = boxlite.Boxlite(boxlite.Options(home_dir=home_dir))
        self.image = image  # None: the default layout
        self.boxes: dict[str, Any] = {}
        self._default: asyncio.Future | None = None

    # -- the default image --
    def _build_default(self) -> str:
        """The default layout's directory, built (or found up to date) now; runs in a thread."""
        from ..errors import GuestImageError
        from ..guest import oci

        cache = oci.default_cache_dir(self.state_dir)
        t0 = time.monotonic()
        try:
            img = oci.build(cache, log=lambda m: log.info("boxlite default image: %s", m),
                            debs_dir=oci.default_debs_dir(self.state_dir))
        except (GuestImageError, OSError) as exc:
            try:
                img = oci.find(cache)
            except GuestImageError:
                raise BackendError(f"cannot build BoxLite's default image (an OCI layout from Debian packages): "
                                   f"{exc}; build it with `blink build-image`, or boot a registry image with "
                                   "--image REF") from None
            log.warning("boxlite default image: cannot build the current one (%s); using the cached %s", exc,
                        img.manifest.get("key"))
        log.info("boxlite default image: %s (%s) ready in %.1f s", img.layout, oci.describe(img),
                 time.monotonic() - t0)
        return img.layout

    async def default_layout(self) -> str:
        """The default layout, built on first use: one build shared by every
        boot waiting for it, which a cancelled boot does not stop."""
        fut = self._default
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            fut = self._default = asyncio.ensure_future(asyncio.to_thread(self._build_default))
        return await asyncio.shield(fut)

    async def image_for(self, spec: BootSpec) -> tuple[str, bool]:
        """(image, whether the agent is baked in as its entrypoint: the
        default layout, or another `blink build-image` made)."""
        image = spec.image or self.image
        if image:
            return image, baked_in(image)
        spec.progress("preparing the default image (built from Debian packages once, then cached)")
        return await self.default_layout(), True

    def box_options(self, spec: BootSpec, image: str, default: bool = False) -> dict:
        """The keyword arguments of the session's ``boxlite.BoxOptions``."""
        kw: dict = {"cpus": spec.cpus, "memory_mib": spec.memory_mib, "auto_remove": False, "working_dir": "/",
                    "env": sorted({**spec.agent_env(), "PYTHONPATH": GUEST_AGENT_DIR}.items())}
        if os.path.isdir(image):
            kw["rootfs_path"] = os.path.realpath(image)
        else:
            kw["image"] = image
        if default:  # the agent is in the image, as its entrypoint
            kw["volumes"] = []
        else:
            src = agent_pythonpath()
            kw["volumes"] = [(src, GUEST_AGENT_DIR, True)] if src else []
            kw["entrypoint"] = ["python3", "-m", "blink_agent", "serve"]
        return kw

    def options(self, spec: BootSpec, image: str, default: bool = False):
        return self.boxlite.BoxOptions(**self.box_options(spec, image, default))

    async def create_box(self, spec: BootSpec):
        """Get or create the session's box (no VM work)."""
        image, default = await self.image_for(spec)
        try:
            box, created = await self.runtime.get_or_create(self.options(spec, image, default),
                                                            name=box_name(spec.session))
        except Exception as exc:  # boxlite.errors.*
            raise BackendError(explain(exc, image)) from exc
        self.boxes[spec.session] = box
        log.info("boxlite box %s %s session=%s image=%s", box_name(spec.session),
                 "created" if created else "found", spec.session, image[:200])
        return box, created

    async def start(self, spec: BootSpec):
        spec.progress("creating the box")
        box, _ = await self.create_box(spec)
        spec.progress("starting the VM (BoxLite imports the image the first time)")
        t0 = time.monotonic()
        try:
            await box.start()
        except asyncio.CancelledError:
            await self.remove(spec.session)
            raise
        except Exception as exc:
            await self.remove(spec.session)
            raise BackendError(explain(exc, spec.image or self.image, time.monotonic() - t0)) from exc
        log.info("boxlite box %s started in %.1f s", box_name(spec.session), time.monotonic() - t0)
        return None

    async def stop(self, session: str) -> None:
        box = self.boxes.pop(session, None)  # a stopped box's handle is spent: runtime.get() makes a new one
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
        else:
            log.info("boxlite box %s removed", box_name(session))

    # -- snapshots (the disk: BoxLite 0.10.8 has no memory snapshots) --
    async def _box(self, session: str):
        box = self.boxes.get(session)
        if box is None:
            try:
                box = await self.runtime.get(box_name(session))
            except Exception as exc:
                raise BackendError(explain(exc)) from exc
            if box is None:
                raise BackendError(f"session {session!r} has no BoxLite box")
            self.boxes[session] = box
        return box

    async def snapshot(self, session: str, directory: str, *, keep_running: bool = True) -> dict:
        await self._box(session)
        snap = f"vhub-{secrets.token_hex(6)}"
        await self.stop(session)  # BoxLite moves the disk file aside: never under a running VM
        box = await self._box(session)
        try:
            try:
                info = await box.snapshot.create(name=snap)
            except Exception as exc:
                raise BackendError(f"snapshot: {explain(exc)}") from exc
            try:
                archive = await box.export(dest=os.path.join(directory, EXPORT_FILE))
            except Exception as exc:
                try:
                    await box.snapshot.remove(snap)
                except Exception:
                    pass
                raise BackendError(f"export: {explain(exc)}") from exc
            rec = {"box": box_name(session), "box_id": getattr(box, "id", None), "snapshot": snap,
                   "archive": os.path.basename(str(archive)), "memory": False}
            with open(os.path.join(directory, SNAPSHOT_FILE), "w") as f:
                json.dump(rec, f)
        finally:
            if keep_running:  # as it was: running (BoxLite boots it again from its disk)
                await self._start_box(session, box)
        return {"bytes": int(getattr(info, "size_bytes", 0) or 0), "memory": False, "boxlite_snapshot": snap,
                "container_disk_bytes": int(getattr(info, "container_disk_bytes", 0) or 0)}

    async def restore(self, spec: BootSpec, directory: str):
        try:
            with open(os.path.join(directory, SNAPSHOT_FILE)) as f:
                rec = json.load(f)
            snap, archive = str(rec["snapshot"]), os.path.join(directory, os.path.basename(str(rec["archive"])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"snapshot in {directory} is unusable: {exc}") from None
        spec.progress("restoring the box's disk from its snapshot")
        try:
            await self.stop(spec.session)
            box = await self._box(spec.session)
            await box.snapshot.restore(snap)
        except Exception as exc:  # the box or its BoxLite snapshot is gone: from the export
            log.info("boxlite restore session=%s from the export (%s)", spec.session, explain(exc))
            await self.remove(spec.session)
            try:
                box = await self.runtime.import_box(archive, name=box_name(spec.session))
            except Exception as exc2:
                raise BackendError(f"restore: {explain(exc2)}") from exc2
            self.boxes[spec.session] = box
        spec.progress("starting the VM")
        await self._start_box(spec.session, box)
        return None

    async def _start_box(self, session: str, box) -> None:
        t0 = time.monotonic()
        try:
            await box.start()
        except Exception as exc:  # the box and its snapshots stay
            await self.stop(session)
            raise BackendError(explain(exc, None, time.monotonic() - t0)) from exc

    async def forget_snapshot(self, session: str, directory: str) -> None:
        """``blink rm-snapshot``: BoxLite's snapshot goes too (unless the box's disk still depends on it)."""
        try:
            with open(os.path.join(directory, SNAPSHOT_FILE)) as f:
                snap = str(json.load(f)["snapshot"])
            box = await self._box(session)
            await box.snapshot.remove(snap)
        except Exception as exc:
            log.info("boxlite snapshot of session=%s kept by BoxLite: %s", session, explain(exc))

    async def info(self, session: str):
        return await self.runtime.get_info(box_name(session))

    async def close(self) -> None:
        for s in list(self.boxes):
            await self.stop(s)
