/*
 * fastpath.h: the fast path's shared table (docs/protocol.md section 5).
 *
 * nginx's workers hand a request straight to an idle app worker: they claim
 * the worker's slot in this table with one compare-and-swap, keep one
 * connection per worker, send the frame and read the records to the end
 * record themselves. The agent core's engine is off that path; it publishes
 * the slots, takes workers out, and sweeps the table once per tick. Requests
 * that find the fast path closed (no serving worker yet, a start failure,
 * an app the table does not list) go to agent.sock as before.
 *
 * The file is <instance>/fastpath.table. nginx's master creates it before it
 * forks its workers (owned by nginx's worker user, mode 0600) and every
 * worker inherits the mapping; the engine opens it by path and maps it too.
 * App workers never run as nginx's worker user nor as root, so they cannot
 * open it: their only way back is the record stream, which nginx parses as
 * untrusted bytes.
 *
 * Who writes what. Each field has one writer, named beside it; the state
 * word is changed only by compare-and-swap, by the transitions listed below.
 * The engine reads everything nginx writes as untrusted input: a value out
 * of range marks the slot FAILED, counters are taken as clamped deltas. nginx
 * trusts what the engine writes as much as it trusts agent.sock's answers.
 *
 * Lanes. A worker that serves N requests at once (threads, ASGI) gets
 * min(N, AGENT_FP_LANES) slots, lanes 0..L-1 of one column: each slot is
 * one request's place in the worker, claimed and released as a worker of
 * one request is. nginx claims the first IDLE slot in index order, so it
 * meets the first lane of every worker before any second lane: requests
 * spread over the workers. Workers of one request take single slots from
 * the first row; workers with lanes take columns from the last. The rest
 * of a worker's concurrency (N - L, or all of it when the table has no
 * room) belongs to the engine; the app row's engine_spare says how many
 * requests the engine could start now, and nginx that finds no IDLE slot
 * sends the request to agent.sock while it is not zero.
 *
 * Fixed layout, no pointers. Integers are native (both sides run on this
 * machine). Shared by the engine (csrc/) and the nginx module: plain C, no
 * includes beyond <stdint.h>.
 */
#ifndef AGENT_FASTPATH_H
#define AGENT_FASTPATH_H

#include <stdint.h>

#define AGENT_FP_MAGIC          0x50464741u   /* "AGFP" */
#define AGENT_FP_VERSION        2u
#define AGENT_FP_FILE           "fastpath.table"
#define AGENT_FP_WAKE_DIR       "wake"        /* <instance>/wake/<pid>: nginx workers' wake-up sockets */

#define AGENT_FP_APPS           64            /* app rows; an engine app id >= this has no row */
#define AGENT_FP_COLUMNS        16            /* the slots are a grid: column c, lane l is slot l * COLUMNS + c */
#define AGENT_FP_LANES          128           /* lanes per column: the most slots one worker gets */
#define AGENT_FP_SLOTS          (AGENT_FP_COLUMNS * AGENT_FP_LANES)
#define AGENT_FP_PROCS          64            /* nginx process rows */
#define AGENT_FP_NAME_MAX       128           /* bytes of an app's name */
#define AGENT_FP_SOCKET_MAX     48            /* a worker socket's file name in workers/, NUL-terminated */
#define AGENT_FP_METHOD_MAX     16            /* display only */
#define AGENT_FP_URI_MAX        128           /* display only */
#define AGENT_FP_DURATION_BUCKETS 12          /* as AGENT_DURATION_BUCKETS in engine_api.h */

/*
 * A slot's state word (64 bits, compare-and-swap only):
 *
 *     bits 0-3    kind (AGENT_FP_FREE ...)
 *     bits 4-7    flags (AGENT_FP_DETACH, AGENT_FP_TIMED_OUT, AGENT_FP_UNTIMED)
 *     bits 8-31   pid: the claimant while CLAIMED, else 0
 *     bits 32-63  generation: which worker the slot holds
 *
 * The generation is new for every worker the engine publishes (taken from
 * the header's counter, which survives core restarts), so a claim or a
 * release names the worker it meant and can never act on a successor that
 * reuses the slot.
 *
 * Transitions:
 *   engine  FREE -> IDLE                publish a serving worker (new generation)
 *   engine  IDLE -> DETACHED            take a worker out
 *   engine  CLAIMED -> CLAIMED|DETACH   take out a claimed worker: its claimant's release stores DETACHED
 *   engine  IDLE -> CLAIMED(core pid)   the engine's own queue (the slow path) takes the worker
 *   engine  CLAIMED(core pid) -> IDLE   and gives it back
 *   engine  any -> FAILED               sweep: a claimant that no longer exists, a claim held past the
 *                                       request time limit, a value outside this list
 *   engine  DETACHED, FAILED -> FREE    the worker is gone from the engine
 *   nginx   IDLE -> CLAIMED(own pid)    a claim
 *   nginx   CLAIMED(own pid) -> CLAIMED(own pid)|UNTIMED
 *                                       the request became a tunnel (the worker answered 101): it
 *                                       holds the slot as long as the client and the app keep it,
 *                                       and the request time limit does not apply
 *   nginx   CLAIMED(own pid) -> IDLE, DETACHED (DETACH set) or FAILED (the worker failed, or the
 *                                       request passed its time limit: FAILED|TIMED_OUT)
 *   nginx   CLAIMED(own pid) kept       the release hands the worker to a request waiting in the
 *                                       same nginx process: no store at all, claims += 1 (never
 *                                       from an UNTIMED claim)
 */
