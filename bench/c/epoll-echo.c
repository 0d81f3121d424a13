/*
 * A single-threaded echo server with no runtime under it, for the
 * benchmark's CPU-per-message comparison (bench/src/cpu.rs): what a
 * careful C server spends on each message, so the figures for wasm-echo and
 * the tokio baselines have a floor that is not itself tokio.
 *
 * UDP: recvmmsg/sendmmsg, up to BATCH datagrams per system call, each
 * answered with its own bytes. TCP: level-triggered epoll, every chunk read
 * written back (raw framing, as the benchmark's servers do), with a pending
 * buffer and EPOLLOUT when the peer reads slower than it writes.
 *
 * It binds 127.0.0.1 ephemeral ports, prints `listening udp ADDR` and
 * `listening tcp ADDR`, and exits when its standard input closes, so it
 * never outlives the bench that started it. Built by
 * scripts/build-bench-baseline.sh.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 32
#define DATAGRAM 65536
#define CHUNK 65536
#define EVENTS 256

/* One TCP connection: bytes read but not yet written back. */
struct conn {
    int fd;
    char *pending;
    size_t len;
    size_t off;
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int bound(int type, struct sockaddr_in *addr) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)addr, sizeof *addr) < 0) die("bind");
    socklen_t len = sizeof *addr;
    if (getsockname(fd, (struct sockaddr *)addr, &len) < 0) die("getsockname");
    return fd;
}

static void watch(int ep, int fd, uint32_t events, void *ptr) {
    struct epoll_event ev = {.events = events, .data.ptr = ptr};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void rewatch(int ep, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void drop_conn(struct conn *c) {
    close(c->fd); /* also leaves the epoll set */
    free(c->pending);
    free(c);
}

/* Answers every datagram waiting on `fd`, a batch per system call. */
static void serve_udp(int fd) {
    static char bufs[BATCH][DATAGRAM];
    static struct iovec iov[BATCH];
    static struct sockaddr_in peers[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = DATAGRAM;
            msgs[i].msg_hdr = (struct msghdr){
                .msg_name = &peers[i],
                .msg_namelen = sizeof peers[i],
                .msg_iov = &iov[i],
                .msg_iovlen = 1,
            };
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return; /* EAGAIN: drained */
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        /* A full socket buffer drops replies, as a datagram server may. */
        (void)sendmmsg(fd, msgs, n, MSG_DONTWAIT);
    }
}

/* Writes what `c` has pending; returns -1 when the connection is gone. */
static int flush(int ep, struct conn *c) {
    while (c->off < c->len) {
        ssize_t w = write(c->fd, c->pending + c->off, c->len - c->off);
        if (w < 0) {
            if (errno == EAGAIN) {
                rewatch(ep, c, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        c->off += (size_t)w;
    }
    c->len = c->off = 0;
    rewatch(ep, c, EPOLLIN);
    return 0;
}

/* Echoes what `c` has to read; returns -1 when the connection is gone. */
static int serve_tcp(int ep, struct conn *c) {
    static char buf[CHUNK];
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n == 0) return -1;
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    ssize_t w = write(c->fd, buf, (size_t)n);
    if (w == n) return 0;
    if (w < 0 && errno != EAGAIN) return -1;
    size_t done = w < 0 ? 0 : (size_t)w;
    c->pending = realloc(c->pending, (size_t)n - done);
    if (!c->pending) die("realloc");
    memcpy(c->pending, buf + done, (size_t)n - done);
    c->len = (size_t)n - done;
    c->off = 0;
    return flush(ep, c);
}

int main(void) {
    struct sockaddr_in udp_addr, tcp_addr;
    int udp = bound(SOCK_DGRAM, &udp_addr);
    int tcp = bound(SOCK_STREAM, &tcp_addr);
    if (listen(tcp, 1024) < 0) die("listen");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    /* Markers that no connection's pointer can equal. */
    static char udp_mark, tcp_mark, stdin_mark;
    watch(ep, udp, EPOLLIN, &udp_mark);
    watch(ep, tcp, EPOLLIN, &tcp_mark);
    watch(ep, STDIN_FILENO, EPOLLIN, &stdin_mark);
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &udp_addr.sin_addr, text, sizeof text);
    printf("listening udp %s:%d\n", text, ntohs(udp_addr.sin_port));
    printf("listening tcp %s:%d\n", text, ntohs(tcp_addr.sin_port));
    fflush(stdout);

    struct epoll_event events[EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *ptr = events[i].data.ptr;
            if (ptr == &stdin_mark) {
                char sink[256];
                if (read(STDIN_FILENO, sink, sizeof sink) <= 0) return 0;
            } else if (ptr == &udp_mark) {
                serve_udp(udp);
            } else if (ptr == &tcp_mark) {
                int fd;
                while ((fd = accept4(tcp, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = calloc(1, sizeof *c);
                    if (!c) die("calloc");
                    c->fd = fd;
                    watch(ep, fd, EPOLLIN, c);
                }
            } else {
                struct conn *c = ptr;
                int gone = (events[i].events & EPOLLOUT) ? flush(ep, c) : serve_tcp(ep, c);
                if (gone < 0 || (events[i].events & (EPOLLERR | EPOLLHUP) && !(events[i].events & EPOLLIN)))
                    drop_conn(c);
            }
        }
    }
}
