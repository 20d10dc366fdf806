/*
 * THROWAWAY PROTOTYPE (issue 9, item 1): the mechanics of five data paths,
 * measured without nginx, Python or the real engine. Not part of the build;
 * nothing under agent/, csrc/ or nginx-module/ uses it. See
 * bench/prototypes/README.md and docs/design.md, "The data path: candidates
 * measured".
 *
 * Processes: P "nginx" processes (one epoll loop each, C requests in flight
 * each, closed loop like wrk), W "app workers" (concurrency 1, a hello-world
 * response computed once), and for the relay modes one "core" (epoll loop).
 *
 *   relay      today's hop: nginx connects to agent.sock per request; the core
 *              accepts, reads the frame, writes it on a kept worker connection,
 *              strips the records, writes the bytes to nginx, closes.
 *   relay_ka   the same hop with the nginx<->core connection kept alive: the
 *              core forwards the records unchanged, nginx finds the end record.
 *   fdpass     the core accepts, peeks at the frame, passes the accepted fd to
 *              an idle worker with SCM_RIGHTS and closes its copy; the worker
 *              answers on nginx's connection and tells the core it is done.
 *   direct     nginx claims an idle worker in a shared table (CAS on an mmap'd
 *              file), connects to its socket per request, reads the records to
 *              the end record, releases the claim; a request that finds no idle
 *              worker waits in the nginx process and is handed the next worker
 *              that nginx process releases (or woken by another's release).
 *   direct_ka  direct with the nginx->worker connections kept (one per nginx
 *              process and worker); the worker polls its connections when
 *              there are several nginx processes.
 *
 * Output: one line per process "role pid requests utime_us stime_us nvcsw
 * nivcsw" from wait4(), then "elapsed_s requests". measure.py turns them (and
 * strace -ff files) into per-request tables.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <stddef.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAXW 16
#define MAXP 8
#define MAXC 256
#define BUFSZ 65536

enum mode { RELAY, RELAY_KA, FDPASS, DIRECT, DIRECT_KA };
static enum mode mode;
static int nworkers = 2, nprocs = 1, conc = 16;
static long total_requests = 100000;
static char dir[256];

static void die(const char *what) { perror(what); _exit(111); }

/* ---- the wire: a request frame like nginx's for GET /, records back ---- */
static unsigned char frame[2048];
static size_t frame_len;
static unsigned char resp_records[512], resp_raw[512];
static size_t resp_records_len, resp_raw_len;

static void put32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint32_t get32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

static void build_wire(void) {
    static const char *pairs[][2] = {
        {"AGENT_APP", "/srv/hello"}, {"REQUEST_METHOD", "GET"}, {"REQUEST_URI", "/"},
        {"PATH_INFO", "/"}, {"QUERY_STRING", ""}, {"SCRIPT_NAME", ""}, {"SERVER_NAME", "localhost"},
        {"SERVER_PORT", "8080"}, {"SERVER_PROTOCOL", "HTTP/1.1"}, {"REMOTE_ADDR", "127.0.0.1"},
        {"REMOTE_PORT", "50412"}, {"CONTENT_LENGTH", "0"}, {"HTTP_HOST", "localhost:8080"},
        {"HTTP_USER_AGENT", "wrk/4.1.0"}, {"HTTP_ACCEPT", "*/*"}, {"HTTP_CONNECTION", "close"},
    };
    size_t n = 4;
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        for (int k = 0; k < 2; k++) {
            size_t l = strlen(pairs[i][k]);
            put32(frame + n, (uint32_t)l);
            memcpy(frame + n + 4, pairs[i][k], l);
            n += 4 + l;
        }
    }
    put32(frame, (uint32_t)(n - 4));
    frame_len = n;
    const char *http = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nHello, world";
    resp_raw_len = strlen(http);
    memcpy(resp_raw, http, resp_raw_len);
    put32(resp_records, (uint32_t)resp_raw_len);
    memcpy(resp_records + 4, http, resp_raw_len);
    put32(resp_records + 4 + resp_raw_len, 0);
    resp_records_len = resp_raw_len + 8;
}

