
/*
 * Every agent_* directive, declared once.  The module generates from these
 * tables the fields of its configuration structs, its command table, the
 * unset values of create_*_conf, the merge (with the defaults below), the
 * check that all locations naming one app agree, and apps.json.
 *
 * A row is
 *
 *     X(NAME, KIND, SCOPE, DEFAULT, POST)                  and, for
 *     X(NAME, KIND, SCOPE, DEFAULT, POST, FIELD)           LOCATION rows
 *
 * NAME     the directive without its "agent_" prefix; also the field's name
 *          and the apps.json key (plus "_ms" for MSEC, "_mb" for SIZE_MB).
 *
 * KIND     how the value is parsed, stored, merged, compared and written:
 *            FLAG       on|off               ngx_flag_t,  JSON true/false
 *            NUM        a whole number       ngx_int_t
 *            MSEC       nginx's time syntax  ngx_msec_t,  JSON "<name>_ms"
 *            SIZE_MB    whole megabytes      ngx_int_t,   JSON "<name>_mb"
 *            STR        a string             ngx_str_t
 *            PATH       a path, made absolute from nginx's prefix, its
 *                       trailing slashes taken off; never empty
 *            ENUM       one of the names POST lists (an ngx_str_t array),
 *                       stored as the listed spelling
 *            ENV        NAME VALUE, repeatable; a block that sets any
 *                       replaces the inherited list   (ngx_array_t *)
 *            STATUS     on|off, makes the location a door to the status
 *                       socket; location blocks only, not inherited
 *            TEMP_PATH  PATH [L1 [L2 [L3]]], as proxy_temp_path
 *            SIZE       nginx's size syntax (8k, 1m)  size_t; LOCATION rows
 *            BUFS       N SIZE, as proxy_buffers  ngx_bufs_t; LOCATION rows
 *            URIS       a URI path, repeatable; a block that sets any
 *                       replaces the inherited list (ngx_array_t * of
 *                       ngx_str_t); LOCATION rows
 *
 * SCOPE    HTTP      the http block only (ngx_http_agent_main_conf_t);
 *          APP       http, server, location; one app's setting: written to
 *                    apps.json, and every location naming the same app root
 *                    must give the same value (ngx_http_agent_app_t);
 *          LOCATION  http, server, location (STATUS: location); how nginx
 *                    itself serves the location, not in apps.json
 *
 * DEFAULT  as docs/directives.md gives it, in apps.json's unit: integer
 *          milliseconds (MSEC), megabytes (SIZE_MB), 0|1 (FLAG), a string
 *          literal (SIZE and BUFS: in nginx's syntax, "16k", "8 16k"), or
 *          NONE where the default is computed or empty (the app root is the
 *          parent of root, the user the startup file's owner, the busy
 *          buffers twice the larger of a buffer and agent_buffer_size...).
 *
 * POST     an ngx_conf_post_t checking the value (NULL for none); for ENUM,
 *          the list of names.
 *
 * FIELD    (LOCATION rows) the field of ngx_http_agent_loc_conf_t: most are
 *          nginx's own upstream settings.
 *
 * A new per-app directive is one row in NGX_HTTP_AGENT_APP_SETTINGS (its
 * position is its place in apps.json and in the agreement check), its line
 * in docs/directives.md, and the agent's code that reads it.  A new KIND
 * needs its C type (ngx_http_agent_module.h), its parsing, unset value and
 * merge (ngx_http_agent_conf.c), its comparison (ngx_http_agent_apps.c) and
 * its apps.json form
 * (ngx_http_agent_instance.c); a kind only LOCATION rows use (SIZE, BUFS)
 * needs only its parsing, unset value and merge, since its rows name
 * nginx's own fields.
 */


#ifndef _NGX_HTTP_AGENT_SETTINGS_H_INCLUDED_
#define _NGX_HTTP_AGENT_SETTINGS_H_INCLUDED_


/* the top level of apps.json: the pool the agent keeps for all apps */
#define NGX_HTTP_AGENT_POOL_SETTINGS(X)                                       \
    X(max_pool_size, NUM, HTTP, 6, &ngx_http_agent_at_least_one)              \
    X(pool_idle_time, MSEC, HTTP, 300000, NULL)


