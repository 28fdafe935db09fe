"""The qemu backend's guest image: a kernel and an initramfs from Debian packages.

``blink build-guest`` builds it; the qemu backend finds it. The modules,
each importing only those listed before it:

- ``apt``: resolving, downloading and unpacking Debian packages;
- ``elf``: what an ELF binary needs (sonames, loader, module info), found in
  an unpacked tree;
- ``cpio``: the reproducible newc archive;
- ``python``: the interpreter, stdlib selection, bytecode and the agent;
- ``image``: the image itself, its cache key, ``GuestImage`` / ``load`` /
  ``find``, and the ``blink build-guest`` command.

This module only re-exports the names callers use.
"""

from ..errors import GuestImageError
from .image import (
    GuestImage,
    add_arguments,
    build,
    default_cache_dir,
    encode_env,
    find,
    load,
    main,
    run,
)

__all__ = ["GuestImage", "GuestImageError", "add_arguments", "build", "default_cache_dir", "encode_env",
           "find", "load", "main", "run"]
