
/*
 * The request path: a location's requests go to the agent's agent.sock
 * (docs/protocol.md), a status location's to status.sock, once nginx has
 * read the body; the responses come back as HTTP status line and headers,
 * parsed here for both.  What is sent is built in ngx_http_agent_request.c;
 * an app's request that claimed a worker goes to it through
 * ngx_http_agent_worker_peer.c instead of agent.sock.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


static ngx_int_t ngx_http_agent_is_static_file(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_pass(ngx_http_request_t *r,
    ngx_uint_t to_status);
static ngx_int_t ngx_http_agent_reinit_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_status_line(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_input_filter_init(void *data);
static ngx_int_t ngx_http_agent_chunked_filter(ngx_event_pipe_t *p,
    ngx_buf_t *buf);
static ngx_int_t ngx_http_agent_non_buffered_chunked_filter(void *data,
    ssize_t bytes);
static void ngx_http_agent_abort_request(ngx_http_request_t *r);
static void ngx_http_agent_finalize_request(ngx_http_request_t *r,
    ngx_int_t rc);
static void ngx_http_agent_body_read(ngx_http_request_t *r);


ngx_int_t
ngx_http_agent_handler(ngx_http_request_t *r)
{
    ngx_int_t  rc;

    rc = ngx_http_agent_is_static_file(r);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == 1) {
        /* nginx's index and static handlers serve it instead */
        return NGX_DECLINED;
    }

    return ngx_http_agent_pass(r, 0);
}


/* a location with "agent_status on": every request goes to status.sock */

ngx_int_t
ngx_http_agent_status_handler(ngx_http_request_t *r)
{
    return ngx_http_agent_pass(r, 1);
}


/*
 * Returns 1 when the URI names a regular file under root, or ends in "/"
 * and the directory holds index.html; 0 otherwise.  Only GET and HEAD are
 * served from disk: any other method on such a path belongs to the app.
 */

static ngx_int_t
ngx_http_agent_is_static_file(ngx_http_request_t *r)
{
    size_t                     root;
    u_char                    *last;
    ngx_str_t                  path;
    ngx_open_file_info_t       of;
    ngx_http_core_loc_conf_t  *clcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return 0;
    }

    last = ngx_http_map_uri_to_path(r, &path, &root,
                                    sizeof("index.html") - 1);
    if (last == NULL) {
        return NGX_ERROR;
    }

    if (r->uri.len && r->uri.data[r->uri.len - 1] == '/') {
        last = ngx_cpystrn(last, (u_char *) "index.html",
                           sizeof("index.html"));
    }

    path.len = last - path.data;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    ngx_memzero(&of, sizeof(ngx_open_file_info_t));

    of.read_ahead = clcf->read_ahead;
    of.directio = clcf->directio;
    of.valid = clcf->open_file_cache_valid;
    of.min_uses = clcf->open_file_cache_min_uses;
    of.test_only = 1;
    of.errors = clcf->open_file_cache_errors;
    of.events = clcf->open_file_cache_events;

    if (ngx_http_set_disable_symlinks(r, clcf, &path, &of) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_open_cached_file(clcf->open_file_cache, &path, &of, r->pool)
        != NGX_OK)
    {
        /* of.err is 0 only when memory ran out */
        return of.err ? 0 : NGX_ERROR;
    }

    return of.is_file ? 1 : 0;
}


/*
 * The app's requests travel as request frames to agent.sock; a status
 * location's as plain HTTP to status.sock.  Both answer with an HTTP status
 * line and headers, so the response side is shared.
 */

