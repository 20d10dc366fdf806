/*
 * The response records' parser (docs/protocol.md §2); see wire.h. Pure:
 * no I/O, no allocation, no engine state.
 *
 * Any record length is valid: the protocol allows 1..2^32-1, and a worker
 * may send a large file as one record. So a stream is judged by what it
 * carries instead (records_check_status_line), and by what follows the end
 * record: nothing may, since the worker has no request to answer. Bytes
 * that are not records (a worker speaking another protocol: "HTTP" read as
 * a length) fail the status line check at once; anything subtler ends in an
 * end of file before the end record.
 */
#include <string.h>

#include "wire.h"

/* A header with no payload waiting before it is skipped by moving *pos
 * past it, which is the whole of the work for a response that comes in one
 * read; payload after a later header moves left over it. */
void records_take(record_decoder *d, char *buf, uint32_t *pos, uint32_t *len, uint32_t n)
{
    char *in = buf + *len;
    char *end = in + n;
    char *out = in;
    while (in < end && !d->end) {
        if (d->left > 0) {
            uint32_t k = (uint32_t)(end - in) < d->left ? (uint32_t)(end - in) : d->left;
            if (out != in)
                memmove(out, in, k);
            out += k;
            in += k;
            d->left -= k;
            continue;
        }
        while (d->have < WIRE_U32_SIZE && in < end)
            d->header[d->have++] = (unsigned char)*in++;
        if (d->have < WIRE_U32_SIZE)
            break;  /* the rest of the header comes with the next read */
        d->have = 0;
        d->left = wire_be32(d->header);
        d->end = d->left == 0;
        if (out == buf + *pos) {
            out = in;
            *pos = (uint32_t)(in - buf);
        }
    }
    d->extra = in < end;
    *len = (uint32_t)(out - buf);
    if (*pos == *len)
        *pos = *len = 0;
}

/* The payload must be an HTTP/1.1 response: the engine sends nothing to
 * nginx until its first bytes say so, so that garbage from a worker gets
 * the engine's 502 rather than reaching the client. */
status_line_check records_check_status_line(const char *payload, uint32_t have, bool end)
{
    static const char prefix[] = "HTTP/1.1 ";
    const uint32_t prefix_len = sizeof prefix - 1;
    uint32_t k = have < prefix_len ? have : prefix_len;
    if (memcmp(payload, prefix, k) != 0)
        return STATUS_LINE_BAD;
    if (k == prefix_len)
        return STATUS_LINE_OK;
    return end ? STATUS_LINE_BAD : STATUS_LINE_PENDING;  /* shorter than a status line */
}
