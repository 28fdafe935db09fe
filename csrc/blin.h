/* BLIN v1 frame codec: plain C99, no Python.h.
 *
 * Owns: scanning a byte buffer for frame headers (batch), validating them
 * (magic, version, known type, payload length against a caller's limit, in
 * that order), packing headers and rewriting request_ids in place.
 * Functions return status codes; the Python side maps them to exceptions.
 */
#ifndef BLIN_H
#define BLIN_H

#include <stddef.h>
#include <stdint.h>

#define BLIN_MAGIC 0x424C494Eu
#define BLIN_VERSION 1u
#define BLIN_HEADER_SIZE 20u

/* status codes */
#define BLIN_OK 0
#define BLIN_BAD_MAGIC 1
#define BLIN_BAD_VERSION 2
#define BLIN_UNKNOWN_TYPE 3
#define BLIN_FRAME_TOO_LARGE 4
#define BLIN_SHORT_BUFFER 5
#define BLIN_BAD_ARGUMENT 6

/* what follows the last complete frame */
#define BLIN_PENDING_NONE 0    /* nothing: the buffer ends on a frame boundary */
#define BLIN_PENDING_HEADER 1  /* a header prefix (< 20 bytes), valid so far */
#define BLIN_PENDING_PAYLOAD 2 /* a whole valid header, payload incomplete */
#define BLIN_PENDING_MORE 3    /* output capacity reached; more frames may follow */

/* One frame header as found in a buffer. Five u64 so that Python can read
 * a batch as one flat array. */
typedef struct {
    uint64_t offset;     /* of the header, from the start of the buffer */
    uint64_t msg_type;
    uint64_t flags;
    uint64_t length;     /* payload length */
    uint64_t request_id;
} blin_header_t;

typedef struct {
    uint64_t count;        /* complete frames written to out[] */
    uint64_t consumed;     /* offset just past the last complete frame */
    uint64_t pending;      /* BLIN_PENDING_* */
    uint64_t status;       /* BLIN_OK or the first violation */
    uint64_t error_offset; /* offset of the offending header when status != OK */
    uint64_t type_mask;    /* OR of blin_type_bit() of every complete frame */
} blin_scan_t;

/* Bit of a known type in blin_scan_t.type_mask (0 for unknown types):
 * Handshake 0, Heartbeat 1, Error 2, RpcRequest 3, RpcResponse 4, RpcError 5,
 * StreamData 6, TtyResize 7, Stdout 8, Stderr 9. Lets the caller see "this
 * batch is only stream frames" without looking at each header. */
uint64_t blin_type_bit(unsigned msg_type);

int blin_known_type(unsigned msg_type);

/* Check the header bytes at p (avail may be < 20: only what is present is
 * checked). Returns BLIN_OK or the first violation. */
int blin_check_header(const uint8_t *p, size_t avail, uint32_t max_payload);

/* Scan buf[start:end]. Reports every complete frame (up to capacity) in out,
 * stops at the first violation. Always fills res; returns res->status. */
int blin_scan(const uint8_t *buf, size_t start, size_t end, uint32_t max_payload,
              blin_header_t *out, size_t capacity, blin_scan_t *res);

/* Parse and check one header at buf[offset:]; fills out on BLIN_OK. */
int blin_parse_header(const uint8_t *buf, size_t len, size_t offset,
                      uint32_t max_payload, blin_header_t *out);

/* Write a header at buf[offset:]. BLIN_SHORT_BUFFER if it does not fit,
 * BLIN_UNKNOWN_TYPE for a type conforming senders never write. */
int blin_pack_header(uint8_t *buf, size_t len, size_t offset, unsigned msg_type,
                     uint16_t flags, uint32_t payload_len, uint64_t request_id);

/* Replace the request_id of the header at buf[offset:]; the old one goes to
 * *old_id. BLIN_SHORT_BUFFER if the header does not fit. */
int blin_rewrite_request_id(uint8_t *buf, size_t len, size_t offset,
                            uint64_t new_id, uint64_t *old_id);

/* Walking whole frames from buf[0] (a frame boundary), the first boundary
 * at or after min_offset; len when the walk runs past the end. Lets the
 * scrollback drop its oldest frames without looking at each one in Python. */
size_t blin_frame_boundary(const uint8_t *buf, size_t len, size_t min_offset);

#endif