/* how nginx starts the agent: the watchdog's command line */
#define NGX_HTTP_AGENT_START_SETTINGS(X)                                      \
    X(instance_dir, PATH, HTTP, NONE, NULL)                                   \
    X(log_file, PATH, HTTP, NONE, NULL)                                       \
    X(core_python, STR, HTTP, NONE, NULL)


/* one app: an entry of apps.json, in this order */
#define NGX_HTTP_AGENT_APP_SETTINGS(X)                                        \
    X(app_root, PATH, APP, NONE, NULL)                                        \
    X(app_type, ENUM, APP, "wsgi", ngx_http_agent_app_types)                  \
    X(startup_file, STR, APP, "wsgi.py", NULL)                                \
    X(app_start_command, STR, APP, NONE, NULL)                                \
    X(python, STR, APP, "/usr/bin/python3", NULL)                             \
    X(env, ENV, APP, NONE, NULL)                                              \
    X(min_instances, NUM, APP, 1, NULL)                                       \
    X(max_instances, NUM, APP, 0, NULL)                                       \
    X(user, STR, APP, NONE, NULL)                                             \
    X(group, STR, APP, NONE, NULL)                                            \
    X(default_user, STR, APP, "nobody", NULL)                                 \
    X(max_request_queue_size, NUM, APP, 100, NULL)                            \
    X(max_request_queue_time, MSEC, APP, 0, NULL)                             \
    X(prestart, FLAG, APP, 0, NULL)                                           \
    X(friendly_error_pages, FLAG, APP, 0, NULL)                               \
    X(memory_limit, SIZE_MB, APP, 0, NULL)                                    \
    X(max_requests, NUM, APP, 0, NULL)                                        \
    X(max_request_time, MSEC, APP, 0, NULL)                                   \
    X(stat_throttle_rate, MSEC, APP, 10000, NULL)                             \
    X(shutdown_timeout, MSEC, APP, 60000, &ngx_http_agent_nonzero_msec)       \
    X(start_timeout, MSEC, APP, 90000, &ngx_http_agent_nonzero_msec)          \
    X(spawn_method, ENUM, APP, "smart", ngx_http_agent_spawn_methods)         \
    X(max_preloader_idle_time, MSEC, APP, 300000, NULL)                      \
    X(concurrency_model, ENUM, APP, "process",                                \
      ngx_http_agent_concurrency_models)                                      \
    X(thread_count, NUM, APP, 1, &ngx_http_agent_concurrency_bounds)         \
    X(concurrency, NUM, APP, 100, &ngx_http_agent_concurrency_bounds)        \
    X(websocket_ping_interval, MSEC, APP, 20000, NULL)                       \
    X(asgi_loop, ENUM, APP, "auto", ngx_http_agent_asgi_loops)


/* how nginx serves a location */
#define NGX_HTTP_AGENT_LOCATION_SETTINGS(X)                                   \
    X(enabled, FLAG, LOCATION, 0, NULL, enabled)                              \
    X(status, STATUS, LOCATION, 0, NULL, status)                              \
    X(fast_path, FLAG, LOCATION, 1, NULL, fast_path)                          \
    X(long_responses, FLAG, LOCATION, 0, NULL, long_responses)                \
    X(base_uri, URIS, LOCATION, NONE, NULL, base_uris)                        \
    X(buffer_response, FLAG, LOCATION, 1, NULL, upstream.buffering)           \
    X(read_timeout, MSEC, LOCATION, 600000, NULL, upstream.read_timeout)      \
    X(send_timeout, MSEC, LOCATION, 60000, NULL, upstream.send_timeout)       \
    X(connect_timeout, MSEC, LOCATION, 60000, NULL, upstream.connect_timeout) \
    X(temp_path, TEMP_PATH, LOCATION, NONE, NULL, upstream.temp_path)         \
    X(buffer_size, SIZE, LOCATION, "16k", NULL, upstream.buffer_size)         \
    X(buffers, BUFS, LOCATION, "4 32k", NULL, upstream.bufs)                  \
    X(busy_buffers_size, SIZE, LOCATION, NONE, NULL,                          \
      upstream.busy_buffers_size_conf)                                        \
    X(max_temp_file_size, SIZE, LOCATION, "1024m", NULL,                      \
      upstream.max_temp_file_size_conf)                                       \
    X(temp_file_write_size, SIZE, LOCATION, NONE, NULL,                       \
      upstream.temp_file_write_size_conf)


#endif /* _NGX_HTTP_AGENT_SETTINGS_H_INCLUDED_ */
