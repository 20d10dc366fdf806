/*
 * Sessions and routing: the routing table, the connections to workers, a
 * request's session with a worker, and the bytes it moves both ways.
 *
 * Worker connections
 *   A worker connection (wconn) outlives the requests it carries: each
 *   worker keeps a list of idle ones, and has at most its concurrency open.
 *   A wconn is registered with epoll once, when it is opened. It is closed
 *   instead of reused when its request did not end cleanly (see
 *   response_complete), and when it turns readable while idle: the worker
 *   closed it, or sent bytes nobody asked for.
 */
#include "engine_internal.h"

#include <inttypes.h>
#include <stdlib.h>
#include <sys/epoll.h>

/* ------------------------------------------------------------------------ */
/* The routing table                                                        */

app *app_by_id(agent_engine *e, int id)
{
    return (id >= 0 && id < e->apps_cap) ? e->apps[id] : NULL;
}

app *app_by_name(agent_engine *e, const char *name, size_t len)
{
    for (int i = 0; i < e->apps_cap; i++) {
        app *a = e->apps[i];
        if (a && a->name_len == len && memcmp(a->name, name, len) == 0)
            return a;
    }
    return NULL;
}

int worker_index(agent_engine *e, int pid)
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
        if (w->app != app_id || w->state != AGENT_WORKER_ACTIVE || w->held || w->sessions >= w->concurrency
            || !fp_available(e, w))
            continue;
        if (!best || w->sessions < best->sessions
            || (w->sessions == best->sessions && w->last_use_seq < best->last_use_seq))
            best = w;
    }
    return best;
}

void app_free(app *a)
{
    shared_reply_release(&a->failure);
    free(a->name);
    free(a);
}

/* ------------------------------------------------------------------------ */
/* Worker connections                                                       */

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

void worker_close_idle(agent_engine *e, worker *w)
{
    while (!list_empty(&w->idle))
        wconn_close(e, CONTAINER_OF(w->idle.next, wconn, idle_link));
}

/* An idle connection the kernel calls readable: the worker closed it
 * (either side may close an idle connection at any time), reset it, or
 * sent bytes nobody asked for; all end it. Only an empty socket (a stale
 * edge) keeps it, which costs one read that returns EAGAIN. */
void idle_check(agent_engine *e, wconn *wc)
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
    int fd = socket(w->http ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        free(wc);
        return LOCAL_FAILURE;
    }
    int r;
    do
        r = w->http ? connect(fd, (const struct sockaddr *)&w->in_addr, sizeof w->in_addr)
                    : connect(fd, (const struct sockaddr *)&w->addr, w->addr_len);
    while (r < 0 && errno == EINTR);
    /* A TCP connect completes later: the socket turns writable when it
     * did, and a refusal shows as the first send's or read's error. */
    bool pending = r < 0 && w->http && errno == EINPROGRESS;
    if (r < 0 && !pending) {
        *err = errno;
        close(fd);
        free(wc);
        return (*err == ENOMEM || *err == ENOBUFS || *err == EADDRNOTAVAIL) ? LOCAL_FAILURE : WORKER_REFUSED;
    }
    /* A fresh connection has room for the frame; the worker has said nothing. */
    *wc = (wconn){.ep = {EP_WORKER, NULL, wc}, .fd = fd, .worker = w, .writable = !pending};
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
void end_session(agent_engine *e, conn *c, bool counted, bool reusable)
{
    worker *w = c->worker;
    wconn *wc = c->wc;
    c->wc = NULL;
    if (!w)
        return;
    c->worker = NULL;
    w->sessions--;
    fp_release(e, w, c->fp_lane, false);
    c->fp_lane = FP_NO_LANE;
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
    fp_sessions_changed(e, w);
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
    if (w->http)
        emit(e, AGENT_EV_WORKER_FAILED, w->app, w->pid, err, "cannot connect to worker pid %d at 127.0.0.1:%d: %s",
             w->pid, ntohs(w->in_addr.sin_port), strerror_r(err, text, sizeof text));
    else
        emit(e, AGENT_EV_WORKER_FAILED, w->app, w->pid, err, "cannot connect to worker pid %d at %s: %s",
             w->pid, w->addr.sun_path, strerror_r(err, text, sizeof text));
}

static void begin_session(agent_engine *e, conn *c, worker *w, wconn *wc)
{
    conn_leave_wait_list(c);
    c->state = CONN_FORWARDING;
    c->worker = w;
    c->wc = wc;
    wc->conn = c;
    w->sessions++;
    worker_touch(e, w);
    fp_sessions_changed(e, w);
    c->upstream_closed = c->worker_closed = c->response_bytes = false;
    c->response_started = c->malformed = false;
    c->rec = (record_decoder){0};
    c->draining = false;
    c->session_ms = e->now_ms;
    c->upstream_error = c->worker_error = 0;
    c->sent_any = false;
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
    conn_leave_wait_list(c);
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
    app_queue_note(a);
    if (a->fp_row)
        e->fp_retry = true;  /* nginx may hold the worker that would take it */
    if (a->notify & AGENT_NOTIFY_QUEUED)
        emit_coalesced(e, &a->queued_event, AGENT_EV_QUEUED, a->id, 0, a->queue_length);
}

