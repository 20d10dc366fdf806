/*
 * The engine: the agent core's data plane.
 *
 * engine_api.h states the contract; docs/protocol.md sections 1 and 2 state
 * the bytes on the wire. This file is organised in the order a request
 * travels through it:
 *
 *   accept -> read the frame -> validate it -> find the app -> pick a worker
 *          (or wait in the app's queue) -> take an idle worker connection
 *          or open one -> pump bytes both ways, stripping the response's
 *          record headers -> the end record -> close nginx's connection,
 *          keep the worker's -> end the session -> next queued request
 *
 * Worker connections
 *   A worker connection (wconn) outlives the requests it carries: each
 *   worker keeps a list of idle ones, and has at most its concurrency open.
 *   A wconn is registered with epoll once, when it is opened. It is closed
 *   instead of reused when its request did not end cleanly (see
 *   response_complete), and when it turns readable while idle: the worker
 *   closed it, or sent bytes nobody asked for.
 *
 * The loop
 *   One thread waits in epoll_wait() on the listening socket (level-
 *   triggered: one accept per wake-up), a wake-up eventfd and the
 *   connections' sockets. Each connection socket is registered at most once,
 *   edge-triggered, for both directions, so that no epoll_ctl(MOD) call is
 *   ever needed: the connection remembers what the kernel last said about
 *   each socket (readable, writable, peer closed) and forgets "readable" or
 *   "writable" only when a call returns EAGAIN. All work on a connection is
 *   done by one function per state, which makes as much progress as those
 *   flags allow. nginx's socket is registered only when the engine has to
 *   wait for it (see watch_client), which a quick request never does.
 *
 * Cost
 *   A hello-world request on a kept worker connection costs the loop 7
 *   system calls: accept4, read (the frame), send (the frame), epoll_wait,
 *   read (the response and its end record), send (the response), close
 *   (nginx's connection), and a share of epoll_wait for the accept. No
 *   allocation, no log, and the worker is woken only by the frame.
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
 *
 * Timers
 *   There is no timer per request. Every TICK_MS the loop scans the
 *   connections still sending their frame (frame timeout), the queues
 *   (queue timeout) and the sessions (see watch_client); the clock is read
 *   once per batch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

#define DEFAULT_MAX_FRAME_SIZE (1u << 20)
#define DEFAULT_IO_BUFFER_SIZE (64u << 10)
#define MIN_IO_BUFFER_SIZE 1024u
#define DEFAULT_FRAME_TIMEOUT_MS 60000u
#define TICK_MS 100
#define EVENTS_PER_WAIT 256
#define EVENT_RING_INITIAL 1024u   /* events other than log lines; grows */
#define EVENT_RING_MAX 65536u      /* beyond this the oldest event is dropped */
#define LOG_RING_SIZE 4096u        /* log lines; the oldest is dropped when full */
#define MAX_APP_ID 65535
#define MAX_KEY_SIZE 1024u
#define FREE_BUFFERS_KEPT 256      /* idle buffers kept for reuse; more are freed */
#define FREE_CONNS_KEPT 1024
#define REPLY_DETAIL_MAX 200       /* bytes of a name or reason quoted in a reply */

/* ------------------------------------------------------------------------ */
/* Data structures                                                          */

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
    struct worker *next_orphan; /* removed workers with sessions or connections left */
    uint64_t idle_event;        /* 1 + number of its last IDLE event, or 0 */
    list_link idle;             /* wconns carrying no request, most recently used first */
    int open;                   /* wconns open, idle or busy; at most concurrency */
    bool close_idle;            /* detached or removed: the loop must close its idle wconns */
    bool held;                  /* waits for the policy's check after a request (AGENT_NOTIFY_HOLD) */
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
    bool response_end;          /* the end record came */
    bool malformed;             /* the worker's bytes are not a response in records */
    bool extra_bytes;           /* bytes came after the end record */
    int upstream_error;         /* errno of the send that set upstream_closed */
    bool retried;               /* sent to a worker again already (may_replay) */
    bool draining;              /* nginx went away after the whole request was sent */
    bool replayable;            /* the whole request is the frame in up: it can be sent again */
    uint32_t request_len;       /* bytes of the request held in up when replayable */
    /* The record being read: its header bytes so far, then its payload left. */
    uint8_t rec_have;
    unsigned char rec_header[4];
    uint32_t rec_left;

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

    event_ring events;          /* everything but log lines */
    event_ring logs;
    uint64_t event_order;
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static void list_init(list_link *head) { head->prev = head->next = head; }
static bool list_empty(const list_link *head) { return head->next == head; }

static void list_append(list_link *head, list_link *item)
{
    item->prev = head->prev;
    item->next = head;
    head->prev->next = item;
    head->prev = item;
}

static void list_prepend(list_link *head, list_link *item)
{
    item->next = head->next;
    item->prev = head;
    head->next->prev = item;
    head->next = item;
}

static void list_unlink(list_link *item)
{
    item->prev->next = item->next;
    item->next->prev = item->prev;
    item->prev = item->next = item;
}

static int64_t monotonic_ms(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail on Linux; the vDSO makes this cheap. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t monotonic_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The loop's clock, read once per batch: ms for timeouts, us for
 * request durations, from one reading. */
static void engine_clock_read(agent_engine *e)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    e->now_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Copies at most size - 1 bytes and always terminates, for a C string
 * made from a length-prefixed value. */
static void copy_truncated(char *dst, size_t size, const char *src, uint32_t len)
{
    size_t n = len < size - 1 ? len : size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static uint32_t read_be32(const void *p)
{
    const unsigned char *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static void close_fd(int *fd)
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
static void eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof one);
    (void)n;
}

static void eventfd_drain(int fd)
{
    uint64_t value;
    ssize_t n = read(fd, &value, sizeof value);  /* EAGAIN: already drained */
    (void)n;
}

/* ------------------------------------------------------------------------ */
/* Events for the policy                                                    */

static bool ring_empty(const event_ring *r) { return r->head == r->tail; }

static bool ring_init(event_ring *r, uint32_t cap)
{
    r->slots = malloc(sizeof *r->slots * cap);
    r->cap = cap;
    r->head = r->tail = 0;
    return r->slots != NULL;
}

/* Doubles a full ring; entries keep their numbers. */
static bool ring_grow(event_ring *r)
{
    if (r->cap >= EVENT_RING_MAX)
        return false;
    uint32_t cap = r->cap * 2;
    ring_entry *slots = malloc(sizeof *slots * cap);
    if (!slots)
        return false;
    for (uint64_t p = r->head; p < r->tail; p++)
        slots[p & (cap - 1)] = r->slots[p & (r->cap - 1)];
    free(r->slots);
    r->slots = slots;
    r->cap = cap;
    return true;
}

/* Appends an event and returns its number. A full log ring loses its
 * oldest line; the other ring grows, and loses its oldest event only past
 * EVENT_RING_MAX, which coalescing keeps out of reach (at most one IDLE
 * per worker and one QUEUED per app wait at any time). The notify
 * eventfd is bumped only when the first event starts waiting, so a burst
 * costs one write(). */
static uint64_t emit_event(agent_engine *e, const agent_engine_event *ev)
{
    bool was_empty = ring_empty(&e->events) && ring_empty(&e->logs);
    event_ring *r = ev->type == AGENT_EV_LOG ? &e->logs : &e->events;
    if (r->tail - r->head == r->cap && (r == &e->logs || !ring_grow(r)))
        r->head++;
    ring_entry *slot = &r->slots[r->tail & (r->cap - 1)];
    slot->order = e->event_order++;
    slot->ev = *ev;
    if (was_empty)
        eventfd_signal(e->notify_fd);
    return r->tail++;
}

static void emit(agent_engine *e, int type, int app_id, int pid, int64_t value, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static void emit(agent_engine *e, int type, int app_id, int pid, int64_t value, const char *fmt, ...)
{
    agent_engine_event ev = {.type = type, .app = app_id, .pid = pid, .value = value};
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ev.message, sizeof ev.message, fmt, ap);
        va_end(ap);
    }
    emit_event(e, &ev);
}

/* IDLE and QUEUED report a state (a worker is idle after N requests, a
 * queue is this long): while the previous one is unread it is updated in
 * place, so that a policy that polls late reads one event per worker or
 * app, not one per request. *last holds 1 + the event's number. */
static void emit_coalesced(agent_engine *e, uint64_t *last, int type, int app_id, int pid, int64_t value)
{
    if (*last && *last - 1 >= e->events.head) {
        agent_engine_event *ev = &e->events.slots[(*last - 1) & (e->events.cap - 1)].ev;
        if (ev->type == type && ev->app == app_id && ev->pid == pid) {
            ev->value = value;
            return;
        }
    }
    agent_engine_event ev = {.type = type, .app = app_id, .pid = pid, .value = value};
    *last = emit_event(e, &ev) + 1;
}

/* ------------------------------------------------------------------------ */
/* Buffers and connection records, recycled through free lists              */

static char *buffer_get(agent_engine *e)
{
    char *buf = e->free_buffers;
    if (buf) {
        memcpy(&e->free_buffers, buf, sizeof(char *));
        e->free_buffers_count--;
        return buf;
    }
    return malloc(e->config.io_buffer_size);
}

/* Buffers of another size (frames bigger than io_buffer_size) are freed. */
static void buffer_put(agent_engine *e, char *buf, uint32_t cap)
{
    if (!buf)
        return;
    if (cap != e->config.io_buffer_size || e->free_buffers_count >= FREE_BUFFERS_KEPT) {
        free(buf);
        return;
    }
    memcpy(buf, &e->free_buffers, sizeof(char *));
    e->free_buffers = buf;
    e->free_buffers_count++;
}

