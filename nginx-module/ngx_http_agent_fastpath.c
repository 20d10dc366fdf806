
/*
 * The fast path (docs/protocol.md section 5): nginx's workers hand a
 * request straight to an idle app worker by claiming its slot in the table
 * the engine publishes (csrc/fastpath.h, <instance>/fastpath.table).  This
 * file holds the table itself: the master's file and wake/, each worker's
 * row and wake-up socket, the wake-ups between processes and the counters
 * nginx keeps for the status.  The claims, the waiting requests and the
 * release are in ngx_http_agent_claims.c; the upstream callbacks that talk
 * to the worker in ngx_http_agent_worker_peer.c.
 *
 * Everything nginx writes here the engine reads as untrusted; what the
 * engine writes nginx trusts as much as agent.sock's answers.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <sys/mman.h>

#include "ngx_http_agent_fastpath.h"


#define NGX_HTTP_AGENT_FP_RETRY_MS  5        /* waiters' claim retry timer */


static ngx_int_t ngx_http_agent_fp_open_table(ngx_cycle_t *cycle,
    int dir_fd, ngx_uid_t uid, ngx_gid_t gid);
static void ngx_http_agent_fp_make_wake_dir(ngx_cycle_t *cycle, int dir_fd,
    ngx_uid_t uid, ngx_gid_t gid);
static ngx_int_t ngx_http_agent_fp_take_proc_row(void);
static void ngx_http_agent_fp_give_back(agent_fp_proc *p);
static ngx_int_t ngx_http_agent_fp_open_wake(ngx_cycle_t *cycle);
static void ngx_http_agent_fp_wake_handler(ngx_event_t *ev);
static void ngx_http_agent_fp_retry_handler(ngx_event_t *ev);


/* inherited from the master: the mapping, or NULL when the fast path is off */
agent_fp_table            *ngx_http_agent_fp_table;

/* this worker's */
ngx_int_t                  ngx_http_agent_fp_me = -1;     /* procs[] row */
static ngx_connection_t   *ngx_http_agent_fp_wake;
static u_char             *ngx_http_agent_fp_wake_path;
static u_char             *ngx_http_agent_fp_wake_dir;
ngx_queue_t                ngx_http_agent_fp_fifo[AGENT_FP_APPS];
ngx_uint_t                 ngx_http_agent_fp_waiters;
static ngx_event_t         ngx_http_agent_fp_retry;


/* ------------------------------------------------------------------------ */
/* the master: the table file and wake/                                      */

void
ngx_http_agent_fp_init_master(ngx_cycle_t *cycle, int dir_fd)
{
    ngx_uid_t          uid;
    ngx_gid_t          gid;
    ngx_core_conf_t   *ccf;

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (geteuid() == 0 && ccf->user != (ngx_uid_t) NGX_CONF_UNSET_UINT) {
        uid = ccf->user;
        gid = ccf->group;

    } else {
        uid = (ngx_uid_t) -1;
        gid = (ngx_gid_t) -1;
    }

    if (ngx_http_agent_fp_table != NULL) {
        /* a reload: the workers to come get a fresh mapping */
        if (munmap(ngx_http_agent_fp_table, sizeof(agent_fp_table)) == -1) {
            ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                          "agent: munmap(" AGENT_FP_FILE ") failed");
        }

        ngx_http_agent_fp_table = NULL;
    }

    if (ngx_http_agent_fp_open_table(cycle, dir_fd, uid, gid) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "agent: the fast path is off: every request goes "
                      "through agent.sock");
        return;
    }

    ngx_http_agent_fp_make_wake_dir(cycle, dir_fd, uid, gid);
}


/*
 * <instance>/fastpath.table: kept when its size, magic and version are
 * right (the engine's state lives in it across nginx reloads), else made
 * anew; owned by nginx's worker user, mode 0600.
 */

