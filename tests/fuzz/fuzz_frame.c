/*
 * libFuzzer harness for the request frame's parser (csrc/frame.c,
 * docs/protocol.md §1). `make fuzz` builds and runs it.
 *
 * The input is a frame as nginx sends it: vars-size, vars, body. Its vars
 * are the vars-size bytes after the size when that many came; otherwise
 * all the bytes after it, so that any input reaches the pair parser. They
 * are copied to a buffer of exactly their size, so that ASan sees a read
 * past the end. Beyond not crashing, the harness checks what
 * the engine relies on: a size is accepted exactly when it is 1..cap; an
 * accepted vars has every value inside the input, right after its own key
 * and length, its pairs fill it exactly, and CONTENT_LENGTH is the value's
 * number; a refusal names a pair that exists and describes itself in any
 * buffer without overflowing it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "wire.h"

#define CAP (1u << 20)

/* Judges the size as the engine does, and returns how many bytes after it
 * are vars. */
static uint32_t check_head(const uint8_t *data, uint32_t size)
{
    uint32_t want = (uint32_t)data[0] << 24 | (uint32_t)data[1] << 16 | (uint32_t)data[2] << 8 | data[3];
    frame_info info;
    frame_status st = frame_check_head(data, CAP, &info);
    REQUIRE(info.vars_size == want);
    REQUIRE((st == FRAME_OK) == (want >= 1 && want <= CAP));
    REQUIRE(st == FRAME_OK || st == FRAME_SIZE_ZERO || st == FRAME_SIZE_OVER_CAP);
    REQUIRE((st == FRAME_SIZE_ZERO) == (want == 0));
    uint32_t rest = size - WIRE_U32_SIZE;
    return st == FRAME_OK && want <= rest ? want : rest;
}

/* The value at p was sent right after its key, as key-size key value-size. */
static void check_value(const char *vars, uint32_t size, const char *p, uint32_t len, const char *key)
{
    uint32_t klen = (uint32_t)strlen(key);
    REQUIRE(p != NULL);
    REQUIRE(p >= vars + 2 * WIRE_U32_SIZE + klen);
    REQUIRE(len <= size && p <= vars + size - len);
    REQUIRE(wire_be32(p - WIRE_U32_SIZE) == len);
    REQUIRE(memcmp(p - WIRE_U32_SIZE - klen, key, klen) == 0);
    REQUIRE(wire_be32(p - 2 * WIRE_U32_SIZE - klen) == klen);
}

/* Walks the pairs of an accepted vars: they must fill it exactly, and
 * CONTENT_LENGTH must be the number its value spells. */
static void check_accepted(const char *vars, uint32_t size, const frame_info *info)
{
    check_value(vars, size, info->app, info->app_len, "AGENT_APP");
    check_value(vars, size, info->method, info->method_len, "REQUEST_METHOD");
    check_value(vars, size, info->uri, info->uri_len, "REQUEST_URI");
    uint32_t pos = 0, lengths = 0;
    while (pos < size) {
        REQUIRE(size - pos >= 2 * WIRE_U32_SIZE);
        uint32_t klen = wire_be32(vars + pos);
        REQUIRE(klen >= 1 && klen <= FRAME_MAX_KEY_SIZE && klen <= size - pos - 2 * WIRE_U32_SIZE);
        const char *key = vars + pos + WIRE_U32_SIZE;
        uint32_t vlen = wire_be32(key + klen);
        const char *value = key + klen + WIRE_U32_SIZE;
        REQUIRE(vlen <= size - pos - 2 * WIRE_U32_SIZE - klen);
        if (klen == 14 && memcmp(key, "CONTENT_LENGTH", 14) == 0) {
            char digits[24];
            REQUIRE(vlen >= 1 && vlen < sizeof digits);
            memcpy(digits, value, vlen);
            digits[vlen] = '\0';
            REQUIRE(strspn(digits, "0123456789") == vlen);
            REQUIRE(strtoull(digits, NULL, 10) == info->content_length);
            lengths++;
        }
        pos += 2 * WIRE_U32_SIZE + klen + vlen;
    }
    REQUIRE(pos == size && lengths == 1);
}

static void check_refused(frame_status st, const frame_info *info, uint32_t size, uint8_t why_size)
{
    REQUIRE(st >= FRAME_EMPTY_KEY && st <= FRAME_BAD_CONTENT_LENGTH);
    /* Every pair takes at least 4 bytes, so a failing one lies within vars. */
    if (st != FRAME_MISSING_KEY && st != FRAME_BAD_CONTENT_LENGTH)
        REQUIRE(info->pair >= 1 && info->pair <= size / WIRE_U32_SIZE + 1);
    if (st == FRAME_DUPLICATE_KEY || st == FRAME_MISSING_KEY)
        REQUIRE(info->key != NULL);
    char why[256 + 1];
    memset(why, 'x', sizeof why);
    frame_describe(st, info, why, why_size);
    REQUIRE(why[why_size] == 'x');  /* nothing written past the given size */
    if (why_size > 0)
        REQUIRE(memchr(why, '\0', why_size) != NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < WIRE_U32_SIZE || size > UINT32_MAX)
        return 0;
    uint32_t vars_len = check_head(data, (uint32_t)size);
    char *vars = malloc(vars_len ? vars_len : 1);
    REQUIRE(vars != NULL);
    memcpy(vars, data + WIRE_U32_SIZE, vars_len);
    frame_info info = {0};
    frame_status st = frame_parse_vars(vars, vars_len, &info);
    if (st == FRAME_OK)
        check_accepted(vars, vars_len, &info);
    else
        check_refused(st, &info, vars_len, data[size - 1]);
    free(vars);
    return 0;
}