/* A generic worker gets the frame as an HTTP/1.1 request head: up's frame
 * is replaced by the head, followed by the body bytes that came with the
 * frame. Done once per request, so that a request sent again (to another
 * worker of the app) goes as it is. False when c was answered. */
static bool make_http_head(agent_engine *e, app *a, conn *c)
{
    const char *vars = c->up + WIRE_U32_SIZE;
    uint32_t vars_size = c->frame_size - WIRE_U32_SIZE;
    size_t head_len = 0;
    if (http_head_build(vars, vars_size, NULL, 0, &head_len) != HTTP_HEAD_OK) {
        reply_text(e, c, 400, "Bad Request", false, "the request method cannot be sent to the app");
        return false;
    }
    uint32_t held = c->up_len - c->frame_size;
    size_t need = head_len + held;
    if (need > UINT32_MAX / 2) {
        reply_local_failure(e, c, a, EMSGSIZE);
        return false;
    }
    bool standard = need <= e->config.io_buffer_size;
    char *buf = standard ? buffer_get(e) : malloc(need);
    if (!buf) {
        reply_local_failure(e, c, a, ENOMEM);
        return false;
    }
    size_t written = 0;
    http_head_build(vars, vars_size, buf, need, &written);  /* the same bytes as measured */
    memcpy(buf + written, c->up + c->frame_size, held);
    buffer_put(e, c->up, c->up_cap);
    c->up = buf;
    c->up_cap = standard ? e->config.io_buffer_size : (uint32_t)need;
    c->up_pos = 0;
    c->up_len = (uint32_t)need;
    c->request_len = c->up_len;
    c->http_head = true;
    return true;
}

/* Hands a request to a worker of its app over an idle connection or a new
 * one, trying the next worker when one refuses the connection (the request
 * was not sent, so it is not lost), or queues it. at_head: it came from the
 * head of the queue. */
void route(agent_engine *e, app *a, conn *c, bool at_head)
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
        int lane = fp_claim(e, w);
        if (lane == FP_REFUSED)
            continue;  /* nginx took it first: pick again */
        if (w->http && !c->http_head && !make_http_head(e, a, c)) {
            fp_release(e, w, lane, false);
            return;
        }
        if (!c->down && !(c->down = buffer_get(e))) {
            fp_release(e, w, lane, false);
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
            c->fp_lane = lane;
            begin_session(e, c, w, wc);
            return;
        }
        if (r == LOCAL_FAILURE) {
            fp_release(e, w, lane, false);
            reply_local_failure(e, c, a, err);
            return;
        }
        worker_failed(e, w, err);
        fp_release(e, w, lane, true);
    }
}

/* Gives queued requests to free workers, oldest first. */
void dispatch_queue(agent_engine *e, app *a)
{
    while (a->queue_length > 0 && !a->failure && !list_empty(&a->queue)) {
        if (!pick_worker(e, a->id))
            return;
        conn *c = CONTAINER_OF(a->queue.next, conn, wait_link);
        conn_leave_wait_list(c);
        route(e, a, c, true);
    }
}

/* Answers every queued request of a failed app with its stored response. */
void answer_queue_with_failure(agent_engine *e, app *a)
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
 * worker's backlog, out of the engine's sight). The drain is bounded in
 * bytes and in time (see drain_abandon). A worker still owed body bytes
 * cannot finish cleanly: its connection is closed. So is a long response's
 * (agent_long_responses), which is not expected to end: the worker's next
 * write fails, which ends the app's response for it. And so is a
 * connection to a worker that serves many requests at once (threads,
 * ASGI): it tells the app that the client left (a failed write,
 * http.disconnect), and its other requests do not wait behind it. */
static void client_aborted(agent_engine *e, conn *c)
{
    if (c->worker->http) {
        /* One connection per request: closing it is the app's signal. */
        end_session(e, c, c->response_started, false);
        conn_release(e, c);
        return;
    }
    bool request_sent = !c->upstream_closed && c->body_remaining == 0 && c->up_pos == c->up_len;
    bool drain = !c->long_response && c->worker->concurrency == 1;
    if (request_sent && !c->worker_closed && !c->malformed && drain) {
        c->draining = true;
        c->drained = 0;
        c->drain_started_ms = e->now_ms;
        close_client(e, c);
        c->down_pos = c->down_len = 0;
        return;
    }
    end_session(e, c, c->response_started, false);
    conn_release(e, c);
}

/* A response nobody reads went past the drain's bounds in bytes or in
 * time (engine_api.h: drain_max_bytes, drain_max_ms): a stream that never
 * ends, or a worker stuck in it, would otherwise hold the session, and the
 * worker, for good. Its connection is closed mid-response, so its records
 * can never carry another request, and the worker is given up as one that
 * failed a connection: it gets no new request and the policy replaces it. */
