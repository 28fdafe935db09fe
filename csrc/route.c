/* The relay's RPC hot loop; see route.h. vhubd/_route_py.py is its twin:
 * every decision below is made the same way there. */
#include <stdlib.h>
#include <string.h>

#include "blin.h"
#include "le.h"
#include "route.h"

#define T_RPC_REQUEST 0x10
#define T_RPC_RESPONSE 0x11
#define T_RPC_ERROR 0x12
#define OUT_KEEP (256u * 1024u) /* an output buffer larger than this is freed once read */

typedef struct {
    uint8_t *data;
    size_t len, cap;
} outbuf_t;

typedef struct {
    int used, guest;
    uint32_t session, max_inflight, outstanding;
    uint64_t next_id;
    outbuf_t out;
} slot_t;

typedef struct { /* a call in flight; id 0: an empty cell */
    uint64_t id;
    uint64_t origin_id;
    double deadline;
    int32_t dest, origin;
} flight_t;

typedef struct { /* a remembered method; len 0: an empty cell */
    uint32_t session;
    int32_t dest;
    uint32_t len;
    uint8_t m[BLIN_ROUTE_METHOD_MAX];
} method_t;

struct blin_router {
    slot_t *slots;
    size_t nslots, slots_cap;
    flight_t *fl;
    size_t fl_cap, fl_count; /* fl_cap: 0 or a power of two */
    method_t *mc;
    size_t mc_cap, mc_count;
    blin_out_t *outs; /* slots_cap entries */
    size_t nout;
    blin_call_t *calls;
    size_t ncalls, calls_cap;
};

blin_router_t *blin_router_new(void)
{
    return calloc(1, sizeof(blin_router_t));
}

void blin_router_free(blin_router_t *r)
{
    size_t i;

    if (r == NULL)
        return;
    for (i = 0; i < r->nslots; i++)
        free(r->slots[i].out.data);
    free(r->slots);
    free(r->fl);
    free(r->mc);
    free(r->outs);
    free(r->calls);
    free(r);
}

static int valid_slot(const blin_router_t *r, int32_t slot)
{
    return slot >= 0 && (size_t)slot < r->nslots && r->slots[slot].used;
}

int32_t blin_router_add(blin_router_t *r, int guest, uint32_t session, uint32_t max_inflight)
{
    size_t i;
    slot_t *s;

    for (i = 0; i < r->nslots && r->slots[i].used; i++)
        ;
    if (i == r->nslots) {
        if (r->nslots == r->slots_cap) {
            size_t cap = r->slots_cap ? r->slots_cap * 2 : 16;
            slot_t *grown;
            blin_out_t *outs;

            if (cap > INT32_MAX)
                return -1;
            grown = realloc(r->slots, cap * sizeof(slot_t));
            if (grown == NULL)
                return -1;
            r->slots = grown;
            /* one output entry per slot at most: never reallocated during a route */
            outs = realloc(r->outs, cap * sizeof(blin_out_t));
            if (outs == NULL)
                return -1;
            r->outs = outs;
            r->slots_cap = cap;
        }
        memset(&r->slots[r->nslots], 0, sizeof(slot_t));
        r->nslots++;
    }
    s = &r->slots[i];
    free(s->out.data);
    memset(s, 0, sizeof(*s));
    s->used = 1;
    s->guest = guest != 0;
    s->session = session;
    s->max_inflight = max_inflight;
    s->next_id = BLIN_ROUTE_ID_BIT | 1;
    return (int32_t)i;
}

/* ------------------------------------------------------------ calls in flight */

static size_t fl_home(const blin_router_t *r, int32_t dest, uint64_t id)
{
    uint64_t h = id * 0x9E3779B97F4A7C15ull ^ (uint64_t)(uint32_t)dest * 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 29;
    return (size_t)(h & (r->fl_cap - 1));
}

static long fl_find(const blin_router_t *r, int32_t dest, uint64_t id)
{
    size_t i;

    if (r->fl_cap == 0)
        return -1;
    for (i = fl_home(r, dest, id); r->fl[i].id != 0; i = (i + 1) & (r->fl_cap - 1))
        if (r->fl[i].id == id && r->fl[i].dest == dest)
            return (long)i;
    return -1;
}

static void fl_insert(blin_router_t *r, const flight_t *f)
{
    size_t i = fl_home(r, f->dest, f->id);

    while (r->fl[i].id != 0)
        i = (i + 1) & (r->fl_cap - 1);
    r->fl[i] = *f;
    r->fl_count++;
}