static ngx_int_t
ngx_http_agent_fp_open_table(ngx_cycle_t *cycle, int dir_fd, ngx_uid_t uid,
    ngx_gid_t gid)
{
    int               fd;
    void             *p;
    struct stat       st;
    agent_fp_header   h;
    ssize_t           n;

    fd = openat(dir_fd, AGENT_FP_FILE,
                O_RDWR|O_CREAT|O_NOFOLLOW|O_CLOEXEC, 0600);
    if (fd == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: open(" AGENT_FP_FILE ") failed");
        return NGX_ERROR;
    }

    if (fstat(fd, &st) == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: fstat(" AGENT_FP_FILE ") failed");
        goto failed;
    }

    if (!S_ISREG(st.st_mode) || st.st_nlink != 1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                      "agent: " AGENT_FP_FILE " is not a regular file "
                      "with one link");
        goto failed;
    }

    ngx_memzero(&h, sizeof(agent_fp_header));

    n = 0;

    if (st.st_size == (off_t) sizeof(agent_fp_table)) {
        n = pread(fd, &h, sizeof(agent_fp_header), 0);
        if (n == -1) {
            ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                          "agent: pread(" AGENT_FP_FILE ") failed");
            goto failed;
        }
    }

    if (n != (ssize_t) sizeof(agent_fp_header)
        || h.magic != AGENT_FP_MAGIC
        || h.version != AGENT_FP_VERSION
        || h.size != sizeof(agent_fp_table))
    {
        if (ftruncate(fd, 0) == -1
            || ftruncate(fd, sizeof(agent_fp_table)) == -1)
        {
            ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                          "agent: ftruncate(" AGENT_FP_FILE ") failed");
            goto failed;
        }

        ngx_memzero(&h, sizeof(agent_fp_header));
        h.magic = AGENT_FP_MAGIC;
        h.version = AGENT_FP_VERSION;
        h.size = sizeof(agent_fp_table);

        n = pwrite(fd, &h, sizeof(agent_fp_header), 0);
        if (n != (ssize_t) sizeof(agent_fp_header)) {
            ngx_log_error(NGX_LOG_ERR, cycle->log, n == -1 ? ngx_errno : 0,
                          "agent: pwrite(" AGENT_FP_FILE ") failed");
            goto failed;
        }
    }

    if (uid != (ngx_uid_t) -1 && fchown(fd, uid, gid) == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: fchown(" AGENT_FP_FILE ") failed");
        goto failed;
    }

    if (fchmod(fd, 0600) == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: fchmod(" AGENT_FP_FILE ") failed");
        goto failed;
    }

    p = mmap(NULL, sizeof(agent_fp_table), PROT_READ|PROT_WRITE, MAP_SHARED,
             fd, 0);
    if (p == MAP_FAILED) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: mmap(" AGENT_FP_FILE ") failed");
        goto failed;
    }

    ngx_http_agent_close_fd(cycle, fd);

    ngx_http_agent_fp_table = p;

    return NGX_OK;

failed:

    ngx_http_agent_close_fd(cycle, fd);

    return NGX_ERROR;
}


/* <instance>/wake/: mode 0700, nginx's worker user's: its workers bind there */

static void
ngx_http_agent_fp_make_wake_dir(ngx_cycle_t *cycle, int dir_fd,
    ngx_uid_t uid, ngx_gid_t gid)
{
    int          fd;
    struct stat  st;

    if (mkdirat(dir_fd, AGENT_FP_WAKE_DIR, 0700) == -1
        && ngx_errno != NGX_EEXIST)
    {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: mkdir(" AGENT_FP_WAKE_DIR ") failed");
        goto off;
    }

    fd = openat(dir_fd, AGENT_FP_WAKE_DIR,
                O_RDONLY|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC);
    if (fd == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: open(" AGENT_FP_WAKE_DIR ") failed");
        goto off;
    }

    if (fstat(fd, &st) == -1 || !S_ISDIR(st.st_mode)
        || (uid != (ngx_uid_t) -1 && fchown(fd, uid, gid) == -1)
        || fchmod(fd, 0700) == -1)
    {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: cannot prepare " AGENT_FP_WAKE_DIR "/");
        ngx_http_agent_close_fd(cycle, fd);
        goto off;
    }

    ngx_http_agent_close_fd(cycle, fd);

    return;

off:

    (void) munmap(ngx_http_agent_fp_table, sizeof(agent_fp_table));
    ngx_http_agent_fp_table = NULL;

    ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                  "agent: the fast path is off: every request goes "
                  "through agent.sock");
}


/* ------------------------------------------------------------------------ */
/* a worker: its row in procs[] and its wake-up socket                       */