static ngx_int_t
ngx_http_agent_pass(ngx_http_request_t *r, ngx_uint_t to_status)
{
    ngx_int_t                    rc;
    ngx_http_upstream_t         *u;
    ngx_http_agent_ctx_t        *ctx;
    ngx_http_agent_loc_conf_t   *alcf;
    ngx_http_agent_main_conf_t  *amcf;

    if (ngx_http_upstream_create(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_agent_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;

    ngx_http_set_ctx(r, ctx, ngx_http_agent_module);

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);
    amcf = ngx_http_get_module_main_conf(r, ngx_http_agent_module);

    u = r->upstream;

    u->output.tag = (ngx_buf_tag_t) &ngx_http_agent_module;
    u->conf = &alcf->upstream;

    u->resolved = ngx_pcalloc(r->pool, sizeof(ngx_http_upstream_resolved_t));
    if (u->resolved == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    u->resolved->socklen = sizeof(struct sockaddr_un);
    u->resolved->naddrs = 1;
    u->resolved->no_port = 1;

    if (to_status) {
        ngx_str_set(&u->schema, "agent-status://");
        u->resolved->sockaddr = (struct sockaddr *) &amcf->status_addr;
        u->resolved->name = amcf->status_name;
        u->resolved->host = amcf->status_name;
        u->create_request = ngx_http_agent_create_status_request;

    } else {
        ngx_str_set(&u->schema, "agent://");
        u->resolved->sockaddr = (struct sockaddr *) &amcf->socket_addr;
        u->resolved->name = amcf->socket_name;
        u->resolved->host = amcf->socket_name;
        u->create_request = ngx_http_agent_create_request;
    }

    u->reinit_request = ngx_http_agent_reinit_request;
    u->process_header = ngx_http_agent_process_status_line;
    u->abort_request = ngx_http_agent_abort_request;
    u->finalize_request = ngx_http_agent_finalize_request;
    r->state = 0;

    u->buffering = alcf->upstream.buffering;

    u->pipe = ngx_pcalloc(r->pool, sizeof(ngx_event_pipe_t));
    if (u->pipe == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    u->pipe->input_filter = ngx_event_pipe_copy_input_filter;
    u->pipe->input_ctx = r;

    u->input_filter_init = ngx_http_agent_input_filter_init;
    u->input_filter = ngx_http_upstream_non_buffered_filter;
    u->input_filter_ctx = r;

    /*
     * The frame (or the status request's Content-Length) states the body's
     * length, so the whole body is read first.
     */
    rc = ngx_http_read_client_request_body(r, to_status
                                              ? ngx_http_upstream_init
                                              : ngx_http_agent_body_read);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_http_agent_reinit_request(ngx_http_request_t *r)
{
    ngx_http_status_t     *status;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx == NULL) {
        return NGX_OK;
    }

    status = &ctx->status;

    status->code = 0;
    status->count = 0;
    status->start = NULL;
    status->end = NULL;

    ngx_memzero(&ctx->chunked, sizeof(ngx_http_chunked_t));

    r->upstream->process_header = ngx_http_agent_process_status_line;
    r->state = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_process_status_line(ngx_http_request_t *r)
{
    size_t                 len;
    ngx_int_t              rc;
    ngx_http_status_t     *status;
    ngx_http_upstream_t   *u;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    status = &ctx->status;

    u = r->upstream;

    rc = ngx_http_parse_status_line(r, &u->buffer, status);

    if (rc == NGX_AGAIN) {
        return rc;
    }

    if (rc == NGX_ERROR) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the agent sent no valid status line");
        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }

    if (u->state && u->state->status == 0) {
        u->state->status = status->code;
    }

    u->headers_in.status_n = status->code;

    len = status->end - status->start;
    u->headers_in.status_line.len = len;

    u->headers_in.status_line.data = ngx_pnalloc(r->pool, len);
    if (u->headers_in.status_line.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(u->headers_in.status_line.data, status->start, len);

    u->process_header = ngx_http_agent_process_header;

    return ngx_http_agent_process_header(r);
}


static ngx_int_t
ngx_http_agent_process_header(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    ngx_table_elt_t                *h;
    ngx_http_upstream_t            *u;
    ngx_http_agent_ctx_t           *ctx;
    ngx_http_upstream_header_t     *hh;
    ngx_http_upstream_main_conf_t  *umcf;

    umcf = ngx_http_get_module_main_conf(r, ngx_http_upstream_module);
    u = r->upstream;

    for ( ;; ) {

        rc = ngx_http_parse_header_line(r, &u->buffer, 1);

        if (rc == NGX_OK) {

            h = ngx_list_push(&u->headers_in.headers);
            if (h == NULL) {
                return NGX_ERROR;
            }

            h->hash = r->header_hash;

            h->key.len = r->header_name_end - r->header_name_start;
            h->value.len = r->header_end - r->header_start;

            h->key.data = ngx_pnalloc(r->pool,
                                      h->key.len + 1 + h->value.len + 1
                                      + h->key.len);
            if (h->key.data == NULL) {
                h->hash = 0;
                return NGX_ERROR;
            }

            h->value.data = h->key.data + h->key.len + 1;
            h->lowcase_key = h->key.data + h->key.len + 1 + h->value.len + 1;

            ngx_memcpy(h->key.data, r->header_name_start, h->key.len);
            h->key.data[h->key.len] = '\0';
            ngx_memcpy(h->value.data, r->header_start, h->value.len);
            h->value.data[h->value.len] = '\0';

            if (h->key.len == r->lowcase_index) {
                ngx_memcpy(h->lowcase_key, r->lowcase_header, h->key.len);

            } else {
                ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
            }

            hh = ngx_hash_find(&umcf->headers_in_hash, h->hash,
                               h->lowcase_key, h->key.len);

            if (hh) {
                rc = hh->handler(r, h, hh->offset);

                if (rc != NGX_OK) {
                    return rc;
                }
            }

            continue;
        }

        if (rc == NGX_HTTP_PARSE_HEADER_DONE) {

            if (u->headers_in.status_n == NGX_HTTP_SWITCHING_PROTOCOLS
                && r->headers_in.upgrade)
            {
                u->upgrade = 1;

                ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);
                if (ctx && ctx->fast) {
                    ngx_http_agent_fp_untimed(ctx);
                }
            }

            if (u->headers_in.chunked) {
                /* decoded here (the input filters below); nginx frames
                 * the body for the client anew, and a length sent with
                 * it would be wrong */
                u->headers_in.content_length_n = -1;
                u->headers_in.content_length = NULL;
            }

            return NGX_OK;
        }

        if (rc == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        /* rc == NGX_HTTP_PARSE_INVALID_HEADER */

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the agent sent an invalid header: "
                      "\"%*s\\x%02xd...\"",
                      r->header_end - r->header_name_start,
                      r->header_name_start, *r->header_end);

        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }
}


/* b gets the chunk's data that buf holds, up to the chunk's end */
static void
ngx_http_agent_take_chunk_data(ngx_http_chunked_t *chunked, ngx_buf_t *buf,
    ngx_buf_t *b)
{
    if (buf->last - buf->pos >= chunked->size) {
        buf->pos += (size_t) chunked->size;
        b->last = buf->pos;
        chunked->size = 0;

    } else {
        chunked->size -= buf->last - buf->pos;
        buf->pos = buf->last;
        b->last = buf->last;
    }
}


static ngx_int_t
ngx_http_agent_input_filter_init(void *data)
{
    ngx_http_request_t   *r = data;
    ngx_http_upstream_t  *u;

    u = r->upstream;

    if (u->headers_in.status_n == NGX_HTTP_NO_CONTENT
        || u->headers_in.status_n == NGX_HTTP_NOT_MODIFIED)
    {
        u->pipe->length = 0;
        u->length = 0;

    } else if (r->method == NGX_HTTP_HEAD) {
        u->pipe->length = -1;
        u->length = -1;

    } else if (u->headers_in.chunked) {
        /*
         * "Transfer-Encoding: chunked" (a generic app's response: Python
         * workers never chunk): the body is decoded as it comes.  The
         * lengths are what must still come: at least "0" CRLF CRLF
         * buffered, more than none unbuffered, so that an end of file
         * before the last chunk is a cut-off response, not a whole one.
         */
        u->pipe->input_filter = ngx_http_agent_chunked_filter;
        u->pipe->length = 3;
        u->input_filter = ngx_http_agent_non_buffered_chunked_filter;
        u->length = 1;

    } else {
        u->pipe->length = u->headers_in.content_length_n;
        u->length = u->headers_in.content_length_n;
    }

    return NGX_OK;
}


/*
 * A chunked body, buffered (nginx's event pipe): the chunks' data in buf
 * become shadow buffers of it, queued on p->in; the chunk sizes, their
 * extensions and the trailer are dropped.  ngx_http_parse_chunked keeps
 * its state in the ctx across reads and refuses what is not chunked
 * encoding, which fails the response (502, or a cut-off one).
 */

static ngx_int_t
ngx_http_agent_chunked_filter(ngx_event_pipe_t *p, ngx_buf_t *buf)
{
    ngx_int_t              rc;
    ngx_buf_t             *b, **prev;
    ngx_chain_t           *cl;
    ngx_http_request_t    *r;
    ngx_http_agent_ctx_t  *ctx;

    if (buf->pos == buf->last) {
        return NGX_OK;
    }

    r = p->input_ctx;
    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (p->upstream_done || p->length == 0) {
        /* bytes after the last chunk: not part of the response */
        p->upstream_done = 1;
        return NGX_OK;
    }

    b = NULL;
    prev = &buf->shadow;

    for ( ;; ) {

        rc = ngx_http_parse_chunked(r, buf, &ctx->chunked);

        if (rc == NGX_OK) {

            /* data of a chunk: as much of it as buf holds */

            cl = ngx_chain_get_free_buf(p->pool, &p->free);
            if (cl == NULL) {
                return NGX_ERROR;
            }

            b = cl->buf;

            ngx_memzero(b, sizeof(ngx_buf_t));

            b->pos = buf->pos;
            b->start = buf->start;
            b->end = buf->end;
            b->tag = p->tag;
            b->temporary = 1;
            b->recycled = 1;

            *prev = b;
            prev = &b->shadow;

            if (p->in) {
                *p->last_in = cl;

            } else {
                p->in = cl;
            }

            p->last_in = &cl->next;

            b->num = buf->num;

            ngx_http_agent_take_chunk_data(&ctx->chunked, buf, b);

            continue;
        }

        if (rc == NGX_DONE) {

            /* the last chunk and the trailer: the body is whole */

            p->length = 0;
            p->upstream_done = 1;

            if (buf->pos != buf->last) {
                ngx_log_error(NGX_LOG_WARN, p->log, 0,
                              "agent: the app sent data after the last "
                              "chunk of a response; dropped");
            }

            break;
        }

        if (rc == NGX_AGAIN) {
            /* the least that must still come */
            p->length = ctx->chunked.length;
            break;
        }

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the app sent an invalid chunked response");

        return NGX_ERROR;
    }

    if (b) {
        b->shadow = buf;
        b->last_shadow = 1;

        return NGX_OK;
    }

    /* no data in buf: it can be reused */

    if (ngx_event_pipe_add_free_buf(p, buf) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the same, unbuffered (agent_buffer_response off, X-Accel-Buffering: no) */

static ngx_int_t
ngx_http_agent_non_buffered_chunked_filter(void *data, ssize_t bytes)
{
    ngx_http_request_t  *r = data;

    ngx_int_t              rc;
    ngx_buf_t             *b, *buf;
    ngx_chain_t           *cl, **ll;
    ngx_http_upstream_t   *u;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    u = r->upstream;
    buf = &u->buffer;

    buf->pos = buf->last;
    buf->last += bytes;

    if (u->length == 0) {
        /* bytes after the last chunk: not part of the response */
        buf->pos = buf->last;
        return NGX_OK;
    }

    for (cl = u->out_bufs, ll = &u->out_bufs; cl; cl = cl->next) {
        ll = &cl->next;
    }

    for ( ;; ) {

        rc = ngx_http_parse_chunked(r, buf, &ctx->chunked);

        if (rc == NGX_OK) {

            cl = ngx_chain_get_free_buf(r->pool, &u->free_bufs);
            if (cl == NULL) {
                return NGX_ERROR;
            }

            *ll = cl;
            ll = &cl->next;

            b = cl->buf;

            b->flush = 1;
            b->memory = 1;

            b->pos = buf->pos;
            b->tag = u->output.tag;

            ngx_http_agent_take_chunk_data(&ctx->chunked, buf, b);

            continue;
        }

        if (rc == NGX_DONE) {

            u->length = 0;

            if (buf->pos != buf->last) {
                ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                              "agent: the app sent data after the last "
                              "chunk of a response; dropped");
                buf->pos = buf->last;
            }

            break;
        }

        if (rc == NGX_AGAIN) {
            break;
        }

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the app sent an invalid chunked response");

        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_agent_abort_request(ngx_http_request_t *r)
{
    return;
}


static void
ngx_http_agent_finalize_request(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (ctx && ctx->fast && !ctx->failed) {
        ngx_http_agent_fp_duration(ctx);
    }
}


/* the post-body handler of an app's request: a worker of its own, or the
 * slow path */

static void
ngx_http_agent_body_read(ngx_http_request_t *r)
{
    ngx_int_t              rc;
    ngx_http_agent_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    rc = ngx_http_agent_fp_start(r, ctx);

    if (rc == NGX_DONE) {
        /* it waits for a worker, or was answered */
        return;
    }

    ngx_http_agent_fp_run(r);
}


/* a whole plain-text response from nginx itself, as the engine words it */

ngx_int_t
ngx_http_agent_answer(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *body, ngx_uint_t retry_after)
{
    ngx_int_t         rc;
    ngx_buf_t        *b;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;

    if (r->header_sent) {
        return NGX_ERROR;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = body->len;
    ngx_str_set(&r->headers_out.content_type, "text/plain");
    r->headers_out.content_type_len = r->headers_out.content_type.len;

    if (retry_after) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Retry-After");
        ngx_str_set(&h->value, "1");
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body->data;
    b->last = body->data + body->len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
