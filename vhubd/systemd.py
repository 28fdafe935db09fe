"""systemd integration: socket activation, ``sd_notify`` and the watchdog
(journald logging is ``vhubd.journal``, the units ``vhubd.units``).

Two implementations of the service-manager protocols, one contract:
``libsystemd`` (systemd-python's ``systemd.daemon``, the ``systemd`` extra)
and ``stdlib`` (the documented wire protocols in a few lines, for hosts
without it). ``BLINK_SYSTEMD=auto|libsystemd|stdlib`` picks (``auto``:
libsystemd where importable); ``IMPL`` is the one in use and ``impl(name)``
returns either by name, so tests run both.

Socket activation: fds are matched by ``FileDescriptorName=`` (``FD_NAMES``);
a socket received this way is never unlinked or re-bound by the daemon.
Notify: ``READY=1`` once every listener is live, ``STATUS=`` with counts,
``WATCHDOG=1`` sent from an event-loop callback (so a blocked loop is caught),
``STOPPING=1`` at shutdown.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import ActivationError
from .paths import env

LISTEN_FDS_START = 3

#: FileDescriptorName= values the daemon understands, and what each one is.
FD_NAMES = {
    "vhub": "the guest Unix socket (AF_UNIX stream; the VMM's end of guest vsock port 10000)",
    "control": "the control socket for host clients (AF_UNIX stream)",
    "tcp": "the guest loopback TCP listener (AF_INET/AF_INET6 stream on a loopback address; token required)",
    "vsock": "the guest AF_VSOCK listener",
}


# --- the two implementations ------------------------------------------------------

class StdlibImpl:
    """``sd_listen_fds_with_names`` and ``sd_notify`` over the documented
    protocols (environment variables, a Unix datagram to $NOTIFY_SOCKET)."""

    name = "stdlib"

    @staticmethod
    def listen_fds_with_names(unset_environment: bool = True) -> dict[int, str]:
        env = os.environ
        try:
            pid = int(env.get("LISTEN_PID", ""))
            n = int(env.get("LISTEN_FDS", ""))
        except ValueError:
            pid, n = -1, 0
        raw_names = env.get("LISTEN_FDNAMES")
        if unset_environment:
            for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(k, None)
        if pid != os.getpid() or n <= 0:
            return {}
        names = raw_names.split(":") if raw_names else []
        fds = {}
        for i in range(n):
            fd = LISTEN_FDS_START + i
            os.set_inheritable(fd, False)  # what libsystemd does: children never see them
            fds[fd] = names[i] if i < len(names) and names[i] else "unknown"
        return fds

    @staticmethod
    def notify(state: str, unset_environment: bool = False, wait: bool = True) -> bool:
        """Send ``state``; with ``wait=False`` never block: a reader that is
        behind (its queue holds a few datagrams) costs this message, not the loop."""
        addr = os.environ.get("NOTIFY_SOCKET", "")
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif not addr.startswith("/"):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            if wait:
                s.settimeout(2.0)  # systemd reads promptly; never hang the caller on a stuck reader
            else:
                s.setblocking(False)
            s.connect(addr)
            try:
                s.send(state.encode())
            except BlockingIOError:
                return False
        return True


class LibsystemdImpl:
    """The same two calls through systemd-python (libsystemd)."""

    name = "libsystemd"

    def __init__(self) -> None:
        # ImportError where the extra is not installed (import_module: "systemd" is not this module)
        self._daemon = importlib.import_module("systemd.daemon")

    def listen_fds_with_names(self, unset_environment: bool = True) -> dict[int, str]:
        fds = dict(self._daemon.listen_fds_with_names(unset_environment))
        if unset_environment:  # libsystemd's unsetenv() does not update os.environ (what children inherit)
            for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(k, None)
        return fds

    def notify(self, state: str, unset_environment: bool = False) -> bool:
        return bool(self._daemon.notify(state, unset_environment))


IMPLS = ("libsystemd", "stdlib")


def impl(name: str):
    """The implementation called ``name``; raises ImportError for libsystemd
    where systemd-python is not installed."""
    if name == "stdlib":
        return StdlibImpl()
    if name == "libsystemd":
        return LibsystemdImpl()
    raise ValueError(f"unknown systemd implementation {name!r} (libsystemd, stdlib)")


def _choose():
    want = env("BLINK_SYSTEMD", "auto").lower()
    if want != "auto":
        return impl(want)
    try:
        return impl("libsystemd")
    except ImportError:
        return impl("stdlib")


IMPL = _choose()


# --- socket activation -------------------------------------------------------------

def activation_sockets(implementation=None) -> dict[str, list[socket.socket]]:
    """Listening sockets passed by the service manager, by fd name; ``{}``
    when not socket-activated. Unsets ``LISTEN_*``. A single fd without a
    name (``systemd-socket-activate -l PATH`` with no ``--fdname``) is the
    guest socket."""
    fds = (implementation or IMPL).listen_fds_with_names(True)
    out: dict[str, list[socket.socket]] = {}
    try:
        for fd, name in sorted(fds.items()):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ActivationError(f"systemd passed fd {fd} ({name}) that is not a socket: {exc.strerror}") \
                    from None
            out.setdefault(name, []).append(sock)
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ActivationError(f"systemd passed fd {fd} ({name}) that is not a listening socket "
                                      "(the socket unit needs Accept=no)")
            sock.setblocking(False)
        if set(out) == {"unknown"} and len(out["unknown"]) == 1:
            out = {"vhub": out.pop("unknown")}
        unknown = sorted(set(out) - set(FD_NAMES))
        if unknown:
            raise ActivationError(f"systemd passed sockets named {', '.join(unknown)}; V-Hub knows "
                                  + ", ".join(FD_NAMES) + " (set FileDescriptorName= in the socket unit)")
        for name, socks in out.items():
            for s in socks:
                _check_kind(name, s)
    except BaseException:
        for socks in out.values():
            for s in socks:
                s.close()
        raise
    return out


def _check_kind(name: str, sock: socket.socket) -> None:
    if sock.type != socket.SOCK_STREAM:
        raise ActivationError(f"systemd socket {name!r} is not a stream socket (use ListenStream=)")
    fam = sock.family
    if name in ("vhub", "control") and fam != socket.AF_UNIX:
        raise ActivationError(f"systemd socket {name!r} must be a Unix socket (ListenStream=/path)")
    if name == "tcp":
        if fam not in (socket.AF_INET, socket.AF_INET6):
            raise ActivationError("systemd socket 'tcp' must be a TCP socket (ListenStream=127.0.0.1:PORT)")
        import ipaddress

        host = sock.getsockname()[0]
        if not ipaddress.ip_address(host).is_loopback:
            raise ActivationError(f"systemd socket 'tcp' must listen on a loopback address, not {host}")
    if name == "vsock" and fam != getattr(socket, "AF_VSOCK", -1):
        raise ActivationError("systemd socket 'vsock' must be an AF_VSOCK socket (ListenStream=vsock::PORT)")


# --- notify and the watchdog --------------------------------------------------------

def watchdog_usec(env=None) -> int | None:
    """``WATCHDOG_USEC`` when it is meant for this process, else None."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None


