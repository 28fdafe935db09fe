/* Fuzz/sanitizer harness for blin.c.
 *
 * Built with -fsanitize=fuzzer it is a libFuzzer target; built without it
 * (-DBLIN_CORPUS_MAIN) it replays the files named on the command line, so CI
 * can run a corpus under ASan + UBSan with any C compiler. Invariants are
 * checked with abort(): a violated one is a crash the sanitizer reports.
 *
 * Besides memory safety it checks the scan against the wire format itself
 * (every reported field re-read from the bytes, frames contiguous, the
 * pending state consistent with what is left) and against itself split in
 * two: scanning a prefix never contradicts scanning the whole, which is what
 * the daemon relies on when a frame arrives over several reads. The Python
 * twin is compared with this codec on the corpus libFuzzer grows
 * (tests/reliability.py differential).
 *
 * The stream pump's prefix (pump.c) is checked against the scan: the frames it
 * forwards are exactly the scan's first frames of the types it takes, it
 * stops where the scan says why, and a frame it reports cut is the scan's
 * pending payload.
 *
 * The RPC hot loop (route.c) gets every input too, as a guest's batch and as a
 * handler's: what it forwards is whole frames of the input with new ids, the
 * answers to them go back with the input's ids, its tables empty out, and
 * nothing leaks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blin.h"
#include "pump.h"
#include "route.h"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s\n", #c); abort(); } } while (0)

static uint64_t le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    while (n--)
        v = (v << 8) | p[n];
    return v;
}

/* One scan of data[start:end], checked field by field; returns res. */
static blin_scan_t scan_checked(const uint8_t *data, size_t start, size_t end, uint32_t max,
                                blin_header_t *out, size_t cap)
{
    blin_scan_t res;
    size_t i, pos = start;
    uint64_t mask = 0;
    int st = blin_scan(data, start, end, max, out, cap, &res);

    CHECK(st == (int)res.status);
    CHECK(res.count <= cap);
    CHECK(res.consumed >= start && res.consumed <= end);
    for (i = 0; i < res.count; i++) {
        const uint8_t *p = data + out[i].offset;
        CHECK(out[i].offset == pos);
        CHECK(le(p, 4) == BLIN_MAGIC && p[4] == BLIN_VERSION);
        CHECK(out[i].msg_type == p[5] && blin_known_type((unsigned)out[i].msg_type));
        CHECK(out[i].flags == le(p + 6, 2));
        CHECK(out[i].length == le(p + 8, 4) && out[i].length <= max);
        CHECK(out[i].request_id == le(p + 12, 8));
        pos += BLIN_HEADER_SIZE + (size_t)out[i].length;
        CHECK(pos <= end);
        mask |= blin_type_bit((unsigned)out[i].msg_type);
    }
    CHECK(res.consumed == pos);
    CHECK(res.type_mask == mask);
    if (res.status != BLIN_OK) {
        CHECK(res.error_offset == res.consumed && res.pending == BLIN_PENDING_NONE);
        CHECK(blin_check_header(data + res.consumed, end - res.consumed, max) == (int)res.status);
    } else if (res.pending == BLIN_PENDING_NONE) {
        CHECK(res.consumed == end);
    } else if (res.pending == BLIN_PENDING_HEADER) {
        CHECK(end - res.consumed < BLIN_HEADER_SIZE && end > res.consumed);
        CHECK(blin_check_header(data + res.consumed, end - res.consumed, max) == BLIN_OK);
    } else if (res.pending == BLIN_PENDING_PAYLOAD) {
        CHECK(end - res.consumed >= BLIN_HEADER_SIZE);
        CHECK(end - res.consumed < BLIN_HEADER_SIZE + le(data + res.consumed + 8, 4));
    } else {
        CHECK(res.pending == BLIN_PENDING_MORE && res.count == cap && res.consumed < end);
    }
    return res;
}

/* Scan everything in batches of cap; the frames found (count) and where it stopped. */
static blin_scan_t scan_all(const uint8_t *data, size_t start, size_t size, uint32_t max, size_t cap,
                            size_t *frames)
{
    static blin_header_t out[4096];
    blin_scan_t res;
    size_t pos = start;

    CHECK(cap <= sizeof out / sizeof out[0]);
    *frames = 0;
    for (;;) {
        res = scan_checked(data, pos, size, max, out, cap);
        *frames += res.count;
        if (res.status != BLIN_OK || res.pending != BLIN_PENDING_MORE)
            break;
        pos = res.consumed;
    }
    return res;
}

