/*
 * engine_api.h: the calls the policy makes, from any thread. Each holds the
 * engine's lock while it reads or changes the routing table, and leaves
 * socket work to the loop behind the wake-up eventfd.
 */
#include "engine_internal.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#define DEFAULT_MAX_FRAME_SIZE (1u << 20)
#define DEFAULT_IO_BUFFER_SIZE (64u << 10)
#define MIN_IO_BUFFER_SIZE 1024u
#define DEFAULT_FRAME_TIMEOUT_MS 60000u
#define MAX_APP_ID 65535
/* A response nobody reads any more is drained at most this far (engine_api.h:
 * the worker is given up past it): enough for a page being finished, not for
 * a stream that never ends. */
#define DEFAULT_DRAIN_MAX_BYTES (1u << 20)
#define DEFAULT_DRAIN_MAX_MS 5000u

/* engine_api.h: 0 means the default. */
static agent_engine_config config_with_defaults(const agent_engine_config *given)
{
    agent_engine_config c = *given;
    if (!c.max_frame_size)
        c.max_frame_size = DEFAULT_MAX_FRAME_SIZE;
    if (!c.io_buffer_size)
        c.io_buffer_size = DEFAULT_IO_BUFFER_SIZE;
    if (c.io_buffer_size < MIN_IO_BUFFER_SIZE)
        c.io_buffer_size = MIN_IO_BUFFER_SIZE;
    if (!c.frame_timeout_ms)
        c.frame_timeout_ms = DEFAULT_FRAME_TIMEOUT_MS;
    if (!c.drain_max_bytes)
        c.drain_max_bytes = DEFAULT_DRAIN_MAX_BYTES;
    if (!c.drain_max_ms)
        c.drain_max_ms = DEFAULT_DRAIN_MAX_MS;
    return c;
}

agent_engine *agent_engine_new(const agent_engine_config *config)
{
    if (!config || config->listen_fd < 0) {
        errno = EINVAL;
        return NULL;
    }
    agent_engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->config = config_with_defaults(config);
    e->epoll_fd = e->wake_fd = e->notify_fd = -1;
    list_init(&e->all_conns);
    list_init(&e->reading_conns);
    e->listener_ep.kind = EP_LISTENER;
    e->wake_ep.kind = EP_WAKE;
    e->peer_uids[0] = geteuid();
    e->npeer_uids = 1;

    int err = pthread_mutex_init(&e->lock, NULL);
    if (err) {
        free(e);
        errno = err;
        return NULL;
    }
    bool rings = events_init(e);
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
    fp_detach_table(e);
    conn_pools_free(e);
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
    events_free(e);
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
    int n = events_take(e, out, max);
    pthread_mutex_unlock(&e->lock);
    return n;
}

int agent_engine_allow_peers(agent_engine *e, const unsigned int *uids, int count)
{
    if (!uids || count < 1 || count > AGENT_MAX_PEER_UIDS)
        return -EINVAL;
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < count; i++)
        e->peer_uids[i] = (uid_t)uids[i];
    e->npeer_uids = count;
    pthread_mutex_unlock(&e->lock);
    return 0;
}

uint64_t agent_engine_refused_peers(agent_engine *e)
{
    pthread_mutex_lock(&e->lock);
    uint64_t n = e->refused_peers;
    pthread_mutex_unlock(&e->lock);
    return n;
}

static void wake_loop(agent_engine *e)
{
    eventfd_signal(e->wake_fd);
}

/* The app with this id, made (with the table grown) when there is none;
 * NULL when out of memory. */
