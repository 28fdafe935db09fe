"""Parsing and dialing of ``VHUB_ADDR``: where the agent finds the daemon.

Forms accepted:

- ``vsock://CID:PORT`` (the default, ``vsock://2:10000``: the host, port 10000)
- ``unix:/path``, ``unix:///path``, ``unix:relative/path``, ``unix:@abstract``
- ``tcp://host:port``, ``tcp://[::1]:port``
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .errors import AddressError

__all__ = ["DEFAULT_ADDR", "Address", "parse_address"]

DEFAULT_ADDR = "vsock://2:10000"
_U32 = (1 << 32) - 1


class Address:
    """A parsed daemon address: ``family`` is ``vsock``, ``unix`` or ``tcp``.

    ``params`` holds ``{"cid", "port"}``, ``{"path"}`` or ``{"host", "port"}``.
    """

    __slots__ = ("family", "params", "text")

    def __init__(self, family: str, params: dict[str, Any], text: str) -> None:
        self.family = family
        self.params = params
        self.text = text

    def __repr__(self) -> str:
        return f"Address({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.family, self.params) == (other.family, other.params)

    def __hash__(self) -> int:
        return hash((self.family, tuple(sorted(self.params.items()))))

    def connect(self, timeout: float | None = 10.0) -> socket.socket:
        """Open a connected, blocking stream socket to the daemon.

        Raises ``OSError`` (``ConnectionRefusedError``, ``FileNotFoundError``,
        ``socket.timeout``...) when the daemon cannot be reached, and
        :class:`AddressError` when this platform lacks the address family.
        """
        if self.family == "tcp":
            sock = socket.create_connection((self.params["host"], self.params["port"]), timeout=timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            sock.settimeout(None)
            return sock
        if self.family == "unix":
            if not hasattr(socket, "AF_UNIX"):
                raise AddressError(f"{self.text}: Unix sockets are not supported on this platform")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.params["path"]
            if target.startswith("@"):
                target = "\0" + target[1:]
        else:
            family = getattr(socket, "AF_VSOCK", None)
            if family is None:
                raise AddressError(f"{self.text}: AF_VSOCK is not supported on this platform")
            sock = socket.socket(family, socket.SOCK_STREAM)
            target = (self.params["cid"], self.params["port"])
        try:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock


def _parse_int(text: str, what: str, addr: str, low: int, high: int) -> int:
    if not text.isdigit():
        raise AddressError(f"bad address {addr!r}: {what} {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise AddressError(f"bad address {addr!r}: {what} {value} is out of range {low}..{high}")
    return value


def parse_address(text: str | None = None) -> Address:
    """Parse a daemon address; ``None`` or empty means :data:`DEFAULT_ADDR`.

    Raises :class:`AddressError` with one line saying what is wrong.
    """
    if text is None or not text.strip():
        text = DEFAULT_ADDR
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise AddressError(f"bad address {text!r}: expected vsock://CID:PORT, unix:/path or tcp://host:port")
    if scheme == "vsock":
        if not rest.startswith("//"):
            raise AddressError(f"bad address {text!r}: expected vsock://CID:PORT")
        body = rest[2:]
        cid_text, colon, port_text = body.partition(":")
        if not colon or not cid_text or not port_text:
            raise AddressError(f"bad address {text!r}: expected vsock://CID:PORT")
        cid = _parse_int(cid_text, "CID", text, 0, _U32)
        port = _parse_int(port_text, "port", text, 0, _U32)
        return Address("vsock", {"cid": cid, "port": port}, f"vsock://{cid}:{port}")
    if scheme == "unix":
        path = rest
        if path.startswith("//"):
            path = path[2:]
            if not path.startswith("/"):
                raise AddressError(f"bad address {text!r}: unix:// needs an absolute path (unix:///path)")
        if not path or path == "@":
            raise AddressError(f"bad address {text!r}: missing socket path (unix:/path)")
        if "\0" in path:
            raise AddressError(f"bad address {text!r}: NUL byte in socket path")
        limit = 107
        if len(os.fsencode(path)) > limit:
            raise AddressError(f"bad address {text!r}: socket path longer than {limit} bytes")
        return Address("unix", {"path": path}, "unix:" + path)
    if scheme == "tcp":
        if not rest.startswith("//"):
            raise AddressError(f"bad address {text!r}: expected tcp://host:port")
        body = rest[2:].rstrip("/")
        if body.startswith("["):
            host, bracket, tail = body[1:].partition("]")
            if not bracket or not host:
                raise AddressError(f"bad address {text!r}: unterminated IPv6 literal")
            if not tail.startswith(":") or len(tail) < 2:
                raise AddressError(f"bad address {text!r}: missing port (tcp://[addr]:port)")
            port_text = tail[1:]
            shown = f"[{host}]"
        else:
            host, colon, port_text = body.rpartition(":")
            if not colon or not host or not port_text:
                raise AddressError(f"bad address {text!r}: expected tcp://host:port")
            if ":" in host:
                raise AddressError(f"bad address {text!r}: put IPv6 addresses in brackets (tcp://[::1]:port)")
            shown = host
        port = _parse_int(port_text, "port", text, 1, 65535)
        return Address("tcp", {"host": host, "port": port}, f"tcp://{shown}:{port}")
    raise AddressError(
        f"bad address {text!r}: unknown scheme {scheme!r} (use vsock://CID:PORT, unix:/path or tcp://host:port)"
    )