class Notifier:
    """What the daemon tells the service manager. Every method is a no-op
    without ``NOTIFY_SOCKET``; send errors are logged once, never raised.
    NOTIFY_SOCKET stays in the environment (libsystemd reads it on every
    send); children that inherit it are ignored by ``NotifyAccess=main``."""

    def __init__(self, implementation=None, status_interval: float = 2.0):
        self.impl = implementation or IMPL
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = watchdog_usec()
        self.watchdog_interval = usec / 2e6 if usec else None
        self.status_interval = status_interval
        self._status: str | None = None
        self._status_fn: Any = None
        self._pet_handle: Any = None
        self._refresh_handle: Any = None
        self._loop: Any = None
        self._warned = False

    def send(self, *fields: str) -> bool:
        if not self.enabled:
            return False
        try:
            return self.impl.notify("\n".join(fields))
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logging.getLogger("vhubd").warning("sd_notify failed (%s); further failures are not logged", exc)
            return False

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send_nowait(f"STATUS={text}")

    def _send_nowait(self, state: str) -> bool:
        """Periodic messages (STATUS=, WATCHDOG=1) never block the event loop,
        whichever implementation runs (libsystemd's sd_notify blocks while the
        reader's queue is full): a message dropped now is sent again later."""
        if not self.enabled:
            return False
        try:
            return StdlibImpl.notify(state, wait=False)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logging.getLogger("vhubd").warning("sd_notify failed (%s); further failures are not logged", exc)
            return False

    def stopping(self, status: str) -> None:
        self.stop()
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def start(self, loop, status_fn: Callable[[], str] | None = None) -> None:
        """Pet the watchdog from ``loop`` every WATCHDOG_USEC/2 and refresh
        STATUS= from ``status_fn`` every ``status_interval`` seconds."""
        if not self.enabled:
            return
        self._loop = loop
        self._status_fn = status_fn
        if self.watchdog_interval:
            self._pet()
        if status_fn is not None:
            self._refresh_handle = loop.call_later(self.status_interval, self._refresh)

    def _pet(self) -> None:
        # a loop callback, not a thread: if the loop hangs, the pets stop and systemd kills us
        self._send_nowait("WATCHDOG=1")
        self._pet_handle = self._loop.call_later(self.watchdog_interval, self._pet)

    def _refresh(self) -> None:
        try:
            self.status(self._status_fn())
        except Exception:
            logging.getLogger("vhubd").exception("status update failed")
        self._refresh_handle = self._loop.call_later(self.status_interval, self._refresh)

    def stop(self) -> None:
        for h in (self._pet_handle, self._refresh_handle):
            if h is not None:
                h.cancel()
        self._pet_handle = self._refresh_handle = None


def install_debug_hang(loop) -> bool:
    """Test hook for the watchdog, off unless ``BLINK_DEBUG_HANG_ON_SIGUSR2``
    is set: then SIGUSR2 blocks the event loop in ``time.sleep`` (for that
    many seconds if the value is > 1, else an hour), as a real hang would."""
    value = env("BLINK_DEBUG_HANG_ON_SIGUSR2")
    if value in ("", "0"):
        return False
    try:
        seconds = float(value) if float(value) > 1 else 3600.0
    except ValueError:
        seconds = 3600.0

    def hang() -> None:
        logging.getLogger("vhubd").warning("debug: SIGUSR2 received, blocking the event loop for %g s", seconds)
        time.sleep(seconds)

    loop.add_signal_handler(signal.SIGUSR2, hang)
    return True
