/*
 * The engine's side of the fast path (fastpath.h, docs/protocol.md §5).
 *
 * nginx's workers claim idle app workers in a table shared with them and
 * serve requests without the engine. The engine publishes a slot for every
 * worker of concurrency 1 and a row for every app; its own queue (the slow
 * path, agent.sock) takes a slotted worker by the same compare-and-swap as
 * nginx; it takes workers out by CAS; and once per tick it sweeps the
 * table, which it reads as untrusted input: a word it did not expect marks
 * the slot FAILED, a claimant that no longer exists or that holds a claim
 * past the request time limit loses the worker, and every counter nginx
 * adds is taken as a clamped delta.
 *
 * Every call here runs under the engine's lock. The table may be absent
 * (e->fp NULL): then every call is a no-op and the slow path serves all.
 */
#include "engine_internal.h"

#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>

_Static_assert(sizeof(agent_fp_slot) == 256, "a slot is 256 bytes");
_Static_assert(sizeof(agent_fp_table) < UINT32_MAX, "the table's size fits its header field");
_Static_assert(offsetof(agent_fp_slot, word) % 8 == 0 && sizeof(agent_fp_slot) % 8 == 0, "aligned words");
_Static_assert(offsetof(agent_fp_table, slots) % 8 == 0, "aligned slots");
_Static_assert(offsetof(agent_fp_app, queue_full) % 8 == 0, "aligned counters");
_Static_assert(AGENT_FP_DURATION_BUCKETS == AGENT_DURATION_BUCKETS, "one set of duration buckets");

#define FP_DELTA_MAX 1000000u            /* per counter per tick */
#define FP_WAITING_MAX 1000000u          /* nginx's waiting count, unbounded queue */
#define FP_DURATION_MAX_US 3600000000ull /* a duration nginx reports counts at most an hour */
#define FP_PID_MAX 4194304u              /* Linux's largest pid_max */

/* ------------------------------------------------------------------------ */
/* Attaching                                                                */

