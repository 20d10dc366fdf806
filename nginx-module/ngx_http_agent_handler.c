
/*
 * The request path: a location's requests go as request frames to the
 * agent's agent.sock (docs/protocol.md), a status location's as plain HTTP
 * to status.sock; the responses come back as HTTP status line and headers.
 *
 * The fast path (docs/protocol.md section 5) sends the same frame straight
 * to a worker that ngx_http_agent_fastpath.c claimed: this file's peer
 * (init, get, free) connects to the worker or reuses the connection kept
 * for it, and its c->recv strips the records, so that nginx's upstream
 * code sees what agent.sock would have sent.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


#define NGX_HTTP_AGENT_KEY_MAX  1024


typedef struct {
    ngx_str_t                  key;
    ngx_str_t                  value;
} ngx_http_agent_var_t;


static ngx_int_t ngx_http_agent_is_static_file(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_pass(ngx_http_request_t *r,
    ngx_uint_t to_status);
static ngx_int_t ngx_http_agent_create_status_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_status_path(ngx_http_request_t *r,
    ngx_str_t *path);
static ngx_uint_t ngx_http_agent_status_header_is_sent(ngx_table_elt_t *h);
static ngx_int_t ngx_http_agent_create_request(ngx_http_request_t *r);
static ngx_table_elt_t *ngx_http_agent_next_header(ngx_list_part_t **part,
    ngx_uint_t *i);
static off_t ngx_http_agent_body_length(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_collect_cgi_vars(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, off_t content_length, ngx_array_t *vars);
static ngx_int_t ngx_http_agent_add_var(ngx_array_t *vars, char *key,
    u_char *data, size_t len);
static ngx_int_t ngx_http_agent_header_is_sent(ngx_table_elt_t *h);
static u_char *ngx_http_agent_put_u32(u_char *p, uint32_t n);
static u_char *ngx_http_agent_put_header_pair(u_char *p, ngx_table_elt_t *h);
static ngx_int_t ngx_http_agent_append_body(ngx_http_request_t *r,
    ngx_buf_t *head);
static ngx_int_t ngx_http_agent_reinit_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_status_line(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_input_filter_init(void *data);
static void ngx_http_agent_abort_request(ngx_http_request_t *r);
static void ngx_http_agent_finalize_request(ngx_http_request_t *r,
    ngx_int_t rc);
static void ngx_http_agent_body_read(ngx_http_request_t *r);
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
ngx_http_agent_create_request(ngx_http_request_t *r)
{
    off_t                       content_length;
    size_t                      vars_size;
    u_char                     *p;
    ngx_buf_t                  *b;
    ngx_uint_t                  i;
    ngx_array_t                 vars;
    ngx_list_part_t            *part;
    ngx_table_elt_t            *h;
    ngx_http_agent_var_t       *var;
    ngx_http_agent_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);

    content_length = ngx_http_agent_body_length(r);

    if (ngx_array_init(&vars, r->pool, 16, sizeof(ngx_http_agent_var_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_agent_collect_cgi_vars(r, alcf, content_length, &vars)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    vars_size = 0;
    var = vars.elts;

    for (i = 0; i < vars.nelts; i++) {
        vars_size += 4 + var[i].key.len + 4 + var[i].value.len;
    }

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_agent_next_header(&part, &i)) != NULL) {
        if (ngx_http_agent_header_is_sent(h)) {
            vars_size += 4 + sizeof("HTTP_") - 1 + h->key.len
                         + 4 + h->value.len;
        }
    }

    if (vars_size > NGX_MAX_UINT32_VALUE) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: request headers too large for a frame");
        return NGX_ERROR;
    }

    b = ngx_create_temp_buf(r->pool, 4 + vars_size);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_http_agent_put_u32(b->last, (uint32_t) vars_size);

    for (i = 0; i < vars.nelts; i++) {
        p = ngx_http_agent_put_u32(p, (uint32_t) var[i].key.len);
        p = ngx_cpymem(p, var[i].key.data, var[i].key.len);
        p = ngx_http_agent_put_u32(p, (uint32_t) var[i].value.len);
        p = ngx_cpymem(p, var[i].value.data, var[i].value.len);
    }

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_agent_next_header(&part, &i)) != NULL) {
        if (ngx_http_agent_header_is_sent(h)) {
            p = ngx_http_agent_put_header_pair(p, h);
        }
    }

    b->last = p;

    return ngx_http_agent_append_body(r, b);
}


/*
 * "METHOD /path?args HTTP/1.0" with the few headers the status socket reads
 * (docs/status-api.md): HTTP/1.0, so that the status socket closes the
 * connection when its response is done and nginx needs no keep-alive state.
 */