void
ngx_http_agent_fp_init_worker(ngx_cycle_t *cycle)
{
    ngx_uint_t  i;

    if (ngx_http_agent_fp_table == NULL) {
        return;
    }

    for (i = 0; i < AGENT_FP_APPS; i++) {
        ngx_queue_init(&ngx_http_agent_fp_fifo[i]);
    }

    if ((ngx_uint_t) ngx_pid > AGENT_FP_PID_MAX
        || ngx_http_agent_fp_take_proc_row() != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "agent: no row in " AGENT_FP_FILE " for this worker: "
                      "its requests go through agent.sock");
        ngx_http_agent_fp_table = NULL;
        return;
    }

    if (ngx_http_agent_fp_open_wake(cycle) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "agent: no wake-up socket for this worker: "
                      "its requests go through agent.sock");
        __atomic_store_n(
            &ngx_http_agent_fp_table->procs[ngx_http_agent_fp_me].pid, 0,
            __ATOMIC_RELEASE);
        ngx_http_agent_fp_table = NULL;
        return;
    }

    ngx_http_agent_fp_retry.handler = ngx_http_agent_fp_retry_handler;
    ngx_http_agent_fp_retry.log = cycle->log;
    ngx_http_agent_fp_retry.data = &ngx_http_agent_fp_retry;
    /*
     * Not cancelable: it is armed only while requests wait here, and a
     * worker that shuts down gracefully (a reload, a quit) must serve them
     * before it exits, as it finishes any other request.
     */
    ngx_http_agent_fp_retry.cancelable = 0;
}


void
ngx_http_agent_fp_exit_worker(ngx_cycle_t *cycle)
{
    if (ngx_http_agent_fp_table == NULL || ngx_http_agent_fp_me < 0) {
        return;
    }

    /* closed here, before nginx looks for connections left open at exit */
    if (ngx_http_agent_fp_wake != NULL) {
        ngx_close_connection(ngx_http_agent_fp_wake);
        ngx_http_agent_fp_wake = NULL;
    }

    if (ngx_http_agent_fp_wake_path
        && unlink((char *) ngx_http_agent_fp_wake_path) == -1)
    {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: unlink(\"%s\") failed",
                      ngx_http_agent_fp_wake_path);
    }

    /* the counts of requests that waited here are given back first: once
     * the pid is 0 the engine's sweep no longer looks at the row */
    ngx_http_agent_fp_give_back(
        &ngx_http_agent_fp_table->procs[ngx_http_agent_fp_me]);

    __atomic_store_n(&ngx_http_agent_fp_table->procs[ngx_http_agent_fp_me].pid,
                     0, __ATOMIC_RELEASE);
}


/*
 * Takes a process row's waiting counts out of the app rows' totals (never
 * below 0), as the engine's sweep does for a row whose process died, and
 * clears them.
 */

