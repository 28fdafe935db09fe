/* Little-endian loads and stores, byte by byte: independent of host
 * endianness and alignment. Shared by blin.c and route.c. */
#ifndef BLIN_LE_H
#define BLIN_LE_H

#include <stdint.h>

static inline uint32_t blin_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t blin_rd64(const uint8_t *p)
{
    return (uint64_t)blin_rd32(p) | ((uint64_t)blin_rd32(p + 4) << 32);
}

static inline void blin_wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void blin_wr64(uint8_t *p, uint64_t v)
{
    blin_wr32(p, (uint32_t)v);
    blin_wr32(p + 4, (uint32_t)(v >> 32));
}

#endif
