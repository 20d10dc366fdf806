/*
 * The engine: the agent core's data plane.
 *
 * engine_api.h states the contract; docs/protocol.md sections 1 and 2 state
 * the bytes on the wire. A request travels:
 *
 *   accept -> read the frame -> validate it -> find the app -> pick a worker
 *          (or wait in the app's queue) -> take an idle worker connection
 *          or open one -> pump bytes both ways, stripping the response's
 *          record headers -> the end record -> close nginx's connection,
 *          keep the worker's -> end the session -> next queued request
 *
 * The files
 *   wire.h, frame.c, records.c  the pure parsers of the frame and the records
 *   loop.c         the thread: accepting, reading the frame, the timers
 *   session.c      the routing table, worker connections, sessions, pumping
 *   conn.c         connection records, buffers, the responses the engine makes
 *   events.c       the events for the policy
 *   http_head.c    generic workers: the frame as an HTTP/1.1 head (wire.h)
 *   fastpath.c     the engine's side of the fast path's shared table
 *                  (fastpath.h): publishing workers, the slow path's claims,
 *                  detaching, the tick's sweep, the stats nginx adds
 *   engine_api.c   engine_api.h: the calls the policy makes
 *   this header    what they share: the structs and the internal calls
 *
 * Worker connections are described in session.c; the loop, its cost and
 * its timers in loop.c.
 *
 * Locking
 *   One mutex guards everything. The loop holds it while it handles a batch
 *   of ready events (never while it sleeps in epoll_wait), and every API
 *   call holds it while it reads or changes the routing table. API calls do
 *   no socket I/O themselves: they note what the loop must do and write to
 *   the wake-up eventfd.
 *
 * Object lifetimes
 *   A connection that ends is closed at once (which also removes its sockets
 *   from epoll) but its memory is recycled only after the current batch of
 *   events, because a later event of the same batch may still point at it.
 *   The same holds for worker connections. A worker removed while requests
 *   are in flight keeps serving them to the end; its record is freed when
 *   its last session has ended and its last connection is closed.
 */
#ifndef AGENT_ENGINE_INTERNAL_H
#define AGENT_ENGINE_INTERNAL_H
/* Every engine file includes this header first: strerror_r() is then the
 * GNU one, which returns the message. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "fastpath.h"
#include "wire.h"

#define TICK_MS 100
#define REPLY_DETAIL_MAX 200       /* bytes of a name or reason quoted in a reply */
#define REFUSED_LOG_INTERVAL_MS 10000  /* at most one log line per this for refused peers */

/* The internal calls are for the engine's files only, not exported from
 * the extension module. */
#pragma GCC visibility push(hidden)

/* Events wait in two rings: log lines, which may be dropped, and the rest,
 * which may not. Entries are numbered from the first ever emitted, and a
 * ring's capacity is a power of two, so entry p lives in slot p & (cap - 1)
 * whatever the ring's size: that lets a worker or an app find its own
 * unread event and update it instead of adding another (see
 * emit_coalesced). order merges the two rings back into emission order. */
typedef struct {
    uint64_t order;
    agent_engine_event ev;
} ring_entry;

typedef struct {
    ring_entry *slots;
    uint32_t cap;
    uint64_t head;              /* number of the oldest unread entry */
    uint64_t tail;              /* number the next entry gets */
} event_ring;

/* A circular doubly linked list with a sentinel head. */
typedef struct list_link {
    struct list_link *prev;
    struct list_link *next;
} list_link;

#define CONTAINER_OF(ptr, type, member) ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* What an epoll event points at. */
typedef enum { EP_LISTENER, EP_WAKE, EP_CLIENT, EP_WORKER } endpoint_kind;

struct conn;
struct wconn;
typedef struct {
    endpoint_kind kind;
    struct conn *conn;          /* EP_CLIENT */
    struct wconn *wconn;        /* EP_WORKER */
} endpoint;

/* A complete HTTP response given by agent_engine_app_fail(). Shared by
 * every connection that is sending it, so that clearing the failure while
 * replies are under way frees it only after the last one. */
typedef struct {
    int refs;
    size_t length;
    char data[];
} shared_reply;

/* One of a worker's slots in the fast path's table (fastpath.c). */
typedef struct {
    int slot;
    uint32_t gen;
    bool engine_claimed;        /* the engine's own session holds its claim */
    bool watching;              /* an nginx claim is being timed against the request time limit */
    uint64_t claims_seen;       /* the slot's claims at the last sweep */
    uint64_t engine_claims;     /* claims the engine itself made since */
    uint64_t watch_claims;      /* claims when watch_since_ms was taken */
    int64_t watch_since_ms;
} fp_lane;

