
/*
 * ngx_http_agent_module: hands requests for Python web apps to the agent
 * (see docs/protocol.md) and starts the agent when nginx loads its
 * configuration.
 *
 *     ngx_http_agent_settings.h   every directive, declared once
 *     ngx_http_agent_conf.c       the directives, create/merge, the apps
 *     ngx_http_agent_handler.c    the request path: static files, the
 *                                 upstream callbacks, the response's header
 *     ngx_http_agent_request.c    what is sent upstream: the request frame,
 *                                 the status door's plain request
 *     ngx_http_agent_worker_peer.c  the fast path's upstream side: the
 *                                 peer to a claimed worker, its connection,
 *                                 the records' stripping, the time limit
 *     ngx_http_agent_fastpath.c   the fast path's table (csrc/fastpath.h):
 *                                 the master's file, each worker's row,
 *                                 wake-ups, counters
 *     ngx_http_agent_fastpath.h   what fastpath.c and claims.c share
 *     ngx_http_agent_claims.c     the claims: waiting, hand-off, release,
 *                                 the kept connections
 *     ngx_http_agent_instance.c   the instance directory and apps.json
 *     ngx_http_agent_launch.c     the agent's start: the watchdog
 */


#ifndef _NGX_HTTP_AGENT_MODULE_H_INCLUDED_
#define _NGX_HTTP_AGENT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#if (NGX_HTTP_AGENT_WERROR)
/* placed after nginx's headers so that only this module's code is held to it */
#pragma GCC diagnostic error "-Wall"
#endif


#include "ngx_http_agent_settings.h"

/* the engine's own headers (csrc/): the shared table, the records' parser */
#include "fastpath.h"
#include "wire.h"


#ifndef NGX_HTTP_AGENT_CORE_PYTHON
#define NGX_HTTP_AGENT_CORE_PYTHON  "python3"
#endif


/* the C type of each KIND of setting (ngx_http_agent_settings.h) */
#define NGX_HTTP_AGENT_TYPE_FLAG      ngx_flag_t
#define NGX_HTTP_AGENT_TYPE_NUM       ngx_int_t
#define NGX_HTTP_AGENT_TYPE_MSEC      ngx_msec_t
#define NGX_HTTP_AGENT_TYPE_SIZE_MB   ngx_int_t
#define NGX_HTTP_AGENT_TYPE_STR       ngx_str_t
#define NGX_HTTP_AGENT_TYPE_PATH      ngx_str_t
#define NGX_HTTP_AGENT_TYPE_ENUM      ngx_str_t
#define NGX_HTTP_AGENT_TYPE_ENV       ngx_array_t *   /* ngx_keyval_t */

#define NGX_HTTP_AGENT_FIELD(name, kind, ...)                                 \
    NGX_HTTP_AGENT_TYPE_##kind  name;


/* the settings of one app; every location naming its app root must agree */
typedef struct {
    ngx_str_t                  name;
    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_FIELD)

    ngx_str_t                  declared_in;
} ngx_http_agent_app_t;


typedef struct {
    NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_FIELD)
    NGX_HTTP_AGENT_START_SETTINGS(NGX_HTTP_AGENT_FIELD)

    ngx_array_t                apps;            /* ngx_http_agent_app_t * */

    struct sockaddr_un         socket_addr;
    ngx_str_t                  socket_name;

    struct sockaddr_un         status_addr;
    ngx_str_t                  status_name;
} ngx_http_agent_main_conf_t;


/* the LOCATION settings are the fields their rows name */
typedef struct {
    ngx_http_upstream_conf_t   upstream;

    ngx_flag_t                 enabled;
    ngx_flag_t                 status;
    ngx_flag_t                 fast_path;
    ngx_flag_t                 long_responses;
    ngx_array_t               *base_uris;       /* ngx_str_t: SCRIPT_NAMEs */
    ngx_uint_t                 fp_row;          /* cached: app row + 1 */
    ngx_http_agent_app_t       settings;
    ngx_http_agent_app_t      *app;
} ngx_http_agent_loc_conf_t;