/* Scanning data[0:cut] then the whole: the prefix never contradicts the whole. */
static void split_consistency(const uint8_t *data, size_t size, size_t cut, uint32_t max)
{
    size_t nfull, npre;
    blin_scan_t full = scan_all(data, 0, size, max, 64, &nfull);
    blin_scan_t pre = scan_all(data, 0, cut, max, 64, &npre);

    CHECK(npre <= nfull && pre.consumed <= full.consumed);
    if (pre.status != BLIN_OK) {
        /* a violation visible in a prefix is the same violation in the whole */
        CHECK(full.status == pre.status && full.error_offset == pre.error_offset);
    } else if (full.status != BLIN_OK) {
        CHECK(full.error_offset >= pre.consumed);
    }
}

/* The input as a guest's batch through the loop, then answered by the handler. */
static void route_checked(const uint8_t *data, size_t size)
{
    static const char *methods[] = {"a", "tool.run", "x.y", "m"};
    blin_router_t *r = blin_router_new();
    blin_route_t res;
    int32_t g, h;
    size_t i, stop, pos, off, len, took = 0;
    uint8_t *answers;

    CHECK(r != NULL);
    if (blin_route_method(data, size, &off, &len)) {
        CHECK(len >= 1 && len <= BLIN_ROUTE_METHOD_MAX && off + len < size);
        for (i = off; i < off + len; i++)
            CHECK(data[i] != '"' && data[i] != '\\' && data[i] >= 0x20 && data[i] < 0x7F);
    }
    g = blin_router_add(r, 1, 7, 16);
    h = blin_router_add(r, 0, 0, 16);
    CHECK(g == 0 && h == 1);
    for (i = 0; i < sizeof methods / sizeof methods[0]; i++)
        blin_router_learn(r, 7, (const uint8_t *)methods[i], strlen(methods[i]), h);
    stop = blin_route(r, g, data, 0, size, 16u << 20, 1.0, 0, &res);
    CHECK(stop <= size && res.frames == res.forwarded && res.answered == 0);
    CHECK(blin_router_count(r) == res.forwarded && blin_router_outstanding(r, g) == res.forwarded);
    CHECK(res.nout == (res.forwarded ? 1u : 0u));
    if (res.nout) {
        /* whole frames of the input, ids replaced by the handler's */
        CHECK(res.outs[0].slot == h && res.outs[0].len == stop);
        for (pos = 0; pos < stop; pos += BLIN_HEADER_SIZE + le(data + pos + 8, 4)) {
            CHECK(memcmp(res.outs[0].data + pos, data + pos, 12) == 0);
            CHECK(le(res.outs[0].data + pos + 12, 8) == (BLIN_ROUTE_ID_BIT | (++took)));
        }
        CHECK(pos == stop && took == res.forwarded);
        answers = malloc(stop);
        CHECK(answers != NULL);
        memcpy(answers, res.outs[0].data, stop);
        for (pos = 0; pos < stop; pos += BLIN_HEADER_SIZE + le(answers + pos + 8, 4))
            answers[pos + 5] = 0x11; /* each request answered with its own bytes */
        CHECK(blin_route(r, h, answers, 0, stop, 16u << 20, 0.0, 0, &res) == stop);
        CHECK(res.answered == took && res.nout == 1 && res.outs[0].slot == g && res.outs[0].len == stop);
        for (pos = 0; pos < stop; pos += BLIN_HEADER_SIZE + le(data + pos + 8, 4))
            CHECK(le(res.outs[0].data + pos + 12, 8) == le(data + pos + 12, 8));
        free(answers);
    }
    CHECK(blin_router_count(r) == 0 && blin_router_outstanding(r, g) == 0);
    /* the input as a handler's answers (forged ids), and from the middle */
    blin_route(r, h, data, 0, size, 16u << 20, 0.0, 0, &res);
    CHECK(res.answered == 0 && res.nout == 0);
    blin_route(r, g, data, size / 2, size, 64, 2.0, 15, &res);
    CHECK(res.forwarded <= 1);
    CHECK(blin_router_release(r, h) == res.forwarded && blin_router_count(r) == 0);
    CHECK(blin_router_release(r, g) == 0 && blin_router_expire(r, 10.0) == 0);
    blin_router_free(r);
}