/* records parser: feed bytes, returns 1 once the end record went by */
struct recs { unsigned char hdr[4]; int hlen; uint32_t left; };
static int recs_feed(struct recs *r, const unsigned char *p, size_t n, int *done) {
    size_t i = 0;
    while (i < n) {
        if (r->left) {
            size_t take = n - i < r->left ? n - i : r->left;
            r->left -= (uint32_t)take; i += take; continue;
        }
        r->hdr[r->hlen++] = p[i++];
        if (r->hlen == 4) {
            r->hlen = 0;
            r->left = get32(r->hdr);
            if (r->left == 0) { *done = 1; return i == n ? 0 : -1; }
        }
    }
    return 0;
}

/* ---- the shared table of the direct modes ---- */
struct slot { _Atomic uint32_t state; /* 0 idle, else claimant pid */ _Atomic uint64_t served; };
struct table { struct slot w[MAXW]; _Atomic uint32_t waiting[MAXP]; };
static struct table *tab;
static int wake_fd[MAXP]; /* eventfd per nginx process: "a worker went idle" */

static int sock_path(struct sockaddr_un *sa, const char *name) {
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    return snprintf(sa->sun_path, sizeof sa->sun_path, "%s/%s", dir, name) < (int)sizeof sa->sun_path ? 0 : -1;
}
static int listen_on(const char *name) {
    struct sockaddr_un sa;
    if (sock_path(&sa, name)) die("path");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    unlink(sa.sun_path);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 4096)) die("bind/listen");
    return fd;
}
static int connect_to(const char *name, int nonblock) {
    struct sockaddr_un sa;
    if (sock_path(&sa, name)) die("path");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) die("connect");
    return fd;
}
static ssize_t read_frame(int fd, unsigned char *buf) {
    size_t got = 0;
    while (got < 4 || got < 4 + get32(buf)) {
        ssize_t n = recv(fd, buf + got, BUFSZ - got, 0);
        if (n <= 0) return n;
        got += (size_t)n;
    }
    return (ssize_t)got;
}
static void write_all(int fd, const void *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EINTR) continue; die("send"); }
        p = (const char *)p + w; n -= (size_t)w;
    }
}

/* ---- app worker ---- */
static void worker_conn_loop(int listener) {
    static unsigned char buf[BUFSZ];
    for (;;) {
        int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) { if (errno == EINTR) continue; die("accept"); }
        while (read_frame(c, buf) > 0) write_all(c, resp_records, resp_records_len);
        close(c);
    }
}
static void worker_poll_loop(int listener) {
    static unsigned char buf[BUFSZ];
    struct pollfd pf[MAXP + 2];
    int n = 1;
    pf[0].fd = listener; pf[0].events = POLLIN;
    for (;;) {
        if (poll(pf, (nfds_t)n, -1) < 0) { if (errno == EINTR) continue; die("poll"); }
        for (int i = n - 1; i >= 1; i--) {
            if (!pf[i].revents) continue;
            if (read_frame(pf[i].fd, buf) > 0) { write_all(pf[i].fd, resp_records, resp_records_len); continue; }
            close(pf[i].fd); pf[i] = pf[--n];
        }
        if (pf[0].revents & POLLIN) {
            int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) die("accept");
            if (n == MAXP + 2) die("too many conns");
            pf[n].fd = c; pf[n].events = POLLIN; n++;
        }
    }
}
static void worker_fdpass_loop(int ctl) {
    static unsigned char buf[BUFSZ];
    for (;;) {
        char byte; char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {&byte, 1};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        ssize_t r = recvmsg(ctl, &m, MSG_CMSG_CLOEXEC);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; _exit(0); }
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        if (!cm || cm->cmsg_type != SCM_RIGHTS) die("no fd");
        int fd; memcpy(&fd, CMSG_DATA(cm), sizeof fd);
        if (read_frame(fd, buf) > 0) write_all(fd, resp_raw, resp_raw_len);
        close(fd);
        write_all(ctl, "d", 1);
    }
}

