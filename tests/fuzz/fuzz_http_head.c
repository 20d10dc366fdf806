/*
 * libFuzzer harness for a generic worker's request head (csrc/http_head.c):
 * the vars of a frame the frame parser accepts become an HTTP/1.1 request
 * head. `make fuzz` builds and runs it.
 *
 * Input: the vars of a frame (docs/protocol.md §1). Whatever they hold, the
 * head measured is the head written, a buffer one byte short is refused
 * without a write past it, and the head is one request line and header
 * lines, each ended by CRLF, with no other CR, LF or NUL: nothing a frame
 * holds can split a line or add a request.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "wire.h"

static void check_lines(const char *head, size_t len)
{
    REQUIRE(len >= 4 && memcmp(head + len - 4, "\r\n\r\n", 4) == 0);
    size_t blank = 0;
    for (size_t i = 0; i < len; i++) {
        REQUIRE(head[i] != '\0');
        if (head[i] == '\r') {
            REQUIRE(i + 1 < len && head[i + 1] == '\n');
        } else if (head[i] == '\n') {
            REQUIRE(i > 0 && head[i - 1] == '\r');
            if (i >= 3 && head[i - 2] == '\n')
                blank++;
        }
    }
    REQUIRE(blank == 1);  /* one end of the head, at its end */
    const char *line_end = memchr(head, '\r', len);
    REQUIRE(line_end != NULL);
    const char *sp1 = memchr(head, ' ', (size_t)(line_end - head));
    REQUIRE(sp1 != NULL);
    const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1));
    REQUIRE(sp2 != NULL && (size_t)(line_end - sp2) == sizeof " HTTP/1.1" - 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20))
        return 0;
    frame_info info = {0};
    const char *vars = (const char *)data;
    if (frame_parse_vars(vars, (uint32_t)size, &info) != FRAME_OK)
        return 0;
    size_t need = 0, len = 0;
    http_head_status st = http_head_build(vars, (uint32_t)size, NULL, 0, &need);
    if (st != HTTP_HEAD_OK) {
        REQUIRE(st == HTTP_HEAD_BAD_METHOD);
        return 0;
    }
    char *out = malloc(need);
    REQUIRE(out != NULL);
    REQUIRE(http_head_build(vars, (uint32_t)size, out, need - 1, &len) == HTTP_HEAD_TOO_LARGE);
    REQUIRE(http_head_build(vars, (uint32_t)size, out, need, &len) == HTTP_HEAD_OK && len == need);
    check_lines(out, len);
    free(out);
    return 0;
}
