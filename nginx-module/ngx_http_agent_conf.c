
/*
 * The configuration: the directives (generated from the settings table,
 * ngx_http_agent_settings.h), create/merge, and the registry of apps that
 * the locations name.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


#if defined NGX_HTTP_PROXY_TEMP_PATH
/* shares nginx's proxy temp directory, which packaged nginx already creates */
#define NGX_HTTP_AGENT_TEMP_PATH  NGX_HTTP_PROXY_TEMP_PATH
#else
#define NGX_HTTP_AGENT_TEMP_PATH  "agent_temp"
#endif


/* the blocks where each SCOPE's directives may stand */
#define NGX_HTTP_AGENT_WHERE_HTTP      NGX_HTTP_MAIN_CONF
#define NGX_HTTP_AGENT_WHERE_APP                                              \
    (NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF)
#define NGX_HTTP_AGENT_WHERE_LOCATION  NGX_HTTP_AGENT_WHERE_APP

/* a row whose default is computed (or empty) has none to merge with */
#define NONE  NULL

/*
 * What each KIND is to nginx: the directive's arguments (given where it may
 * stand), its set handler, the unset value, and the merge of c with its
 * parent p and default d.  Whether two apps' values are the same is the
 * registry's column (ngx_http_agent_apps.c).
 */
#define NGX_HTTP_AGENT_ARGS_FLAG(where)      (where|NGX_CONF_FLAG)
#define NGX_HTTP_AGENT_SET_FLAG              ngx_conf_set_flag_slot
#define NGX_HTTP_AGENT_UNSET_FLAG            NGX_CONF_UNSET
#define NGX_HTTP_AGENT_MERGE_FLAG(cf, c, p, d)  ngx_conf_merge_value(c, p, d)

#define NGX_HTTP_AGENT_ARGS_NUM(where)       (where|NGX_CONF_TAKE1)
#define NGX_HTTP_AGENT_SET_NUM               ngx_conf_set_num_slot
#define NGX_HTTP_AGENT_UNSET_NUM             NGX_CONF_UNSET
#define NGX_HTTP_AGENT_MERGE_NUM(cf, c, p, d)   ngx_conf_merge_value(c, p, d)

#define NGX_HTTP_AGENT_ARGS_MSEC(where)      (where|NGX_CONF_TAKE1)
#define NGX_HTTP_AGENT_SET_MSEC              ngx_conf_set_msec_slot
#define NGX_HTTP_AGENT_UNSET_MSEC            NGX_CONF_UNSET_MSEC
#define NGX_HTTP_AGENT_MERGE_MSEC(cf, c, p, d)                                \
    ngx_conf_merge_msec_value(c, p, d)

#define NGX_HTTP_AGENT_ARGS_SIZE_MB          NGX_HTTP_AGENT_ARGS_NUM
#define NGX_HTTP_AGENT_SET_SIZE_MB           NGX_HTTP_AGENT_SET_NUM
#define NGX_HTTP_AGENT_UNSET_SIZE_MB         NGX_HTTP_AGENT_UNSET_NUM
#define NGX_HTTP_AGENT_MERGE_SIZE_MB         NGX_HTTP_AGENT_MERGE_NUM

#define NGX_HTTP_AGENT_ARGS_STR(where)       (where|NGX_CONF_TAKE1)
#define NGX_HTTP_AGENT_SET_STR               ngx_conf_set_str_slot
#define NGX_HTTP_AGENT_UNSET_STR             (ngx_str_t) ngx_null_string
#define NGX_HTTP_AGENT_MERGE_STR(cf, c, p, d)                                 \
    ngx_http_agent_merge_str(&(c), &(p), d)

#define NGX_HTTP_AGENT_ARGS_PATH             NGX_HTTP_AGENT_ARGS_STR
#define NGX_HTTP_AGENT_SET_PATH              ngx_http_agent_set_path
#define NGX_HTTP_AGENT_UNSET_PATH            NGX_HTTP_AGENT_UNSET_STR
#define NGX_HTTP_AGENT_MERGE_PATH            NGX_HTTP_AGENT_MERGE_STR

