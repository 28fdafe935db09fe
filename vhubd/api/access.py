"""Who may reach the HTTP API: where it listens (``--http HOST:PORT``, loopback
unless ``--http-public``, or ``unix:PATH``) and its bearer token, one random token
per state directory in a file created 0600 (``STATE_DIR/http-token``). The daemon
creates it; ``blink http-token`` prints it. Client-safe: no aiohttp, no daemon
imports."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from typing import Any

from ..errors import ConfigError

FILE_NAME = "http-token"


def token_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def read_token(state_dir: str) -> str:
    """The token; ``FileNotFoundError`` when no daemon with ``--http`` made one yet."""
    with open(token_path(state_dir), encoding="ascii") as f:
        return f.read().strip()


def ensure_token(state_dir: str) -> str:
    """The token, created (0600, atomically) if there is none."""
    path = token_path(state_dir)
    try:
        token = read_token(state_dir)
        if token:
            return token
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def same_token(given: str | None, token: str) -> bool:
    """Constant-time comparison."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())


def check_http_address(addr: str, public: bool) -> tuple[str, Any]:
    """``("tcp", (host, port))`` or ``("unix", path)``; ``ConfigError`` naming the
    flag for a malformed address, or a non-loopback one without ``public``."""
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path or "\0" in path:
            raise ConfigError("--http unix:PATH needs a path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"--http {addr}: no such directory {os.path.dirname(os.path.abspath(path))}")
        return "unix", path
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http wants HOST:PORT or unix:PATH, got {addr[:200]!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--http wants a numeric address, got {host[:100]!r}") from None
    if not ip.is_loopback and not public:
        raise ConfigError(f"--http {addr}: {host} is not a loopback address, so the API would be reachable from "
                          "other machines; add --http-public if that is what you want")
    return "tcp", (host, int(port))


def cut(text: str, limit: int = 300) -> str:
    """Plain text a peer may have chosen, at most ``limit`` characters (for an
    error answer: no quotes added, unlike ``errors.clip`` for logs)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} long)"
