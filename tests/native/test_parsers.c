/*
 * The wire parsers (csrc/wire.h) tested directly: the request frame
 * (docs/protocol.md §1), the response records (§2) and a generic worker's
 * request head and status line (http_head.c), valid inputs and every
 * error path. Built and run by tests/unit/test_native_parsers.py
 * with ASan and UBSan; exits 1 when a check fails.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static int failures;

#define CHECK(cond)                                                      \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            failures++;                                                  \
        }                                                                \
    } while (0)

#define CHECK_STR(got, want)                                             \
    do {                                                                 \
        if (strcmp((got), (want)) != 0) {                                \
            fprintf(stderr, "%s:%d: got \"%s\", want \"%s\"\n", __FILE__, __LINE__, (got), (want)); \
            failures++;                                                  \
        }                                                                \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Building inputs                                                          */

typedef struct {
    char data[4096];
    uint32_t len;
} bytes;

static void put_u32(bytes *b, uint32_t v)
{
    b->data[b->len++] = (char)(v >> 24);
    b->data[b->len++] = (char)(v >> 16);
    b->data[b->len++] = (char)(v >> 8);
    b->data[b->len++] = (char)v;
}

static void put_raw(bytes *b, const void *p, uint32_t n)
{
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_pair(bytes *b, const char *key, const char *value)
{
    put_u32(b, (uint32_t)strlen(key));
    put_raw(b, key, (uint32_t)strlen(key));
    put_u32(b, (uint32_t)strlen(value));
    put_raw(b, value, (uint32_t)strlen(value));
}

/* The vars of a valid frame; CONTENT_LENGTH last, so that no proper prefix
 * is a valid frame. */
static bytes valid_vars(const char *length)
{
    bytes b = {.len = 0};
    put_pair(&b, "AGENT_APP", "/srv/shop");
    put_pair(&b, "REQUEST_METHOD", "POST");
    put_pair(&b, "REQUEST_URI", "/cart?id=1");
    put_pair(&b, "HTTP_X_TOKEN", "");
    put_pair(&b, "CONTENT_LENGTH", length);
    return b;
}

static frame_status parse(const bytes *b, frame_info *info)
{
    memset(info, 0, sizeof *info);
    return frame_parse_vars(b->data, b->len, info);
}

static const char *describe(frame_status st, const frame_info *info)
{
    static char why[160];
    frame_describe(st, info, why, sizeof why);
    return why;
}

static bool value_is(const char *p, uint32_t len, const char *want)
{
    return len == strlen(want) && memcmp(p, want, len) == 0;
}

/* ------------------------------------------------------------------------ */
/* The frame                                                                */

static void test_head(void)
{
    frame_info info;
    unsigned char head[4] = {0, 0, 0, 1};
    CHECK(frame_check_head(head, 1u << 20, &info) == FRAME_OK && info.vars_size == 1);
    memcpy(head, (unsigned char[]){0, 0x10, 0, 0}, 4);
    CHECK(frame_check_head(head, 1u << 20, &info) == FRAME_OK && info.vars_size == 1u << 20);
    memcpy(head, (unsigned char[]){0, 0x10, 0, 1}, 4);
    CHECK(frame_check_head(head, 1u << 20, &info) == FRAME_SIZE_OVER_CAP);
    CHECK_STR(describe(FRAME_SIZE_OVER_CAP, &info), "vars-size 1048577 is over the cap");
    memcpy(head, (unsigned char[]){0xff, 0xff, 0xff, 0xff}, 4);
    CHECK(frame_check_head(head, 0xffffffffu, &info) == FRAME_OK);
    CHECK(frame_check_head(head, 0xfffffffeu, &info) == FRAME_SIZE_OVER_CAP);
    memset(head, 0, 4);
    CHECK(frame_check_head(head, 1u << 20, &info) == FRAME_SIZE_ZERO);
    CHECK_STR(describe(FRAME_SIZE_ZERO, &info), "vars-size 0 is zero");
    /* "GET " read as a size: random bytes are refused by the cap. */
    CHECK(frame_check_head("GET /", 1u << 20, &info) == FRAME_SIZE_OVER_CAP);
}

static void test_valid_frame(void)
{
    frame_info info;
    bytes b = valid_vars("42");
    CHECK(parse(&b, &info) == FRAME_OK);
    CHECK(value_is(info.app, info.app_len, "/srv/shop"));
    CHECK(value_is(info.method, info.method_len, "POST"));
    CHECK(value_is(info.uri, info.uri_len, "/cart?id=1"));
    CHECK(info.content_length == 42);
    CHECK(info.app > b.data && info.app + info.app_len <= b.data + b.len);

    b = valid_vars("9999999999999999999");  /* 19 digits: the longest accepted */
    CHECK(parse(&b, &info) == FRAME_OK && info.content_length == 9999999999999999999ull);
    b = valid_vars("0");
    CHECK(parse(&b, &info) == FRAME_OK && info.content_length == 0);
    b = valid_vars("007");
    CHECK(parse(&b, &info) == FRAME_OK && info.content_length == 7);
}

/* AGENT_LONG_RESPONSE is optional; only the value 1 marks a long response. */
static void test_long_response(void)
{
    frame_info info;
    bytes b = valid_vars("0");
    CHECK(parse(&b, &info) == FRAME_OK && !info.long_response);
    put_pair(&b, "AGENT_LONG_RESPONSE", "1");
    CHECK(parse(&b, &info) == FRAME_OK && info.long_response);
    b = valid_vars("0");
    put_pair(&b, "AGENT_LONG_RESPONSE", "yes");
    CHECK(parse(&b, &info) == FRAME_OK && !info.long_response);
    b = valid_vars("0");
    put_pair(&b, "HTTP_AGENT_LONG_RESPONSE", "1");  /* a client's header is not nginx's word */
    CHECK(parse(&b, &info) == FRAME_OK && !info.long_response);
}

/* AGENT_UPGRADE is optional; only the value 1 asks for a tunnel. */
static void test_upgrade(void)
{
    frame_info info;
    bytes b = valid_vars("0");
    CHECK(parse(&b, &info) == FRAME_OK && !info.upgrade);
    put_pair(&b, "AGENT_UPGRADE", "1");
    CHECK(parse(&b, &info) == FRAME_OK && info.upgrade && !info.long_response);
    b = valid_vars("0");
    put_pair(&b, "AGENT_UPGRADE", "");
    CHECK(parse(&b, &info) == FRAME_OK && !info.upgrade);
    b = valid_vars("0");
    put_pair(&b, "HTTP_UPGRADE", "websocket");  /* the header alone is not nginx's word */
    CHECK(parse(&b, &info) == FRAME_OK && !info.upgrade);
}

static void test_values(void)
{
    frame_info info;
    bytes b = {.len = 0};
    /* Values are any bytes, empty ones included; a repeated method or URI
     * is not refused: the last one is the one kept. */
    put_pair(&b, "AGENT_APP", "");
    put_pair(&b, "REQUEST_METHOD", "GET");
    put_pair(&b, "REQUEST_METHOD", "HEAD");
    put_pair(&b, "REQUEST_URI", "/");
    put_u32(&b, 4);
    put_raw(&b, "DATA", 4);
    put_u32(&b, 3);
    put_raw(&b, "\0\xff\n", 3);
    put_pair(&b, "CONTENT_LENGTH", "1");
    CHECK(parse(&b, &info) == FRAME_OK);
    CHECK(info.app_len == 0 && info.app != NULL);
    CHECK(value_is(info.method, info.method_len, "HEAD"));
}

static void test_keys(void)
{
    frame_info info;
    char key[FRAME_MAX_KEY_SIZE + 2];
    memset(key, 'K', sizeof key - 1);
    key[sizeof key - 1] = '\0';

    bytes b = valid_vars("0");
    key[FRAME_MAX_KEY_SIZE] = '\0';  /* 1024 bytes: the longest key */
    put_pair(&b, key, "v");
    CHECK(parse(&b, &info) == FRAME_OK);

    b = valid_vars("0");
    key[FRAME_MAX_KEY_SIZE] = 'K';  /* 1025 bytes */
    put_pair(&b, key, "v");
    CHECK(parse(&b, &info) == FRAME_KEY_TOO_LONG && info.pair == 6 && info.key_len == 1025);
    CHECK_STR(describe(FRAME_KEY_TOO_LONG, &info), "the key of pair 6 is 1025 bytes, over 1024");

    b = (bytes){.len = 0};
    put_u32(&b, 0xffffffffu);  /* too long is judged before it is found to run past vars */
    CHECK(parse(&b, &info) == FRAME_KEY_TOO_LONG && info.key_len == 0xffffffffu);

    b = (bytes){.len = 0};
    put_pair(&b, "AGENT_APP", "a");
    put_u32(&b, 0);
    put_u32(&b, 0);
    CHECK(parse(&b, &info) == FRAME_EMPTY_KEY && info.pair == 2);
    CHECK_STR(describe(FRAME_EMPTY_KEY, &info), "pair 2 has an empty key");

    static const char *bad_keys[] = {"agent_app", "X-TOKEN", "A B", "\xc3\x89", "A\x01"};
    for (size_t i = 0; i < sizeof bad_keys / sizeof bad_keys[0]; i++) {
        b = (bytes){.len = 0};
        put_pair(&b, bad_keys[i], "v");
        CHECK(parse(&b, &info) == FRAME_BAD_KEY_BYTE && info.pair == 1);
    }
    CHECK_STR(describe(FRAME_BAD_KEY_BYTE, &info), "the key of pair 1 has a byte outside [A-Z0-9_]");
    b = (bytes){.len = 0};
    put_u32(&b, 3);
    put_raw(&b, "A\0B", 3);  /* a NUL in a key is a bad byte, not an end */
    put_u32(&b, 0);
    CHECK(parse(&b, &info) == FRAME_BAD_KEY_BYTE);
}

static void test_overruns(void)
{
    frame_info info;
    const bytes whole = valid_vars("12");
    /* Every proper prefix ends inside a pair or lacks CONTENT_LENGTH. */
    for (uint32_t n = 0; n < whole.len; n++) {
        bytes b = whole;
        b.len = n;
        frame_status st = parse(&b, &info);
        CHECK(st == FRAME_PAIR_OVERRUN || st == FRAME_MISSING_KEY);
        if (st == FRAME_PAIR_OVERRUN)
            CHECK(info.pair >= 1 && info.pair <= 5);
    }
    static const struct {
        uint32_t extra;             /* bytes after a valid frame's pairs */
        const char *data;
    } tails[] = {
        {1, "\0"},                  /* under 4 bytes: no room for a key length */
        {3, "\0\0\0"},
        {6, "\0\0\0\x05" "AB"},     /* the key runs past the end */
        {6, "\0\0\0\x01" "AB"},     /* no room for the value's length */
        {10, "\0\0\0\x01" "A\0\0\0\x02" "B"},  /* the value runs past the end */
        {9, "\0\0\0\x01" "A\xff\xff\xff\xff"},  /* a value length near 2^32 */
    };
    for (size_t i = 0; i < sizeof tails / sizeof tails[0]; i++) {
        bytes b = whole;
        put_raw(&b, tails[i].data, tails[i].extra);
        CHECK(parse(&b, &info) == FRAME_PAIR_OVERRUN && info.pair == 6);
    }
    CHECK_STR(describe(FRAME_PAIR_OVERRUN, &info), "pair 6 runs past the end of vars");
}

static void test_required_keys(void)
{
    static const char *keys[] = {"AGENT_APP", "REQUEST_METHOD", "REQUEST_URI", "CONTENT_LENGTH"};
    frame_info info;
    for (size_t skip = 0; skip < 4; skip++) {
        bytes b = {.len = 0};
        for (size_t i = 0; i < 4; i++)
            if (i != skip)
                put_pair(&b, keys[i], i == 3 ? "0" : "x");
        CHECK(parse(&b, &info) == FRAME_MISSING_KEY);
        char want[64];
        snprintf(want, sizeof want, "%s is missing", keys[skip]);
        CHECK_STR(describe(FRAME_MISSING_KEY, &info), want);
    }
    bytes empty = {.len = 0};
    CHECK(parse(&empty, &info) == FRAME_MISSING_KEY && info.pair == 0);
    CHECK_STR(describe(FRAME_MISSING_KEY, &info), "AGENT_APP is missing");
}

static void test_duplicates(void)
{
    frame_info info;
    bytes b = valid_vars("0");
    put_pair(&b, "AGENT_APP", "/srv/other");
    CHECK(parse(&b, &info) == FRAME_DUPLICATE_KEY && info.pair == 6);
    CHECK_STR(describe(FRAME_DUPLICATE_KEY, &info), "AGENT_APP appears twice");
    b = valid_vars("0");
    put_pair(&b, "CONTENT_LENGTH", "0");
    CHECK(parse(&b, &info) == FRAME_DUPLICATE_KEY);
    CHECK_STR(describe(FRAME_DUPLICATE_KEY, &info), "CONTENT_LENGTH appears twice");
}

static void test_content_length(void)
{
    static const char *bad[] = {"", "-1", "+1", " 1", "1 ", "0x10", "1.5", "10000000000000000000"};
    frame_info info;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        bytes b = valid_vars(bad[i]);
        CHECK(parse(&b, &info) == FRAME_BAD_CONTENT_LENGTH);
    }
    CHECK_STR(describe(FRAME_BAD_CONTENT_LENGTH, &info), "CONTENT_LENGTH is not a decimal number");
}