typedef struct worker {
    int pid;
    int app;
    int state;                  /* AGENT_WORKER_ACTIVE or _DETACHED */
    int concurrency;
    int sessions;
    bool removed;               /* no longer in the table; freed by its last session */
    uint64_t processed;
    int64_t last_used_ms;
    uint64_t last_use_seq;      /* finer than ms: orders workers for the LRU tie-break */
    struct sockaddr_un addr;
    socklen_t addr_len;
    /* A generic worker (agent_engine_worker_add_http): HTTP/1.1 on this
     * TCP address, one connection per request; never in the fast path. */
    bool http;
    struct sockaddr_in in_addr;
    struct worker *next_orphan; /* removed workers with sessions or connections left */
    uint64_t idle_event;        /* 1 + number of its last IDLE event, or 0 */
    list_link idle;             /* wconns carrying no request, most recently used first */
    int open;                   /* wconns open, idle or busy; at most concurrency */
    bool close_idle;            /* detached or removed: the loop must close its idle wconns */
    bool held;                  /* waits for the policy's check after a request (AGENT_NOTIFY_HOLD) */
    /* Its slots in the fast path's table (fastpath.c), when it has some:
     * lanes 0..fp_lanes-1 of one column (fastpath.h, "Lanes"). */
    int fp_lanes;               /* 0: no slot, the engine serves it alone */
    int fp_engine_lanes;        /* lanes the engine's own sessions hold */
    bool fp_failed;             /* a slot went FAILED: reported once, no more requests */
    bool fp_detached_seen;      /* its drain was reported (WORKER_IDLE) */
    fp_lane lane[AGENT_FP_LANES];
} worker;

/* A connection to a worker, kept across requests (docs/protocol.md §2). */
typedef struct wconn {
    endpoint ep;
    int fd;
    worker *worker;
    struct conn *conn;          /* the request it carries, or NULL when idle */
    list_link idle_link;        /* in worker->idle while idle */
    /* What the kernel last said about the socket (edge-triggered). */
    bool readable, writable, rdhup;
    uint64_t served;            /* requests it completed: a reused wconn has served > 0 */
    struct wconn *next_dead;
} wconn;

typedef struct app {
    int id;
    char *name;
    size_t name_len;
    int max_queue;
    uint32_t queue_timeout_ms;
    uint32_t request_time_ms;   /* a session running longer is cut off; 0: no limit */
    list_link queue;            /* conns in state CONN_QUEUED, oldest first */
    int queue_length;
    shared_reply *failure;      /* set: every request gets this response */
    bool needs_dispatch;        /* the loop must look at the queue (set by API calls) */
    struct app *next_removed;   /* removed apps whose queue the loop must answer */
    uint64_t queued_event;      /* 1 + number of its last QUEUED event, or 0 */
    unsigned notify;            /* AGENT_NOTIFY_* the policy wants for this app */
    uint64_t requests;
    uint64_t queue_full;
    uint64_t queue_timeouts;
    uint64_t request_timeouts;
    uint64_t failed;
    uint64_t duration_buckets[AGENT_DURATION_BUCKETS];  /* per bucket, see agent_app_durations */
    uint64_t duration_count;
    uint64_t duration_sum_us;
    /* Its row in the fast path's table (fastpath.c), when it has one. */
    uint32_t *fp_engine_queue;  /* the row's engine_queue, kept equal to queue_length */
    bool fp_row;                /* the row is this app's: fp_seen holds its counters at the last sweep */
    struct {
        uint64_t queue_full, queue_timeouts, request_timeouts, failed;
        uint64_t buckets[AGENT_DURATION_BUCKETS];
        uint64_t sum_us;
    } fp_seen;
} app;

typedef enum {
    CONN_READING_FRAME,         /* reading vars-size and vars from nginx */
    CONN_QUEUED,                /* complete frame, waiting in its app's queue */
    CONN_FORWARDING,            /* connected to a worker, pumping both ways */
    CONN_REPLYING,              /* sending a response the engine made */
    CONN_DONE                   /* closed; memory recycled after the batch */
} conn_state;

