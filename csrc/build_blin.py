"""cffi builder for the BLIN codec (API mode, out-of-line).

Imports nothing from the package: setup.py names it in ``cffi_modules``.
``VHUBD_BUILD_EXTENSION=no`` skips the build (the package then runs on the
pure-Python codec); ``VHUBD_SANITIZE=1`` builds with ASan + UBSan.
"""

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

CDEF = """
typedef struct {
    uint64_t offset; uint64_t msg_type; uint64_t flags; uint64_t length; uint64_t request_id;
} blin_header_t;
typedef struct {
    uint64_t count; uint64_t consumed; uint64_t pending; uint64_t status; uint64_t error_offset;
    uint64_t type_mask;
} blin_scan_t;
int blin_known_type(unsigned msg_type);
uint64_t blin_type_bit(unsigned msg_type);
int blin_check_header(const uint8_t *p, size_t avail, uint32_t max_payload);
int blin_scan(const uint8_t *buf, size_t start, size_t end, uint32_t max_payload,
              blin_header_t *out, size_t capacity, blin_scan_t *res);
int blin_parse_header(const uint8_t *buf, size_t len, size_t offset,
                      uint32_t max_payload, blin_header_t *out);
int blin_pack_header(uint8_t *buf, size_t len, size_t offset, unsigned msg_type,
                     uint16_t flags, uint32_t payload_len, uint64_t request_id);
int blin_rewrite_request_id(uint8_t *buf, size_t len, size_t offset,
                            uint64_t new_id, uint64_t *old_id);
size_t blin_frame_boundary(const uint8_t *buf, size_t len, size_t min_offset);
"""


def sanitize() -> bool:
    return (os.environ.get("BLINK_SANITIZE") or os.environ.get("VHUBD_SANITIZE")) == "1"


def compile_args():
    args = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]
    if sanitize():
        args += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                 "-fno-sanitize-recover=all"]
    return args


ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "vhubd._blin",
    '#include "blin.h"',
    sources=[os.path.relpath(HERE / "blin.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=compile_args(),
    extra_link_args=["-fsanitize=address,undefined"] if sanitize() else [],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
