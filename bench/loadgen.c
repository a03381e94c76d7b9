/*
 * loadgen: a small single-threaded epoll load generator for echo servers.
 *
 *   loadgen tcp  HOST PORT CONNS SIZE DEPTH SECONDS [WARMUP]
 *       CONNS connections each keep DEPTH lines of SIZE bytes (newline
 *       included) in flight; DEPTH 1 is request/response.  Every answer is
 *       checked to be the upper-cased request.  WARMUP starts once every
 *       connection is connected (at most 10 s after the start; connect_s
 *       says when), so connecting thousands is not what gets measured.
 *   loadgen udp  HOST PORT SOCKETS SIZE DEPTH SECONDS [WARMUP]
 *       The same with datagrams; lost ones are re-sent after a quiet 20 ms.
 *   loadgen idle HOST PORT CONNS SIZE 1 SECONDS
 *       Opens CONNS connections at once, sends one empty line on each (so
 *       that a handshake completed by a SYN cookie reaches the server even
 *       when its accept queue overflowed) and never reads; reports how long
 *       until every one was connected (the server counts the ones it
 *       accepted itself); then holds them open until standard input closes
 *       (or SECONDS pass) and exits.
 *   loadgen fetch HOST PORT CONNS REQUEST SECONDS [WARMUP]
 *       CONNS connections each send REQUEST (with \n and \r written as
 *       such), read until the server closes, and start over: a file
 *       download loop.  rate is bytes a second, answers whole downloads.
 *
 * LOADGEN_PROXY=v1 or v2 in the environment: every tcp and fetch connection
 * first sends a PROXY protocol header (text v1, binary v2) naming its own
 * addresses, as a load balancer in front of a haproxy: listener would.
 *
 * Prints one line of key=value pairs: rate (answers a second), answers,
 * seconds, errors (bad bytes or failed connections), cpu (the share of one
 * core this process used: well under 1 means it was not the bottleneck),
 * and for tcp and fetch the latency percentiles p50_us and p99_us in
 * microseconds: for a line, from handing its first byte to send() until its
 * whole answer is read (the same for request/response and pipelined); for
 * a download, from connect() until the server closes.  Latencies go into a
 * fixed log-linear histogram (buckets about 3% wide), so recording one
 * costs no allocation.  Bounded in time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    int connected;
    uint64_t sent;      /* bytes sent */
    uint64_t received;  /* bytes received */
    uint64_t owed;      /* bytes due to be sent */
    double last;        /* last receive (udp) */
    uint64_t *stamps;   /* tcp: send time (ns) of line k at [k % depth] */
    uint64_t begun;     /* fetch: connect time (ns) of this download */
};

#define NEVER 1e300
#define CONNECT_LIMIT 10.0 /* seconds to set up every tcp connection */

static char *request;   /* DEPTH+1 lines of SIZE bytes */
static char *expected;  /* the same, upper-cased */
static size_t size, depth;
static uint64_t errors;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * Latency histogram in nanoseconds: values below SUB have a bucket each;
 * above, each power of two is split into SUB equal buckets.
 */
#define SUB_BITS 5
#define SUB (1u << SUB_BITS)
#define BUCKETS ((64 - SUB_BITS + 1) * SUB)
static uint64_t hist[BUCKETS];
static uint64_t hist_count;
static int recording; /* inside the measured window */

static unsigned bucket_of(uint64_t ns)
{
    if (ns < SUB)
        return (unsigned)ns;
    unsigned e = 63 - (unsigned)__builtin_clzll(ns); /* e >= SUB_BITS */
    return (e - SUB_BITS + 1) * SUB + (unsigned)((ns >> (e - SUB_BITS)) & (SUB - 1));
}

static void record(uint64_t ns)
{
    if (!recording)
        return;
    hist[bucket_of(ns)]++;
    hist_count++;
}

static void hist_reset(void)
{
    memset(hist, 0, sizeof hist);
    hist_count = 0;
}

/* The value at quantile q, in microseconds: the middle of its bucket. */
static double percentile_us(double q)
{
    uint64_t rank = (uint64_t)(q * (double)hist_count + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < BUCKETS; i++) {
        seen += hist[i];
        if (seen < rank)
            continue;
        if (i < SUB)
            return i / 1e3;
        unsigned k = i / SUB;
        double low = (double)((uint64_t)(SUB + i % SUB) << (k - 1));
        double width = (double)((uint64_t)1 << (k - 1));
        return (low + width / 2) / 1e3;
    }
    return 0;
}

