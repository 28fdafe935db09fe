"""``qemu``: each session is a QEMU microvm whose vsock device is the daemon.

A boot starts ``qemu-system-x86_64 -M microvm,pcie=on`` (KVM when a probe
shows it really runs guest code here, TCG otherwise) with the guest image of
``vhubd.guest`` (kernel + initramfs whose init starts ``blink-agent serve``)
and a ``vhost-user-vsock-pci`` device in a PCIe hot-plug slot, whose
vhost-user socket is one end of a socketpair; the daemon serves the other end
(``vhubd.vhost``). The guest agent dials vsock CID 2 port 10000 and lands,
through the daemon's ordinary guest connection (``guest_protocol``, given by
the daemon), in this session: the device identifies the session, no token.

Standby is QMP ``stop``/``cont``. A snapshot saves the whole VM with QMP
``migrate`` to a file; QEMU 7.2 refuses to migrate a vhost-user-vsock device,
so the device is unplugged first (the guest's pciehp takes 5 s to let go of
it; the agent sees its link drop and redials) and a new one is plugged in
after. A restore starts QEMU with ``-incoming`` from that file, paused, plugs
the device in and continues: the agent redials into the same session.

QEMU runs in its own process group with PR_SET_PDEATHSIG=SIGKILL, so a daemon
that dies without cleaning up takes its VMs with it; ``stop`` sends SIGTERM to
the group, then SIGKILL. A QEMU that exits before its agent connects fails the
boot with QEMU's own words (its stderr) or, when the guest itself gave up,
the tail of the guest console.

About 550 lines, on purpose: boot, restore and snapshot share the VM's
command line and its QMP conversation, and read best side by side.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
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
QMP_SOCKET = "qmp.sock"  # in the session's workdir: standby (stop) and wake (cont), snapshots
PORT, CHARDEV, VSOCK_ID, VSOCK_DRIVER = "rp0", "vhu", "vsock0", "vhost-user-vsock-pci"
UNPLUG_TIMEOUT = 30.0  # the guest's pciehp takes 5 s after the attention button
SAVE_TIMEOUT = 600.0
STATE_FILE = "vm.state"  # in a snapshot's directory, with machine.json, vmlinuz and initramfs.cpio
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
        self.machine: dict = {}  # what it runs (QemuBackend.command's machine): a snapshot records it
        self.chardev = CHARDEV  # the vsock device's chardev (a new one after each snapshot)
        self.plugs = 0
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
    snapshots = True

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
                img = guest_image.load(override)
            elif self.image_dir:
                img = guest_image.load(self.image_dir)
            else:
                img = guest_image.find(guest_image.default_cache_dir(self.state_dir))
        except guest_image.GuestImageError as exc:
            raise BackendError(str(exc)) from None
        if "virtio_pci" not in img.manifest.get("kernel_modules", ()):
            raise BackendError(f"the guest image in {img.dir} is older than this daemon (its vsock device is now "
                               "a PCIe one, and the image has no virtio_pci): rebuild it with `blink build-guest`")
        return img

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

    def append(self, spec: BootSpec, accel: str) -> list[str]:
        """The guest kernel's command line for ``spec``."""
        env = {k: v for k, v in spec.env.items() if k not in ("VHUB_ADDR", "VHUB_TOKEN", "VHUB_SESSION")}
        append = ["console=ttyS0", "quiet", "panic=-1", "pcie_ports=native", f"vhub.session={spec.session}"]
        if env:
            append.append(f"vhub.env={guest_image.encode_env(env)}")
        if accel == "tcg":
            khz = host_tsc_khz()
            if khz:  # the host's TSC, which TCG passes through: exact, so the clocksource watchdog may trust it
                append += [f"tsc_early_khz={khz}", "tsc=reliable"]
        return append

    def command(self, machine: dict, chardev_fd: int, workdir: str, incoming_fd: int | None = None) -> list[str]:
        """QEMU's argv for ``machine`` (``kernel``, ``initramfs``, ``memory_mib``,
        ``cpus``, ``accel``, ``append``: what a snapshot records). The vsock
        device sits in a PCIe hot-plug slot: a snapshot unplugs it (QEMU 7.2
        cannot migrate vhost-user-vsock) and plugs a new one in afterwards.
        With ``incoming_fd`` the VM is restored from that file, paused, and
        without the device; ``restore`` plugs it in."""
        mem, accel = int(machine["memory_mib"]), machine["accel"]
        console = os.path.join(workdir, "console.log")
        cmd = [
            self.qemu, "-name", f"vhub-{os.path.basename(workdir)}",
            "-M", f"microvm,accel={accel},memory-backend=mem,pcie=on", "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(int(machine["cpus"])), "-m", f"{mem}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-device", f"pcie-root-port,id={PORT},chassis=1,slot=1",
            "-chardev", f"socket,id={CHARDEV},fd={chardev_fd}",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-qmp", f"unix:{os.path.join(workdir, QMP_SOCKET)},server=on,wait=off",
            "-kernel", machine["kernel"], "-initrd", machine["initramfs"], "-append", " ".join(machine["append"]),
        ]
        if incoming_fd is None:
            cmd[cmd.index("-chardev"):cmd.index("-chardev")] = ["-device", self._vsock_device(CHARDEV)]
        else:
            cmd += ["-S", "-incoming", f"fd:{incoming_fd}"]
        return cmd

    @staticmethod
    def _vsock_device(chardev: str) -> str:
        return f"{VSOCK_DRIVER},chardev={chardev},bus={PORT},id={VSOCK_ID}"

    # -- Backend --
    async def start(self, spec: BootSpec):
        img = self.image(spec.image)
        if self._accel is None:
            spec.progress("probing KVM")
        accel, why = await self.accel()
        machine = {"kernel": img.kernel, "initramfs": img.initramfs, "kernel_release": img.kernel_release,
                   "memory_mib": int(spec.memory_mib or self.memory_mib), "cpus": int(spec.cpus or self.cpus),
                   "accel": accel, "append": self.append(spec, accel)}
        spec.progress(f"starting QEMU ({accel})")
        vm = await self._launch(spec, machine)
        log.info("qemu started session=%s pid=%d cid=%d accel=%s (%s) kernel=%s", spec.session, vm.pid, vm.cid,
                 accel, why, img.kernel_release)
        return vm

    async def _launch(self, spec: BootSpec, machine: dict, state: str | None = None) -> QemuVm:
        """Start QEMU for ``machine``: booting, or restoring the VM saved in
        the file ``state`` (paused, its vsock device not plugged in yet)."""
        if self.guest_protocol is None:
            raise BackendError("the qemu backend was made without a daemon to serve its guests")
        if spec.session in self.vms:
            await self.stop(spec.session)
        os.makedirs(spec.workdir, exist_ok=True)
        cid = self._cid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        state_fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC) if state else None
        try:
            device = self._device(ours, spec.session, cid)
            cmd = self.command(machine, theirs.fileno(), spec.workdir, state_fd)
            with open(os.path.join(spec.workdir, "qemu.log"), "wb") as errf:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, pass_fds=[theirs.fileno()] + ([state_fd] if state_fd is not None else []),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=errf,
                    cwd=spec.workdir, start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if state_fd is not None:
                os.close(state_fd)
        device.start()
        with open(os.path.join(spec.workdir, "qemu.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        vm = QemuVm(spec.session, cid, proc, device, spec.workdir)
        vm.machine = machine
        self.vms[spec.session] = vm
        vm.watch.add_done_callback(lambda _: self.vms.pop(spec.session, None) if self.vms.get(spec.session) is vm
                                   else None)
        return vm

    def _device(self, sock: socket.socket, session: str, cid: int) -> VhostUserVsockService:
        assert self.guest_protocol is not None
        return VhostUserVsockService(sock, guest_cid=cid, protocol_factory=self.guest_protocol(f"qemu-{session}", session),
                                     label=f"qemu-{session}")

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

    # -- snapshots --
    async def snapshot(self, session: str, directory: str, *, keep_running: bool = True) -> dict:
        """Save the whole VM (memory, devices) to ``directory``: the vsock
        device is unplugged (the agent sees its link drop and redials), the VM
        paused and migrated to ``vm.state``; then, with ``keep_running``, a new
        device is plugged in and the VM runs on. Any failure leaves the VM
        running with a device and removes what was written."""
        vm = self._vm(session)
        state = os.path.join(directory, STATE_FILE)
        async with qmp.Monitor(self._qmp_path(session), timeout=10.0) as mon:
            status = await mon.execute("query-status")
            running = isinstance(status, dict) and bool(status.get("running"))
            await mon.execute("device_del", {"id": VSOCK_ID})
            await mon.event("DEVICE_DELETED", UNPLUG_TIMEOUT, {"device": VSOCK_ID})
            vm.device.close("the vsock device was unplugged for a snapshot")
            await mon.execute("chardev-remove", {"id": vm.chardev})
            try:
                await mon.execute("stop")
                _copy_machine(vm.machine, directory)
                fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    await mon.send_fd("snapshot", fd)
                finally:
                    os.close(fd)
                await mon.execute("migrate", {"uri": "fd:snapshot"})
                await _migration(mon, SAVE_TIMEOUT, "saving the VM")
                size = os.path.getsize(state)
            except BaseException:
                try:
                    os.unlink(state)
                except OSError:
                    pass
                await self._plug(vm, mon)
                if running:
                    await mon.execute("cont")
                raise
            if keep_running:
                await self._plug(vm, mon)
                if running:
                    await mon.execute("cont")
        return {"bytes": size, "memory_mib": vm.machine["memory_mib"], "kernel": vm.machine["kernel_release"]}

    async def restore(self, spec: BootSpec, directory: str):
        """Start the VM saved in ``directory`` (by ``snapshot``) and plug its
        vsock device in: its agent redials into the same session."""
        machine = _load_machine(directory)
        if machine["accel"] != (await self.accel())[0]:
            raise BackendError(f"the snapshot was taken with {machine['accel']}, this daemon runs "
                               f"{self._accel[0] if self._accel else '?'}")
        spec.progress("restoring the VM from its snapshot")
        os.makedirs(spec.workdir, exist_ok=True)
        for key in ("kernel", "initramfs"):  # the session's own links: the snapshot may go while the VM runs
            own = os.path.join(spec.workdir, "restored-" + os.path.basename(machine[key]))
            if os.path.lexists(own):
                os.unlink(own)
            _link_or_copy(machine[key], own)
            machine[key] = own
        vm = await self._launch(spec, machine, os.path.join(directory, STATE_FILE))
        try:
            path = os.path.join(spec.workdir, QMP_SOCKET)
            await _listening(vm, path)
            async with qmp.Monitor(path, timeout=10.0) as mon:
                await _migration(mon, SAVE_TIMEOUT, "loading the VM", incoming=True)
                await mon.execute("device_add", {"driver": VSOCK_DRIVER, "chardev": CHARDEV, "bus": PORT,
                                                 "id": VSOCK_ID})
                await mon.execute("cont")
        except BaseException:
            await self.stop(spec.session)
            raise
        log.info("qemu restored session=%s pid=%d cid=%d from %s", spec.session, vm.pid, vm.cid, directory)
        return vm

    async def _plug(self, vm: QemuVm, mon: qmp.Monitor) -> None:
        """A new vsock device (a new vhost-user connection) in the VM's slot."""
        vm.plugs += 1
        chardev = f"{CHARDEV}{vm.plugs}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await mon.send_fd(chardev, theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        device = self._device(ours, vm.session, vm.cid)
        device.start()
        vm.device = device
        await mon.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": chardev}}, "server": False}}})
        vm.chardev = chardev
        await mon.execute("device_add", {"driver": VSOCK_DRIVER, "chardev": chardev, "bus": PORT, "id": VSOCK_ID})

    def _vm(self, session: str) -> QemuVm:
        vm = self.vms.get(session)
        if vm is None or vm.proc.returncode is not None:
            raise BackendError(f"session {session!r} has no VM running")
        return vm

    def _qmp_path(self, session: str) -> str:
        return os.path.join(self._vm(session).workdir, QMP_SOCKET)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(s) for s in list(self.vms)), return_exceptions=True)

    def describe(self) -> dict:
        d = {"name": self.name, "sandbox": self.sandbox, "qemu": self.qemu,
             "vms": {s: {"pid": vm.pid, "cid": vm.cid, **vm.device.stats()} for s, vm in self.vms.items()}}
        if self._accel:
            d["accel"], d["accel_reason"] = self._accel
        return d