static conn *conn_get(agent_engine *e)
{
    conn *c = e->free_conns;
    if (c) {
        e->free_conns = c->next_free;
        e->free_conns_count--;
    } else if (!(c = malloc(sizeof *c))) {
        return NULL;
    }
    memset(c, 0, offsetof(conn, reply_inline));
    c->client_ep = (endpoint){EP_CLIENT, c, NULL};
    c->client_fd = -1;
    c->app_id = -1;
    list_init(&c->all_link);
    list_init(&c->wait_link);
    return c;
}

static void conn_leave_wait_list(agent_engine *e, conn *c)
{
    (void)e;
    if (!c->in_wait_list)
        return;
    if (c->queued_in) {
        c->queued_in->queue_length--;
        c->queued_in = NULL;
    }
    list_unlink(&c->wait_link);
    c->in_wait_list = false;
}

/* Takes fd out of the epoll set, then closes it. close() alone is not
 * enough: epoll forgets a socket only when its last descriptor closes, and
 * a worker being forked holds copies of every descriptor until it execs.
 * A socket closed here in that window would stay in the set and report its
 * hang-up through an endpoint that a new connection may already reuse. */
static void unwatch_and_close(agent_engine *e, int *fd)
{
    if (*fd >= 0 && epoll_ctl(e->epoll_fd, EPOLL_CTL_DEL, *fd, NULL) < 0 && errno != ENOENT)
        emit(e, AGENT_EV_LOG, -1, 0, errno, "epoll_ctl(EPOLL_CTL_DEL): %s", strerror(errno));
    close_fd(fd);
}

static void close_client(agent_engine *e, conn *c)
{
    if (c->client_watched)
        unwatch_and_close(e, &c->client_fd);
    else
        close_fd(&c->client_fd);
    c->client_watched = false;
}

/* Closes nginx's socket and hands the record to the end of the batch.
 * The session, if any, has been ended by the caller (end_session). */
static void conn_release(agent_engine *e, conn *c)
{
    if (c->state == CONN_DONE)
        return;
    conn_leave_wait_list(e, c);
    list_unlink(&c->all_link);
    close_client(e, c);
    buffer_put(e, c->up, c->up_cap);
    buffer_put(e, c->down, c->down_cap);
    c->up = c->down = NULL;
    if (c->reply_shared && --c->reply_shared->refs == 0)
        free(c->reply_shared);
    c->reply_shared = NULL;
    c->state = CONN_DONE;
    c->next_free = e->dead_conns;
    e->dead_conns = c;
}

/* Called once the batch that may still mention them is over. */
static void recycle_dead_conns(agent_engine *e)
{
    while (e->dead_wconns) {
        wconn *wc = e->dead_wconns;
        e->dead_wconns = wc->next_dead;
        free(wc);
    }
    while (e->dead_conns) {
        conn *c = e->dead_conns;
        e->dead_conns = c->next_free;
        if (e->free_conns_count >= FREE_CONNS_KEPT) {
            free(c);
            continue;
        }
        c->next_free = e->free_conns;
        e->free_conns = c;
        e->free_conns_count++;
    }
}

/* ------------------------------------------------------------------------ */
/* The routing table                                                        */

static app *app_by_id(agent_engine *e, int id)
{
    return (id >= 0 && id < e->apps_cap) ? e->apps[id] : NULL;
}

static app *app_by_name(agent_engine *e, const char *name, size_t len)
{
    for (int i = 0; i < e->apps_cap; i++) {
        app *a = e->apps[i];
        if (a && a->name_len == len && memcmp(a->name, name, len) == 0)
            return a;
    }
    return NULL;
}

static int worker_index(agent_engine *e, int pid)
{
    for (int i = 0; i < e->nworkers; i++)
        if (e->workers[i]->pid == pid)
            return i;
    return -1;
}

static void worker_touch(agent_engine *e, worker *w)
{
    w->last_used_ms = e->now_ms;
    w->last_use_seq = ++e->use_seq;
}

/* The app's active worker with a free slot and the fewest sessions; among
 * equals the one used least recently, so that idle workers take turns. */
static worker *pick_worker(agent_engine *e, int app_id)
{
    worker *best = NULL;
    for (int i = 0; i < e->nworkers; i++) {
        worker *w = e->workers[i];
        if (w->app != app_id || w->state != AGENT_WORKER_ACTIVE || w->held || w->sessions >= w->concurrency)
            continue;
        if (!best || w->sessions < best->sessions
            || (w->sessions == best->sessions && w->last_use_seq < best->last_use_seq))
            best = w;
    }
    return best;
}

static void shared_reply_release(shared_reply **r)
{
    if (*r && --(*r)->refs == 0)
        free(*r);
    *r = NULL;
}

static void app_free(app *a)
{
    shared_reply_release(&a->failure);
    free(a->name);
    free(a);
}

/* ------------------------------------------------------------------------ */
/* Responses the engine makes                                               */

/* The nginx socket joins the epoll set only when the engine must wait
 * for it: the frame is incomplete, the request is queued, a buffer is
 * full, or a session outlives a tick. A hello-world request, whose frame
 * is there at accept time and whose response fits the socket buffer,
 * never needs it, which saves an epoll_ctl() per request. Registering an
 * already ready socket reports it at once, so no edge is missed. */
static bool watch_client(agent_engine *e, conn *c)
{
    if (c->client_watched)
        return true;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->client_ep};
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_ADD, c->client_fd, &ev) < 0) {
        char text[128];
        emit(e, AGENT_EV_LOG, c->app_id, 0, errno, "epoll_ctl on an nginx connection: %s",
             strerror_r(errno, text, sizeof text));
        return false;
    }
    c->client_watched = true;
    return true;
}

/* Upper bounds of the duration buckets but the last (+Inf), in us. */
static const int64_t duration_bounds_us[AGENT_DURATION_BUCKETS - 1] = {
    5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
};

_Static_assert(sizeof ((agent_app_durations *)0)->buckets == AGENT_DURATION_BUCKETS * sizeof(uint64_t),
               "engine_api.h spells the bucket count out for cffi: keep it equal to AGENT_DURATION_BUCKETS");

/* The response to c ended for nginx: counts it in its app's histogram
 * (engine_api.h says which responses count). Both times come from the
 * loop's clock, read once per batch, so this costs no system call; the
 * scan is short because most requests stop at the first bucket or two. */
static void record_duration(agent_engine *e, const conn *c)
{
    app *a = app_by_id(e, c->app_id);
    if (!a)
        return;
    int64_t d = e->now_us - c->frame_us;  /* never negative: one monotonic clock, one thread */
    int i = 0;
    while (i < AGENT_DURATION_BUCKETS - 1 && d > duration_bounds_us[i])
        i++;
    a->duration_buckets[i]++;
    a->duration_count++;
    a->duration_sum_us += (uint64_t)d;
}

static void continue_reply(agent_engine *e, conn *c);

/* Starts sending a response held by the conn or shared by an app. Any
 * worker connection has been ended by the caller. */
static void start_reply(agent_engine *e, conn *c, const char *data, size_t len, shared_reply *shared)
{
    /* An answer for an app ends the request's duration now: the rest is
     * one send that the socket buffer takes whole. Without an app (a
     * malformed frame, an unknown app) there is no histogram to count in. */
    if (c->app_id >= 0)
        record_duration(e, c);
    conn_leave_wait_list(e, c);
    c->state = CONN_REPLYING;
    c->reply = data;
    c->reply_len = len;
    c->reply_pos = 0;
    if (shared) {
        shared->refs++;
        c->reply_shared = shared;
    }
    continue_reply(e, c);
}

/* "HTTP/1.1 <status> <reason>" with a text/plain body
 * "<status> <reason>: <detail>\n", as docs/protocol.md's table. */
static void reply_text(agent_engine *e, conn *c, int status, const char *reason, bool retry_after,
                       const char *detail_fmt, ...) __attribute__((format(printf, 6, 7)));

static void reply_text(agent_engine *e, conn *c, int status, const char *reason, bool retry_after,
                       const char *detail_fmt, ...)
{
    char detail[REPLY_DETAIL_MAX + 80];
    va_list ap;
    va_start(ap, detail_fmt);
    vsnprintf(detail, sizeof detail, detail_fmt, ap);
    va_end(ap);

    char body[sizeof detail + 64];
    int body_len = snprintf(body, sizeof body, "%d %s: %s\n", status, reason, detail);
    if (body_len < 0 || (size_t)body_len >= sizeof body)
        body_len = (int)strlen(body);
    int len = snprintf(c->reply_inline, sizeof c->reply_inline,
                       "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                       "Connection: close\r\n%s\r\n%s",
                       status, reason, body_len, retry_after ? "Retry-After: 1\r\n" : "", body);
    if (len < 0 || (size_t)len >= sizeof c->reply_inline)
        len = (int)strlen(c->reply_inline);  /* cannot happen: detail is bounded */
    start_reply(e, c, c->reply_inline, (size_t)len, NULL);
}

static void continue_reply(agent_engine *e, conn *c)
{
    while (c->reply_pos < c->reply_len) {
        ssize_t n = send(c->client_fd, c->reply + c->reply_pos, c->reply_len - c->reply_pos, MSG_NOSIGNAL);
        if (n > 0) {
            c->reply_pos += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            c->client_writable = false;  /* EPOLLOUT will bring us back */
            if (!watch_client(e, c))
                break;
            return;
        } else {
            break;  /* nginx went away: nothing left to tell it */
        }
    }
    conn_release(e, c);
}

