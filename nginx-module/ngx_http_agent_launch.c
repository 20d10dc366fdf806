
/*
 * Starting the agent (docs/protocol.md, section 4): once the instance
 * directory and apps.json are in place (ngx_http_agent_instance.c), finding
 * the running watchdog and signalling it, or starting one.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <sys/file.h>
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <poll.h>

#include "ngx_http_agent_module.h"


#define NGX_HTTP_AGENT_START_TIMEOUT   10000      /* milliseconds */
#define NGX_HTTP_AGENT_READY_LINE_MAX  1024


static ngx_int_t ngx_http_agent_empty_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
static void ngx_http_agent_adopt_nginx_fd(ngx_cycle_t *cycle, ngx_pid_t pid);
static ngx_pid_t ngx_http_agent_running_watchdog(ngx_cycle_t *cycle,
    ngx_str_t *dir, int dir_fd);
static ngx_int_t ngx_http_agent_check_pid_file(ngx_cycle_t *cycle,
    ngx_fd_t fd, char *path);
static ngx_int_t ngx_http_agent_is_our_watchdog(ngx_cycle_t *cycle,
    ngx_pid_t pid, ngx_str_t *dir);
static ngx_pid_t ngx_http_agent_read_pid(ngx_cycle_t *cycle, ngx_fd_t fd,
    char *path);
static ngx_int_t ngx_http_agent_signal_watchdog(ngx_cycle_t *cycle,
    ngx_pid_t pid);
static ngx_int_t ngx_http_agent_start_watchdog(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
static char **ngx_http_agent_watchdog_argv(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf);
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


/*
 * The write end of the pipe whose other end is the watchdog's fd 3.  Only
 * the master keeps it: its close, when nginx stops, tells the agent to stop.
 */
static int  ngx_http_agent_nginx_fd = -1;


ngx_int_t
ngx_http_agent_init_module(ngx_cycle_t *cycle)
{
    int                          dir_fd;
    ngx_int_t                    rc;
    ngx_pid_t                    pid;
    ngx_http_agent_main_conf_t  *amcf;

    if (ngx_test_config || ngx_process == NGX_PROCESS_SIGNALLER) {
        return NGX_OK;
    }

    amcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_agent_module);

    if (amcf == NULL) {
        return NGX_OK;
    }

    if (amcf->apps.nelts == 0) {
        return ngx_http_agent_empty_app_table(cycle, amcf);
    }

    dir_fd = ngx_http_agent_open_instance_dir(cycle, &amcf->instance_dir);
    if (dir_fd == -1) {
        return NGX_ERROR;
    }

    rc = ngx_http_agent_write_app_table(cycle, amcf, dir_fd);

    if (rc == NGX_OK) {
        /* never fatal: without its table the fast path stays off */
        ngx_http_agent_fp_init_master(cycle, dir_fd);

        pid = ngx_http_agent_running_watchdog(cycle, &amcf->instance_dir,
                                              dir_fd);

        if (pid == NGX_INVALID_PID) {
            rc = NGX_ERROR;

        } else if (pid > 0) {
            ngx_http_agent_adopt_nginx_fd(cycle, pid);
            rc = ngx_http_agent_signal_watchdog(cycle, pid);

        } else {
            rc = ngx_http_agent_start_watchdog(cycle, amcf);
        }
    }

    ngx_http_agent_close_fd(cycle, dir_fd);

    return rc;
}


/*
 * A configuration without any agent_enabled location: an agent this
 * instance directory already runs (the reload removed the last one) gets
 * an app table without apps, and drains and stops them; it stays up itself,
 * with no app, until nginx stops or a reload brings apps back.  Without a
 * running agent there is nothing to do, and the instance directory is not
 * made: nginx may load the module and serve no app at all.
 */