static app *app_slot(agent_engine *e, int app_id)
{
    if (app_id >= e->apps_cap) {
        int cap = e->apps_cap ? e->apps_cap : 8;
        while (cap <= app_id)
            cap *= 2;
        app **bigger = realloc(e->apps, sizeof *bigger * (size_t)cap);
        if (!bigger)
            return NULL;
        memset(bigger + e->apps_cap, 0, sizeof *bigger * (size_t)(cap - e->apps_cap));
        e->apps = bigger;
        e->apps_cap = cap;
    }
    app *a = e->apps[app_id];
    if (!a && (a = calloc(1, sizeof *a))) {
        a->id = app_id;
        a->notify = AGENT_NOTIFY_QUEUED | AGENT_NOTIFY_IDLE;
        list_init(&a->queue);
        e->apps[app_id] = a;
    }
    return a;
}

int agent_engine_app_set(agent_engine *e, int app_id, const char *name, int max_queue, uint32_t queue_timeout_ms)
{
    if (app_id < 0 || app_id > MAX_APP_ID || !name || max_queue < 0)
        return -EINVAL;
    char *copy = strdup(name);
    if (!copy)
        return -ENOMEM;
    pthread_mutex_lock(&e->lock);
    app *a = app_slot(e, app_id);
    if (!a) {
        pthread_mutex_unlock(&e->lock);
        free(copy);
        return -ENOMEM;
    }
    free(a->name);
    a->name = copy;
    a->name_len = strlen(copy);
    a->max_queue = max_queue;
    a->queue_timeout_ms = queue_timeout_ms;
    fp_app_update(e, a);
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
    fp_app_removed(e, a);
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
    fp_app_update(e, a);
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
    fp_app_update(e, a);
    pthread_mutex_unlock(&e->lock);
    if (hold_off)
        wake_loop(e);
    return 0;
}

int agent_engine_app_request_time(agent_engine *e, int app_id, uint32_t max_request_time_ms)
{
    pthread_mutex_lock(&e->lock);
    app *a = app_by_id(e, app_id);
    if (a) {
        a->request_time_ms = max_request_time_ms;
        fp_app_update(e, a);
    }
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
    fp_app_update(e, a);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

/* Room in the worker table for one more; false when out of memory. */
static bool workers_room(agent_engine *e)
{
    if (e->nworkers < e->workers_cap)
        return true;
    int cap = e->workers_cap ? e->workers_cap * 2 : 16;
    worker **bigger = realloc(e->workers, sizeof *bigger * (size_t)cap);
    if (!bigger)
        return false;
    e->workers = bigger;
    e->workers_cap = cap;
    return true;
}

static int worker_insert(agent_engine *e, worker *w);

/* A serving worker, not yet in the table; NULL when out of memory. */
static worker *worker_new(int app_id, int pid, int concurrency)
{
    worker *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->pid = pid;
    w->app = app_id;
    w->state = AGENT_WORKER_ACTIVE;
    w->concurrency = concurrency;
    list_init(&w->idle);
    return w;
}

int agent_engine_worker_add(agent_engine *e, int app_id, int pid, const char *socket_path, int concurrency)
{
    if (!socket_path || concurrency < 1 || pid <= 0)
        return -EINVAL;
    size_t path_len = strlen(socket_path);
    if (path_len == 0 || path_len >= sizeof ((worker *)0)->addr.sun_path)
        return -ENAMETOOLONG;
    worker *w = worker_new(app_id, pid, concurrency);
    if (!w)
        return -ENOMEM;
    w->addr.sun_family = AF_UNIX;
    memcpy(w->addr.sun_path, socket_path, path_len + 1);
    w->addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len + 1);
    return worker_insert(e, w);
}

int agent_engine_worker_add_http(agent_engine *e, int app_id, int pid, int port, int concurrency)
{
    if (concurrency < 1 || pid <= 0 || port < 1 || port > 65535)
        return -EINVAL;
    worker *w = worker_new(app_id, pid, concurrency);
    if (!w)
        return -ENOMEM;
    w->http = true;
    w->in_addr.sin_family = AF_INET;
    w->in_addr.sin_port = htons((uint16_t)port);
    w->in_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return worker_insert(e, w);
}

