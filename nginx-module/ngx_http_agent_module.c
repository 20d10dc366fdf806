
/*
 * ngx_http_agent_module: hands requests for Python web apps to the agent
 * (see docs/protocol.md) and starts the agent when nginx loads its
 * configuration.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <sys/file.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <poll.h>


#if (NGX_HTTP_AGENT_WERROR)
/* placed after nginx's headers so that only this module's code is held to it */
#pragma GCC diagnostic error "-Wall"
#endif


#ifndef NGX_HTTP_AGENT_CORE_PYTHON
#define NGX_HTTP_AGENT_CORE_PYTHON  "python3"
#endif

#define NGX_HTTP_AGENT_START_TIMEOUT   10000      /* milliseconds */
#define NGX_HTTP_AGENT_READY_LINE_MAX  1024
#define NGX_HTTP_AGENT_KEY_MAX         1024
#define NGX_HTTP_AGENT_APP_TYPE_WSGI   1

#if defined NGX_HTTP_PROXY_TEMP_PATH
/* shares nginx's proxy temp directory, which packaged nginx already creates */
#define NGX_HTTP_AGENT_TEMP_PATH  NGX_HTTP_PROXY_TEMP_PATH
#else
#define NGX_HTTP_AGENT_TEMP_PATH  "agent_temp"
#endif


/* the settings of one app; every location naming its app root must agree */
typedef struct {
    ngx_str_t                  name;
    ngx_str_t                  app_root;
    ngx_uint_t                 app_type;
    ngx_str_t                  startup_file;
    ngx_str_t                  python;
    ngx_array_t               *env;             /* ngx_keyval_t */
    ngx_int_t                  min_instances;
    ngx_int_t                  max_instances;
    ngx_str_t                  user;
    ngx_str_t                  group;
    ngx_str_t                  default_user;
    ngx_int_t                  max_request_queue_size;
    ngx_msec_t                 max_request_queue_time;
    ngx_flag_t                 prestart;
    ngx_int_t                  memory_limit;    /* megabytes */
    ngx_int_t                  max_requests;
    ngx_msec_t                 max_request_time;
    ngx_msec_t                 shutdown_timeout;
    ngx_msec_t                 start_timeout;

    ngx_str_t                  declared_in;
} ngx_http_agent_app_t;


typedef struct {
    ngx_uint_t                 max_pool_size;
    ngx_str_t                  instance_dir;
    ngx_str_t                  log_file;
    ngx_str_t                  core_python;
    ngx_msec_t                 pool_idle_time;
    ngx_msec_t                 stat_throttle_rate;

    ngx_array_t                apps;            /* ngx_http_agent_app_t * */

    struct sockaddr_un         socket_addr;
    ngx_str_t                  socket_name;

    struct sockaddr_un         status_addr;
    ngx_str_t                  status_name;
} ngx_http_agent_main_conf_t;


typedef struct {
    ngx_http_upstream_conf_t   upstream;

    ngx_flag_t                 enabled;
    ngx_flag_t                 status;          /* agent_status */
    ngx_http_agent_app_t       settings;
    ngx_http_agent_app_t      *app;
} ngx_http_agent_loc_conf_t;


typedef struct {
    ngx_str_t                  key;
    ngx_str_t                  value;
} ngx_http_agent_var_t;


