"""The reproducible newc cpio writer for the initramfs.

Owns ``Tree``, an in-memory file tree (directories, files, symlinks), and
its serialization as a newc archive: entries sorted by name, inode numbers
in that order, mtime 0, owner root, padded to 512 bytes, so the same tree
always gives the same bytes.
"""

from __future__ import annotations

import os
import stat


class Tree:
    """The initramfs contents: path -> (mode, bytes) or (mode, symlink target)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes]] = {}

    def dir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = (stat.S_IFDIR | 0o755, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = (stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries.setdefault(path, (stat.S_IFLNK | 0o777, target.encode()))

    def cpio(self) -> bytes:
        """newc archive: sorted names, inode numbers in that order, mtime 0."""
        out = bytearray()
        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data = self.entries[name]
            _cpio_entry(out, name, ino, mode, data, 2 if stat.S_ISDIR(mode) else 1)
        _cpio_entry(out, "TRAILER!!!", 0, 0, b"", 1)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)


def _cpio_entry(out: bytearray, name: str, ino: int, mode: int, data: bytes, nlink: int) -> None:
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0]
    out += b"070701" + b"".join(b"%08X" % f for f in fields) + nb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