static ngx_int_t
ngx_http_agent_create_status_request(ngx_http_request_t *r)
{
    off_t             content_length;
    size_t            len;
    u_char           *p;
    ngx_buf_t        *b;
    ngx_str_t         path;
    ngx_uint_t        i, escape;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (ngx_http_agent_status_path(r, &path) != NGX_OK) {
        return NGX_ERROR;
    }

    /* r->uri is decoded; the request line needs it encoded again */
    escape = 2 * ngx_escape_uri(NULL, path.data, path.len, NGX_ESCAPE_URI);

    content_length = ngx_http_agent_body_length(r);

    len = r->method_name.len + 1 + path.len + escape
          + (r->args.len ? 1 + r->args.len : 0)
          + sizeof(" HTTP/1.0" CRLF) - 1
          + sizeof("Content-Length: " CRLF) - 1 + NGX_OFF_T_LEN
          + sizeof(CRLF) - 1;

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_agent_next_header(&part, &i)) != NULL) {
        if (ngx_http_agent_status_header_is_sent(h)) {
            len += h->key.len + sizeof(": " CRLF) - 1 + h->value.len;
        }
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(b->last, r->method_name.data, r->method_name.len);
    *p++ = ' ';

    if (escape) {
        p = (u_char *) ngx_escape_uri(p, path.data, path.len,
                                      NGX_ESCAPE_URI);

    } else {
        p = ngx_cpymem(p, path.data, path.len);
    }

    if (r->args.len) {
        *p++ = '?';
        p = ngx_cpymem(p, r->args.data, r->args.len);
    }

    p = ngx_cpymem(p, " HTTP/1.0" CRLF, sizeof(" HTTP/1.0" CRLF) - 1);

    part = &r->headers_in.headers.part;
    i = 0;

    while ((h = ngx_http_agent_next_header(&part, &i)) != NULL) {
        if (ngx_http_agent_status_header_is_sent(h)) {
            p = ngx_cpymem(p, h->key.data, h->key.len);
            *p++ = ':'; *p++ = ' ';
            p = ngx_cpymem(p, h->value.data, h->value.len);
            *p++ = CR; *p++ = LF;
        }
    }

    /* stated by nginx, not passed through: a chunked body arrives decoded */
    p = ngx_sprintf(p, "Content-Length: %O" CRLF CRLF, content_length);

    b->last = p;

    return ngx_http_agent_append_body(r, b);
}


/*
 * The path the status socket sees: the URI without the location's prefix,
 * so that "location /agent/" serves /agent/pool as /pool.  A regex or a
 * named location has no prefix to strip, nor has a URI a rewrite moved out
 * of the prefix; those go as they are.
 */

static ngx_int_t
ngx_http_agent_status_path(ngx_http_request_t *r, ngx_str_t *path)
{
    ngx_str_t                  rest;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    rest = r->uri;

    if (!clcf->named
#if (NGX_PCRE)
        && clcf->regex == NULL
#endif
        && clcf->name.len <= r->uri.len
        && ngx_strncmp(r->uri.data, clcf->name.data, clcf->name.len) == 0)
    {
        rest.data += clcf->name.len;
        rest.len -= clcf->name.len;
    }

    if (rest.len && rest.data[0] == '/') {
        *path = rest;
        return NGX_OK;
    }

    path->len = rest.len + 1;

    path->data = ngx_pnalloc(r->pool, path->len);
    if (path->data == NULL) {
        return NGX_ERROR;
    }

    path->data[0] = '/';
    ngx_memcpy(path->data + 1, rest.data, rest.len);

    return NGX_OK;
}


/*
 * Authorization carries the status tokens; Accept picks JSON or msgpack;
 * Host is harmless.  Nothing else reaches the status socket: it neither
 * needs nor should see the client's cookies.  Only a Bearer Authorization
 * is passed: any other scheme (auth_basic's credentials) is nginx's own
 * business, and the status socket would answer it as a wrong token.
 */