/* blin_stream_prefix over data[start:size] against blin_scan of the same bytes. */
static void prefix_checked(const uint8_t *data, size_t start, size_t size, uint32_t max, uint64_t fast)
{
    static blin_header_t out[4096];
    blin_pump_t pr;
    blin_scan_t sc;
    size_t i;

    pr.nread = 12345;
    blin_stream_prefix(data, start, size, max, fast, &pr);
    CHECK(pr.nread == 12345);
    CHECK(pr.consumed >= start && pr.consumed <= size);
    blin_scan(data, start, size, max, out, 4096, &sc);
    CHECK(pr.count <= sc.count || sc.count == 4096);
    for (i = 0; i < pr.count && i < sc.count; i++)
        CHECK(blin_type_bit((unsigned)out[i].msg_type) & fast);
    if (pr.count < sc.count) { /* stopped at a whole frame of another type */
        CHECK(out[pr.count].offset == pr.consumed && !(blin_type_bit((unsigned)out[pr.count].msg_type) & fast));
        CHECK(pr.need == 0);
    } else if (pr.count == sc.count) {
        CHECK(pr.consumed == sc.consumed);
        if (pr.need) {
            CHECK(sc.pending == BLIN_PENDING_PAYLOAD && sc.status == BLIN_OK);
            CHECK(pr.need == BLIN_HEADER_SIZE + le(data + pr.consumed + 8, 4) && pr.need > size - pr.consumed);
            CHECK(blin_type_bit(data[pr.consumed + 5]) & fast);
        }
    }
    for (i = 0; i < pr.count && i < sc.count; i++)
        pr.type_mask &= ~blin_type_bit((unsigned)out[i].msg_type);
    CHECK(pr.count > sc.count || pr.type_mask == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy;
    blin_header_t h;
    uint64_t old;
    size_t n, cut;

    scan_all(data, 0, size, 0xFFFFFFFFu, 1, &n);
    scan_all(data, 0, size, 64, 3, &n);
    scan_all(data, 0, size, 16u << 20, 4096, &n);
    if (size)
        scan_all(data, size / 3, size, 16u << 20, 7, &n);
    cut = size ? (size_t)data[0] * size / 256 : 0;
    split_consistency(data, size, cut, 16u << 20);
    split_consistency(data, size, size / 2, 64);
    if (blin_parse_header(data, size, 0, 16u << 20, &h) == BLIN_OK) {
        uint8_t buf[BLIN_HEADER_SIZE];
        CHECK(blin_pack_header(buf, sizeof buf, 0, (unsigned)h.msg_type, (uint16_t)h.flags,
                               (uint32_t)h.length, h.request_id) == BLIN_OK);
        CHECK(memcmp(buf, data, BLIN_HEADER_SIZE) == 0);
    } else {
        CHECK(size < BLIN_HEADER_SIZE || blin_check_header(data, BLIN_HEADER_SIZE, 16u << 20) != BLIN_OK);
    }
    copy = malloc(size ? size : 1);
    CHECK(copy != NULL);
    if (size)
        memcpy(copy, data, size);
    if (blin_rewrite_request_id(copy, size, size / 2, 0x1122334455667788ull, &old) == BLIN_OK)
        CHECK(blin_rewrite_request_id(copy, size, size / 2, old, &old) == BLIN_OK &&
              old == 0x1122334455667788ull && memcmp(copy, data, size) == 0);
    else
        CHECK(size - size / 2 < BLIN_HEADER_SIZE);
    free(copy);
    route_checked(data, size);
    prefix_checked(data, 0, size, 16u << 20, blin_type_bit(0x30) | blin_type_bit(0x31));
    prefix_checked(data, size / 3, size, 64, blin_type_bit(0x30));
    prefix_checked(data, 0, size, 16u << 20, 0);
    return 0;
}

#ifdef BLIN_CORPUS_MAIN
int main(int argc, char **argv)
{
    int i, n = 0;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *buf;
        long len;
        if (!f) { perror(argv[i]); return 2; }
        fseek(f, 0, SEEK_END);
        len = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc(len ? (size_t)len : 1);
        if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) { fclose(f); return 2; }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)len);
        free(buf);
        n++;
    }
    printf("%d inputs ok\n", n);
    return 0;
}
#endif