static ngx_int_t
ngx_http_agent_empty_app_table(ngx_cycle_t *cycle,
    ngx_http_agent_main_conf_t *amcf)
{
    int          dir_fd;
    char        *path;
    ngx_int_t    rc;
    ngx_pid_t    pid;
    struct stat  st;

    path = ngx_http_agent_cstring(cycle->pool, &amcf->instance_dir);
    if (path == NULL) {
        return NGX_ERROR;
    }

    if (lstat(path, &st) == -1) {
        if (ngx_errno == NGX_ENOENT) {
            return NGX_OK;
        }

        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot look at \"%s\"", path);
        return NGX_ERROR;
    }

    dir_fd = ngx_http_agent_open_instance_dir(cycle, &amcf->instance_dir);
    if (dir_fd == -1) {
        return NGX_ERROR;
    }

    pid = ngx_http_agent_running_watchdog(cycle, &amcf->instance_dir, dir_fd);

    if (pid == NGX_INVALID_PID) {
        rc = NGX_ERROR;

    } else if (pid == 0) {
        rc = NGX_OK;

    } else {
        rc = ngx_http_agent_write_app_table(cycle, amcf, dir_fd);

        if (rc == NGX_OK) {
            ngx_http_agent_adopt_nginx_fd(cycle, pid);
            rc = ngx_http_agent_signal_watchdog(cycle, pid);
        }
    }

    ngx_http_agent_close_fd(cycle, dir_fd);

    return rc;
}


/*
 * nginx's binary upgrade (USR2) execs the new binary from the old master,
 * which keeps its end of the watchdog's pipe open across the exec
 * (ngx_http_agent_start_watchdog clears its close-on-exec flag): the new
 * master holds it too, so the old master's exit (QUIT) does not read as
 * nginx stopping.  The new master finds the inherited end among its
 * descriptors as the pipe the watchdog reads on its fd 3, and takes it as
 * its own, so that its workers drop it and its exit stops the agent.
 */

static void
ngx_http_agent_adopt_nginx_fd(ngx_cycle_t *cycle, ngx_pid_t pid)
{
    int             fd, flags;
    DIR            *dir;
    u_char          proc[sizeof("/proc//fd/3") + NGX_INT64_LEN];
    ngx_int_t       n;
    struct stat     pipe_st, st;
    struct dirent  *entry;

    if (ngx_http_agent_nginx_fd != -1) {
        return;
    }

    (void) ngx_sprintf(proc, "/proc/%P/fd/3%Z", pid);

    if (stat((char *) proc, &pipe_st) == -1 || !S_ISFIFO(pipe_st.st_mode)) {
        /* a watchdog started by hand has no nginx pipe */
        return;
    }

    dir = opendir("/proc/self/fd");
    if (dir == NULL) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "agent: opendir(\"/proc/self/fd\") failed");
        return;
    }

    while ((entry = readdir(dir)) != NULL) {
        n = ngx_atoi((u_char *) entry->d_name, ngx_strlen(entry->d_name));

        if (n == NGX_ERROR || n > INT_MAX || (int) n == dirfd(dir)) {
            continue;
        }

        fd = (int) n;
        flags = fcntl(fd, F_GETFL);

        if (flags != -1 && (flags & O_ACCMODE) == O_WRONLY
            && fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)
            && st.st_ino == pipe_st.st_ino && st.st_dev == pipe_st.st_dev)
        {
            ngx_http_agent_nginx_fd = fd;
            break;
        }
    }

    if (closedir(dir) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "agent: closedir(\"/proc/self/fd\") failed");
    }

    if (ngx_http_agent_nginx_fd != -1) {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "agent: took over the agent (pid %P) from the "
                      "previous nginx binary", pid);
    }
}


/*
 * Workers drop the master's end of the pipe so that only the master's exit
 * is seen by the agent as nginx stopping.  Without a master (master_process
 * off) the single process keeps it.
 */

ngx_int_t
ngx_http_agent_init_process(ngx_cycle_t *cycle)
{
    if (ngx_process == NGX_PROCESS_WORKER && ngx_http_agent_nginx_fd != -1) {
        ngx_http_agent_close_fd(cycle, ngx_http_agent_nginx_fd);
        ngx_http_agent_nginx_fd = -1;
    }

    if (ngx_process == NGX_PROCESS_WORKER
        || ngx_process == NGX_PROCESS_SINGLE)
    {
        ngx_http_agent_fp_init_worker(cycle);
    }

    return NGX_OK;
}


