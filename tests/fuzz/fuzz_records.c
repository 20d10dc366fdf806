/*
 * libFuzzer harness for the response records' parser (csrc/records.c,
 * docs/protocol.md §2). `make fuzz` builds and runs it.
 *
 * Input: 2 bytes that drive how the stream is cut into reads and how much
 * of the payload is sent between reads, then the stream a worker sent. The
 * harness replays what the engine does with a buffer of its own (reads only
 * while there is room, stops at the end record) and checks the result
 * against a plain decoding of the whole stream: the same payload bytes in
 * the same order, the end record seen exactly when the stream has one,
 * bytes after it reported, and the payload window always inside the buffer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "wire.h"

#define BUFFER_SIZE 64u            /* small, so that records span many reads */

/* The plain decoding: the payload, whether the end record came, and where
 * the stream stands after it. */
typedef struct {
    char *payload;
    size_t payload_len;
    bool end;
    size_t end_offset;          /* bytes up to and including the end record */
} decoded;

static decoded decode_whole(const uint8_t *s, size_t n, char *payload)
{
    decoded d = {.payload = payload};
    size_t pos = 0;
    while (n - pos >= WIRE_U32_SIZE) {
        uint32_t len = wire_be32(s + pos);
        pos += WIRE_U32_SIZE;
        if (len == 0) {
            d.end = true;
            d.end_offset = pos;
            break;
        }
        size_t k = len < n - pos ? len : n - pos;
        memcpy(payload + d.payload_len, s + pos, k);
        d.payload_len += k;
        pos += k;
    }
    return d;
}

/* A tiny generator, so that one input always cuts the stream the same way. */
static uint32_t next(uint32_t *state)
{
    *state = *state * 1103515245u + 12345u;
    return *state >> 16;
}

typedef struct {
    char buf[BUFFER_SIZE];
    uint32_t pos, len;
    record_decoder d;
    char *sent;                 /* the payload "sent" so far */
    size_t sent_len;
} engine_side;

/* Sends some of the payload waiting in the buffer, as a send that the
 * socket partly takes would; all of it when the buffer is full. */
static void send_some(engine_side *e, uint32_t *rng, bool all)
{
    uint32_t waiting = e->len - e->pos;
    uint32_t k = all || waiting == 0 ? waiting : next(rng) % (waiting + 1);
    memcpy(e->sent + e->sent_len, e->buf + e->pos, k);
    e->sent_len += k;
    e->pos += k;
    if (e->pos == e->len)
        e->pos = e->len = 0;
}

/* One read of up to the free room, then the parser on what came. */
static size_t read_some(engine_side *e, const uint8_t *s, size_t left, uint32_t *rng)
{
    uint32_t room = BUFFER_SIZE - e->len;
    uint32_t n = 1 + next(rng) % room;
    if (n > left)
        n = (uint32_t)left;
    uint32_t before = e->len - e->pos;
    memcpy(e->buf + e->len, s, n);
    records_take(&e->d, e->buf, &e->pos, &e->len, n);
    REQUIRE(e->pos <= e->len && e->len <= BUFFER_SIZE);
    REQUIRE(e->len - e->pos >= before && e->len - e->pos <= before + n);
    REQUIRE(e->d.have < WIRE_U32_SIZE);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint32_t rng = (uint32_t)data[0] << 8 | data[1];
    const uint8_t *stream = data + 2;
    size_t n = size - 2;
    char *want = malloc(n + 1), *got = malloc(n + 1);
    REQUIRE(want && got);
    decoded ref = decode_whole(stream, n, want);

    engine_side e = {.sent = got};
    size_t fed = 0;
    bool extra = false;
    while (fed < n && !e.d.end) {
        if (e.len == BUFFER_SIZE)
            send_some(&e, &rng, true);  /* the engine reads no more until it has room */
        size_t k = read_some(&e, stream + fed, n - fed, &rng);
        fed += k;
        extra = e.d.extra;
        REQUIRE(!extra || e.d.end);
        if (e.d.end)
            REQUIRE(extra == (fed > ref.end_offset));
        send_some(&e, &rng, false);
    }
    send_some(&e, &rng, true);
    REQUIRE(e.d.end == ref.end);
    REQUIRE(e.sent_len == ref.payload_len && memcmp(got, want, ref.payload_len) == 0);

    /* The status line check agrees with the payload's first bytes. */
    uint32_t have = ref.payload_len < 64 ? (uint32_t)ref.payload_len : 64;
    status_line_check st = records_check_status_line(got, have, ref.end);
    bool starts = have >= 9 && memcmp(got, "HTTP/1.1 ", 9) == 0;
    bool could = memcmp(got, "HTTP/1.1 ", have < 9 ? have : 9) == 0;
    REQUIRE((st == STATUS_LINE_OK) == starts);
    REQUIRE((st == STATUS_LINE_PENDING) == (!starts && could && !ref.end));
    free(want);
    free(got);
    return 0;
}