/* Room for one more call; 0 on success. */
static int fl_reserve(blin_router_t *r)
{
    flight_t *old = r->fl, *grown;
    size_t i, old_cap = r->fl_cap, cap;

    if ((r->fl_count + 1) * 2 <= r->fl_cap)
        return 0;
    cap = old_cap ? old_cap * 2 : 64;
    grown = calloc(cap, sizeof(flight_t));
    if (grown == NULL)
        return -1;
    r->fl = grown;
    r->fl_cap = cap;
    r->fl_count = 0;
    for (i = 0; i < old_cap; i++)
        if (old[i].id != 0)
            fl_insert(r, &old[i]);
    free(old);
    return 0;
}

/* Delete cell i, shifting the probe chain behind it back (no tombstones). */
static void fl_delete(blin_router_t *r, size_t i)
{
    size_t mask = r->fl_cap - 1, j = i;

    for (;;) {
        size_t k;
        int stays;

        j = (j + 1) & mask;
        if (r->fl[j].id == 0)
            break;
        k = fl_home(r, r->fl[j].dest, r->fl[j].id);
        stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            r->fl[i] = r->fl[j];
            i = j;
        }
    }
    r->fl[i].id = 0;
    r->fl_count--;
}

static int call_cmp(const void *a, const void *b)
{
    const blin_call_t *x = a, *y = b;

    if (x->dest != y->dest)
        return x->dest < y->dest ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* List (and end) the calls that match: toward dest (dest >= 0), or due by now. */
static size_t end_calls(blin_router_t *r, int32_t dest, double now)
{
    size_t i, n = 0;

    r->ncalls = 0;
    for (i = 0; i < r->fl_cap; i++) {
        const flight_t *f = &r->fl[i];
        if (f->id != 0 && (dest >= 0 ? f->dest == dest : f->deadline <= now))
            n++;
    }
    if (n > r->calls_cap) {
        blin_call_t *grown = realloc(r->calls, n * sizeof(blin_call_t));
        if (grown == NULL) {
            /* out of memory: they end unlisted (never left to match a later id) */
            for (i = 0; i < r->fl_cap;) {
                const flight_t *f = &r->fl[i];
                if (f->id != 0 && (dest >= 0 ? f->dest == dest : f->deadline <= now)) {
                    r->slots[f->origin].outstanding--;
                    fl_delete(r, i);
                } else {
                    i++;
                }
            }
            return 0;
        }
        r->calls = grown;
        r->calls_cap = n;
    }
    for (i = 0; i < r->fl_cap; i++) {
        const flight_t *f = &r->fl[i];
        if (f->id != 0 && (dest >= 0 ? f->dest == dest : f->deadline <= now)) {
            blin_call_t *c = &r->calls[r->ncalls++];
            c->dest = f->dest;
            c->origin = f->origin;
            c->id = f->id;
            c->origin_id = f->origin_id;
        }
    }
    if (r->ncalls > 1)
        qsort(r->calls, r->ncalls, sizeof(blin_call_t), call_cmp);
    for (i = 0; i < r->ncalls; i++) {
        long at = fl_find(r, r->calls[i].dest, r->calls[i].id);
        r->slots[r->calls[i].origin].outstanding--;
        fl_delete(r, (size_t)at);
    }
    return r->ncalls;
}

size_t blin_router_expire(blin_router_t *r, double now)
{
    return end_calls(r, -1, now);
}

const blin_call_t *blin_router_calls(const blin_router_t *r)
{
    return r->calls;
}

size_t blin_router_release(blin_router_t *r, int32_t slot)
{
    size_t i, n;

    if (!valid_slot(r, slot))
        return 0;
    n = end_calls(r, slot, 0.0);
    /* the calls this slot made: forgotten (an answer to one is dropped) */
    for (i = 0; i < r->fl_cap;) {
        if (r->fl[i].id != 0 && r->fl[i].origin == slot)
            fl_delete(r, i); /* a cell shifted into i is looked at next */
        else
            i++;
    }
    free(r->slots[slot].out.data);
    memset(&r->slots[slot], 0, sizeof(slot_t));
    blin_router_forget(r);
    return n;
}

/* ------------------------------------------------------------ methods */

static size_t mc_home(const blin_router_t *r, uint32_t session, const uint8_t *m, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull ^ session;
    size_t i;

    for (i = 0; i < len; i++)
        h = (h ^ m[i]) * 0x100000001b3ull;
    h ^= h >> 32;
    return (size_t)(h & (r->mc_cap - 1));
}

static long mc_find(const blin_router_t *r, uint32_t session, const uint8_t *m, size_t len)
{
    size_t i;

    if (r->mc_count == 0)
        return -1;
    for (i = mc_home(r, session, m, len); r->mc[i].len != 0; i = (i + 1) & (r->mc_cap - 1))
        if (r->mc[i].len == len && r->mc[i].session == session && memcmp(r->mc[i].m, m, len) == 0)
            return (long)i;
    return -1;
}

void blin_router_forget(blin_router_t *r)
{
    if (r->mc_count) {
        memset(r->mc, 0, r->mc_cap * sizeof(method_t));
        r->mc_count = 0;
    }
}

void blin_router_learn(blin_router_t *r, uint32_t session, const uint8_t *method, size_t len, int32_t dest)
{
    long at;
    size_t i;

    if (len == 0 || len > BLIN_ROUTE_METHOD_MAX || !valid_slot(r, dest) || r->slots[dest].guest)
        return;
    at = mc_find(r, session, method, len);
    if (at >= 0) {
        r->mc[at].dest = dest;
        return;
    }
    if (r->mc_count >= BLIN_ROUTE_METHODS_MAX)
        blin_router_forget(r); /* bounded: whatever a guest calls */
    if ((r->mc_count + 1) * 2 > r->mc_cap) {
        method_t *old = r->mc, *grown;
        size_t old_cap = r->mc_cap, cap = old_cap ? old_cap * 2 : 64;

        grown = calloc(cap, sizeof(method_t));
        if (grown == NULL)
            return; /* not remembered: the Python relay routes it */
        r->mc = grown;
        r->mc_cap = cap;
        r->mc_count = 0;
        for (i = 0; i < old_cap; i++)
            if (old[i].len != 0) {
                size_t j = mc_home(r, old[i].session, old[i].m, old[i].len);
                while (r->mc[j].len != 0)
                    j = (j + 1) & (cap - 1);
                r->mc[j] = old[i];
                r->mc_count++;
            }
        free(old);
    }
    i = mc_home(r, session, method, len);
    while (r->mc[i].len != 0)
        i = (i + 1) & (r->mc_cap - 1);
    r->mc[i].session = session;
    r->mc[i].dest = dest;
    r->mc[i].len = (uint32_t)len;
    memcpy(r->mc[i].m, method, len);
    r->mc_count++;
}

/* ------------------------------------------------------------ JSON */

/* The method of an RpcRequest payload, when the loop may route it: the
 * payload is a JSON object (RFC 8259) within these limits, else the Python
 * relay decides (and answers bad_request where it is not JSON):
 * - ASCII only (no byte >= 0x7F), no \u escape;
 * - numbers without exponent, at most BLIN_ROUTE_DIGITS_MAX digits before
 *   and after the point; nesting at most BLIN_ROUTE_DEPTH_MAX;
 * - a top-level key "method" exactly once (written without escapes), whose
 *   value is a string of 1 to BLIN_ROUTE_METHOD_MAX bytes without escapes.
 * What passes, msgspec decodes to a dict whose "method" is these bytes. */

static size_t skip_ws(const uint8_t *p, size_t n, size_t i)
{
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
        i++;
    return i;
}

/* The string at p[i] == '"': the index past its closing quote, 0 if invalid. */
static size_t skip_string(const uint8_t *p, size_t n, size_t i, int *escaped)
{
    *escaped = 0;
    for (i++; i < n; i++) {
        uint8_t c = p[i];
        if (c == '"')
            return i + 1;
        if (c < 0x20 || c >= 0x7F)
            return 0;
        if (c == '\\') {
            if (i + 1 >= n || !strchr("\"\\/bfnrt", p[i + 1]) || p[i + 1] == 0)
                return 0;
            *escaped = 1;
            i++;
        }
    }
    return 0;
}

static size_t skip_digits(const uint8_t *p, size_t n, size_t i, int *count)
{
    *count = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        i++;
        (*count)++;
    }
    return i;
}

