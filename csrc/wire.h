/*
 * The bytes on the wire, docs/protocol.md §1 (the request frame, frame.c)
 * and §2 (the response records, records.c).
 *
 * Both parsers are pure: bytes and lengths in, a result out; no I/O, no
 * allocation, no engine state. So tests/native drives them with hand-made
 * inputs and tests/fuzz with any input at all, without a socket.
 */
#ifndef AGENT_WIRE_H
#define AGENT_WIRE_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* For the engine's files and the tests that link these sources, not
 * exported from the extension module. */
#pragma GCC visibility push(hidden)

/* Every integer on the wire is an unsigned 32-bit big-endian one. */
#define WIRE_U32_SIZE 4u

static inline uint32_t wire_be32(const void *p)
{
    const unsigned char *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

/* ------------------------------------------------------------------------ */
/* §1 The request frame: vars-size:u32, then vars = *(key-size:u32 key      */
/* value-size:u32 value), then the body                                     */

#define FRAME_MAX_KEY_SIZE 1024u

typedef enum {
    FRAME_OK = 0,
    FRAME_SIZE_ZERO,            /* vars-size is 0 */
    FRAME_SIZE_OVER_CAP,        /* vars-size is over the engine's cap */
    FRAME_EMPTY_KEY,
    FRAME_KEY_TOO_LONG,         /* over FRAME_MAX_KEY_SIZE */
    FRAME_BAD_KEY_BYTE,         /* outside [A-Z0-9_] */
    FRAME_PAIR_OVERRUN,         /* a pair runs past the end of vars */
    FRAME_DUPLICATE_KEY,        /* a second AGENT_APP or CONTENT_LENGTH */
    FRAME_MISSING_KEY,          /* a required key is absent */
    FRAME_BAD_CONTENT_LENGTH,   /* CONTENT_LENGTH is not a decimal number */
} frame_status;

/* What a frame says that the engine needs, and where it went wrong. */
typedef struct {
    /* FRAME_OK: the values point into vars. */
    const char *app, *method, *uri;
    uint32_t app_len, method_len, uri_len;
    uint64_t content_length;
    bool long_response;         /* AGENT_LONG_RESPONSE is 1 (docs/protocol.md) */
    bool upgrade;               /* AGENT_UPGRADE is 1: the client asks to switch protocols */
    /* For frame_describe(). */
    uint32_t vars_size;         /* set by frame_check_head() */
    unsigned pair;              /* 1-based number of the failing pair */
    uint32_t key_len;           /* FRAME_KEY_TOO_LONG: the key's length */
    const char *key;            /* FRAME_DUPLICATE_KEY, _MISSING_KEY: its name (a literal) */
} frame_info;

/* Judges the 4 size bytes at head: vars must be 1..max_vars_size bytes. */
frame_status frame_check_head(const void *head, uint32_t max_vars_size, frame_info *info);

/* Checks that the pairs fill vars exactly and the required keys are there,
 * and finds the values the engine uses. */
frame_status frame_parse_vars(const char *vars, uint32_t size, frame_info *info);

/* The reason for a status other than FRAME_OK, as the 400 reply quotes it;
 * always NUL-terminated when size > 0. */
void frame_describe(frame_status status, const frame_info *info, char *why, size_t size);

/* ------------------------------------------------------------------------ */
/* §2 The response: *(length:u32 bytes) then the end record 00 00 00 00     */

/* Where the decoding of one response stands between reads. */
typedef struct {
    uint8_t have;               /* bytes of the current record header read */
    unsigned char header[WIRE_U32_SIZE];
    uint32_t left;              /* payload bytes of the current record still to come */
    bool end;                   /* the end record came */
    bool extra;                 /* bytes came after the end record in the last call */
} record_decoder;

/* The n bytes just read at buf[*len] are stripped of their record headers
 * in place, so that buf[*pos, *len) holds payload only, the earlier payload
 * first. Stops at the end record: what follows it sets extra and is
 * dropped. *pos <= *len on entry; both may move (see records.c). */
void records_take(record_decoder *d, char *buf, uint32_t *pos, uint32_t *len, uint32_t n);

typedef enum {
    STATUS_LINE_PENDING,        /* too few bytes yet to tell */
    STATUS_LINE_OK,             /* starts "HTTP/1.1 " */
    STATUS_LINE_BAD,            /* cannot be an HTTP/1.1 response */
} status_line_check;

/* Judges the first have bytes of a response's payload; end: no more will come. */
status_line_check records_check_status_line(const char *payload, uint32_t have, bool end);

/* ------------------------------------------------------------------------ */
/* Generic workers (agent_app_type generic): the frame as an HTTP/1.1       */
/* request head, and the judgement of a raw HTTP response (http_head.c)     */

typedef enum {
    HTTP_HEAD_OK = 0,
    HTTP_HEAD_BAD_METHOD,       /* REQUEST_METHOD is empty or not a token */
    HTTP_HEAD_TOO_LARGE,        /* over the size given */
} http_head_status;

/* Writes the request head for the vars of a frame that frame_parse_vars()
 * accepted: "METHOD REQUEST_URI HTTP/1.1", each HTTP_* pair as a header
 * ("HTTP_X_TOKEN" -> "X-Token") but the hop-by-hop ones and those the
 * engine sets itself, Host (from SERVER_NAME when the client sent none),
 * Content-Type and Content-Length from the CGI variables, "Connection:
 * close", X-Forwarded-For (REMOTE_ADDR) and X-Forwarded-Proto (HTTPS), then
 * the blank line. Bytes of the URI that cannot stand in a request line
 * (controls, space, DEL) are percent-encoded; a header whose value holds
 * CR, LF or NUL is dropped. out NULL: only *len is computed (the size to
 * allocate). */
http_head_status http_head_build(const char *vars, uint32_t vars_size, char *out, size_t size, size_t *len);

/* Judges the first have bytes of a generic worker's response: it must
 * begin "HTTP/1." before a byte goes to nginx; end: no more will come. */
status_line_check http_check_status_line(const char *data, uint32_t have, bool end);

#pragma GCC visibility pop
#endif
