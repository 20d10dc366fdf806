
/*
 * The instance directory and what nginx writes into it (docs/protocol.md,
 * section 4): the directory is used only once it, and every directory above
 * it, has been checked; apps.json is written from the settings tables and
 * put in place atomically, without following links.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_agent_module.h"


/*
 * apps.json's form of each KIND (ngx_http_agent_settings.h): sep, then
 * "key": value, the key carrying the unit of times and sizes.
 */
#define NGX_HTTP_AGENT_JSON_FLAG(p, sep, key, v)                              \
    ngx_sprintf(p, sep "\"" key "\": %s", (v) ? "true" : "false")
#define NGX_HTTP_AGENT_JSON_NUM(p, sep, key, v)                               \
    ngx_sprintf(p, sep "\"" key "\": %i", v)
#define NGX_HTTP_AGENT_JSON_MSEC(p, sep, key, v)                              \
    ngx_sprintf(p, sep "\"" key "_ms\": %M", v)
#define NGX_HTTP_AGENT_JSON_SIZE_MB(p, sep, key, v)                           \
    ngx_sprintf(p, sep "\"" key "_mb\": %i", v)
#define NGX_HTTP_AGENT_JSON_STR(p, sep, key, v)                               \
    ngx_http_agent_json_string(ngx_sprintf(p, sep "\"" key "\": "), &(v))
#define NGX_HTTP_AGENT_JSON_PATH      NGX_HTTP_AGENT_JSON_STR
#define NGX_HTTP_AGENT_JSON_ENUM      NGX_HTTP_AGENT_JSON_STR
#define NGX_HTTP_AGENT_JSON_ENV(p, sep, key, v)                               \
    ngx_http_agent_json_env(ngx_sprintf(p, sep "\"" key "\": "), v)

/* the most each KIND's value can take */
#define NGX_HTTP_AGENT_JSON_LEN_FLAG(v)      (sizeof("false") - 1)
#define NGX_HTTP_AGENT_JSON_LEN_NUM(v)       NGX_INT64_LEN
#define NGX_HTTP_AGENT_JSON_LEN_MSEC(v)      NGX_INT64_LEN
#define NGX_HTTP_AGENT_JSON_LEN_SIZE_MB(v)   NGX_INT64_LEN
#define NGX_HTTP_AGENT_JSON_LEN_STR(v)       (2 + 6 * (v).len)
#define NGX_HTTP_AGENT_JSON_LEN_PATH         NGX_HTTP_AGENT_JSON_LEN_STR
#define NGX_HTTP_AGENT_JSON_LEN_ENUM         NGX_HTTP_AGENT_JSON_LEN_STR
#define NGX_HTTP_AGENT_JSON_LEN_ENV(v)       ngx_http_agent_json_env_len(v)

/* a row of the settings tables as a line of apps.json, and its most length */
#define NGX_HTTP_AGENT_JSON_POOL_ROW(name, kind, ...)                         \
    p = NGX_HTTP_AGENT_JSON_##kind(p, ",\n  ", #name, amcf->name);
#define NGX_HTTP_AGENT_JSON_APP_ROW(name, kind, ...)                          \
    p = NGX_HTTP_AGENT_JSON_##kind(p, ",\n      ", #name, app->name);
