
/*
 * The fast path's upstream side (docs/protocol.md section 5): the peer
 * (init, get, free) of a request that claimed a worker in
 * ngx_http_agent_claims.c connects to the worker or reuses the connection
 * kept for it, and its c->recv strips the worker's records
 * (csrc/records.c), so that nginx's upstream code sees what agent.sock would
 * have sent.  A try that never reached the worker goes to agent.sock.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


static ngx_int_t ngx_http_agent_fp_peer_init(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_agent_fp_get(ngx_peer_connection_t *pc,
    void *data);
static void ngx_http_agent_fp_free(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state);
static ngx_uint_t ngx_http_agent_fp_drain(ngx_http_agent_ctx_t *ctx,
    ngx_connection_t *c);
static ssize_t ngx_http_agent_fp_recv(ngx_connection_t *c, u_char *buf,
    size_t size);
static ssize_t ngx_http_agent_fp_recv_chain(ngx_connection_t *c,
    ngx_chain_t *in, off_t limit);
static ngx_int_t ngx_http_agent_fp_take(ngx_http_agent_ctx_t *ctx,
    ngx_connection_t *c, u_char *buf, ssize_t *n);
static void ngx_http_agent_fp_time_limit(ngx_event_t *ev);


/* the fast path's "upstream": its peer.init takes nginx's peer choice */
static ngx_http_upstream_srv_conf_t  ngx_http_agent_fp_uscf = {
    .peer = { .init = ngx_http_agent_fp_peer_init },
    .host = ngx_string("agent-fast-path"),
    .flags = 0,
};


ngx_http_upstream_srv_conf_t *
ngx_http_agent_fp_upstream(void)
{
    return &ngx_http_agent_fp_uscf;
}


/* step 4: on the claimed worker, or through agent.sock when none was */

void
ngx_http_agent_fp_run(ngx_http_request_t *r)
{
    ngx_http_upstream_t   *u;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);
    u = r->upstream;

    if (ctx->claimed) {
        ctx->resolved = u->resolved;
        u->resolved = NULL;

        ctx->time_limit.handler = ngx_http_agent_fp_time_limit;
        ctx->time_limit.data = ctx;
        ctx->time_limit.log = r->connection->log;

        ngx_http_agent_fp_begin(r, ctx);
    }

    ngx_http_upstream_init(r);
}


static ngx_int_t
ngx_http_agent_fp_peer_init(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_upstream_t   *u;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);
    u = r->upstream;

    if (ctx == NULL || ctx->resolved == NULL) {
        return NGX_ERROR;
    }

    u->peer.data = ctx;
    u->peer.get = ngx_http_agent_fp_get;
    u->peer.free = ngx_http_agent_fp_free;
    u->peer.tries = 2;       /* the worker, then agent.sock once */

    return NGX_OK;
}


/*
 * The first try: the kept connection to the claimed worker (NGX_DONE), or
 * a new one made here so that it reads through the records' stripping.
 * The second: agent.sock, connected by nginx, read as it is.
 */

static ngx_int_t
ngx_http_agent_fp_get(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_agent_ctx_t  *ctx = data;

    ngx_int_t               rc;
    ngx_connection_t       *c;
    ngx_peer_connection_t   tmp;

    if (ctx->tried || !ctx->claimed) {
        ctx->fast = 0;

        pc->sockaddr = ctx->resolved->sockaddr;
        pc->socklen = ctx->resolved->socklen;
        pc->name = &ctx->resolved->name;

        return NGX_OK;
    }

    ctx->tried = 1;
    ctx->fast = 1;
    ngx_memzero(&ctx->decoder, sizeof(record_decoder));
    ctx->head_len = 0;

    if (ngx_http_agent_fp_socket(ctx) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, pc->log, 0,
                      "agent: the fast path's slot %ui names no valid "
                      "worker socket", ctx->slot);
        ctx->failed = 1;
        ctx->retry = 1;
        ngx_str_set(&ctx->addr_text, "agent-fast-path");
        pc->sockaddr = (struct sockaddr *) &ctx->addr;
        pc->socklen = sizeof(struct sockaddr_un);
        pc->name = &ctx->addr_text;
        return NGX_DECLINED;
    }

    pc->sockaddr = (struct sockaddr *) &ctx->addr;
    pc->socklen = sizeof(struct sockaddr_un);
    pc->name = &ctx->addr_text;

    c = ngx_http_agent_fp_kept(ctx);

    if (c) {
        c->log = pc->log;
        c->read->log = pc->log;
        c->write->log = pc->log;
        c->pool->log = pc->log;
        pc->connection = c;
        return NGX_DONE;
    }

    tmp = *pc;
    tmp.get = ngx_event_get_peer;
    tmp.connection = NULL;

    rc = ngx_event_connect_peer(&tmp);

    if (rc == NGX_DECLINED) {
        /* refused, gone: the request never reached the worker */
        ctx->failed = 1;
        ctx->retry = 1;
        return NGX_DECLINED;
    }

    if (rc != NGX_OK && rc != NGX_AGAIN) {
        return NGX_ERROR;
    }

    c = tmp.connection;
    c->recv = ngx_http_agent_fp_recv;
    c->recv_chain = ngx_http_agent_fp_recv_chain;

    pc->connection = c;

    return rc == NGX_OK ? NGX_DONE : NGX_AGAIN;
}