/* ---- the core (relay modes) ---- */
struct rconn { int fd, worker, is_worker; struct recs rs; unsigned char buf[BUFSZ]; size_t got; int queued_next; };
static void relay_loop(int listener, int *wfd /* worker conns or fdpass ctl */) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll");
    static struct rconn *byfd[65536];
    int busy[MAXW] = {0}, client_of[MAXW];
    int queue[MAXC * MAXP], qh = 0, qt = 0;
    static unsigned char buf[BUFSZ];
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = listener;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev)) die("epoll_ctl");
    for (int i = 0; i < nworkers; i++) {
        struct rconn *w = calloc(1, sizeof *w);
        w->fd = wfd[i]; w->worker = i; w->is_worker = 1; byfd[wfd[i]] = w;
        ev.data.fd = wfd[i];
        if (epoll_ctl(ep, EPOLL_CTL_ADD, wfd[i], &ev)) die("epoll_ctl");
    }
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int e = 0; e < n; e++) {
            int fd = evs[e].data.fd;
            if (fd == listener) {
                for (;;) {
                    int c = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) { if (errno == EAGAIN) break; die("accept"); }
                    struct rconn *r = byfd[c];
                    if (!r) r = byfd[c] = malloc(sizeof *r);
                    memset(r, 0, offsetof(struct rconn, buf));
                    r->fd = c; r->worker = -1;
                    ev.data.fd = c;
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev)) die("epoll_ctl");
                }
                continue;
            }
            struct rconn *r = byfd[fd];
            if (r->is_worker) {
                int w = r->worker, done = 0;
                if (mode == FDPASS) {
                    if (recv(fd, buf, 1, 0) != 1) die("ctl");
                    done = 1;
                } else {
                    ssize_t got = recv(fd, buf, BUFSZ, 0);
                    if (got <= 0) die("worker closed");
                    struct rconn *c = byfd[client_of[w]];
                    if (mode == RELAY) { /* strip the records */
                        size_t i = 0, out = 0; static unsigned char o[BUFSZ];
                        while (i < (size_t)got) {
                            if (r->rs.left) {
                                size_t take = (size_t)got - i < r->rs.left ? (size_t)got - i : r->rs.left;
                                memcpy(o + out, buf + i, take); out += take; i += take; r->rs.left -= (uint32_t)take; continue;
                            }
                            r->rs.hdr[r->rs.hlen++] = buf[i++];
                            if (r->rs.hlen == 4) { r->rs.hlen = 0; r->rs.left = get32(r->rs.hdr); if (!r->rs.left) done = 1; }
                        }
                        if (out) write_all(c->fd, o, out);
                        if (done) close(c->fd);
                    } else { /* RELAY_KA: forward unchanged */
                        if (recs_feed(&r->rs, buf, (size_t)got, &done) < 0) die("records");
                        write_all(c->fd, buf, (size_t)got);
                    }
                }
                if (done) {
                    busy[w] = 0;
                    if (qh != qt) { /* the next queued request */
                        int cfd = queue[qh++ % (MAXC * MAXP)];
                        struct rconn *c = byfd[cfd];
                        busy[w] = 1; client_of[w] = cfd;
                        if (mode == FDPASS) goto pass_fd_again;
                        write_all(wfd[w], c->buf, c->got);
                        c->got = 0;
                        continue;
                    pass_fd_again: {
                            char cbuf[CMSG_SPACE(sizeof(int))] = {0}; char b = 'r';
                            struct iovec iov = {&b, 1};
                            struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
                            struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
                            cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
                            memcpy(CMSG_DATA(cm), &cfd, sizeof cfd);
                            if (sendmsg(wfd[w], &m, MSG_NOSIGNAL) != 1) die("sendmsg");
                            close(cfd);
                        }
                    }
                }
                continue;
            }
            /* nginx connection: a frame (or the end of a kept connection) */
            if (mode == FDPASS) { /* peek at the frame: the app's name is in it */
                ssize_t got = recv(fd, r->buf, BUFSZ, MSG_PEEK);
                if (got <= 0) { close(fd); continue; }
                if (got < 4 || (size_t)got < 4 + get32(r->buf)) continue; /* not whole yet */
                if (epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL)) die("epoll_ctl del");
            } else {
                ssize_t got = recv(fd, r->buf + r->got, BUFSZ - r->got, 0);
                if (got <= 0) { close(fd); continue; }
                r->got += (size_t)got;
                if (r->got < 4 || r->got < 4 + get32(r->buf)) continue;
            }
            int w = -1;
            for (int i = 0; i < nworkers; i++) if (!busy[i]) { w = i; break; }
            if (w < 0) { queue[qt++ % (MAXC * MAXP)] = fd; continue; }
            busy[w] = 1; client_of[w] = fd;
            if (mode == FDPASS) {
                char cbuf[CMSG_SPACE(sizeof(int))] = {0}; char b = 'r';
                struct iovec iov = {&b, 1};
                struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
                struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
                cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cm), &fd, sizeof fd);
                if (sendmsg(wfd[w], &m, MSG_NOSIGNAL) != 1) die("sendmsg");
                close(fd);
            } else {
                write_all(wfd[w], r->buf, r->got);
                r->got = 0;
            }
        }
    }
}

