/* The relay's RPC hot loop: plain C99, no Python.h.
 *
 * Owns, for one read batch of one peer, the frames that need no decision
 * from Python: a guest's RpcRequest whose method has a known handler (its id
 * rewritten to one of the handler's, the call remembered with its deadline),
 * and a host client's answer to such a call (its id rewritten back, to the
 * guest that asked). It stops at the first frame that is anything else; the
 * Python relay (vhubd/relay) handles that one and the rest of the batch, with
 * the same outcome for every frame. vhubd/_route_py.py is its twin.
 *
 * Peers are small integer slots. The ids this loop hands out have the top
 * bit set (BLIN_ROUTE_ID_BIT); the Python relay's own ids never do, so both
 * can allocate ids toward the same peer.
 */
#ifndef BLIN_ROUTE_H
#define BLIN_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#define BLIN_ROUTE_ID_BIT ((uint64_t)1 << 63)
#define BLIN_ROUTE_FRAME_MAX 65536u  /* larger frames go the Python way (a slice, no copy) */
#define BLIN_ROUTE_METHOD_MAX 64u    /* longer method names are not remembered */
#define BLIN_ROUTE_METHODS_MAX 4096u /* remembered methods; one more forgets them all */
#define BLIN_ROUTE_DEPTH_MAX 32      /* JSON nesting the loop accepts */
#define BLIN_ROUTE_DIGITS_MAX 15     /* digits of a JSON number's integer or fraction part */

typedef struct blin_router blin_router_t;

/* Output for one peer from the last blin_route call: valid until the next call. */
typedef struct {
    int32_t slot;
    const uint8_t *data;
    size_t len;
} blin_out_t;

typedef struct {
    uint64_t frames;    /* frames consumed */
    uint64_t forwarded; /* requests forwarded */
    uint64_t answered;  /* answers passed back */
    uint64_t nout;      /* entries of outs */
    const blin_out_t *outs;
} blin_route_t;

/* A call ended without an answer (its handler left, or its deadline passed). */
typedef struct {
    int32_t dest;
    int32_t origin;
    uint64_t id;        /* ours, on dest */
    uint64_t origin_id; /* the guest's */
} blin_call_t;

blin_router_t *blin_router_new(void);
void blin_router_free(blin_router_t *r);

/* A new slot (the lowest free one), or -1 when out of memory. */
int32_t blin_router_add(blin_router_t *r, int guest, uint32_t session, uint32_t max_inflight);

/* The slot's peer is gone: its calls in flight toward it end (listed by
 * blin_router_calls, in id order), the calls it made are forgotten (their
 * answers will be dropped), every remembered method is forgotten. Returns
 * the number listed. */
size_t blin_router_release(blin_router_t *r, int32_t slot);

/* Calls whose deadline is <= now end (listed, in (dest, id) order). */
size_t blin_router_expire(blin_router_t *r, double now);

/* The list filled by the last release or expire. */
const blin_call_t *blin_router_calls(const blin_router_t *r);

/* Remember that method (raw bytes) of session is served by slot dest. */
void blin_router_learn(blin_router_t *r, uint32_t session, const uint8_t *method, size_t len, int32_t dest);
void blin_router_forget(blin_router_t *r);

/* Route from buf[start:end] for slot: returns the offset of the first frame
 * left to the Python relay. extra: the slot's calls in flight that the Python
 * relay forwarded (they count toward max_inflight too). */
size_t blin_route(blin_router_t *r, int32_t slot, const uint8_t *buf, size_t start, size_t end,
                  uint32_t max_payload, double deadline, uint32_t extra, blin_route_t *res);

/* The call with id toward dest ends with an answer the Python relay passes
 * back itself (a frame the loop did not take): 1 and its origin, or 0 when
 * no such call is in flight (a late or unknown id). */
int blin_router_take(blin_router_t *r, int32_t dest, uint64_t id, int32_t *origin, uint64_t *origin_id);

uint32_t blin_router_outstanding(const blin_router_t *r, int32_t slot);
size_t blin_router_count(const blin_router_t *r);
/* 1 and the earliest deadline in flight in *at; 0 when nothing is in flight. */
int blin_router_earliest(const blin_router_t *r, double *at);

/* 1 and the method of a guest's RpcRequest payload when the loop may route
 * it (see route.c for the rules), else 0. Exposed for the twin's tests. */
int blin_route_method(const uint8_t *p, size_t n, size_t *off, size_t *len);

#endif
