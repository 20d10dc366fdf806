
/*
 * The fast path's claims (docs/protocol.md section 5): a request's app row,
 * the claim of an idle worker's slot, or a place in this process's FIFO
 * until a release hands it a worker or its queue time limit ends; the
 * release once per claim, with the hand-off to the oldest waiter; and the
 * connections kept to the workers between claims.  The table these work on
 * is set up in ngx_http_agent_fastpath.c.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_fastpath.h"


#define NGX_HTTP_AGENT_FP_FAIR_MS  2


static ngx_int_t ngx_http_agent_fp_find_row(ngx_http_agent_loc_conf_t *alcf);
static ngx_uint_t ngx_http_agent_fp_row_serves(ngx_http_request_t *r,
    ngx_uint_t row);
static ngx_int_t ngx_http_agent_fp_claim(ngx_uint_t row, ngx_uint_t *slot,
    uint32_t *generation);
static ngx_int_t ngx_http_agent_fp_wait(ngx_http_request_t *r,
    ngx_http_agent_ctx_t *ctx);
static void ngx_http_agent_fp_leave(ngx_http_agent_ctx_t *ctx);
static void ngx_http_agent_fp_dispatch(ngx_http_agent_ctx_t *ctx);
static void ngx_http_agent_fp_hand_off(ngx_http_agent_ctx_t *next);
static void ngx_http_agent_fp_run_handler(ngx_event_t *ev);
static void ngx_http_agent_fp_wait_timeout(ngx_event_t *ev);
static void ngx_http_agent_fp_check_client(ngx_http_request_t *r);
static void ngx_http_agent_fp_cleanup(void *data);
static ngx_uint_t ngx_http_agent_fp_others_older(ngx_uint_t row,
    uint64_t ours);
static void ngx_http_agent_fp_keep_close_handler(ngx_event_t *ev);
static void ngx_http_agent_fp_keep_dummy_handler(ngx_event_t *ev);
static void ngx_http_agent_fp_close(ngx_connection_t *c);


/* the kept connections: one per slot, for the generation that made it */
typedef struct {
    ngx_connection_t      *connection;
    uint32_t               generation;
} ngx_http_agent_fp_kept_t;

static ngx_http_agent_fp_kept_t  ngx_http_agent_fp_cache[AGENT_FP_SLOTS];


static ngx_str_t  ngx_http_agent_fp_queue_full =
    ngx_string("503 Service Unavailable: request queue full\n");
static ngx_str_t  ngx_http_agent_fp_queue_timeout =
    ngx_string("504 Gateway Timeout: waited too long for a worker\n");


/* ------------------------------------------------------------------------ */
/* a request: the row, a claim, or a place in the queue                      */

/*
 * After the body is read.  NGX_DECLINED: the slow path (agent.sock);
 * NGX_OK: a worker is claimed (ctx->slot); NGX_DONE: the request waits, or
 * has been answered (503).
 */

ngx_int_t
ngx_http_agent_fp_start(ngx_http_request_t *r, ngx_http_agent_ctx_t *ctx)
{
    ngx_int_t                   row;
    ngx_pool_cleanup_t         *cln;
    ngx_http_agent_loc_conf_t  *alcf;

    if (ngx_http_agent_fp_table == NULL) {
        return NGX_DECLINED;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);

    /* the engine watches a long response's client (agent_long_responses) */
    if (!alcf->fast_path || alcf->long_responses) {
        return NGX_DECLINED;
    }

    row = ngx_http_agent_fp_find_row(alcf);
    if (row < 0) {
        return NGX_DECLINED;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_DECLINED;
    }

    cln->handler = ngx_http_agent_fp_cleanup;
    cln->data = ctx;

    ctx->request = r;
    ctx->row = row;
    ctx->body_read_us = ngx_http_agent_fp_now_us();

    if (__atomic_load_n(&ngx_http_agent_fp_table->apps[row].waiting,
                        __ATOMIC_ACQUIRE) == 0
        && ngx_http_agent_fp_claim(row, &ctx->slot, &ctx->generation)
           == NGX_OK)
    {
        ctx->claimed = 1;
        return NGX_OK;
    }

    /* no slot is idle, but the engine could start the request now (a
     * worker's concurrency beyond its lanes, fastpath.h) */
    if (__atomic_load_n(&ngx_http_agent_fp_table->apps[row].engine_spare,
                        __ATOMIC_ACQUIRE) != 0)
    {
        return NGX_DECLINED;
    }

    return ngx_http_agent_fp_wait(r, ctx);
}