/* a request's state (the module's ctx) */
typedef struct {
    ngx_http_status_t          status;          /* the status line's parse */
    ngx_http_chunked_t         chunked;         /* a chunked response's decoding */

    /* the fast path (ngx_http_agent_claims.c, _worker_peer.c) */
    ngx_http_request_t        *request;
    ngx_http_upstream_resolved_t  *resolved;    /* agent.sock: the slow path */
    ngx_uint_t                 row;
    ngx_uint_t                 slot;
    uint32_t                   generation;
    uint32_t                   head_len;
    uint32_t                   time_limit_ms;   /* the app's, at the claim */
    uint64_t                   body_read_us;    /* the body was read */
    uint64_t                   wait_ms;         /* began to wait */
    ngx_queue_t                queue;           /* in its row's FIFO */
    ngx_event_t                wait_timer;      /* queue time limit */
    ngx_event_t                run_event;       /* posted: a claim was won */
    ngx_event_t                time_limit;      /* request time limit */
    record_decoder             decoder;
    u_char                     head[16];        /* first payload bytes */
    struct sockaddr_un         addr;            /* the worker's socket */
    ngx_str_t                  addr_text;

    unsigned                   waiting:1;       /* in a FIFO */
    unsigned                   claimed:1;       /* holds a claim */
    unsigned                   fast:1;          /* the current try: the worker */
    unsigned                   tried:1;         /* the fast try was made */
    unsigned                   served:1;        /* the worker answered it */
    unsigned                   retry:1;         /* may go to agent.sock */
    unsigned                   got_bytes:1;     /* the worker sent a byte */
    unsigned                   failed:1;        /* the worker failed */
    unsigned                   timed_out:1;     /* request time limit */
} ngx_http_agent_ctx_t;


ngx_int_t ngx_http_agent_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_agent_status_handler(ngx_http_request_t *r);

char *ngx_http_agent_enable_location(ngx_conf_t *cf,
    ngx_http_agent_loc_conf_t *alcf);
void ngx_http_agent_strip_trailing_slashes(ngx_str_t *path);

int ngx_http_agent_open_instance_dir(ngx_cycle_t *cycle, ngx_str_t *dir);
ngx_int_t ngx_http_agent_write_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf, int dir_fd);
char *ngx_http_agent_file_path(ngx_pool_t *pool, ngx_str_t *dir, char *name);
char *ngx_http_agent_cstring(ngx_pool_t *pool, ngx_str_t *s);
void ngx_http_agent_close_fd(ngx_cycle_t *cycle, int fd);

ngx_int_t ngx_http_agent_init_module(ngx_cycle_t *cycle);
ngx_int_t ngx_http_agent_init_process(ngx_cycle_t *cycle);
void ngx_http_agent_exit_process(ngx_cycle_t *cycle);

/* the fast path's table: ngx_http_agent_fastpath.c */
void ngx_http_agent_fp_init_master(ngx_cycle_t *cycle, int dir_fd);
void ngx_http_agent_fp_init_worker(ngx_cycle_t *cycle);
void ngx_http_agent_fp_exit_worker(ngx_cycle_t *cycle);
void ngx_http_agent_fp_count(ngx_http_agent_ctx_t *ctx, ngx_uint_t what);
void ngx_http_agent_fp_duration(ngx_http_agent_ctx_t *ctx);
uint64_t ngx_http_agent_fp_now_us(void);

#define NGX_HTTP_AGENT_FP_FAILED            0
#define NGX_HTTP_AGENT_FP_REQUEST_TIMEOUT   1

/* the claims: ngx_http_agent_claims.c */
ngx_int_t ngx_http_agent_fp_start(ngx_http_request_t *r,
    ngx_http_agent_ctx_t *ctx);
void ngx_http_agent_fp_begin(ngx_http_request_t *r,
    ngx_http_agent_ctx_t *ctx);
ngx_int_t ngx_http_agent_fp_socket(ngx_http_agent_ctx_t *ctx);
ngx_connection_t *ngx_http_agent_fp_kept(ngx_http_agent_ctx_t *ctx);
void ngx_http_agent_fp_keep(ngx_http_agent_ctx_t *ctx, ngx_connection_t *c);
void ngx_http_agent_fp_release(ngx_http_agent_ctx_t *ctx, ngx_uint_t at_once);
void ngx_http_agent_fp_untimed(ngx_http_agent_ctx_t *ctx);

/* the fast path's upstream side: ngx_http_agent_worker_peer.c */
void ngx_http_agent_fp_run(ngx_http_request_t *r);
ngx_http_upstream_srv_conf_t *ngx_http_agent_fp_upstream(void);

/* ngx_http_agent_handler.c */
ngx_int_t ngx_http_agent_answer(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *body, ngx_uint_t retry_after);

/* ngx_http_agent_request.c: the upstream's create_request */
ngx_int_t ngx_http_agent_create_request(ngx_http_request_t *r);
ngx_int_t ngx_http_agent_create_status_request(ngx_http_request_t *r);
ngx_uint_t ngx_http_agent_asks_upgrade(ngx_http_request_t *r);


extern ngx_module_t  ngx_http_agent_module;


#endif /* _NGX_HTTP_AGENT_MODULE_H_INCLUDED_ */
