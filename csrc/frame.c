/*
 * The request frame's parser (docs/protocol.md §1); see wire.h. Pure: no
 * I/O, no allocation, no engine state.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "wire.h"

/* 19 digits always fit in 64 bits. */
#define MAX_DECIMAL_DIGITS 19u

enum { SEEN_APP = 1, SEEN_METHOD = 2, SEEN_URI = 4, SEEN_LENGTH = 8, SEEN_LONG = 16, SEEN_UPGRADE = 32 };
#define REQUIRED_KEYS (SEEN_APP | SEEN_METHOD | SEEN_URI | SEEN_LENGTH)

/* With their lengths: every pair of every frame is looked up here, and
 * most keys (HTTP_*) differ from all of these in length already. */
#define KNOWN_KEY(flag, name) {flag, name, sizeof name - 1}
static const struct {
    unsigned flag;
    const char *name;
    uint32_t len;
} known_keys[] = {
    KNOWN_KEY(SEEN_APP, "AGENT_APP"),
    KNOWN_KEY(SEEN_METHOD, "REQUEST_METHOD"),
    KNOWN_KEY(SEEN_URI, "REQUEST_URI"),
    KNOWN_KEY(SEEN_LENGTH, "CONTENT_LENGTH"),
    KNOWN_KEY(SEEN_LONG, "AGENT_LONG_RESPONSE"),
    KNOWN_KEY(SEEN_UPGRADE, "AGENT_UPGRADE"),
};

#define KNOWN_KEYS (sizeof known_keys / sizeof known_keys[0])

frame_status frame_check_head(const void *head, uint32_t max_vars_size, frame_info *info)
{
    info->vars_size = wire_be32(head);
    if (info->vars_size == 0)
        return FRAME_SIZE_ZERO;
    return info->vars_size > max_vars_size ? FRAME_SIZE_OVER_CAP : FRAME_OK;
}

static bool is_key_char(unsigned char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_';
}