/* the open row named as the location's app; cached per location */

static ngx_int_t
ngx_http_agent_fp_find_row(ngx_http_agent_loc_conf_t *alcf)
{
    ngx_str_t       *name;
    ngx_uint_t       i;
    agent_fp_app    *a;

    name = &alcf->app->name;

    if (name->len > AGENT_FP_NAME_MAX) {
        return -1;
    }

    i = alcf->fp_row ? alcf->fp_row - 1 : 0;

    for (/* void */ ; i < AGENT_FP_APPS; i++) {
        a = &ngx_http_agent_fp_table->apps[i];

        if (__atomic_load_n(&a->open, __ATOMIC_ACQUIRE) == 1
            && a->name_len == name->len
            && ngx_memcmp(a->name, name->data, name->len) == 0)
        {
            alcf->fp_row = i + 1;
            return i;
        }

        if (alcf->fp_row) {
            /* the cached row changed: look at all of them */
            alcf->fp_row = 0;
            i = (ngx_uint_t) -1;
        }
    }

    return -1;
}


/*
 * The row still serves the request's app: open, and the same name.  A core
 * that restarts gives its rows anew, so a request that waited may find its
 * row serving another app (or none): it must not claim there.
 */

static ngx_uint_t
ngx_http_agent_fp_row_serves(ngx_http_request_t *r, ngx_uint_t row)
{
    ngx_str_t                  *name;
    agent_fp_app               *a;
    ngx_http_agent_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);
    name = &alcf->app->name;
    a = &ngx_http_agent_fp_table->apps[row];

    return __atomic_load_n(&a->open, __ATOMIC_ACQUIRE) == 1
           && a->name_len == name->len
           && name->len <= AGENT_FP_NAME_MAX
           && ngx_memcmp(a->name, name->data, name->len) == 0;
}


/* CAS IDLE|gen -> CLAIMED|pid|gen on one of the row's slots */