#define NGX_HTTP_AGENT_ARGS_ENUM             NGX_HTTP_AGENT_ARGS_STR
#define NGX_HTTP_AGENT_SET_ENUM              ngx_http_agent_set_enum
#define NGX_HTTP_AGENT_UNSET_ENUM            NGX_HTTP_AGENT_UNSET_STR
#define NGX_HTTP_AGENT_MERGE_ENUM            NGX_HTTP_AGENT_MERGE_STR

#define NGX_HTTP_AGENT_ARGS_ENV(where)       (where|NGX_CONF_TAKE2)
#define NGX_HTTP_AGENT_SET_ENV               ngx_http_agent_set_env
#define NGX_HTTP_AGENT_UNSET_ENV             NGX_CONF_UNSET_PTR
#define NGX_HTTP_AGENT_MERGE_ENV(cf, c, p, d)                                 \
    ngx_conf_merge_ptr_value(c, p, d)

/* a content handler, as proxy_pass: in location blocks, not inherited */
#define NGX_HTTP_AGENT_ARGS_STATUS(where)    (NGX_HTTP_LOC_CONF|NGX_CONF_FLAG)
#define NGX_HTTP_AGENT_SET_STATUS            ngx_http_agent_set_status
#define NGX_HTTP_AGENT_UNSET_STATUS          NGX_CONF_UNSET
#define NGX_HTTP_AGENT_MERGE_STATUS(cf, c, p, d)

#define NGX_HTTP_AGENT_ARGS_TEMP_PATH(where) (where|NGX_CONF_TAKE1234)
#define NGX_HTTP_AGENT_SET_TEMP_PATH         ngx_conf_set_path_slot
#define NGX_HTTP_AGENT_UNSET_TEMP_PATH       NULL
#define NGX_HTTP_AGENT_MERGE_TEMP_PATH(cf, c, p, d)                           \
    if (ngx_conf_merge_path_value(cf, &(c), p, &ngx_http_agent_temp_path)     \
        != NGX_CONF_OK)                                                       \
    {                                                                         \
        return NGX_CONF_ERROR;                                                \
    }

/* a default in nginx's syntax ("16k", "8 16k"); NONE leaves it unset */
#define NGX_HTTP_AGENT_ARGS_SIZE(where)      (where|NGX_CONF_TAKE1)
#define NGX_HTTP_AGENT_SET_SIZE              ngx_conf_set_size_slot
#define NGX_HTTP_AGENT_UNSET_SIZE            NGX_CONF_UNSET_SIZE
#define NGX_HTTP_AGENT_MERGE_SIZE(cf, c, p, d)                                \
    if (ngx_http_agent_merge_size(cf, &(c), p, d) != NGX_OK) {                \
        return NGX_CONF_ERROR;                                                \
    }

#define NGX_HTTP_AGENT_ARGS_BUFS(where)      (where|NGX_CONF_TAKE2)
#define NGX_HTTP_AGENT_SET_BUFS              ngx_conf_set_bufs_slot
#define NGX_HTTP_AGENT_UNSET_BUFS            (ngx_bufs_t) { 0, 0 }
#define NGX_HTTP_AGENT_MERGE_BUFS(cf, c, p, d)                                \
    if (ngx_http_agent_merge_bufs(cf, &(c), &(p), d) != NGX_OK) {             \
        return NGX_CONF_ERROR;                                                \
    }


#define NGX_HTTP_AGENT_ARGS_URIS(where)      (where|NGX_CONF_TAKE1)
#define NGX_HTTP_AGENT_SET_URIS              ngx_http_agent_set_base_uri
#define NGX_HTTP_AGENT_UNSET_URIS            NGX_CONF_UNSET_PTR
#define NGX_HTTP_AGENT_MERGE_URIS(cf, c, p, d)                                \
    ngx_conf_merge_ptr_value(c, p, d)