#define NGX_HTTP_AGENT_JSON_POOL_LEN(name, kind, ...)                         \
    + sizeof(#name) + 16 + NGX_HTTP_AGENT_JSON_LEN_##kind(amcf->name)
#define NGX_HTTP_AGENT_JSON_APP_LEN(name, kind, ...)                          \
    + sizeof(#name) + 16 + NGX_HTTP_AGENT_JSON_LEN_##kind(app->name)


static ngx_int_t ngx_http_agent_make_dirs(ngx_cycle_t *cycle, u_char *path);
static ngx_int_t ngx_http_agent_check_ancestors(ngx_cycle_t *cycle,
    u_char *path);
static ngx_int_t ngx_http_agent_check_ancestor(ngx_cycle_t *cycle,
    u_char *path, u_char *ancestor);
static int ngx_http_agent_open_checked_dir(ngx_cycle_t *cycle, u_char *path);
static void ngx_http_agent_refuse_dir(ngx_cycle_t *cycle, u_char *path,
    u_char *culprit, struct stat *st, char *why);
static size_t ngx_http_agent_app_table_bound(ngx_http_agent_main_conf_t *amcf);
static u_char *ngx_http_agent_json_app_table(u_char *p,
    ngx_http_agent_main_conf_t *amcf);
static u_char *ngx_http_agent_json_app(u_char *p, ngx_http_agent_app_t *app);
static size_t ngx_http_agent_json_env_len(ngx_array_t *env);
static u_char *ngx_http_agent_json_env(u_char *p, ngx_array_t *env);
static u_char *ngx_http_agent_json_string(u_char *p, ngx_str_t *s);
static ngx_int_t ngx_http_agent_write_file_atomically(ngx_cycle_t *cycle,
    ngx_str_t *dir, int dir_fd, u_char *data, size_t len);
static int ngx_http_agent_create_temp(ngx_cycle_t *cycle, int dir_fd,
    char *temp, char *path);
static ngx_int_t ngx_http_agent_write_all(ngx_cycle_t *cycle, int fd,
    u_char *data, size_t len, char *path);


/*
 * The instance directory holds the sockets nginx sends requests to, the
 * app table with its secrets and the pid nginx signals, and nginx's master
 * runs as root: another user who made it first, or can rename or replace
 * it, would own all of these.  So it is used only when it is a directory,
 * not a symbolic link, owned by the master's user, writable by nobody else,
 * inside directories that only root or that user can change (or sticky
 * ones, such as /tmp).  Returns an fd of it for openat(), or -1.
 */

int
ngx_http_agent_open_instance_dir(ngx_cycle_t *cycle, ngx_str_t *dir)
{
    u_char  *path;

    path = (u_char *) ngx_http_agent_cstring(cycle->pool, dir);
    if (path == NULL) {
        return -1;
    }

    if (path[0] != '/') {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: the instance directory \"%s\" is not an "
                      "absolute path", path);
        return -1;
    }

    if (ngx_http_agent_make_dirs(cycle, path) != NGX_OK
        || ngx_http_agent_check_ancestors(cycle, path) != NGX_OK)
    {
        return -1;
    }

    return ngx_http_agent_open_checked_dir(cycle, path);
}


static ngx_int_t
ngx_http_agent_make_dirs(ngx_cycle_t *cycle, u_char *path)
{
    u_char     *p;
    ngx_err_t   err;

    for (p = path + 1; /* void */; p++) {

        if (*p != '/' && *p != '\0') {
            continue;
        }

        if (*p == '/') {
            *p = '\0';
            err = (mkdir((char *) path, 0755) == -1) ? ngx_errno : 0;
            *p = '/';

        } else {
            err = (mkdir((char *) path, 0755) == -1) ? ngx_errno : 0;
        }

        if (err && err != NGX_EEXIST) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, err,
                          "agent: cannot create the instance directory "
                          "\"%s\"", path);
            return NGX_ERROR;
        }

        if (*p == '\0') {
            return NGX_OK;
        }
    }
}


static ngx_int_t
ngx_http_agent_check_ancestors(ngx_cycle_t *cycle, u_char *path)
{
    u_char     *p;
    ngx_int_t   rc;

    if (ngx_http_agent_check_ancestor(cycle, path, (u_char *) "/")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (p = path + 1; *p; p++) {

        if (*p != '/' || p[1] == '\0') {
            continue;
        }

        *p = '\0';
        rc = ngx_http_agent_check_ancestor(cycle, path, path);
        *p = '/';

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* a symbolic link may lead on, if its owner is trusted; so may its target */

static ngx_int_t
ngx_http_agent_check_ancestor(ngx_cycle_t *cycle, u_char *path,
    u_char *ancestor)
{
    uid_t        euid;
    struct stat  st;

    euid = geteuid();

    if (lstat((char *) ancestor, &st) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: lstat(\"%s\") failed", ancestor);
        return NGX_ERROR;
    }

    if (S_ISLNK(st.st_mode)) {
        if (st.st_uid != 0 && st.st_uid != euid) {
            ngx_http_agent_refuse_dir(cycle, path, ancestor, &st,
                                      "is a symbolic link of another user");
            return NGX_ERROR;
        }

        if (stat((char *) ancestor, &st) == -1) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: stat(\"%s\") failed", ancestor);
            return NGX_ERROR;
        }
    }

    if (st.st_uid != 0 && st.st_uid != euid) {
        ngx_http_agent_refuse_dir(cycle, path, ancestor, &st,
                                  "belongs to another user");
        return NGX_ERROR;
    }

    if ((st.st_mode & (S_IWGRP|S_IWOTH)) && !(st.st_mode & S_ISVTX)) {
        ngx_http_agent_refuse_dir(cycle, path, ancestor, &st,
                                  "lets other users rename what is in it");
        return NGX_ERROR;
    }

    return NGX_OK;
}


static int
ngx_http_agent_open_checked_dir(ngx_cycle_t *cycle, u_char *path)
{
    int          fd;
    struct stat  st;

    fd = open((char *) path, O_RDONLY|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC);

    if (fd == -1) {
        if (ngx_errno == ELOOP || ngx_errno == ENOTDIR) {
            if (lstat((char *) path, &st) == 0) {
                ngx_http_agent_refuse_dir(cycle, path, path, &st,
                                          "is not a directory");
                return -1;
            }
        }

        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot open the instance directory \"%s\"",
                      path);
        return -1;
    }

    /* fstat() of what was opened: no one can swap it in between */
    if (fstat(fd, &st) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: fstat(\"%s\") failed", path);
        ngx_http_agent_close_fd(cycle, fd);
        return -1;
    }

    if (st.st_uid != geteuid()) {
        ngx_http_agent_refuse_dir(cycle, path, path, &st,
                                  "belongs to another user");
        ngx_http_agent_close_fd(cycle, fd);
        return -1;
    }

    if (st.st_mode & (S_IWGRP|S_IWOTH)) {
        ngx_http_agent_refuse_dir(cycle, path, path, &st,
                                  "is writable by other users");
        ngx_http_agent_close_fd(cycle, fd);
        return -1;
    }

    return fd;
}


static void
ngx_http_agent_refuse_dir(ngx_cycle_t *cycle, u_char *path, u_char *culprit,
    struct stat *st, char *why)
{
    char  mode[16];

    /* nginx's own formats have no octal */
    (void) snprintf(mode, sizeof(mode), "%04o",
                    (unsigned int) (st->st_mode & 07777));

    ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                  "agent: refusing the instance directory \"%s\": \"%s\" %s "
                  "(owner uid %uL, mode %s); the instance directory must "
                  "be a directory, not a symbolic link, owned by uid %uL and "
                  "writable by no other user, inside directories only root "
                  "or uid %uL can change: remove it, or set "
                  "agent_instance_dir to another path",
                  path, culprit, why, (uint64_t) st->st_uid, mode,
                  (uint64_t) geteuid(),
                  (uint64_t) geteuid());
}