#define AGENT_FP_FREE           0u
#define AGENT_FP_IDLE           1u
#define AGENT_FP_CLAIMED        2u
#define AGENT_FP_DETACHED       3u
#define AGENT_FP_FAILED         4u

#define AGENT_FP_KIND_MASK      0x0fu
#define AGENT_FP_DETACH         0x10u
#define AGENT_FP_TIMED_OUT      0x20u
#define AGENT_FP_UNTIMED        0x40u
#define AGENT_FP_FLAG_MASK      0xf0u
#define AGENT_FP_PID_SHIFT      8
#define AGENT_FP_PID_MAX        0xffffffu

static inline uint64_t agent_fp_word(uint32_t kind, uint32_t flags, uint32_t pid, uint32_t generation)
{
    return (uint64_t)generation << 32 | (uint64_t)(pid & AGENT_FP_PID_MAX) << AGENT_FP_PID_SHIFT
           | (flags & AGENT_FP_FLAG_MASK) | (kind & AGENT_FP_KIND_MASK);
}
static inline uint32_t agent_fp_kind(uint64_t w) { return (uint32_t)w & AGENT_FP_KIND_MASK; }
static inline uint32_t agent_fp_flags(uint64_t w) { return (uint32_t)w & AGENT_FP_FLAG_MASK; }
static inline uint32_t agent_fp_pid(uint64_t w) { return (uint32_t)(w >> AGENT_FP_PID_SHIFT) & AGENT_FP_PID_MAX; }
static inline uint32_t agent_fp_generation(uint64_t w) { return (uint32_t)(w >> 32); }

/* One compare-and-swap on a state word; on failure *expected holds the word seen. */
static inline int agent_fp_cas(uint64_t *word, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(word, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t agent_fp_load(const uint64_t *word)
{
    return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}

typedef struct {
    uint32_t magic;             /* master: AGENT_FP_MAGIC */
    uint32_t version;           /* master: AGENT_FP_VERSION */
    uint32_t size;              /* master: sizeof(agent_fp_table) */
    uint32_t epoch;             /* engine: +1 each time a core starts serving; 0: none has */
    uint32_t engine_pid;        /* engine: the core serving the table (claims of the slow path carry it) */
    uint32_t generations;       /* engine: the last generation given to a worker */
    uint32_t slots_used;        /* engine: every slot in use is below this */
    uint32_t reserved[9];
} agent_fp_header;

typedef struct {
    uint32_t open;              /* engine: 1 while nginx may claim this app's workers */
    uint32_t name_len;          /* engine */
    char name[AGENT_FP_NAME_MAX];  /* engine: the app's name (AGENT_APP of its frames) */
    uint32_t max_queue;         /* engine: 0 unbounded */
    uint32_t queue_timeout_ms;  /* engine */
    uint32_t request_time_ms;   /* engine: 0 no limit */
    uint32_t engine_queue;      /* engine: requests in the engine's queue; nginx then releases to IDLE */
    uint32_t waiting;           /* nginx: requests waiting in every nginx process, raised by CAS below max_queue */
    uint32_t engine_spare;      /* engine: requests its workers could start now without a slot (Lanes, above) */
    /* nginx: what it answered itself or measured, for the status (atomic adds;
     * the engine takes clamped deltas) */
    uint64_t queue_full;        /* 503 */
    uint64_t queue_timeouts;    /* 504 after waiting */
    uint64_t request_timeouts;  /* the request time limit ended it */
    uint64_t failed;            /* 502: the worker failed before a byte of the response */
    uint64_t duration_buckets[AGENT_FP_DURATION_BUCKETS];  /* bounds as agent_app_durations */
    uint64_t duration_sum_us;
} agent_fp_app;

typedef struct {
    uint64_t word;              /* state word, above */
    uint32_t app;               /* engine: app row index */
    uint32_t worker_pid;        /* engine */
    char socket[AGENT_FP_SOCKET_MAX];  /* engine: file name in <instance>/workers/ */
    uint64_t claims;            /* nginx and engine: +1 per request the worker was given (atomic add) */
    uint64_t claim_ms;          /* claimant: CLOCK_MONOTONIC ms when the current request began */
    char method[AGENT_FP_METHOD_MAX];  /* claimant: display only, never parsed */
    char uri[AGENT_FP_URI_MAX];        /* claimant: display only, never parsed */
    uint8_t pad[256 - 8 - 8 - AGENT_FP_SOCKET_MAX - 16 - AGENT_FP_METHOD_MAX - AGENT_FP_URI_MAX];
} agent_fp_slot;

typedef struct {
    uint32_t pid;               /* nginx: CAS 0 -> own pid at start, back to 0 at exit; engine clears a dead one */
    uint32_t pad;
    uint32_t waiting[AGENT_FP_APPS];    /* nginx: this process's waiting requests per app row */
    uint64_t oldest_ms[AGENT_FP_APPS];  /* nginx: when its oldest waiting request began to wait; 0 none */
} agent_fp_proc;

typedef struct {
    agent_fp_header header;
    agent_fp_app apps[AGENT_FP_APPS];
    agent_fp_slot slots[AGENT_FP_SLOTS];
    agent_fp_proc procs[AGENT_FP_PROCS];
} agent_fp_table;

#endif
