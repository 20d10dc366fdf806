/*
 * Starting worker processes (see spawn_api.h).
 *
 * The core is multithreaded (the engine runs beside Python), so between
 * fork() and execve() the child may only make async-signal-safe calls:
 * everything that allocates or reads files (the argv, the environment, the
 * group list) is prepared by the caller before the fork.
 *
 * A worker with a cgroup is forked straight into it (clone3 with
 * CLONE_INTO_CGROUP): a child that moved after the fork would wait for an
 * RCU grace period, 8 ms or more. That child comes from the raw system
 * call, without what glibc's fork() resets in its child (the thread list
 * and its locks), so it switches user by raw system calls too: glibc's
 * setuid() would signal every thread of the parent's list.
 */

#define _GNU_SOURCE
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* What the child reports through the error pipe when a step fails. */
typedef struct {
    int step;
    int error;
} child_failure;

enum {
    STEP_SESSION = 1,
    STEP_CGROUP,
    STEP_FDS,
    STEP_GROUPS,
    STEP_GID,
    STEP_UID,
    STEP_DEATH_SIGNAL,
    STEP_LIFELINE,
    STEP_CWD,
    STEP_EXEC,
};

static const char *step_name(int step)
{
    switch (step) {
    case STEP_SESSION: return "setsid";
    case STEP_CGROUP: return "joining the worker's cgroup";
    case STEP_FDS: return "setting up file descriptors";
    case STEP_GROUPS: return "setgroups";
    case STEP_GID: return "setgid";
    case STEP_UID: return "setuid";
    case STEP_DEATH_SIGNAL: return "prctl(PR_SET_PDEATHSIG)";
    case STEP_LIFELINE: return "arming the lifeline (O_ASYNC)";
    case STEP_CWD: return "chdir to the app root";
    case STEP_EXEC: return "exec";
    default: return "starting the worker";
    }
}

static void report_and_exit(int pipe_fd, int step)
{
    child_failure failure = { step, errno };
    ssize_t ignored = write(pipe_fd, &failure, sizeof failure);
    (void) ignored;
    _exit(127);
}

/* Moves fd to target unless it is already there. dup2 clears CLOEXEC on
 * the copy, which is what the worker needs. */
static int place_fd(int fd, int target)
{
    if (fd == target) {
        int flags = fcntl(fd, F_GETFD);
        return flags < 0 ? -1 : fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
    }
    return dup2(fd, target) < 0 ? -1 : 0;
}

/* Closes every fd from `first` on but `keep`. */
static int close_fds_from(int first, int keep)
{
    if (syscall(SYS_close_range, (unsigned) first, (unsigned) keep - 1, 0) == 0
        && syscall(SYS_close_range, (unsigned) keep + 1, ~0U, 0) == 0)
        return 0;
    if (errno != ENOSYS)
        return -1;
    /* Kernels before 5.9: close one by one up to the fd limit. */
    for (int fd = first; fd < 65536; fd++)
        if (fd != keep)
            close(fd);
    return 0;
}

/* An optional fd (-1: none) lifted above the worker's range; -2 when
 * dup fails, so the caller tells "none" from an error. */
static int lift_optional(int fd)
{
    if (fd < 0)
        return -1;
    fd = fcntl(fd, F_DUPFD_CLOEXEC, 10);
    return fd < 0 ? -2 : fd;
}

/* A generic worker: 0 /dev/null, 1 and 2 the output pipe, 3 its lifeline
 * (when given), nothing else. */
static int arrange_generic_fds(const agent_spawn_spec *spec, int error_pipe)
{
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int output_fd = fcntl(spec->output_fd, F_DUPFD_CLOEXEC, 10);
    int lifeline_fd = lift_optional(spec->lifeline_fd);

    if (devnull < 0 || output_fd < 0 || lifeline_fd == -2)
        return -1;
    if (place_fd(devnull, 0) < 0 || place_fd(output_fd, 1) < 0 || place_fd(output_fd, 2) < 0)
        return -1;
    if (lifeline_fd >= 0 && place_fd(lifeline_fd, 3) < 0)
        return -1;
    return close_fds_from(lifeline_fd >= 0 ? 4 : 3, error_pipe);
}

/* fd 3, the lifeline: when the core's end closes, the kernel sends SIGKILL
 * to the worker's process group (this process leads it since setsid). */