/* what the module makes of each row of the settings tables */

#define NGX_HTTP_AGENT_COMMAND(name, kind, scope, post, conf, offset)         \
    { ngx_string("agent_" #name),                                             \
      NGX_HTTP_AGENT_ARGS_##kind(NGX_HTTP_AGENT_WHERE_##scope),               \
      NGX_HTTP_AGENT_SET_##kind, conf, offset, post },

#define NGX_HTTP_AGENT_MAIN_COMMAND(name, kind, scope, dflt, post)            \
    NGX_HTTP_AGENT_COMMAND(name, kind, scope, post, NGX_HTTP_MAIN_CONF_OFFSET,\
        offsetof(ngx_http_agent_main_conf_t, name))
#define NGX_HTTP_AGENT_APP_COMMAND(name, kind, scope, dflt, post)             \
    NGX_HTTP_AGENT_COMMAND(name, kind, scope, post, NGX_HTTP_LOC_CONF_OFFSET, \
        offsetof(ngx_http_agent_loc_conf_t, settings.name))
#define NGX_HTTP_AGENT_LOC_COMMAND(name, kind, scope, dflt, post, field)      \
    NGX_HTTP_AGENT_COMMAND(name, kind, scope, post, NGX_HTTP_LOC_CONF_OFFSET, \
        offsetof(ngx_http_agent_loc_conf_t, field))

#define NGX_HTTP_AGENT_MAIN_UNSET(name, kind, ...)                            \
    amcf->name = NGX_HTTP_AGENT_UNSET_##kind;
#define NGX_HTTP_AGENT_APP_UNSET(name, kind, ...)                             \
    conf->settings.name = NGX_HTTP_AGENT_UNSET_##kind;
#define NGX_HTTP_AGENT_LOC_UNSET(name, kind, scope, dflt, post, field)        \
    conf->field = NGX_HTTP_AGENT_UNSET_##kind;

/* the main conf has no parent: merged with itself, it takes the default */
#define NGX_HTTP_AGENT_MAIN_MERGE(name, kind, scope, dflt, post)              \
    NGX_HTTP_AGENT_MERGE_##kind(cf, amcf->name, amcf->name, dflt);
#define NGX_HTTP_AGENT_APP_MERGE(name, kind, scope, dflt, post)               \
    NGX_HTTP_AGENT_MERGE_##kind(cf, conf->name, prev->name, dflt);
#define NGX_HTTP_AGENT_LOC_MERGE(name, kind, scope, dflt, post, field)        \
    NGX_HTTP_AGENT_MERGE_##kind(cf, conf->field, prev->field, dflt);



static void *ngx_http_agent_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_agent_init_main_conf(ngx_conf_t *cf, void *conf);
static ngx_int_t ngx_http_agent_set_unix_addr(ngx_conf_t *cf,
    ngx_str_t *dir, char *file, size_t file_size, struct sockaddr_un *addr,
    ngx_str_t *name);
static ngx_int_t ngx_http_agent_set_socket_addr(ngx_conf_t *cf,
    ngx_http_agent_main_conf_t *amcf);
static void *ngx_http_agent_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_agent_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_agent_merge_settings(ngx_conf_t *cf,
    ngx_http_agent_app_t *conf, ngx_http_agent_app_t *prev);
static void ngx_http_agent_merge_str(ngx_str_t *conf, ngx_str_t *prev,
    char *dflt);
static ngx_int_t ngx_http_agent_merge_size(ngx_conf_t *cf, size_t *conf,
    size_t prev, char *dflt);
static ngx_int_t ngx_http_agent_merge_bufs(ngx_conf_t *cf, ngx_bufs_t *conf,
    ngx_bufs_t *prev, char *dflt);
static char *ngx_http_agent_check_buffers(ngx_conf_t *cf,
    ngx_http_upstream_conf_t *u);
static char *ngx_http_agent_set_path(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_check_at_least_one(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_agent_check_nonzero_msec(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_agent_set_enum(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_set_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_set_env(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_set_base_uri(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);


static ngx_conf_post_t  ngx_http_agent_at_least_one = {
    ngx_http_agent_check_at_least_one
};

static ngx_conf_post_t  ngx_http_agent_nonzero_msec = {
    ngx_http_agent_check_nonzero_msec
};

static ngx_str_t  ngx_http_agent_app_types[] = {
    ngx_string("wsgi"),
    ngx_string("asgi"),
    ngx_string("generic"),
    ngx_null_string
};

/* requests a worker serves at once (its threads, or an ASGI worker's
 * event loop): as many as the agent's handshake accepts */
static ngx_conf_num_bounds_t  ngx_http_agent_concurrency_bounds = {
    ngx_conf_check_num_bounds, 1, 1024
};

static ngx_str_t  ngx_http_agent_concurrency_models[] = {
    ngx_string("process"),
    ngx_string("thread"),
    ngx_null_string
};

static ngx_str_t  ngx_http_agent_asgi_loops[] = {
    ngx_string("auto"),
    ngx_string("asyncio"),
    ngx_string("uvloop"),
    ngx_null_string
};

static ngx_str_t  ngx_http_agent_spawn_methods[] = {
    ngx_string("smart"),
    ngx_string("direct"),
    ngx_null_string
};


static ngx_command_t  ngx_http_agent_commands[] = {

    NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_MAIN_COMMAND)
    NGX_HTTP_AGENT_START_SETTINGS(NGX_HTTP_AGENT_MAIN_COMMAND)
    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_APP_COMMAND)
    NGX_HTTP_AGENT_LOCATION_SETTINGS(NGX_HTTP_AGENT_LOC_COMMAND)

    ngx_null_command
};


static ngx_http_module_t  ngx_http_agent_module_ctx = {
    NULL,                                  /* preconfiguration */
    NULL,                                  /* postconfiguration */

    ngx_http_agent_create_main_conf,       /* create main configuration */
    ngx_http_agent_init_main_conf,         /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_agent_create_loc_conf,        /* create location configuration */
    ngx_http_agent_merge_loc_conf          /* merge location configuration */
};


ngx_module_t  ngx_http_agent_module = {
    NGX_MODULE_V1,
    &ngx_http_agent_module_ctx,            /* module context */
    ngx_http_agent_commands,               /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_agent_init_module,            /* init module */
    ngx_http_agent_init_process,           /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_agent_exit_process,           /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_http_agent_hide_headers[] = {
    ngx_string("Status"),
    ngx_string("X-Accel-Expires"),
    ngx_string("X-Accel-Redirect"),
    ngx_string("X-Accel-Limit-Rate"),
    ngx_string("X-Accel-Buffering"),
    ngx_string("X-Accel-Charset"),
    ngx_null_string
};


static ngx_path_init_t  ngx_http_agent_temp_path = {
    ngx_string(NGX_HTTP_AGENT_TEMP_PATH), { 1, 2, 0 }
};


static void *
ngx_http_agent_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_agent_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_agent_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_MAIN_UNSET)
    NGX_HTTP_AGENT_START_SETTINGS(NGX_HTTP_AGENT_MAIN_UNSET)

    if (ngx_array_init(&amcf->apps, cf->pool, 4,
                       sizeof(ngx_http_agent_app_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return amcf;
}


static char *
ngx_http_agent_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_agent_main_conf_t  *amcf = conf;

    u_char    *p;
    uint32_t   crc;

    NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_MAIN_MERGE)
    NGX_HTTP_AGENT_START_SETTINGS(NGX_HTTP_AGENT_MAIN_MERGE)

    if (amcf->core_python.data == NULL) {
        ngx_str_set(&amcf->core_python, NGX_HTTP_AGENT_CORE_PYTHON);
    }

    if (amcf->instance_dir.data == NULL) {
        /*
         * One instance per nginx configuration file, in a directory no
         * other user can make first: /run for root, else one named after
         * the user (ngx_http_agent_instance.c checks whose it is).
         */
        crc = ngx_crc32_short(cf->cycle->conf_file.data,
                              cf->cycle->conf_file.len);

        amcf->instance_dir.data = ngx_pnalloc(cf->pool,
                                              sizeof("/tmp/agent--12345678")
                                              + NGX_INT64_LEN);
        if (amcf->instance_dir.data == NULL) {
            return NGX_CONF_ERROR;
        }

        if (geteuid() == 0) {
            p = ngx_sprintf(amcf->instance_dir.data, "/run/agent-%08xD%Z",
                            crc);

        } else {
            p = ngx_sprintf(amcf->instance_dir.data, "/tmp/agent-%uL-%08xD%Z",
                            (uint64_t) geteuid(), crc);
        }

        amcf->instance_dir.len = p - amcf->instance_dir.data - 1;
    }

    if (ngx_http_agent_set_socket_addr(cf, amcf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_agent_set_socket_addr(ngx_conf_t *cf,
    ngx_http_agent_main_conf_t *amcf)
{
    if (ngx_http_agent_set_unix_addr(cf, &amcf->instance_dir, "/agent.sock",
                                     sizeof("/agent.sock"),
                                     &amcf->socket_addr, &amcf->socket_name)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_agent_set_unix_addr(cf, &amcf->instance_dir,
                                        "/status.sock",
                                        sizeof("/status.sock"),
                                        &amcf->status_addr,
                                        &amcf->status_name);
}


/* addr and name ("unix:PATH") of the socket "file" in the directory "dir" */

static ngx_int_t
ngx_http_agent_set_unix_addr(ngx_conf_t *cf, ngx_str_t *dir, char *file,
    size_t file_size, struct sockaddr_un *addr, ngx_str_t *name)
{
    u_char  *p;
    size_t   len;

    len = dir->len + file_size - 1;

    if (len >= sizeof(addr->sun_path)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: \"agent_instance_dir\" \"%V\" is too long "
                           "for the socket path \"%V%s\" (at most %uz "
                           "bytes)", dir, dir, file,
                           sizeof(addr->sun_path) - 1);
        return NGX_ERROR;
    }

    addr->sun_family = AF_UNIX;
    p = ngx_cpymem(addr->sun_path, dir->data, dir->len);
    (void) ngx_cpystrn(p, (u_char *) file, file_size);

    name->data = ngx_pnalloc(cf->pool, sizeof("unix:") + len);
    if (name->data == NULL) {
        return NGX_ERROR;
    }

    name->len = ngx_sprintf(name->data, "unix:%s%Z", addr->sun_path)
                - name->data - 1;

    return NGX_OK;
}


static void *
ngx_http_agent_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_agent_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_agent_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->upstream.hide_headers_hash = { NULL, 0 };
     *     conf->app = NULL;
     */

    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_APP_UNSET)
    NGX_HTTP_AGENT_LOCATION_SETTINGS(NGX_HTTP_AGENT_LOC_UNSET)

    conf->upstream.hide_headers = NGX_CONF_UNSET_PTR;
    conf->upstream.pass_headers = NGX_CONF_UNSET_PTR;

    /* the upstream settings not offered as directives */
    conf->upstream.store = 0;
    conf->upstream.next_upstream_tries = 0;
    conf->upstream.request_buffering = 1;
    conf->upstream.ignore_client_abort = 0;
    conf->upstream.force_ranges = 0;
    conf->upstream.local = NULL;
    conf->upstream.socket_keepalive = 0;
    conf->upstream.next_upstream_timeout = 0;
    conf->upstream.send_lowat = 0;
    conf->upstream.limit_rate = 0;
    conf->upstream.ignore_headers = NGX_CONF_BITMASK_SET;
    conf->upstream.next_upstream = NGX_CONF_BITMASK_SET
                                   |NGX_HTTP_UPSTREAM_FT_ERROR
                                   |NGX_HTTP_UPSTREAM_FT_TIMEOUT;
    conf->upstream.pass_request_headers = 1;
    conf->upstream.pass_request_body = 1;
    conf->upstream.intercept_errors = 0;
    conf->upstream.cyclic_temp_file = 0;
    conf->upstream.change_buffering = 1;

    ngx_str_set(&conf->upstream.module, "agent");

    return conf;
}


static char *
ngx_http_agent_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_agent_loc_conf_t  *prev = parent;
    ngx_http_agent_loc_conf_t  *conf = child;

    ngx_hash_init_t  hash;

    NGX_HTTP_AGENT_LOCATION_SETTINGS(NGX_HTTP_AGENT_LOC_MERGE)

    if (ngx_http_agent_check_buffers(cf, &conf->upstream) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    hash.max_size = 512;
    hash.bucket_size = ngx_align(64, ngx_cacheline_size);
    hash.name = "agent_hide_headers_hash";

    if (ngx_http_upstream_hide_headers_hash(cf, &conf->upstream,
            &prev->upstream, ngx_http_agent_hide_headers, &hash)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_agent_merge_settings(cf, &conf->settings, &prev->settings)
        != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    /*
     * The fast path takes nginx's peer choice: a request that claimed a
     * worker leaves u->resolved NULL, so that nginx asks this upstream's
     * peer.init (ngx_http_agent_handler.c); the slow path sets u->resolved.
     */
    conf->upstream.upstream = ngx_http_agent_fp_upstream();

    if (conf->enabled) {
        return ngx_http_agent_enable_location(cf, conf);
    }

    return NGX_CONF_OK;
}


/* an unset app root stays unset: it is derived per location from root */

static char *
ngx_http_agent_merge_settings(ngx_conf_t *cf, ngx_http_agent_app_t *conf,
    ngx_http_agent_app_t *prev)
{
    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_APP_MERGE)

    if (conf->max_instances > 0 && conf->min_instances > conf->max_instances)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: \"agent_min_instances\" %i is greater "
                           "than \"agent_max_instances\" %i",
                           conf->min_instances, conf->max_instances);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* as ngx_conf_merge_str_value, but a NULL default leaves the value unset */

static void
ngx_http_agent_merge_str(ngx_str_t *conf, ngx_str_t *prev, char *dflt)
{
    if (conf->data != NULL) {
        return;
    }

    if (prev->data != NULL) {
        *conf = *prev;

    } else if (dflt != NULL) {
        conf->len = ngx_strlen(dflt);
        conf->data = (u_char *) dflt;
    }
}


/* a SIZE's default in nginx's syntax, parsed when it is needed */

static ngx_int_t
ngx_http_agent_merge_size(ngx_conf_t *cf, size_t *conf, size_t prev,
    char *dflt)
{
    ssize_t    size;
    ngx_str_t  text;

    if (*conf != NGX_CONF_UNSET_SIZE) {
        return NGX_OK;
    }

    if (prev != NGX_CONF_UNSET_SIZE || dflt == NULL) {
        *conf = prev;
        return NGX_OK;
    }

    text.len = ngx_strlen(dflt);
    text.data = (u_char *) dflt;

    size = ngx_parse_size(&text);

    if (size == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: the built-in default \"%s\" is not a "
                           "size", dflt);
        return NGX_ERROR;
    }

    *conf = (size_t) size;

    return NGX_OK;
}


/* a BUFS's default: "N SIZE" */

static ngx_int_t
ngx_http_agent_merge_bufs(ngx_conf_t *cf, ngx_bufs_t *conf, ngx_bufs_t *prev,
    char *dflt)
{
    u_char     *space;
    ssize_t     size;
    ngx_int_t   num;
    ngx_str_t   text;

    if (conf->num != 0) {
        return NGX_OK;
    }

    if (prev->num != 0 || dflt == NULL) {
        *conf = *prev;
        return NGX_OK;
    }

    text.len = ngx_strlen(dflt);
    text.data = (u_char *) dflt;

    space = ngx_strlchr(text.data, text.data + text.len, ' ');

    if (space == NULL) {
        goto invalid;
    }

    num = ngx_atoi(text.data, space - text.data);

    text.len -= space + 1 - text.data;
    text.data = space + 1;

    size = ngx_parse_size(&text);

    if (num == NGX_ERROR || num == 0 || size == NGX_ERROR || size == 0) {
        goto invalid;
    }

    conf->num = num;
    conf->size = (size_t) size;

    return NGX_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "agent: the built-in default \"%s\" is not "
                       "\"NUMBER SIZE\"", dflt);
    return NGX_ERROR;
}


/*
 * The buffers' rules are proxy_*'s (ngx_http_proxy_merge_loc_conf), in its
 * words: unset, the busy buffers and the temp file's write size are twice
 * the larger of agent_buffer_size and one of agent_buffers.
 */

static char *
ngx_http_agent_check_buffers(ngx_conf_t *cf, ngx_http_upstream_conf_t *u)
{
    size_t  size;

    if (u->bufs.num < 2) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "there must be at least 2 \"agent_buffers\"");
        return NGX_CONF_ERROR;
    }

    size = ngx_max(u->buffer_size, u->bufs.size);

    u->busy_buffers_size = (u->busy_buffers_size_conf == NGX_CONF_UNSET_SIZE)
                           ? 2 * size : u->busy_buffers_size_conf;

    if (u->busy_buffers_size < size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
             "\"agent_busy_buffers_size\" must be equal to or greater than "
             "the maximum of the value of \"agent_buffer_size\" and "
             "one of the \"agent_buffers\"");
        return NGX_CONF_ERROR;
    }

    if (u->busy_buffers_size > (u->bufs.num - 1) * u->bufs.size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
             "\"agent_busy_buffers_size\" must be less than "
             "the size of all \"agent_buffers\" minus one buffer");
        return NGX_CONF_ERROR;
    }

    u->temp_file_write_size =
        (u->temp_file_write_size_conf == NGX_CONF_UNSET_SIZE)
        ? 2 * size : u->temp_file_write_size_conf;

    if (u->temp_file_write_size < size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
             "\"agent_temp_file_write_size\" must be equal to or greater "
             "than the maximum of the value of \"agent_buffer_size\" and "
             "one of the \"agent_buffers\"");
        return NGX_CONF_ERROR;
    }

    u->max_temp_file_size = u->max_temp_file_size_conf;

    if (u->max_temp_file_size != 0 && u->max_temp_file_size < size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
             "\"agent_max_temp_file_size\" must be equal to zero to disable "
             "temporary files usage or must be equal to or greater than "
             "the maximum of the value of \"agent_buffer_size\" and "
             "one of the \"agent_buffers\"");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * A PATH: relative paths are taken from nginx's prefix, as nginx does for
 * its own, and trailing slashes are taken off.
 */