static void test_describe_bounds(void)
{
    frame_info info = {.pair = 123456, .key_len = 0xffffffffu, .vars_size = 0xffffffffu, .key = "AGENT_APP"};
    char small[8];
    memset(small, 'x', sizeof small);
    frame_describe(FRAME_KEY_TOO_LONG, &info, small, sizeof small);
    CHECK(small[7] == '\0' && strlen(small) == 7);
    char one[1] = {'x'};
    frame_describe(FRAME_SIZE_OVER_CAP, &info, one, sizeof one);
    CHECK(one[0] == '\0');
    CHECK_STR(describe(FRAME_OK, &info), "no error");
}

/* ------------------------------------------------------------------------ */
/* The records                                                              */

typedef struct {
    char buf[256];
    uint32_t pos, len;
    record_decoder d;
    char payload[1024];         /* every payload byte taken so far */
    uint32_t payload_len;
} reader;

/* Copies n bytes in as a read would, and takes the payload out as a send
 * of all of it would. */
static void feed(reader *r, const char *data, uint32_t n, bool send)
{
    memcpy(r->buf + r->len, data, n);
    records_take(&r->d, r->buf, &r->pos, &r->len, n);
    CHECK(r->pos <= r->len);
    if (send) {
        memcpy(r->payload + r->payload_len, r->buf + r->pos, r->len - r->pos);
        r->payload_len += r->len - r->pos;
        r->pos = r->len = 0;
    }
}