/* ---- nginx process ---- */
struct req { int fd, worker; struct recs rs; int waiting; };
static long done_requests, started_requests, my_share;
static int me, ep_c;
static struct req reqs[MAXC];
static int ka_fd[MAXW]; /* direct_ka: kept connection per worker */
static int ka_req[MAXW]; /* direct_ka: the request on that connection */
static int waitq[MAXC], wq_h, wq_t;

static void reg(int fd, int idx) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep_c, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl");
}
static uint32_t my_pid; /* the claimant's mark: cached, not a getpid() per claim */
static int claim(void) {
    uint32_t pid = my_pid;
    for (int i = 0; i < nworkers; i++) {
        uint32_t idle = 0;
        if (atomic_load_explicit(&tab->w[i].state, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&tab->w[i].state, &idle, pid)) return i;
    }
    return -1;
}
static void send_on_worker(int i, int w) {
    struct req *q = &reqs[i];
    q->worker = w; memset(&q->rs, 0, sizeof q->rs);
    if (mode == DIRECT_KA) {
        if (ka_fd[w] < 0) { char name[32]; snprintf(name, sizeof name, "w%d.sock", w); ka_fd[w] = connect_to(name, 1); reg(ka_fd[w], MAXC + 1 + w); }
        ka_req[w] = i;
        q->fd = ka_fd[w];
    } else {
        char name[32]; snprintf(name, sizeof name, "w%d.sock", w);
        q->fd = connect_to(name, 1); reg(q->fd, i);
    }
    write_all(q->fd, frame, frame_len);
}
static void start_request(int i) {
    struct req *q = &reqs[i];
    started_requests++;
    if (mode == DIRECT || mode == DIRECT_KA) {
        int w = claim();
        if (w >= 0) { send_on_worker(i, w); return; }
        /* none idle: wait here; say so before trying once more (no lost wake-up) */
        atomic_fetch_add(&tab->waiting[me], 1);
        w = claim();
        if (w >= 0) { atomic_fetch_sub(&tab->waiting[me], 1); send_on_worker(i, w); return; }
        q->waiting = 1; waitq[wq_t++ % MAXC] = i;
        return;
    }
    memset(&q->rs, 0, sizeof q->rs);
    if (mode == RELAY_KA) {
        if (q->fd <= 0) { q->fd = connect_to("agent.sock", 1); reg(q->fd, i); }
    } else {
        q->fd = connect_to("agent.sock", 1); reg(q->fd, i);
    }
    write_all(q->fd, frame, frame_len);
}
static void release(int w) {
    atomic_fetch_add_explicit(&tab->w[w].served, 1, memory_order_relaxed);
    if (wq_h != wq_t) { /* hand the worker to a request waiting here: the claim stays */
        int i = waitq[wq_h++ % MAXC];
        reqs[i].waiting = 0; atomic_fetch_sub(&tab->waiting[me], 1);
        send_on_worker(i, w);
        return;
    }
    atomic_store(&tab->w[w].state, 0);
    for (int k = 1; k < nprocs; k++) { /* another nginx process has waiters: wake it */
        int p = (me + k) % nprocs;
        if (atomic_load(&tab->waiting[p])) { uint64_t one = 1; if (write(wake_fd[p], &one, 8) != 8) die("eventfd"); break; }
    }
}
static void nginx_loop(void) {
    ep_c = epoll_create1(EPOLL_CLOEXEC);
    if (ep_c < 0) die("epoll");
    my_pid = (uint32_t)getpid();
    for (int w = 0; w < MAXW; w++) ka_fd[w] = -1;
    if (nprocs > 1 && (mode == DIRECT || mode == DIRECT_KA)) reg(wake_fd[me], MAXC);
    static unsigned char buf[BUFSZ];
    int inflight = conc;
    for (int i = 0; i < conc; i++) { reqs[i].fd = -1; start_request(i); }
    while (inflight) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep_c, evs, 64, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int e = 0; e < n; e++) {
            uint32_t i = evs[e].data.u32;
            if (i == MAXC) { /* woken: a worker went idle in another process */
                uint64_t v; if (read(wake_fd[me], &v, 8) != 8) die("eventfd read");
                while (wq_h != wq_t) {
                    int w = claim();
                    if (w < 0) break;
                    int k = waitq[wq_h++ % MAXC]; reqs[k].waiting = 0; atomic_fetch_sub(&tab->waiting[me], 1);
                    send_on_worker(k, w);
                }
                continue;
            }
            if (i > MAXC) i = (uint32_t)ka_req[i - MAXC - 1];
            struct req *q = &reqs[i];
            ssize_t got = recv(q->fd, buf, BUFSZ, 0);
            int done = 0;
            if (got < 0) { if (errno == EAGAIN) continue; die("recv"); }
            if (mode == RELAY || mode == FDPASS) {
                if (got == 0) { close(q->fd); q->fd = -1; done = 1; }
            } else {
                if (got == 0) die("early eof");
                if (recs_feed(&q->rs, buf, (size_t)got, &done) < 0) die("records");
            }
            if (!done) continue;
            done_requests++;
            if (mode == DIRECT) { close(q->fd); q->fd = -1; }
            int next = started_requests < my_share;
            if (mode == DIRECT || mode == DIRECT_KA) {
                int w = q->worker;
                if (next) { /* join the back of the line: others may wait already */
                    start_request((int)i);
                }
                release(w);
            } else if (next) start_request((int)i);
            if (!next) inflight--;
        }
    }
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s relay|relay_ka|fdpass|direct|direct_ka [conc] [requests] [nginx_procs] [workers]\n", argv[0]); return 2; }
    const char *names[] = {"relay", "relay_ka", "fdpass", "direct", "direct_ka"};
    int found = 0;
    for (int i = 0; i < 5; i++) if (!strcmp(argv[1], names[i])) { mode = (enum mode)i; found = 1; }
    if (!found) { fprintf(stderr, "unknown mode\n"); return 2; }
    if (argc > 2) conc = atoi(argv[2]);
    if (argc > 3) total_requests = atol(argv[3]);
    if (argc > 4) nprocs = atoi(argv[4]);
    if (argc > 5) nworkers = atoi(argv[5]);
    if (conc < 1 || conc > MAXC - 1 || nprocs < 1 || nprocs > MAXP || nworkers < 1 || nworkers > MAXW) { fprintf(stderr, "bad sizes\n"); return 2; }
    build_wire();
    snprintf(dir, sizeof dir, "/tmp/dp-proto-%d", getpid());
    if (mkdir(dir, 0700)) die("mkdir");
    tab = mmap(NULL, sizeof *tab, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (tab == MAP_FAILED) die("mmap");
    memset(tab, 0, sizeof *tab);
    for (int p = 0; p < nprocs; p++) if ((wake_fd[p] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) die("eventfd");

    pid_t wp[MAXW], rp = 0, np[MAXP];
    int ctl[MAXW][2];
    for (int w = 0; w < nworkers; w++) {
        int l = -1;
        if (mode == FDPASS) { if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl[w])) die("socketpair"); }
        else { char name[32]; snprintf(name, sizeof name, "w%d.sock", w); l = listen_on(name); }
        if ((wp[w] = fork()) < 0) die("fork");
        if (!wp[w]) {
            if (mode == FDPASS) { close(ctl[w][0]); worker_fdpass_loop(ctl[w][1]); }
            else if (mode == DIRECT_KA && nprocs > 1) worker_poll_loop(l);
            else worker_conn_loop(l);
            _exit(0);
        }
        if (mode == FDPASS) close(ctl[w][1]); else close(l);
    }
    if (mode == RELAY || mode == RELAY_KA || mode == FDPASS) {
        int l = listen_on("agent.sock");
        int wfd[MAXW];
        for (int w = 0; w < nworkers; w++) {
            if (mode == FDPASS) wfd[w] = ctl[w][0];
            else { char name[32]; snprintf(name, sizeof name, "w%d.sock", w); wfd[w] = connect_to(name, 1); }
        }
        if ((rp = fork()) < 0) die("fork");
        if (!rp) { if (fcntl(l, F_SETFL, O_NONBLOCK)) die("fcntl"); relay_loop(l, wfd); _exit(0); }
        close(l);
        for (int w = 0; w < nworkers; w++) close(wfd[w]);
    }
    double t0 = now();
    for (int p = 0; p < nprocs; p++) {
        if ((np[p] = fork()) < 0) die("fork");
        if (!np[p]) { me = p; my_share = total_requests / nprocs; nginx_loop(); printf("#done %d %ld\n", p, done_requests); _exit(0); }
    }
    struct rusage ru;
    for (int p = 0; p < nprocs; p++) {
        if (wait4(np[p], NULL, 0, &ru) < 0) die("wait4");
        printf("nginx %d %ld %ld %ld %ld %ld\n", np[p], total_requests / nprocs,
               ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec, ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec, ru.ru_nvcsw, ru.ru_nivcsw);
    }
    double el = now() - t0;
    if (rp) { kill(rp, SIGKILL); if (wait4(rp, NULL, 0, &ru) < 0) die("wait4");
        printf("core %d %ld %ld %ld %ld %ld\n", rp, total_requests, ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec, ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec, ru.ru_nvcsw, ru.ru_nivcsw); }
    for (int w = 0; w < nworkers; w++) {
        kill(wp[w], SIGKILL);
        if (wait4(wp[w], NULL, 0, &ru) < 0) die("wait4");
        printf("worker %d %ld %ld %ld %ld %ld served=%lu\n", wp[w], total_requests, ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec, ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec, ru.ru_nvcsw, ru.ru_nivcsw,
               (unsigned long)atomic_load(&tab->w[w].served));
    }
    printf("elapsed %.3f %ld\n", el, total_requests);
    char path[300];
    for (int w = 0; w < nworkers; w++) { snprintf(path, sizeof path, "%s/w%d.sock", dir, w); unlink(path); }
    snprintf(path, sizeof path, "%s/agent.sock", dir); unlink(path);
    rmdir(dir);
    return 0;
}
