"""``qemu``: each session is a QEMU microvm whose vsock device is the daemon.

A boot starts ``qemu-system-x86_64 -M microvm`` (KVM when a probe shows it
really runs guest code here, TCG otherwise) with the guest image of
``vhubd.guest_image`` (kernel + initramfs whose init starts ``blink-agent
serve``) and a ``vhost-user-vsock-device`` whose vhost-user socket is one end
of a socketpair; the daemon serves the other end (``vhubd.vhost``). The guest
agent dials vsock CID 2 port 10000 and lands, through the daemon's ordinary
guest connection (``guest_protocol``, given by the daemon), in this session: the device identifies the
session, no token.

QEMU runs in its own process group with PR_SET_PDEATHSIG=SIGKILL, so a daemon
that dies without cleaning up takes its VMs with it; ``stop`` sends SIGTERM to
the group, then SIGKILL. A QEMU that exits before its agent connects fails the
boot with QEMU's own words (its stderr) or, when the guest itself gave up,
the tail of the guest console.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable

from .. import guest as guest_image
from ..paths import env as env_var
from ..vhost.service import VhostUserVsockService
from . import qmp
from .base import Backend, BackendError, BootSpec

log = logging.getLogger("vhubd")

QEMU = "qemu-system-x86_64"
DEFAULT_MEMORY_MIB = 256
DEFAULT_CPUS = 1
FIRST_CID = 3
STOP_GRACE = 5.0
QMP_SOCKET = "qmp.sock"  # in the session's workdir: standby (stop) and wake (cont)
PR_SET_PDEATHSIG = 1
_PROBE_EXIT = 0x31  # the probe firmware writes this to isa-debug-exit; QEMU exits (0x31 << 1) | 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


def probe_firmware() -> bytes:
    """64 KiB of firmware whose reset vector does ``out 0xf4, 0x31; hlt``:
    proof that a vCPU really executed guest code."""
    fw = bytearray(b"\xf4" * 65536)
    fw[0xFFF0:0xFFF7] = bytes([0xB0, _PROBE_EXIT, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE])
    return bytes(fw)


def host_tsc_khz() -> int | None:
    """Under TCG the guest's TSC runs at the host's rate; telling the kernel
    (tsc_early_khz) spares it a calibration against an emulated PIT, which
    fails often enough under TCG to hang the boot."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


class QemuVm:
    """One running VM: the QEMU process, its vsock device, its files."""

    def __init__(self, session: str, cid: int, proc: asyncio.subprocess.Process, device: VhostUserVsockService,
                 workdir: str):
        self.session = session
        self.cid = cid
        self.proc = proc
        self.device = device
        self.workdir = workdir
        self.started = time.monotonic()
        self.stopping = False
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.watch = asyncio.ensure_future(self._watch())

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _watch(self) -> None:
        code = await self.proc.wait()
        reason = self.describe_exit(code)
        if not self.stopping:
            log.warning("qemu exited session=%s pid=%d: %s", self.session, self.proc.pid, reason)
        self.device.close(f"QEMU exited ({reason})")
        for name in ("qemu.pid", QMP_SOCKET):
            try:
                os.unlink(os.path.join(self.workdir, name))
            except OSError:
                pass
        if not self.exited.done():
            self.exited.set_result(reason)

    def describe_exit(self, code: int) -> str:
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = str(-code)
            head = f"QEMU was killed by {sig}"
        else:
            head = f"QEMU exited with code {code}"
        err = _tail(os.path.join(self.workdir, "qemu.log"), 3)
        if err:
            return f"{head}: {err}"
        if code == 0:
            console = _tail(os.path.join(self.workdir, "console.log"), 3)
            return f"{head}: the guest powered off" + (f"; console: {console}" if console else "")
        return head