/* Adds w to the table (it is freed when that fails). */
static int worker_insert(agent_engine *e, worker *w)
{
    int app_id = w->app, pid = w->pid;
    pthread_mutex_lock(&e->lock);
    int err = 0;
    app *a = app_by_id(e, app_id);
    if (!a)
        err = -ENOENT;
    else if (worker_index(e, pid) >= 0)
        err = -EEXIST;
    else if (!workers_room(e))
        err = -ENOMEM;
    if (err) {
        pthread_mutex_unlock(&e->lock);
        free(w);
        return err;
    }
    w->last_used_ms = monotonic_ms();
    e->workers[e->nworkers++] = w;
    fp_publish(e, w);
    fp_app_update(e, a);
    a->needs_dispatch = true;
    pthread_mutex_unlock(&e->lock);
    wake_loop(e);
    return 0;
}

/* Runs change on worker pid under the lock, then wakes the loop when
 * change says it left the loop work. */
static int change_worker(agent_engine *e, int pid, bool (*change)(agent_engine *, worker *))
{
    pthread_mutex_lock(&e->lock);
    int i = worker_index(e, pid);
    bool wake = i >= 0 && change(e, e->workers[i]);
    pthread_mutex_unlock(&e->lock);
    if (wake)
        wake_loop(e);
    return i >= 0 ? 0 : -ENOENT;
}

/* The loop closes the worker's idle connections (API calls do no socket
 * work); it gets no request from now on either way. */
static bool detach_worker(agent_engine *e, worker *w)
{
    w->state = AGENT_WORKER_DETACHED;
    fp_detach(e, w);
    app *a = app_by_id(e, w->app);
    if (a)
        fp_app_update(e, a);
    w->close_idle = !list_empty(&w->idle);
    return w->close_idle;
}

int agent_engine_worker_detach(agent_engine *e, int pid)
{
    return change_worker(e, pid, detach_worker);
}

/* Ends a HOLD (AGENT_NOTIFY_HOLD): the worker takes requests again, the
 * app's queue first. */
static bool release_worker(agent_engine *e, worker *w)
{
    if (!w->held)
        return false;
    app *a = app_by_id(e, w->app);
    w->held = false;
    if (a && a->queue_length > 0)
        a->needs_dispatch = true;
    return a && a->queue_length > 0;
}

int agent_engine_worker_release(agent_engine *e, int pid)
{
    return change_worker(e, pid, release_worker);
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
    fp_unpublish(e, w);
    app *a = app_by_id(e, w->app);
    if (a)
        fp_app_update(e, a);
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
        /* A lane nginx holds is a session the engine does not see. */
        out[n] = (agent_worker_stats){w->pid, w->app, w->state, w->concurrency, w->sessions + fp_nginx_lanes(e, w),
                                      w->processed, w->last_used_ms};
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
        int busy = w->sessions + fp_nginx_lanes(e, w);
        if (w->app == app_id && w->state == AGENT_WORKER_ACTIVE && !w->held && busy < w->concurrency
            && fp_available(e, w))
            slots += w->concurrency - busy;
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
        /* Requests waiting in nginx's workers wait for this app too. */
        out[n++] = (agent_app_stats){a->id, a->queue_length + (int)fp_waiting(e, a), a->requests,
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
    n = fp_requests(e, out, n, max, now_us / 1000);
    pthread_mutex_unlock(&e->lock);
    return n;
}

int agent_engine_fastpath_attach(agent_engine *e, const char *path, int nginx_uid)
{
    if (!path)
        return -EINVAL;
    pthread_mutex_lock(&e->lock);
    int r = fp_attach(e, path, nginx_uid);
    pthread_mutex_unlock(&e->lock);
    if (r == 0)
        wake_loop(e);
    return r;
}

int agent_engine_fastpath_attached(agent_engine *e)
{
    pthread_mutex_lock(&e->lock);
    int r = e->fp != NULL;
    pthread_mutex_unlock(&e->lock);
    return r;
}
