"""Tar streams for ``blink cp``: making one from a path, and extracting one safely.

Both ends of a copy use this module: the guest agent (``agent.tar`` and
``agent.untar``) and the host's ``blink cp``. The host's copy,
``vhubd/tarcopy.py``, is this file byte for byte (``tests/test_cp.py`` checks
it): the agent ships with the standard library only, and vhubd does not import
the agent. Standard library only, Python >= 3.8.

Writing: :func:`write_tar` streams ``path`` (a file, a link or a whole tree) as
a PAX tar to a file object, through a write-only stream (``w|``): nothing is
held whole. Links are stored as links, never followed; mode, mtime and owner
(numeric ids) travel in the headers.

Reading: :class:`Extractor` extracts a tar stream (``r|``) member by member
under a destination and refuses, raising the error class it was given (each
package's own ``UnsafeArchive``) with the member's name: absolute names, ``..``
components, links (symbolic or hard) whose target is absolute or resolves
outside the destination, a path that would be reached through a link leading
outside it, and device files. Mode and mtime are restored (directories' at the
end, so that writing into them does not change them), the owner too when
running as root.
"""

from __future__ import annotations

import os
import stat
import tarfile
from typing import IO, Any

__all__ = ["write_tar", "Extractor", "tree_size"]

RECORD = 64 * 1024

def tree_size(path: str, limit: int = 100_000) -> int:
    """Bytes of regular files under ``path`` (for a progress bar); counts at most ``limit`` entries."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    seen = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            seen += 1
            if seen > limit:
                return total
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def write_tar(path: str, fileobj: IO[bytes], arcname: str | None = None) -> int:
    """Write ``path`` as a tar stream to ``fileobj``; returns the number of entries."""
    count = [0]

    def counted(info: tarfile.TarInfo) -> tarfile.TarInfo:
        count[0] += 1
        return info

    name = arcname if arcname is not None else (os.path.basename(os.path.normpath(path)) or ".")
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, bufsize=RECORD) as tar:
        tar.add(path, arcname=name, recursive=True, filter=counted)
    return count[0]


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Extractor:
    """Extract tar streams under ``dest`` (a directory, created if missing).

    With ``rename`` = ``(old, new)``, a top-level entry named ``old`` (and
    everything under it) lands as ``new``: ``blink cp dir host:/x`` where
    ``/x`` does not exist yet creates ``/x`` from ``dir``, like ``cp -r``.
    """

    def __init__(self, dest: str, rename: tuple[str, str] | None = None, error: type = ValueError) -> None:
        os.makedirs(dest, exist_ok=True)
        self.dest = os.path.realpath(dest)
        self.error = error  # raised for a member that must not be extracted (the caller's own class)
        self.rename = rename
        self.entries = 0
        self.root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._dirs: list[tuple[tarfile.TarInfo, str]] = []

    def _name(self, member: tarfile.TarInfo) -> str:
        name = member.name
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise self.error(f"refused {name!r}: an absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.error(f"refused {name!r}: a '..' component")
        if not parts:
            return ""
        if self.rename is not None and parts[0] == self.rename[0]:
            parts[0] = self.rename[1]
        return "/".join(parts)

    def _target(self, member: tarfile.TarInfo, rel: str) -> str:
        target = os.path.join(self.dest, rel)
        parent = os.path.realpath(os.path.dirname(target))
        if not _inside(self.dest, parent):
            raise self.error(f"refused {member.name!r}: it would be written through a link that leads "
                                "outside the destination")
        return os.path.join(parent, os.path.basename(target))

    def _check_link(self, member: tarfile.TarInfo, target: str) -> None:
        link = member.linkname
        if member.issym():
            if link.startswith("/"):
                raise self.error(f"refused {member.name!r}: a symlink to an absolute path ({link!r})")
            resolved = os.path.realpath(os.path.join(os.path.dirname(target), link))
        else:  # a hard link names another member
            rel = self._name(tarfile.TarInfo(link))
            resolved = os.path.realpath(os.path.join(self.dest, rel))
        if not _inside(self.dest, resolved):
            raise self.error(f"refused {member.name!r}: a link to {link!r}, outside the destination")

    def extract(self, fileobj: IO[bytes]) -> int:
        """Extract every member of the stream; raises ``error`` (nothing of that
        member is written) or ``tarfile.TarError``/``OSError``."""
        with tarfile.open(fileobj=fileobj, mode="r|", bufsize=RECORD) as tar:
            for member in tar:
                self._one(tar, member)
            self._finish(tar)
        return self.entries

    def _one(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = self._name(member)
        if not rel:
            return
        if member.ischr() or member.isblk():
            raise self.error(f"refused {member.name!r}: a device file")
        target = self._target(member, rel)
        if member.issym() or member.islnk():
            self._check_link(member, target)
        if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target)
                                            and not os.path.islink(target)):
            if os.path.isdir(target) and not os.path.islink(target):
                raise self.error(f"refused {member.name!r}: a directory is in the way")
            os.unlink(target)  # never write through what was there (a link, say)
        self.entries += 1
        if member.isdir():
            os.makedirs(target, 0o700, exist_ok=True)
            self._dirs.append((member, target))
            return
        if member.islnk():
            source = os.path.join(self.dest, self._name(tarfile.TarInfo(member.linkname)))
            os.link(source, target)
            return
        member = member.replace(name=rel) if hasattr(member, "replace") else _renamed(member, rel)
        kwargs: Any = {"set_attrs": True, "numeric_owner": True}
        if hasattr(tarfile, "fully_trusted_filter"):
            kwargs["filter"] = "fully_trusted"  # checked above; keep modes as they are
        tar.extract(member, self.dest, **kwargs)

    def _finish(self, tar: tarfile.TarFile) -> None:
        for member, target in reversed(self._dirs):
            if self.root:
                tar.chown(member, target, True)  # type: ignore[call-arg]
            tar.chmod(member, target)
            tar.utime(member, target)
        self._dirs = []


def _renamed(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """``TarInfo.replace`` for Pythons that lack it."""
    import copy

    new = copy.copy(member)
    new.name = name
    return new