static ngx_int_t ngx_http_agent_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_is_static_file(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_status_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_pass(ngx_http_request_t *r,
    ngx_uint_t to_status);
static ngx_int_t ngx_http_agent_create_status_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_status_path(ngx_http_request_t *r,
    ngx_str_t *path);
static ngx_uint_t ngx_http_agent_status_header_is_sent(ngx_table_elt_t *h);
static ngx_int_t ngx_http_agent_create_request(ngx_http_request_t *r);
static off_t ngx_http_agent_body_length(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_collect_cgi_vars(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, off_t content_length, ngx_array_t *vars);
static ngx_int_t ngx_http_agent_add_var(ngx_array_t *vars, char *key,
    u_char *data, size_t len);
static ngx_int_t ngx_http_agent_header_is_sent(ngx_table_elt_t *h);
static u_char *ngx_http_agent_put_u32(u_char *p, uint32_t n);
static u_char *ngx_http_agent_put_header_pair(u_char *p, ngx_table_elt_t *h);
static ngx_int_t ngx_http_agent_append_body(ngx_http_request_t *r,
    ngx_buf_t *head);
static ngx_int_t ngx_http_agent_reinit_request(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_status_line(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_process_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_agent_input_filter_init(void *data);
static void ngx_http_agent_abort_request(ngx_http_request_t *r);
static void ngx_http_agent_finalize_request(ngx_http_request_t *r,
    ngx_int_t rc);

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
static char *ngx_http_agent_merge_upstream(ngx_conf_t *cf,
    ngx_http_agent_loc_conf_t *conf, ngx_http_agent_loc_conf_t *prev);
static char *ngx_http_agent_merge_settings(ngx_conf_t *cf,
    ngx_http_agent_app_t *conf, ngx_http_agent_app_t *prev);
static char *ngx_http_agent_enable_location(ngx_conf_t *cf,
    ngx_http_agent_loc_conf_t *alcf);
static ngx_int_t ngx_http_agent_parent_dir(ngx_conf_t *cf, ngx_str_t *path,
    ngx_str_t *parent);
static ngx_int_t ngx_http_agent_describe_block(ngx_conf_t *cf,
    ngx_str_t *out);
static char *ngx_http_agent_register_app(ngx_conf_t *cf,
    ngx_http_agent_loc_conf_t *alcf, ngx_http_agent_app_t *settings);
static void ngx_http_agent_merge_limits(ngx_http_agent_app_t *conf,
    ngx_http_agent_app_t *prev);
static char *ngx_http_agent_differing_setting(ngx_http_agent_app_t *a,
    ngx_http_agent_app_t *b);
static char *ngx_http_agent_differing_limit(ngx_http_agent_app_t *a,
    ngx_http_agent_app_t *b);
static ngx_uint_t ngx_http_agent_same_str(ngx_str_t *a, ngx_str_t *b);
static ngx_uint_t ngx_http_agent_same_env(ngx_array_t *a, ngx_array_t *b);
static char *ngx_http_agent_full_path(ngx_conf_t *cf, void *post, void *data);
static char *ngx_http_agent_check_at_least_one(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_agent_check_nonzero_msec(ngx_conf_t *cf, void *post,
    void *data);
static char *ngx_http_agent_app_type(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_agent_env(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void ngx_http_agent_strip_trailing_slashes(ngx_str_t *path);

static ngx_int_t ngx_http_agent_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_agent_init_process(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_agent_make_dirs(ngx_cycle_t *cycle,
    ngx_str_t *dir);
static ngx_int_t ngx_http_agent_write_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
static size_t ngx_http_agent_app_table_bound(ngx_http_agent_main_conf_t *amcf);
static u_char *ngx_http_agent_json_app_table(u_char *p,
    ngx_http_agent_main_conf_t *amcf);
static u_char *ngx_http_agent_json_app(u_char *p, ngx_http_agent_app_t *app);
static u_char *ngx_http_agent_json_app_limits(u_char *p,
    ngx_http_agent_app_t *app);
static u_char *ngx_http_agent_json_string(u_char *p, ngx_str_t *s);
static ngx_int_t ngx_http_agent_write_file_atomically(ngx_cycle_t *cycle,
    ngx_str_t *dir, char *name, u_char *data, size_t len);
static char *ngx_http_agent_file_path(ngx_pool_t *pool, ngx_str_t *dir,
    char *name);
static ngx_pid_t ngx_http_agent_running_watchdog(ngx_cycle_t *cycle,
    ngx_str_t *dir);
static ngx_pid_t ngx_http_agent_read_pid(ngx_cycle_t *cycle, ngx_fd_t fd,
    char *path);
static ngx_int_t ngx_http_agent_signal_watchdog(ngx_cycle_t *cycle,
    ngx_pid_t pid);
static ngx_int_t ngx_http_agent_start_watchdog(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
static char **ngx_http_agent_watchdog_argv(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
static char *ngx_http_agent_cstring(ngx_pool_t *pool, ngx_str_t *s);
static void ngx_http_agent_exec_watchdog(char **argv, int nginx_fd,
    int ready_fd);
static int ngx_http_agent_move_fd(int fd, int target);
static void ngx_http_agent_close_fds_from(int first);
static void ngx_http_agent_report_exec_failure(int ready_fd, char *file);
static ngx_int_t ngx_http_agent_wait_ready(ngx_cycle_t *cycle, int fd,
    ngx_pid_t pid);
static ngx_int_t ngx_http_agent_read_ready_line(ngx_cycle_t *cycle, int fd,
    u_char *line, size_t size);
static ngx_msec_int_t ngx_http_agent_now(void);
static u_char *ngx_http_agent_stop_child(ngx_cycle_t *cycle, ngx_pid_t pid);
static void ngx_http_agent_close_fd(ngx_cycle_t *cycle, int fd);


static ngx_conf_post_t  ngx_http_agent_at_least_one = {
    ngx_http_agent_check_at_least_one
};

static ngx_conf_post_t  ngx_http_agent_nonzero_msec = {
    ngx_http_agent_check_nonzero_msec
};

static ngx_conf_post_t  ngx_http_agent_full_path_post = {
    ngx_http_agent_full_path
};

static ngx_conf_enum_t  ngx_http_agent_app_types[] = {
    { ngx_string("wsgi"), NGX_HTTP_AGENT_APP_TYPE_WSGI },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_agent_commands[] = {

    { ngx_string("agent_max_pool_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, max_pool_size),
      &ngx_http_agent_at_least_one },

    { ngx_string("agent_instance_dir"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, instance_dir),
      &ngx_http_agent_full_path_post },

    { ngx_string("agent_log_file"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, log_file),
      &ngx_http_agent_full_path_post },

    { ngx_string("agent_core_python"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, core_python),
      NULL },

    { ngx_string("agent_pool_idle_time"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, pool_idle_time),
      NULL },

    { ngx_string("agent_stat_throttle_rate"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_agent_main_conf_t, stat_throttle_rate),
      NULL },

    { ngx_string("agent_enabled"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, enabled),
      NULL },

    { ngx_string("agent_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_http_agent_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, status),
      NULL },

    { ngx_string("agent_app_root"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.app_root),
      &ngx_http_agent_full_path_post },

    { ngx_string("agent_app_type"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_agent_app_type,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.app_type),
      &ngx_http_agent_app_types },

    { ngx_string("agent_startup_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.startup_file),
      NULL },

    { ngx_string("agent_python"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.python),
      NULL },

    { ngx_string("agent_env"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE2,
      ngx_http_agent_env,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.env),
      NULL },

    { ngx_string("agent_min_instances"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.min_instances),
      NULL },

    { ngx_string("agent_max_instances"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.max_instances),
      NULL },

    { ngx_string("agent_user"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.user),
      NULL },

    { ngx_string("agent_group"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.group),
      NULL },

    { ngx_string("agent_default_user"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.default_user),
      NULL },

    { ngx_string("agent_max_request_queue_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.max_request_queue_size),
      NULL },

    { ngx_string("agent_max_request_queue_time"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.max_request_queue_time),
      NULL },

    { ngx_string("agent_prestart"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.prestart),
      NULL },

    { ngx_string("agent_memory_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.memory_limit),
      NULL },

    { ngx_string("agent_max_requests"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.max_requests),
      NULL },

    { ngx_string("agent_max_request_time"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.max_request_time),
      NULL },

    { ngx_string("agent_shutdown_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.shutdown_timeout),
      &ngx_http_agent_nonzero_msec },

    { ngx_string("agent_start_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, settings.start_timeout),
      &ngx_http_agent_nonzero_msec },

    { ngx_string("agent_buffer_response"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, upstream.buffering),
      NULL },

    { ngx_string("agent_read_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, upstream.read_timeout),
      NULL },

    { ngx_string("agent_send_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, upstream.send_timeout),
      NULL },

    { ngx_string("agent_connect_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, upstream.connect_timeout),
      NULL },

    { ngx_string("agent_temp_path"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1234,
      ngx_conf_set_path_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_agent_loc_conf_t, upstream.temp_path),
      NULL },

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
    NULL,                                  /* exit process */
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


/*
 * The write end of the pipe whose other end is the watchdog's fd 3.  Only
 * the master keeps it: its close, when nginx stops, tells the agent to stop.
 */
static int  ngx_http_agent_nginx_fd = -1;


/* request handling */

static ngx_int_t
ngx_http_agent_handler(ngx_http_request_t *r)
{
    ngx_int_t  rc;

    rc = ngx_http_agent_is_static_file(r);

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc == 1) {
        /* nginx's index and static handlers serve it instead */
        return NGX_DECLINED;
    }

    return ngx_http_agent_pass(r, 0);
}


/* a location with "agent_status on": every request goes to status.sock */

static ngx_int_t
ngx_http_agent_status_handler(ngx_http_request_t *r)
{
    return ngx_http_agent_pass(r, 1);
}


/*
 * Returns 1 when the URI names a regular file under root, or ends in "/"
 * and the directory holds index.html; 0 otherwise.  Only GET and HEAD are
 * served from disk: any other method on such a path belongs to the app.
 */

static ngx_int_t
ngx_http_agent_is_static_file(ngx_http_request_t *r)
{
    size_t                     root;
    u_char                    *last;
    ngx_str_t                  path;
    ngx_open_file_info_t       of;
    ngx_http_core_loc_conf_t  *clcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return 0;
    }

    last = ngx_http_map_uri_to_path(r, &path, &root,
                                    sizeof("index.html") - 1);
    if (last == NULL) {
        return NGX_ERROR;
    }

    if (r->uri.len && r->uri.data[r->uri.len - 1] == '/') {
        last = ngx_cpystrn(last, (u_char *) "index.html",
                           sizeof("index.html"));
    }

    path.len = last - path.data;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    ngx_memzero(&of, sizeof(ngx_open_file_info_t));

    of.read_ahead = clcf->read_ahead;
    of.directio = clcf->directio;
    of.valid = clcf->open_file_cache_valid;
    of.min_uses = clcf->open_file_cache_min_uses;
    of.test_only = 1;
    of.errors = clcf->open_file_cache_errors;
    of.events = clcf->open_file_cache_events;

    if (ngx_http_set_disable_symlinks(r, clcf, &path, &of) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_open_cached_file(clcf->open_file_cache, &path, &of, r->pool)
        != NGX_OK)
    {
        /* of.err is 0 only when memory ran out */
        return of.err ? 0 : NGX_ERROR;
    }

    return of.is_file ? 1 : 0;
}


/*
 * The app's requests travel as request frames to agent.sock; a status
 * location's as plain HTTP to status.sock.  Both answer with an HTTP status
 * line and headers, so the response side is shared.
 */

static ngx_int_t
ngx_http_agent_pass(ngx_http_request_t *r, ngx_uint_t to_status)
{
    ngx_int_t                    rc;
    ngx_http_status_t           *status;
    ngx_http_upstream_t         *u;
    ngx_http_agent_loc_conf_t   *alcf;
    ngx_http_agent_main_conf_t  *amcf;

    if (ngx_http_upstream_create(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    status = ngx_pcalloc(r->pool, sizeof(ngx_http_status_t));
    if (status == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_set_ctx(r, status, ngx_http_agent_module);

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);
    amcf = ngx_http_get_module_main_conf(r, ngx_http_agent_module);

    u = r->upstream;

    u->output.tag = (ngx_buf_tag_t) &ngx_http_agent_module;
    u->conf = &alcf->upstream;

    u->resolved = ngx_pcalloc(r->pool, sizeof(ngx_http_upstream_resolved_t));
    if (u->resolved == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    u->resolved->socklen = sizeof(struct sockaddr_un);
    u->resolved->naddrs = 1;
    u->resolved->no_port = 1;

    if (to_status) {
        ngx_str_set(&u->schema, "agent-status://");
        u->resolved->sockaddr = (struct sockaddr *) &amcf->status_addr;
        u->resolved->name = amcf->status_name;
        u->resolved->host = amcf->status_name;
        u->create_request = ngx_http_agent_create_status_request;

    } else {
        ngx_str_set(&u->schema, "agent://");
        u->resolved->sockaddr = (struct sockaddr *) &amcf->socket_addr;
        u->resolved->name = amcf->socket_name;
        u->resolved->host = amcf->socket_name;
        u->create_request = ngx_http_agent_create_request;
    }

    u->reinit_request = ngx_http_agent_reinit_request;
    u->process_header = ngx_http_agent_process_status_line;
    u->abort_request = ngx_http_agent_abort_request;
    u->finalize_request = ngx_http_agent_finalize_request;
    r->state = 0;

    u->buffering = alcf->upstream.buffering;

    u->pipe = ngx_pcalloc(r->pool, sizeof(ngx_event_pipe_t));
    if (u->pipe == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    u->pipe->input_filter = ngx_event_pipe_copy_input_filter;
    u->pipe->input_ctx = r;

    u->input_filter_init = ngx_http_agent_input_filter_init;
    u->input_filter = ngx_http_upstream_non_buffered_filter;
    u->input_filter_ctx = r;

    /*
     * The frame (or the status request's Content-Length) states the body's
     * length, so the whole body is read first.
     */
    rc = ngx_http_read_client_request_body(r, ngx_http_upstream_init);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_http_agent_create_request(ngx_http_request_t *r)
{
    off_t                       content_length;
    size_t                      vars_size;
    u_char                     *p;
    ngx_buf_t                  *b;
    ngx_uint_t                  i;
    ngx_array_t                 vars;
    ngx_list_part_t            *part;
    ngx_table_elt_t            *h;
    ngx_http_agent_var_t       *var;
    ngx_http_agent_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_agent_module);

    content_length = ngx_http_agent_body_length(r);

    if (ngx_array_init(&vars, r->pool, 16, sizeof(ngx_http_agent_var_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_agent_collect_cgi_vars(r, alcf, content_length, &vars)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    vars_size = 0;
    var = vars.elts;

    for (i = 0; i < vars.nelts; i++) {
        vars_size += 4 + var[i].key.len + 4 + var[i].value.len;
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_agent_header_is_sent(&h[i])) {
            vars_size += 4 + sizeof("HTTP_") - 1 + h[i].key.len
                         + 4 + h[i].value.len;
        }
    }

    if (vars_size > NGX_MAX_UINT32_VALUE) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: request headers too large for a frame");
        return NGX_ERROR;
    }

    b = ngx_create_temp_buf(r->pool, 4 + vars_size);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_http_agent_put_u32(b->last, (uint32_t) vars_size);

    for (i = 0; i < vars.nelts; i++) {
        p = ngx_http_agent_put_u32(p, (uint32_t) var[i].key.len);
        p = ngx_cpymem(p, var[i].key.data, var[i].key.len);
        p = ngx_http_agent_put_u32(p, (uint32_t) var[i].value.len);
        p = ngx_cpymem(p, var[i].value.data, var[i].value.len);
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_agent_header_is_sent(&h[i])) {
            p = ngx_http_agent_put_header_pair(p, &h[i]);
        }
    }

    b->last = p;

    return ngx_http_agent_append_body(r, b);
}


/*
 * "METHOD /path?args HTTP/1.0" with the few headers the status socket reads
 * (docs/status-api.md): HTTP/1.0, so that the status socket closes the
 * connection when its response is done and nginx needs no keep-alive state.
 */

static ngx_int_t
ngx_http_agent_create_status_request(ngx_http_request_t *r)
{
    off_t             content_length;
    size_t            len;
    u_char           *p;
    ngx_buf_t        *b;
    ngx_str_t         path;
    ngx_uint_t        i, escape;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (ngx_http_agent_status_path(r, &path) != NGX_OK) {
        return NGX_ERROR;
    }

    /* r->uri is decoded; the request line needs it encoded again */
    escape = 2 * ngx_escape_uri(NULL, path.data, path.len, NGX_ESCAPE_URI);

    content_length = ngx_http_agent_body_length(r);

    len = r->method_name.len + 1 + path.len + escape
          + (r->args.len ? 1 + r->args.len : 0)
          + sizeof(" HTTP/1.0" CRLF) - 1
          + sizeof("Content-Length: " CRLF) - 1 + NGX_OFF_T_LEN
          + sizeof(CRLF) - 1;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_agent_status_header_is_sent(&h[i])) {
            len += h[i].key.len + sizeof(": " CRLF) - 1 + h[i].value.len;
        }
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(b->last, r->method_name.data, r->method_name.len);
    *p++ = ' ';

    if (escape) {
        p = (u_char *) ngx_escape_uri(p, path.data, path.len,
                                      NGX_ESCAPE_URI);

    } else {
        p = ngx_cpymem(p, path.data, path.len);
    }

    if (r->args.len) {
        *p++ = '?';
        p = ngx_cpymem(p, r->args.data, r->args.len);
    }

    p = ngx_cpymem(p, " HTTP/1.0" CRLF, sizeof(" HTTP/1.0" CRLF) - 1);

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (ngx_http_agent_status_header_is_sent(&h[i])) {
            p = ngx_cpymem(p, h[i].key.data, h[i].key.len);
            *p++ = ':'; *p++ = ' ';
            p = ngx_cpymem(p, h[i].value.data, h[i].value.len);
            *p++ = CR; *p++ = LF;
        }
    }

    /* stated by nginx, not passed through: a chunked body arrives decoded */
    p = ngx_sprintf(p, "Content-Length: %O" CRLF CRLF, content_length);

    b->last = p;

    return ngx_http_agent_append_body(r, b);
}


/*
 * The path the status socket sees: the URI without the location's prefix,
 * so that "location /agent/" serves /agent/pool as /pool.  A regex or a
 * named location has no prefix to strip, nor has a URI a rewrite moved out
 * of the prefix; those go as they are.
 */

static ngx_int_t
ngx_http_agent_status_path(ngx_http_request_t *r, ngx_str_t *path)
{
    ngx_str_t                  rest;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    rest = r->uri;

    if (!clcf->named
#if (NGX_PCRE)
        && clcf->regex == NULL
#endif
        && clcf->name.len <= r->uri.len
        && ngx_strncmp(r->uri.data, clcf->name.data, clcf->name.len) == 0)
    {
        rest.data += clcf->name.len;
        rest.len -= clcf->name.len;
    }

    if (rest.len && rest.data[0] == '/') {
        *path = rest;
        return NGX_OK;
    }

    path->len = rest.len + 1;

    path->data = ngx_pnalloc(r->pool, path->len);
    if (path->data == NULL) {
        return NGX_ERROR;
    }

    path->data[0] = '/';
    ngx_memcpy(path->data + 1, rest.data, rest.len);

    return NGX_OK;
}


/*
 * Authorization carries the status tokens; Accept picks JSON or msgpack;
 * Host is harmless.  Nothing else reaches the status socket: it neither
 * needs nor should see the client's cookies.  Only a Bearer Authorization
 * is passed: any other scheme (auth_basic's credentials) is nginx's own
 * business, and the status socket would answer it as a wrong token.
 */

static ngx_uint_t
ngx_http_agent_status_header_is_sent(ngx_table_elt_t *h)
{
    static ngx_str_t  names[] = {
        ngx_string("Host"),
        ngx_string("Accept"),
        ngx_string("Authorization"),
        ngx_null_string
    };

    ngx_str_t  *name;

    if (h->hash == 0) {
        return 0;
    }

    for (name = names; name->len; name++) {
        if (h->key.len == name->len
            && ngx_strncasecmp(h->key.data, name->data, name->len) == 0)
        {
            break;
        }
    }

    if (name->len == 0) {
        return 0;
    }

    if (name == &names[2]) {
        return h->value.len > sizeof("Bearer ") - 1
               && ngx_strncasecmp(h->value.data, (u_char *) "Bearer ",
                                  sizeof("Bearer ") - 1) == 0;
    }

    return 1;
}


/* the length of the body as nginx holds it: a chunked body already decoded */

static off_t
ngx_http_agent_body_length(ngx_http_request_t *r)
{
    off_t         len;
    ngx_chain_t  *cl;

    len = 0;

    for (cl = r->upstream->request_bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    return len;
}


static ngx_int_t
ngx_http_agent_collect_cgi_vars(ngx_http_request_t *r,
    ngx_http_agent_loc_conf_t *alcf, off_t content_length, ngx_array_t *vars)
{
    u_char                     *p;
    ngx_str_t                   server_name, protocol;
    ngx_connection_t           *c;
    ngx_http_core_srv_conf_t   *cscf;

    c = r->connection;

    if (ngx_connection_local_sockaddr(c, NULL, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    cscf = ngx_http_get_module_srv_conf(r, ngx_http_core_module);

    server_name = cscf->server_name;

    if (server_name.len == 0 && r->headers_in.server.len) {
        server_name = r->headers_in.server;
    }

    protocol = r->http_protocol;

    if (protocol.len == 0) {
        ngx_str_set(&protocol, "HTTP/0.9");
    }

    /* room for the three decimal numbers below */
    p = ngx_pnalloc(r->pool, NGX_OFF_T_LEN + 2 * NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_agent_add_var(vars, "AGENT_APP", alcf->app->name.data,
                               alcf->app->name.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "REQUEST_METHOD",
                                  r->method_name.data, r->method_name.len)
           != NGX_OK
        || ngx_http_agent_add_var(vars, "REQUEST_URI", r->unparsed_uri.data,
                                  r->unparsed_uri.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "PATH_INFO", r->uri.data, r->uri.len)
           != NGX_OK
        || ngx_http_agent_add_var(vars, "QUERY_STRING", r->args.data,
                                  r->args.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "SCRIPT_NAME", NULL, 0) != NGX_OK
        || ngx_http_agent_add_var(vars, "SERVER_NAME", server_name.data,
                                  server_name.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "SERVER_PROTOCOL", protocol.data,
                                  protocol.len) != NGX_OK
        || ngx_http_agent_add_var(vars, "REMOTE_ADDR", c->addr_text.data,
                                  c->addr_text.len) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_agent_add_var(vars, "SERVER_PORT", p,
            ngx_sprintf(p, "%ui", (ngx_uint_t)
                        ngx_inet_get_port(c->local_sockaddr)) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += NGX_INT_T_LEN;

    if (ngx_http_agent_add_var(vars, "REMOTE_PORT", p,
            ngx_sprintf(p, "%ui", (ngx_uint_t)
                        ngx_inet_get_port(c->sockaddr)) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    p += NGX_INT_T_LEN;

    if (ngx_http_agent_add_var(vars, "CONTENT_LENGTH", p,
                               ngx_sprintf(p, "%O", content_length) - p)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (r->headers_in.content_type
        && ngx_http_agent_add_var(vars, "CONTENT_TYPE",
                                  r->headers_in.content_type->value.data,
                                  r->headers_in.content_type->value.len)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

#if (NGX_SSL || NGX_COMPAT)
    if (c->ssl
        && ngx_http_agent_add_var(vars, "HTTPS", (u_char *) "on", 2)
           != NGX_OK)
    {
        return NGX_ERROR;
    }
#endif

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_add_var(ngx_array_t *vars, char *key, u_char *data, size_t len)
{
    ngx_http_agent_var_t  *var;

    var = ngx_array_push(vars);
    if (var == NULL) {
        return NGX_ERROR;
    }

    var->key.data = (u_char *) key;
    var->key.len = ngx_strlen(key);
    var->value.data = data;
    var->value.len = len;

    return NGX_OK;
}


/*
 * Content-Type and Content-Length travel as CGI variables only.  A name
 * that would not become a valid frame key ([A-Z0-9_], at most 1024 bytes)
 * is left out rather than make the whole frame malformed.
 */

static ngx_int_t
ngx_http_agent_header_is_sent(ngx_table_elt_t *h)
{
    u_char      ch;
    ngx_uint_t  i;

    if (h->hash == 0) {
        return 0;
    }

    if ((h->key.len == sizeof("Content-Type") - 1
         && ngx_strncasecmp(h->key.data, (u_char *) "Content-Type",
                            h->key.len) == 0)
        || (h->key.len == sizeof("Content-Length") - 1
            && ngx_strncasecmp(h->key.data, (u_char *) "Content-Length",
                               h->key.len) == 0))
    {
        return 0;
    }

    if (h->key.len == 0
        || h->key.len > NGX_HTTP_AGENT_KEY_MAX - (sizeof("HTTP_") - 1))
    {
        return 0;
    }

    for (i = 0; i < h->key.len; i++) {
        ch = h->key.data[i];

        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
              || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_'))
        {
            return 0;
        }
    }

    return 1;
}


static u_char *
ngx_http_agent_put_u32(u_char *p, uint32_t n)
{
    *p++ = (u_char) (n >> 24);
    *p++ = (u_char) (n >> 16);
    *p++ = (u_char) (n >> 8);
    *p++ = (u_char) n;

    return p;
}


static u_char *
ngx_http_agent_put_header_pair(u_char *p, ngx_table_elt_t *h)
{
    u_char      ch;
    ngx_uint_t  i;

    p = ngx_http_agent_put_u32(p, (uint32_t) (sizeof("HTTP_") - 1
                                              + h->key.len));
    p = ngx_cpymem(p, "HTTP_", sizeof("HTTP_") - 1);

    for (i = 0; i < h->key.len; i++) {
        ch = h->key.data[i];

        if (ch >= 'a' && ch <= 'z') {
            ch &= ~0x20;

        } else if (ch == '-') {
            ch = '_';
        }

        *p++ = ch;
    }

    p = ngx_http_agent_put_u32(p, (uint32_t) h->value.len);

    return ngx_cpymem(p, h->value.data, h->value.len);
}


/*
 * The request to send: head (the frame, or the status request's head)
 * followed by the body.  The body buffers are described anew, not shared:
 * sending moves their positions, and the originals must stay intact should
 * the request be sent again.
 */

static ngx_int_t
ngx_http_agent_append_body(ngx_http_request_t *r, ngx_buf_t *head)
{
    ngx_buf_t    *b;
    ngx_chain_t  *body, *cl;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = head;

    body = r->upstream->request_bufs;
    r->upstream->request_bufs = cl;

    for ( /* void */ ; body; body = body->next) {

        b = ngx_alloc_buf(r->pool);
        if (b == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(b, body->buf, sizeof(ngx_buf_t));

        cl->next = ngx_alloc_chain_link(r->pool);
        if (cl->next == NULL) {
            return NGX_ERROR;
        }

        cl = cl->next;
        cl->buf = b;
    }

    cl->next = NULL;

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_reinit_request(ngx_http_request_t *r)
{
    ngx_http_status_t  *status;

    status = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (status == NULL) {
        return NGX_OK;
    }

    status->code = 0;
    status->count = 0;
    status->start = NULL;
    status->end = NULL;

    r->upstream->process_header = ngx_http_agent_process_status_line;
    r->state = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_process_status_line(ngx_http_request_t *r)
{
    size_t                len;
    ngx_int_t             rc;
    ngx_http_status_t    *status;
    ngx_http_upstream_t  *u;

    status = ngx_http_get_module_ctx(r, ngx_http_agent_module);

    if (status == NULL) {
        return NGX_ERROR;
    }

    u = r->upstream;

    rc = ngx_http_parse_status_line(r, &u->buffer, status);

    if (rc == NGX_AGAIN) {
        return rc;
    }

    if (rc == NGX_ERROR) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the agent sent no valid status line");
        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }

    if (u->state && u->state->status == 0) {
        u->state->status = status->code;
    }

    u->headers_in.status_n = status->code;

    len = status->end - status->start;
    u->headers_in.status_line.len = len;

    u->headers_in.status_line.data = ngx_pnalloc(r->pool, len);
    if (u->headers_in.status_line.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(u->headers_in.status_line.data, status->start, len);

    u->process_header = ngx_http_agent_process_header;

    return ngx_http_agent_process_header(r);
}


static ngx_int_t
ngx_http_agent_process_header(ngx_http_request_t *r)
{
    ngx_int_t                       rc;
    ngx_table_elt_t                *h;
    ngx_http_upstream_t            *u;
    ngx_http_upstream_header_t     *hh;
    ngx_http_upstream_main_conf_t  *umcf;

    umcf = ngx_http_get_module_main_conf(r, ngx_http_upstream_module);
    u = r->upstream;

    for ( ;; ) {

        rc = ngx_http_parse_header_line(r, &u->buffer, 1);

        if (rc == NGX_OK) {

            h = ngx_list_push(&u->headers_in.headers);
            if (h == NULL) {
                return NGX_ERROR;
            }

            h->hash = r->header_hash;

            h->key.len = r->header_name_end - r->header_name_start;
            h->value.len = r->header_end - r->header_start;

            h->key.data = ngx_pnalloc(r->pool,
                                      h->key.len + 1 + h->value.len + 1
                                      + h->key.len);
            if (h->key.data == NULL) {
                h->hash = 0;
                return NGX_ERROR;
            }

            h->value.data = h->key.data + h->key.len + 1;
            h->lowcase_key = h->key.data + h->key.len + 1 + h->value.len + 1;

            ngx_memcpy(h->key.data, r->header_name_start, h->key.len);
            h->key.data[h->key.len] = '\0';
            ngx_memcpy(h->value.data, r->header_start, h->value.len);
            h->value.data[h->value.len] = '\0';

            if (h->key.len == r->lowcase_index) {
                ngx_memcpy(h->lowcase_key, r->lowcase_header, h->key.len);

            } else {
                ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
            }

            hh = ngx_hash_find(&umcf->headers_in_hash, h->hash,
                               h->lowcase_key, h->key.len);

            if (hh) {
                rc = hh->handler(r, h, hh->offset);

                if (rc != NGX_OK) {
                    return rc;
                }
            }

            continue;
        }

        if (rc == NGX_HTTP_PARSE_HEADER_DONE) {

            if (u->headers_in.status_n == NGX_HTTP_SWITCHING_PROTOCOLS
                && r->headers_in.upgrade)
            {
                u->upgrade = 1;
            }

            return NGX_OK;
        }

        if (rc == NGX_AGAIN) {
            return NGX_AGAIN;
        }

        /* rc == NGX_HTTP_PARSE_INVALID_HEADER */

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "agent: the agent sent an invalid header: "
                      "\"%*s\\x%02xd...\"",
                      r->header_end - r->header_name_start,
                      r->header_name_start, *r->header_end);

        return NGX_HTTP_UPSTREAM_INVALID_HEADER;
    }
}


static ngx_int_t
ngx_http_agent_input_filter_init(void *data)
{
    ngx_http_request_t   *r = data;
    ngx_http_upstream_t  *u;

    u = r->upstream;

    if (u->headers_in.status_n == NGX_HTTP_NO_CONTENT
        || u->headers_in.status_n == NGX_HTTP_NOT_MODIFIED)
    {
        u->pipe->length = 0;
        u->length = 0;

    } else if (r->method == NGX_HTTP_HEAD) {
        u->pipe->length = -1;
        u->length = -1;

    } else {
        u->pipe->length = u->headers_in.content_length_n;
        u->length = u->headers_in.content_length_n;
    }

    return NGX_OK;
}


static void
ngx_http_agent_abort_request(ngx_http_request_t *r)
{
    return;
}


static void
ngx_http_agent_finalize_request(ngx_http_request_t *r, ngx_int_t rc)
{
    return;
}


/* configuration */

static void *
ngx_http_agent_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_agent_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_agent_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    amcf->max_pool_size = NGX_CONF_UNSET_UINT;
    amcf->pool_idle_time = NGX_CONF_UNSET_MSEC;
    amcf->stat_throttle_rate = NGX_CONF_UNSET_MSEC;

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

    uint32_t  crc;

    ngx_conf_init_uint_value(amcf->max_pool_size, 6);
    ngx_conf_init_msec_value(amcf->pool_idle_time, 300000);
    ngx_conf_init_msec_value(amcf->stat_throttle_rate, 10000);

    if (amcf->core_python.data == NULL) {
        ngx_str_set(&amcf->core_python, NGX_HTTP_AGENT_CORE_PYTHON);
    }

    if (amcf->instance_dir.data == NULL) {
        /* one instance per nginx configuration file */
        crc = ngx_crc32_short(cf->cycle->conf_file.data,
                              cf->cycle->conf_file.len);

        amcf->instance_dir.data = ngx_pnalloc(cf->pool,
                                              sizeof("/tmp/agent-12345678"));
        if (amcf->instance_dir.data == NULL) {
            return NGX_CONF_ERROR;
        }

        amcf->instance_dir.len = ngx_sprintf(amcf->instance_dir.data,
                                             "/tmp/agent-%08xD%Z", crc)
                                 - amcf->instance_dir.data - 1;
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
     *     conf->settings.app_root = { 0, NULL };  and the other strings
     *     conf->upstream.temp_path = NULL;
     *     conf->upstream.hide_headers_hash = { NULL, 0 };
     *     conf->app = NULL;
     */

    conf->enabled = NGX_CONF_UNSET;
    conf->status = NGX_CONF_UNSET;

    conf->settings.app_type = NGX_CONF_UNSET_UINT;
    conf->settings.env = NGX_CONF_UNSET_PTR;
    conf->settings.min_instances = NGX_CONF_UNSET;
    conf->settings.max_instances = NGX_CONF_UNSET;
    conf->settings.max_request_queue_size = NGX_CONF_UNSET;
    conf->settings.max_request_queue_time = NGX_CONF_UNSET_MSEC;
    conf->settings.prestart = NGX_CONF_UNSET;
    conf->settings.memory_limit = NGX_CONF_UNSET;
    conf->settings.max_requests = NGX_CONF_UNSET;
    conf->settings.max_request_time = NGX_CONF_UNSET_MSEC;
    conf->settings.shutdown_timeout = NGX_CONF_UNSET_MSEC;
    conf->settings.start_timeout = NGX_CONF_UNSET_MSEC;

    conf->upstream.buffering = NGX_CONF_UNSET;
    conf->upstream.connect_timeout = NGX_CONF_UNSET_MSEC;
    conf->upstream.send_timeout = NGX_CONF_UNSET_MSEC;
    conf->upstream.read_timeout = NGX_CONF_UNSET_MSEC;
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
    conf->upstream.buffer_size = 8 * 1024;
    conf->upstream.bufs.num = 8;
    conf->upstream.bufs.size = 8 * 1024;
    conf->upstream.busy_buffers_size = 16 * 1024;
    conf->upstream.temp_file_write_size = 16 * 1024;
    conf->upstream.max_temp_file_size = 1024 * 1024 * 1024;
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

    ngx_conf_merge_value(conf->enabled, prev->enabled, 0);

    if (ngx_http_agent_merge_upstream(cf, conf, prev) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_agent_merge_settings(cf, &conf->settings, &prev->settings)
        != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->enabled) {
        return ngx_http_agent_enable_location(cf, conf);
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_agent_merge_upstream(ngx_conf_t *cf, ngx_http_agent_loc_conf_t *conf,
    ngx_http_agent_loc_conf_t *prev)
{
    ngx_hash_init_t  hash;

    ngx_conf_merge_value(conf->upstream.buffering,
                         prev->upstream.buffering, 1);

    ngx_conf_merge_msec_value(conf->upstream.connect_timeout,
                              prev->upstream.connect_timeout, 60000);

    ngx_conf_merge_msec_value(conf->upstream.send_timeout,
                              prev->upstream.send_timeout, 60000);

    ngx_conf_merge_msec_value(conf->upstream.read_timeout,
                              prev->upstream.read_timeout, 600000);

    if (ngx_conf_merge_path_value(cf, &conf->upstream.temp_path,
                                  prev->upstream.temp_path,
                                  &ngx_http_agent_temp_path)
        != NGX_CONF_OK)
    {
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

    return NGX_CONF_OK;
}


static char *
ngx_http_agent_merge_settings(ngx_conf_t *cf, ngx_http_agent_app_t *conf,
    ngx_http_agent_app_t *prev)
{
    /* no default here: an unset app root is derived per location from root */
    if (conf->app_root.data == NULL) {
        conf->app_root = prev->app_root;
    }

    ngx_conf_merge_uint_value(conf->app_type, prev->app_type,
                              NGX_HTTP_AGENT_APP_TYPE_WSGI);
    ngx_conf_merge_str_value(conf->startup_file, prev->startup_file,
                             "wsgi.py");
    ngx_conf_merge_str_value(conf->python, prev->python, "/usr/bin/python3");
    ngx_conf_merge_ptr_value(conf->env, prev->env, NULL);
    ngx_conf_merge_value(conf->min_instances, prev->min_instances, 1);
    ngx_conf_merge_value(conf->max_instances, prev->max_instances, 0);
    ngx_conf_merge_str_value(conf->user, prev->user, "");
    ngx_conf_merge_str_value(conf->group, prev->group, "");
    ngx_conf_merge_str_value(conf->default_user, prev->default_user,
                             "nobody");
    ngx_http_agent_merge_limits(conf, prev);

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


/* 0 means "no limit" for each of these but the two timeouts */

static void
ngx_http_agent_merge_limits(ngx_http_agent_app_t *conf,
    ngx_http_agent_app_t *prev)
{
    ngx_conf_merge_value(conf->max_request_queue_size,
                         prev->max_request_queue_size, 100);
    ngx_conf_merge_msec_value(conf->max_request_queue_time,
                              prev->max_request_queue_time, 0);
    ngx_conf_merge_value(conf->prestart, prev->prestart, 0);
    ngx_conf_merge_value(conf->memory_limit, prev->memory_limit, 0);
    ngx_conf_merge_value(conf->max_requests, prev->max_requests, 0);
    ngx_conf_merge_msec_value(conf->max_request_time, prev->max_request_time,
                              0);
    ngx_conf_merge_msec_value(conf->shutdown_timeout, prev->shutdown_timeout,
                              60000);
    ngx_conf_merge_msec_value(conf->start_timeout, prev->start_timeout,
                              90000);
}


static char *
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
    if (!ngx_http_agent_same_str(&a->app_root, &b->app_root)) {
        return "agent_app_root";
    }

    if (a->app_type != b->app_type) {
        return "agent_app_type";
    }

    if (!ngx_http_agent_same_str(&a->startup_file, &b->startup_file)) {
        return "agent_startup_file";
    }

    if (!ngx_http_agent_same_str(&a->python, &b->python)) {
        return "agent_python";
    }

    if (!ngx_http_agent_same_env(a->env, b->env)) {
        return "agent_env";
    }

    if (a->min_instances != b->min_instances) {
        return "agent_min_instances";
    }

    if (a->max_instances != b->max_instances) {
        return "agent_max_instances";
    }

    if (!ngx_http_agent_same_str(&a->user, &b->user)) {
        return "agent_user";
    }

    if (!ngx_http_agent_same_str(&a->group, &b->group)) {
        return "agent_group";
    }

    if (!ngx_http_agent_same_str(&a->default_user, &b->default_user)) {
        return "agent_default_user";
    }

    return ngx_http_agent_differing_limit(a, b);
}


static char *
ngx_http_agent_differing_limit(ngx_http_agent_app_t *a,
    ngx_http_agent_app_t *b)
{
    if (a->max_request_queue_size != b->max_request_queue_size) {
        return "agent_max_request_queue_size";
    }

    if (a->max_request_queue_time != b->max_request_queue_time) {
        return "agent_max_request_queue_time";
    }

    if (a->prestart != b->prestart) {
        return "agent_prestart";
    }

    if (a->memory_limit != b->memory_limit) {
        return "agent_memory_limit";
    }

    if (a->max_requests != b->max_requests) {
        return "agent_max_requests";
    }

    if (a->max_request_time != b->max_request_time) {
        return "agent_max_request_time";
    }

    if (a->shutdown_timeout != b->shutdown_timeout) {
        return "agent_shutdown_timeout";
    }

    if (a->start_timeout != b->start_timeout) {
        return "agent_start_timeout";
    }

    return NULL;
}


static ngx_uint_t
ngx_http_agent_same_str(ngx_str_t *a, ngx_str_t *b)
{
    return a->len == b->len && ngx_strncmp(a->data, b->data, a->len) == 0;
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


/* relative paths are taken from nginx's prefix, as nginx does for its own */

static char *
ngx_http_agent_full_path(ngx_conf_t *cf, void *post, void *data)
{
    ngx_str_t  *path = data;

    if (path->len == 0) {
        return "must not be empty";
    }

    if (ngx_conf_full_name(cf->cycle, path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_http_agent_strip_trailing_slashes(path);

    return NGX_CONF_OK;
}


static void
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


/* nginx's enum slot would not name the directive in its message */

static char *
ngx_http_agent_app_type(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *p = conf;

    ngx_str_t        *value;
    ngx_uint_t       *type, i;
    ngx_conf_enum_t  *e;

    type = (ngx_uint_t *) (p + cmd->offset);

    if (*type != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    for (e = cmd->post, i = 0; e[i].name.len != 0; i++) {
        if (e[i].name.len == value[1].len
            && ngx_strcasecmp(e[i].name.data, value[1].data) == 0)
        {
            *type = e[i].value;
            return NGX_CONF_OK;
        }
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" directive, "
                       "only \"wsgi\" is supported", &value[1], &cmd->name);

    return NGX_CONF_ERROR;
}


/*
 * "agent_status on" makes the location a door to the status socket, as
 * proxy_pass makes one to a proxied server: the location's handler is set
 * here, once, and agent_enabled inherited into the location then stands
 * aside (ngx_http_agent_enable_location).
 */

static char *
ngx_http_agent_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
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
ngx_http_agent_env(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
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


/* starting the agent (docs/protocol.md, section 4) */

static ngx_int_t
ngx_http_agent_init_module(ngx_cycle_t *cycle)
{
    ngx_pid_t                    pid;
    ngx_http_agent_main_conf_t  *amcf;

    if (ngx_test_config || ngx_process == NGX_PROCESS_SIGNALLER) {
        return NGX_OK;
    }

    amcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_agent_module);

    if (amcf == NULL || amcf->apps.nelts == 0) {
        return NGX_OK;
    }

    if (ngx_http_agent_make_dirs(cycle, &amcf->instance_dir) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_agent_write_app_table(cycle, amcf) != NGX_OK) {
        return NGX_ERROR;
    }

    pid = ngx_http_agent_running_watchdog(cycle, &amcf->instance_dir);

    if (pid == NGX_INVALID_PID) {
        return NGX_ERROR;
    }

    if (pid > 0) {
        return ngx_http_agent_signal_watchdog(cycle, pid);
    }

    return ngx_http_agent_start_watchdog(cycle, amcf);
}


/*
 * Workers drop the master's end of the pipe so that only the master's exit
 * is seen by the agent as nginx stopping.  Without a master (master_process
 * off) the single process keeps it.
 */

static ngx_int_t
ngx_http_agent_init_process(ngx_cycle_t *cycle)
{
    if (ngx_process == NGX_PROCESS_WORKER && ngx_http_agent_nginx_fd != -1) {
        ngx_http_agent_close_fd(cycle, ngx_http_agent_nginx_fd);
        ngx_http_agent_nginx_fd = -1;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_make_dirs(ngx_cycle_t *cycle, ngx_str_t *dir)
{
    u_char           *path, *p;
    ngx_err_t         err;
    ngx_file_info_t   fi;

    path = (u_char *) ngx_http_agent_cstring(cycle->pool, dir);
    if (path == NULL) {
        return NGX_ERROR;
    }

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
            break;
        }
    }

    if (ngx_file_info(path, &fi) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: " ngx_file_info_n " \"%s\" failed", path);
        return NGX_ERROR;
    }

    if (!ngx_is_dir(&fi)) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: the instance directory \"%s\" is not "
                      "a directory", path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_write_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf)
{
    u_char     *json, *last;
    ngx_int_t   rc;

    json = ngx_alloc(ngx_http_agent_app_table_bound(amcf), cycle->log);
    if (json == NULL) {
        return NGX_ERROR;
    }

    last = ngx_http_agent_json_app_table(json, amcf);

    rc = ngx_http_agent_write_file_atomically(cycle, &amcf->instance_dir,
                                              "apps.json", json, last - json);
    ngx_free(json);

    return rc;
}


/* the most the JSON can take: every byte of a string may become \u00XX */

static size_t
ngx_http_agent_app_table_bound(ngx_http_agent_main_conf_t *amcf)
{
    size_t                  size;
    ngx_uint_t              i, j;
    ngx_keyval_t           *kv;
    ngx_http_agent_app_t  **apps, *app;

    size = 256 + NGX_INT_T_LEN + 2 * NGX_INT64_LEN;
    apps = amcf->apps.elts;

    for (i = 0; i < amcf->apps.nelts; i++) {
        app = apps[i];

        size += 1024 + 5 * NGX_INT_T_LEN + 4 * NGX_INT64_LEN
                + 6 * (app->name.len + app->app_root.len
                       + app->startup_file.len + app->python.len
                       + app->user.len + app->group.len
                       + app->default_user.len);

        if (app->env == NULL) {
            continue;
        }

        kv = app->env->elts;

        for (j = 0; j < app->env->nelts; j++) {
            size += 16 + 6 * (kv[j].key.len + kv[j].value.len);
        }
    }

    return size;
}


static u_char *
ngx_http_agent_json_app_table(u_char *p, ngx_http_agent_main_conf_t *amcf)
{
    ngx_uint_t              i;
    ngx_http_agent_app_t  **apps;

    p = ngx_sprintf(p, "{\n  \"version\": 1,\n  \"max_pool_size\": %ui,\n"
                    "  \"pool_idle_time_ms\": %M,\n"
                    "  \"stat_throttle_rate_ms\": %M,\n"
                    "  \"apps\": [", amcf->max_pool_size,
                    amcf->pool_idle_time, amcf->stat_throttle_rate);

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
    ngx_uint_t     i;
    ngx_keyval_t  *kv;

    p = ngx_sprintf(p, "    {\n      \"name\": ");
    p = ngx_http_agent_json_string(p, &app->name);
    p = ngx_sprintf(p, ",\n      \"app_root\": ");
    p = ngx_http_agent_json_string(p, &app->app_root);
    p = ngx_sprintf(p, ",\n      \"app_type\": \"wsgi\""
                    ",\n      \"startup_file\": ");
    p = ngx_http_agent_json_string(p, &app->startup_file);
    p = ngx_sprintf(p, ",\n      \"python\": ");
    p = ngx_http_agent_json_string(p, &app->python);
    p = ngx_sprintf(p, ",\n      \"env\": {");

    if (app->env) {
        kv = app->env->elts;

        for (i = 0; i < app->env->nelts; i++) {
            p = ngx_cpymem(p, i ? ", " : "", i ? 2 : 0);
            p = ngx_http_agent_json_string(p, &kv[i].key);
            *p++ = ':';
            *p++ = ' ';
            p = ngx_http_agent_json_string(p, &kv[i].value);
        }
    }

    p = ngx_sprintf(p, "},\n      \"min_instances\": %i"
                    ",\n      \"max_instances\": %i"
                    ",\n      \"user\": ",
                    app->min_instances, app->max_instances);
    p = ngx_http_agent_json_string(p, &app->user);
    p = ngx_sprintf(p, ",\n      \"group\": ");
    p = ngx_http_agent_json_string(p, &app->group);
    p = ngx_sprintf(p, ",\n      \"default_user\": ");
    p = ngx_http_agent_json_string(p, &app->default_user);
    p = ngx_http_agent_json_app_limits(p, app);

    return ngx_sprintf(p, "\n    }");
}


static u_char *
ngx_http_agent_json_app_limits(u_char *p, ngx_http_agent_app_t *app)
{
    p = ngx_sprintf(p, ",\n      \"max_request_queue_size\": %i"
                    ",\n      \"max_request_queue_time_ms\": %M"
                    ",\n      \"prestart\": %s",
                    app->max_request_queue_size, app->max_request_queue_time,
                    app->prestart ? "true" : "false");

    return ngx_sprintf(p, ",\n      \"memory_limit_mb\": %i"
                       ",\n      \"max_requests\": %i"
                       ",\n      \"max_request_time_ms\": %M"
                       ",\n      \"shutdown_timeout_ms\": %M"
                       ",\n      \"start_timeout_ms\": %M",
                       app->memory_limit, app->max_requests,
                       app->max_request_time, app->shutdown_timeout,
                       app->start_timeout);
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


/* readers never see a half-written file: write a temporary one, rename it */

static ngx_int_t
ngx_http_agent_write_file_atomically(ngx_cycle_t *cycle, ngx_str_t *dir,
    char *name, u_char *data, size_t len)
{
    char      *path, *temp;
    size_t     done;
    ssize_t    n;
    ngx_fd_t   fd;

    path = ngx_http_agent_file_path(cycle->pool, dir, name);
    temp = ngx_http_agent_file_path(cycle->pool, dir, "apps.json.tmp");

    if (path == NULL || temp == NULL) {
        return NGX_ERROR;
    }

    /* the app table carries agent_env values, which may be secrets */
    fd = open(temp, O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0600);
    if (fd == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot create \"%s\"", temp);
        return NGX_ERROR;
    }

    for (done = 0; done < len; done += n) {
        n = write(fd, data + done, len - done);

        if (n == -1) {
            if (ngx_errno == NGX_EINTR) {
                n = 0;
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: cannot write \"%s\"", temp);
            ngx_http_agent_close_fd(cycle, fd);
            return NGX_ERROR;
        }
    }

    if (close(fd) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot write \"%s\"", temp);
        return NGX_ERROR;
    }

    if (rename(temp, path) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot rename \"%s\" to \"%s\"", temp, path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static char *
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


/*
 * Returns the pid of the watchdog that holds the lock on watchdog.pid, 0
 * when none does, NGX_INVALID_PID on error.
 */

static ngx_pid_t
ngx_http_agent_running_watchdog(ngx_cycle_t *cycle, ngx_str_t *dir)
{
    char       *path;
    ngx_fd_t    fd;
    ngx_err_t   err;
    ngx_pid_t   pid;

    path = ngx_http_agent_file_path(cycle->pool, dir, "watchdog.pid");
    if (path == NULL) {
        return NGX_INVALID_PID;
    }

    fd = open(path, O_RDONLY|O_CLOEXEC);

    if (fd == -1) {
        if (ngx_errno == NGX_ENOENT) {
            return 0;
        }

        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot open \"%s\"", path);
        return NGX_INVALID_PID;
    }

    if (flock(fd, LOCK_EX|LOCK_NB) == 0) {
        /* closing the file releases the lock just taken */
        ngx_http_agent_close_fd(cycle, fd);
        return 0;
    }

    err = ngx_errno;

    if (err != EWOULDBLOCK) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, err,
                      "agent: flock(\"%s\") failed", path);
        ngx_http_agent_close_fd(cycle, fd);
        return NGX_INVALID_PID;
    }

    pid = ngx_http_agent_read_pid(cycle, fd, path);

    ngx_http_agent_close_fd(cycle, fd);

    return pid;
}


static ngx_pid_t
ngx_http_agent_read_pid(ngx_cycle_t *cycle, ngx_fd_t fd, char *path)
{
    u_char     buf[NGX_INT64_LEN + 2];
    size_t     len;
    ssize_t    n;
    ngx_int_t  pid;

    n = read(fd, buf, sizeof(buf) - 1);

    if (n == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot read \"%s\"", path);
        return NGX_INVALID_PID;
    }

    len = n;

    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == ' ')) {
        len--;
    }

    pid = ngx_atoi(buf, len);

    if (pid == NGX_ERROR || pid <= 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: \"%s\" is locked but holds no pid", path);
        return NGX_INVALID_PID;
    }

    return (ngx_pid_t) pid;
}


static ngx_int_t
ngx_http_agent_signal_watchdog(ngx_cycle_t *cycle, ngx_pid_t pid)
{
    if (kill(pid, SIGHUP) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: kill(%P, SIGHUP) failed", pid);
        return NGX_ERROR;
    }

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                  "agent: told the agent (pid %P) to reload the app table",
                  pid);

    return NGX_OK;
}


static ngx_int_t
ngx_http_agent_start_watchdog(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf)
{
    int         nginx_pipe[2], ready_pipe[2];
    char      **argv;
    ngx_pid_t   pid;

    argv = ngx_http_agent_watchdog_argv(cycle, amcf);
    if (argv == NULL) {
        return NGX_ERROR;
    }

    if (pipe2(nginx_pipe, O_CLOEXEC) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: pipe2() failed");
        return NGX_ERROR;
    }

    if (pipe2(ready_pipe, O_CLOEXEC) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: pipe2() failed");
        ngx_http_agent_close_fd(cycle, nginx_pipe[0]);
        ngx_http_agent_close_fd(cycle, nginx_pipe[1]);
        return NGX_ERROR;
    }

    pid = fork();

    if (pid == 0) {
        ngx_http_agent_exec_watchdog(argv, nginx_pipe[0], ready_pipe[1]);
    }

    if (pid == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: fork() failed");
    }

    ngx_http_agent_close_fd(cycle, nginx_pipe[0]);
    ngx_http_agent_close_fd(cycle, ready_pipe[1]);

    if (pid == -1
        || ngx_http_agent_wait_ready(cycle, ready_pipe[0], pid) != NGX_OK)
    {
        ngx_http_agent_close_fd(cycle, ready_pipe[0]);
        ngx_http_agent_close_fd(cycle, nginx_pipe[1]);
        return NGX_ERROR;
    }

    ngx_http_agent_close_fd(cycle, ready_pipe[0]);

    /* a watchdog that died since the last load left this end behind */
    if (ngx_http_agent_nginx_fd != -1) {
        ngx_http_agent_close_fd(cycle, ngx_http_agent_nginx_fd);
    }

    ngx_http_agent_nginx_fd = nginx_pipe[1];

    ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                  "agent: started the agent (pid %P) in \"%V\"",
                  pid, &amcf->instance_dir);

    return NGX_OK;
}


static char **
ngx_http_agent_watchdog_argv(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf)
{
    char             **argv;
    u_char            *owner;
    ngx_uint_t         n;
    ngx_core_conf_t   *ccf;

    argv = ngx_pcalloc(cycle->pool, 16 * sizeof(char *));
    if (argv == NULL) {
        return NULL;
    }

    n = 0;
    argv[n++] = ngx_http_agent_cstring(cycle->pool, &amcf->core_python);
    argv[n++] = "-m";
    argv[n++] = "agent";
    argv[n++] = "watchdog";
    argv[n++] = "--instance-dir";
    argv[n++] = ngx_http_agent_cstring(cycle->pool, &amcf->instance_dir);
    argv[n++] = "--nginx-fd";
    argv[n++] = "3";
    argv[n++] = "--ready-fd";
    argv[n++] = "4";

    if (argv[0] == NULL || argv[5] == NULL) {
        return NULL;
    }

    if (amcf->log_file.len) {
        argv[n++] = "--log-file";
        argv[n] = ngx_http_agent_cstring(cycle->pool, &amcf->log_file);

        if (argv[n++] == NULL) {
            return NULL;
        }
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (geteuid() == 0 && ccf->user != (ngx_uid_t) NGX_CONF_UNSET_UINT) {
        owner = ngx_pnalloc(cycle->pool, 2 * NGX_INT64_LEN + 2);
        if (owner == NULL) {
            return NULL;
        }

        (void) ngx_sprintf(owner, "%uL:%uL%Z", (uint64_t) ccf->user,
                           (uint64_t) ccf->group);

        argv[n++] = "--socket-owner";
        argv[n++] = (char *) owner;
    }

    argv[n] = NULL;

    return argv;
}


static char *
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


/*
 * Runs in the forked child and never returns.  The child must not keep
 * nginx's listening sockets or log files, nor the signal mask the master
 * blocks while it reloads.
 */

static void
ngx_http_agent_exec_watchdog(char **argv, int nginx_fd, int ready_fd)
{
    int       null_fd;
    sigset_t  none;

    /* first above 4, so that moving one cannot overwrite the other */
    nginx_fd = fcntl(nginx_fd, F_DUPFD_CLOEXEC, 5);
    ready_fd = (nginx_fd == -1) ? -1 : fcntl(ready_fd, F_DUPFD_CLOEXEC, 5);

    if (ready_fd == -1
        || ngx_http_agent_move_fd(nginx_fd, 3) == -1
        || ngx_http_agent_move_fd(ready_fd, 4) == -1)
    {
        _exit(127);
    }

    ngx_http_agent_close_fds_from(5);

    null_fd = open("/dev/null", O_RDONLY);

    if (null_fd == -1
        || (null_fd != STDIN_FILENO && dup2(null_fd, STDIN_FILENO) == -1)
        || setsid() == -1
        || sigemptyset(&none) == -1
        || sigprocmask(SIG_SETMASK, &none, NULL) == -1
        || signal(SIGPIPE, SIG_DFL) == SIG_ERR
        || signal(SIGSYS, SIG_DFL) == SIG_ERR)
    {
        ngx_http_agent_report_exec_failure(4, "the child setup");
        _exit(127);
    }

    if (null_fd != STDIN_FILENO) {
        (void) close(null_fd);
    }

    execvp(argv[0], argv);

    ngx_http_agent_report_exec_failure(4, argv[0]);
    _exit(127);
}


static int
ngx_http_agent_move_fd(int fd, int target)
{
    /* dup2() leaves the new descriptor open across exec */
    if (dup2(fd, target) == -1) {
        return -1;
    }

    return close(fd);
}


static void
ngx_http_agent_close_fds_from(int first)
{
    long  fd, max;

#if defined SYS_close_range
    if (syscall(SYS_close_range, (unsigned int) first, ~0U, 0) == 0) {
        return;
    }
#endif

    max = sysconf(_SC_OPEN_MAX);

    if (max == -1) {
        max = 65536;
    }

    for (fd = first; fd < max; fd++) {
        /* EBADF for the many numbers that are not open is expected */
        (void) close((int) fd);
    }
}


static void
ngx_http_agent_report_exec_failure(int ready_fd, char *file)
{
    int      err;
    char     line[NGX_HTTP_AGENT_READY_LINE_MAX];
    ssize_t  n;

    err = errno;

    n = snprintf(line, sizeof(line), "error: cannot run %s: %s\n",
                 file, strerror(err));

    if (n > 0 && (size_t) n < sizeof(line)) {
        /* the parent reports a missing line as the child's exit anyway */
        (void) !write(ready_fd, line, n);
    }
}


static ngx_int_t
ngx_http_agent_wait_ready(ngx_cycle_t *cycle, int fd, ngx_pid_t pid)
{
    u_char     line[NGX_HTTP_AGENT_READY_LINE_MAX];
    u_char    *status;
    ngx_int_t  rc;

    rc = ngx_http_agent_read_ready_line(cycle, fd, line, sizeof(line));

    if (rc == NGX_OK && ngx_strcmp(line, "ok") == 0) {
        return NGX_OK;
    }

    status = ngx_http_agent_stop_child(cycle, pid);

    if (rc == NGX_OK) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: the agent failed to start: %s (%s)",
                      line, status);

    } else if (rc == NGX_DONE) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: the agent stopped before it was ready (%s)",
                      status);

    } else if (rc == NGX_AGAIN) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: the agent was not ready within %d s (%s)",
                      NGX_HTTP_AGENT_START_TIMEOUT / 1000, status);
    }

    return NGX_ERROR;
}


/*
 * Reads one line into "line" (NUL-terminated, without the newline).
 * Returns NGX_OK, NGX_DONE on end of file before a line, NGX_AGAIN on
 * timeout, NGX_ERROR on a failed call.
 */

static ngx_int_t
ngx_http_agent_read_ready_line(ngx_cycle_t *cycle, int fd, u_char *line,
    size_t size)
{
    int             ready;
    size_t          len;
    ssize_t         n;
    u_char         *nl;
    ngx_msec_int_t  deadline, left;
    struct pollfd   pfd;

    len = 0;
    deadline = ngx_http_agent_now() + NGX_HTTP_AGENT_START_TIMEOUT;

    for ( ;; ) {
        left = deadline - ngx_http_agent_now();

        if (left <= 0) {
            return NGX_AGAIN;
        }

        pfd.fd = fd;
        pfd.events = POLLIN;
        pfd.revents = 0;

        ready = poll(&pfd, 1, (int) left);

        if (ready == -1) {
            if (ngx_errno == NGX_EINTR) {
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: poll() failed");
            return NGX_ERROR;
        }

        if (ready == 0) {
            return NGX_AGAIN;
        }

        n = read(fd, line + len, size - 1 - len);

        if (n == -1) {
            if (ngx_errno == NGX_EINTR) {
                continue;
            }

            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                          "agent: cannot read the agent's readiness");
            return NGX_ERROR;
        }

        if (n == 0) {
            if (len == 0) {
                return NGX_DONE;
            }

            line[len] = '\0';
            return NGX_OK;
        }

        len += n;
        line[len] = '\0';

        nl = (u_char *) ngx_strchr(line, '\n');

        if (nl) {
            *nl = '\0';
            return NGX_OK;
        }

        if (len == size - 1) {
            /* an overlong line is shown cut short */
            return NGX_OK;
        }
    }
}


static ngx_msec_int_t
ngx_http_agent_now(void)
{
    struct timespec  ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) == -1) {
        /* cannot fail with a valid clock; a zero time only cuts the wait */
        return 0;
    }

    return (ngx_msec_int_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}


/*
 * Gives a child that failed to start a moment to exit on its own, so that
 * its exit code can be reported, then kills it.  Returns how it ended, as
 * text for the caller's message.
 */

static u_char *
ngx_http_agent_stop_child(ngx_cycle_t *cycle, ngx_pid_t pid)
{
    int         status;
    ngx_pid_t   done;
    ngx_uint_t  tries;

    static u_char  text[64];

    done = 0;

    for (tries = 0; tries < 50 && done == 0; tries++) {
        done = waitpid(pid, &status, WNOHANG);

        if (done == 0) {
            ngx_msleep(10);

        } else if (done == -1 && ngx_errno == NGX_EINTR) {
            done = 0;
        }
    }

    if (done == 0) {
        if (kill(pid, SIGKILL) == -1 && ngx_errno != NGX_ESRCH) {
            ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                          "agent: kill(%P, SIGKILL) failed", pid);
            return (u_char *) "pid left running";
        }

        do {
            done = waitpid(pid, &status, 0);
        } while (done == -1 && ngx_errno == NGX_EINTR);
    }

    if (done == -1) {
        /* ECHILD: nginx's own SIGCHLD handler reaped it already */
        (void) ngx_sprintf(text, "pid %P%Z", pid);

    } else if (WIFEXITED(status)) {
        (void) ngx_sprintf(text, "pid %P exited with code %d%Z",
                           pid, WEXITSTATUS(status));

    } else if (WIFSIGNALED(status)) {
        (void) ngx_sprintf(text, "pid %P killed by signal %d%Z",
                           pid, WTERMSIG(status));

    } else {
        (void) ngx_sprintf(text, "pid %P%Z", pid);
    }

    return text;
}


static void
ngx_http_agent_close_fd(ngx_cycle_t *cycle, int fd)
{
    if (close(fd) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "agent: close(%d) failed", fd);
    }
}