static char *
ngx_http_agent_set_path(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    char       *rv;
    ngx_str_t  *path;

    rv = ngx_conf_set_str_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    path = (ngx_str_t *) (p + cmd->offset);

    if (path->len == 0) {
        return "must not be empty";
    }

    if (ngx_conf_full_name(cf->cycle, path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_http_agent_strip_trailing_slashes(path);

    return NGX_CONF_OK;
}


void
ngx_http_agent_strip_trailing_slashes(ngx_str_t *path)
{
    while (path->len > 1 && path->data[path->len - 1] == '/') {
        path->len--;
    }
}


static char *
ngx_http_agent_check_at_least_one(ngx_conf_t *cf, void *post, void *data)
{
    ngx_int_t  *np = data;

    if (*np < 1) {
        return "must be at least 1";
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_agent_check_nonzero_msec(ngx_conf_t *cf, void *post, void *data)
{
    ngx_msec_t  *msp = data;

    if (*msp == 0) {
        return "must be more than 0";
    }

    return NGX_CONF_OK;
}


/*
 * An ENUM takes one of the names its post lists, in any case, and keeps the
 * listed spelling.  nginx's enum slot would not name the directive in its
 * message; this one names the only value there is for now.
 */

static char *
ngx_http_agent_set_enum(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    ngx_str_t  *value, *field, *name;

    field = (ngx_str_t *) (p + cmd->offset);

    if (field->data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    for (name = cmd->post; name->len != 0; name++) {
        if (name->len == value[1].len
            && ngx_strncasecmp(name->data, value[1].data, name->len) == 0)
        {
            *field = *name;
            return NGX_CONF_OK;
        }
    }

    name = cmd->post;

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" directive, "
                       "only \"%V\" is supported", &value[1], &cmd->name,
                       name);

    return NGX_CONF_ERROR;
}


/*
 * "agent_status on" makes the location a door to the status socket, as
 * proxy_pass makes one to a proxied server: the location's handler is set
 * here, once, and agent_enabled inherited into the location then stands
 * aside (ngx_http_agent_enable_location).
 */

static char *
ngx_http_agent_set_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_agent_loc_conf_t *alcf = conf;

    char                      *rv;
    ngx_http_core_loc_conf_t  *clcf;

    rv = ngx_conf_set_flag_slot(cf, cmd, conf);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (!alcf->status) {
        return NGX_CONF_OK;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler != NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: \"agent_status\" cannot share a location "
                           "with another content handler (proxy_pass and "
                           "the like)");
        return NGX_CONF_ERROR;
    }

    clcf->handler = ngx_http_agent_status_handler;

    /* as with proxy_pass: "/agent" is redirected to "location /agent/" */
    if (clcf->name.len && clcf->name.data[clcf->name.len - 1] == '/') {
        clcf->auto_redirect = 1;
    }

    return NGX_CONF_OK;
}


/* a location that sets any agent_env replaces the inherited list */

static char *
ngx_http_agent_set_env(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    ngx_str_t      *value;
    ngx_array_t   **env;
    ngx_keyval_t   *kv;

    env = (ngx_array_t **) (p + cmd->offset);

    value = cf->args->elts;

    if (value[1].len == 0 || ngx_strlchr(value[1].data,
                                         value[1].data + value[1].len, '=')
                             != NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid variable name \"%V\" in \"%V\" directive",
                           &value[1], &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (*env == NGX_CONF_UNSET_PTR || *env == NULL) {
        *env = ngx_array_create(cf->pool, 4, sizeof(ngx_keyval_t));
        if (*env == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    kv = ngx_array_push(*env);
    if (kv == NULL) {
        return NGX_CONF_ERROR;
    }

    kv->key = value[1];
    kv->value = value[2];

    return NGX_CONF_OK;
}


/*
 * agent_base_uri, passenger_base_uri's meaning: the app is served under
 * this URI, which its requests get as SCRIPT_NAME (ngx_http_agent_request.c).
 * Repeatable, as Passenger allows several per server; a block that sets any
 * replaces the inherited list.  Trailing slashes are taken off, and "/" is
 * the root: no SCRIPT_NAME, as without the directive.
 */

static char *
ngx_http_agent_set_base_uri(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    ngx_str_t     *value, *uri;
    ngx_array_t  **uris;

    uris = (ngx_array_t **) (p + cmd->offset);

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].data[0] != '/'
        || ngx_strlchr(value[1].data, value[1].data + value[1].len, '?')
           != NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid URI \"%V\" in \"%V\" directive: a path "
                           "starting with \"/\", without a query",
                           &value[1], &cmd->name);
        return NGX_CONF_ERROR;
    }

    if (*uris == NGX_CONF_UNSET_PTR || *uris == NULL) {
        *uris = ngx_array_create(cf->pool, 2, sizeof(ngx_str_t));
        if (*uris == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    uri = ngx_array_push(*uris);
    if (uri == NULL) {
        return NGX_CONF_ERROR;
    }

    *uri = value[1];

    while (uri->len > 0 && uri->data[uri->len - 1] == '/') {
        uri->len--;
    }

    return NGX_CONF_OK;
}
