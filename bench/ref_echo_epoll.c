/*
 * ref_echo_epoll: the ceiling.  A trivial single-threaded epoll echo server
 * on 127.0.0.1 doing what sockd's echo does at its simplest: every byte read
 * is upper-cased and written back (TCP, per connection, in order) and every
 * datagram is answered upper-cased.  It keeps no line state: for whole-line
 * traffic the answer is the same.
 *
 *   ref_echo_epoll TCP_PORT UDP_PORT     (0 picks a free port)
 *
 * Prints "listening tcp=N udp=M" once bound; runs until killed.
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn {
    int fd;
    char *pending; /* bytes the kernel did not take yet */
    size_t len;
};

static void upper(char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 'a' && p[i] <= 'z')
            p[i] -= 32;
}

static int listener(int type, int port)
{
    int fd = socket(AF_INET, type | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("bind");
        exit(2);
    }
    /* the same listen queue as sockd's default backlog */
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) {
        perror("listen");
        exit(2);
    }
    return fd;
}

static int port_of(int fd)
{
    struct sockaddr_in sa;
    socklen_t n = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &n);
    return ntohs(sa.sin_port);
}

static void drop(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

int main(int argc, char **argv)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int tcp = listener(SOCK_STREAM, argc > 1 ? atoi(argv[1]) : 0);
    int udp = listener(SOCK_DGRAM, argc > 2 ? atoi(argv[2]) : 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tcp};
    epoll_ctl(ep, EPOLL_CTL_ADD, tcp, &ev);
    ev.data.ptr = &udp;
    epoll_ctl(ep, EPOLL_CTL_ADD, udp, &ev);
    printf("listening tcp=%d udp=%d\n", port_of(tcp), port_of(udp));
    fflush(stdout);

    static char buf[256 * 1024];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            void *p = events[i].data.ptr;
            if (p == &tcp) {
                for (;;) {
                    int fd = accept4(tcp, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0)
                        break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (p == &udp) {
                for (int k = 0; k < 64; k++) {
                    struct sockaddr_in from;
                    socklen_t fl = sizeof from;
                    ssize_t got = recvfrom(udp, buf, 65536, 0, (struct sockaddr *)&from, &fl);
                    if (got < 0)
                        break;
                    upper(buf, got);
                    sendto(udp, buf, got, 0, (struct sockaddr *)&from, fl);
                }
                continue;
            }
            struct conn *c = p;
            if (events[i].events & EPOLLOUT) {
                ssize_t w = send(c->fd, c->pending, c->len, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN) {
                    drop(ep, c);
                    continue;
                }
                if (w > 0) {
                    memmove(c->pending, c->pending + w, c->len - w);
                    c->len -= w;
                }
                if (c->len == 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                }
                continue;
            }
            if (c->len) /* backpressure: read again only once drained */
                continue;
            ssize_t got = recv(c->fd, buf, sizeof buf, 0);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN)
                    continue;
                drop(ep, c);
                continue;
            }
            upper(buf, got);
            ssize_t w = send(c->fd, buf, got, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN) {
                drop(ep, c);
                continue;
            }
            if (w < 0)
                w = 0;
            if (w < got) {
                c->len = got - w;
                c->pending = realloc(c->pending, c->len);
                memcpy(c->pending, buf + w, c->len);
                struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
        }
    }
}