static ngx_int_t
ngx_http_agent_fp_claim(ngx_uint_t row, ngx_uint_t *slot,
    uint32_t *generation)
{
    uint64_t        w;
    uint32_t        used;
    ngx_uint_t      i;
    agent_fp_slot  *s;

    used = __atomic_load_n(&ngx_http_agent_fp_table->header.slots_used,
                           __ATOMIC_ACQUIRE);
    if (used > AGENT_FP_SLOTS) {
        used = AGENT_FP_SLOTS;
    }

    for (i = 0; i < used; i++) {
        s = &ngx_http_agent_fp_table->slots[i];

        w = agent_fp_load(&s->word);

        if (agent_fp_kind(w) != AGENT_FP_IDLE
            || __atomic_load_n(&s->app, __ATOMIC_RELAXED) != row)
        {
            continue;
        }

        if (agent_fp_cas(&s->word, &w,
                         agent_fp_word(AGENT_FP_CLAIMED, 0, (uint32_t) ngx_pid,
                                       agent_fp_generation(w))))
        {
            *slot = i;
            *generation = agent_fp_generation(w);
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


/* step 3: a place in the queue, below the app's max_queue */

static ngx_int_t
ngx_http_agent_fp_wait(ngx_http_request_t *r, ngx_http_agent_ctx_t *ctx)
{
    uint32_t           n, max;
    ngx_int_t          rc;
    ngx_uint_t         row;
    agent_fp_app      *a;
    agent_fp_proc     *me;
    ngx_connection_t  *c;

    row = ctx->row;
    a = &ngx_http_agent_fp_table->apps[row];
    me = &ngx_http_agent_fp_table->procs[ngx_http_agent_fp_me];

    max = a->max_queue;
    n = __atomic_load_n(&a->waiting, __ATOMIC_ACQUIRE);

    for ( ;; ) {
        if (max != 0 && n >= max) {
            __atomic_add_fetch(&a->queue_full, 1, __ATOMIC_RELAXED);

            rc = ngx_http_agent_answer(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                       &ngx_http_agent_fp_queue_full, 1);
            ngx_http_finalize_request(r, rc);
            return NGX_DONE;
        }

        if (__atomic_compare_exchange_n(&a->waiting, &n, n + 1, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        {
            break;
        }
    }

    ctx->wait_ms = ngx_http_agent_fp_now_ms();
    ctx->waiting = 1;

    if (ngx_queue_empty(&ngx_http_agent_fp_fifo[row])) {
        __atomic_store_n(&me->oldest_ms[row], ctx->wait_ms, __ATOMIC_RELEASE);
    }

    ngx_queue_insert_tail(&ngx_http_agent_fp_fifo[row], &ctx->queue);
    __atomic_add_fetch(&me->waiting[row], 1, __ATOMIC_RELEASE);
    ngx_http_agent_fp_waiters++;

    ctx->wait_timer.handler = ngx_http_agent_fp_wait_timeout;
    ctx->wait_timer.data = ctx;
    ctx->wait_timer.log = r->connection->log;

    if (a->queue_timeout_ms) {
        ngx_add_timer(&ctx->wait_timer, a->queue_timeout_ms);
    }

    /* watch the client while it waits */
    c = r->connection;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    r->read_event_handler = ngx_http_agent_fp_check_client;
    r->write_event_handler = ngx_http_request_empty_handler;

    ngx_http_agent_fp_arm_retry();

    /* a release may have come between the look and the counts */
    ngx_http_agent_fp_serve_waiters(row);

    return NGX_DONE;
}


/* out of the FIFO: the counts undone, the timer stopped */

static void
ngx_http_agent_fp_leave(ngx_http_agent_ctx_t *ctx)
{
    uint32_t               n;
    ngx_uint_t             row;
    ngx_queue_t           *fifo;
    agent_fp_app          *a;
    agent_fp_proc         *me;
    ngx_http_agent_ctx_t  *next;

    if (!ctx->waiting) {
        return;
    }

    row = ctx->row;
    a = &ngx_http_agent_fp_table->apps[row];
    me = &ngx_http_agent_fp_table->procs[ngx_http_agent_fp_me];
    fifo = &ngx_http_agent_fp_fifo[row];

    ngx_queue_remove(&ctx->queue);
    ctx->waiting = 0;
    ngx_http_agent_fp_waiters--;

    if (ctx->wait_timer.timer_set) {
        ngx_del_timer(&ctx->wait_timer);
    }

    if (ngx_queue_empty(fifo)) {
        __atomic_store_n(&me->oldest_ms[row], 0, __ATOMIC_RELEASE);

    } else {
        next = ngx_queue_data(ngx_queue_head(fifo), ngx_http_agent_ctx_t,
                              queue);
        __atomic_store_n(&me->oldest_ms[row], next->wait_ms,
                         __ATOMIC_RELEASE);
    }

    n = __atomic_load_n(&me->waiting[row], __ATOMIC_ACQUIRE);
    if (n > 0) {
        __atomic_sub_fetch(&me->waiting[row], 1, __ATOMIC_RELEASE);
    }

    /* never below 0: the engine may have taken a dead process's counts */
    n = __atomic_load_n(&a->waiting, __ATOMIC_ACQUIRE);

    while (n > 0
           && !__atomic_compare_exchange_n(&a->waiting, &n, n - 1, 0,
                                           __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE))
    {
        /* void */
    }
}


/* claims for the oldest waiters of a row, as long as claims are won */

void
ngx_http_agent_fp_serve_waiters(ngx_uint_t row)
{
    ngx_queue_t           *fifo;
    ngx_http_agent_ctx_t  *ctx;

    fifo = &ngx_http_agent_fp_fifo[row];

    while (!ngx_queue_empty(fifo)) {
        ctx = ngx_queue_data(ngx_queue_head(fifo), ngx_http_agent_ctx_t,
                             queue);

        if (!ngx_http_agent_fp_row_serves(ctx->request, row)) {
            /* the row closed or changed (a core restart...): the slow
             * path serves */
            ngx_http_agent_fp_leave(ctx);
            ngx_http_agent_fp_dispatch(ctx);
            continue;
        }

        if (ngx_http_agent_fp_claim(row, &ctx->slot, &ctx->generation)
            != NGX_OK)
        {
            return;
        }

        ngx_http_agent_fp_leave(ctx);
        ctx->claimed = 1;
        ngx_http_agent_fp_dispatch(ctx);
    }
}


/*
 The release at the end of a response (the upstream's peer.free) hands its
 * worker to the next request at once: from a posted event that request
 * would reach the worker only after the rest of this round of events (other
 * clients' requests, other responses), while the worker idles.  It runs
 * inside the end of the request before, which is done with the worker and
 * its connection; one level deep: a hand-off made inside it (a request that
 * fails at once) goes through a posted event, as does a release from a
 * request's cleanup (its pool is being freed).
 */

static ngx_uint_t  ngx_http_agent_fp_handing_off;


static void
ngx_http_agent_fp_hand_off(ngx_http_agent_ctx_t *next)
{
    if (ngx_http_agent_fp_handing_off) {
        ngx_http_agent_fp_dispatch(next);
        return;
    }

    ngx_http_agent_fp_handing_off = 1;

    next->run_event.data = next;
    ngx_http_agent_fp_run_handler(&next->run_event);

    ngx_http_agent_fp_handing_off = 0;
}


/* step 4 for a request that waited or found the fast path closed */

static void
ngx_http_agent_fp_dispatch(ngx_http_agent_ctx_t *ctx)
{
    ngx_connection_t  *c;

    c = ctx->request->connection;

    ctx->run_event.handler = ngx_http_agent_fp_run_handler;
    ctx->run_event.data = ctx;
    ctx->run_event.log = c->log;

    ngx_post_event(&ctx->run_event, &ngx_posted_events);
}


static void
ngx_http_agent_fp_run_handler(ngx_event_t *ev)
{
    ngx_connection_t      *c;
    ngx_http_request_t    *r;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ev->data;
    r = ctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    r->read_event_handler = ngx_http_block_reading;

    ngx_http_agent_fp_run(r);

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_agent_fp_wait_timeout(ngx_event_t *ev)
{
    ngx_int_t              rc;
    ngx_connection_t      *c;
    ngx_http_request_t    *r;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ev->data;
    r = ctx->request;
    c = r->connection;

    ngx_http_agent_fp_leave(ctx);

    __atomic_add_fetch(&ngx_http_agent_fp_table->apps[ctx->row].queue_timeouts,
                       1, __ATOMIC_RELAXED);

    r->read_event_handler = ngx_http_block_reading;

    rc = ngx_http_agent_answer(r, NGX_HTTP_GATEWAY_TIME_OUT,
                               &ngx_http_agent_fp_queue_timeout, 0);
    ngx_http_finalize_request(r, rc);

    ngx_http_run_posted_requests(c);
}


/* a client that closes while its request waits: it never reaches a worker */

static void
ngx_http_agent_fp_check_client(ngx_http_request_t *r)
{
    int                    n;
    char                   buf[1];
    ngx_err_t              err;
    ngx_connection_t      *c;
    ngx_http_agent_ctx_t  *ctx;

    c = r->connection;
    n = 0;
    err = 0;

#if (NGX_HTTP_V2)
    if (r->stream) {
        /* a stream shares the client's socket: nginx marks the stream's
         * own connection when the client resets it or goes */
        if (!c->error) {
            return;
        }

    } else
#endif
    {
        n = recv(c->fd, buf, 1, MSG_PEEK);

        err = ngx_socket_errno;

        if (n > 0 || (n == -1 && (err == NGX_EAGAIN || err == NGX_EINTR))) {
            c->read->ready = 0;
            return;
        }
    }

    c->read->eof = 1;
    c->error = 1;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx) {
        ngx_http_agent_fp_leave(ctx);
    }

    ngx_log_error(NGX_LOG_INFO, c->log, n == 0 ? 0 : err,
                  "agent: the client closed the connection while its request "
                  "waited for a worker");

    ngx_http_finalize_request(r, NGX_HTTP_CLIENT_CLOSED_REQUEST);
}


/* whatever ends the request: nothing is left in the table for it */

static void
ngx_http_agent_fp_cleanup(void *data)
{
    ngx_http_agent_ctx_t  *ctx = data;

    if (ngx_http_agent_fp_table == NULL) {
        return;
    }

    ngx_http_agent_fp_leave(ctx);

    if (ctx->run_event.posted) {
        ngx_delete_posted_event(&ctx->run_event);
    }

    if (ctx->time_limit.timer_set) {
        ngx_del_timer(&ctx->time_limit);
    }

    if (ctx->claimed) {
        /* inside the freeing of a request: the next one runs later */
        ngx_http_agent_fp_release(ctx, 0);
    }
}


/* ------------------------------------------------------------------------ */
/* on the claimed worker                                                     */

/* step 4's bookkeeping, before the upstream connects */

void
ngx_http_agent_fp_begin(ngx_http_request_t *r, ngx_http_agent_ctx_t *ctx)
{
    size_t          n;
    uint32_t        limit;
    agent_fp_slot  *s;

    s = &ngx_http_agent_fp_table->slots[ctx->slot];

    __atomic_add_fetch(&s->claims, 1, __ATOMIC_RELAXED);
    s->claim_ms = ngx_http_agent_fp_now_ms();

    n = ngx_min(r->method_name.len, AGENT_FP_METHOD_MAX - 1);
    ngx_memcpy(s->method, r->method_name.data, n);
    s->method[n] = '\0';

    n = ngx_min(r->unparsed_uri.len, AGENT_FP_URI_MAX - 1);
    ngx_memcpy(s->uri, r->unparsed_uri.data, n);
    s->uri[n] = '\0';

    limit = ngx_http_agent_fp_table->apps[ctx->row].request_time_ms;
    ctx->time_limit_ms = limit;

    if (limit) {
        ngx_add_timer(&ctx->time_limit, limit);
    }
}


/* <instance>/workers/<socket>, when the name is one the engine could write */

ngx_int_t
ngx_http_agent_fp_socket(ngx_http_agent_ctx_t *ctx)
{
    u_char                      *p, *last;
    char                         name[AGENT_FP_SOCKET_MAX];
    size_t                       len;
    ngx_uint_t                   i;
    ngx_http_agent_main_conf_t  *amcf;

    ngx_memcpy(name, ngx_http_agent_fp_table->slots[ctx->slot].socket,
               AGENT_FP_SOCKET_MAX);

    for (len = 0; len < AGENT_FP_SOCKET_MAX && name[len]; len++) {
        /* void */
    }

    if (len == 0 || len == AGENT_FP_SOCKET_MAX) {
        return NGX_ERROR;
    }

    for (i = 0; i < len; i++) {
        if (!((name[i] >= 'a' && name[i] <= 'z')
              || (name[i] >= 'A' && name[i] <= 'Z')
              || (name[i] >= '0' && name[i] <= '9')
              || name[i] == '.' || name[i] == '_' || name[i] == '-'))
        {
            return NGX_ERROR;
        }
    }

    amcf = ngx_http_get_module_main_conf(ctx->request, ngx_http_agent_module);

    if (amcf->instance_dir.len + sizeof("/workers/") - 1 + len
        >= sizeof(ctx->addr.sun_path))
    {
        return NGX_ERROR;
    }

    ngx_memzero(&ctx->addr, sizeof(struct sockaddr_un));
    ctx->addr.sun_family = AF_UNIX;

    p = (u_char *) ctx->addr.sun_path;
    last = ngx_cpymem(p, amcf->instance_dir.data, amcf->instance_dir.len);
    last = ngx_cpymem(last, "/workers/", sizeof("/workers/") - 1);
    last = ngx_cpymem(last, name, len);

    ctx->addr_text.data = p;
    ctx->addr_text.len = last - p;

    return NGX_OK;
}


/* ------------------------------------------------------------------------ */
/* the kept connections                                                      */

ngx_connection_t *
ngx_http_agent_fp_kept(ngx_http_agent_ctx_t *ctx)
{
    ngx_connection_t          *c;
    ngx_http_agent_fp_kept_t  *k;

    k = &ngx_http_agent_fp_cache[ctx->slot];
    c = k->connection;

    if (c == NULL) {
        return NULL;
    }

    k->connection = NULL;

    if (k->generation != ctx->generation) {
        /* another worker's: the slot was published again */
        ngx_http_agent_fp_close(c);
        return NULL;
    }

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    c->idle = 0;
    c->sent = 0;
    c->data = NULL;

    return c;
}


void
ngx_http_agent_fp_keep(ngx_http_agent_ctx_t *ctx, ngx_connection_t *c)
{
    ngx_http_agent_fp_kept_t  *k;

    k = &ngx_http_agent_fp_cache[ctx->slot];

    if (k->connection) {
        ngx_http_agent_fp_close(k->connection);
    }

    k->connection = c;
    k->generation = ctx->generation;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    /* the end record read as an end of file; the connection goes on (one
     * the worker closed with its end record is not kept: see the peer's
     * free) */
    c->read->eof = 0;
    c->read->ready = 0;

    c->write->handler = ngx_http_agent_fp_keep_dummy_handler;
    c->read->handler = ngx_http_agent_fp_keep_close_handler;

    c->data = k;
    c->idle = 1;
    c->log = ngx_cycle->log;
    c->read->log = ngx_cycle->log;
    c->write->log = ngx_cycle->log;
    c->pool->log = ngx_cycle->log;
}


/* an idle worker connection that is readable: closed, or out of step */

static void
ngx_http_agent_fp_keep_close_handler(ngx_event_t *ev)
{
    int                        n;
    char                       buf[1];
    ngx_connection_t          *c;
    ngx_http_agent_fp_kept_t  *k;

    c = ev->data;

    if (!c->close) {
        n = recv(c->fd, buf, 1, MSG_PEEK);

        if (n == -1 && ngx_socket_errno == NGX_EAGAIN) {
            ev->ready = 0;

            if (ngx_handle_read_event(c->read, 0) == NGX_OK) {
                return;
            }
        }
    }

    k = c->data;
    k->connection = NULL;

    ngx_http_agent_fp_close(c);
}


static void
ngx_http_agent_fp_keep_dummy_handler(ngx_event_t *ev)
{
    return;
}


static void
ngx_http_agent_fp_close(ngx_connection_t *c)
{
    if (c->pool) {
        ngx_destroy_pool(c->pool);
        c->pool = NULL;
    }

    ngx_close_connection(c);
}


/* ------------------------------------------------------------------------ */
/* the claim of a request that became a tunnel                              */

/*
 * The worker answered 101: the connection is a tunnel for as long as the
 * client and the app keep it.  No request time limit applies to it, here
 * nor in the engine's sweep (the claim's UNTIMED flag).
 */

void
ngx_http_agent_fp_untimed(ngx_http_agent_ctx_t *ctx)
{
    uint64_t        w, mine;
    agent_fp_slot  *s;

    if (!ctx->claimed || ngx_http_agent_fp_table == NULL) {
        return;
    }

    if (ctx->time_limit.timer_set) {
        ngx_del_timer(&ctx->time_limit);
    }

    s = &ngx_http_agent_fp_table->slots[ctx->slot];
    mine = agent_fp_word(AGENT_FP_CLAIMED, 0, (uint32_t) ngx_pid,
                         ctx->generation);
    w = agent_fp_load(&s->word);

    while ((w & ~(uint64_t) AGENT_FP_DETACH) == mine) {
        if (agent_fp_cas(&s->word, &w, w | AGENT_FP_UNTIMED)) {
            return;
        }
    }
}


/* ------------------------------------------------------------------------ */
/* step 6: the release, once per claim                                       */

void
ngx_http_agent_fp_release(ngx_http_agent_ctx_t *ctx, ngx_uint_t at_once)
{
    uint64_t               w, mine, desired;
    uint32_t               gen;
    ngx_uint_t             row;
    ngx_queue_t           *fifo;
    agent_fp_slot         *s;
    ngx_http_agent_ctx_t  *next;

    if (!ctx->claimed || ngx_http_agent_fp_table == NULL) {
        return;
    }

    ctx->claimed = 0;

    if (ctx->time_limit.timer_set) {
        ngx_del_timer(&ctx->time_limit);
    }

    row = ctx->row;
    gen = ctx->generation;
    s = &ngx_http_agent_fp_table->slots[ctx->slot];
    mine = agent_fp_word(AGENT_FP_CLAIMED, 0, (uint32_t) ngx_pid, gen);
    fifo = &ngx_http_agent_fp_fifo[row];

    next = ngx_queue_empty(fifo)
           ? NULL
           : ngx_queue_data(ngx_queue_head(fifo), ngx_http_agent_ctx_t, queue);

    w = agent_fp_load(&s->word);

    for ( ;; ) {
        if ((w & ~(uint64_t) (AGENT_FP_DETACH|AGENT_FP_UNTIMED)) != mine) {
            /* the engine took the slot back: nothing to store */
            return;
        }

        if (ctx->failed) {
            desired = agent_fp_word(AGENT_FP_FAILED,
                                    ctx->timed_out ? AGENT_FP_TIMED_OUT : 0,
                                    0, gen);

        } else if (agent_fp_flags(w) & AGENT_FP_DETACH) {
            desired = agent_fp_word(AGENT_FP_DETACHED, 0, 0, gen);

        } else if (next != NULL
                   && !(agent_fp_flags(w) & AGENT_FP_UNTIMED)
                   && ngx_http_agent_fp_row_serves(next->request, row)
                   && __atomic_load_n(
                          &ngx_http_agent_fp_table->apps[row].engine_queue,
                          __ATOMIC_ACQUIRE) == 0
                   && !ngx_http_agent_fp_others_older(row, next->wait_ms))
        {
            /* the hand-off: the oldest local waiter keeps the claim */
            ngx_http_agent_fp_leave(next);
            next->slot = ctx->slot;
            next->generation = gen;
            next->claimed = 1;
            if (at_once) {
                ngx_http_agent_fp_hand_off(next);

            } else {
                ngx_http_agent_fp_dispatch(next);
            }

            return;

        } else {
            desired = agent_fp_word(AGENT_FP_IDLE, 0, 0, gen);
        }

        if (agent_fp_cas(&s->word, &w, desired)) {
            break;
        }

        /* w now holds the word seen: DETACH set meanwhile, or taken back */
    }

    if (agent_fp_kind(desired) == AGENT_FP_IDLE) {
        if (!ngx_queue_empty(fifo)) {
            /* the engine's queue or an older process comes first; ours
             * retry on the timer */
            ngx_http_agent_fp_arm_retry();
        }

        ngx_http_agent_fp_wake_other(row);
    }
}


/*
 * Another process has a waiter for the row older than ours by more than
 * NGX_HTTP_AGENT_FP_FAIR_MS.  Within that slack a release stays in this
 * process: a hand-off here costs no system call, one to another process a
 * wake-up and the time until that process runs, during which the worker
 * idles.  The slack bounds how much longer another process's request can
 * wait than ours.
 */

static ngx_uint_t
ngx_http_agent_fp_others_older(ngx_uint_t row, uint64_t ours)
{
    uint64_t        t;
    ngx_uint_t      i;
    agent_fp_proc  *p;

    for (i = 0; i < AGENT_FP_PROCS; i++) {
        if ((ngx_int_t) i == ngx_http_agent_fp_me) {
            continue;
        }

        p = &ngx_http_agent_fp_table->procs[i];

        if (__atomic_load_n(&p->pid, __ATOMIC_RELAXED) == 0) {
            continue;
        }

        t = __atomic_load_n(&p->oldest_ms[row], __ATOMIC_ACQUIRE);

        if (t != 0 && t + NGX_HTTP_AGENT_FP_FAIR_MS < ours) {
            return 1;
        }
    }

    return 0;
}
