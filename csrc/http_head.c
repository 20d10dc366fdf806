/*
 * A generic worker's side of the wire (wire.h): the request frame turned
 * into an HTTP/1.1 request head, and the first bytes of the raw HTTP
 * response judged. Pure: no I/O, no allocation, no engine state.
 *
 * The frame comes from nginx, whose parser already refused what HTTP does
 * not allow; the head is still built defensively, because a generic worker
 * is an HTTP parser of unknown quality: nothing here can split a line.
 */
#include <string.h>

#include "wire.h"

/* Headers the engine never passes on: hop-by-hop ones (the connection to
 * the worker is the engine's, and closes after one request), the ones it
 * sets itself, Expect (nginx already answered any 100-continue) and Proxy
 * (httpoxy). Names as the frame spells them, without "HTTP_". */
static const char *const dropped[] = {
    "CONNECTION", "KEEP_ALIVE", "PROXY_CONNECTION", "TE", "TRAILER", "TRANSFER_ENCODING", "UPGRADE",
    "HTTP2_SETTINGS", "EXPECT", "PROXY", "CONTENT_LENGTH", "CONTENT_TYPE", "X_FORWARDED_FOR",
    "X_FORWARDED_PROTO", NULL,
};

typedef struct {
    char *out;                  /* NULL: measuring */
    size_t size, len;
    bool over;
} writer;

static void put(writer *w, const char *p, size_t n)
{
    if (w->out) {
        if (n > w->size - w->len) {
            w->over = true;
            return;
        }
        memcpy(w->out + w->len, p, n);
    }
    w->len += n;
}

static void put_str(writer *w, const char *s)
{
    put(w, s, strlen(s));
}

static bool key_is(const char *key, uint32_t len, const char *name)
{
    return strlen(name) == len && memcmp(key, name, len) == 0;
}

static bool is_dropped(const char *name, uint32_t len)
{
    for (int i = 0; dropped[i]; i++)
        if (key_is(name, len, dropped[i]))
            return true;
    return false;
}

static bool clean_value(const char *v, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0')
            return false;
    return true;
}

/* RFC 9110's tchar: what a method may be made of. */
static bool is_token(const char *s, uint32_t len)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    if (len == 0)
        return false;
    for (uint32_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        bool alnum = (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z');
        if (!alnum && (ch == '\0' || !memchr(extra, ch, sizeof extra - 1)))
            return false;
    }
    return true;
}

static void put_uri(writer *w, const char *uri, uint32_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    if (len == 0) {
        put(w, "/", 1);
        return;
    }
    for (uint32_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)uri[i];
        if (ch <= 0x20 || ch == 0x7f) {
            char esc[3] = {'%', hex[ch >> 4], hex[ch & 15]};
            put(w, esc, 3);
        } else {
            put(w, uri + i, 1);
        }
    }
}

/* "X_TOKEN" -> "X-Token" */
static void put_header_name(writer *w, const char *name, uint32_t len)
{
    bool word_start = true;
    for (uint32_t i = 0; i < len; i++) {
        char ch = name[i];
        if (ch == '_') {
            ch = '-';
            word_start = true;
        } else if (word_start) {
            word_start = false;
        } else if (ch >= 'A' && ch <= 'Z') {
            ch = (char)(ch - 'A' + 'a');
        }
        put(w, &ch, 1);
    }
}

typedef struct {
    const char *method, *uri, *content_length, *content_type, *remote_addr, *server_name, *https, *upgrade;
    uint32_t method_len, uri_len, content_length_len, content_type_len, remote_addr_len, server_name_len, https_len,
        upgrade_len;
    bool has_host;
    bool tunnel;                /* AGENT_UPGRADE: the client asked to switch protocols */
} cgi_vars;

/* The next pair of vars at *pos; vars were checked by frame_parse_vars(),
 * but the walk stops at anything that does not fit rather than trust that. */
static bool next_pair(const char *vars, uint32_t size, uint32_t *pos, const char **key, uint32_t *klen,
                      const char **val, uint32_t *vlen)
{
    uint32_t p = *pos;
    if (size - p < WIRE_U32_SIZE)
        return false;
    *klen = wire_be32(vars + p);
    p += WIRE_U32_SIZE;
    if (*klen > size - p)
        return false;
    *key = vars + p;
    p += *klen;
    if (size - p < WIRE_U32_SIZE)
        return false;
    *vlen = wire_be32(vars + p);
    p += WIRE_U32_SIZE;
    if (*vlen > size - p)
        return false;
    *val = vars + p;
    *pos = p + *vlen;
    return true;
}

