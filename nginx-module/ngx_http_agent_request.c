
/*
 * What nginx sends upstream: an app's request as a request frame for
 * agent.sock or a claimed worker (docs/protocol.md), a status location's as
 * plain HTTP for status.sock.  Both carry the body nginx read, from memory
 * or its temporary file.
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


static ngx_int_t ngx_http_agent_status_path(ngx_http_request_t *r,
    ngx_str_t *path);
static ngx_uint_t ngx_http_agent_status_header_is_sent(ngx_table_elt_t *h);
static ngx_table_elt_t *ngx_http_agent_next_header(ngx_list_part_t **part,
    ngx_uint_t *i);
static off_t ngx_http_agent_body_length(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_collect_cgi_vars(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, off_t content_length, ngx_array_t *vars);
static ngx_int_t ngx_http_agent_add_var(ngx_array_t *vars, char *key,
    u_char *data, size_t len);
static void ngx_http_agent_split_base_uri(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, ngx_str_t *script_name,
    ngx_str_t *path_info);
static ngx_int_t ngx_http_agent_header_is_sent(ngx_table_elt_t *h);
static u_char *ngx_http_agent_put_u32(u_char *p, uint32_t n);
static u_char *ngx_http_agent_put_header_pair(u_char *p, ngx_table_elt_t *h);
static ngx_int_t ngx_http_agent_append_body(ngx_http_request_t *r,
    ngx_buf_t *head);


/*
 * The client asks to switch protocols (a WebSocket handshake): an HTTP/1.1
 * request with an Upgrade header and "upgrade" among Connection's tokens.
 * The engine then tunnels the connection once the app answers 101.
 */
ngx_uint_t
ngx_http_agent_asks_upgrade(ngx_http_request_t *r)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (r->http_version != NGX_HTTP_VERSION_11
        || r->headers_in.upgrade == NULL)
    {
        return 0;
    }

    /* nginx 1.22 keeps no pointer to the Connection header (only its
     * keep-alive or close): every line named so is looked at */

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return 0;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("Connection") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Connection",
                               sizeof("Connection") - 1) == 0
            && ngx_strlcasestrn(h[i].value.data,
                                h[i].value.data + h[i].value.len,
                                (u_char *) "upgrade", sizeof("upgrade") - 2)
               != NULL)
        {
            return 1;
        }
    }
}


ngx_int_t
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

ngx_int_t
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
    ngx_str_t                   server_name, protocol, script_name, path_info;
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

    ngx_http_agent_split_base_uri(r, alcf, &script_name, &path_info);

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
        || ngx_http_agent_add_var(vars, "PATH_INFO", path_info.data,
                                  path_info.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "QUERY_STRING", r->args.data,
                                  r->args.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "SCRIPT_NAME", script_name.data,
                                  script_name.len) != NGX_OK
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

    if (alcf->long_responses
        && ngx_http_agent_add_var(vars, "AGENT_LONG_RESPONSE",
                                  (u_char *) "1", 1)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_agent_asks_upgrade(r)
        && ngx_http_agent_add_var(vars, "AGENT_UPGRADE", (u_char *) "1", 1)
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


/*
 * SCRIPT_NAME and PATH_INFO (PEP 3333): a URI under one of the location's
 * agent_base_uri (the URI itself, or it followed by "/") is split there, so
 * that the app builds its URLs under the base; the longest base that
 * matches wins.  Otherwise SCRIPT_NAME is empty and PATH_INFO the whole
 * decoded path.
 */

static void
ngx_http_agent_split_base_uri(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, ngx_str_t *script_name,
    ngx_str_t *path_info)
{
    ngx_str_t   *base;
    ngx_uint_t   i;

    ngx_str_null(script_name);
    *path_info = r->uri;

    if (alcf->base_uris == NULL || alcf->base_uris == NGX_CONF_UNSET_PTR) {
        return;
    }

    base = alcf->base_uris->elts;

    for (i = 0; i < alcf->base_uris->nelts; i++) {
        if (base[i].len > script_name->len
            && base[i].len <= r->uri.len
            && ngx_strncmp(r->uri.data, base[i].data, base[i].len) == 0
            && (base[i].len == r->uri.len || r->uri.data[base[i].len] == '/'))
        {
            *script_name = base[i];
        }
    }

    path_info->data = r->uri.data + script_name->len;
    path_info->len = r->uri.len - script_name->len;
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