static void print_latency(void)
{
    if (hist_count)
        printf(" p50_us=%.1f p99_us=%.1f latencies=%llu", percentile_us(0.50),
               percentile_us(0.99), (unsigned long long)hist_count);
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void make_lines(void)
{
    size_t n = (depth + 1) * size;
    request = malloc(n);
    expected = malloc(n);
    if (!request || !expected)
        die("malloc");
    for (size_t i = 0; i < n; i++) {
        size_t k = i % size;
        char c = k == size - 1 ? '\n' : (char)('a' + k % 26);
        request[i] = c;
        expected[i] = c == '\n' ? c : (char)(c - 'a' + 'A');
    }
}

/* Send what is owed, from the right offset of the repeated lines. */
static void pump(struct conn *c, int datagram)
{
    while (c->owed) {
        size_t off = c->sent % size;
        size_t len = datagram ? size : c->owed;
        if (!datagram && len > depth * size)
            len = depth * size;
        /* Stamped before send(): on loopback the call itself delivers. */
        uint64_t t = c->stamps ? now_ns() : 0;
        ssize_t n = send(c->fd, request + off, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS
                && errno != ECONNREFUSED)
                errors++;
            return;
        }
        if (c->stamps && n > 0) {
            /* Lines k with sent <= k * size < sent + n start now. */
            uint64_t first = (c->sent + size - 1) / size, last = (c->sent + n - 1) / size;
            for (uint64_t k = first; k <= last; k++)
                c->stamps[k % depth] = t;
        }
        c->sent += n;
        c->owed -= n;
    }
}

static void check(struct conn *c, const char *buf, size_t n)
{
    /* The answer stream is the upper-cased request stream. */
    size_t off = c->received % size;
    while (n) {
        size_t len = n < depth * size ? n : depth * size;
        if (memcmp(buf, expected + off, len) != 0)
            errors++;
        buf += len;
        n -= len;
        off = (off + len) % size;
    }
}

static int proxy_version; /* LOADGEN_PROXY: 0 (none), 1 or 2 */

/* The PROXY header for a connected socket, sent before anything else. */
static void send_proxy(int fd)
{
    if (!proxy_version)
        return;
    struct sockaddr_in src, dst;
    socklen_t len = sizeof src;
    if (getsockname(fd, (struct sockaddr *)&src, &len) < 0)
        die("getsockname");
    len = sizeof dst;
    if (getpeername(fd, (struct sockaddr *)&dst, &len) < 0) {
        errors++;
        return;
    }
    unsigned char head[108];
    size_t n;
    if (proxy_version == 1) {
        char s[INET_ADDRSTRLEN], d[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &src.sin_addr, s, sizeof s);
        inet_ntop(AF_INET, &dst.sin_addr, d, sizeof d);
        n = (size_t)snprintf((char *)head, sizeof head, "PROXY TCP4 %s %s %u %u\r\n", s,
                             d, ntohs(src.sin_port), ntohs(dst.sin_port));
    } else {
        static const unsigned char sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                              0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
        memcpy(head, sig, 12);
        head[12] = 0x21; /* version 2, PROXY */
        head[13] = 0x11; /* TCP over IPv4 */
        head[14] = 0;
        head[15] = 12; /* address block length */
        memcpy(head + 16, &src.sin_addr, 4);
        memcpy(head + 20, &dst.sin_addr, 4);
        memcpy(head + 24, &src.sin_port, 2);
        memcpy(head + 26, &dst.sin_port, 2);
        n = 28;
    }
    if (send(fd, head, n, MSG_NOSIGNAL) != (ssize_t)n)
        errors++;
}