/*
 * Step 5 and 6: the worker's try ends.  A failure before the worker could
 * have seen the request (a connect that failed, a kept connection that
 * failed on write or ended before a byte) leaves the second try to
 * agent.sock; any other ends the request here (502, a cut-off response).
 */

static void
ngx_http_agent_fp_free(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state)
{
    ngx_http_agent_ctx_t  *ctx = data;

    ngx_uint_t          clean;
    ngx_connection_t   *c;
    ngx_http_request_t *r;

    if (pc->tries > 0) {
        pc->tries--;
    }

    if (!ctx->fast) {
        return;
    }

    r = ctx->request;
    c = pc->connection;

    if (state & NGX_PEER_FAILED) {
        ctx->failed = 1;

        /*
         * No byte of a response came: the worker died or closed, on a kept
         * connection or on a new one (a worker killed as nginx connects
         * accepts into a backlog that then closes).  Sent again through
         * agent.sock by nginx's rule: not a POST, LOCK or PATCH that was
         * sent, which gets its 502 (and is counted here).
         */
        if (!ctx->got_bytes && !ctx->timed_out
            && !(r->upstream->request_sent
                 && (r->method & (NGX_HTTP_POST|NGX_HTTP_LOCK|NGX_HTTP_PATCH))))
        {
            ctx->retry = 1;
        }
    }

    if (ctx->failed && !(ctx->retry && pc->tries > 0)) {
        pc->tries = 0;

        if (!ctx->timed_out && !r->upstream->header_sent) {
            ngx_http_agent_fp_count(ctx, NGX_HTTP_AGENT_FP_FAILED);
        }
    }

    if (!ctx->failed) {
        ctx->served = 1;
    }

    clean = 0;

    /* a tunnel's connection never carries another request */
    if (!ctx->failed && c && !c->read->error && !c->write->error
        && !c->read->timedout && !c->write->timedout
        && r->upstream->request_body_sent && !r->upstream->upgrade)
    {
        clean = ctx->decoder.end || ngx_http_agent_fp_drain(ctx, c);
        /*
         * A worker that closed right after its end record: epoll said so
         * with the data (pending_eof), and nothing will say it again, so
         * the connection would be found dead only by the next request.
         */
        clean = clean && !ctx->decoder.extra && !c->read->pending_eof;
    }

    if (clean && !ngx_terminate && !ngx_exiting
        && ngx_handle_read_event(c->read, 0) == NGX_OK)
    {
        pc->connection = NULL;
        c->read->delayed = 0;
        ngx_http_agent_fp_keep(ctx, c);
    }

    /* a response that ended as it should: the next request runs now */
    ngx_http_agent_fp_release(ctx, clean);

    if (ctx->failed) {
        ctx->fast = 0;
    }
}


/*
 * nginx stopped at the response's Content-Length: the end record may have
 * come already.  Read it without blocking; anything else closes.
 */

static ngx_uint_t
ngx_http_agent_fp_drain(ngx_http_agent_ctx_t *ctx, ngx_connection_t *c)
{
    char      buf[64];
    ssize_t   n;
    uint32_t  pos, len;

    for ( ;; ) {
        n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);

        if (n == -1 && ngx_socket_errno == NGX_EINTR) {
            continue;
        }

        if (n <= 0) {
            return 0;
        }

        pos = 0;
        len = 0;
        records_take(&ctx->decoder, buf, &pos, &len, (uint32_t) n);

        if (len > pos || ctx->decoder.extra) {
            /* more payload than the response said, or bytes after it */
            return 0;
        }

        if (ctx->decoder.end) {
            return 1;
        }
    }
}


/*
 * The worker's records, stripped: the payload (the HTTP response) lands at
 * buf; the end record reads as end of file.  Bytes that are not records,
 * bytes after the end record, an end of file before it: an error, and the
 * connection is never kept.
 */

static ssize_t
ngx_http_agent_fp_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
    ssize_t                n;
    ngx_http_request_t    *r;
    ngx_http_agent_ctx_t  *ctx;

    r = c->data;
    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (size > 0x7fffffff) {
        size = 0x7fffffff;
    }

    for ( ;; ) {
        if (ctx->decoder.end) {
            /* as ngx_unix_recv() reports an end of file, so that every
             * reading loop of the upstream module stops here */
            c->read->ready = 0;
            c->read->eof = 1;
            return 0;
        }

        if (ctx->failed) {
            return NGX_ERROR;
        }

        n = ngx_unix_recv(c, buf, size);

        if (n == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        if (n == NGX_ERROR) {
            ctx->failed = 1;
            return NGX_ERROR;
        }

        if (n == 0) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "agent: the worker at \"%V\" closed the connection "
                          "before the end of its response", &ctx->addr_text);
            ctx->failed = 1;
            return 0;
        }

        ctx->got_bytes = 1;

        if (ngx_http_agent_fp_take(ctx, c, buf, &n) != NGX_OK) {
            ctx->failed = 1;
            c->read->error = 1;
            return NGX_ERROR;
        }

        if (ctx->decoder.end) {
            /*
             * The end record came with this read: nothing more will wake
             * the connection, so say it is ready and the next read reports
             * the end of file at once.
             */
            c->read->ready = 1;
        }

        if (n > 0) {
            return n;
        }

        /* record headers only: read on */
    }
}


