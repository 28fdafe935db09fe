"""systemd integration: socket activation, ``sd_notify``, the watchdog, and
journald logging.

Two implementations of the service-manager protocols, one contract:
``libsystemd`` (systemd-python's ``systemd.daemon``, the ``systemd`` extra)
and ``stdlib`` (the documented wire protocols in a few lines, for hosts
without it). ``VHUBD_SYSTEMD=auto|libsystemd|stdlib`` picks (``auto``:
libsystemd where importable); ``IMPL`` is the one in use and ``impl(name)``
returns either by name, so tests run both.

Socket activation: fds are matched by ``FileDescriptorName=`` (``FD_NAMES``);
a socket received this way is never unlinked or re-bound by the daemon.
Notify: ``READY=1`` once every listener is live, ``STATUS=`` with counts,
``WATCHDOG=1`` sent from an event-loop callback (so a blocked loop is caught),
``STOPPING=1`` at shutdown. Logging: structured journal entries
(``VHUB_EVENT``, ``VHUB_SESSION``, ``VHUB_PEER``, ...) through
``systemd.journal`` under systemd, readable lines on stderr elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from .errors import ActivationError

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
    def notify(state: str, unset_environment: bool = False) -> bool:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        if unset_environment:
            os.environ.pop("NOTIFY_SOCKET", None)
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif not addr.startswith("/"):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(2.0)  # systemd reads promptly; never hang the caller on a stuck reader
            s.connect(addr)
            s.sendall(state.encode())
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
    want = os.environ.get("VHUBD_SYSTEMD", "auto").lower()
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
            self.send(f"STATUS={text}")

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
        self.send("WATCHDOG=1")
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
    """Test hook for the watchdog, off unless ``VHUBD_DEBUG_HANG_ON_SIGUSR2``
    is set: then SIGUSR2 blocks the event loop in ``time.sleep`` (for that
    many seconds if the value is > 1, else an hour), as a real hang would."""
    value = os.environ.get("VHUBD_DEBUG_HANG_ON_SIGUSR2", "")
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


# --- logging ------------------------------------------------------------------------

LOG_MODES = ("auto", "journal", "stderr")
STDERR_FORMAT = "%(asctime)s vhubd %(levelname)s %(message)s"

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    """syslog priority of a logging level."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def journal_stream_is_stderr(env=None) -> bool:
    """Whether stderr is the journal stream systemd gave us (``JOURNAL_STREAM``
    names its device and inode)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


# "guest attached session=%s peer=%s" -> event "guest_attached", arg 0 -> VHUB_SESSION, arg 1 -> VHUB_PEER
_CONVERSION = re.compile(r"%[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_KEY_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=$")


@functools.lru_cache(maxsize=1024)
def parse_format(fmt: str) -> tuple[str, tuple[tuple[int, str], ...]]:
    """``(event, ((arg index, FIELD), ...))`` for a log format string: the
    event is its leading words, each ``key=%x`` names its argument
    ``VHUB_KEY``. Cached: format strings are constants."""
    fields = []
    index = 0
    for m in _CONVERSION.finditer(fmt):
        if m.group(1) == "%":
            continue
        key = _KEY_BEFORE.search(fmt, 0, m.start())
        if key:
            fields.append((index, "VHUB_" + key.group(1).upper()))
        index += 1 + m.group(0).count("*")
    head = re.split(r"[%:(;,\[]|\b[A-Za-z_]+=", fmt, maxsplit=1)[0]
    words = re.findall(r"[A-Za-z0-9]+", head)[:4]
    return "_".join(w.lower() for w in words) or "log", tuple(fields)


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The VHUB_* journal fields of a ``vhubd`` log record (other loggers'
    records get none). Explicit ``extra=`` attributes (``vhub_event``,
    ``vhub_session``, ``vhub_peer``) win over what the format string implies."""
    fields: dict[str, str] = {}
    if isinstance(record.msg, str) and (record.name == "vhubd" or record.name.startswith("vhubd.")):
        event, keyed = parse_format(record.msg)
        fields["VHUB_EVENT"] = event
        args = record.args if isinstance(record.args, tuple) else ()
        for i, name in keyed:
            if i < len(args):
                fields[name] = str(args[i])
    for attr in ("vhub_event", "vhub_session", "vhub_peer"):
        value = record.__dict__.get(attr)
        if value is not None:
            fields[attr.upper()] = str(value)
    return fields


class JournalHandler(logging.Handler):
    """Structured journal entries through systemd-python's ``journal.send``:
    MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_*, VHUB_* fields."""

    def __init__(self, identifier: str = "vhubd", send: Callable | None = None):
        super().__init__()
        if send is None:
            send = importlib.import_module("systemd.journal").send  # ImportError without the systemd extra
        self._send = send
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.format(record), PRIORITY=str(priority(record.levelno)),
                       SYSLOG_IDENTIFIER=self.identifier, LOGGER=record.name, CODE_FILE=record.pathname,
                       CODE_LINE=record.lineno, CODE_FUNC=record.funcName, **record_fields(record))
        except Exception:
            self.handleError(record)


