/* Fuzz/sanitizer harness for blin.c.
 *
 * Built with -fsanitize=fuzzer it is a libFuzzer target; built without it
 * (-DBLIN_CORPUS_MAIN) it replays the files named on the command line, so CI
 * can run a corpus under ASan + UBSan with any C compiler. Invariants are
 * checked with abort(): a violated one is a crash the sanitizer reports. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blin.h"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "invariant failed: %s\n", #c); abort(); } } while (0)

static void scan_all(const uint8_t *data, size_t size, uint32_t max, size_t cap)
{
    blin_header_t *out = malloc(cap * sizeof *out);
    blin_scan_t res;
    size_t pos = 0, total = 0;

    CHECK(out != NULL);
    for (;;) {
        size_t i;
        blin_scan(data, pos, size, max, out, cap, &res);
        CHECK(res.count <= cap);
        CHECK(res.consumed >= pos && res.consumed <= size);
        for (i = 0; i < res.count; i++) {
            CHECK(out[i].offset + BLIN_HEADER_SIZE + out[i].length <= res.consumed);
            CHECK(out[i].length <= max);
            CHECK(blin_known_type((unsigned)out[i].msg_type));
        }
        total += res.count;
        if (res.status != BLIN_OK) {
            CHECK(res.error_offset == res.consumed);
            CHECK(blin_check_header(data + res.consumed, size - res.consumed, max) == (int)res.status);
            break;
        }
        if (res.pending != BLIN_PENDING_MORE)
            break;
        pos = res.consumed;
    }
    (void)total;
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy;
    blin_header_t h;
    uint64_t old;

    scan_all(data, size, 0xFFFFFFFFu, 1);
    scan_all(data, size, 64, 3);
    scan_all(data, size, 16u << 20, 4096);
    if (blin_parse_header(data, size, 0, 16u << 20, &h) == BLIN_OK) {
        uint8_t buf[BLIN_HEADER_SIZE];
        CHECK(blin_pack_header(buf, sizeof buf, 0, (unsigned)h.msg_type, (uint16_t)h.flags,
                               (uint32_t)h.length, h.request_id) == BLIN_OK);
        CHECK(memcmp(buf, data, BLIN_HEADER_SIZE) == 0);
    }
    copy = malloc(size ? size : 1);
    CHECK(copy != NULL);
    if (size)
        memcpy(copy, data, size);
    if (blin_rewrite_request_id(copy, size, size / 2, 0x1122334455667788ull, &old) == BLIN_OK)
        CHECK(blin_rewrite_request_id(copy, size, size / 2, old, &old) == BLIN_OK &&
              old == 0x1122334455667788ull && memcmp(copy, data, size) == 0);
    free(copy);
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