ngx_int_t
ngx_http_agent_write_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf, int dir_fd)
{
    u_char     *json, *last;
    ngx_int_t   rc;

    json = ngx_alloc(ngx_http_agent_app_table_bound(amcf), cycle->log);
    if (json == NULL) {
        return NGX_ERROR;
    }

    last = ngx_http_agent_json_app_table(json, amcf);

    rc = ngx_http_agent_write_file_atomically(cycle, &amcf->instance_dir,
                                              dir_fd, json, last - json);
    ngx_free(json);

    return rc;
}


/* the most the JSON can take: every byte of a string may become \u00XX */

static size_t
ngx_http_agent_app_table_bound(ngx_http_agent_main_conf_t *amcf)
{
    size_t                  size;
    ngx_uint_t              i;
    ngx_http_agent_app_t  **apps, *app;

    size = 256 NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_JSON_POOL_LEN);
    apps = amcf->apps.elts;

    for (i = 0; i < amcf->apps.nelts; i++) {
        app = apps[i];

        size += 64 + NGX_HTTP_AGENT_JSON_LEN_STR(app->name)
                NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_JSON_APP_LEN);
    }

    return size;
}


static size_t
ngx_http_agent_json_env_len(ngx_array_t *env)
{
    size_t         size;
    ngx_uint_t     i;
    ngx_keyval_t  *kv;

    size = sizeof("{}") - 1;

    if (env == NULL) {
        return size;
    }

    kv = env->elts;

    for (i = 0; i < env->nelts; i++) {
        size += sizeof(", : ") - 1 + NGX_HTTP_AGENT_JSON_LEN_STR(kv[i].key)
                + NGX_HTTP_AGENT_JSON_LEN_STR(kv[i].value);
    }

    return size;
}


static u_char *
ngx_http_agent_json_app_table(u_char *p, ngx_http_agent_main_conf_t *amcf)
{
    ngx_uint_t              i;
    ngx_http_agent_app_t  **apps;

    p = ngx_sprintf(p, "{\n  \"version\": 1");

    NGX_HTTP_AGENT_POOL_SETTINGS(NGX_HTTP_AGENT_JSON_POOL_ROW)

    p = ngx_sprintf(p, ",\n  \"apps\": [");

    apps = amcf->apps.elts;

    for (i = 0; i < amcf->apps.nelts; i++) {
        p = ngx_cpymem(p, i ? ",\n" : "\n", i ? 2 : 1);
        p = ngx_http_agent_json_app(p, apps[i]);
    }

    return ngx_cpymem(p, "\n  ]\n}\n", sizeof("\n  ]\n}\n") - 1);
}


static u_char *
ngx_http_agent_json_app(u_char *p, ngx_http_agent_app_t *app)
{
    p = ngx_sprintf(p, "    {\n      \"name\": ");
    p = ngx_http_agent_json_string(p, &app->name);

    NGX_HTTP_AGENT_APP_SETTINGS(NGX_HTTP_AGENT_JSON_APP_ROW)

    return ngx_sprintf(p, "\n    }");
}