/* A frame that cannot be one: answer 400, log why, close. */
static void reject_frame(agent_engine *e, conn *c, const char *why)
{
    emit(e, AGENT_EV_LOG, -1, 0, 0, "malformed request frame: %s", why);
    reply_text(e, c, 400, "Bad Request", false, "malformed request frame (%.*s)", REPLY_DETAIL_MAX, why);
}

/* ------------------------------------------------------------------------ */
/* Worker connections                                                       */

static void dispatch_queue(agent_engine *e, app *a);
static void pump(agent_engine *e, conn *c);

/* Frees a removed worker once no session and no connection refers to it. */
static void worker_free_if_unused(agent_engine *e, worker *w)
{
    if (!w->removed || w->sessions > 0 || w->open > 0)
        return;
    for (worker **p = &e->orphans; *p; p = &(*p)->next_orphan) {
        if (*p == w) {
            *p = w->next_orphan;
            break;
        }
    }
    free(w);
}

/* Closes a worker connection (which also takes it out of epoll) and hands
 * its memory to the end of the batch. It never frees the worker: callers
 * that may hold the last reference call worker_free_if_unused after, so
 * that a walk over the worker's idle list never outlives the worker. */
static void wconn_close(agent_engine *e, wconn *wc)
{
    if (wc->fd < 0)
        return;
    list_unlink(&wc->idle_link);  /* a no-op when it is not idle: the link points at itself */
    unwatch_and_close(e, &wc->fd);  /* always in the epoll set */
    wc->worker->open--;
    wc->conn = NULL;
    wc->next_dead = e->dead_wconns;
    e->dead_wconns = wc;
}

static void worker_close_idle(agent_engine *e, worker *w)
{
    while (!list_empty(&w->idle))
        wconn_close(e, CONTAINER_OF(w->idle.next, wconn, idle_link));
}

/* An idle connection the kernel calls readable: the worker closed it
 * (either side may close an idle connection at any time), reset it, or
 * sent bytes nobody asked for; all end it. Only an empty socket (a stale
 * edge) keeps it, which costs one read that returns EAGAIN. */
static void idle_check(agent_engine *e, wconn *wc)
{
    worker *w = wc->worker;
    if (!wc->rdhup) {
        char byte;
        ssize_t n;
        do
            n = recv(wc->fd, &byte, 1, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EAGAIN) {
            wc->readable = false;
            return;
        }
        if (n > 0)
            emit(e, AGENT_EV_LOG, w->app, w->pid, 0, "worker pid %d sent bytes on an idle connection; closed it", w->pid);
    }
    wconn_close(e, wc);
    worker_free_if_unused(e, w);
}

/* Most recently used first: the connections used least age out when the
 * worker closes idle ones, and a hot one stays warm. */
static void wconn_make_idle(agent_engine *e, wconn *wc)
{
    list_prepend(&wc->worker->idle, &wc->idle_link);
    if (wc->readable)  /* the last read filled the buffer exactly: look once */
        idle_check(e, wc);
}

static wconn *worker_take_idle(worker *w)
{
    if (list_empty(&w->idle))
        return NULL;
    wconn *wc = CONTAINER_OF(w->idle.next, wconn, idle_link);
    list_unlink(&wc->idle_link);
    return wc;
}

enum connect_result { CONNECTED, WORKER_REFUSED, LOCAL_FAILURE };

/* Opens a connection to the worker. WORKER_REFUSED means nothing was sent
 * and the worker must be given up; LOCAL_FAILURE is the engine's own
 * shortage (fds, memory) and says nothing about the worker. */
static enum connect_result wconn_open(agent_engine *e, worker *w, wconn **out, int *err)
{
    wconn *wc = malloc(sizeof *wc);
    if (!wc) {
        *err = ENOMEM;
        return LOCAL_FAILURE;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        free(wc);
        return LOCAL_FAILURE;
    }
    int r;
    do
        r = connect(fd, (const struct sockaddr *)&w->addr, w->addr_len);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        *err = errno;
        close(fd);
        free(wc);
        return (*err == ENOMEM || *err == ENOBUFS) ? LOCAL_FAILURE : WORKER_REFUSED;
    }
    /* A fresh connection has room for the frame; the worker has said nothing. */
    *wc = (wconn){.ep = {EP_WORKER, NULL, wc}, .fd = fd, .worker = w, .writable = true};
    list_init(&wc->idle_link);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &wc->ep};
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        *err = errno;
        close(fd);
        free(wc);
        return LOCAL_FAILURE;
    }
    w->open++;
    *out = wc;
    return CONNECTED;
}

/* ------------------------------------------------------------------------ */
/* Sessions: a request being served by a worker                             */

/* Ends the session and settles the worker's counters. counted: the worker
 * served the request (it sent a response). reusable: the worker connection
 * sits at a clean boundary between requests and may carry the next one;
 * otherwise it is closed. */
static void end_session(agent_engine *e, conn *c, bool counted, bool reusable)
{
    worker *w = c->worker;
    wconn *wc = c->wc;
    c->wc = NULL;
    if (!w)
        return;
    c->worker = NULL;
    w->sessions--;
    if (counted)
        w->processed++;
    worker_touch(e, w);
    if (wc) {
        wc->conn = NULL;
        if (reusable)
            wc->served++;
        /* A worker that is not active gets no more requests, so it keeps no idle connection. */
        if (reusable && w->state == AGENT_WORKER_ACTIVE && !e->stopping && !wc->rdhup)
            wconn_make_idle(e, wc);
        else
            wconn_close(e, wc);
    }
    if (w->removed) {
        worker_free_if_unused(e, w);
        return;
    }
    app *a = app_by_id(e, w->app);
    if (counted && a && (a->notify & AGENT_NOTIFY_HOLD) && w->state == AGENT_WORKER_ACTIVE) {
        w->held = true;  /* until agent_engine_worker_release() */
        emit_coalesced(e, &w->idle_event, AGENT_EV_WORKER_IDLE, w->app, w->pid, (int64_t)w->processed);
    } else if (w->sessions == 0 && a && (a->notify & AGENT_NOTIFY_IDLE)) {
        emit_coalesced(e, &w->idle_event, AGENT_EV_WORKER_IDLE, w->app, w->pid, (int64_t)w->processed);
    }
    if (w->state == AGENT_WORKER_ACTIVE && !e->stopping) {
        if (a && a->queue_length > 0)
            dispatch_queue(e, a);
    }
}

static void worker_failed(agent_engine *e, worker *w, int err)
{
    char text[128];
    w->state = AGENT_WORKER_DETACHED;
    worker_close_idle(e, w);
    emit(e, AGENT_EV_WORKER_FAILED, w->app, w->pid, err, "cannot connect to worker pid %d at %s: %s",
         w->pid, w->addr.sun_path, strerror_r(err, text, sizeof text));
}

static void begin_session(agent_engine *e, conn *c, worker *w, wconn *wc)
{
    conn_leave_wait_list(e, c);
    c->state = CONN_FORWARDING;
    c->worker = w;
    c->wc = wc;
    wc->conn = c;
    w->sessions++;
    worker_touch(e, w);
    c->upstream_closed = c->worker_closed = c->response_bytes = false;
    c->response_started = c->response_end = c->malformed = c->extra_bytes = false;
    c->draining = false;
    c->session_ms = e->now_ms;
    c->upstream_error = c->worker_error = 0;
    c->rec_have = 0;
    c->rec_left = 0;
    c->down_pos = c->down_len = 0;
    if (c->replayable) {  /* from the start, also when sent again */
        c->up_pos = 0;
        c->up_len = c->request_len;
    }
    pump(e, c);
}

static void reply_local_failure(agent_engine *e, conn *c, app *a, int err)
{
    char text[128];
    a->failed++;
    emit(e, AGENT_EV_LOG, a->id, 0, err, "cannot forward a request of %s: %s", a->name,
         strerror_r(err, text, sizeof text));
    reply_text(e, c, 502, "Bad Gateway", false, "the agent cannot reach a worker (%s)",
               strerror_r(err, text, sizeof text));
}

static void enqueue(agent_engine *e, app *a, conn *c, bool at_head)
{
    if (!at_head && a->max_queue > 0 && a->queue_length >= a->max_queue) {
        a->queue_full++;
        reply_text(e, c, 503, "Service Unavailable", true, "request queue full");
        return;
    }
    if (!watch_client(e, c)) {  /* to drop it if nginx goes away */
        conn_release(e, c);
        return;
    }
    conn_leave_wait_list(e, c);
    c->state = CONN_QUEUED;
    if (!at_head)
        c->queued_ms = e->now_ms;
    if (at_head)
        list_prepend(&a->queue, &c->wait_link);
    else
        list_append(&a->queue, &c->wait_link);
    c->in_wait_list = true;
    c->queued_in = a;
    a->queue_length++;
    if (a->notify & AGENT_NOTIFY_QUEUED)
        emit_coalesced(e, &a->queued_event, AGENT_EV_QUEUED, a->id, 0, a->queue_length);
}

/* Hands a request to a worker of its app over an idle connection or a new
 * one, trying the next worker when one refuses the connection (the request
 * was not sent, so it is not lost), or queues it. at_head: it came from the
 * head of the queue. */