void drain_abandon(agent_engine *e, conn *c, const char *why)
{
    worker *w = c->worker;
    w->state = AGENT_WORKER_DETACHED;
    worker_close_idle(e, w);
    emit(e, AGENT_EV_WORKER_FAILED, w->app, w->pid, 0,
         "worker pid %d kept a response going after nginx went away (past the drain's bound in %s: %" PRIu64
         " bytes in %" PRId64 " ms); connection closed",
         w->pid, why, c->drained, e->now_ms - c->drain_started_ms);
    end_session(e, c, false, false);
    conn_release(e, c);
}

/* The end record came and nginx has every byte. Closing nginx's
 * connection ends the response for it; the worker connection is kept
 * when it sits at a clean boundary: the worker got the whole request, sent
 * nothing after the end record and did not close. */
static void response_complete(agent_engine *e, conn *c)
{
    bool clean = !c->upstream_closed && c->body_remaining == 0 && c->up_pos == c->up_len
                 && !c->rec.extra && !c->worker_closed;
    if (c->rec.extra)
        emit(e, AGENT_EV_LOG, c->worker->app, c->worker->pid, 0,
             "worker pid %d sent bytes after a response's end record; connection closed", c->worker->pid);
    if (!c->draining)  /* else nobody got the response */
        record_duration(e, c);
    close_client(e, c);
    end_session(e, c, true, clean);
    conn_release(e, c);
}

/* A generic worker closed the connection after a response, all of which
 * nginx has: the response is whole (nginx's parser judges its framing). */
static void http_response_complete(agent_engine *e, conn *c)
{
    if (!c->draining)
        record_duration(e, c);
    close_client(e, c);
    end_session(e, c, true, false);
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
    if (a && w->http && !c->sent_any && !c->response_bytes
        && (c->upstream_error == ECONNREFUSED || c->worker_error == ECONNREFUSED)) {
        /* Nothing reached it: the worker is given up (before the session
         * ends, which may free a removed worker) and the request goes to
         * another one. */
        if (!w->removed)
            worker_failed(e, w, ECONNREFUSED);
        end_session(e, c, false, false);
        c->queued_ms = e->now_ms;
        route(e, a, c, true);
        return;
    }
    if (a && !w->http && may_replay(c)) {
        c->retried = true;
        end_session(e, c, false, false);
        c->queued_ms = e->now_ms;  /* should it wait, it waits from now, first in line */
        route(e, a, c, true);
        return;
    }
    if (c->malformed)
        emit(e, AGENT_EV_LOG, app_id, pid, 0, w->http
             ? "worker pid %d sent bytes that are not an HTTP/1.x response; connection closed"
             : "worker pid %d sent bytes that are not response records; connection closed", pid);
    if (c->response_started) {
        emit(e, AGENT_EV_LOG, app_id, pid, c->worker_error, w->http
             ? "worker pid %d reset a connection during a response"
             : "worker pid %d closed a connection before the response's end record", pid);
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
            c->sent_any = true;
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

/* The payload must begin as an HTTP/1.1 response before a byte of it goes
 * to nginx (see records_check_status_line). */
static void check_status_line(conn *c)
{
    if (c->response_started || c->malformed)
        return;
    status_line_check st = c->worker->http
        ? http_check_status_line(c->down + c->down_pos, c->down_len - c->down_pos, c->worker_closed)
        : records_check_status_line(c->down + c->down_pos, c->down_len - c->down_pos, c->rec.end);
    c->response_started = st == STATUS_LINE_OK;
    c->malformed = st == STATUS_LINE_BAD;
}

/* Reads from the worker once; false when nothing could be read. */
static bool read_response(conn *c)
{
    wconn *wc = c->wc;
    if (c->rec.end || c->worker_closed || c->malformed || c->down_len >= c->down_cap || !wc->readable)
        return false;
    size_t want = c->down_cap - c->down_len;
    ssize_t n = read(wc->fd, c->down + c->down_len, want);
    if (n > 0) {
        c->response_bytes = true;
        if (c->draining)
            c->drained += (uint64_t)n;
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
        if (c->worker->http)
            c->down_len += (uint32_t)n;  /* raw HTTP, until the worker closes */
        else
            records_take(&c->rec, c->down, &c->down_pos, &c->down_len, (uint32_t)n);
        check_status_line(c);
        return true;
    }
    if (n == 0) {
        c->worker_closed = true;
        if (c->worker->http && c->response_bytes)
            check_status_line(c);  /* a generic worker's few bytes are judged at its end */
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
void pump(agent_engine *e, conn *c)
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
        if (c->rec.end && !c->malformed && flushed) {
            response_complete(e, c);
            return;
        }
        /* A generic worker's response ends when it closes the connection. */
        if (c->worker->http && c->worker_closed && !c->worker_error && c->response_started && !c->malformed
            && flushed) {
            http_response_complete(e, c);
            return;
        }
        /* Bytes of a cut-off response still go to nginx before it is closed. */
        if ((c->worker_closed || c->malformed) && (flushed || !c->response_started)) {
            response_failed(e, c);
            return;
        }
        if (c->draining && c->drained > e->config.drain_max_bytes) {
            drain_abandon(e, c, "bytes");
            return;
        }
        if (!moved)
            return;
    }
}