async def _listening(vm: QemuVm, path: str, timeout: float = 10.0) -> None:
    """Wait until the new QEMU accepts on its QMP socket (it binds, then
    listens: in between a connect is refused)."""
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    while True:
        if vm.proc.returncode is not None:
            raise BackendError(f"QEMU did not start: {vm.describe_exit(vm.proc.returncode)}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            await loop.sock_connect(probe, path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise BackendError(f"QEMU did not open its QMP socket within {timeout:g} s") from None
        finally:
            probe.close()
        await asyncio.sleep(0.01)


async def _migration(mon: qmp.Monitor, timeout: float, what: str, incoming: bool = False) -> None:
    """Wait for the migration (to or from a snapshot file) to complete;
    BackendError with QEMU's words if it fails."""
    deadline = time.monotonic() + timeout
    while True:
        info = await mon.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc") if isinstance(info, dict) else None
            raise BackendError(f"{what} failed: {str(desc or status)[:300]}")
        if incoming and status is None:  # -incoming: no status until it starts; done when the VM waits for cont
            run = await mon.execute("query-status")
            if isinstance(run, dict) and run.get("status") in ("paused", "prelaunch", "postmigrate"):
                return
            if isinstance(run, dict) and run.get("status") in ("internal-error", "shutdown"):
                raise BackendError(f"{what} failed: QEMU is {run.get('status')}")
        if time.monotonic() > deadline:
            raise BackendError(f"{what} did not finish within {timeout:g} s")
        await asyncio.sleep(0.02)


MACHINE_FILE = "machine.json"


def _copy_machine(machine: dict, directory: str) -> None:
    """The snapshot's own kernel and initramfs (linked when they share a file
    system) and ``machine.json``: a restore needs no guest image cache."""
    rec = dict(machine)
    for key, name in (("kernel", "vmlinuz"), ("initramfs", "initramfs.cpio")):
        _link_or_copy(machine[key], os.path.join(directory, name))
        rec[key] = name
    with open(os.path.join(directory, MACHINE_FILE), "w") as f:
        json.dump(rec, f)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copyfile(src, dest)


def _load_machine(directory: str) -> dict:
    try:
        with open(os.path.join(directory, MACHINE_FILE)) as f:
            machine = json.load(f)
        for key in ("kernel", "initramfs"):
            machine[key] = os.path.join(directory, os.path.basename(str(machine[key])))
            if not os.path.isfile(machine[key]):
                raise ValueError(f"{machine[key]} is missing")
        if not os.path.isfile(os.path.join(directory, STATE_FILE)):
            raise ValueError(f"{STATE_FILE} is missing")
        int(machine["memory_mib"]), int(machine["cpus"]), str(machine["accel"]), list(machine["append"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"snapshot in {directory} is unusable: {exc}") from None
    return machine


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