class QemuBackend(Backend):
    name = "qemu"
    sandbox = True

    def __init__(self, state_dir: str, *, image: str | None = None, accel: str = "auto", qemu: str | None = None,
                 memory_mib: int = DEFAULT_MEMORY_MIB, cpus: int = DEFAULT_CPUS,
                 guest_protocol: Callable[[str, str], Callable[[], asyncio.BaseProtocol]] | None = None,
                 **_: object):
        self.state_dir = state_dir
        self.image_dir = image
        if accel not in ("auto", "kvm", "tcg"):
            raise BackendError(f"--qemu-accel must be auto, kvm or tcg, got {accel!r}")
        self.accel_choice = accel
        found = qemu or env_var("BLINK_QEMU") or shutil.which(QEMU)
        if not found:
            raise BackendError(f"{QEMU} not found: install Debian's qemu-system-x86 (./dev setup does)")
        self.qemu: str = found
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.guest_protocol = guest_protocol  # (listener name, session) -> protocol factory
        self.vms: dict[str, QemuVm] = {}
        self._accel: tuple[str, str] | None = None
        self._accel_lock = asyncio.Lock()
        self._next_cid = FIRST_CID

    # -- what to boot --
    def image(self, override: str | None = None) -> guest_image.GuestImage:
        try:
            if override:
                return guest_image.load(override)
            if self.image_dir:
                return guest_image.load(self.image_dir)
            return guest_image.find(guest_image.default_cache_dir(self.state_dir))
        except guest_image.GuestImageError as exc:
            raise BackendError(str(exc)) from None

    async def accel(self) -> tuple[str, str]:
        """("kvm" | "tcg", why): KVM only when a probe VM really ran."""
        async with self._accel_lock:
            if self._accel is None:
                self._accel = await self._probe_accel()
                log.info("backend qemu: accelerator %s (%s)", *self._accel)
            return self._accel

    async def _probe_accel(self) -> tuple[str, str]:
        if self.accel_choice == "tcg":
            return "tcg", "--qemu-accel tcg"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            if self.accel_choice == "kvm":
                raise BackendError("--qemu-accel kvm, but /dev/kvm is missing or not accessible")
            return "tcg", "no usable /dev/kvm"
        if os.path.isdir("/sys/module/kvm_pvm"):
            # the nested kvm-pvm device runs the probe's real-mode firmware but no stock kernel
            if self.accel_choice == "kvm":
                raise BackendError("--qemu-accel kvm, but /dev/kvm is the nested kvm-pvm device, which cannot "
                                   "boot a stock guest kernel")
            return "tcg", "/dev/kvm is the nested kvm-pvm device, which cannot boot a stock guest kernel"
        fw = os.path.join(self.state_dir, "qemu-probe.bin")
        os.makedirs(self.state_dir, exist_ok=True)
        with open(fw, "wb") as f:
            f.write(probe_firmware())
        proc = await asyncio.create_subprocess_exec(
            self.qemu, "-M", "microvm,accel=kvm", "-cpu", "host", "-m", "16", "-nodefaults", "-no-user-config",
            "-display", "none", "-bios", fw, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-no-reboot",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            err = b"the KVM probe did not finish within 10 s"
        words = err.decode("utf-8", "replace").strip().splitlines()
        if proc.returncode == (_PROBE_EXIT << 1) | 1:
            return "kvm", "a KVM probe VM ran"
        why = f"KVM probe failed: {words[0] if words else f'exit code {proc.returncode}'}"
        if self.accel_choice == "kvm":
            raise BackendError(f"--qemu-accel kvm, but {why}")
        return "tcg", why

    def _cid(self) -> int:
        used = {vm.cid for vm in self.vms.values()}
        while self._next_cid in used:
            self._next_cid += 1
        cid = self._next_cid
        self._next_cid = FIRST_CID + (cid + 1 - FIRST_CID) % 0xFFFF0000
        return cid

    def command(self, img: guest_image.GuestImage, spec: BootSpec, accel: str, chardev_fd: int, cid: int) -> list[str]:
        mem = int(spec.memory_mib or self.memory_mib)
        cpus = int(spec.cpus or self.cpus)
        env = {k: v for k, v in spec.env.items() if k not in ("VHUB_ADDR", "VHUB_TOKEN", "VHUB_SESSION")}
        append = ["console=ttyS0", "quiet", "panic=-1", f"vhub.session={spec.session}"]
        if env:
            append.append(f"vhub.env={guest_image.encode_env(env)}")
        if accel == "tcg":
            khz = host_tsc_khz()
            if khz:  # the host's TSC, which TCG passes through: exact, so the clocksource watchdog may trust it
                append += [f"tsc_early_khz={khz}", "tsc=reliable"]
        console = os.path.join(spec.workdir, "console.log")
        return [
            self.qemu, "-name", f"vhub-{spec.session}",
            "-M", f"microvm,accel={accel},memory-backend=mem", "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(cpus), "-m", f"{mem}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"socket,id=vhu,fd={chardev_fd}", "-device", "vhost-user-vsock-device,chardev=vhu",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-qmp", f"unix:{os.path.join(spec.workdir, QMP_SOCKET)},server=on,wait=off",
            "-kernel", img.kernel, "-initrd", img.initramfs, "-append", " ".join(append),
        ]

    # -- Backend --
    async def start(self, spec: BootSpec):
        if self.guest_protocol is None:
            raise BackendError("the qemu backend was made without a daemon to serve its guests")
        if spec.session in self.vms:
            await self.stop(spec.session)
        img = self.image(spec.image)
        if self._accel is None:
            spec.progress("probing KVM")
        accel, why = await self.accel()
        spec.progress(f"starting QEMU ({accel})")
        os.makedirs(spec.workdir, exist_ok=True)
        cid = self._cid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            device = VhostUserVsockService(ours, guest_cid=cid,
                                           protocol_factory=self.guest_protocol(f"qemu-{spec.session}", spec.session),
                                           label=f"qemu-{spec.session}")
            cmd = self.command(img, spec, accel, theirs.fileno(), cid)
            with open(os.path.join(spec.workdir, "qemu.log"), "wb") as errf:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=errf, cwd=spec.workdir, start_new_session=True,
                    preexec_fn=_die_with_parent)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        device.start()
        with open(os.path.join(spec.workdir, "qemu.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        vm = QemuVm(spec.session, cid, proc, device, spec.workdir)
        self.vms[spec.session] = vm
        vm.watch.add_done_callback(lambda _: self.vms.pop(spec.session, None) if self.vms.get(spec.session) is vm
                                   else None)
        log.info("qemu started session=%s pid=%d cid=%d accel=%s (%s) kernel=%s", spec.session, proc.pid, cid,
                 accel, why, img.kernel_release)
        return vm

    async def stop(self, session: str) -> None:
        vm = self.vms.pop(session, None)
        if vm is None:
            return
        vm.stopping = True
        if vm.proc.returncode is None:
            _killpg(vm.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(vm.watch), STOP_GRACE)
            except TimeoutError:
                log.warning("qemu session=%s pid=%d ignored SIGTERM; killing it", session, vm.proc.pid)
                _killpg(vm.proc.pid, signal.SIGKILL)
        await vm.watch
        log.info("qemu stopped session=%s pid=%d", session, vm.proc.pid)

    async def pause(self, session: str) -> None:
        """Standby: QMP ``stop`` (the vCPUs stop, the memory stays; the vsock
        device is this daemon's, so the agent's connection stays as it is)."""
        await qmp.execute(self._qmp_path(session), "stop")

    async def resume(self, session: str) -> None:
        await qmp.execute(self._qmp_path(session), "cont")

    def _qmp_path(self, session: str) -> str:
        vm = self.vms.get(session)
        if vm is None or vm.proc.returncode is not None:
            raise BackendError(f"session {session!r} has no VM running")
        return os.path.join(vm.workdir, QMP_SOCKET)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(s) for s in list(self.vms)), return_exceptions=True)

    def describe(self) -> dict:
        d = {"name": self.name, "sandbox": self.sandbox, "qemu": self.qemu,
             "vms": {s: {"pid": vm.pid, "cid": vm.cid, **vm.device.stats()} for s, vm in self.vms.items()}}
        if self._accel:
            d["accel"], d["accel_reason"] = self._accel
        return d


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])
