/* The stream pump; see pump.h. */
#define _GNU_SOURCE
#include "pump.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "blin.h"
#include "le.h"

void blin_stream_prefix(const uint8_t *buf, size_t start, size_t end, uint32_t max_payload, uint64_t fast_mask,
                        blin_pump_t *res)
{
    size_t pos = start;
    uint64_t count = 0, mask = 0;

    res->need = 0;
    while (end - pos >= BLIN_HEADER_SIZE) {
        const uint8_t *p = buf + pos;
        uint64_t bit;
        uint32_t len;

        if (blin_check_header(p, BLIN_HEADER_SIZE, max_payload) != BLIN_OK)
            break;
        bit = blin_type_bit(p[5]);
        len = blin_rd32(p + 8);
        if (!(bit & fast_mask))
            break;
        if (end - pos - BLIN_HEADER_SIZE < len) {
            res->need = BLIN_HEADER_SIZE + (uint64_t)len;
            break;
        }
        mask |= bit;
        count++;
        pos += BLIN_HEADER_SIZE + (size_t)len;
    }
    res->consumed = pos;
    res->count = count;
    res->type_mask = mask;
}

int64_t blin_pump_read(int fd, uint8_t *buf, size_t start, size_t end, size_t cap, uint32_t max_payload,
                       uint64_t fast_mask, blin_pump_t *res)
{
    ssize_t n;

    res->consumed = start;
    res->count = 0;
    res->type_mask = 0;
    res->need = 0;
    if (start > end || end > cap) {
        res->nread = -EINVAL;
        return res->nread;
    }
    do
        n = recv(fd, buf + end, cap - end, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    res->nread = n < 0 ? -(int64_t)errno : (int64_t)n;
    if (n > 0)
        blin_stream_prefix(buf, start, end + (size_t)n, max_payload, fast_mask, res);
    return res->nread;
}

void blin_pump_send(const uint8_t *buf, size_t len, uint64_t type_mask, blin_target_t *targets, size_t ntargets)
{
    size_t i;

    for (i = 0; i < ntargets; i++) {
        ssize_t w;

        if (type_mask & ~targets[i].want) {
            targets[i].sent = -1;
            continue;
        }
        do
            w = send((int)targets[i].fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        targets[i].sent = w < 0 ? 0 : (int64_t)w;
    }
}
