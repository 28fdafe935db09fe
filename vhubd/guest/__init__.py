"""Guest images from Debian packages: the qemu backend's kernel and
initramfs, and BoxLite's default OCI image layout.

``blink build-guest`` builds the first, the qemu backend finds it;
``blink build-image`` builds the second, the boxlite backend builds (on
first use) or finds it. The modules, each importing only those listed
before it:

- ``apt``: resolving, downloading and unpacking Debian packages;
- ``elf``: what an ELF binary needs (sonames, loader, module info), found in
  an unpacked tree;
- ``cpio``: the file tree and its reproducible newc archive;
- ``python``: the interpreter, stdlib selection, bytecode and the agent;
- ``cache``: build keys, the ``current`` pointer, pruning;
- ``image``: the qemu guest image, ``GuestImage`` / ``load`` / ``find``, and
  the ``blink build-guest`` command;
- ``layout``: reproducible tar+gzip layers and OCI image layouts;
- ``oci``: BoxLite's default image and the ``blink build-image`` command.

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
