"""ELF files, just enough to collect what a binary needs at run time.

Owns reading 64-bit little-endian ELF: the ``DT_NEEDED`` sonames and the
``PT_INTERP`` loader (``elf_needed``), a kernel module's ``.modinfo``
(``modinfo``), and finding those shared libraries, and their own, in an
unpacked Debian tree, following its symlinks as the guest would
(``find_lib``, ``shared_libraries``). Pure functions of bytes and paths;
nothing here knows what image the files go into.
"""

from __future__ import annotations

import os
import struct

from ..errors import GuestImageError

MULTIARCH = "x86_64-linux-gnu"


def _elf(data: bytes) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError("not a 64-bit little-endian ELF file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    return phdrs, shdrs, shstrndx


def elf_needed(data: bytes) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP) of an ELF executable or library."""
    phdrs, _, _ = _elf(data)
    interp = None
    dynamic = None
    for p_type, _, off, _, _, filesz, _, _ in phdrs:
        if p_type == 3:
            interp = data[off:off + filesz].rstrip(b"\0").decode()
        elif p_type == 2:
            dynamic = (off, filesz)
    if dynamic is None:
        return [], interp

    def file_off(addr: int) -> int:
        for p_type, _, off, vaddr, _, filesz, _, _ in phdrs:
            if p_type == 1 and vaddr <= addr < vaddr + filesz:
                return off + addr - vaddr
        raise GuestImageError(f"address 0x{addr:x} not in a loaded segment")

    entries = [struct.unpack_from("<qQ", data, dynamic[0] + i) for i in range(0, dynamic[1], 16)]
    strtab = next((v for t, v in entries if t == 5), None)
    if strtab is None:
        return [], interp
    base = file_off(strtab)
    needed = []
    for tag, val in entries:
        if tag == 1:
            end = data.index(b"\0", base + val)
            needed.append(data[base + val:end].decode())
    return needed, interp


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value pairs of a kernel module's .modinfo section."""
    _, shdrs, shstrndx = _elf(data)
    names_off = shdrs[shstrndx][4]
    for sh in shdrs:
        name_end = data.index(b"\0", names_off + sh[0])
        if data[names_off + sh[0]:name_end] == b".modinfo":
            raw = data[sh[4]:sh[4] + sh[5]]
            out: dict[str, str] = {}
            for item in raw.split(b"\0"):
                if b"=" in item:
                    k, v = item.decode("utf-8", "replace").split("=", 1)
                    out.setdefault(k, v)
            return out
    return {}


def shared_libraries(root: str, sonames: set[str], needed_by: str) -> dict[str, str]:
    """Soname -> file in ``root`` for ``sonames`` and everything they need in
    turn (the closure of DT_NEEDED); ``GuestImageError`` naming ``needed_by``
    when one is in none of the unpacked packages."""
    todo = sorted(sonames)
    done: dict[str, str] = {}
    while todo:
        so = todo.pop()
        if so in done:
            continue
        path = find_lib(root, so)
        if path is None:
            raise GuestImageError(f"shared library {so} (needed by {needed_by}) is in none of the packages")
        done[so] = path
        with open(path, "rb") as f:
            data = f.read()
        todo.extend(n for n in elf_needed(data)[0] if n not in done)
    return done


def find_lib(root: str, soname: str) -> str | None:
    """The file ``soname`` resolves to in the unpacked tree ``root``, searching
    the loader's directories; None if it is in none of them."""
    for d in (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib64", "lib", "usr/lib"):
        p = resolve_in(root, os.path.join(d, soname))
        if p is not None:
            return p
    return None


def resolve_in(root: str, rel: str) -> str | None:
    """``rel`` inside the unpacked tree ``root``, following symlinks as the
    guest would (an absolute target is relative to ``root``, not the host)."""
    path = rel.strip("/")
    for _ in range(40):
        full = os.path.join(root, path)
        if os.path.islink(full):
            target = os.readlink(full)
            path = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                    else os.path.join(os.path.dirname(path), target))
            if path.startswith(".."):
                return None
            continue
        return full if os.path.isfile(full) else None
    return None