static bool parse_decimal(const char *s, uint32_t len, uint64_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > MAX_DECIMAL_DIGITS)
        return false;
    for (uint32_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

/* The flag of a key the engine looks at, or 0. */
static unsigned known_key(const char *key, uint32_t len, const char **name)
{
    for (size_t i = 0; i < KNOWN_KEYS; i++) {
        if (known_keys[i].len == len && memcmp(key, known_keys[i].name, len) == 0) {
            *name = known_keys[i].name;
            return known_keys[i].flag;
        }
    }
    return 0;
}

/* Reads a u32 length at vars[*pos] and the bytes it counts; false when
 * either runs past size. */
static bool take_field(const char *vars, uint32_t size, uint32_t *pos, const char **field, uint32_t *len)
{
    if (size - *pos < WIRE_U32_SIZE)
        return false;
    *len = wire_be32(vars + *pos);
    *pos += WIRE_U32_SIZE;
    if (*len > size - *pos)
        return false;
    *field = vars + *pos;
    *pos += *len;
    return true;
}

static frame_status check_key(const char *vars, uint32_t size, uint32_t pos, frame_info *info)
{
    uint32_t klen = wire_be32(vars + pos);
    if (klen == 0)
        return FRAME_EMPTY_KEY;
    if (klen > FRAME_MAX_KEY_SIZE) {
        info->key_len = klen;
        return FRAME_KEY_TOO_LONG;
    }
    if (klen > size - pos - WIRE_U32_SIZE)
        return FRAME_PAIR_OVERRUN;
    for (uint32_t i = 0; i < klen; i++)
        if (!is_key_char((unsigned char)vars[pos + WIRE_U32_SIZE + i]))
            return FRAME_BAD_KEY_BYTE;
    return FRAME_OK;
}

/* The pairs seen so far. */
typedef struct {
    unsigned seen;              /* SEEN_* */
    const char *length;         /* CONTENT_LENGTH's value */
    uint32_t length_len;
} pairs_seen;

/* Keeps the value of a key the engine looks at. Two AGENT_APPs or
 * CONTENT_LENGTHs could make the engine and the worker disagree on the app
 * or on where the body ends. */
static frame_status note_pair(unsigned flag, const char *name, const char *value, uint32_t vlen,
                              pairs_seen *seen, frame_info *info)
{
    if ((flag == SEEN_APP || flag == SEEN_LENGTH) && (seen->seen & flag)) {
        info->key = name;
        return FRAME_DUPLICATE_KEY;
    }
    seen->seen |= flag;
    if (flag == SEEN_APP) {
        info->app = value;
        info->app_len = vlen;
    } else if (flag == SEEN_METHOD) {
        info->method = value;
        info->method_len = vlen;
    } else if (flag == SEEN_URI) {
        info->uri = value;
        info->uri_len = vlen;
    } else if (flag == SEEN_LENGTH) {
        seen->length = value;
        seen->length_len = vlen;
    } else if (flag == SEEN_LONG) {
        info->long_response = vlen == 1 && value[0] == '1';
    } else if (flag == SEEN_UPGRADE) {
        info->upgrade = vlen == 1 && value[0] == '1';
    }
    return FRAME_OK;
}

static frame_status check_required(unsigned seen, frame_info *info)
{
    for (size_t i = 0; i < KNOWN_KEYS; i++) {
        if ((known_keys[i].flag & REQUIRED_KEYS) && !(seen & known_keys[i].flag)) {
            info->key = known_keys[i].name;
            return FRAME_MISSING_KEY;
        }
    }
    return FRAME_OK;
}

frame_status frame_parse_vars(const char *vars, uint32_t size, frame_info *info)
{
    uint32_t pos = 0;
    pairs_seen seen = {0};
    info->pair = 0;
    while (pos < size) {
        info->pair++;
        if (size - pos < WIRE_U32_SIZE)
            return FRAME_PAIR_OVERRUN;
        frame_status st = check_key(vars, size, pos, info);
        if (st != FRAME_OK)
            return st;
        const char *key, *value, *name = NULL;
        uint32_t klen, vlen;
        take_field(vars, size, &pos, &key, &klen);  /* check_key made sure it fits */
        if (!take_field(vars, size, &pos, &value, &vlen))
            return FRAME_PAIR_OVERRUN;
        unsigned flag = known_key(key, klen, &name);
        st = note_pair(flag, name, value, vlen, &seen, info);
        if (st != FRAME_OK)
            return st;
    }
    frame_status st = check_required(seen.seen, info);
    if (st != FRAME_OK)
        return st;
    return parse_decimal(seen.length, seen.length_len, &info->content_length) ? FRAME_OK : FRAME_BAD_CONTENT_LENGTH;
}

void frame_describe(frame_status status, const frame_info *info, char *why, size_t size)
{
    switch (status) {
    case FRAME_OK:
        snprintf(why, size, "no error");
        break;
    case FRAME_SIZE_ZERO:
    case FRAME_SIZE_OVER_CAP:
        snprintf(why, size, "vars-size %" PRIu32 " is %s", info->vars_size,
                 status == FRAME_SIZE_ZERO ? "zero" : "over the cap");
        break;
    case FRAME_EMPTY_KEY:
        snprintf(why, size, "pair %u has an empty key", info->pair);
        break;
    case FRAME_KEY_TOO_LONG:
        snprintf(why, size, "the key of pair %u is %" PRIu32 " bytes, over %u", info->pair, info->key_len,
                 FRAME_MAX_KEY_SIZE);
        break;
    case FRAME_BAD_KEY_BYTE:
        snprintf(why, size, "the key of pair %u has a byte outside [A-Z0-9_]", info->pair);
        break;
    case FRAME_PAIR_OVERRUN:
        snprintf(why, size, "pair %u runs past the end of vars", info->pair);
        break;
    case FRAME_DUPLICATE_KEY:
        snprintf(why, size, "%s appears twice", info->key);
        break;
    case FRAME_MISSING_KEY:
        snprintf(why, size, "%s is missing", info->key);
        break;
    case FRAME_BAD_CONTENT_LENGTH:
        snprintf(why, size, "CONTENT_LENGTH is not a decimal number");
        break;
    }
}
