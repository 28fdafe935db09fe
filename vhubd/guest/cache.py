"""The build caches of ``blink build-guest`` and ``blink build-image``.

Owns the cache key (a digest of the builder's own modules, the exact
Debian package versions and the agent's sources: change any of them and
the key changes), the ``current`` pointer at the newest build, and pruning
old builds. Knows nothing of what a build holds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time

from .python import agent_files

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_RE = r"[0-9a-f]{20}"


def sources_digest(modules: tuple[str, ...]) -> bytes:
    """SHA-256 over the named modules of this package (``image``, ``oci``...)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        with open(os.path.join(HERE, f"{name}.py"), "rb") as f:
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.digest()


def key(builder: str, modules: tuple[str, ...], packages: dict[str, str], agent_src: str) -> str:
    """The 20-hex-digit key of a build from these inputs."""
    h = hashlib.sha256()
    h.update(f"builder {builder}\n".encode())
    h.update(sources_digest(modules))
    for name in sorted(packages):
        h.update(f"{name}={packages[name]}\n".encode())
    for rel, path in agent_files(agent_src):
        with open(path, "rb") as f:
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:20]


def point_current(cache_dir: str, key: str) -> None:
    """Make ``cache_dir/current`` point at build ``key`` (atomically)."""
    link = os.path.join(cache_dir, "current")
    tmp = link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(key, tmp)
    os.replace(tmp, link)


def used(path: str) -> None:
    """Note that build ``path`` is in use now (its mtime): prune keeps it."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache: pruning there is not ours either


def prune(cache_dir: str, key: str, keep: int = 2, unused_for: float = 86400.0) -> None:
    """Drop the builds beyond the ``keep`` newest that nobody has used for
    ``unused_for`` seconds (``key`` always stays). Another checkout or daemon
    on the same host may be booting from an older build right now: its
    ``load`` marked it used, so it stays."""
    now = time.time()
    builds = []
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name != key and re.fullmatch(KEY_RE, name) and os.path.isdir(path):
            builds.append((os.path.getmtime(path), path))
    for mtime, path in sorted(builds, reverse=True)[keep - 1:]:
        if now - mtime > unused_for:
            shutil.rmtree(path, ignore_errors=True)