static int watch_lifeline(void)
{
    int flags;

    if (fcntl(3, F_SETOWN, -getpid()) < 0 || fcntl(3, F_SETSIG, SIGKILL) < 0)
        return -1;
    flags = fcntl(3, F_GETFL);
    if (flags < 0 || fcntl(3, F_SETFL, flags | O_ASYNC | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

/* The source fds may sit on each other's targets (0..6), so first lift
 * them above the range, then place them. */
static int arrange_fds(const agent_spawn_spec *spec, int error_pipe)
{
    if (spec->listen_fd < 0)
        return arrange_generic_fds(spec, error_pipe);
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int listen_fd = fcntl(spec->listen_fd, F_DUPFD_CLOEXEC, 10);
    int ready_fd = fcntl(spec->ready_fd, F_DUPFD_CLOEXEC, 10);
    int output_fd = fcntl(spec->output_fd, F_DUPFD_CLOEXEC, 10);
    int startup_fd = lift_optional(spec->startup_fd);
    int env_fd = lift_optional(spec->env_fd);
    int first_closed = 5;

    if (devnull < 0 || listen_fd < 0 || ready_fd < 0 || output_fd < 0 || startup_fd == -2 || env_fd == -2)
        return -1;
    if (place_fd(devnull, 0) < 0 || place_fd(output_fd, 1) < 0 || place_fd(output_fd, 2) < 0
        || place_fd(listen_fd, 3) < 0 || place_fd(ready_fd, 4) < 0)
        return -1;
    /* fd 5 stays free when there is no startup fd, so that the loader
     * never mistakes another fd for the checked file. */
    if (startup_fd >= 0 && place_fd(startup_fd, 5) < 0)
        return -1;
    if (env_fd >= 0) {
        if (place_fd(env_fd, 6) < 0)
            return -1;
        first_closed = 7;
    } else if (startup_fd >= 0) {
        first_closed = 6;
    }
    if (startup_fd < 0 && env_fd >= 0 && close(5) < 0 && errno != EBADF)
        return -1;
    /* Everything above goes, except the error pipe, which is CLOEXEC and
     * closes itself at exec. */
    if (close_fds_from(first_closed, error_pipe) < 0)
        return -1;
    return 0;
}

/* Moves this process into the worker's cgroup, while still root (a child
 * that fork() made, not born in it): the kernel then counts every process
 * the app starts in it, setsid or not. */
static int join_cgroup(int cgroup_fd)
{
    static const char self[] = "0";
    ssize_t n;
    int procs_fd;

    if (cgroup_fd < 0)
        return 0;
    procs_fd = openat(cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC);
    if (procs_fd < 0)
        return -1;
    do {
        n = write(procs_fd, self, sizeof self - 1);
    } while (n < 0 && errno == EINTR);
    close(procs_fd);
    return n == (ssize_t) (sizeof self - 1) ? 0 : -1;
}

/* clone3's arguments up to the cgroup (Linux 5.7), as linux/sched.h has
 * them: the kernel takes any prefix of the struct it knows by its size. */
typedef struct {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size,
        cgroup;
} clone3_args;

#define SPAWN_CLONE_INTO_CGROUP 0x200000000ULL

/* The calls that take 32-bit ids: on 32-bit ABIs the plain ones take 16. */
#ifdef SYS_setgroups32
#define SPAWN_SYS_SETGROUPS SYS_setgroups32
#define SPAWN_SYS_SETGID SYS_setgid32
#define SPAWN_SYS_SETUID SYS_setuid32
#else
#define SPAWN_SYS_SETGROUPS SYS_setgroups
#define SPAWN_SYS_SETGID SYS_setgid
#define SPAWN_SYS_SETUID SYS_setuid
#endif

/* fork(), with the child born in the cgroup cgroup_fd names (-1: none);
 * *born_inside says whether it was. Where clone3 is refused (a seccomp
 * filter's ENOSYS, a kernel before 5.7) fork() serves, and the child
 * joins the cgroup itself. */
static pid_t fork_into(int cgroup_fd, bool *born_inside)
{
    *born_inside = false;
    if (cgroup_fd >= 0) {
        clone3_args args;
        long pid;

        memset(&args, 0, sizeof args);
        args.flags = SPAWN_CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.cgroup = (uint64_t) cgroup_fd;
        pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid >= 0) {
            *born_inside = true;
            return (pid_t) pid;
        }
    }
    return fork();
}

static void reset_signals(void)
{
    sigset_t none;
    struct sigaction dfl;

    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL);  /* fails harmlessly for SIGKILL, SIGSTOP */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void switch_user(const agent_spawn_spec *spec, int error_pipe)
{
    if (spec->uid < 0)
        return;
    if (syscall(SPAWN_SYS_SETGROUPS, (long) spec->ngroups, (const gid_t *) spec->groups) < 0)
        report_and_exit(error_pipe, STEP_GROUPS);
    if (spec->gid >= 0 && syscall(SPAWN_SYS_SETGID, (long) spec->gid) < 0)
        report_and_exit(error_pipe, STEP_GID);
    if (syscall(SPAWN_SYS_SETUID, (long) spec->uid) < 0)
        report_and_exit(error_pipe, STEP_UID);
}

static void run_child(const agent_spawn_spec *spec, pid_t parent, bool born_inside, int error_pipe)
{
    /* The error pipe may sit on 3 or 4, where the worker's fds go. */
    int high = fcntl(error_pipe, F_DUPFD_CLOEXEC, 10);

    if (high < 0)
        report_and_exit(error_pipe, STEP_FDS);
    error_pipe = high;
    reset_signals();
    if (setsid() < 0)
        report_and_exit(error_pipe, STEP_SESSION);
    if (!born_inside && join_cgroup(spec->cgroup_fd) < 0)
        report_and_exit(error_pipe, STEP_CGROUP);
    if (arrange_fds(spec, error_pipe) < 0)
        report_and_exit(error_pipe, STEP_FDS);
    if (spec->listen_fd < 0 && spec->lifeline_fd >= 0 && watch_lifeline() < 0)
        report_and_exit(error_pipe, STEP_LIFELINE);
    switch_user(spec, error_pipe);
    /* Set after the user switch, which clears it. */
    if (spec->death_signal > 0) {
        if (prctl(PR_SET_PDEATHSIG, spec->death_signal) < 0)
            report_and_exit(error_pipe, STEP_DEATH_SIGNAL);
        if (getppid() != parent)  /* the core died before prctl took effect */
            _exit(127);
    }
    if (chdir(spec->cwd) < 0)
        report_and_exit(error_pipe, STEP_CWD);
    execve(spec->path, spec->argv, spec->envp);
    report_and_exit(error_pipe, STEP_EXEC);
}

/* Reads the child's failure report; returns 0 when exec succeeded (the
 * pipe closed empty), else fills error and returns -1. */
static int read_child_failure(int fd, pid_t pid, const char *path, char *error, size_t error_size)
{
    child_failure failure;
    ssize_t n;

    do {
        n = read(fd, &failure, sizeof failure);
    } while (n < 0 && errno == EINTR);
    if (n == 0)
        return 0;
    if (n != (ssize_t) sizeof failure) {
        failure.step = 0;
        failure.error = n < 0 ? errno : EIO;
    }
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    snprintf(error, error_size, "%s failed for %s: %s", step_name(failure.step), path,
             strerror(failure.error));
    errno = failure.error;
    return -1;
}

int agent_spawn(const agent_spawn_spec *spec, char *error, size_t error_size)
{
    int pipe_fds[2];
    pid_t parent = getpid();
    pid_t pid;
    bool born_inside;
    int saved;

    if (pipe2(pipe_fds, O_CLOEXEC) < 0) {
        snprintf(error, error_size, "pipe2: %s", strerror(errno));
        return -1;
    }
    pid = fork_into(spec->cgroup_fd, &born_inside);
    if (pid < 0) {
        saved = errno;
        snprintf(error, error_size, "fork: %s", strerror(saved));
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        errno = saved;
        return -1;
    }
    if (pid == 0) {
        close(pipe_fds[0]);
        run_child(spec, parent, born_inside, pipe_fds[1]);
    }
    close(pipe_fds[1]);
    saved = read_child_failure(pipe_fds[0], pid, spec->path, error, error_size);
    close(pipe_fds[0]);
    return saved < 0 ? -1 : pid;
}

int agent_become_subreaper(void)
{
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0 ? -1 : 0;
}