static ngx_int_t
ngx_http_agent_fp_take(ngx_http_agent_ctx_t *ctx, ngx_connection_t *c,
    u_char *buf, ssize_t *n)
{
    size_t              k;
    uint32_t            pos, len;
    status_line_check   check;

    pos = 0;
    len = 0;
    records_take(&ctx->decoder, (char *) buf, &pos, &len, (uint32_t) *n);

    if (ctx->decoder.extra) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "agent: the worker at \"%V\" sent bytes after the end "
                      "of its response", &ctx->addr_text);
        return NGX_ERROR;
    }

    if (ctx->head_len < sizeof("HTTP/1.1 ") - 1) {
        k = ngx_min(len - pos, sizeof(ctx->head) - ctx->head_len);
        ngx_memcpy(ctx->head + ctx->head_len, buf + pos, k);
        ctx->head_len += k;

        check = records_check_status_line((char *) ctx->head, ctx->head_len,
                                          ctx->decoder.end);

        if (check == STATUS_LINE_BAD
            || (check == STATUS_LINE_PENDING && ctx->decoder.end))
        {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "agent: the worker at \"%V\" sent no HTTP/1.1 "
                          "response in records", &ctx->addr_text);
            return NGX_ERROR;
        }
    }

    if (pos > 0 && len > pos) {
        ngx_memmove(buf, buf + pos, len - pos);
    }

    *n = len - pos;

    return NGX_OK;
}


static ssize_t
ngx_http_agent_fp_recv_chain(ngx_connection_t *c, ngx_chain_t *in,
    off_t limit)
{
    size_t   size;
    ssize_t  n, total;

    total = 0;

    for ( /* void */ ; in; in = in->next) {
        size = in->buf->end - in->buf->last;

        if (limit && (off_t) size > limit - total) {
            size = (size_t) (limit - total);
        }

        if (size == 0) {
            break;
        }

        n = ngx_http_agent_fp_recv(c, in->buf->last, size);

        if (n <= 0) {
            return total ? total : n;
        }

        total += n;

        if ((size_t) n < size) {
            break;
        }
    }

    return total;
}


/*
 * The app's request time limit: 504 with the engine's body before the
 * response began, a cut-off response after; the worker's slot FAILED.
 */

static void
ngx_http_agent_fp_time_limit(ngx_event_t *ev)
{
    u_char                *p;
    ngx_int_t              rc;
    ngx_str_t              body;
    ngx_connection_t      *c, *uc;
    ngx_http_request_t    *r;
    ngx_http_upstream_t   *u;
    ngx_http_agent_ctx_t  *ctx;
    ngx_http_cleanup_pt    cleanup;

    ctx = ev->data;
    r = ctx->request;
    c = r->connection;
    u = r->upstream;

    ngx_log_error(NGX_LOG_ERR, c->log, 0,
                  "agent: the app took longer than its request time limit");

    ctx->failed = 1;
    ctx->timed_out = 1;
    ngx_http_agent_fp_count(ctx, NGX_HTTP_AGENT_FP_REQUEST_TIMEOUT);

    if (u == NULL || u->cleanup == NULL) {
        ngx_http_agent_fp_release(ctx, 0);
        return;
    }

    if (u->header_sent) {
        /* as a read timeout: nginx cuts the response off */
        uc = u->peer.connection;

        if (uc) {
            uc->read->timedout = 1;
            uc->read->handler(uc->read);
            return;
        }

        ngx_http_agent_fp_release(ctx, 0);
        return;
    }

    body.data = ngx_pnalloc(r->pool, sizeof("504 Gateway Timeout: the app "
                                            "took longer than  ms\n") - 1
                                     + NGX_INT_T_LEN);
    if (body.data == NULL) {
        body.len = 0;

    } else {
        p = ngx_sprintf(body.data, "504 Gateway Timeout: the app took longer "
                        "than %uD ms\n", ctx->time_limit_ms);
        body.len = p - body.data;
    }

    /* the upstream ends (its peer.free releases the slot FAILED) and the
     * request stays for the answer */
    r->main->count++;
    cleanup = *u->cleanup;
    cleanup(r);

    rc = ngx_http_agent_answer(r, NGX_HTTP_GATEWAY_TIME_OUT, &body, 0);
    ngx_http_finalize_request(r, rc);

    ngx_http_run_posted_requests(c);
}