static void route(agent_engine *e, app *a, conn *c, bool at_head)
{
    if (a->failure) {
        start_reply(e, c, a->failure->data, a->failure->length, a->failure);
        return;
    }
    for (;;) {
        worker *w = pick_worker(e, a->id);
        if (!w) {
            enqueue(e, a, c, at_head);
            return;
        }
        if (!c->down && !(c->down = buffer_get(e))) {
            reply_local_failure(e, c, a, ENOMEM);
            return;
        }
        c->down_cap = e->config.io_buffer_size;
        /* No idle connection means every open one carries a session, and
         * pick_worker saw a free slot: opening one stays within concurrency. */
        wconn *wc = worker_take_idle(w);
        int err = 0;
        enum connect_result r = wc ? CONNECTED : wconn_open(e, w, &wc, &err);
        if (r == CONNECTED) {
            begin_session(e, c, w, wc);
            return;
        }
        if (r == LOCAL_FAILURE) {
            reply_local_failure(e, c, a, err);
            return;
        }
        worker_failed(e, w, err);
    }
}

/* Gives queued requests to free workers, oldest first. */
static void dispatch_queue(agent_engine *e, app *a)
{
    while (a->queue_length > 0 && !a->failure && !list_empty(&a->queue)) {
        if (!pick_worker(e, a->id))
            return;
        conn *c = CONTAINER_OF(a->queue.next, conn, wait_link);
        conn_leave_wait_list(e, c);
        route(e, a, c, true);
    }
}

/* Answers every queued request of a failed app with its stored response. */
static void answer_queue_with_failure(agent_engine *e, app *a)
{
    while (!list_empty(&a->queue)) {
        conn *c = CONTAINER_OF(a->queue.next, conn, wait_link);
        start_reply(e, c, a->failure->data, a->failure->length, a->failure);
    }
}

/* ------------------------------------------------------------------------ */
/* Ending a session                                                         */

/* nginx went away. A worker that has the whole request is still busy
 * with it: the session stays open, the rest of the response is read and
 * dropped, and the worker gets no other request until its end record
 * (otherwise a new request would wait behind the abandoned one, in the
 * worker's backlog, out of the engine's sight). A worker still owed body
 * bytes cannot finish cleanly: its connection is closed. */
static void client_aborted(agent_engine *e, conn *c)
{
    bool request_sent = !c->upstream_closed && c->body_remaining == 0 && c->up_pos == c->up_len;
    if (request_sent && !c->worker_closed && !c->malformed) {
        c->draining = true;
        close_client(e, c);
        c->down_pos = c->down_len = 0;
        return;
    }
    end_session(e, c, c->response_started, false);
    conn_release(e, c);
}

/* The end record came and nginx has every byte. Closing nginx's
 * connection ends the response for it; the worker connection is kept
 * when it sits at a clean boundary: the worker got the whole request, sent
 * nothing after the end record and did not close. */
static void response_complete(agent_engine *e, conn *c)
{
    bool clean = !c->upstream_closed && c->body_remaining == 0 && c->up_pos == c->up_len
                 && !c->extra_bytes && !c->worker_closed;
    if (c->extra_bytes)
        emit(e, AGENT_EV_LOG, c->worker->app, c->worker->pid, 0,
             "worker pid %d sent bytes after a response's end record; connection closed", c->worker->pid);
    if (!c->draining)  /* else nobody got the response */
        record_duration(e, c);
    close_client(e, c);
    end_session(e, c, true, clean);
    conn_release(e, c);
}

/* A worker that closes a connection without reading all that was sent on
 * it makes the kernel report a reset (or EPIPE to the next send). When the
 * request is the frame alone, the worker then never had all of it and
 * cannot have acted on it, so it is sent again, once, over another
 * connection. That covers the race of a worker closing an idle connection
 * just as the engine hands it a request. A plain end of file means the
 * worker read everything: never sent again. */
static bool may_replay(const conn *c)
{
    bool unread = c->worker_error == ECONNRESET || c->upstream_error == EPIPE || c->upstream_error == ECONNRESET;
    return unread && c->replayable && !c->retried && !c->response_bytes;
}

/* The worker's connection ended, or its bytes proved not to be records,
 * before the end record. Before a byte of the response went to nginx the
 * engine answers 502; after, nginx's connection is closed and nginx sees
 * the response cut off. */
static void response_failed(agent_engine *e, conn *c)
{
    worker *w = c->worker;
    int pid = w->pid, app_id = w->app;
    app *a = app_by_id(e, app_id);
    if (c->draining) {  /* nobody waits for the answer */
        end_session(e, c, true, false);
        conn_release(e, c);
        return;
    }
    if (a && may_replay(c)) {
        c->retried = true;
        end_session(e, c, false, false);
        c->queued_ms = e->now_ms;  /* should it wait, it waits from now, first in line */
        route(e, a, c, true);
        return;
    }
    if (c->malformed)
        emit(e, AGENT_EV_LOG, app_id, pid, 0, "worker pid %d sent bytes that are not response records; connection closed", pid);
    if (c->response_started) {
        emit(e, AGENT_EV_LOG, app_id, pid, c->worker_error, "worker pid %d closed a connection before the response's end record", pid);
        record_duration(e, c);  /* cut off, but nginx got a response */
        end_session(e, c, true, false);
        conn_release(e, c);
        return;
    }
    if (a)
        a->failed++;
    if (!c->malformed)
        emit(e, AGENT_EV_LOG, app_id, pid, c->worker_error, "worker pid %d closed a request's connection without responding", pid);
    end_session(e, c, false, false);
    reply_text(e, c, 502, "Bad Gateway", false, "the app worker (pid %d) failed before responding", pid);
}

/* ------------------------------------------------------------------------ */
/* Moving bytes                                                             */

/* nginx -> worker: the frame and body bytes held, then the rest of the
 * body, never more than one buffer. Returns true when a byte moved. */
static bool pump_request(agent_engine *e, conn *c, bool *aborted)
{
    wconn *wc = c->wc;
    bool moved = false;
    if (c->upstream_closed)
        return false;
    if (c->up_pos < c->up_len && wc->writable) {
        ssize_t n = send(wc->fd, c->up + c->up_pos, c->up_len - c->up_pos, MSG_NOSIGNAL);
        if (n > 0) {
            c->up_pos += (uint32_t)n;
            if (c->up_pos == c->up_len)
                c->up_pos = c->up_len = 0;
            moved = true;
        } else if (n < 0 && errno == EAGAIN) {
            wc->writable = false;
        } else if (!(n < 0 && errno == EINTR)) {
            /* The worker stopped reading (it may have answered early, e.g.
             * 413): drop the rest of the body and read what it said. */
            c->upstream_closed = true;
            c->upstream_error = n < 0 ? errno : 0;
            return false;
        }
    }
    if (c->body_remaining > 0 && c->up_len < c->up_cap && c->client_readable) {
        uint64_t room = c->up_cap - c->up_len;
        size_t want = (size_t)(room < c->body_remaining ? room : c->body_remaining);
        ssize_t n = read(c->client_fd, c->up + c->up_len, want);
        if (n > 0) {
            c->up_len += (uint32_t)n;
            c->body_remaining -= (uint64_t)n;
            moved = true;
        } else if (n < 0 && errno == EAGAIN) {
            c->client_readable = false;
            if (!watch_client(e, c))
                *aborted = true;
        } else if (!(n < 0 && errno == EINTR)) {
            *aborted = true;  /* nginx closed before the whole body */
        }
    }
    return moved;
}

/* Strips the record headers from the n bytes just read at down_len, so
 * that [down_pos, down_len) holds payload only. A header with no payload
 * waiting before it is skipped by moving down_pos past it, which is the
 * whole of the work for a response that comes in one read; payload after a
 * later header moves left over it.
 *
 * Any record length is valid: the protocol allows 1..2^32-1, and a worker
 * may send a large file as one record. So a stream is judged by what it
 * carries instead (check_status_line), and by what follows the end record:
 * nothing may, since the worker has no request to answer. Bytes that are
 * not records (a worker speaking another protocol: "HTTP" read as a length)
 * fail the status line check at once; anything subtler ends in an end of
 * file before the end record. */
static void take_records(conn *c, uint32_t n)
{
    char *in = c->down + c->down_len;
    char *end = in + n;
    char *out = in;
    while (in < end && !c->response_end) {
        if (c->rec_left > 0) {
            uint32_t k = (uint32_t)(end - in) < c->rec_left ? (uint32_t)(end - in) : c->rec_left;
            if (out != in)
                memmove(out, in, k);
            out += k;
            in += k;
            c->rec_left -= k;
            continue;
        }
        while (c->rec_have < 4 && in < end)
            c->rec_header[c->rec_have++] = (unsigned char)*in++;
        if (c->rec_have < 4)
            break;  /* the rest of the header comes with the next read */
        c->rec_have = 0;
        c->rec_left = read_be32(c->rec_header);
        c->response_end = c->rec_left == 0;
        if (out == c->down + c->down_pos) {
            out = in;
            c->down_pos = (uint32_t)(in - c->down);
        }
    }
    c->extra_bytes = in < end;
    c->down_len = (uint32_t)(out - c->down);
    if (c->down_pos == c->down_len)
        c->down_pos = c->down_len = 0;
}

/* The payload is an HTTP/1.1 response: nothing goes to nginx until its
 * first bytes say so, so that garbage from a worker gets the engine's 502
 * rather than reaching the client. */
static void check_status_line(conn *c)
{
    static const char prefix[] = "HTTP/1.1 ";
    const uint32_t prefix_len = sizeof prefix - 1;
    if (c->response_started || c->malformed)
        return;
    uint32_t have = c->down_len - c->down_pos;
    uint32_t k = have < prefix_len ? have : prefix_len;
    if (memcmp(c->down + c->down_pos, prefix, k) != 0)
        c->malformed = true;
    else if (k == prefix_len)
        c->response_started = true;
    else if (c->response_end)
        c->malformed = true;  /* shorter than a status line */
}

/* Reads from the worker once; false when nothing could be read. */
static bool read_response(conn *c)
{
    wconn *wc = c->wc;
    if (c->response_end || c->worker_closed || c->malformed || c->down_len >= c->down_cap || !wc->readable)
        return false;
    size_t want = c->down_cap - c->down_len;
    ssize_t n = read(wc->fd, c->down + c->down_len, want);
    if (n > 0) {
        c->response_bytes = true;
        /* A short read emptied the socket: the next byte brings a new edge,
         * so no read that only returns EAGAIN is needed. If the worker had
         * already shut its end when the kernel told us, nothing more can
         * come: skip the read that would only return 0. */
        if ((size_t)n < want) {
            if (wc->rdhup)
                c->worker_closed = true;
            else
                wc->readable = false;
        }
        take_records(c, (uint32_t)n);
        check_status_line(c);
        return true;
    }
    if (n == 0) {
        c->worker_closed = true;
    } else if (errno == EAGAIN) {
        wc->readable = false;
    } else if (errno != EINTR) {
        c->worker_closed = true;  /* reset by the worker: end as if closed */
        c->worker_error = errno;
    }
    return false;
}

/* worker -> nginx. Returns true when a byte moved. */
static bool pump_response(agent_engine *e, conn *c, bool *aborted)
{
    bool moved = read_response(c);
    if (c->draining) {
        c->down_pos = c->down_len = 0;  /* nobody to send it to */
        return moved;
    }
    if (c->response_started && c->down_pos < c->down_len && c->client_writable) {
        ssize_t n = send(c->client_fd, c->down + c->down_pos, c->down_len - c->down_pos, MSG_NOSIGNAL);
        if (n > 0) {
            c->down_pos += (uint32_t)n;
            if (c->down_pos == c->down_len)
                c->down_pos = c->down_len = 0;
            moved = true;
        } else if (n < 0 && errno == EAGAIN) {
            c->client_writable = false;
            if (!watch_client(e, c))
                *aborted = true;
        } else if (!(n < 0 && errno == EINTR)) {
            *aborted = true;  /* nginx went away */
        }
    }
    return moved;
}

/* Moves bytes both ways until neither side can make progress. */
static void pump(agent_engine *e, conn *c)
{
    for (;;) {
        bool aborted = c->client_hup && !c->draining;
        bool moved = pump_request(e, c, &aborted);
        moved |= pump_response(e, c, &aborted);
        if (aborted) {
            client_aborted(e, c);
            if (!c->draining)
                return;
            continue;
        }
        bool flushed = c->down_pos == c->down_len;
        if (c->response_end && !c->malformed && flushed) {
            response_complete(e, c);
            return;
        }
        /* Bytes of a cut-off response still go to nginx before it is closed. */
        if ((c->worker_closed || c->malformed) && (flushed || !c->response_started)) {
            response_failed(e, c);
            return;
        }
        if (!moved)
            return;
    }
}

/* ------------------------------------------------------------------------ */
/* Reading and validating the frame                                         */

typedef struct {
    const char *app;
    uint32_t app_len;
    const char *method, *uri;   /* for agent_engine_requests() */
    uint32_t method_len, uri_len;
    uint64_t content_length;
} frame_info;

static bool is_key_char(unsigned char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_';
}

static bool key_is(const char *key, uint32_t len, const char *name)
{
    size_t n = strlen(name);
    return len == n && memcmp(key, name, n) == 0;
}

static bool parse_decimal(const char *s, uint32_t len, uint64_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > 19)   /* 19 digits always fit in 64 bits */
        return false;
    for (uint32_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

enum { SEEN_APP = 1, SEEN_METHOD = 2, SEEN_URI = 4, SEEN_LENGTH = 8 };

/* Checks that the pairs fill vars exactly and the required keys are there.
 * On failure writes the reason to why and returns false. */
static bool parse_vars(const char *vars, uint32_t size, frame_info *out, char *why, size_t why_size)
{
    uint32_t pos = 0;
    unsigned pair = 0, seen = 0;
    const char *length_value = NULL;
    uint32_t length_len = 0;
    while (pos < size) {
        pair++;
        if (size - pos < 4)
            goto overrun;
        uint32_t klen = read_be32(vars + pos);
        pos += 4;
        if (klen == 0) {
            snprintf(why, why_size, "pair %u has an empty key", pair);
            return false;
        }
        if (klen > MAX_KEY_SIZE) {
            snprintf(why, why_size, "the key of pair %u is %" PRIu32 " bytes, over %u", pair, klen, MAX_KEY_SIZE);
            return false;
        }
        if (klen > size - pos)
            goto overrun;
        const char *key = vars + pos;
        pos += klen;
        for (uint32_t i = 0; i < klen; i++) {
            if (!is_key_char((unsigned char)key[i])) {
                snprintf(why, why_size, "the key of pair %u has a byte outside [A-Z0-9_]", pair);
                return false;
            }
        }
        if (size - pos < 4)
            goto overrun;
        uint32_t vlen = read_be32(vars + pos);
        pos += 4;
        if (vlen > size - pos)
            goto overrun;
        const char *value = vars + pos;
        pos += vlen;

        unsigned flag = key_is(key, klen, "AGENT_APP")        ? SEEN_APP
                        : key_is(key, klen, "REQUEST_METHOD") ? SEEN_METHOD
                        : key_is(key, klen, "REQUEST_URI")    ? SEEN_URI
                        : key_is(key, klen, "CONTENT_LENGTH") ? SEEN_LENGTH
                                                              : 0;
        /* Two AGENT_APPs or CONTENT_LENGTHs could make the engine and the
         * worker disagree on the app or on where the body ends. */
        if ((flag == SEEN_APP || flag == SEEN_LENGTH) && (seen & flag)) {
            snprintf(why, why_size, "%.*s appears twice", (int)klen, key);
            return false;
        }
        seen |= flag;
        if (flag == SEEN_APP) {
            out->app = value;
            out->app_len = vlen;
        } else if (flag == SEEN_METHOD) {
            out->method = value;
            out->method_len = vlen;
        } else if (flag == SEEN_URI) {
            out->uri = value;
            out->uri_len = vlen;
        } else if (flag == SEEN_LENGTH) {
            length_value = value;
            length_len = vlen;
        }
    }
    static const struct { unsigned flag; const char *name; } required[] = {
        {SEEN_APP, "AGENT_APP"}, {SEEN_METHOD, "REQUEST_METHOD"},
        {SEEN_URI, "REQUEST_URI"}, {SEEN_LENGTH, "CONTENT_LENGTH"},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        if (!(seen & required[i].flag)) {
            snprintf(why, why_size, "%s is missing", required[i].name);
            return false;
        }
    }
    if (!parse_decimal(length_value, length_len, &out->content_length)) {
        snprintf(why, why_size, "CONTENT_LENGTH is not a decimal number");
        return false;
    }
    return true;
overrun:
    snprintf(why, why_size, "pair %u runs past the end of vars", pair);
    return false;
}

/* The whole of vars is in the buffer: validate, find the app, route. */
static void frame_complete(agent_engine *e, conn *c)
{
    frame_info info = {0};
    char why[160];
    if (!parse_vars(c->up + 4, c->frame_size - 4, &info, why, sizeof why)) {
        reject_frame(e, c, why);
        return;
    }
    /* Body bytes that came with the frame are forwarded with it; anything
     * past the body is not part of this request. */
    uint64_t held = c->up_len - c->frame_size;
    if (held > info.content_length) {
        held = info.content_length;
        c->up_len = c->frame_size + (uint32_t)held;
    }
    c->body_remaining = info.content_length - held;
    c->replayable = info.content_length == 0;
    c->request_len = c->up_len;
    conn_leave_wait_list(e, c);

    c->frame_us = e->now_us;
    copy_truncated(c->method, sizeof c->method, info.method, info.method_len);
    copy_truncated(c->path, sizeof c->path, info.uri, info.uri_len);
    app *a = app_by_name(e, info.app, info.app_len);
    if (!a) {
        reply_text(e, c, 503, "Service Unavailable", false, "unknown app %.*s",
                   (int)(info.app_len < REPLY_DETAIL_MAX ? info.app_len : REPLY_DETAIL_MAX), info.app);
        return;
    }
    a->requests++;
    c->app_id = a->id;
    route(e, a, c, false);
}

/* A frame larger than one io buffer gets a buffer of its own size. */
static bool grow_frame_buffer(agent_engine *e, conn *c)
{
    char *bigger = malloc(c->frame_size);
    if (!bigger)
        return false;
    memcpy(bigger, c->up, c->up_len);
    buffer_put(e, c->up, c->up_cap);
    c->up = bigger;
    c->up_cap = c->frame_size;
    return true;
}

/* Reads until the frame's vars are complete, the socket is empty, or the
 * frame proves bad. The 4-byte size is checked the moment it arrives. */
static void read_frame(agent_engine *e, conn *c)
{
    while (c->client_readable) {
        size_t want = c->up_cap - c->up_len;
        ssize_t n = read(c->client_fd, c->up + c->up_len, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                c->client_readable = false;
                if (!watch_client(e, c))
                    conn_release(e, c);
                return;
            }
            conn_release(e, c);
            return;
        }
        if (n == 0) {
            char why[120];
            if (c->up_len == 0) {  /* connected and left: not a frame at all */
                conn_release(e, c);
                return;
            }
            snprintf(why, sizeof why, "the connection closed after %" PRIu32 " of %s bytes", c->up_len,
                     c->frame_size ? "the frame's" : "the 4 size");
            reject_frame(e, c, why);
            return;
        }
        c->up_len += (uint32_t)n;
        if (!c->frame_size && c->up_len >= 4) {
            uint32_t vars_size = read_be32(c->up);
            char why[120];
            if (vars_size == 0 || vars_size > e->config.max_frame_size) {
                snprintf(why, sizeof why, "vars-size %" PRIu32 " is %s", vars_size,
                         vars_size ? "over the cap" : "zero");
                reject_frame(e, c, why);
                return;
            }
            c->frame_size = vars_size + 4;
            if (c->frame_size > c->up_cap && !grow_frame_buffer(e, c)) {
                emit(e, AGENT_EV_LOG, -1, 0, ENOMEM, "out of memory for a %" PRIu32 "-byte request frame", c->frame_size);
                conn_release(e, c);
                return;
            }
        }
        if (c->frame_size && c->up_len >= c->frame_size) {
            frame_complete(e, c);
            return;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Accepting                                                                */

static void start_connection(agent_engine *e, int fd)
{
    conn *c = conn_get(e);
    char *buf = c ? buffer_get(e) : NULL;
    if (!buf) {
        if (c) {
            c->state = CONN_DONE;
            c->next_free = e->dead_conns;
            e->dead_conns = c;
        }
        emit(e, AGENT_EV_LOG, -1, 0, ENOMEM, "out of memory for a new connection");
        close(fd);
        return;
    }
    c->client_fd = fd;
    c->up = buf;
    c->up_cap = e->config.io_buffer_size;
    c->state = CONN_READING_FRAME;
    c->started_ms = e->now_ms;
    c->client_readable = c->client_writable = true;
    list_append(&e->all_conns, &c->all_link);
    list_append(&e->reading_conns, &c->wait_link);
    c->in_wait_list = true;
    read_frame(e, c);  /* nginx writes the frame right after connecting */
}

/* The listener is level-triggered, so one accept per wake-up is enough:
 * if more connections wait, the next epoll_wait says so. Accepting until
 * EAGAIN would cost a failing accept4() per request when they come one
 * at a time. */
static void accept_connection(agent_engine *e)
{
    int fd;
    do
        fd = accept4(e->config.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd >= 0) {
        start_connection(e, fd);
        return;
    }
    if (errno == EAGAIN || errno == ECONNABORTED)
        return;
    /* Out of fds or memory: a level-triggered listener would spin, so it
     * leaves the epoll set until the next tick. */
    char text[128];
    emit(e, AGENT_EV_LOG, -1, 0, errno, "accept on the agent socket: %s; retrying in %d ms",
         strerror_r(errno, text, sizeof text), TICK_MS);
    struct epoll_event ev = {.events = 0, .data.ptr = &e->listener_ep};
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_MOD, e->config.listen_fd, &ev) == 0)
        e->accept_paused = true;
}

static void resume_accepting(agent_engine *e)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &e->listener_ep};
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_MOD, e->config.listen_fd, &ev) == 0)
        e->accept_paused = false;
}

