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

typedef struct blin_router blin_router_t;
typedef struct { int32_t slot; const uint8_t *data; size_t len; } blin_out_t;
typedef struct {
    uint64_t frames; uint64_t forwarded; uint64_t answered; uint64_t nout; const blin_out_t *outs;
} blin_route_t;
typedef struct { int32_t dest; int32_t origin; uint64_t id; uint64_t origin_id; } blin_call_t;
blin_router_t *blin_router_new(void);
void blin_router_free(blin_router_t *r);
int32_t blin_router_add(blin_router_t *r, int guest, uint32_t session, uint32_t max_inflight);
size_t blin_router_release(blin_router_t *r, int32_t slot);
size_t blin_router_expire(blin_router_t *r, double now);
const blin_call_t *blin_router_calls(const blin_router_t *r);
void blin_router_learn(blin_router_t *r, uint32_t session, const uint8_t *method, size_t len, int32_t dest);
void blin_router_forget(blin_router_t *r);
size_t blin_route(blin_router_t *r, int32_t slot, const uint8_t *buf, size_t start, size_t end,
                  uint32_t max_payload, double deadline, uint32_t extra, blin_route_t *res);
int blin_router_take(blin_router_t *r, int32_t dest, uint64_t id, int32_t *origin, uint64_t *origin_id);
uint32_t blin_router_outstanding(const blin_router_t *r, int32_t slot);
size_t blin_router_count(const blin_router_t *r);
int blin_router_earliest(const blin_router_t *r, double *at);
int blin_route_method(const uint8_t *p, size_t n, size_t *off, size_t *len);

typedef struct { int64_t fd; uint64_t want; int64_t sent; } blin_target_t;
typedef struct { int64_t nread; uint64_t consumed; uint64_t count; uint64_t type_mask; uint64_t need; } blin_pump_t;
int64_t blin_pump_read(int fd, uint8_t *buf, size_t start, size_t end, size_t cap, uint32_t max_payload,
                       uint64_t fast_mask, blin_pump_t *res);
void blin_pump_send(const uint8_t *buf, size_t len, uint64_t type_mask, blin_target_t *targets, size_t ntargets);
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
    '#include "blin.h"\n#include "route.h"\n#include "pump.h"',
    sources=[os.path.relpath(HERE / "blin.c"), os.path.relpath(HERE / "route.c"), os.path.relpath(HERE / "pump.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=compile_args(),
    extra_link_args=["-fsanitize=address,undefined"] if sanitize() else [],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
