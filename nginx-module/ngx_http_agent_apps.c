
/*
 * The registry of apps: each location that enables the agent names an app
 * by its root; locations that name the same root must configure it alike,
 * and the registry (the main conf's apps) is what instance.c writes into
 * apps.json.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


/* whether two apps' values of a setting of each KIND are the same */
#define NGX_HTTP_AGENT_SAME_FLAG(a, b)       ((a) == (b))
#define NGX_HTTP_AGENT_SAME_NUM(a, b)        ((a) == (b))
#define NGX_HTTP_AGENT_SAME_MSEC(a, b)       ((a) == (b))
#define NGX_HTTP_AGENT_SAME_SIZE_MB          NGX_HTTP_AGENT_SAME_NUM
#define NGX_HTTP_AGENT_SAME_STR(a, b)                                         \
    ngx_http_agent_same_str(&(a), &(b))
#define NGX_HTTP_AGENT_SAME_PATH             NGX_HTTP_AGENT_SAME_STR
#define NGX_HTTP_AGENT_SAME_ENUM             NGX_HTTP_AGENT_SAME_STR
#define NGX_HTTP_AGENT_SAME_ENV(a, b)        ngx_http_agent_same_env(a, b)

#define NGX_HTTP_AGENT_APP_DIFFERS(name, kind, ...)                           \
    if (!NGX_HTTP_AGENT_SAME_##kind(a->name, b->name)) {                      \
        return "agent_" #name;                                                \
    }


static ngx_int_t ngx_http_agent_parent_dir(ngx_conf_t *cf, ngx_str_t *path,
    ngx_str_t *parent);
static ngx_int_t ngx_http_agent_describe_block(ngx_conf_t *cf,
    ngx_str_t *out);
static char *ngx_http_agent_register_app(ngx_conf_t *cf,
    ngx_http_agent_loc_conf_t *alcf, ngx_http_agent_app_t *settings);
static char *ngx_http_agent_differing_setting(ngx_http_agent_app_t *a,
    ngx_http_agent_app_t *b);
static ngx_uint_t ngx_http_agent_same_str(ngx_str_t *a, ngx_str_t *b);
static ngx_uint_t ngx_http_agent_same_env(ngx_array_t *a, ngx_array_t *b);


/* an enabled location: its app registered, its content handler set */

char *
ngx_http_agent_enable_location(ngx_conf_t *cf, ngx_http_agent_loc_conf_t *alcf)
{
    ngx_http_agent_app_t       settings;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler != NULL && clcf->handler != ngx_http_agent_handler) {
        /* proxy_pass and the like in this location take precedence */
        return NGX_CONF_OK;
    }

    /*
     * A derived app root goes into a copy: blocks nested in this one derive
     * theirs from their own root.
     */
    settings = alcf->settings;

    if (settings.app_root.data == NULL) {

        if (clcf->root_lengths != NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "agent: \"root\" \"%V\" contains variables, "
                               "so \"agent_app_root\" must be set where "
                               "\"agent_enabled\" is on", &clcf->root);
            return NGX_CONF_ERROR;
        }

        if (ngx_http_agent_parent_dir(cf, &clcf->root, &settings.app_root)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (settings.app_type.len == sizeof("generic") - 1
        && ngx_strncmp(settings.app_type.data, "generic",
                       sizeof("generic") - 1) == 0
        && settings.app_start_command.len == 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: the app \"%V\" has \"agent_app_type "
                           "generic\" but no \"agent_app_start_command\": "
                           "a generic app needs the command that starts it "
                           "listening on 127.0.0.1:$PORT",
                           &settings.app_root);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_agent_register_app(cf, alcf, &settings) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    clcf->handler = ngx_http_agent_handler;

    return NGX_CONF_OK;
}


/* "/srv/shop/public/" gives "/srv/shop"; "/public" gives "/" */

