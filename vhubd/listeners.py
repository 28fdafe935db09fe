"""Listening sockets: what each listener accepts, and creating them.

``ListenerSpec`` says what a listener accepts (role, tokens, a fixed
session) and where it came from (bound here, or passed by systemd). The
``bind_*`` functions create sockets and translate ``OSError`` into one clear
``ListenError`` line; ``vsock_address`` is kept apart from binding so that it
can be tested without opening a vsock socket.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import stat
import struct

from .errors import ListenError

__all__ = ["ListenError", "ListenerSpec", "bind_tcp", "bind_unix", "bind_vsock", "parse_tcp", "peer_label",
           "unlink_socket", "vsock_address"]


class ListenerSpec:
    """What a listener accepts: ``role`` guest|client, tokens, a fixed session."""

    def __init__(self, name: str, role: str, sock: socket.socket, *, token_required: bool = False,
                 owned_path: str | None = None, fixed_session: str | None = None, activated: bool = False):
        self.name = name
        self.role = role
        self.sock = sock
        self.token_required = token_required
        self.owned_path = owned_path  # a path we bound ourselves (and so remove at exit)
        self.activated = activated  # passed by systemd: never unlinked or re-bound (owned_path is None)
        self.fixed_session = fixed_session
        self.server: asyncio.AbstractServer | None = None
        self.address: object = None  # where it listens, for vhub.info (set when it is served)


def bind_unix(path: str, mode: int | None = None, create_parent: bool = False) -> socket.socket:
    """Bind a Unix stream socket at ``path``, replacing a stale socket file but
    never a live one or a non-socket. Its directory must exist, unless
    ``create_parent`` (a default path, e.g. ``$XDG_RUNTIME_DIR/blink``): a path
    someone gave is never made up."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ListenError(f"cannot use {path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there
        else:
            raise ListenError(f"another process is already listening on {path}")
        finally:
            probe.close()
    parent = os.path.dirname(path) or "."
    if create_parent:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise ListenError(f"cannot create {parent}: {exc.strerror}") from None
    elif not os.path.isdir(parent):
        raise ListenError(f"cannot listen on {path}: the directory {parent} does not exist")
    # bound and listening under a temporary name, then renamed into place: whoever
    # sees the path finds a socket that accepts (a connect never meets one that does not)
    tmp = os.path.join(parent, f".{os.getpid()}.{os.path.basename(path)}")
    if len(os.fsencode(tmp)) >= 108:  # sun_path's limit: no room for a temporary name
        tmp = path
    sock = _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), tmp, path,
                   chmod=(lambda: os.chmod(tmp, mode)) if mode is not None else None)
    if tmp != path:
        try:
            os.rename(tmp, path)
        except OSError as exc:
            sock.close()
            unlink_socket(tmp)
            raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _listen(sock: socket.socket, address, what: str, chmod=None, reuse: bool = False) -> socket.socket:
    """Bind and listen (non-blocking); an OSError becomes one ListenError line
    and the socket is closed."""
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if chmod is not None:
            chmod()
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {what}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def parse_tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--tcp wants HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        return "127.0.0.1", int(port)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--tcp wants a numeric loopback address, got {host!r}") from None
    if not addr.is_loopback:
        raise ValueError(f"--tcp must be a loopback address (127.0.0.0/8 or ::1), got {host}")
    return host, int(port)


def bind_tcp(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _listen(socket.socket(fam, socket.SOCK_STREAM), (host, port), f"{host}:{port}", reuse=True)


def vsock_address(port: int) -> tuple[int, int]:
    """The AF_VSOCK bind address for ``--vsock-port`` (any CID). Kept apart
    from bind_vsock so it can be tested without opening a vsock socket."""
    if not 1 <= port <= 0xFFFFFFFF:
        raise ValueError(f"--vsock-port must be 1..4294967295, got {port}")
    return (getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF), port)


def bind_vsock(port: int) -> socket.socket:  # pragma: no cover - never run on dev hosts
    if not hasattr(socket, "AF_VSOCK"):
        raise ListenError("this Python has no AF_VSOCK support")
    return _listen(socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM), vsock_address(port), f"vsock port {port}")


def peer_label(transport, listener: str) -> str:
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            return f"{listener}:pid={pid},uid={uid},gid={gid}"
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            return f"{listener}:{peer[0]}:{peer[1]}"
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EBADF):
            raise
    return f"{listener}:?"


def unlink_socket(path: str | None) -> None:
    """Remove a socket file we bound (never anything that is not a socket)."""
    if path:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass
