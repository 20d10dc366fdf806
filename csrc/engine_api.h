/*
 * The engine: the agent core's data plane.
 *
 * One thread runs an epoll loop that accepts nginx's connections on the
 * agent socket, reads each request frame (docs/protocol.md), picks the least
 * busy worker of the frame's app, connects to that worker's socket and moves
 * bytes both ways until the worker closes the connection. When every worker
 * of an app is busy the request waits in the app's queue.
 *
 * The policy (Python) never sees a request. It drives the engine through the
 * functions below, which are safe to call from any thread: they change the
 * routing table under the engine's lock and wake the loop. The engine tells
 * the policy what happened through events, read with agent_engine_poll()
 * whenever agent_engine_notify_fd() turns readable.
 *
 * This header is also the cffi cdef: plain declarations only, no
 * preprocessor lines but integer #defines.
 */

typedef struct agent_engine agent_engine;

typedef struct {
    int listen_fd;               /* listening Unix socket; the engine does not close it */
    uint32_t max_frame_size;     /* cap on vars-size; 0: 1 MiB */
    uint32_t io_buffer_size;     /* bytes buffered per direction per request; 0: 64 KiB */
    uint32_t frame_timeout_ms;   /* time allowed to send the frame; 0: 60 s */
    /* After nginx goes away, a worker's response is read and dropped up to
     * these bounds; past either, its connection is closed and the worker is
     * given up (AGENT_EV_WORKER_FAILED). Tests shrink them. */
    uint32_t drain_max_bytes;    /* 0: 1 MiB */
    uint32_t drain_max_ms;       /* 0: 5 s */
} agent_engine_config;

/* Event types. */
#define AGENT_EV_QUEUED 1         /* a request waits for app; value = queue length */
#define AGENT_EV_WORKER_FAILED 2  /* connecting to worker pid failed, or it kept a response going past the
                                     drain bounds after nginx went away; it gets no more requests */
#define AGENT_EV_WORKER_IDLE 3    /* worker pid finished a request and has no session; value = processed */
#define AGENT_EV_LOG 4            /* message is a line for the agent's log */
#define AGENT_EV_REQUEST_TIMEOUT 5 /* a request to worker pid passed its app's time limit; value = ms it ran.
                                     The worker is detached; the request got 504 (or was cut off). */

typedef struct {
    int type;
    int app;                     /* app id, or -1 */
    int pid;                     /* worker pid, or 0 */
    int64_t value;
    char message[240];           /* NUL-terminated */
} agent_engine_event;

/* Worker states as seen by the engine. */
#define AGENT_WORKER_ACTIVE 0     /* gets new requests */
#define AGENT_WORKER_DETACHED 1   /* finishes its sessions, gets no new requests */

typedef struct {
    int pid;
    int app;
    int state;
    int concurrency;
    int sessions;                /* requests in flight */
    uint64_t processed;          /* requests completed */
    int64_t last_used_ms;        /* CLOCK_MONOTONIC ms when a request last ended or began */
} agent_worker_stats;

typedef struct {
    int app;
    int queue_length;
    uint64_t requests;           /* requests routed to the app (served or answered by the engine) */
    uint64_t queue_full;         /* answered 503 because the queue was full */
    uint64_t queue_timeouts;     /* answered 504 */
    uint64_t failed;             /* answered 502 */
    uint64_t request_timeouts;   /* cut off by the request time limit */
    int free_slots;              /* requests its active workers could take at once */
} agent_app_stats;

/* Request durations per app: from when the engine has read a request's
 * frame to when its response ended for nginx. A response ends when the
 * worker's end record came and nginx has every byte; when the worker's
 * connection ended after the response began (nginx sees it cut off); or
 * when the engine answered for the app itself (503 queue full, 504 queue or
 * request time, 502 worker failed, the app's error page). Not counted:
 * requests whose nginx side went away first, frames rejected before their
 * app was known (400), requests for an unknown or removed app. The clock is
 * read once per batch of events, so a duration is exact to the batch.
 *
 * buckets[i] counts the durations d with bound[i-1] < d <= bound[i], for the
 * upper bounds in ms 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000
 * and +Inf: per bucket, not cumulative (Prometheus's le buckets are the
 * running sums). count is the sum of the buckets. */
#define AGENT_DURATION_BUCKETS 12

typedef struct {
    int app;
    uint64_t buckets[12];        /* AGENT_DURATION_BUCKETS */
    uint64_t count;
    uint64_t sum_us;             /* microseconds */
} agent_app_durations;

/* A request the engine holds: waiting in its app's queue, or with a
 * worker (including one whose nginx side went away while the worker
 * finishes it). */
#define AGENT_REQUEST_QUEUED 0
#define AGENT_REQUEST_FORWARDING 1

typedef struct {
    int app;
    int pid;                     /* the worker's, or 0 while queued */
    int state;                   /* AGENT_REQUEST_* */
    int64_t age_ms;              /* since the engine read the frame */
    char method[16];             /* REQUEST_METHOD, NUL-terminated, truncated to fit */
    char path[512];              /* REQUEST_URI, NUL-terminated, truncated to fit */
} agent_request_info;

/* Creation and the loop thread. Return 0 or -errno unless stated. */
agent_engine *agent_engine_new(const agent_engine_config *config);
int agent_engine_start(agent_engine *engine);
void agent_engine_stop(agent_engine *engine);   /* stops the loop, closes every connection */
void agent_engine_free(agent_engine *engine);

int agent_engine_notify_fd(agent_engine *engine);

/* Who may connect to the agent socket: the engine reads each accepted
 * connection's SO_PEERCRED and closes, unread and unanswered, one whose uid
 * is not in this list (a log line at most every 10 s; a counter). By
 * default only the engine's own effective uid. count: 1..AGENT_MAX_PEER_UIDS. */
#define AGENT_MAX_PEER_UIDS 8
int agent_engine_allow_peers(agent_engine *engine, const unsigned int *uids, int count);
uint64_t agent_engine_refused_peers(agent_engine *engine);  /* connections refused so far */
int agent_engine_poll(agent_engine *engine, agent_engine_event *out, int max);  /* events copied */

/* The routing table. App ids are small integers chosen by the policy. */
int agent_engine_app_set(agent_engine *engine, int app, const char *name,
                         int max_queue, uint32_t queue_timeout_ms);  /* max_queue 0: unbounded */
int agent_engine_app_remove(agent_engine *engine, int app);
/* A request that a worker has had longer than this is cut off (0: no limit);
 * see AGENT_EV_REQUEST_TIMEOUT. */
int agent_engine_app_request_time(agent_engine *engine, int app, uint32_t max_request_time_ms);
/* Which per-request events the policy wants for an app (both by default).
 * Each event wakes the policy, so a policy that cannot act on one (the app
 * is at its bound) turns it off rather than paying a wake-up per request.
 * Unread QUEUED and WORKER_IDLE events are updated in place, not repeated. */
#define AGENT_NOTIFY_QUEUED 1
#define AGENT_NOTIFY_IDLE 2
/* With HOLD, a worker that finishes a request gets no new one until the
 * policy has looked at it (WORKER_IDLE, then agent_engine_worker_release()
 * or _detach()): a limit checked after each request is then exact. */
#define AGENT_NOTIFY_HOLD 4
int agent_engine_app_notify(agent_engine *engine, int app, unsigned int events);
/* Answer the app's waiting requests, and new ones until cleared, with this
 * complete HTTP response (status line, headers and body). */
int agent_engine_app_fail(agent_engine *engine, int app, const char *response, size_t length);
int agent_engine_app_clear_failure(agent_engine *engine, int app);

int agent_engine_worker_add(agent_engine *engine, int app, int pid,
                            const char *socket_path, int concurrency);
/* A generic worker (agent_app_type generic): an HTTP/1.1 server on
 * 127.0.0.1:port. Each request gets a connection of its own; the engine
 * sends it as an HTTP/1.1 request head made from the frame (wire.h,
 * http_head_build) and the body, and passes the worker's bytes to nginx as
 * they come until the worker closes the connection. Never in the fast
 * path's table. */
int agent_engine_worker_add_http(agent_engine *engine, int app, int pid, int port, int concurrency);
int agent_engine_worker_detach(agent_engine *engine, int pid);
int agent_engine_worker_release(agent_engine *engine, int pid);  /* ends a HOLD */
int agent_engine_worker_remove(agent_engine *engine, int pid);

/* Snapshots; return the number of entries written. */
int agent_engine_worker_stats(agent_engine *engine, agent_worker_stats *out, int max);
int agent_engine_app_stats(agent_engine *engine, agent_app_stats *out, int max);
int agent_engine_app_durations(agent_engine *engine, agent_app_durations *out, int max);
/* Oldest first (in arrival order). */
int agent_engine_requests(agent_engine *engine, agent_request_info *out, int max);

/* The fast path's shared table (fastpath.h; docs/protocol.md section 5):
 * nginx's workers claim idle workers of concurrency 1 there and serve
 * requests without the engine. Attach opens the table at path (never a
 * symlink) and checks it: a regular file with one link, owned by nginx's
 * worker uid (the engine's euid when the engine is not root; nginx_uid -1:
 * unknown, root's), not writable by group or others, of the table's size,
 * magic and version. Then a new epoch: every slot FREE, every row closed,
 * and the engine's workers and apps published. Without a table, or when
 * this fails, agent.sock serves every request. -EALREADY when attached. */
int agent_engine_fastpath_attach(agent_engine *engine, const char *path, int nginx_uid);
int agent_engine_fastpath_attached(agent_engine *engine);  /* 1 or 0 */
