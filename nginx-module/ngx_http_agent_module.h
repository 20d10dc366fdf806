
/*
 * ngx_http_agent_module: hands requests for Python web apps to the agent
 * (see docs/protocol.md) and starts the agent when nginx loads its
 * configuration.
 *
 *     ngx_http_agent_settings.h   every directive, declared once
 *     ngx_http_agent_conf.c       the directives, create/merge, the apps
 *     ngx_http_agent_handler.c    the request path
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
    ngx_http_agent_app_t       settings;
    ngx_http_agent_app_t      *app;
} ngx_http_agent_loc_conf_t;


ngx_int_t ngx_http_agent_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_agent_status_handler(ngx_http_request_t *r);

int ngx_http_agent_open_instance_dir(ngx_cycle_t *cycle, ngx_str_t *dir);
ngx_int_t ngx_http_agent_write_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf, int dir_fd);
char *ngx_http_agent_file_path(ngx_pool_t *pool, ngx_str_t *dir, char *name);
char *ngx_http_agent_cstring(ngx_pool_t *pool, ngx_str_t *s);
void ngx_http_agent_close_fd(ngx_cycle_t *cycle, int fd);

ngx_int_t ngx_http_agent_init_module(ngx_cycle_t *cycle);
ngx_int_t ngx_http_agent_init_process(ngx_cycle_t *cycle);


extern ngx_module_t  ngx_http_agent_module;


#endif /* _NGX_HTTP_AGENT_MODULE_H_INCLUDED_ */