void
ngx_http_agent_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_agent_fp_exit_worker(cycle);
}


/*
 * Returns the pid of the watchdog that holds the lock on watchdog.pid, 0
 * when none does, NGX_INVALID_PID on error.  The pid is signalled, as root,
 * so it is taken only from a file of the master's user (never through a
 * symbolic link) and only when it is this instance's watchdog.
 */

static ngx_pid_t
ngx_http_agent_running_watchdog(ngx_cycle_t *cycle, ngx_str_t *dir,
    int dir_fd)
{
    char       *path;
    ngx_fd_t    fd;
    ngx_err_t   err;
    ngx_pid_t   pid;

    path = ngx_http_agent_file_path(cycle->pool, dir, "watchdog.pid");
    if (path == NULL) {
        return NGX_INVALID_PID;
    }

    fd = openat(dir_fd, "watchdog.pid", O_RDONLY|O_NOFOLLOW|O_CLOEXEC);

    if (fd == -1) {
        if (ngx_errno == NGX_ENOENT) {
            return 0;
        }

        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: cannot open \"%s\"", path);
        return NGX_INVALID_PID;
    }

    if (ngx_http_agent_check_pid_file(cycle, fd, path) != NGX_OK) {
        ngx_http_agent_close_fd(cycle, fd);
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

    if (pid > 0 && ngx_http_agent_is_our_watchdog(cycle, pid, dir) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: \"%s\" is locked but pid %P is not the agent "
                      "of \"%V\"; not signalling it", path, pid, dir);
        return NGX_INVALID_PID;
    }

    return pid;
}


static ngx_int_t
ngx_http_agent_check_pid_file(ngx_cycle_t *cycle, ngx_fd_t fd, char *path)
{
    struct stat  st;

    if (fstat(fd, &st) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "agent: fstat(\"%s\") failed", path);
        return NGX_ERROR;
    }

    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "agent: \"%s\" is not a regular file of uid %uL "
                      "(owner uid %uL): remove it", path,
                      (uint64_t) geteuid(), (uint64_t) st.st_uid);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The process runs as the master's user and its command line is the one
 * ngx_http_agent_watchdog_argv() gives: "... watchdog --instance-dir DIR".
 */

static ngx_int_t
ngx_http_agent_is_our_watchdog(ngx_cycle_t *cycle, ngx_pid_t pid,
    ngx_str_t *dir)
{
    int          fd;
    u_char       proc[sizeof("/proc//cmdline") + NGX_INT64_LEN];
    u_char       cmdline[4096], want[NGX_MAX_PATH + 64], *last;
    size_t       want_len;
    ssize_t      n;
    struct stat  st;

    (void) ngx_sprintf(proc, "/proc/%P%Z", pid);

    if (stat((char *) proc, &st) == -1 || st.st_uid != geteuid()) {
        return NGX_DECLINED;
    }

    (void) ngx_sprintf(proc, "/proc/%P/cmdline%Z", pid);

    fd = open((char *) proc, O_RDONLY|O_CLOEXEC);
    if (fd == -1) {
        return NGX_DECLINED;
    }

    n = read(fd, cmdline, sizeof(cmdline));
    ngx_http_agent_close_fd(cycle, fd);

    if (n <= 0 || dir->len > NGX_MAX_PATH) {
        return NGX_DECLINED;
    }

    last = ngx_sprintf(want, "%cwatchdog%c--instance-dir%c%V%c",
                       0, 0, 0, dir, 0);
    want_len = last - want;

    if (memmem(cmdline, n, want, want_len) == NULL) {
        return NGX_DECLINED;
    }

    return NGX_OK;
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

    /* kept across a binary upgrade's exec: ngx_http_agent_adopt_nginx_fd */
    if (fcntl(ngx_http_agent_nginx_fd, F_SETFD, 0) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "agent: fcntl(F_SETFD) failed: a binary upgrade "
                      "will stop the agent");
    }

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
