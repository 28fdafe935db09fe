/* The stream pump: a read from a guest's socket, and the forwarding of the
 * plain stream frames it completes straight to the subscribers' sockets
 * (the daemon's hot path for guest output; vhubd/server.py drives it,
 * vhubd/_codec_py.py has its twin).
 *
 * Plain C99 + POSIX sockets, no Python.h. The buffer and every decision
 * about who may be written to stay with the caller: blin_pump_read reads and
 * finds a prefix of whole frames whose types are all in the caller's mask
 * (the header checks of blin_check_header, in order); blin_pump_send offers
 * such a prefix to each target whose own mask covers it, without blocking.
 */
#ifndef BLIN_PUMP_H
#define BLIN_PUMP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int64_t fd;    /* a connected stream socket, non-blocking */
    uint64_t want; /* blin_type_bit() of the types it takes */
    int64_t sent;  /* out: bytes of the prefix it took (0..len; a short count: its socket is full),
                      -1: not offered (the prefix holds a type it does not take) */
} blin_target_t;

typedef struct {
    int64_t nread;      /* bytes read (> 0), 0 at EOF, -errno (-EAGAIN: nothing to read) */
    uint64_t consumed;  /* offset just past the prefix (== start: no prefix) */
    uint64_t count;     /* frames in the prefix */
    uint64_t type_mask; /* OR of their type bits */
    uint64_t need;      /* what follows the prefix is the start of a frame of those types, this large
                           in all (header included; its payload has not all arrived); 0: anything else */
} blin_pump_t;

/* The longest prefix of buf[start:end] made of whole frames with valid
 * headers (payload <= max_payload) whose type bits are all in fast_mask:
 * res->consumed, count, type_mask and need (res->nread is left alone). */
void blin_stream_prefix(const uint8_t *buf, size_t start, size_t end, uint32_t max_payload, uint64_t fast_mask,
                        blin_pump_t *res);

/* Read once from fd into buf[end:cap]; then, if nread > 0, the prefix of
 * buf[start:end + nread] as blin_stream_prefix. Returns res->nread. */
int64_t blin_pump_read(int fd, uint8_t *buf, size_t start, size_t end, size_t cap, uint32_t max_payload,
                       uint64_t fast_mask, blin_pump_t *res);

/* Offer buf[0:len] (a prefix whose types are type_mask) to each target in
 * order: one send each, MSG_DONTWAIT | MSG_NOSIGNAL; a send error counts as
 * 0 taken (the caller's transport meets the error itself). */
void blin_pump_send(const uint8_t *buf, size_t len, uint64_t type_mask, blin_target_t *targets, size_t ntargets);

#endif