static void
ngx_http_agent_fp_give_back(agent_fp_proc *p)
{
    uint32_t    n, total;
    ngx_uint_t  row;

    for (row = 0; row < AGENT_FP_APPS; row++) {
        n = __atomic_exchange_n(&p->waiting[row], 0, __ATOMIC_ACQ_REL);
        __atomic_store_n(&p->oldest_ms[row], 0, __ATOMIC_RELEASE);

        if (n == 0) {
            continue;
        }

        total = __atomic_load_n(&ngx_http_agent_fp_table->apps[row].waiting,
                                __ATOMIC_ACQUIRE);

        while (!__atomic_compare_exchange_n(
                    &ngx_http_agent_fp_table->apps[row].waiting, &total,
                    total > n ? total - n : 0, 0,
                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        {
            /* total holds the value seen: try again */
        }
    }
}


/* CAS pid 0 -> ours; a row whose process is gone may be taken too */

static ngx_int_t
ngx_http_agent_fp_take_proc_row(void)
{
    uint32_t        pid, mine;
    ngx_uint_t      i, pass;
    agent_fp_proc  *p;

    mine = (uint32_t) ngx_pid;

    for (pass = 0; pass < 2; pass++) {
        for (i = 0; i < AGENT_FP_PROCS; i++) {
            p = &ngx_http_agent_fp_table->procs[i];

            pid = __atomic_load_n(&p->pid, __ATOMIC_ACQUIRE);

            if (pid != 0) {
                if (pass == 0 || pid == mine
                    || kill((pid_t) pid, 0) == 0 || ngx_errno != ESRCH)
                {
                    continue;
                }
            }

            if (!__atomic_compare_exchange_n(&p->pid, &pid, mine, 0,
                                             __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE))
            {
                continue;
            }

            if (pass == 1) {
                /* a dead process's counts, which the engine's sweep would
                 * have given back had it seen the row first */
                ngx_http_agent_fp_give_back(p);
            }

            ngx_http_agent_fp_me = i;

            return NGX_OK;
        }
    }

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_agent_fp_open_wake(ngx_cycle_t *cycle)
{
    int                          s;
    u_char                      *p;
    ngx_str_t                    name;
    ngx_event_t                 *rev;
    ngx_connection_t            *c;
    struct sockaddr_un           sa;
    ngx_http_agent_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_agent_module);

    ngx_http_agent_fp_wake_dir = (u_char *) ngx_http_agent_file_path(
                                     cycle->pool, &amcf->instance_dir,
                                     AGENT_FP_WAKE_DIR);
    if (ngx_http_agent_fp_wake_dir == NULL) {
        return NGX_ERROR;
    }

    name.len = ngx_strlen(ngx_http_agent_fp_wake_dir);
    name.data = ngx_http_agent_fp_wake_dir;

    p = ngx_pnalloc(cycle->pool, NGX_INT_T_LEN + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *ngx_sprintf(p, "%P", ngx_pid) = '\0';

    ngx_http_agent_fp_wake_path = (u_char *) ngx_http_agent_file_path(
                                      cycle->pool, &name, (char *) p);
    if (ngx_http_agent_fp_wake_path == NULL) {
        return NGX_ERROR;
    }

    if (ngx_strlen(ngx_http_agent_fp_wake_path) >= sizeof(sa.sun_path)) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                      "agent: \"%s\" is too long for a socket",
                      ngx_http_agent_fp_wake_path);
        return NGX_ERROR;
    }

    ngx_memzero(&sa, sizeof(struct sockaddr_un));
    sa.sun_family = AF_UNIX;
    ngx_cpystrn((u_char *) sa.sun_path, ngx_http_agent_fp_wake_path,
                sizeof(sa.sun_path));

    if (unlink((char *) ngx_http_agent_fp_wake_path) == -1
        && ngx_errno != NGX_ENOENT)
    {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: unlink(\"%s\") failed",
                      ngx_http_agent_fp_wake_path);
        return NGX_ERROR;
    }

    s = socket(AF_UNIX, SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC, 0);
    if (s == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: socket(AF_UNIX, SOCK_DGRAM) failed");
        return NGX_ERROR;
    }

    if (bind(s, (struct sockaddr *) &sa, sizeof(struct sockaddr_un)) == -1) {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "agent: bind(\"%s\") failed",
                      ngx_http_agent_fp_wake_path);
        ngx_http_agent_close_fd(cycle, s);
        return NGX_ERROR;
    }

    c = ngx_get_connection(s, cycle->log);
    if (c == NULL) {
        ngx_http_agent_close_fd(cycle, s);
        (void) unlink((char *) ngx_http_agent_fp_wake_path);
        return NGX_ERROR;
    }

    c->type = SOCK_DGRAM;
    c->log = cycle->log;

    rev = c->read;
    rev->log = cycle->log;
    rev->handler = ngx_http_agent_fp_wake_handler;
    rev->cancelable = 1;
    c->write->log = cycle->log;

    if (ngx_add_event(rev, NGX_READ_EVENT,
                      (ngx_event_flags & NGX_USE_CLEAR_EVENT)
                      ? NGX_CLEAR_EVENT : NGX_LEVEL_EVENT)
        != NGX_OK)
    {
        ngx_close_connection(c);
        (void) unlink((char *) ngx_http_agent_fp_wake_path);
        return NGX_ERROR;
    }

    ngx_http_agent_fp_wake = c;

    return NGX_OK;
}


/* another process released a worker of a row we wait for */

static void
ngx_http_agent_fp_wake_handler(ngx_event_t *ev)
{
    u_char             buf[64];
    ssize_t            n;
    ngx_uint_t         row;
    ngx_connection_t  *c;

    c = ev->data;

    for ( ;; ) {
        n = recv(c->fd, buf, sizeof(buf), 0);

        if (n >= 0) {
            continue;
        }

        if (ngx_socket_errno == NGX_EAGAIN) {
            break;
        }

        if (ngx_socket_errno == NGX_EINTR) {
            continue;
        }

        ngx_log_error(NGX_LOG_ERR, ev->log, ngx_socket_errno,
                      "agent: recv() on the wake-up socket failed");
        break;
    }

    ev->ready = 0;

    if (ngx_http_agent_fp_table == NULL) {
        return;
    }

    for (row = 0; row < AGENT_FP_APPS; row++) {
        if (!ngx_queue_empty(&ngx_http_agent_fp_fifo[row])) {
            ngx_http_agent_fp_serve_waiters(row);
        }
    }
}