static ngx_uint_t
ngx_http_agent_status_header_is_sent(ngx_table_elt_t *h)
{
    static ngx_str_t  names[] = {
        ngx_string("Host"),
        ngx_string("Accept"),
        ngx_string("Authorization"),
        ngx_null_string
    };

    ngx_str_t  *name;

    if (h->hash == 0) {
        return 0;
    }

    for (name = names; name->len; name++) {
        if (h->key.len == name->len
            && ngx_strncasecmp(h->key.data, name->data, name->len) == 0)
        {
            break;
        }
    }

    if (name->len == 0) {
        return 0;
    }

    if (name == &names[2]) {
        return h->value.len > sizeof("Bearer ") - 1
               && ngx_strncasecmp(h->value.data, (u_char *) "Bearer ",
                                  sizeof("Bearer ") - 1) == 0;
    }

    return 1;
}


/*
 * The request header at (*part, *i), which then move on to the next one;
 * NULL past the last.  Walks the parts of nginx's list as nginx does.
 */

static ngx_table_elt_t *
ngx_http_agent_next_header(ngx_list_part_t **part, ngx_uint_t *i)
{
    ngx_table_elt_t  *h;

    while (*i >= (*part)->nelts) {
        if ((*part)->next == NULL) {
            return NULL;
        }

        *part = (*part)->next;
        *i = 0;
    }

    h = (*part)->elts;

    return &h[(*i)++];
}


/* the length of the body as nginx holds it: a chunked body already decoded */