/* ------------------------------------------------------------------------ */
/* The loop                                                                 */

static void on_client_event(agent_engine *e, conn *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->client_readable = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->client_writable = true;
    if (events & (EPOLLHUP | EPOLLERR))
        c->client_hup = true;
    switch (c->state) {
    case CONN_READING_FRAME:
        read_frame(e, c);
        break;
    case CONN_QUEUED:
        /* A request whose nginx side is gone is dropped unsent. */
        if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            conn_release(e, c);
        break;
    case CONN_FORWARDING:
        pump(e, c);
        break;
    case CONN_REPLYING:
        if (c->client_hup)
            conn_release(e, c);
        else if (events & EPOLLOUT)
            continue_reply(e, c);
        break;
    case CONN_DONE:
        break;
    }
}

static void on_worker_event(agent_engine *e, wconn *wc, uint32_t events)
{
    if (wc->fd < 0)
        return;  /* closed earlier in this batch */
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        wc->readable = true;
    if (events & (EPOLLRDHUP | EPOLLHUP))
        wc->rdhup = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        wc->writable = true;
    if (wc->conn)
        pump(e, wc->conn);
    else if (wc->readable)
        idle_check(e, wc);
}

/* Detached and removed workers get no more requests: their idle
 * connections are closed at once (busy ones when their request ends). */
static void close_idle_of_stopped_workers(agent_engine *e)
{
    for (int i = 0; i < e->nworkers; i++) {
        worker *w = e->workers[i];
        if (w->close_idle) {
            w->close_idle = false;
            worker_close_idle(e, w);
        }
    }
    worker **p = &e->orphans;
    while (*p) {
        worker *w = *p;
        worker_close_idle(e, w);
        if (w->sessions == 0 && w->open == 0) {
            *p = w->next_orphan;
            free(w);
        } else {
            p = &w->next_orphan;
        }
    }
}

/* API calls leave work behind the wake-up eventfd. */
static void on_wake(agent_engine *e)
{
    eventfd_drain(e->wake_fd);
    close_idle_of_stopped_workers(e);
    while (e->removed_apps) {
        app *a = e->removed_apps;
        while (!list_empty(&a->queue)) {
            conn *c = CONTAINER_OF(a->queue.next, conn, wait_link);
            c->app_id = -1;  /* the id may name a new app already: this answer is not one of its */
            reply_text(e, c, 503, "Service Unavailable", false, "unknown app %.*s", REPLY_DETAIL_MAX, a->name);
        }
        e->removed_apps = a->next_removed;
        app_free(a);
    }
    for (int i = 0; i < e->apps_cap; i++) {
        app *a = e->apps[i];
        if (!a || !a->needs_dispatch)
            continue;
        a->needs_dispatch = false;
        if (a->failure)
            answer_queue_with_failure(e, a);
        else
            dispatch_queue(e, a);
    }
}

/* A request ran past its app's request time limit. Its worker may be stuck
 * for good, so it gets no more requests and the policy hears of it (and
 * kills it); nginx gets a 504 when no byte of the response went out yet,
 * else its connection is closed and it sees the response cut off. */
static void request_timed_out(agent_engine *e, conn *c, app *a)
{
    worker *w = c->worker;
    int pid = w->pid;
    bool answer = !c->draining && !c->response_started;
    a->request_timeouts++;
    w->state = AGENT_WORKER_DETACHED;
    worker_close_idle(e, w);
    emit(e, AGENT_EV_REQUEST_TIMEOUT, a->id, pid, e->now_ms - c->session_ms,
         "a request to worker pid %d ran longer than %" PRIu32 " ms", pid, a->request_time_ms);
    end_session(e, c, false, false);
    if (answer) {
        reply_text(e, c, 504, "Gateway Timeout", false, "the app took longer than %" PRIu32 " ms", a->request_time_ms);
        return;
    }
    if (!c->draining)  /* cut off, but nginx got a response */
        record_duration(e, c);
    conn_release(e, c);
}

static void check_request_times(agent_engine *e)
{
    list_link *l = e->all_conns.next;
    while (l != &e->all_conns) {
        conn *c = CONTAINER_OF(l, conn, all_link);
        l = l->next;  /* c may leave the list */
        if (c->state != CONN_FORWARDING || !c->worker)
            continue;
        app *a = app_by_id(e, c->worker->app);
        if (a && a->request_time_ms && e->now_ms - c->session_ms >= (int64_t)a->request_time_ms)
            request_timed_out(e, c, a);
    }
}

/* Every TICK_MS: frame timeouts, queue timeouts, request time limits,
 * sessions to watch, a paused accept. */
static void on_tick(agent_engine *e)
{
    while (!list_empty(&e->reading_conns)) {
        conn *c = CONTAINER_OF(e->reading_conns.next, conn, wait_link);
        if (e->now_ms - c->started_ms < (int64_t)e->config.frame_timeout_ms)
            break;  /* the list is in arrival order */
        emit(e, AGENT_EV_LOG, -1, 0, 0, "request frame not received within %" PRIu32 " ms; connection closed",
             e->config.frame_timeout_ms);
        conn_release(e, c);
    }
    for (int i = 0; i < e->apps_cap; i++) {
        app *a = e->apps[i];
        if (!a || a->queue_timeout_ms == 0)
            continue;
        /* Requests put back at the head keep their first queued time, so
         * the queue is not strictly ordered by time: look at every one. */
        list_link *l = a->queue.next;
        while (l != &a->queue) {
            conn *c = CONTAINER_OF(l, conn, wait_link);
            l = l->next;
            if (e->now_ms - c->queued_ms >= (int64_t)a->queue_timeout_ms) {
                a->queue_timeouts++;
                reply_text(e, c, 504, "Gateway Timeout", false, "waited too long for a worker");
            }
        }
    }
    check_request_times(e);
    /* Sessions that outlive a tick get their nginx side watched, so that
     * nginx going away ends them (see watch_client). Registering ends no
     * connection (a failure is retried on the next tick), which keeps this
     * walk over the list safe. */
    for (list_link *l = e->all_conns.next; l != &e->all_conns; l = l->next) {
        conn *c = CONTAINER_OF(l, conn, all_link);
        if (c->state == CONN_FORWARDING && !c->client_watched && !c->draining)
            watch_client(e, c);
    }
    if (e->accept_paused)
        resume_accepting(e);
}