typedef struct conn {
    conn_state state;
    endpoint client_ep;
    int client_fd;
    wconn *wc;                  /* the worker connection while forwarding */
    list_link all_link;         /* every live connection, for agent_engine_stop() */
    list_link wait_link;        /* the reading list or its app's queue */
    bool in_wait_list;
    bool client_watched;        /* the nginx socket is in the epoll set */
    struct conn *next_free;

    /* What the kernel last said about nginx's socket (edge-triggered). */
    bool client_readable, client_writable, client_hup;
    /* The session with the worker (reset by begin_session). */
    bool upstream_closed;       /* the worker refuses request bytes; keep reading its answer */
    bool worker_closed;         /* end of file or an error on the wconn: nothing more will come */
    int worker_error;           /* errno of that error, or 0 for end of file */
    bool response_bytes;        /* a byte came from the worker, record headers included */
    bool response_started;      /* the payload began with "HTTP/1.1 ": bytes may go to nginx */
    bool malformed;             /* the worker's bytes are not a response in records */
    int upstream_error;         /* errno of the send that set upstream_closed */
    bool retried;               /* sent to a worker again already (may_replay) */
    bool draining;              /* nginx went away after the whole request was sent */
    uint64_t drained;           /* worker bytes read and dropped since (bounded: drain_max_bytes) */
    int64_t drain_started_ms;   /* when nginx went away (bounded: drain_max_ms) */
    bool long_response;         /* agent_long_responses or a tunnel: no request time limit; a departed client ends it */
    bool replayable;            /* the whole request is the frame in up: it can be sent again */
    bool http_head;             /* up holds the frame made an HTTP/1.1 head, for a generic worker */
    bool sent_any;              /* a request byte reached the worker in this session */
    uint32_t request_len;       /* bytes of the request held in up when replayable */
    record_decoder rec;         /* the response's records: rec.end, the end record came */

    /* nginx -> worker: the frame, then the body. */
    char *up;
    uint32_t up_cap, up_pos, up_len;
    uint32_t frame_size;        /* 4 + vars-size once known, else 0 */
    uint64_t body_remaining;    /* body bytes still to read from nginx */

    /* worker -> nginx */
    char *down;
    uint32_t down_cap, down_pos, down_len;

    int app_id;
    struct app *queued_in;      /* the app whose queue holds it (CONN_QUEUED) */
    worker *worker;
    int fp_lane;                /* the worker's lane the session holds (fastpath.c), or FP_NO_LANE */
    int64_t started_ms;
    int64_t frame_us;           /* when the frame was complete: durations and ages count from here */
    int64_t session_ms;         /* when the worker got it */
    int64_t queued_ms;

    /* A response the engine makes itself. */
    const char *reply;
    size_t reply_len, reply_pos;
    shared_reply *reply_shared;
    char reply_inline[640];

    /* For agent_engine_requests(), copied when the frame is complete.
     * They sit past the part conn_get() clears, so that a request pays
     * only for the bytes it copies; nothing reads them before. */
    char method[sizeof ((agent_request_info *)0)->method];
    char path[sizeof ((agent_request_info *)0)->path];
} conn;

struct agent_engine {
    agent_engine_config config;
    int epoll_fd;
    int wake_fd;
    int notify_fd;
    endpoint listener_ep;
    endpoint wake_ep;
    pthread_mutex_t lock;
    pthread_t thread;
    bool started;
    bool joined;
    bool stopping;
    bool accept_paused;         /* out of fds or memory: retry on the tick */
    uid_t peer_uids[AGENT_MAX_PEER_UIDS];  /* who may connect (agent_engine_allow_peers) */
    int npeer_uids;
    uint64_t refused_peers;     /* connections closed for their peer's uid */
    uint64_t refused_logged;    /* refused_peers when the last log line said so */
    int64_t refused_log_next_ms;  /* no refusal log line before this */
    int64_t now_ms;
    int64_t now_us;             /* the same instant, for durations */
    int64_t next_tick_ms;
    uint64_t use_seq;

    app **apps;                 /* indexed by app id */
    int apps_cap;
    app *removed_apps;
    worker **workers;
    int nworkers, workers_cap;
    worker *orphans;

    list_link all_conns;
    list_link reading_conns;    /* CONN_READING_FRAME, oldest first */
    conn *free_conns;
    int free_conns_count;
    conn *dead_conns;
    wconn *dead_wconns;         /* closed this batch; freed after it */
    char *free_buffers;         /* linked through their first bytes */
    int free_buffers_count;

    /* The fast path's shared table (fastpath.c), or NULL: not attached. */
    agent_fp_table *fp;
    uint32_t fp_pid;            /* getpid() at attach: the slow path's claims carry it */
    uint32_t fp_epoch;          /* the epoch this engine wrote */
    worker *fp_owner[AGENT_FP_SLOTS];  /* the worker each slot holds */
    bool fp_retry;              /* an open app's queue waits: dispatch is retried every ms */
    int64_t fp_retry_ms;

    event_ring events;          /* everything but log lines */
    event_ring logs;
    uint64_t event_order;
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static inline void list_init(list_link *head) { head->prev = head->next = head; }
static inline bool list_empty(const list_link *head) { return head->next == head; }

static inline void list_append(list_link *head, list_link *item)
{
    item->prev = head->prev;
    item->next = head;
    head->prev->next = item;
    head->prev = item;
}

static inline void list_prepend(list_link *head, list_link *item)
{
    item->next = head->next;
    item->prev = head;
    head->next->prev = item;
    head->next = item;
}

static inline void list_unlink(list_link *item)
{
    item->prev->next = item->next;
    item->next->prev = item->prev;
    item->prev = item->next = item;
}

static inline int64_t monotonic_ms(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail on Linux; the vDSO makes this cheap. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int64_t monotonic_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The loop's clock, read once per batch: ms for timeouts, us for
 * request durations, from one reading. */
static inline void engine_clock_read(agent_engine *e)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    e->now_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline void close_fd(int *fd)
{
    if (*fd >= 0) {
        /* close() of a socket can only fail with EINTR here, and Linux has
         * released the descriptor even then: never retry. */
        close(*fd);
        *fd = -1;
    }
}

/* Bumps an eventfd; an eventfd write fails only when the counter would
 * overflow, which cannot happen with increments of one that are drained. */
static inline void eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof one);
    (void)n;
}