#define TAKE(name, field)                        \
    if (key_is(key, klen, name)) {               \
        c.field = val;                           \
        c.field##_len = vlen;                    \
        continue;                                \
    }

http_head_status http_head_build(const char *vars, uint32_t vars_size, char *out, size_t size, size_t *len)
{
    cgi_vars c = {0};
    const char *key, *val;
    uint32_t klen, vlen, pos = 0;
    while (pos < vars_size && next_pair(vars, vars_size, &pos, &key, &klen, &val, &vlen)) {
        TAKE("REQUEST_METHOD", method)
        TAKE("REQUEST_URI", uri)
        TAKE("CONTENT_LENGTH", content_length)
        TAKE("CONTENT_TYPE", content_type)
        TAKE("REMOTE_ADDR", remote_addr)
        TAKE("SERVER_NAME", server_name)
        TAKE("HTTPS", https)
        TAKE("HTTP_UPGRADE", upgrade)
        if (key_is(key, klen, "HTTP_HOST"))
            c.has_host = c.has_host || clean_value(val, vlen);
        if (key_is(key, klen, "AGENT_UPGRADE"))
            c.tunnel = vlen == 1 && val[0] == '1';
    }
    if (!c.method || !is_token(c.method, c.method_len))
        return HTTP_HEAD_BAD_METHOD;

    writer w = {.out = out, .size = size};
    put(&w, c.method, c.method_len);
    put(&w, " ", 1);
    put_uri(&w, c.uri, c.uri ? c.uri_len : 0);
    put_str(&w, " HTTP/1.1\r\n");
    if (!c.has_host) {
        put_str(&w, "Host: ");
        if (c.server_name && clean_value(c.server_name, c.server_name_len) && c.server_name_len > 0)
            put(&w, c.server_name, c.server_name_len);
        else
            put_str(&w, "localhost");
        put_str(&w, "\r\n");
    }
    pos = 0;
    while (pos < vars_size && next_pair(vars, vars_size, &pos, &key, &klen, &val, &vlen)) {
        if (klen <= 5 || memcmp(key, "HTTP_", 5) != 0)
            continue;
        if (is_dropped(key + 5, klen - 5) || !clean_value(val, vlen))
            continue;
        put_header_name(&w, key + 5, klen - 5);
        put(&w, ": ", 2);
        put(&w, val, vlen);
        put(&w, "\r\n", 2);
    }
    if (c.content_type && clean_value(c.content_type, c.content_type_len)) {
        put_str(&w, "Content-Type: ");
        put(&w, c.content_type, c.content_type_len);
        put_str(&w, "\r\n");
    }
    if (c.tunnel && c.upgrade && c.upgrade_len > 0 && clean_value(c.upgrade, c.upgrade_len)) {
        /* A switch of protocols (a WebSocket): what follows the head on
         * this connection is the new protocol's, both ways, until either
         * side closes; so no length, and no close after the response. */
        put_str(&w, "Upgrade: ");
        put(&w, c.upgrade, c.upgrade_len);
        put_str(&w, "\r\nConnection: Upgrade\r\n");
    } else {
        put_str(&w, "Content-Length: ");
        if (c.content_length && c.content_length_len > 0)
            put(&w, c.content_length, c.content_length_len);  /* decimal: frame_parse_vars checked it */
        else
            put_str(&w, "0");
        put_str(&w, "\r\nConnection: close\r\n");
    }
    if (c.remote_addr && clean_value(c.remote_addr, c.remote_addr_len) && c.remote_addr_len > 0) {
        put_str(&w, "X-Forwarded-For: ");
        put(&w, c.remote_addr, c.remote_addr_len);
        put_str(&w, "\r\n");
    }
    put_str(&w, key_is(c.https ? c.https : "", c.https ? c.https_len : 0, "on")
                    ? "X-Forwarded-Proto: https\r\n" : "X-Forwarded-Proto: http\r\n");
    put_str(&w, "\r\n");
    *len = w.len;
    return w.over ? HTTP_HEAD_TOO_LARGE : HTTP_HEAD_OK;
}

status_line_check http_check_status_line(const char *data, uint32_t have, bool end)
{
    static const char prefix[] = "HTTP/1.";
    const uint32_t prefix_len = sizeof prefix - 1;
    uint32_t k = have < prefix_len ? have : prefix_len;
    if (memcmp(data, prefix, k) != 0)
        return STATUS_LINE_BAD;
    if (k == prefix_len)
        return STATUS_LINE_OK;
    return end ? STATUS_LINE_BAD : STATUS_LINE_PENDING;
}