static void handle_event(agent_engine *e, const struct epoll_event *ev)
{
    endpoint *ep = ev->data.ptr;
    switch (ep->kind) {
    case EP_LISTENER:
        accept_connection(e);
        break;
    case EP_WAKE:
        on_wake(e);
        break;
    case EP_CLIENT:
        on_client_event(e, ep->conn, ev->events);
        break;
    case EP_WORKER:
        on_worker_event(e, ep->wconn, ev->events);
        break;
    }
}

/* Ends every connection when the loop stops. Sessions are settled as if
 * nginx had gone away (stopping, their worker connections are closed);
 * the queue is not dispatched any more. */
static void close_all_connections(agent_engine *e)
{
    while (!list_empty(&e->all_conns)) {
        conn *c = CONTAINER_OF(e->all_conns.next, conn, all_link);
        end_session(e, c, false, false);
        conn_release(e, c);
    }
    for (int i = 0; i < e->nworkers; i++)
        worker_close_idle(e, e->workers[i]);
    close_idle_of_stopped_workers(e);  /* and frees the removed workers */
    recycle_dead_conns(e);
}

static void *engine_loop(void *arg)
{
    agent_engine *e = arg;
    struct epoll_event events[EVENTS_PER_WAIT];
    for (;;) {
        int64_t wait_ms = e->next_tick_ms - monotonic_ms();
        int n = epoll_wait(e->epoll_fd, events, EVENTS_PER_WAIT,
                           (int)(wait_ms < 0 ? 0 : wait_ms > TICK_MS ? TICK_MS : wait_ms));
        if (n < 0 && errno != EINTR) {
            char text[128];
            pthread_mutex_lock(&e->lock);
            emit(e, AGENT_EV_LOG, -1, 0, errno, "epoll_wait: %s; the engine stops",
                 strerror_r(errno, text, sizeof text));
            pthread_mutex_unlock(&e->lock);
            break;
        }
        pthread_mutex_lock(&e->lock);
        engine_clock_read(e);
        for (int i = 0; i < n; i++)
            handle_event(e, &events[i]);
        if (e->now_ms >= e->next_tick_ms) {
            on_tick(e);
            e->next_tick_ms = e->now_ms + TICK_MS;
        }
        recycle_dead_conns(e);
        bool stop = e->stopping;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
    }
    pthread_mutex_lock(&e->lock);
    e->stopping = true;
    close_all_connections(e);
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The API                                                                  */

agent_engine *agent_engine_new(const agent_engine_config *config)
{
    if (!config || config->listen_fd < 0) {
        errno = EINVAL;
        return NULL;
    }
    agent_engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->config = *config;
    if (!e->config.max_frame_size)
        e->config.max_frame_size = DEFAULT_MAX_FRAME_SIZE;
    if (!e->config.io_buffer_size)
        e->config.io_buffer_size = DEFAULT_IO_BUFFER_SIZE;
    if (e->config.io_buffer_size < MIN_IO_BUFFER_SIZE)
        e->config.io_buffer_size = MIN_IO_BUFFER_SIZE;
    if (!e->config.frame_timeout_ms)
        e->config.frame_timeout_ms = DEFAULT_FRAME_TIMEOUT_MS;
    e->epoll_fd = e->wake_fd = e->notify_fd = -1;
    list_init(&e->all_conns);
    list_init(&e->reading_conns);
    e->listener_ep.kind = EP_LISTENER;
    e->wake_ep.kind = EP_WAKE;

    int err = pthread_mutex_init(&e->lock, NULL);
    if (err) {
        free(e);
        errno = err;
        return NULL;
    }
    bool rings = ring_init(&e->events, EVENT_RING_INITIAL) && ring_init(&e->logs, LOG_RING_SIZE);
    e->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!rings || e->epoll_fd < 0 || e->wake_fd < 0 || e->notify_fd < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = &e->wake_ep};
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_ADD, e->wake_fd, &ev) < 0)
        goto fail;
    ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = &e->listener_ep};  /* level-triggered */
    if (epoll_ctl(e->epoll_fd, EPOLL_CTL_ADD, e->config.listen_fd, &ev) < 0)
        goto fail;
    return e;
fail:
    err = errno ? errno : ENOMEM;
    agent_engine_free(e);
    errno = err;
    return NULL;
}