static size_t skip_number(const uint8_t *p, size_t n, size_t i)
{
    int d;

    if (i < n && p[i] == '-')
        i++;
    if (i >= n || p[i] < '0' || p[i] > '9')
        return 0;
    if (p[i] == '0')
        i++;
    else {
        i = skip_digits(p, n, i, &d);
        if (d > BLIN_ROUTE_DIGITS_MAX)
            return 0;
    }
    if (i < n && p[i] == '.') {
        i = skip_digits(p, n, i + 1, &d);
        if (d == 0 || d > BLIN_ROUTE_DIGITS_MAX)
            return 0;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E'))
        return 0;
    return i;
}

static size_t skip_literal(const uint8_t *p, size_t n, size_t i, const char *word)
{
    size_t len = strlen(word);
    return n - i >= len && memcmp(p + i, word, len) == 0 ? i + len : 0;
}

int blin_route_method(const uint8_t *p, size_t n, size_t *off, size_t *len)
{
    uint8_t stack[BLIN_ROUTE_DEPTH_MAX];
    int depth = 1, escaped, found = 0;
    size_t i = skip_ws(p, n, 0), j, m_off = 0, m_len = 0;

    if (i >= n || p[i] != '{')
        return 0;
    stack[0] = '{';
    i = skip_ws(p, n, i + 1);
    if (i < n && p[i] == '}')
        return 0; /* {}: no method */
    for (;;) {
        /* at a member of an object (key first) or an element of an array */
        if (stack[depth - 1] == '{') {
            int is_method;

            if (i >= n || p[i] != '"')
                return 0;
            j = skip_string(p, n, i, &escaped);
            if (j == 0)
                return 0;
            is_method = depth == 1 && !escaped && j - i == 8 && memcmp(p + i + 1, "method", 6) == 0;
            i = skip_ws(p, n, j);
            if (i >= n || p[i] != ':')
                return 0;
            i = skip_ws(p, n, i + 1);
            if (is_method) {
                if (found || i >= n || p[i] != '"')
                    return 0;
                j = skip_string(p, n, i, &escaped);
                if (j == 0 || escaped || j - i - 2 == 0 || j - i - 2 > BLIN_ROUTE_METHOD_MAX)
                    return 0;
                found = 1;
                m_off = i + 1;
                m_len = j - i - 2;
                i = j;
                goto after_value;
            }
        }
        if (i >= n)
            return 0;
        switch (p[i]) {
        case '{':
        case '[':
            if (depth == BLIN_ROUTE_DEPTH_MAX)
                return 0;
            stack[depth++] = p[i];
            i = skip_ws(p, n, i + 1);
            if (i < n && p[i] == (stack[depth - 1] == '{' ? '}' : ']')) {
                depth--;
                i++;
                goto after_value;
            }
            continue;
        case '"':
            j = skip_string(p, n, i, &escaped);
            break;
        case 't':
            j = skip_literal(p, n, i, "true");
            break;
        case 'f':
            j = skip_literal(p, n, i, "false");
            break;
        case 'n':
            j = skip_literal(p, n, i, "null");
            break;
        default:
            j = skip_number(p, n, i);
            break;
        }
        if (j == 0)
            return 0;
        i = j;
    after_value:
        for (;;) {
            i = skip_ws(p, n, i);
            if (i >= n)
                return 0;
            if (p[i] == ',') {
                i = skip_ws(p, n, i + 1);
                break;
            }
            if (p[i] != (stack[depth - 1] == '{' ? '}' : ']'))
                return 0;
            depth--;
            i++;
            if (depth == 0) {
                if (skip_ws(p, n, i) != n || !found)
                    return 0;
                *off = m_off;
                *len = m_len;
                return 1;
            }
        }
    }
}

/* ------------------------------------------------------------ the loop */

/* Room for len more bytes of slot's output; NULL when out of memory. */
static uint8_t *out_room(blin_router_t *r, int32_t slot, size_t len)
{
    outbuf_t *o = &r->slots[slot].out;

    if (o->cap - o->len < len) {
        size_t cap = o->cap ? o->cap : 4096;
        uint8_t *grown;

        while (cap - o->len < len)
            cap *= 2;
        grown = realloc(o->data, cap);
        if (grown == NULL)
            return NULL;
        o->data = grown;
        o->cap = cap;
    }
    if (o->len == 0) {
        blin_out_t *e = &r->outs[r->nout++];
        e->slot = slot;
    }
    return o->data + o->len;
}

static void out_commit(blin_router_t *r, int32_t slot, size_t len)
{
    r->slots[slot].out.len += len;
}

/* The last route's output was read: empty it (large buffers freed). */
static void out_reset(blin_router_t *r)
{
    size_t i;

    for (i = 0; i < r->nout; i++) {
        int32_t s = r->outs[i].slot;
        if (valid_slot(r, s)) {
            outbuf_t *o = &r->slots[s].out;
            o->len = 0;
            if (o->cap > OUT_KEEP) {
                free(o->data);
                o->data = NULL;
                o->cap = 0;
            }
        }
    }
    r->nout = 0;
}

static int forward(blin_router_t *r, int32_t slot, const uint8_t *p, size_t total, double deadline,
                   uint32_t extra)
{
    slot_t *s = &r->slots[slot], *d;
    size_t off, len;
    long at;
    int32_t dest;
    uint8_t *o;
    flight_t f;

    if (p[5] != T_RPC_REQUEST || blin_rd64(p + 12) == 0)
        return 0;
    if (!blin_route_method(p + BLIN_HEADER_SIZE, total - BLIN_HEADER_SIZE, &off, &len))
        return 0;
    at = mc_find(r, s->session, p + BLIN_HEADER_SIZE + off, len);
    if (at < 0)
        return 0;
    dest = r->mc[at].dest;
    if (!valid_slot(r, dest) || r->slots[dest].guest)
        return 0;
    if ((uint64_t)s->outstanding + extra >= s->max_inflight)
        return 0; /* the Python relay answers too_many_requests */
    if (fl_reserve(r) != 0 || (o = out_room(r, dest, total)) == NULL)
        return 0;
    d = &r->slots[dest];
    memcpy(o, p, total);
    f.id = d->next_id;
    f.origin_id = blin_rd64(p + 12);
    f.deadline = deadline;
    f.dest = dest;
    f.origin = slot;
    blin_wr64(o + 12, f.id);
    out_commit(r, dest, total);
    d->next_id = f.id == UINT64_MAX ? (BLIN_ROUTE_ID_BIT | 1) : f.id + 1;
    fl_insert(r, &f);
    s->outstanding++;
    return 1;
}

/* 1: answered or dropped (a late or unknown id), 0: not ours. */
static int answer(blin_router_t *r, int32_t slot, const uint8_t *p, size_t total, int *passed)
{
    uint64_t id = blin_rd64(p + 12);
    long at;
    flight_t f;
    uint8_t *o;

    *passed = 0;
    if ((p[5] != T_RPC_RESPONSE && p[5] != T_RPC_ERROR) || !(id & BLIN_ROUTE_ID_BIT))
        return 0;
    at = fl_find(r, slot, id);
    if (at < 0)
        return 1;
    f = r->fl[at];
    if ((o = out_room(r, f.origin, total)) == NULL)
        return 0;
    memcpy(o, p, total);
    blin_wr64(o + 12, f.origin_id);
    out_commit(r, f.origin, total);
    fl_delete(r, (size_t)at);
    r->slots[f.origin].outstanding--;
    *passed = 1;
    return 1;
}

size_t blin_route(blin_router_t *r, int32_t slot, const uint8_t *buf, size_t start, size_t end,
                  uint32_t max_payload, double deadline, uint32_t extra, blin_route_t *res)
{
    size_t pos = start;
    uint64_t frames = 0, forwarded = 0, answered = 0;

    out_reset(r);
    if (valid_slot(r, slot)) {
        int guest = r->slots[slot].guest;

        while (end - pos >= BLIN_HEADER_SIZE) {
            const uint8_t *p = buf + pos;
            size_t total;
            int passed;

            if (blin_check_header(p, BLIN_HEADER_SIZE, max_payload) != BLIN_OK)
                break;
            total = BLIN_HEADER_SIZE + (size_t)blin_rd32(p + 8);
            if (total > BLIN_ROUTE_FRAME_MAX || end - pos < total)
                break;
            if (guest) {
                if (!forward(r, slot, p, total, deadline, extra))
                    break;
                forwarded++;
            } else {
                if (!answer(r, slot, p, total, &passed))
                    break;
                answered += (uint64_t)passed;
            }
            pos += total;
            frames++;
        }
    }
    {
        size_t i;
        for (i = 0; i < r->nout; i++) {
            blin_out_t *e = &r->outs[i];
            e->data = r->slots[e->slot].out.data;
            e->len = r->slots[e->slot].out.len;
        }
    }
    res->frames = frames;
    res->forwarded = forwarded;
    res->answered = answered;
    res->nout = r->nout;
    res->outs = r->outs;
    return pos;
}

int blin_router_take(blin_router_t *r, int32_t dest, uint64_t id, int32_t *origin, uint64_t *origin_id)
{
    long at = valid_slot(r, dest) ? fl_find(r, dest, id) : -1;

    if (at < 0)
        return 0;
    *origin = r->fl[at].origin;
    *origin_id = r->fl[at].origin_id;
    fl_delete(r, (size_t)at);
    r->slots[*origin].outstanding--;
    return 1;
}

uint32_t blin_router_outstanding(const blin_router_t *r, int32_t slot)
{
    return valid_slot(r, slot) ? r->slots[slot].outstanding : 0;
}

size_t blin_router_count(const blin_router_t *r)
{
    return r->fl_count;
}

int blin_router_earliest(const blin_router_t *r, double *at)
{
    int found = 0;
    size_t i;

    for (i = 0; i < r->fl_cap; i++)
        if (r->fl[i].id != 0 && (!found || r->fl[i].deadline < *at)) {
            *at = r->fl[i].deadline;
            found = 1;
        }
    return found;
}
