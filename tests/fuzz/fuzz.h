/* What the fuzz harnesses share. */
#ifndef AGENT_FUZZ_H
#define AGENT_FUZZ_H
#include <stdio.h>
#include <stdlib.h>

/* A failed check aborts, which libFuzzer reports as a crash with the input. */
#define REQUIRE(cond)                                                      \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: REQUIRE(%s) failed\n", __FILE__, __LINE__, #cond); \
            abort();                                                       \
        }                                                                  \
    } while (0)

#endif