static ngx_int_t
ngx_http_agent_parent_dir(ngx_conf_t *cf, ngx_str_t *path, ngx_str_t *parent)
{
    size_t     len;
    ngx_str_t  dir;

    dir = *path;
    ngx_http_agent_strip_trailing_slashes(&dir);

    len = dir.len;

    while (len > 0 && dir.data[len - 1] != '/') {
        len--;
    }

    while (len > 1 && dir.data[len - 1] == '/') {
        len--;
    }

    if (len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "agent: cannot derive the app root from \"root\" "
                           "\"%V\"; set \"agent_app_root\"", path);
        return NGX_ERROR;
    }

    parent->data = ngx_pnalloc(cf->pool, len + 1);
    if (parent->data == NULL) {
        return NGX_ERROR;
    }

    parent->len = len;
    (void) ngx_cpystrn(parent->data, dir.data, len + 1);

    return NGX_OK;
}


/* names the block being merged, for messages about conflicting settings */

static ngx_int_t
ngx_http_agent_describe_block(ngx_conf_t *cf, ngx_str_t *out)
{
    size_t                     len;
    ngx_http_core_loc_conf_t  *clcf;
    ngx_http_core_srv_conf_t  *cscf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    cscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_core_module);

    len = sizeof("location \"\" in server \"\"") - 1 + clcf->name.len
          + cscf->server_name.len;

    out->data = ngx_pnalloc(cf->pool, len);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    if (clcf->name.len) {
        out->len = ngx_sprintf(out->data, "location \"%V\" in server \"%V\"",
                               &clcf->name, &cscf->server_name)
                   - out->data;

    } else {
        out->len = ngx_sprintf(out->data, "server \"%V\"",
                               &cscf->server_name)
                   - out->data;
    }

    return NGX_OK;
}


static char *
ngx_http_agent_register_app(ngx_conf_t *cf, ngx_http_agent_loc_conf_t *alcf,
    ngx_http_agent_app_t *settings)
{
    char                        *directive;
    ngx_uint_t                   i;
    ngx_http_agent_app_t        *app, **apps, **slot;
    ngx_http_agent_main_conf_t  *amcf;

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_agent_module);

    settings->name = settings->app_root;

    if (ngx_http_agent_describe_block(cf, &settings->declared_in)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    apps = amcf->apps.elts;

    for (i = 0; i < amcf->apps.nelts; i++) {
        app = apps[i];

        if (app->name.len != settings->name.len
            || ngx_strncmp(app->name.data, settings->name.data,
                           app->name.len) != 0)
        {
            continue;
        }

        directive = ngx_http_agent_differing_setting(app, settings);

        if (directive != NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "agent: app \"%V\" has different settings in "
                               "%V and in %V (\"%s\"); every location of one "
                               "app root must configure it alike",
                               &app->name, &app->declared_in,
                               &settings->declared_in, directive);
            return NGX_CONF_ERROR;
        }

        alcf->app = app;

        return NGX_CONF_OK;
    }

    app = ngx_palloc(cf->pool, sizeof(ngx_http_agent_app_t));
    if (app == NULL) {
        return NGX_CONF_ERROR;
    }

    *app = *settings;

    slot = ngx_array_push(&amcf->apps);
    if (slot == NULL) {
        return NGX_CONF_ERROR;
    }

    *slot = app;
    alcf->app = app;

    return NGX_CONF_OK;
}


/* the directive whose value differs between a and b, or NULL */

static char *
ngx_http_agent_differing_setting(ngx_http_agent_app_t *a,
    ngx_http_agent_app_t *b)
{
    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_APP_DIFFERS)

    return NULL;
}


static ngx_uint_t
ngx_http_agent_same_str(ngx_str_t *a, ngx_str_t *b)
{
    /* an unset string (NULL) is the empty one */
    return a->len == b->len
           && (a->len == 0 || ngx_strncmp(a->data, b->data, a->len) == 0);
}


static ngx_uint_t
ngx_http_agent_same_env(ngx_array_t *a, ngx_array_t *b)
{
    ngx_uint_t     i, na, nb;
    ngx_keyval_t  *ka, *kb;

    na = a ? a->nelts : 0;
    nb = b ? b->nelts : 0;

    if (na != nb) {
        return 0;
    }

    for (i = 0; i < na; i++) {
        ka = (ngx_keyval_t *) a->elts + i;
        kb = (ngx_keyval_t *) b->elts + i;

        if (ka->key.len != kb->key.len || ka->value.len != kb->value.len
            || ngx_strncmp(ka->key.data, kb->key.data, ka->key.len) != 0
            || ngx_strncmp(ka->value.data, kb->value.data, ka->value.len) != 0)
        {
            return 0;
        }
    }

    return 1;
}