static bytes records_of(const char *const *parts, size_t count, bool end)
{
    bytes b = {.len = 0};
    for (size_t i = 0; i < count; i++) {
        put_u32(&b, (uint32_t)strlen(parts[i]));
        put_raw(&b, parts[i], (uint32_t)strlen(parts[i]));
    }
    if (end)
        put_u32(&b, 0);
    return b;
}

static const char *const response_parts[] = {"HTTP/1.1 200 OK\r\n", "Content-Type: text/plain\r\n\r\n", "h", "ello"};
static const char response_text[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello";

static void test_records_one_read(void)
{
    bytes b = records_of(response_parts, 4, true);
    reader r = {.len = 0};
    feed(&r, b.data, b.len, false);
    CHECK(r.d.end && !r.d.extra);
    CHECK(r.pos == 4);  /* the first header is skipped, not moved over */
    CHECK(r.len - r.pos == strlen(response_text));
    CHECK(memcmp(r.buf + r.pos, response_text, strlen(response_text)) == 0);
}

static void test_records_any_split(void)
{
    bytes b = records_of(response_parts, 4, true);
    /* Every cut of the stream into two reads, with and without the first
     * read's payload still waiting to be sent when the second comes. */
    for (uint32_t cut = 0; cut <= b.len; cut++) {
        for (int send_first = 0; send_first < 2; send_first++) {
            reader r = {.len = 0};
            feed(&r, b.data, cut, send_first);
            feed(&r, b.data + cut, b.len - cut, true);
            CHECK(r.d.end && !r.d.extra);
            CHECK(r.payload_len == strlen(response_text));
            CHECK(memcmp(r.payload, response_text, r.payload_len) == 0);
        }
    }
    reader r = {.len = 0};  /* a byte at a time */
    for (uint32_t i = 0; i < b.len; i++)
        feed(&r, b.data + i, 1, i % 3 == 0);
    feed(&r, "", 0, true);
    CHECK(r.d.end && r.payload_len == strlen(response_text));
    CHECK(memcmp(r.payload, response_text, r.payload_len) == 0);
}

static void test_records_end_and_after(void)
{
    reader r = {.len = 0};
    feed(&r, "\0\0\0\0", 4, false);  /* an empty response */
    CHECK(r.d.end && !r.d.extra && r.pos == 0 && r.len == 0);

    bytes b = records_of(response_parts, 1, true);
    put_raw(&b, "\0\0\0\x01X", 5);  /* bytes after the end record */
    r = (reader){.len = 0};
    feed(&r, b.data, b.len, true);
    CHECK(r.d.end && r.d.extra);
    CHECK(r.payload_len == strlen(response_parts[0]));

    r = (reader){.len = 0};  /* after the end, more bytes are not taken */
    feed(&r, "\0\0\0\x02" "ab\0\0\0\0", 10, true);
    feed(&r, "cd", 2, true);
    CHECK(r.d.end && r.d.extra && r.payload_len == 2);
}

static void test_records_long_record(void)
{
    reader r = {.len = 0};
    /* Any length is valid: a record of 2^32-1 bytes whose first ones came. */
    feed(&r, "\xff\xff\xff\xff" "HTTP/1.1 ", 13, false);
    CHECK(!r.d.end && r.d.left == 0xffffffffu - 9);
    CHECK(r.pos == 4 && r.len == 13);
    /* A header split 3 + 1 after a payload that is still waiting. */
    r = (reader){.len = 0};
    feed(&r, "\0\0\0\x02" "ab\0\0\0", 9, false);
    CHECK(r.d.have == 3 && r.pos == 4 && r.len == 6);
    feed(&r, "\x01" "c\0\0\0\0", 6, false);
    CHECK(r.d.end && r.len - r.pos == 3 && memcmp(r.buf + r.pos, "abc", 3) == 0);
}

static void test_status_line(void)
{
    CHECK(records_check_status_line("HTTP/1.1 200 OK\r\n", 17, false) == STATUS_LINE_OK);
    CHECK(records_check_status_line("HTTP/1.1 ", 9, true) == STATUS_LINE_OK);
    CHECK(records_check_status_line("HTTP/1.", 7, false) == STATUS_LINE_PENDING);
    CHECK(records_check_status_line("HTTP/1.", 7, true) == STATUS_LINE_BAD);
    CHECK(records_check_status_line("", 0, false) == STATUS_LINE_PENDING);
    CHECK(records_check_status_line("", 0, true) == STATUS_LINE_BAD);
    CHECK(records_check_status_line("HTTP/1.0 200 OK", 15, false) == STATUS_LINE_BAD);
    CHECK(records_check_status_line("http/1.1 200 OK", 15, false) == STATUS_LINE_BAD);
    CHECK(records_check_status_line("X", 1, false) == STATUS_LINE_BAD);
}

/* ------------------------------------------------------------------------ */
/* Generic workers: the frame as an HTTP/1.1 head (http_head.c)             */

static const char *head_of(const bytes *vars, http_head_status *st)
{
    static char out[8192];
    size_t need = 0, len = 0;
    *st = http_head_build(vars->data, vars->len, NULL, 0, &need);
    if (*st != HTTP_HEAD_OK)
        return "";
    CHECK(need < sizeof out);
    CHECK(http_head_build(vars->data, vars->len, out, need, &len) == HTTP_HEAD_OK);
    CHECK(len == need);
    /* One byte short is refused, never overrun (ASan watches). */
    CHECK(http_head_build(vars->data, vars->len, out, need - 1, &len) == HTTP_HEAD_TOO_LARGE);
    CHECK(http_head_build(vars->data, vars->len, out, need, &len) == HTTP_HEAD_OK);
    out[len] = '\0';
    return out;
}

static void test_http_head(void)
{
    http_head_status st;
    bytes b = {.len = 0};
    put_pair(&b, "AGENT_APP", "/srv/shop");
    put_pair(&b, "REQUEST_METHOD", "POST");
    put_pair(&b, "REQUEST_URI", "/cart?id=1");
    put_pair(&b, "SERVER_NAME", "shop.example");
    put_pair(&b, "REMOTE_ADDR", "10.1.2.3");
    put_pair(&b, "HTTPS", "on");
    put_pair(&b, "CONTENT_TYPE", "text/plain");
    put_pair(&b, "HTTP_HOST", "shop.example:8080");
    put_pair(&b, "HTTP_X_TOKEN", "abc");
    put_pair(&b, "HTTP_ACCEPT_LANGUAGE", "en");
    put_pair(&b, "HTTP_CONNECTION", "keep-alive");
    put_pair(&b, "HTTP_UPGRADE", "websocket");
    put_pair(&b, "HTTP_EXPECT", "100-continue");
    put_pair(&b, "HTTP_PROXY", "http://evil");
    put_pair(&b, "HTTP_X_FORWARDED_FOR", "6.6.6.6");
    put_pair(&b, "HTTP_X_SPLIT", "a\r\nInjected: yes");
    put_pair(&b, "CONTENT_LENGTH", "5");
    CHECK_STR(head_of(&b, &st),
              "POST /cart?id=1 HTTP/1.1\r\n"
              "Host: shop.example:8080\r\n"
              "X-Token: abc\r\n"
              "Accept-Language: en\r\n"
              "Content-Type: text/plain\r\n"
              "Content-Length: 5\r\n"
              "Connection: close\r\n"
              "X-Forwarded-For: 10.1.2.3\r\n"
              "X-Forwarded-Proto: https\r\n"
              "\r\n");
    CHECK(st == HTTP_HEAD_OK);
}

static void test_http_head_defaults_and_bad_input(void)
{
    http_head_status st;
    bytes b = {.len = 0};
    put_pair(&b, "REQUEST_METHOD", "GET");
    put_pair(&b, "REQUEST_URI", "/a b\x01\x7f");
    put_pair(&b, "SERVER_NAME", "srv");
    put_pair(&b, "CONTENT_LENGTH", "0");
    CHECK_STR(head_of(&b, &st),
              "GET /a%20b%01%7F HTTP/1.1\r\nHost: srv\r\nContent-Length: 0\r\nConnection: close\r\n"
              "X-Forwarded-Proto: http\r\n\r\n");

    bytes none = {.len = 0};
    put_pair(&none, "REQUEST_METHOD", "GET");
    CHECK_STR(head_of(&none, &st),
              "GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n"
              "X-Forwarded-Proto: http\r\n\r\n");

    bytes bad = {.len = 0};
    put_pair(&bad, "REQUEST_METHOD", "GET /x HTTP/1.1\r\n");
    head_of(&bad, &st);
    CHECK(st == HTTP_HEAD_BAD_METHOD);
    bytes empty = {.len = 0};
    head_of(&empty, &st);
    CHECK(st == HTTP_HEAD_BAD_METHOD);

    /* Pairs that run past the end stop the walk; nothing is read beyond. */
    bytes cut = {.len = 0};
    put_pair(&cut, "REQUEST_METHOD", "GET");
    put_u32(&cut, 200);
    put_raw(&cut, "HTTP_X", 6);
    CHECK(head_of(&cut, &st)[0] == 'G' && st == HTTP_HEAD_OK);
}

/* A switch of protocols: Upgrade and Connection: Upgrade, no length and
 * no close; without AGENT_UPGRADE (or with a value that could split a
 * line) the Upgrade header stays dropped, as any hop-by-hop one. */
static void test_http_head_upgrade(void)
{
    http_head_status st;
    bytes b = {.len = 0};
    put_pair(&b, "REQUEST_METHOD", "GET");
    put_pair(&b, "REQUEST_URI", "/ws");
    put_pair(&b, "HTTP_HOST", "h");
    put_pair(&b, "HTTP_UPGRADE", "websocket");
    put_pair(&b, "HTTP_CONNECTION", "Upgrade");
    put_pair(&b, "HTTP_SEC_WEBSOCKET_KEY", "dGhlIHNhbXBsZSBub25jZQ==");
    put_pair(&b, "CONTENT_LENGTH", "0");
    bytes tunnel = b;
    put_pair(&tunnel, "AGENT_UPGRADE", "1");
    CHECK_STR(head_of(&tunnel, &st),
              "GET /ws HTTP/1.1\r\nHost: h\r\nSec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Upgrade: websocket\r\nConnection: Upgrade\r\nX-Forwarded-Proto: http\r\n\r\n");
    CHECK_STR(head_of(&b, &st),
              "GET /ws HTTP/1.1\r\nHost: h\r\nSec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Content-Length: 0\r\nConnection: close\r\nX-Forwarded-Proto: http\r\n\r\n");

    bytes split = {.len = 0};
    put_pair(&split, "REQUEST_METHOD", "GET");
    put_pair(&split, "HTTP_UPGRADE", "websocket\r\nInjected: yes");
    put_pair(&split, "AGENT_UPGRADE", "1");
    CHECK_STR(head_of(&split, &st),
              "GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n"
              "X-Forwarded-Proto: http\r\n\r\n");
}

static void test_http_status_line(void)
{
    CHECK(http_check_status_line("HTTP/1.1 200 OK", 15, false) == STATUS_LINE_OK);
    CHECK(http_check_status_line("HTTP/1.0 404", 12, false) == STATUS_LINE_OK);
    CHECK(http_check_status_line("HTTP/", 5, false) == STATUS_LINE_PENDING);
    CHECK(http_check_status_line("HTTP/", 5, true) == STATUS_LINE_BAD);
    CHECK(http_check_status_line("\x00\x01 not", 6, false) == STATUS_LINE_BAD);
    CHECK(http_check_status_line("HTTP/2 200", 10, false) == STATUS_LINE_BAD);
}

int main(void)
{
    test_head();
    test_valid_frame();
    test_long_response();
    test_upgrade();
    test_values();
    test_keys();
    test_overruns();
    test_required_keys();
    test_duplicates();
    test_content_length();
    test_describe_bounds();
    test_records_one_read();
    test_records_any_split();
    test_records_end_and_after();
    test_records_long_record();
    test_status_line();
    test_http_head();
    test_http_head_defaults_and_bad_input();
    test_http_head_upgrade();
    test_http_status_line();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("all parser checks passed\n");
    return 0;
}