int fp_attach(agent_engine *e, const char *path, int nginx_uid)
{
    if (e->fp)
        return -EALREADY;
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct stat st;
    int err = 0;
    uid_t euid = geteuid();
    /* Root expects nginx's worker user as the owner (nginx's master gives it
     * the table); anyone else can only have made it themselves. */
    uid_t owner = euid != 0 ? euid : nginx_uid >= 0 ? (uid_t)nginx_uid : 0;
    if (fstat(fd, &st) < 0)
        err = -errno;
    else if (!S_ISREG(st.st_mode))
        err = -EINVAL;
    else if (st.st_nlink != 1)
        err = -EMLINK;
    else if (st.st_uid != owner || (st.st_mode & 0022))
        err = -EPERM;
    else if (st.st_size != (off_t)sizeof(agent_fp_table))
        err = -EINVAL;
    if (err) {
        close(fd);
        return err;
    }
    void *map = mmap(NULL, sizeof(agent_fp_table), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    err = map == MAP_FAILED ? -errno : 0;
    close(fd);  /* the mapping stays */
    if (err)
        return err;
    agent_fp_table *t = map;
    if (t->header.magic != AGENT_FP_MAGIC || t->header.version != AGENT_FP_VERSION
        || t->header.size != (uint32_t)sizeof(agent_fp_table)) {
        munmap(map, sizeof(agent_fp_table));
        return -EPROTO;
    }

    /* A new epoch: no slot of a previous core's survives, every row is
     * closed until this engine opens it. generations and nginx's fields
     * (waiting, procs) are kept. */
    uint32_t epoch = __atomic_load_n(&t->header.epoch, __ATOMIC_RELAXED) + 1;
    e->fp_pid = (uint32_t)getpid();
    e->fp_epoch = epoch ? epoch : 1;
    for (int i = 0; i < AGENT_FP_APPS; i++) {
        __atomic_store_n(&t->apps[i].open, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&t->apps[i].engine_queue, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&t->apps[i].engine_spare, 0, __ATOMIC_RELAXED);
    }
    for (int i = 0; i < AGENT_FP_SLOTS; i++) {
        agent_fp_slot *s = &t->slots[i];
        __atomic_store_n(&s->word, 0, __ATOMIC_RELEASE);
        memset((char *)s + sizeof s->word, 0, sizeof *s - sizeof s->word);
        e->fp_owner[i] = NULL;
    }
    __atomic_store_n(&t->header.slots_used, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->header.engine_pid, e->fp_pid, __ATOMIC_RELAXED);
    __atomic_store_n(&t->header.epoch, e->fp_epoch, __ATOMIC_RELEASE);
    e->fp = t;

    for (int i = 0; i < e->nworkers; i++)
        fp_publish(e, e->workers[i]);
    for (int i = 0; i < e->apps_cap; i++)
        if (e->apps[i])
            fp_app_update(e, e->apps[i]);
    return 0;
}

/* The engine stops: its rows close (nginx then sends everything to
 * agent.sock) unless another core has taken the table over. */
void fp_detach_table(agent_engine *e)
{
    agent_fp_table *t = e->fp;
    if (!t)
        return;
    if (__atomic_load_n(&t->header.epoch, __ATOMIC_ACQUIRE) == e->fp_epoch)
        for (int i = 0; i < e->apps_cap; i++)
            if (e->apps[i])
                fp_app_removed(e, e->apps[i]);
    for (int i = 0; i < e->apps_cap; i++)
        if (e->apps[i])
            e->apps[i]->fp_engine_queue = NULL;
    e->fp = NULL;
    munmap(t, sizeof *t);
}

/* ------------------------------------------------------------------------ */
/* Slots                                                                    */

static agent_fp_slot *lane_slot(const agent_engine *e, const worker *w, int lane)
{
    return e->fp && lane >= 0 && lane < w->fp_lanes ? &e->fp->slots[w->lane[lane].slot] : NULL;
}

static uint64_t lane_word(const worker *w, int lane, uint32_t kind, uint32_t flags, uint32_t pid)
{
    return agent_fp_word(kind, flags, pid, w->lane[lane].gen);
}

static bool slot_free(const agent_engine *e, int i)
{
    return e->fp_owner[i] == NULL;
}

/* Where a worker of `lanes` slots goes (fastpath.h, "Lanes"): the first
 * free slot for one; for more, the last column whose lanes 0..lanes-1 are
 * all free. -1: no room (the engine serves the worker alone). */
static int place(const agent_engine *e, int lanes)
{
    if (lanes == 1) {
        for (int i = 0; i < AGENT_FP_SLOTS; i++)
            if (slot_free(e, i))
                return i;
        return -1;
    }
    for (int col = AGENT_FP_COLUMNS - 1; col >= 0; col--) {
        int l = 0;
        while (l < lanes && slot_free(e, l * AGENT_FP_COLUMNS + col))
            l++;
        if (l == lanes)
            return col;
    }
    return -1;
}

/* Writes one lane's slot, FREE while it is written, then IDLE with a new
 * generation. */
static void publish_lane(agent_engine *e, worker *w, int lane, int i, const char *base, size_t len)
{
    agent_fp_table *t = e->fp;
    agent_fp_slot *s = &t->slots[i];
    uint32_t gen = __atomic_add_fetch(&t->header.generations, 1, __ATOMIC_RELAXED);
    if (gen == 0)  /* 0 is never a generation: a zeroed slot names no worker */
        gen = __atomic_add_fetch(&t->header.generations, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->word, 0, __ATOMIC_RELEASE);
    s->app = (uint32_t)w->app;
    s->worker_pid = (uint32_t)w->pid;
    memset(s->socket, 0, sizeof s->socket);
    memcpy(s->socket, base, len);
    __atomic_store_n(&s->claims, 0, __ATOMIC_RELAXED);
    s->claim_ms = 0;
    memset(s->method, 0, sizeof s->method);
    memset(s->uri, 0, sizeof s->uri);
    e->fp_owner[i] = w;
    w->lane[lane] = (fp_lane){.slot = i, .gen = gen};
    if (__atomic_load_n(&t->header.slots_used, __ATOMIC_RELAXED) < (uint32_t)i + 1)
        __atomic_store_n(&t->header.slots_used, (uint32_t)i + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&s->word, lane_word(w, lane, AGENT_FP_IDLE, 0, 0), __ATOMIC_RELEASE);
}

/* A serving worker gets its lanes, but never a generic one (nginx's
 * workers speak only the frame and records to a worker); its socket must
 * be a short file name nginx finds in workers/ (fastpath.h). */
void fp_publish(agent_engine *e, worker *w)
{
    if (!e->fp || w->http || w->fp_lanes || w->removed || w->state != AGENT_WORKER_ACTIVE || w->app < 0
        || w->app >= AGENT_FP_APPS)
        return;
    const char *base = strrchr(w->addr.sun_path, '/');
    base = base ? base + 1 : w->addr.sun_path;
    size_t len = strlen(base);
    if (len == 0 || len >= AGENT_FP_SOCKET_MAX)
        return;
    int lanes = w->concurrency < AGENT_FP_LANES ? w->concurrency : AGENT_FP_LANES;
    int at = place(e, lanes);
    if (at < 0)
        return;  /* the slow path serves it */
    for (int l = 0; l < lanes; l++)
        publish_lane(e, w, l, lanes == 1 ? at : l * AGENT_FP_COLUMNS + at, base, len);
    w->fp_lanes = lanes;
    w->fp_engine_lanes = 0;
    w->fp_failed = w->fp_detached_seen = false;
}

/* The worker leaves the engine: its slots are FREE whatever they held. A
 * claimant still serving it finds another word at release and stores
 * nothing. */
void fp_unpublish(agent_engine *e, worker *w)
{
    for (int l = 0; l < w->fp_lanes; l++) {
        agent_fp_slot *s = lane_slot(e, w, l);
        if (s) {
            __atomic_store_n(&s->word, 0, __ATOMIC_RELEASE);
            e->fp_owner[w->lane[l].slot] = NULL;
        }
        w->lane[l].engine_claimed = false;
    }
    w->fp_lanes = 0;
    w->fp_engine_lanes = 0;
}

/* The engine's sessions that hold no lane, and how many it may have. */
static bool engine_has_room(const worker *w)
{
    return w->sessions - w->fp_engine_lanes < w->concurrency - w->fp_lanes;
}

static bool lane_idle(const agent_engine *e, const worker *w, int l)
{
    return agent_fp_load(&lane_slot(e, w, l)->word) == lane_word(w, l, AGENT_FP_IDLE, 0, 0);
}

/* The slow path may take the worker: room of its own, or an IDLE lane. */
bool fp_available(const agent_engine *e, const worker *w)
{
    if (!e->fp || !w->fp_lanes || engine_has_room(w))
        return true;
    if (w->fp_failed)
        return false;
    for (int l = 0; l < w->fp_lanes; l++)
        if (lane_idle(e, w, l))
            return true;
    return false;
}

/* The slow path takes the worker: FP_NO_LANE on its own room (used
 * first, leaving the lanes to nginx), a lane it claimed, or FP_REFUSED
 * when nginx holds every lane. */
int fp_claim(agent_engine *e, worker *w)
{
    if (!e->fp || !w->fp_lanes || engine_has_room(w))
        return FP_NO_LANE;
    if (w->fp_failed)
        return FP_REFUSED;
    for (int l = 0; l < w->fp_lanes; l++) {
        agent_fp_slot *s = lane_slot(e, w, l);
        uint64_t expected = lane_word(w, l, AGENT_FP_IDLE, 0, 0);
        if (!agent_fp_cas(&s->word, &expected, lane_word(w, l, AGENT_FP_CLAIMED, 0, e->fp_pid)))
            continue;
        __atomic_add_fetch(&s->claims, 1, __ATOMIC_RELAXED);
        w->lane[l].engine_claims++;
        w->lane[l].engine_claimed = true;
        w->fp_engine_lanes++;
        return l;
    }
    return FP_REFUSED;
}

/* The engine's session on `lane` ends: the slot goes back IDLE, DETACHED
 * (detach flag, or the worker is no longer active) or FAILED. */
void fp_release(agent_engine *e, worker *w, int lane, bool failed)
{
    agent_fp_slot *s = lane_slot(e, w, lane);
    if (!s || !w->lane[lane].engine_claimed)
        return;
    w->lane[lane].engine_claimed = false;
    w->fp_engine_lanes--;
    uint64_t expected = agent_fp_load(&s->word);
    for (;;) {
        if (agent_fp_kind(expected) != AGENT_FP_CLAIMED || agent_fp_pid(expected) != e->fp_pid
            || agent_fp_generation(expected) != w->lane[lane].gen)
            return;  /* not the engine's claim any more (the sweep took it): nothing to store */
        uint64_t desired;
        if (failed) {
            desired = lane_word(w, lane, AGENT_FP_FAILED, 0, 0);
        } else if ((agent_fp_flags(expected) & AGENT_FP_DETACH) || w->state != AGENT_WORKER_ACTIVE) {
            desired = lane_word(w, lane, AGENT_FP_DETACHED, 0, 0);
        } else {
            desired = lane_word(w, lane, AGENT_FP_IDLE, 0, 0);
        }
        if (agent_fp_cas(&s->word, &expected, desired))
            break;
    }
    if (failed)
        w->fp_failed = true;  /* the engine reported it itself */
    if (w->state != AGENT_WORKER_ACTIVE) {
        if (w->sessions == 0 && fp_nginx_lanes(e, w) == 0)
            w->fp_detached_seen = true;  /* end_session reports the idle worker */
        app *a = app_by_id(e, w->app);
        if (a)
            fp_app_update(e, a);
    }
}

/* The worker gets no new request: IDLE -> DETACHED on every lane; a
 * claimed one gets the DETACH flag and its claimant stores DETACHED at
 * release. */
void fp_detach(agent_engine *e, worker *w)
{
    for (int l = 0; l < w->fp_lanes; l++) {
        agent_fp_slot *s = lane_slot(e, w, l);
        if (!s)
            return;
        uint64_t expected = agent_fp_load(&s->word);
        for (;;) {
            if (agent_fp_generation(expected) != w->lane[l].gen)
                break;  /* garbage: the sweep fails it */
            uint64_t desired;
            uint32_t kind = agent_fp_kind(expected);
            if (kind == AGENT_FP_IDLE)
                desired = lane_word(w, l, AGENT_FP_DETACHED, 0, 0);
            else if (kind == AGENT_FP_CLAIMED && !(agent_fp_flags(expected) & AGENT_FP_DETACH))
                desired = expected | AGENT_FP_DETACH;
            else
                break;
            if (agent_fp_cas(&s->word, &expected, desired))
                break;
        }
    }
}

static bool nginx_holds(const agent_engine *e, const worker *w, int l)
{
    uint64_t word = agent_fp_load(&lane_slot(e, w, l)->word);
    return agent_fp_kind(word) == AGENT_FP_CLAIMED && agent_fp_generation(word) == w->lane[l].gen
           && agent_fp_pid(word) != e->fp_pid;
}

/* The lanes nginx holds: each one a session the engine does not see. */
int fp_nginx_lanes(const agent_engine *e, const worker *w)
{
    int n = 0;
    for (int l = 0; e->fp && l < w->fp_lanes; l++)
        n += nginx_holds(e, w, l);
    return n;
}

/* ------------------------------------------------------------------------ */
/* App rows                                                                 */

static agent_fp_app *row_of(const agent_engine *e, const app *a)
{
    return e->fp && a->id >= 0 && a->id < AGENT_FP_APPS ? &e->fp->apps[a->id] : NULL;
}

/* Seeds the counters' last values, so that what the row held before (a
 * previous app's, a previous core's) is not counted. */
static void row_seed(app *a, const agent_fp_app *r)
{
    a->fp_seen.queue_full = __atomic_load_n(&r->queue_full, __ATOMIC_RELAXED);
    a->fp_seen.queue_timeouts = __atomic_load_n(&r->queue_timeouts, __ATOMIC_RELAXED);
    a->fp_seen.request_timeouts = __atomic_load_n(&r->request_timeouts, __ATOMIC_RELAXED);
    a->fp_seen.failed = __atomic_load_n(&r->failed, __ATOMIC_RELAXED);
    for (int i = 0; i < AGENT_DURATION_BUCKETS; i++)
        a->fp_seen.buckets[i] = __atomic_load_n(&r->duration_buckets[i], __ATOMIC_RELAXED);
    a->fp_seen.sum_us = __atomic_load_n(&r->duration_sum_us, __ATOMIC_RELAXED);
}

static bool serves_fast_path(const worker *w)
{
    return w->fp_lanes && !w->fp_failed && w->state == AGENT_WORKER_ACTIVE;
}

/* The row's engine_spare: requests the app's workers could start now
 * outside their lanes (fastpath.h, "Lanes"). nginx that finds no IDLE
 * slot sends a request to agent.sock while it is not zero. */
void fp_spare_update(agent_engine *e, const app *a)
{
    agent_fp_app *r = row_of(e, a);
    if (!r || !a->fp_row)
        return;
    int spare = 0;
    for (int i = 0; i < e->nworkers; i++) {
        const worker *w = e->workers[i];
        if (w->app != a->id || w->state != AGENT_WORKER_ACTIVE || w->held || w->fp_failed)
            continue;
        int room = w->concurrency - w->fp_lanes - (w->sessions - w->fp_engine_lanes);
        spare += room > 0 ? room : 0;
    }
    if (__atomic_load_n(&r->engine_spare, __ATOMIC_RELAXED) != (uint32_t)spare)
        __atomic_store_n(&r->engine_spare, (uint32_t)spare, __ATOMIC_RELEASE);
}

/* A session of w began or ended. Only a worker with room beyond its lanes
 * changes the engine's spare (a worker of one request on its slot never
 * does): the relay's per-request path skips the count for the others. */
void fp_sessions_changed(agent_engine *e, const worker *w)
{
    if (!e->fp || w->concurrency <= w->fp_lanes)
        return;
    const app *a = app_by_id(e, w->app);
    if (a)
        fp_spare_update(e, a);
}

/* Writes the app's row, open iff has_worker (an active slotted worker),
 * no failure response and no HOLD (those apps need the core after every
 * request). A change of name closes the row while it is written. Rewriting
 * the engine's fields on every sweep also undoes whatever nginx wrote there. */
static void row_write(agent_engine *e, app *a, bool has_worker)
{
    agent_fp_app *r = row_of(e, a);
    if (!r)
        return;
    if (!a->fp_row) {
        __atomic_store_n(&r->open, 0, __ATOMIC_RELEASE);
        row_seed(a, r);
        a->fp_row = true;
    }
    a->fp_engine_queue = &r->engine_queue;
    app_queue_note(a);
    bool open = has_worker && !a->failure && !(a->notify & AGENT_NOTIFY_HOLD) && a->name_len <= AGENT_FP_NAME_MAX;
    bool same_name = a->name_len <= AGENT_FP_NAME_MAX && r->name_len == a->name_len
                     && memcmp(r->name, a->name, a->name_len) == 0;
    if (!open || !same_name)
        __atomic_store_n(&r->open, 0, __ATOMIC_RELEASE);
    if (a->name_len <= AGENT_FP_NAME_MAX && !same_name) {
        memset(r->name, 0, sizeof r->name);
        memcpy(r->name, a->name, a->name_len);
        r->name_len = (uint32_t)a->name_len;
    }
    r->max_queue = (uint32_t)a->max_queue;
    r->queue_timeout_ms = a->queue_timeout_ms;
    r->request_time_ms = a->request_time_ms;
    fp_spare_update(e, a);
    if (open)
        __atomic_store_n(&r->open, 1, __ATOMIC_RELEASE);
}

void fp_app_update(agent_engine *e, app *a)
{
    if (!row_of(e, a))
        return;
    bool has_worker = false;
    for (int i = 0; i < e->nworkers && !has_worker; i++)
        has_worker = e->workers[i]->app == a->id && serves_fast_path(e->workers[i]);
    row_write(e, a, has_worker);
}

/* The app leaves the table (or the engine stops): its row closes. */
void fp_app_removed(agent_engine *e, app *a)
{
    agent_fp_app *r = row_of(e, a);
    a->fp_engine_queue = NULL;
    if (!r || !a->fp_row)
        return;
    __atomic_store_n(&r->open, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&r->engine_queue, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&r->engine_spare, 0, __ATOMIC_RELAXED);
    a->fp_row = false;
}

/* Requests waiting in nginx for the app, clamped to its queue limit. */
uint32_t fp_waiting(const agent_engine *e, const app *a)
{
    const agent_fp_app *r = row_of(e, a);
    if (!r || !a->fp_row)
        return 0;
    uint32_t n = __atomic_load_n(&r->waiting, __ATOMIC_RELAXED);
    uint32_t cap = a->max_queue > 0 ? (uint32_t)a->max_queue : FP_WAITING_MAX;
    return n < cap ? n : cap;
}

/* ------------------------------------------------------------------------ */
/* The sweep                                                                */

/* A counter nginx adds to, as a delta since the last sweep: one that went
 * backwards is garbage (re-seeded, nothing counted), a jump is clamped. */
static uint64_t take_delta(uint64_t now, uint64_t *seen, uint64_t max)
{
    uint64_t before = *seen;
    *seen = now;
    if (now < before)
        return 0;
    return now - before < max ? now - before : max;
}

/* No such process. pid 0 or beyond any pid_max is garbage: never passed to
 * kill(), where 0 would mean a process group. */
static bool pid_gone(uint32_t pid)
{
    if (pid == 0 || pid > FP_PID_MAX)
        return true;
    return kill((pid_t)pid, 0) < 0 && errno == ESRCH;
}

/* nginx has a few worker processes and many slots: a sweep asks the kernel
 * about each claimant once. */
#define PID_CACHE 8
typedef struct {
    uint32_t pid[PID_CACHE];
    bool gone[PID_CACHE];
    int n;
} pid_cache;

static bool pid_gone_cached(pid_cache *c, uint32_t pid)
{
    for (int i = 0; i < c->n; i++)
        if (c->pid[i] == pid)
            return c->gone[i];
    bool gone = pid_gone(pid);
    if (c->n < PID_CACHE) {
        c->pid[c->n] = pid;
        c->gone[c->n++] = gone;
    }
    return gone;
}

/* A lane failed: the worker gets no more requests, on any lane. */
static void report_failed(agent_engine *e, worker *w, uint64_t word, int64_t ran_ms)
{
    w->fp_failed = true;
    for (int l = 0; l < w->fp_lanes; l++)
        w->lane[l].watching = false;
    bool timed_out = agent_fp_flags(word) & AGENT_FP_TIMED_OUT;
    w->state = AGENT_WORKER_DETACHED;
    fp_detach(e, w);
    worker_close_idle(e, w);
    if (timed_out)
        emit(e, AGENT_EV_REQUEST_TIMEOUT, w->app, w->pid, ran_ms,
             "a fast path request to worker pid %d ran past the app's time limit", w->pid);
    else
        emit(e, AGENT_EV_WORKER_FAILED, w->app, w->pid, 0, "worker pid %d failed on the fast path", w->pid);
    app *a = app_by_id(e, w->app);
    if (a)
        fp_app_update(e, a);
}

/* Marks the lane's slot FAILED (flags) from the word seen; false when the
 * word changed meanwhile (the next tick looks again). */
static bool fail_lane(worker *w, int l, agent_fp_slot *s, uint64_t *seen, uint32_t flags)
{
    uint64_t desired = lane_word(w, l, AGENT_FP_FAILED, flags, 0);
    if (!agent_fp_cas(&s->word, seen, desired))
        return false;
    *seen = desired;
    return true;
}

/* What a sweep saw of a worker's lanes. */
typedef struct {
    uint64_t delta;             /* requests nginx gave it since the last sweep */
    int nginx_claims;           /* lanes nginx holds */
    int idle, detached;         /* lanes IDLE, DETACHED */
} lane_sums;

/* A word only the transitions in fastpath.h can make, for this lane. */
static bool word_valid(const agent_engine *e, const worker *w, int l, uint64_t word)
{
    uint32_t kind = agent_fp_kind(word);
    uint32_t pid = agent_fp_pid(word);
    return agent_fp_generation(word) == w->lane[l].gen
           && !(agent_fp_flags(word) & ~(AGENT_FP_DETACH | AGENT_FP_TIMED_OUT | AGENT_FP_UNTIMED))
           && !((agent_fp_flags(word) & AGENT_FP_UNTIMED) && (kind != AGENT_FP_CLAIMED || pid == e->fp_pid))
           && (kind == AGENT_FP_IDLE || kind == AGENT_FP_CLAIMED || kind == AGENT_FP_DETACHED
               || kind == AGENT_FP_FAILED)
           && !(kind == AGENT_FP_CLAIMED && pid == e->fp_pid && !w->lane[l].engine_claimed)
           && !(kind != AGENT_FP_CLAIMED && pid != 0)
           && !(kind == AGENT_FP_DETACHED && w->state == AGENT_WORKER_ACTIVE);  /* only a detach sets DETACH */
}

/* One lane: its claims counted, its word checked, an nginx claim timed. */
static void sweep_lane(agent_engine *e, worker *w, int l, const app *a, pid_cache *pids, lane_sums *sum)
{
    agent_fp_slot *s = lane_slot(e, w, l);
    fp_lane *ln = &w->lane[l];
    uint64_t word = agent_fp_load(&s->word);
    uint32_t kind = agent_fp_kind(word);
    uint32_t pid = agent_fp_pid(word);

    /* Requests nginx gave the lane: the claims that are not the engine's. */
    uint64_t claims = __atomic_load_n(&s->claims, __ATOMIC_RELAXED);
    uint64_t delta = take_delta(claims, &ln->claims_seen, UINT64_MAX);
    delta = delta > ln->engine_claims ? delta - ln->engine_claims : 0;
    sum->delta += delta < FP_DELTA_MAX ? delta : FP_DELTA_MAX;
    ln->engine_claims = 0;

    if (w->fp_failed)
        return;
    if (!word_valid(e, w, l, word)) {
        if (fail_lane(w, l, s, &word, 0))
            report_failed(e, w, word, 0);
        return;
    }
    if (kind == AGENT_FP_CLAIMED && pid != e->fp_pid) {
        sum->nginx_claims++;
        if (pid_gone_cached(pids, pid)) {  /* an nginx worker died holding it */
            if (fail_lane(w, l, s, &word, 0))
                report_failed(e, w, word, 0);
            return;
        }
        if (agent_fp_flags(word) & AGENT_FP_UNTIMED) {  /* a tunnel: no time limit */
            ln->watching = false;
        } else if (!ln->watching || claims != ln->watch_claims) {
            ln->watching = true;
            ln->watch_claims = claims;
            ln->watch_since_ms = e->now_ms;
        } else if (a && a->request_time_ms
                   && e->now_ms - ln->watch_since_ms > (int64_t)a->request_time_ms + TICK_MS) {
            int64_t ran = e->now_ms - ln->watch_since_ms;
            if (fail_lane(w, l, s, &word, AGENT_FP_TIMED_OUT))
                report_failed(e, w, word, ran);
        }
        return;
    }
    ln->watching = false;
    if (kind == AGENT_FP_FAILED)
        report_failed(e, w, word, 0);
    sum->idle += kind == AGENT_FP_IDLE;
    sum->detached += kind == AGENT_FP_DETACHED;
}

static void sweep_worker(agent_engine *e, worker *w, pid_cache *pids)
{
    app *a = app_by_id(e, w->app);
    lane_sums sum = {0};
    for (int l = 0; l < w->fp_lanes; l++)
        sweep_lane(e, w, l, a, pids, &sum);

    if (!w->fp_failed && sum.detached == w->fp_lanes && !w->fp_detached_seen && w->sessions == 0) {
        w->fp_detached_seen = true;
        emit_coalesced(e, &w->idle_event, AGENT_EV_WORKER_IDLE, w->app, w->pid, (int64_t)(w->processed + sum.delta));
    }
    if (sum.delta > 0) {
        w->processed += sum.delta;
        if (a)
            a->requests += sum.delta;
    }
    if (sum.delta > 0 || sum.nginx_claims > 0) {
        w->last_used_ms = e->now_ms;
        w->last_use_seq = ++e->use_seq;
    }
    if (sum.delta > 0 && sum.idle == w->fp_lanes && w->sessions == 0 && !w->fp_failed && a
        && (a->notify & AGENT_NOTIFY_IDLE))
        emit_coalesced(e, &w->idle_event, AGENT_EV_WORKER_IDLE, w->app, w->pid, (int64_t)w->processed);
}

static void sweep_app(agent_engine *e, app *a, bool has_worker)
{
    agent_fp_app *r = row_of(e, a);
    if (!r || !a->fp_row)
        return;
    a->queue_full += take_delta(__atomic_load_n(&r->queue_full, __ATOMIC_RELAXED), &a->fp_seen.queue_full, FP_DELTA_MAX);
    a->queue_timeouts += take_delta(__atomic_load_n(&r->queue_timeouts, __ATOMIC_RELAXED), &a->fp_seen.queue_timeouts,
                                    FP_DELTA_MAX);
    a->request_timeouts += take_delta(__atomic_load_n(&r->request_timeouts, __ATOMIC_RELAXED),
                                      &a->fp_seen.request_timeouts, FP_DELTA_MAX);
    a->failed += take_delta(__atomic_load_n(&r->failed, __ATOMIC_RELAXED), &a->fp_seen.failed, FP_DELTA_MAX);
    uint64_t count = 0;
    for (int i = 0; i < AGENT_DURATION_BUCKETS; i++) {
        uint64_t d = take_delta(__atomic_load_n(&r->duration_buckets[i], __ATOMIC_RELAXED), &a->fp_seen.buckets[i],
                                FP_DELTA_MAX);
        a->duration_buckets[i] += d;
        count += d;
    }
    a->duration_count += count;
    a->duration_sum_us += take_delta(__atomic_load_n(&r->duration_sum_us, __ATOMIC_RELAXED), &a->fp_seen.sum_us,
                                     count * FP_DURATION_MAX_US);
    row_write(e, a, has_worker);
    uint32_t waiting = fp_waiting(e, a);
    if (waiting > 0 && (a->notify & AGENT_NOTIFY_QUEUED))
        emit_coalesced(e, &a->queued_event, AGENT_EV_QUEUED, a->id, 0, (int64_t)a->queue_length + waiting);
}

/* An nginx worker that died with requests waiting leaves its counts in
 * the rows: they are taken out, and its row freed. */
static void sweep_procs(agent_engine *e, pid_cache *pids)
{
    agent_fp_table *t = e->fp;
    for (int i = 0; i < AGENT_FP_PROCS; i++) {
        agent_fp_proc *p = &t->procs[i];
        uint32_t pid = __atomic_load_n(&p->pid, __ATOMIC_ACQUIRE);
        if (pid == 0 || !pid_gone_cached(pids, pid))
            continue;
        for (int j = 0; j < AGENT_FP_APPS; j++) {
            uint32_t mine = __atomic_load_n(&p->waiting[j], __ATOMIC_RELAXED);
            uint32_t seen = __atomic_load_n(&t->apps[j].waiting, __ATOMIC_RELAXED);
            while (mine > 0 && seen > 0) {
                uint32_t left = seen > mine ? seen - mine : 0;
                if (__atomic_compare_exchange_n(&t->apps[j].waiting, &seen, left, false, __ATOMIC_ACQ_REL,
                                                __ATOMIC_RELAXED))
                    break;
            }
            __atomic_store_n(&p->waiting[j], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&p->oldest_ms[j], 0, __ATOMIC_RELAXED);
        }
        uint32_t expected = pid;
        __atomic_compare_exchange_n(&p->pid, &expected, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
}

/* Every tick: the slots, the rows, the nginx processes. */
void fp_sweep(agent_engine *e)
{
    if (!e->fp)
        return;
    pid_cache pids = {.n = 0};
    bool has_worker[AGENT_FP_APPS] = {false};
    for (int i = 0; i < e->nworkers; i++) {
        worker *w = e->workers[i];
        if (!w->fp_lanes)
            continue;
        sweep_worker(e, w, &pids);
        if (serves_fast_path(w) && w->app >= 0 && w->app < AGENT_FP_APPS)
            has_worker[w->app] = true;
    }
    for (int i = 0; i < e->apps_cap && i < AGENT_FP_APPS; i++)
        if (e->apps[i])
            sweep_app(e, e->apps[i], has_worker[i]);
    sweep_procs(e, &pids);
}

/* nginx releases a worker to IDLE while the engine's queue for its app is
 * not empty, without telling the engine: its queue looks again every ms. */
void fp_retry_dispatch(agent_engine *e)
{
    bool again = false;
    for (int i = 0; i < e->apps_cap && i < AGENT_FP_APPS; i++) {
        app *a = e->apps[i];
        if (!a || a->queue_length == 0 || !a->fp_row || a->failure)
            continue;
        dispatch_queue(e, a);
        again |= a->queue_length > 0;
    }
    e->fp_retry = again;
    e->fp_retry_ms = e->now_ms + 1;
}

/* ------------------------------------------------------------------------ */
/* The requests nginx serves, for agent_engine_requests()                   */

/* Display text nginx wrote: up to its NUL within the field, every byte
 * outside printable ASCII shown as '?'. */
static void copy_display(char *out, size_t out_size, const volatile char *in, size_t in_size)
{
    size_t n = 0;
    for (; n < in_size && n + 1 < out_size; n++) {
        char ch = in[n];
        if (ch == '\0')
            break;
        out[n] = (unsigned char)ch >= 0x20 && (unsigned char)ch <= 0x7e ? ch : '?';
    }
    out[n] = '\0';
}

int fp_requests(agent_engine *e, agent_request_info *out, int n, int max, int64_t now_ms)
{
    if (!e->fp)
        return n;
    for (int i = 0; i < e->nworkers && n < max; i++) {
        worker *w = e->workers[i];
        for (int l = 0; l < w->fp_lanes && n < max; l++) {
            if (!nginx_holds(e, w, l))
                continue;
            agent_fp_slot *s = lane_slot(e, w, l);
            agent_request_info *r = &out[n++];
            int64_t claim_ms = (int64_t)(__atomic_load_n(&s->claim_ms, __ATOMIC_RELAXED) & INT64_MAX);
            r->app = w->app;
            r->pid = w->pid;
            r->state = AGENT_REQUEST_FORWARDING;
            r->age_ms = now_ms > claim_ms ? now_ms - claim_ms : 0;
            copy_display(r->method, sizeof r->method, s->method, sizeof s->method);
            copy_display(r->path, sizeof r->path, s->uri, sizeof s->uri);
        }
    }
    return n;
}