int agent_engine_start(agent_engine *e)
{
    if (e->started)
        return -EALREADY;
    /* Two engines' threads (an old core and a new one) may wake for the
     * same connection; a blocking accept would then hang the loop. The
     * flag lives on the open file, which only the agent core uses. */
    int flags = fcntl(e->config.listen_fd, F_GETFL);
    if (flags < 0 || fcntl(e->config.listen_fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -errno;
    engine_clock_read(e);
    e->next_tick_ms = e->now_ms + TICK_MS;

    /* Signals are for the Python thread: the engine thread blocks them all
     * so that a handler never interrupts it. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&e->thread, NULL, engine_loop, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        return -err;
    pthread_setname_np(e->thread, "agent-engine");  /* only a label for ps/top */
    e->started = true;
    return 0;
}

void agent_engine_stop(agent_engine *e)
{
    if (!e->started || e->joined)
        return;
    pthread_mutex_lock(&e->lock);
    e->stopping = true;
    pthread_mutex_unlock(&e->lock);
    eventfd_signal(e->wake_fd);
    pthread_join(e->thread, NULL);
    e->joined = true;
}

void agent_engine_free(agent_engine *e)
{
    if (!e)
        return;
    agent_engine_stop(e);
    close_all_connections(e);  /* for an engine never started: nothing */
    while (e->free_conns) {
        conn *c = e->free_conns;
        e->free_conns = c->next_free;
        free(c);
    }
    while (e->free_buffers) {
        char *buf = e->free_buffers;
        memcpy(&e->free_buffers, buf, sizeof(char *));
        free(buf);
    }
    while (e->removed_apps) {
        app *a = e->removed_apps;
        e->removed_apps = a->next_removed;
        app_free(a);
    }
    for (int i = 0; i < e->apps_cap; i++)
        if (e->apps[i])
            app_free(e->apps[i]);
    free(e->apps);
    for (int i = 0; i < e->nworkers; i++)
        free(e->workers[i]);
    free(e->workers);
    while (e->orphans) {
        worker *w = e->orphans;
        e->orphans = w->next_orphan;
        free(w);
    }
    free(e->events.slots);
    free(e->logs.slots);
    close_fd(&e->epoll_fd);
    close_fd(&e->wake_fd);
    close_fd(&e->notify_fd);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

int agent_engine_notify_fd(agent_engine *e)
{
    return e->notify_fd;
}

int agent_engine_poll(agent_engine *e, agent_engine_event *out, int max)
{
    pthread_mutex_lock(&e->lock);
    int n = 0;
    while (n < max && !(ring_empty(&e->events) && ring_empty(&e->logs))) {
        const ring_entry *ev = ring_empty(&e->events) ? NULL : &e->events.slots[e->events.head & (e->events.cap - 1)];
        const ring_entry *log = ring_empty(&e->logs) ? NULL : &e->logs.slots[e->logs.head & (e->logs.cap - 1)];
        if (ev && (!log || ev->order < log->order)) {
            out[n++] = ev->ev;
            e->events.head++;
        } else {
            out[n++] = log->ev;
            e->logs.head++;
        }
    }
    /* The notify fd stays readable exactly while events wait. */
    if (ring_empty(&e->events) && ring_empty(&e->logs))
        eventfd_drain(e->notify_fd);
    pthread_mutex_unlock(&e->lock);
    return n;
}

static void wake_loop(agent_engine *e)
{
    eventfd_signal(e->wake_fd);
}

int agent_engine_app_set(agent_engine *e, int app_id, const char *name, int max_queue, uint32_t queue_timeout_ms)
{
    if (app_id < 0 || app_id > MAX_APP_ID || !name || max_queue < 0)
        return -EINVAL;
    char *copy = strdup(name);
    if (!copy)
        return -ENOMEM;
    pthread_mutex_lock(&e->lock);
    if (app_id >= e->apps_cap) {
        int cap = e->apps_cap ? e->apps_cap : 8;
        while (cap <= app_id)
            cap *= 2;
        app **bigger = realloc(e->apps, sizeof *bigger * (size_t)cap);
        if (!bigger) {
            pthread_mutex_unlock(&e->lock);
            free(copy);
            return -ENOMEM;
        }
        memset(bigger + e->apps_cap, 0, sizeof *bigger * (size_t)(cap - e->apps_cap));
        e->apps = bigger;
        e->apps_cap = cap;
    }
    app *a = e->apps[app_id];
    if (!a) {
        a = calloc(1, sizeof *a);
        if (!a) {
            pthread_mutex_unlock(&e->lock);
            free(copy);
            return -ENOMEM;
        }
        a->id = app_id;
        a->notify = AGENT_NOTIFY_QUEUED | AGENT_NOTIFY_IDLE;
        list_init(&a->queue);
        e->apps[app_id] = a;
    }
    free(a->name);
    a->name = copy;
    a->name_len = strlen(copy);
    a->max_queue = max_queue;
    a->queue_timeout_ms = queue_timeout_ms;
    pthread_mutex_unlock(&e->lock);
    return 0;
}

/* The app leaves the table at once; the loop answers its queue (503,
 * unknown app) and frees it. Requests in flight finish normally. */
int agent_engine_app_remove(agent_engine *e, int app_id)
{
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (!a) {
        pthread_mutex_unlock(&e->lock);
        return -ENOENT;
    }
    e->apps[app_id] = NULL;
    a->next_removed = e->removed_apps;
    e->removed_apps = a;
    pthread_mutex_unlock(&e->lock);
    wake_loop(e);
    return 0;
}

int agent_engine_app_fail(agent_engine *e, int app_id, const char *response, size_t length)
{
    if (!response || length == 0)
        return -EINVAL;
    shared_reply *r = malloc(sizeof *r + length);
    if (!r)
        return -ENOMEM;
    r->refs = 1;
    r->length = length;
    memcpy(r->data, response, length);
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (!a) {
        pthread_mutex_unlock(&e->lock);
        free(r);
        return -ENOENT;
    }
    shared_reply_release(&a->failure);
    a->failure = r;
    a->needs_dispatch = true;
    pthread_mutex_unlock(&e->lock);
    wake_loop(e);
    return 0;
}

/* Turning QUEUED on while requests wait reports them at once: the policy
 * that just gained room for a worker learns that one is wanted. */
int agent_engine_app_notify(agent_engine *e, int app_id, unsigned events)
{
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (!a) {
        pthread_mutex_unlock(&e->lock);
        return -ENOENT;
    }
    bool queued_on = (events & AGENT_NOTIFY_QUEUED) && !(a->notify & AGENT_NOTIFY_QUEUED);
    bool hold_off = !(events & AGENT_NOTIFY_HOLD) && (a->notify & AGENT_NOTIFY_HOLD);
    a->notify = events;
    if (queued_on && a->queue_length > 0)
        emit_coalesced(e, &a->queued_event, AGENT_EV_QUEUED, a->id, 0, a->queue_length);
    if (hold_off) {  /* nobody will release them now */
        for (int i = 0; i < e->nworkers; i++)
            if (e->workers[i]->app == app_id)
                e->workers[i]->held = false;
        a->needs_dispatch = true;
    }
    pthread_mutex_unlock(&e->lock);
    if (hold_off)
        wake_loop(e);
    return 0;
}

int agent_engine_app_request_time(agent_engine *e, int app_id, uint32_t max_request_time_ms)
{
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (a)
        a->request_time_ms = max_request_time_ms;
    pthread_mutex_unlock(&e->lock);
    return a ? 0 : -ENOENT;
}

int agent_engine_app_clear_failure(agent_engine *e, int app_id)
{
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (!a) {
        pthread_mutex_unlock(&e->lock);
        return -ENOENT;
    }
    shared_reply_release(&a->failure);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

int agent_engine_worker_add(agent_engine *e, int app_id, int pid, const char *socket_path, int concurrency)
{
    if (!socket_path || concurrency < 1 || pid <= 0)
        return -EINVAL;
    size_t path_len = strlen(socket_path);
    worker *w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    if (path_len == 0 || path_len >= sizeof w->addr.sun_path) {
        free(w);
        return -ENAMETOOLONG;
    }
    w->pid = pid;
    w->app = app_id;
    w->state = AGENT_WORKER_ACTIVE;
    w->concurrency = concurrency;
    w->addr.sun_family = AF_UNIX;
    memcpy(w->addr.sun_path, socket_path, path_len + 1);
    w->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len + 1);
    list_init(&w->idle);

    pthread_mutex_lock(&e->lock);
    int err = 0;
    app *a = app_by_id(e, app_id);
    if (!a)
        err = -ENOENT;
    else if (worker_index(e, pid) >= 0)
        err = -EEXIST;
    else if (e->nworkers == e->workers_cap) {
        int cap = e->workers_cap ? e->workers_cap * 2 : 16;
        worker **bigger = realloc(e->workers, sizeof *bigger * (size_t)cap);
        if (!bigger)
            err = -ENOMEM;
        else {
            e->workers = bigger;
            e->workers_cap = cap;
        }
    }
    if (err) {
        pthread_mutex_unlock(&e->lock);
        free(w);
        return err;
    }
    w->last_used_ms = monotonic_ms();
    e->workers[e->nworkers++] = w;
    a->needs_dispatch = true;
    pthread_mutex_unlock(&e->lock);
    wake_loop(e);
    return 0;
}

/* The loop closes the worker's idle connections (API calls do no socket
 * work); it gets no request from now on either way. */
int agent_engine_worker_detach(agent_engine *e, int pid)
{
    pthread_mutex_lock(&e->lock);
    int i = worker_index(e, pid);
    bool wake = false;
    if (i >= 0) {
        worker *w = e->workers[i];
        w->state = AGENT_WORKER_DETACHED;
        w->close_idle = wake = !list_empty(&w->idle);
    }
    pthread_mutex_unlock(&e->lock);
    if (wake)
        wake_loop(e);
    return i >= 0 ? 0 : -ENOENT;
}

/* Ends a HOLD (AGENT_NOTIFY_HOLD): the worker takes requests again, the
 * app's queue first. */
int agent_engine_worker_release(agent_engine *e, int pid)
{
    pthread_mutex_lock(&e->lock);
    int i = worker_index(e, pid);
    bool wake = false;
    if (i >= 0 && e->workers[i]->held) {
        worker *w = e->workers[i];
        app *a = app_by_id(e, w->app);
        w->held = false;
        if (a && a->queue_length > 0)
            a->needs_dispatch = wake = true;
    }
    pthread_mutex_unlock(&e->lock);
    if (wake)
        wake_loop(e);
    return i >= 0 ? 0 : -ENOENT;
}

/* Sessions in flight run to completion; the record goes with the last
 * session or connection, whichever ends later (the loop closes the idle
 * connections at once). */
int agent_engine_worker_remove(agent_engine *e, int pid)
{
    pthread_mutex_lock(&e->lock);
    int i = worker_index(e, pid);
    if (i < 0) {
        pthread_mutex_unlock(&e->lock);
        return -ENOENT;
    }
    worker *w = e->workers[i];
    e->workers[i] = e->workers[--e->nworkers];
    w->state = AGENT_WORKER_DETACHED;
    bool wake = !list_empty(&w->idle);
    if (w->sessions > 0 || w->open > 0) {
        w->removed = true;
        w->next_orphan = e->orphans;
        e->orphans = w;
    } else {
        free(w);
    }
    pthread_mutex_unlock(&e->lock);
    if (wake)
        wake_loop(e);
    return 0;
}

int agent_engine_worker_stats(agent_engine *e, agent_worker_stats *out, int max)
{
    pthread_mutex_lock(&e->lock);
    int n = 0;
    for (int i = 0; i < e->nworkers && n < max; i++, n++) {
        const worker *w = e->workers[i];
        out[n] = (agent_worker_stats){w->pid, w->app, w->state, w->concurrency,
                                      w->sessions, w->processed, w->last_used_ms};
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* Requests the app's workers could take now. A queue read together with
 * them tells the policy how many requests really lack a worker: a worker
 * just added has not yet taken the queue's head when the policy looks. */
static int free_slots(const agent_engine *e, int app_id)
{
    int slots = 0;
    for (int i = 0; i < e->nworkers; i++) {
        const worker *w = e->workers[i];
        if (w->app == app_id && w->state == AGENT_WORKER_ACTIVE && !w->held && w->sessions < w->concurrency)
            slots += w->concurrency - w->sessions;
    }
    return slots;
}

int agent_engine_app_stats(agent_engine *e, agent_app_stats *out, int max)
{
    pthread_mutex_lock(&e->lock);
    int n = 0;
    for (int i = 0; i < e->apps_cap && n < max; i++) {
        const app *a = e->apps[i];
        if (!a)
            continue;
        out[n++] = (agent_app_stats){a->id, a->queue_length, a->requests,
                                     a->queue_full, a->queue_timeouts, a->failed, a->request_timeouts,
                                     free_slots(e, a->id)};
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

int agent_engine_app_durations(agent_engine *e, agent_app_durations *out, int max)
{
    pthread_mutex_lock(&e->lock);
    int n = 0;
    for (int i = 0; i < e->apps_cap && n < max; i++) {
        const app *a = e->apps[i];
        if (!a)
            continue;
        agent_app_durations *d = &out[n++];
        d->app = a->id;
        memcpy(d->buckets, a->duration_buckets, sizeof d->buckets);
        d->count = a->duration_count;
        d->sum_us = a->duration_sum_us;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* Ages come from a fresh clock reading: the loop's own clock stands still
 * while it sleeps, up to a tick. */
int agent_engine_requests(agent_engine *e, agent_request_info *out, int max)
{
    int64_t now_us = monotonic_us();
    pthread_mutex_lock(&e->lock);
    int n = 0;
    for (list_link *l = e->all_conns.next; l != &e->all_conns && n < max; l = l->next) {
        const conn *c = CONTAINER_OF(l, conn, all_link);
        if (c->state != CONN_QUEUED && c->state != CONN_FORWARDING)
            continue;
        agent_request_info *r = &out[n++];
        r->app = c->app_id;
        r->pid = c->state == CONN_FORWARDING && c->worker ? c->worker->pid : 0;
        r->state = c->state == CONN_QUEUED ? AGENT_REQUEST_QUEUED : AGENT_REQUEST_FORWARDING;
        r->age_ms = (now_us - c->frame_us) / 1000;
        /* Up to the NUL only: what follows is a previous request's. */
        memcpy(r->method, c->method, strlen(c->method) + 1);
        memcpy(r->path, c->path, strlen(c->path) + 1);
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}
