/*
 * Connection records and their buffers, recycled through free lists, and
 * the responses the engine makes itself (docs/protocol.md §1's table).
 */
#include "engine_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>

#define FREE_BUFFERS_KEPT 256      /* idle buffers kept for reuse; more are freed */
#define FREE_CONNS_KEPT 1024

char *buffer_get(agent_engine *e)
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
void buffer_put(agent_engine *e, char *buf, uint32_t cap)
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

conn *conn_get(agent_engine *e)
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

void conn_leave_wait_list(conn *c)
{
    if (!c->in_wait_list)
        return;
    if (c->queued_in) {
        c->queued_in->queue_length--;
        app_queue_note(c->queued_in);
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
void unwatch_and_close(agent_engine *e, int *fd)
{
    if (*fd >= 0 && epoll_ctl(e->epoll_fd, EPOLL_CTL_DEL, *fd, NULL) < 0 && errno != ENOENT)
        emit(e, AGENT_EV_LOG, -1, 0, errno, "epoll_ctl(EPOLL_CTL_DEL): %s", strerror(errno));
    close_fd(fd);
}

void close_client(agent_engine *e, conn *c)
{
    if (c->client_watched)
        unwatch_and_close(e, &c->client_fd);
    else
        close_fd(&c->client_fd);
    c->client_watched = false;
}

/* Closes nginx's socket and hands the record to the end of the batch.
 * The session, if any, has been ended by the caller (end_session). */
void conn_release(agent_engine *e, conn *c)
{
    if (c->state == CONN_DONE)
        return;
    conn_leave_wait_list(c);
    list_unlink(&c->all_link);
    close_client(e, c);
    buffer_put(e, c->up, c->up_cap);
    buffer_put(e, c->down, c->down_cap);
    c->up = c->down = NULL;
    shared_reply_release(&c->reply_shared);
    c->state = CONN_DONE;
    c->next_free = e->dead_conns;
    e->dead_conns = c;
}

/* Called once the batch that may still mention them is over. */
void recycle_dead_conns(agent_engine *e)
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


/* The free lists, when the engine goes. */
void conn_pools_free(agent_engine *e)
{
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
}

/* ------------------------------------------------------------------------ */
/* Responses the engine makes                                               */

void shared_reply_release(shared_reply **r)
{
    if (*r && --(*r)->refs == 0)
        free(*r);
    *r = NULL;
}

/* The nginx socket joins the epoll set only when the engine must wait
 * for it: the frame is incomplete, the request is queued, a buffer is
 * full, or a session outlives a tick. A hello-world request, whose frame
 * is there at accept time and whose response fits the socket buffer,
 * never needs it, which saves an epoll_ctl() per request. Registering an
 * already ready socket reports it at once, so no edge is missed. */
bool watch_client(agent_engine *e, conn *c)
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
void record_duration(agent_engine *e, const conn *c)
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

void continue_reply(agent_engine *e, conn *c);

/* Starts sending a response held by the conn or shared by an app. Any
 * worker connection has been ended by the caller. */
void start_reply(agent_engine *e, conn *c, const char *data, size_t len, shared_reply *shared)
{
    /* An answer for an app ends the request's duration now: the rest is
     * one send that the socket buffer takes whole. Without an app (a
     * malformed frame, an unknown app) there is no histogram to count in. */
    if (c->app_id >= 0)
        record_duration(e, c);
    conn_leave_wait_list(c);
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
void reply_text(agent_engine *e, conn *c, int status, const char *reason, bool retry_after,
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

void continue_reply(agent_engine *e, conn *c)
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