class PrefixFormatter(logging.Formatter):
    """``<N>message``: stderr lines that journald files under priority N
    (systemd's SyslogLevelPrefix=), for hosts without systemd-python."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{priority(record.levelno)}>" + text.replace("\n", f"\n<{priority(record.levelno)}>")


def configure_logging(mode: str = "auto", level: str = "info") -> str:
    """Set up the ``vhubd`` logs; returns what was chosen: ``journal``
    (systemd-python), ``stderr-prefixed`` (under systemd without it) or
    ``stderr``. ``mode=journal`` without systemd-python raises ImportError."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    under_systemd = journal_stream_is_stderr()
    handler: logging.Handler
    if mode == "journal" or (mode == "auto" and under_systemd):
        try:
            handler = JournalHandler()
            chosen = "journal"
        except ImportError:
            if mode == "journal":
                raise
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(PrefixFormatter("%(message)s"))
            chosen = "stderr-prefixed"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
        chosen = "stderr"
    root.addHandler(handler)
    return chosen


# --- install-units ------------------------------------------------------------------

UNIT_FILES = ("blink-vhub.socket", "blink-vhub-control.socket", "blink-vhub.service")
VARIANTS = ("external", "local", "boxlite")
_HOME_DIRS = ("/home", "/root", "/run/user")
_TMP_DIRS = ("/tmp", "/var/tmp")  # hidden by PrivateTmp=yes


def units_source() -> str | None:
    """The systemd/ directory that ships with this checkout or installation."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "systemd"),
                 os.path.join(sys.prefix, "share", "vhubd", "systemd")):
        if os.path.isfile(os.path.join(cand, "blink-vhub.service")):
            return cand
    return None


def blink_command() -> list[str]:
    """How to run ``blink`` as installed: the console script beside this
    interpreter, else the one on PATH, else ``python -m vhubd``."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "blink")
    if os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("blink")
    if found and "/shims/" not in found:  # a pyenv shim is a shell script that needs $HOME
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "vhubd"]


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == h or path.startswith(h + "/") for h in dirs)


def _under_home(path: str) -> bool:
    return _under(path, _HOME_DIRS)


def code_paths() -> list[str]:
    """Directories the service must read to run this vhubd: the interpreter's
    prefixes and the package's parent (an editable checkout)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    paths.add(os.path.realpath(os.path.dirname(os.path.realpath(sys.executable))))
    for p in sys.path:
        if p and os.path.isdir(p) and "site-packages" in p:
            paths.add(os.path.realpath(p))
    out: list[str] = []
    for p in sorted(paths, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _exec_start(text: str, exe: str) -> str:
    return re.sub(r"^ExecStart=/usr/bin/blink ", lambda m: f"ExecStart={exe} ", text, flags=re.M)


def install_units(prefix: str = "/", variant: str = "external", command: list[str] | None = None) -> list[str]:
    """Write the units under ``prefix`` (``etc/systemd/system``,
    ``etc/sysusers.d``, ``etc/tmpfiles.d``) with ExecStart= pointing at this
    installation; returns the paths written. Code under /home, /root, /tmp or
    /var/tmp (which ProtectHome=/PrivateTmp= hide) is made visible to the
    hardened service, read-only, by a drop-in (ProtectHome=tmpfs where needed
    + BindReadOnlyPaths=)."""
    import shlex

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    src = units_source()
    if src is None:
        raise FileNotFoundError("the unit files (systemd/) were not found beside vhubd; install from a checkout")
    command = command or blink_command()
    exe = " ".join(shlex.quote(c) for c in command)
    unit_dir = os.path.join(prefix, "etc/systemd/system")
    written = []

    def write(path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)

    for name in UNIT_FILES:
        with open(os.path.join(src, name)) as f:
            text = f.read()
        if name.endswith(".service"):
            text = _exec_start(text, exe)
        write(os.path.join(unit_dir, name), text)
    dropin = os.path.join(unit_dir, "blink-vhub.service.d")
    if variant != "external":
        with open(os.path.join(src, "variants", f"{variant}.conf")) as f:  # a drop-in for blink-vhub.service
            text = f.read()
        write(os.path.join(dropin, f"{variant}.conf"), _exec_start(text, exe))
    hidden_dirs = _HOME_DIRS + _TMP_DIRS
    hidden = [p for p in code_paths() if _under(p, hidden_dirs)]
    in_home = any(_under_home(p) for p in hidden) or any(
        _under_home(os.path.realpath(c)) for c in command if c.startswith("/"))
    if hidden or in_home:
        write(os.path.join(dropin, "code-paths.conf"),
              "# Written by `blink install-units`: this vhubd runs from under a home or temporary\n"
              "# directory, which ProtectHome=yes / PrivateTmp=yes would hide. Only these paths are\n"
              "# shown, read-only.\n[Service]\n" + ("ProtectHome=tmpfs\n" if in_home else "")
              + "".join(f"BindReadOnlyPaths={p}\n" for p in hidden))
    for kind in ("sysusers.d", "tmpfiles.d"):
        with open(os.path.join(src, kind, "blink-vhub.conf")) as f:
            write(os.path.join(prefix, "etc", kind, "blink-vhub.conf"), f.read())
    return written
