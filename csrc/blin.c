/* BLIN v1 frame codec; see blin.h. Byte-wise little-endian access, so the
 * code is independent of host endianness and alignment. */
#include "blin.h"
#include "le.h"

static const uint8_t magic_le[4] = {0x4E, 0x49, 0x4C, 0x42};

uint64_t blin_type_bit(unsigned t)
{
    switch (t) {
    case 0x01: return 1u << 0;
    case 0x02: return 1u << 1;
    case 0x03: return 1u << 2;
    case 0x10: return 1u << 3;
    case 0x11: return 1u << 4;
    case 0x12: return 1u << 5;
    case 0x20: return 1u << 6;
    case 0x21: return 1u << 7;
    case 0x30: return 1u << 8;
    case 0x31: return 1u << 9;
    default: return 0;
    }
}

int blin_known_type(unsigned t)
{
    return blin_type_bit(t) != 0;
}

int blin_check_header(const uint8_t *p, size_t avail, uint32_t max_payload)
{
    size_t i, m = avail < 4 ? avail : 4;
    for (i = 0; i < m; i++)
        if (p[i] != magic_le[i])
            return BLIN_BAD_MAGIC;
    if (avail > 4 && p[4] != BLIN_VERSION)
        return BLIN_BAD_VERSION;
    if (avail > 5 && !blin_known_type(p[5]))
        return BLIN_UNKNOWN_TYPE;
    if (avail >= 12 && blin_rd32(p + 8) > max_payload)
        return BLIN_FRAME_TOO_LARGE;
    return BLIN_OK;
}

int blin_scan(const uint8_t *buf, size_t start, size_t end, uint32_t max_payload,
              blin_header_t *out, size_t capacity, blin_scan_t *res)
{
    size_t pos = start, count = 0;
    uint64_t mask = 0;
    int status = BLIN_OK;
    uint64_t pending = BLIN_PENDING_NONE;

    while (pos < end) {
        size_t avail = end - pos;
        const uint8_t *p = buf + pos;
        uint32_t len;

        if (count == capacity) {
            pending = BLIN_PENDING_MORE;
            break;
        }
        status = blin_check_header(p, avail, max_payload);
        if (status != BLIN_OK)
            break;
        if (avail < BLIN_HEADER_SIZE) {
            pending = BLIN_PENDING_HEADER;
            break;
        }
        len = blin_rd32(p + 8);
        if (avail - BLIN_HEADER_SIZE < len) {
            pending = BLIN_PENDING_PAYLOAD;
            break;
        }
        out[count].offset = pos;
        out[count].msg_type = p[5];
        out[count].flags = (uint64_t)p[6] | ((uint64_t)p[7] << 8);
        out[count].length = len;
        out[count].request_id = blin_rd64(p + 12);
        mask |= blin_type_bit(p[5]);
        count++;
        pos += BLIN_HEADER_SIZE + (size_t)len;
    }
    res->count = count;
    res->consumed = pos;
    res->pending = pending;
    res->status = (uint64_t)status;
    res->error_offset = status == BLIN_OK ? 0 : pos;
    res->type_mask = mask;
    return status;
}

int blin_parse_header(const uint8_t *buf, size_t len, size_t offset,
                      uint32_t max_payload, blin_header_t *out)
{
    const uint8_t *p;
    int status;

    if (offset > len || len - offset < BLIN_HEADER_SIZE)
        return BLIN_SHORT_BUFFER;
    p = buf + offset;
    status = blin_check_header(p, BLIN_HEADER_SIZE, max_payload);
    if (status != BLIN_OK)
        return status;
    out->offset = offset;
    out->msg_type = p[5];
    out->flags = (uint64_t)p[6] | ((uint64_t)p[7] << 8);
    out->length = blin_rd32(p + 8);
    out->request_id = blin_rd64(p + 12);
    return BLIN_OK;
}

int blin_pack_header(uint8_t *buf, size_t len, size_t offset, unsigned msg_type,
                     uint16_t flags, uint32_t payload_len, uint64_t request_id)
{
    uint8_t *p;

    if (!blin_known_type(msg_type))
        return BLIN_UNKNOWN_TYPE;
    if (offset > len || len - offset < BLIN_HEADER_SIZE)
        return BLIN_SHORT_BUFFER;
    p = buf + offset;
    blin_wr32(p, BLIN_MAGIC);
    p[4] = BLIN_VERSION;
    p[5] = (uint8_t)msg_type;
    p[6] = (uint8_t)flags;
    p[7] = (uint8_t)(flags >> 8);
    blin_wr32(p + 8, payload_len);
    blin_wr64(p + 12, request_id);
    return BLIN_OK;
}

size_t blin_frame_boundary(const uint8_t *buf, size_t len, size_t min_offset)
{
    size_t pos = 0;

    while (pos < min_offset) {
        if (len - pos < BLIN_HEADER_SIZE)
            return len;
        pos += BLIN_HEADER_SIZE + (size_t)blin_rd32(buf + pos + 8);
        if (pos > len)
            return len;
    }
    return pos;
}

int blin_rewrite_request_id(uint8_t *buf, size_t len, size_t offset,
                            uint64_t new_id, uint64_t *old_id)
{
    if (offset > len || len - offset < BLIN_HEADER_SIZE)
        return BLIN_SHORT_BUFFER;
    *old_id = blin_rd64(buf + offset + 12);
    blin_wr64(buf + offset + 12, new_id);
    return BLIN_OK;
}