static int fetch_connect(int ep, struct sockaddr_in *sa, struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        return -1;
    c->connected = 0;
    c->begun = now_ns();
    if (connect(c->fd, (struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS)
        return -1;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* Download loop: see the header comment. */
static int fetch_main(int argc, char **argv)
{
    size_t nconn = strtoul(argv[4], NULL, 10);
    double seconds = atof(argv[6]);
    double warmup = argc > 7 ? atof(argv[7]) : 0.5;
    char req[4096];
    size_t rlen = 0;
    for (const char *p = argv[5]; *p && rlen < sizeof req - 1; p++) {
        if (p[0] == '\\' && (p[1] == 'n' || p[1] == 'r')) {
            req[rlen++] = p[1] == 'n' ? '\n' : '\r';
            p++;
        } else {
            req[rlen++] = *p;
        }
    }
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1)
        die("address");
    int ep = epoll_create1(0);
    struct conn *conns = calloc(nconn, sizeof *conns);
    size_t bufsize = 1 << 20;
    char *buf = malloc(bufsize);
    if (ep < 0 || !conns || !buf)
        die("setup");
    for (size_t i = 0; i < nconn; i++)
        if (fetch_connect(ep, &sa, &conns[i]) < 0)
            die("connect");
    double start = now(), measure_from = start + warmup, end = measure_from + seconds;
    uint64_t bytes = 0, done = 0;
    int counting = 0;
    struct epoll_event events[256];
    for (;;) {
        double t = now();
        if (t >= end)
            break;
        if (!counting && t >= measure_from) {
            counting = recording = 1;
            bytes = done = 0;
            hist_reset();
        }
        int n = epoll_wait(ep, events, 256, 10);
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (!c->connected) {
                if (events[e].events & (EPOLLERR | EPOLLHUP)) {
                    errors++;
                    goto again;
                }
                c->connected = 1;
                send_proxy(c->fd);
                if (send(c->fd, req, rlen, MSG_NOSIGNAL) != (ssize_t)rlen)
                    errors++;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                continue;
            }
            for (int rounds = 0; rounds < 8; rounds++) {
                /* MSG_TRUNC: the kernel discards the bytes, no copy. */
                ssize_t got = recv(c->fd, buf, bufsize, MSG_TRUNC);
                if (got > 0) {
                    if (counting)
                        bytes += got;
                    continue;
                }
                if (got < 0 && (errno == EAGAIN || errno == EINTR))
                    break;
                if (got < 0) {
                    errors++;
                } else if (counting) {
                    done++;
                    record(now_ns() - c->begun);
                }
                goto again;
            }
            continue;
        again:
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            if (fetch_connect(ep, &sa, c) < 0)
                errors++;
        }
    }
    double elapsed = now() - measure_from;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                 + ru.ru_stime.tv_usec / 1e6;
    printf("rate=%.1f answers=%llu seconds=%.3f errors=%llu cpu=%.2f",
           bytes / elapsed, (unsigned long long)done, elapsed,
           (unsigned long long)errors, cpu / (now() - start));
    print_latency();
    printf("\n");
    return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
    const char *proxy = getenv("LOADGEN_PROXY");
    if (proxy && *proxy) {
        proxy_version = strcmp(proxy, "v1") == 0 ? 1 : strcmp(proxy, "v2") == 0 ? 2 : 0;
        if (!proxy_version) {
            fprintf(stderr, "loadgen: LOADGEN_PROXY is v1 or v2\n");
            return 2;
        }
    }
    if (argc >= 7 && strcmp(argv[1], "fetch") == 0)
        return fetch_main(argc, argv);
    if (argc < 8) {
        fprintf(stderr,
                "usage: loadgen tcp|udp|idle HOST PORT CONNS SIZE DEPTH "
                "SECONDS [WARMUP]\n");
        return 2;
    }
    const char *mode = argv[1];
    int udp = strcmp(mode, "udp") == 0, idle = strcmp(mode, "idle") == 0;
    size_t nconn = strtoul(argv[4], NULL, 10);
    size = strtoul(argv[5], NULL, 10);
    depth = strtoul(argv[6], NULL, 10);
    double seconds = atof(argv[7]);
    double warmup = argc > 8 ? atof(argv[8]) : 0.5;
    if (idle)
        warmup = 0;
    if (size < 2 || depth < 1 || nconn < 1)
        return 2;
    make_lines();

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1)
        die("address");

    int ep = epoll_create1(0);
    struct conn *conns = calloc(nconn, sizeof *conns);
    uint64_t *stamps = udp || idle ? NULL : calloc(nconn * depth, sizeof *stamps);
    if (ep < 0 || !conns || (!udp && !idle && !stamps))
        die("setup");
    double start = now();
    for (size_t i = 0; i < nconn; i++) {
        struct conn *c = &conns[i];
        c->stamps = stamps ? stamps + i * depth : NULL;
        c->fd = socket(AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
        if (c->fd < 0)
            die("socket");
        if (!udp) {
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
            die("connect");
        struct epoll_event ev = {.events = EPOLLIN | (udp ? 0 : EPOLLOUT), .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl");
        c->owed = depth * size;
        c->last = start;
        if (udp) {
            c->connected = 1;
            for (size_t k = 0; k < depth; k++) {
                c->owed = size;
                pump(c, 1);
            }
            c->owed = 0;
        }
    }
    if (idle) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }

    size_t maxbuf = depth * size > 65536 ? depth * size : 65536;
    char *buf = malloc(maxbuf);
    struct epoll_event *events = malloc(sizeof *events * 1024);
    if (!buf || !events)
        die("malloc");
    /*
     * tcp: the warm-up starts once every connection is set up (or failed),
     * so that connecting thousands at once is not what gets measured; at
     * most CONNECT_LIMIT seconds after the start.
     */
    int waiting = !udp && !idle;
    size_t settled = 0;
    double connect_s = 0;
    double measure_from = waiting ? NEVER : start + warmup;
    double end = waiting ? NEVER : measure_from + seconds;
    uint64_t answers = 0, answered_conns = 0;
    double all_answered = 0;
    int counting = warmup == 0;
    recording = counting;
    double next_tick = start + 0.01;

    for (;;) {
        double t = now();
        if (waiting && (settled >= nconn || t >= start + CONNECT_LIMIT)) {
            waiting = 0;
            connect_s = t - start;
            measure_from = t + warmup;
            end = measure_from + seconds;
        }
        if (t >= end)
            break;
        if (!counting && t >= measure_from) {
            counting = recording = 1;
            answers = 0;
            hist_reset();
        }
        int timeout = (int)((next_tick - t) * 1000) + 1;
        int n = epoll_wait(ep, events, 1024, timeout < 1 ? 1 : timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (c == NULL) { /* stdin: readable means EOF or a line: stop */
                goto done;
            }
            uint32_t what = events[e].events;
            if (!udp && (what & (EPOLLERR | EPOLLHUP)) && !(what & EPOLLIN)) {
                errors++;
                if (!c->connected)
                    settled++;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                continue;
            }
            if (!udp && !c->connected && (what & EPOLLOUT)) {
                c->connected = 1;
                if (idle) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    if (send(c->fd, "\n", 1, MSG_NOSIGNAL) != 1)
                        errors++;
                    if (++answered_conns == nconn) {
                        all_answered = now();
                        printf("connected=%zu seconds=%.4f errors=%llu\n", nconn,
                               all_answered - start, (unsigned long long)errors);
                        fflush(stdout);
                    }
                    continue;
                }
                settled++;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                send_proxy(c->fd);
                pump(c, 0);
                if (c->owed) {
                    ev.events = EPOLLIN | EPOLLOUT;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
                continue;
            }
            if (what & EPOLLIN) {
                for (int rounds = 0; rounds < 16; rounds++) {
                    ssize_t got = recv(c->fd, buf, udp ? size + 1 : maxbuf, 0);
                    if (got < 0) {
                        if (errno == EINTR)
                            continue;
                        if (errno != EAGAIN && errno != ECONNREFUSED)
                            errors++;
                        break;
                    }
                    if (got == 0) {
                        errors++; /* server closed on us */
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        break;
                    }
                    if (udp) {
                        if ((size_t)got != size || memcmp(buf, expected, size))
                            errors++;
                        c->last = t;
                        if (counting)
                            answers++;
                        c->owed = size;
                        c->sent = 0;
                        pump(c, 1);
                        c->owed = 0;
                        continue;
                    }
                    check(c, buf, (size_t)got);
                    uint64_t before = c->received / size;
                    c->received += got;
                    uint64_t lines = c->received / size - before;
                    if (lines && recording) {
                        uint64_t t_ns = now_ns();
                        for (uint64_t k = before; k < before + lines; k++)
                            record(t_ns - c->stamps[k % depth]);
                    }
                    if (counting)
                        answers += lines;
                    if (lines) {
                        int was_idle = c->owed == 0;
                        c->owed += lines * size;
                        pump(c, 0);
                        if (c->owed && was_idle) {
                            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
                                                     .data.ptr = c};
                            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                        }
                    }
                    if ((size_t)got < maxbuf)
                        break;
                }
            }
            if (!udp && c->connected && (what & EPOLLOUT)) {
                pump(c, 0);
                if (!c->owed) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
        }
        if (udp && now() >= next_tick) {
            /* Re-prime sockets whose datagrams were all lost. */
            double t2 = now();
            for (size_t i = 0; i < nconn; i++) {
                struct conn *c = &conns[i];
                if (t2 - c->last > 0.02) {
                    c->last = t2;
                    for (size_t k = 0; k < depth; k++) {
                        c->owed = size;
                        c->sent = 0;
                        pump(c, 1);
                    }
                    c->owed = 0;
                }
            }
        }
        if (now() >= next_tick)
            next_tick = now() + 0.01;
    }
done:;
    double elapsed = now() - (warmup ? measure_from : start);
    if (idle) {
        if (!all_answered)
            printf("connected=%llu seconds=-1 errors=%llu\n",
                   (unsigned long long)answered_conns, (unsigned long long)errors);
        return answered_conns == nconn ? 0 : 1;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                 + ru.ru_stime.tv_usec / 1e6;
    printf("rate=%.1f answers=%llu seconds=%.3f errors=%llu cpu=%.2f",
           answers / elapsed, (unsigned long long)answers, elapsed,
           (unsigned long long)errors, cpu / (now() - start));
    if (!udp)
        printf(" connect_s=%.3f", connect_s);
    print_latency();
    printf("\n");
    return errors ? 1 : 0;
}
