/*
 * The engine's thread: it accepts nginx's connections, reads each request
 * frame and hands it to session.c, and runs the timers.
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
 *   A hello-world request on a kept worker connection costs the loop 8
 *   system calls: accept4, getsockopt (who connected: only nginx's workers
 *   and the agent may), read (the frame), send (the frame), epoll_wait,
 *   read (the response and its end record), send (the response), close
 *   (nginx's connection), and a share of epoll_wait for the accept. No
 *   allocation, no log, and the worker is woken only by the frame.
 *
 * Timers
 *   There is no timer per request. Every TICK_MS the loop scans the
 *   connections still sending their frame (frame timeout), the queues
 *   (queue timeout) and the sessions (request time limit, the drain's time
 *   bound, and see watch_client); the clock is read
 *   once per batch.
 */
#include "engine_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>

#define EVENTS_PER_WAIT 256

/* ------------------------------------------------------------------------ */
/* Reading and validating the frame                                         */

/* A frame that cannot be one: answer 400, log why, close. */
static void reject_frame(agent_engine *e, conn *c, const char *why)
{
    emit(e, AGENT_EV_LOG, -1, 0, 0, "malformed request frame: %s", why);
    reply_text(e, c, 400, "Bad Request", false, "malformed request frame (%.*s)", REPLY_DETAIL_MAX, why);
}

static void reject_malformed(agent_engine *e, conn *c, frame_status status, const frame_info *info)
{
    char why[160];
    frame_describe(status, info, why, sizeof why);
    reject_frame(e, c, why);
}

/* Copies at most size - 1 bytes and always terminates, for a C string
 * made from a length-prefixed value. */
static void copy_truncated(char *dst, size_t size, const char *src, uint32_t len)
{
    size_t n = len < size - 1 ? len : size - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* The whole of vars is in the buffer: validate, find the app, route. */
static void frame_complete(agent_engine *e, conn *c)
{
    frame_info info = {0};
    frame_status status = frame_parse_vars(c->up + WIRE_U32_SIZE, c->frame_size - WIRE_U32_SIZE, &info);
    if (status != FRAME_OK) {
        reject_malformed(e, c, status, &info);
        return;
    }
    /* Body bytes that came with the frame are forwarded with it; anything
     * past the body is not part of this request, except on a tunnel: there
     * every byte nginx sends after the frame goes to the worker. */
    uint64_t held = c->up_len - c->frame_size;
    if (held > info.content_length && !info.upgrade) {
        held = info.content_length;
        c->up_len = c->frame_size + (uint32_t)held;
    }
    c->body_remaining = info.upgrade ? UINT64_MAX : info.content_length - held;
    c->replayable = info.content_length == 0 && !info.upgrade;
    c->long_response = info.long_response || info.upgrade;
    c->request_len = c->up_len;
    conn_leave_wait_list(c);

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

/* The 4 size bytes came: a bad size is answered at once, without reading
 * the rest; a good one may need a bigger buffer. False when c was ended. */
static bool frame_size_known(agent_engine *e, conn *c)
{
    frame_info info;
    frame_status status = frame_check_head(c->up, e->config.max_frame_size, &info);
    if (status != FRAME_OK) {
        reject_malformed(e, c, status, &info);
        return false;
    }
    c->frame_size = info.vars_size + WIRE_U32_SIZE;
    if (c->frame_size > c->up_cap && !grow_frame_buffer(e, c)) {
        emit(e, AGENT_EV_LOG, -1, 0, ENOMEM, "out of memory for a %" PRIu32 "-byte request frame", c->frame_size);
        conn_release(e, c);
        return false;
    }
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
        if (!c->frame_size && c->up_len >= WIRE_U32_SIZE && !frame_size_known(e, c))
            return;
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

/* A refusal is logged at once, then at most every REFUSED_LOG_INTERVAL_MS
 * with the count since: a peer that keeps trying cannot flood the log. */
static void refuse_peer(agent_engine *e, long uid, int pid, int err)
{
    e->refused_peers++;
    if (e->now_ms < e->refused_log_next_ms)
        return;
    uint64_t since = e->refused_peers - e->refused_logged;
    e->refused_logged = e->refused_peers;
    e->refused_log_next_ms = e->now_ms + REFUSED_LOG_INTERVAL_MS;
    if (err) {
        char text[128];
        emit(e, AGENT_EV_LOG, -1, 0, err, "agent socket: cannot read a peer's credentials (%s); connection closed",
             strerror_r(err, text, sizeof text));
        return;
    }
    emit(e, AGENT_EV_LOG, -1, pid, uid,
         "agent socket: refused %" PRIu64 " connection(s) from a uid that is not nginx's workers' nor the agent's "
         "(latest: uid %ld, pid %d); closed unread",
         since, uid, pid);
}

/* Only nginx's workers and the agent itself may hand the engine requests
 * (agent_engine_allow_peers): anyone else who reaches the socket could
 * claim any app, client address or header. The kernel's SO_PEERCRED says
 * who connected, whatever the socket file's mode lets through. */
static bool peer_allowed(agent_engine *e, int fd)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        refuse_peer(e, -1, 0, errno);
        return false;
    }
    for (int i = 0; i < e->npeer_uids; i++)
        if (e->peer_uids[i] == cred.uid)
            return true;
    refuse_peer(e, (long)cred.uid, (int)cred.pid, 0);
    return false;
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
        if (peer_allowed(e, fd))
            start_connection(e, fd);
        else
            close(fd);  /* nothing read, nothing said */
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
        if (a && a->request_time_ms && !c->long_response && e->now_ms - c->session_ms >= (int64_t)a->request_time_ms)
            request_timed_out(e, c, a);
        else if (c->draining && e->now_ms - c->drain_started_ms >= (int64_t)e->config.drain_max_ms)
            drain_abandon(e, c, "time");
    }
}

static void check_frame_times(agent_engine *e)
{
    while (!list_empty(&e->reading_conns)) {
        conn *c = CONTAINER_OF(e->reading_conns.next, conn, wait_link);
        if (e->now_ms - c->started_ms < (int64_t)e->config.frame_timeout_ms)
            break;  /* the list is in arrival order */
        emit(e, AGENT_EV_LOG, -1, 0, 0, "request frame not received within %" PRIu32 " ms; connection closed",
             e->config.frame_timeout_ms);
        conn_release(e, c);
    }
}

static void check_queue_times(agent_engine *e)
{
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
}

/* Every TICK_MS: frame timeouts, queue timeouts, request time limits,
 * sessions to watch, a paused accept. */
static void on_tick(agent_engine *e)
{
    check_frame_times(e);
    check_queue_times(e);
    check_request_times(e);
    fp_sweep(e);
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
void close_all_connections(agent_engine *e)
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

void *engine_loop(void *arg)
{
    agent_engine *e = arg;
    struct epoll_event events[EVENTS_PER_WAIT];
    for (;;) {
        int64_t wait_ms = e->next_tick_ms - monotonic_ms();
        if (e->fp_retry && wait_ms > 1)  /* only this thread writes it */
            wait_ms = 1;
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
        if (e->fp_retry && e->now_ms >= e->fp_retry_ms)
            fp_retry_dispatch(e);
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

