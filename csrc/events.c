/*
 * The events the engine tells the policy (engine_api.h: agent_engine_poll).
 * The caller holds the engine's lock.
 */
#include "engine_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define EVENT_RING_INITIAL 1024u   /* events other than log lines; grows */
#define EVENT_RING_MAX 65536u      /* beyond this the oldest event is dropped */
#define LOG_RING_SIZE 4096u        /* log lines; the oldest is dropped when full */

static bool ring_empty(const event_ring *r) { return r->head == r->tail; }

static bool ring_init(event_ring *r, uint32_t cap)
{
    r->slots = malloc(sizeof *r->slots * cap);
    r->cap = cap;
    r->head = r->tail = 0;
    return r->slots != NULL;
}

bool events_init(agent_engine *e)
{
    return ring_init(&e->events, EVENT_RING_INITIAL) && ring_init(&e->logs, LOG_RING_SIZE);
}

void events_free(agent_engine *e)
{
    free(e->events.slots);
    free(e->logs.slots);
}

/* Doubles a full ring; entries keep their numbers. */
static bool ring_grow(event_ring *r)
{
    if (r->cap >= EVENT_RING_MAX)
        return false;
    uint32_t cap = r->cap * 2;
    ring_entry *slots = malloc(sizeof *slots * cap);
    if (!slots)
        return false;
    for (uint64_t p = r->head; p < r->tail; p++)
        slots[p & (cap - 1)] = r->slots[p & (r->cap - 1)];
    free(r->slots);
    r->slots = slots;
    r->cap = cap;
    return true;
}

/* Appends an event and returns its number. A full log ring loses its
 * oldest line; the other ring grows, and loses its oldest event only past
 * EVENT_RING_MAX, which coalescing keeps out of reach (at most one IDLE
 * per worker and one QUEUED per app wait at any time). The notify
 * eventfd is bumped only when the first event starts waiting, so a burst
 * costs one write(). */
static uint64_t emit_event(agent_engine *e, const agent_engine_event *ev)
{
    bool was_empty = ring_empty(&e->events) && ring_empty(&e->logs);
    event_ring *r = ev->type == AGENT_EV_LOG ? &e->logs : &e->events;
    if (r->tail - r->head == r->cap && (r == &e->logs || !ring_grow(r)))
        r->head++;
    ring_entry *slot = &r->slots[r->tail & (r->cap - 1)];
    slot->order = e->event_order++;
    slot->ev = *ev;
    if (was_empty)
        eventfd_signal(e->notify_fd);
    return r->tail++;
}

void emit(agent_engine *e, int type, int app_id, int pid, int64_t value, const char *fmt, ...)
{
    agent_engine_event ev = {.type = type, .app = app_id, .pid = pid, .value = value};
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ev.message, sizeof ev.message, fmt, ap);
        va_end(ap);
    }
    emit_event(e, &ev);
}

/* IDLE and QUEUED report a state (a worker is idle after N requests, a
 * queue is this long): while the previous one is unread it is updated in
 * place, so that a policy that polls late reads one event per worker or
 * app, not one per request. *last holds 1 + the event's number. */
void emit_coalesced(agent_engine *e, uint64_t *last, int type, int app_id, int pid, int64_t value)
{
    if (*last && *last - 1 >= e->events.head) {
        agent_engine_event *ev = &e->events.slots[(*last - 1) & (e->events.cap - 1)].ev;
        if (ev->type == type && ev->app == app_id && ev->pid == pid) {
            ev->value = value;
            return;
        }
    }
    agent_engine_event ev = {.type = type, .app = app_id, .pid = pid, .value = value};
    *last = emit_event(e, &ev) + 1;
}


/* Copies up to max events, the two rings merged back into emission order.
 * The notify fd stays readable exactly while events wait. */
int events_take(agent_engine *e, agent_engine_event *out, int max)
{
    int n = 0;
    while (n < max && !(ring_empty(&e->events) && ring_empty(&e->logs))) {
        const ring_entry *ev = ring_empty(&e->events) ? NULL : &e->events.slots[e->events.head & (e->events.cap - 1)];
        const ring_entry *log = ring_empty(&e->logs) ? NULL : &e->logs.slots[e->logs.head & (e->logs.cap - 1)];
        if (ev && (!log || ev->order < log->order)) {
            out[n++] = ev->ev;
            e->events.head++;
        } else {
            out[n++] = log->ev;
            e->logs.head++;
        }
    }
    if (ring_empty(&e->events) && ring_empty(&e->logs))
        eventfd_drain(e->notify_fd);
    return n;
}
