/*
 * Starting worker processes.
 *
 * agent_spawn() forks a child that becomes a worker: its own session (so
 * its own process group, which the core kills whole), its own cgroup when
 * the core made one, stdin on /dev/null, stdout and stderr on the core's
 * log pipe, the listening socket on fd 3 (a generic worker: its lifeline), the handshake pipe on fd 4, the
 * startup file the core checked on fd 5 and the app's environment on fd 6
 * (when given), every other fd closed, cwd at the app root, the app's user
 * and groups, then execve(). The child uses only async-signal-safe calls
 * and raw system calls between fork and exec, because the core is
 * multithreaded. An exec that
 * fails is reported back through a close-on-exec pipe, so the caller gets
 * the errno rather than a worker that silently never answers.
 *
 * This header is also the cffi cdef: plain declarations only.
 */

typedef struct {
    const char *path;            /* executable, absolute or found on PATH of envp */
    char *const *argv;           /* NULL-terminated */
    char *const *envp;           /* NULL-terminated */
    const char *cwd;
    int uid;                     /* -1: keep the caller's */
    int gid;                     /* -1: keep the caller's */
    const unsigned int *groups;  /* supplementary groups, set when uid is switched */
    int ngroups;
    int listen_fd;               /* becomes fd 3; -1: a generic worker, which has none (nor a ready_fd) */
    int ready_fd;                /* becomes fd 4; -1 with listen_fd -1 */
    int output_fd;               /* becomes fds 1 and 2 */
    int startup_fd;              /* becomes fd 5; -1: none */
    int env_fd;                  /* becomes fd 6; -1: none */
    int cgroup_fd;               /* the worker's cgroup, its directory opened: the child is born in it (clone3),
                                    or joins it by its cgroup.procs before the user switch; -1: none */
    int death_signal;            /* sent to the worker when the core dies; 0: none */
    int lifeline_fd;             /* a generic worker's (listen_fd -1): the read end of a pipe whose write end
                                    only the core holds; it becomes fd 3 with O_ASYNC, owned by the worker's
                                    process group, signal SIGKILL, so that when the core ends the kernel kills
                                    the group, whatever the app forked; -1: none */
} agent_spawn_spec;

/* Returns the child's pid, or -1 with a message in error (errno kept). */
int agent_spawn(const agent_spawn_spec *spec, char *error, size_t error_size);

/* Makes the caller a child subreaper (PR_SET_CHILD_SUBREAPER): the workers
 * a preloader forked become the core's children when the preloader dies,
 * so that the core reaps them and learns how they ended. 0, or -1 with
 * errno. */
int agent_become_subreaper(void);