static u_char *
ngx_http_agent_json_env(u_char *p, ngx_array_t *env)
{
    ngx_uint_t     i;
    ngx_keyval_t  *kv;

    *p++ = '{';

    if (env) {
        kv = env->elts;

        for (i = 0; i < env->nelts; i++) {
            p = ngx_cpymem(p, i ? ", " : "", i ? 2 : 0);
            p = ngx_http_agent_json_string(p, &kv[i].key);
            *p++ = ':';
            *p++ = ' ';
            p = ngx_http_agent_json_string(p, &kv[i].value);
        }
    }

    *p++ = '}';

    return p;
}


static u_char *
ngx_http_agent_json_string(u_char *p, ngx_str_t *s)
{
    u_char      ch;
    ngx_uint_t  i;

    static u_char  hex[] = "0123456789abcdef";

    *p++ = '"';

    for (i = 0; i < s->len; i++) {
        ch = s->data[i];

        switch (ch) {

        case '"':
        case '\\':
            *p++ = '\\';
            *p++ = ch;
            break;

        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            break;

        case '\r':
            *p++ = '\\';
            *p++ = 'r';
            break;

        case '\t':
            *p++ = '\\';
            *p++ = 't';
            break;

        default:
            if (ch < 0x20 || ch == 0x7f) {
                p = ngx_cpymem(p, "\\u00", 4);
                *p++ = hex[ch >> 4];
                *p++ = hex[ch & 0xf];

            } else {
                *p++ = ch;
            }
        }
    }

    *p++ = '"';

    return p;
}


/*
 * apps.json: readers never see a half-written file.  A fresh temporary file
 * (O_EXCL|O_NOFOLLOW: never one planted, never through a symbolic link) is
 * renamed into place, which replaces a link rather than following it.
 */

static ngx_int_t
ngx_http_agent_write_file_atomically(ngx_cycle_t *cycle, ngx_str_t *dir,
    int dir_fd, u_char *data, size_t len)
{
    char      *path, *temp;
    ngx_fd_t   fd;

    path = ngx_http_agent_file_path(cycle->pool, dir, "apps.json");
    temp = ngx_http_agent_file_path(cycle->pool, dir, "apps.json.tmp");

    if (path == NULL || temp == NULL) {
        return NGX_ERROR;
    }

    fd = ngx_http_agent_create_temp(cycle, dir_fd, "apps.json.tmp", temp);
    if (fd == -1) {
        return NGX_ERROR;
    }

    if (ngx_http_agent_write_all(cycle, fd, data, len, temp) != NGX_OK) {
        ngx_http_agent_close_fd(cycle, fd);
        return NGX_ERROR;
    }

    if (close(fd) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot write \"%s\"", temp);
        return NGX_ERROR;
    }

    if (renameat(dir_fd, "apps.json.tmp", dir_fd, "apps.json") == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot rename \"%s\" to \"%s\"", temp, path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a temporary file left by a load that failed is removed, not reused */

static int
ngx_http_agent_create_temp(ngx_cycle_t *cycle, int dir_fd, char *name,
    char *path)
{
    int         fd;
    ngx_uint_t  tries;

    for (tries = 0; tries < 2; tries++) {
        /* the app table carries agent_env values, which may be secrets */
        fd = openat(dir_fd, name,
                    O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600);

        if (fd != -1 || ngx_errno != NGX_EEXIST) {
            break;
        }

        if (unlinkat(dir_fd, name, 0) == -1 && ngx_errno != NGX_ENOENT) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: cannot remove \"%s\"", path);
            return -1;
        }
    }

    if (fd == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot create \"%s\"", path);
    }

    return fd;
}


static ngx_int_t
ngx_http_agent_write_all(ngx_cycle_t *cycle, int fd, u_char *data,
    size_t len, char *path)
{
    size_t   done;
    ssize_t  n;

    for (done = 0; done < len; done += n) {
        n = write(fd, data + done, len - done);

        if (n == -1) {
            if (ngx_errno == NGX_EINTR) {
                n = 0;
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: cannot write \"%s\"", path);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


char *
ngx_http_agent_file_path(ngx_pool_t *pool, ngx_str_t *dir, char *name)
{
    u_char  *path;

    path = ngx_pnalloc(pool, dir->len + 1 + ngx_strlen(name) + 1);
    if (path == NULL) {
        return NULL;
    }

    (void) ngx_sprintf(path, "%V/%s%Z", dir, name);

    return (char *) path;
}


char *
ngx_http_agent_cstring(ngx_pool_t *pool, ngx_str_t *s)
{
    u_char  *p;

    p = ngx_pnalloc(pool, s->len + 1);
    if (p == NULL) {
        return NULL;
    }

    (void) ngx_cpystrn(p, s->data, s->len + 1);

    return (char *) p;
}


void
ngx_http_agent_close_fd(ngx_cycle_t *cycle, int fd)
{
    if (close(fd) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "agent: close(%d) failed", fd);
    }
}