static inline void eventfd_drain(int fd)
{
    uint64_t value;
    ssize_t n = read(fd, &value, sizeof value);  /* EAGAIN: already drained */
    (void)n;
}

/* ------------------------------------------------------------------------ */
/* events.c: events for the policy                                          */

bool events_init(agent_engine *e);
void events_free(agent_engine *e);
int events_take(agent_engine *e, agent_engine_event *out, int max);
void emit(agent_engine *e, int type, int app_id, int pid, int64_t value, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
void emit_coalesced(agent_engine *e, uint64_t *last, int type, int app_id, int pid, int64_t value);

/* ------------------------------------------------------------------------ */
/* conn.c: connection records, buffers, responses the engine makes          */

char *buffer_get(agent_engine *e);
void buffer_put(agent_engine *e, char *buf, uint32_t cap);
conn *conn_get(agent_engine *e);
void conn_leave_wait_list(conn *c);
void unwatch_and_close(agent_engine *e, int *fd);
void close_client(agent_engine *e, conn *c);
void conn_release(agent_engine *e, conn *c);
void recycle_dead_conns(agent_engine *e);
void conn_pools_free(agent_engine *e);
bool watch_client(agent_engine *e, conn *c);
void record_duration(agent_engine *e, const conn *c);
void shared_reply_release(shared_reply **r);
void start_reply(agent_engine *e, conn *c, const char *data, size_t len, shared_reply *shared);
void continue_reply(agent_engine *e, conn *c);
void reply_text(agent_engine *e, conn *c, int status, const char *reason, bool retry_after,
                const char *detail_fmt, ...) __attribute__((format(printf, 6, 7)));

/* ------------------------------------------------------------------------ */
/* session.c: the routing table, worker connections, sessions               */

app *app_by_id(agent_engine *e, int id);
app *app_by_name(agent_engine *e, const char *name, size_t len);
int worker_index(agent_engine *e, int pid);
void app_free(app *a);
void worker_close_idle(agent_engine *e, worker *w);
void idle_check(agent_engine *e, wconn *wc);
void end_session(agent_engine *e, conn *c, bool counted, bool reusable);
void route(agent_engine *e, app *a, conn *c, bool at_head);
void dispatch_queue(agent_engine *e, app *a);
void answer_queue_with_failure(agent_engine *e, app *a);
void pump(agent_engine *e, conn *c);
void drain_abandon(agent_engine *e, conn *c, const char *why);

/* Keeps the app's fast path row's engine_queue current (fastpath.h). */
static inline void app_queue_note(app *a)
{
    if (a->fp_engine_queue)
        __atomic_store_n(a->fp_engine_queue, (uint32_t)a->queue_length, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------------ */
/* fastpath.c: the engine's side of the fast path's table                   */

int fp_attach(agent_engine *e, const char *path, int nginx_uid);
void fp_detach_table(agent_engine *e);
void fp_publish(agent_engine *e, worker *w);
void fp_unpublish(agent_engine *e, worker *w);
#define FP_NO_LANE (-1)         /* fp_claim: the session runs without a slot */
#define FP_REFUSED (-2)         /* fp_claim: nginx holds what the engine could take */
bool fp_available(const agent_engine *e, const worker *w);
int fp_claim(agent_engine *e, worker *w);
void fp_release(agent_engine *e, worker *w, int lane, bool failed);
void fp_detach(agent_engine *e, worker *w);
int fp_nginx_lanes(const agent_engine *e, const worker *w);
void fp_spare_update(agent_engine *e, const app *a);
void fp_sessions_changed(agent_engine *e, const worker *w);
void fp_app_update(agent_engine *e, app *a);
void fp_app_removed(agent_engine *e, app *a);
uint32_t fp_waiting(const agent_engine *e, const app *a);
void fp_sweep(agent_engine *e);
void fp_retry_dispatch(agent_engine *e);
int fp_requests(agent_engine *e, agent_request_info *out, int n, int max, int64_t now_ms);

/* ------------------------------------------------------------------------ */
/* loop.c: the thread                                                       */

void *engine_loop(void *arg);
void close_all_connections(agent_engine *e);

#pragma GCC visibility pop
#endif