/* a lost or refused wake-up costs 5 ms, not a request */

static void
ngx_http_agent_fp_retry_handler(ngx_event_t *ev)
{
    ngx_uint_t  row;

    for (row = 0; row < AGENT_FP_APPS; row++) {
        if (!ngx_queue_empty(&ngx_http_agent_fp_fifo[row])) {
            ngx_http_agent_fp_serve_waiters(row);
        }
    }

    ngx_http_agent_fp_arm_retry();
}


void
ngx_http_agent_fp_arm_retry(void)
{
    if (ngx_http_agent_fp_waiters > 0
        && !ngx_http_agent_fp_retry.timer_set)
    {
        ngx_add_timer(&ngx_http_agent_fp_retry, NGX_HTTP_AGENT_FP_RETRY_MS);
    }
}


/* one byte to the process whose waiter for the row is the oldest */

void
ngx_http_agent_fp_wake_other(ngx_uint_t row)
{
    u_char              *last;
    uint32_t             pid, best_pid;
    uint64_t             t, best;
    ngx_uint_t           i;
    agent_fp_proc       *p;
    struct sockaddr_un   sa;

    best = 0;
    best_pid = 0;

    for (i = 0; i < AGENT_FP_PROCS; i++) {
        if ((ngx_int_t) i == ngx_http_agent_fp_me) {
            continue;
        }

        p = &ngx_http_agent_fp_table->procs[i];

        pid = __atomic_load_n(&p->pid, __ATOMIC_ACQUIRE);

        if (pid == 0
            || __atomic_load_n(&p->waiting[row], __ATOMIC_ACQUIRE) == 0)
        {
            continue;
        }

        t = __atomic_load_n(&p->oldest_ms[row], __ATOMIC_ACQUIRE);

        if (best_pid == 0 || (t != 0 && t < best)) {
            best = t;
            best_pid = pid;
        }
    }

    if (best_pid == 0 || ngx_http_agent_fp_wake == NULL) {
        return;
    }

    ngx_memzero(&sa, sizeof(struct sockaddr_un));
    sa.sun_family = AF_UNIX;

    last = ngx_snprintf((u_char *) sa.sun_path, sizeof(sa.sun_path) - 1,
                        "%s/%uD", ngx_http_agent_fp_wake_dir, best_pid);
    *last = '\0';

    /* an error is ignored: waiters also retry on their timer */
    (void) sendto(ngx_http_agent_fp_wake->fd, "w", 1, MSG_DONTWAIT,
                  (struct sockaddr *) &sa, sizeof(struct sockaddr_un));
}


/* ------------------------------------------------------------------------ */
/* what nginx answered itself or measured, for the status                    */

void
ngx_http_agent_fp_count(ngx_http_agent_ctx_t *ctx, ngx_uint_t what)
{
    agent_fp_app  *a;

    if (ngx_http_agent_fp_table == NULL) {
        return;
    }

    a = &ngx_http_agent_fp_table->apps[ctx->row];

    if (what == NGX_HTTP_AGENT_FP_REQUEST_TIMEOUT) {
        __atomic_add_fetch(&a->request_timeouts, 1, __ATOMIC_RELAXED);

    } else {
        __atomic_add_fetch(&a->failed, 1, __ATOMIC_RELAXED);
    }
}


/* step 8: from when the body was read to the end, as agent_app_durations */

void
ngx_http_agent_fp_duration(ngx_http_agent_ctx_t *ctx)
{
    static const uint64_t  bounds_ms[AGENT_FP_DURATION_BUCKETS - 1] = {
        5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000
    };

    uint64_t       us, now;
    ngx_uint_t     i;
    agent_fp_app  *a;

    if (ngx_http_agent_fp_table == NULL) {
        return;
    }

    now = ngx_http_agent_fp_now_us();
    us = now > ctx->body_read_us ? now - ctx->body_read_us : 0;

    for (i = 0; i < AGENT_FP_DURATION_BUCKETS - 1; i++) {
        if (us <= bounds_ms[i] * 1000) {
            break;
        }
    }

    a = &ngx_http_agent_fp_table->apps[ctx->row];

    __atomic_add_fetch(&a->duration_buckets[i], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&a->duration_sum_us, us, __ATOMIC_RELAXED);
}


uint64_t
ngx_http_agent_fp_now_us(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}


uint64_t
ngx_http_agent_fp_now_ms(void)
{
    return ngx_http_agent_fp_now_us() / 1000;
}