static off_t
ngx_http_agent_body_length(ngx_http_request_t *r)
{
    off_t         len;
    ngx_chain_t  *cl;

    len = 0;

    for (cl = r->upstream->request_bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    return len;
}


static ngx_int_t
ngx_http_agent_collect_cgi_vars(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, off_t content_length, ngx_array_t *vars)
{
    u_char                     *p;
    ngx_str_t                   server_name, protocol;
    ngx_connection_t           *c;
    ngx_http_core_srv_conf_t   *cscf;

    c = r->connection;

    if (ngx_connection_local_sockaddr(c, NULL, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    cscf = ngx_http_get_module_srv_conf(r, ngx_http_core_module);

    server_name = cscf->server_name;

    if (server_name.len == 0 && r->headers_in.server.len) {
        server_name = r->headers_in.server;
    }

    protocol = r->http_protocol;

    if (protocol.len == 0) {
        ngx_str_set(&protocol, "HTTP/0.9");
    }

    /* room for the three decimal numbers below */
    p = ngx_pnalloc(r->pool, NGX_OFF_T_LEN + 2 * NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_agent_add_var(vars, "AGENT_APP", alcf->app->name.data,
                               alcf->app->name.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "REQUEST_METHOD",
                                  r->method_name.data, r->method_name.len)
           != NGX_OK
        || ngx_http_agent_add_var(vars, "REQUEST_URI", r->unparsed_uri.data,
                                  r->unparsed_uri.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "PATH_INFO", r->uri.data, r->uri.len)
           != NGX_OK
        || ngx_http_agent_add_var(vars, "QUERY_STRING", r->args.data,
                                  r->args.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "SCRIPT_NAME", NULL, 0) != NGX_OK
        || ngx_http_agent_add_var(vars, "SERVER_NAME", server_name.data,
                                  server_name.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "SERVER_PROTOCOL", protocol.data,
                                  protocol.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "REMOTE_ADDR", c->addr_text.data,
                                  c->addr_text.len) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_agent_add_var(vars, "SERVER_PORT", p,
            ngx_sprintf(p, "%ui", (ngx_uint_t)
                        ngx_inet_get_port(c->local_sockaddr)) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += NGX_INT_T_LEN;

    if (ngx_http_agent_add_var(vars, "REMOTE_PORT", p,
            ngx_sprintf(p, "%ui", (ngx_uint_t)
                        ngx_inet_get_port(c->sockaddr)) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += NGX_INT_T_LEN;

    if (ngx_http_agent_add_var(vars, "CONTENT_LENGTH", p,
                               ngx_sprintf(p, "%O", content_length) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (r->headers_in.content_type
        && ngx_http_agent_add_var(vars, "CONTENT_TYPE",
                                  r->headers_in.content_type->value.data,
                                  r->headers_in.content_type->value.len)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

#if (NGX_SSL || NGX_COMPAT)
    if (c->ssl
        && ngx_http_agent_add_var(vars, "HTTPS", (u_char *) "on", 2)
           != NGX_OK)
    {
        return NGX_ERROR;
    }
#endif

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_add_var(ngx_array_t *vars, char *key, u_char *data, size_t len)
{
    ngx_http_agent_var_t  *var;

    var = ngx_array_push(vars);
    if (var == NULL) {
        return NGX_ERROR;
    }

    var->key.data = (u_char *) key;
    var->key.len = ngx_strlen(key);
    var->value.data = data;
    var->value.len = len;

    return NGX_OK;
}


/*
 * Content-Type and Content-Length travel as CGI variables only.  A name
 * that would not become a valid frame key ([A-Z0-9_], at most 1024 bytes)
 * is left out rather than make the whole frame malformed.
 */

static ngx_int_t
ngx_http_agent_header_is_sent(ngx_table_elt_t *h)
{
    u_char      ch;
    ngx_uint_t  i;

    if (h->hash == 0) {
        return 0;
    }

    if ((h->key.len == sizeof("Content-Type") - 1
         && ngx_strncasecmp(h->key.data, (u_char *) "Content-Type",
                            h->key.len) == 0)
        || (h->key.len == sizeof("Content-Length") - 1
            && ngx_strncasecmp(h->key.data, (u_char *) "Content-Length",
                               h->key.len) == 0))
    {
        return 0;
    }

    if (h->key.len == 0
        || h->key.len > NGX_HTTP_AGENT_KEY_MAX - (sizeof("HTTP_") - 1))
    {
        return 0;
    }

    for (i = 0; i < h->key.len; i++) {
        ch = h->key.data[i];

        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
              || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_'))
        {
            return 0;
        }
    }

    return 1;
}


static u_char *
ngx_http_agent_put_u32(u_char *p, uint32_t n)
{
    *p++ = (u_char) (n >> 24);
    *p++ = (u_char) (n >> 16);
    *p++ = (u_char) (n >> 8);
    *p++ = (u_char) n;

    return p;
}


static u_char *
ngx_http_agent_put_header_pair(u_char *p, ngx_table_elt_t *h)
{
    u_char      ch;
    ngx_uint_t  i;

    p = ngx_http_agent_put_u32(p, (uint32_t) (sizeof("HTTP_") - 1
                                              + h->key.len));
    p = ngx_cpymem(p, "HTTP_", sizeof("HTTP_") - 1);

    for (i = 0; i < h->key.len; i++) {
        ch = h->key.data[i];

        if (ch >= 'a' && ch <= 'z') {
            ch &= ~0x20;

        } else if (ch == '-') {
            ch = '_';
        }

        *p++ = ch;
    }

    p = ngx_http_agent_put_u32(p, (uint32_t) h->value.len);

    return ngx_cpymem(p, h->value.data, h->value.len);
}


/*
 * The request to send: head (the frame, or the status request's head)
 * followed by the body.  The body buffers are described anew, not shared:
 * sending moves their positions, and the originals must stay intact should
 * the request be sent again.
 */

static ngx_int_t
ngx_http_agent_append_body(ngx_http_request_t *r, ngx_buf_t *head)
{
    ngx_buf_t    *b;
    ngx_chain_t  *body, *cl;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = head;

    body = r->upstream->request_bufs;
    r->upstream->request_bufs = cl;

    for ( /* void */ ; body; body = body->next) {

        b = ngx_alloc_buf(r->pool);
        if (b == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(b, body->buf, sizeof(ngx_buf_t));

        cl->next = ngx_alloc_chain_link(r->pool);
        if (cl->next == NULL) {
            return NGX_ERROR;
        }

        cl = cl->next;
        cl->buf = b;
    }

    cl->next = NULL;

    return NGX_OK;
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

    } else {
        u->pipe->length = u->headers_in.content_length_n;
        u->length = u->headers_in.content_length_n;
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


/* ------------------------------------------------------------------------ */
/* the fast path                                                             */

ngx_http_upstream_srv_conf_t *
ngx_http_agent_fp_upstream(void)
{
    return &ngx_http_agent_fp_uscf;
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
        ctx->reused = 1;
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

        if (ctx->reused && !ctx->got_bytes && !ctx->timed_out) {
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

    if (!ctx->failed && c && !c->read->error && !c->write->error
        && !c->read->timedout && !c->write->timedout
        && r->upstream->request_body_sent)
    {
        clean = ctx->decoder.end || ngx_http_agent_fp_drain(ctx, c);
        clean = clean && !ctx->decoder.extra;
    }

    if (clean && !ngx_terminate && !ngx_exiting
        && ngx_handle_read_event(c->read, 0) == NGX_OK)
    {
        pc->connection = NULL;
        c->read->delayed = 0;
        ngx_http_agent_fp_keep(ctx, c);
    }

    ngx_http_agent_fp_release(ctx);

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
        ngx_http_agent_fp_release(ctx);
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

        ngx_http_agent_fp_release(ctx);
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
