#ifndef AGENT_SPAWN_H
#define AGENT_SPAWN_H
#include <stddef.h>
#include <stdint.h>
#include "spawn_api.h"
#endif
