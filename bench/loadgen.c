/* Closed-loop load generator for bench/server.py: `generate()` of that file, in C.
 *
 * The Python generator costs ~90 µs of CPU per session on the bench machine, CPU the servers under
 * test need; this one does the same work with fewer syscalls and next to no user time. One process,
 * one thread, non-blocking sockets on epoll (edge-triggered, registered once per socket: no
 * EPOLL_CTL_MOD or DEL per session; close() removes the socket from the epoll set).
 *
 * A session: connect to 127.0.0.1:PORT, send one packet, read the 2-byte answer, close; the next
 * session starts at once, K of them in flight. Only sessions that end inside
 * [measure_from, measure_until) (CLOCK_REALTIME, time.time()'s clock) are counted; no session
 * starts after measure_until; the ones in flight get the answer timeout, then the process prints
 * one JSON object (the keys generate() puts on its queue) on stdout and exits.
 *
 * Packets come from a plan file bench/server.py writes from a dtgserver.sim.load.PacketPool: the
 * pool's templates (rendered with zero modem, KEY ON time and minutes), its drives, and its
 * terminals. Each session's packet is the template copied into the session's buffer and patched
 * (modem, each body's YY MM DD hh mm), so it is byte for byte what PacketPool.next_packet() gives;
 * `--dump N` writes the first N packets to stdout so bench/server.py can check exactly that.
 *
 *   loadgen --plan FILE --port P --connections K --measure-from T0 --measure-until T1 [--answer-timeout S]
 *   loadgen --plan FILE --dump N
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "DTGLOAD1"
#define HEADER_SIZE 23      /* protocol ID, modem, period, body count, KEY ON time */
#define MODEM_AT 1
#define MODEM_SIZE 11
#define KEY_ON_AT 16
#define KEY_ON_SIZE 7
#define TIME_IN_BODY 6      /* each body's 7-byte time starts here; its first 5 bytes are the minute */
#define MINUTE_SIZE 5
#define MAX_EVENTS 256
#define POLL_MS 50          /* as generate()'s select timeout: how soon the loop sees the clock */
#define TIMEOUT_SCAN_S 0.5  /* answer timeouts are looked for twice a second, as generate() does */

/* -- the plan -------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *bytes;
    uint32_t len, body_size, body_count;
} template_t;

typedef struct {
    uint32_t minutes;
    uint32_t *templates;
} drive_t;

typedef struct {
    uint8_t modem[MODEM_SIZE];
    uint32_t drive;
    uint64_t minute;  /* minutes sent so far: the next packet is this minute of the drive */
} terminal_t;

static template_t *templates;
static drive_t *drives;
static terminal_t *terminals;
static uint32_t n_templates, n_drives, n_terminals, max_len, next_terminal;
static int64_t start_minute_s;

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s\n", what);
    exit(2);
}

static void read_exact(FILE *f, void *to, size_t n) {
    if (fread(to, 1, n, f) != n)
        die("plan file truncated");
}

static uint32_t read_u32(FILE *f) {
    uint8_t b[4];
    read_exact(f, b, 4);
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void *must_alloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

/* Layout (little-endian): "DTGLOAD1", u32 templates, drives, terminals, i64 start_minute_s,
 * 7 bytes KEY ON time; per template u32 length, body size, body count, its bytes; per drive
 * u32 minutes, u32 template index per minute; per terminal 11 bytes modem, u32 drive index. */
static void load_plan(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open the plan file");
    char magic[8];
    read_exact(f, magic, 8);
    if (memcmp(magic, MAGIC, 8) != 0)
        die("not a plan file (bad magic)");
    n_templates = read_u32(f);
    n_drives = read_u32(f);
    n_terminals = read_u32(f);
    uint64_t lo = read_u32(f), hi = read_u32(f);
    start_minute_s = (int64_t)(lo | hi << 32);
    uint8_t key_on[KEY_ON_SIZE];
    read_exact(f, key_on, KEY_ON_SIZE);
    if (!n_templates || !n_drives || !n_terminals)
        die("empty plan");
    templates = must_alloc(n_templates * sizeof *templates);
    for (uint32_t i = 0; i < n_templates; i++) {
        template_t *t = &templates[i];
        t->len = read_u32(f);
        t->body_size = read_u32(f);
        t->body_count = read_u32(f);
        if (t->len < HEADER_SIZE || t->len > (1u << 20) || t->body_size < TIME_IN_BODY + MINUTE_SIZE
            || HEADER_SIZE + (uint64_t)t->body_size * t->body_count > t->len)
            die("bad template in the plan");
        t->bytes = must_alloc(t->len);
        read_exact(f, t->bytes, t->len);
        memcpy(t->bytes + KEY_ON_AT, key_on, KEY_ON_SIZE);  /* the same for every packet of the pool */
        if (t->len > max_len)
            max_len = t->len;
    }
    drives = must_alloc(n_drives * sizeof *drives);
    for (uint32_t i = 0; i < n_drives; i++) {
        drive_t *d = &drives[i];
        d->minutes = read_u32(f);
        if (!d->minutes)
            die("empty drive in the plan");
        d->templates = must_alloc(d->minutes * sizeof *d->templates);
        for (uint32_t m = 0; m < d->minutes; m++)
            if ((d->templates[m] = read_u32(f)) >= n_templates)
                die("bad template index in the plan");
    }
    terminals = must_alloc(n_terminals * sizeof *terminals);
    for (uint32_t i = 0; i < n_terminals; i++) {
        read_exact(f, terminals[i].modem, MODEM_SIZE);
        if ((terminals[i].drive = read_u32(f)) >= n_drives)
            die("bad drive index in the plan");
    }
    if (fgetc(f) != EOF)
        die("trailing bytes in the plan");
    fclose(f);
}

/* YY MM DD hh mm of epoch second `s` in KST (UTC+9, no DST): _time_bytes(s)[:5]. */
static void minute_prefix(int64_t s, uint8_t out[MINUTE_SIZE]) {
    time_t t = (time_t)(s + 9 * 3600);
    struct tm tm;
    gmtime_r(&t, &tm);
    out[0] = (uint8_t)(tm.tm_year + 1900 - 2000);
    out[1] = (uint8_t)(tm.tm_mon + 1);
    out[2] = (uint8_t)tm.tm_mday;
    out[3] = (uint8_t)tm.tm_hour;
    out[4] = (uint8_t)tm.tm_min;
}

/* PacketPool.next_packet() into `buf` (max_len bytes); returns the packet's length. */
static uint32_t next_packet(uint8_t *buf) {
    static int64_t cached_s = INT64_MIN;  /* every terminal sends minute m in the same round */
    static uint8_t prefix[MINUTE_SIZE];
    terminal_t *term = &terminals[next_terminal];
    next_terminal = (next_terminal + 1) % n_terminals;
    uint64_t minute = term->minute++;
    const drive_t *d = &drives[term->drive];
    const template_t *t = &templates[d->templates[minute % d->minutes]];
    int64_t minute_s = start_minute_s + 60 * (int64_t)minute;
    if (minute_s != cached_s) {
        minute_prefix(minute_s, prefix);
        cached_s = minute_s;
    }
    memcpy(buf, t->bytes, t->len);
    memcpy(buf + MODEM_AT, term->modem, MODEM_SIZE);
    uint8_t *at = buf + HEADER_SIZE + TIME_IN_BODY;
    for (uint32_t i = 0; i < t->body_count; i++, at += t->body_size)
        memcpy(at, prefix, MINUTE_SIZE);
    return t->len;
}

static int dump(long count) {
    uint8_t *buf = must_alloc(max_len);
    for (long i = 0; i < count; i++) {
        uint32_t len = next_packet(buf);
        if (fwrite(buf, 1, len, stdout) != len)
            die("cannot write the dump");
    }
    return fflush(stdout) == 0 ? 0 : 2;
}

/* -- the load ---------------------------------------------------------------------------------------- */

enum { FREE, SENDING, READING };
enum { OK, ANSWERED, TIMEOUT, CONNECTION_ERROR };

typedef struct {
    int fd, state, readable;
    uint32_t sent, len, answer_len;
    int64_t started_ns;
    uint8_t answer[2];
    uint8_t *buf;  /* max_len bytes, this slot's own: a send may be partial */
} slot_t;

static slot_t *slots;
static int epoll_fd, in_flight;
static struct sockaddr_in address;
static double measure_from, measure_until;
static uint64_t n_sessions, n_ok, n_other, n_timeouts, n_errors;
static double *latencies;
static size_t n_latencies, latencies_cap;

static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + u.ru_utime.tv_usec * 1e-6 + (double)u.ru_stime.tv_sec + u.ru_stime.tv_usec * 1e-6;
}

/* The session ends: close its socket (which leaves the epoll set), count it if it ends in the window. */
static void finish(slot_t *s, int64_t started_ns, int outcome) {
    int64_t now = mono_ns();
    if (s && s->state != FREE) {
        close(s->fd);
        s->state = FREE;
        in_flight--;
    }
    double wall = wall_s();
    if (!(measure_from <= wall && wall < measure_until))
        return;
    n_sessions++;
    switch (outcome) {
    case OK:
        n_ok++;
        if (n_latencies == latencies_cap) {  /* doubling: a handful of reallocs per run */
            latencies_cap = latencies_cap ? 2 * latencies_cap : 65536;
            if (!(latencies = realloc(latencies, latencies_cap * sizeof *latencies)))
                die("out of memory");
        }
        latencies[n_latencies++] = (now - started_ns) * 1e-9;
        break;
    case ANSWERED: n_other++; break;
    case TIMEOUT: n_timeouts++; break;
    default: n_errors++;
    }
}

static void start(slot_t *s) {
    int64_t started = mono_ns();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        finish(NULL, started, CONNECTION_ERROR);
        return;
    }
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0 && errno != EINPROGRESS) {
        /* as generate(): counted, and this slot stays empty (no retry loop on a refusing kernel) */
        close(fd);
        finish(NULL, started, CONNECTION_ERROR);
        return;
    }
    s->fd = fd;
    s->state = SENDING;
    s->readable = 0;
    s->sent = 0;
    s->answer_len = 0;
    s->started_ns = started;
    s->len = next_packet(s->buf);
    /* Edge-triggered, both directions at once: an already connected socket is reported at once. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u32 = (uint32_t)(s - slots)};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0)
        die("epoll_ctl failed");
    in_flight++;
}

static void restart(slot_t *s) {
    if (wall_s() < measure_until)
        start(s);
}

/* One readiness event for slot s. */
static void on_event(slot_t *s, uint32_t events) {
    if (s->state == FREE)
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        s->readable = 1;  /* edge-triggered: remember it until the packet is out */
    if (s->state == SENDING) {
        if (!(events & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
            return;
        while (s->sent < s->len) {
            ssize_t n = send(s->fd, s->buf + s->sent, s->len - s->sent, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return;  /* the next EPOLLOUT edge */
                if (errno == EINTR)
                    continue;
                finish(s, s->started_ns, CONNECTION_ERROR);
                restart(s);
                return;
            }
            s->sent += (uint32_t)n;
        }
        s->state = READING;
    }
    if (!s->readable)
        return;
    for (;;) {
        uint8_t data[64];
        ssize_t n = recv(s->fd, data, sizeof data, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                s->readable = 0;
                return;
            }
            if (errno == EINTR)
                continue;
            finish(s, s->started_ns, CONNECTION_ERROR);
            break;
        }
        if (n == 0) {
            finish(s, s->started_ns, CONNECTION_ERROR);
            break;
        }
        for (ssize_t i = 0; i < n && s->answer_len < 2; i++)
            s->answer[s->answer_len++] = data[i];
        if (s->answer_len >= 2) {
            finish(s, s->started_ns, s->answer[0] == 0x09 && s->answer[1] == 0x00 ? OK : ANSWERED);
            break;
        }
    }
    restart(s);
}

static int wait_ms(double until_s, double now_s, int cap) {
    double ms = (until_s - now_s) * 1000.0;
    if (ms >= cap)
        return cap;
    return ms <= 0 ? 0 : (int)ms + 1;
}

static int run(int port, int connections, double answer_timeout_s) {
    address.sin_family = AF_INET;
    address.sin_port = htons((uint16_t)port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if ((epoll_fd = epoll_create1(EPOLL_CLOEXEC)) < 0)
        die("epoll_create1 failed");
    slots = must_alloc((size_t)connections * sizeof *slots);
    uint8_t *buffers = must_alloc((size_t)connections * max_len);  /* one allocation for all */
    for (int i = 0; i < connections; i++)
        slots[i].buf = buffers + (size_t)i * max_len;
    int64_t timeout_ns = (int64_t)(answer_timeout_s * 1e9);
    int cpu_started = 0, cpu_ended = 0;
    double cpu_start = 0, cpu_end = 0;
    struct epoll_event events[MAX_EVENTS];

    for (int i = 0; i < connections; i++)
        start(&slots[i]);
    int64_t next_timeout_check = mono_ns();
    for (;;) {
        double wall = wall_s();
        if (!cpu_started && wall >= measure_from) {
            cpu_start = cpu_s();
            cpu_started = 1;
        }
        if (!cpu_ended && wall >= measure_until) {
            cpu_end = cpu_s();
            cpu_ended = 1;
        }
        if (wall >= measure_until && in_flight == 0)
            break;
        if (wall >= measure_until + answer_timeout_s) {
            for (int i = 0; i < connections; i++)
                if (slots[i].state != FREE)
                    finish(&slots[i], slots[i].started_ns, TIMEOUT);
            break;
        }
        /* wake for the window's edges too, so that the CPU is read close to them */
        int timeout = POLL_MS;
        if (!cpu_started)
            timeout = wait_ms(measure_from, wall, timeout);
        else if (!cpu_ended)
            timeout = wait_ms(measure_until, wall, timeout);
        int n = epoll_wait(epoll_fd, events, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR)
            die("epoll_wait failed");
        for (int i = 0; i < n; i++)
            on_event(&slots[events[i].data.u32], events[i].events);
        int64_t now = mono_ns();
        if (now >= next_timeout_check) {
            next_timeout_check = now + (int64_t)(TIMEOUT_SCAN_S * 1e9);
            for (int i = 0; i < connections; i++) {
                slot_t *s = &slots[i];
                if (s->state != FREE && now - s->started_ns > timeout_ns) {
                    finish(s, s->started_ns, TIMEOUT);
                    restart(s);
                }
            }
        }
    }
    if (!cpu_ended)
        cpu_end = cpu_s();

    printf("{\"sessions\": %llu, \"ok\": %llu, \"other_result\": %llu, \"timeouts\": %llu, "
           "\"connection_errors\": %llu, \"cpu_s\": %.6f, \"latencies\": [",
           (unsigned long long)n_sessions, (unsigned long long)n_ok, (unsigned long long)n_other,
           (unsigned long long)n_timeouts, (unsigned long long)n_errors, cpu_end - cpu_start);
    for (size_t i = 0; i < n_latencies; i++)
        printf(i ? ", %.9f" : "%.9f", latencies[i]);
    printf("]}\n");
    return fflush(stdout) == 0 ? 0 : 2;
}

static void usage(void) {
    fputs("usage: loadgen --plan FILE --port P --connections K --measure-from T0 --measure-until T1"
          " [--answer-timeout S]\n       loadgen --plan FILE --dump N\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    static const struct option options[] = {
        {"plan", required_argument, NULL, 'p'},          {"port", required_argument, NULL, 'P'},
        {"connections", required_argument, NULL, 'k'},   {"measure-from", required_argument, NULL, 'f'},
        {"measure-until", required_argument, NULL, 'u'}, {"answer-timeout", required_argument, NULL, 't'},
        {"dump", required_argument, NULL, 'd'},          {NULL, 0, NULL, 0},
    };
    const char *plan = NULL;
    int port = 0, connections = 0, have_from = 0, have_until = 0;
    long dump_count = -1;
    double answer_timeout_s = 5.0;
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'p': plan = optarg; break;
        case 'P': port = atoi(optarg); break;
        case 'k': connections = atoi(optarg); break;
        case 'f': measure_from = strtod(optarg, NULL); have_from = 1; break;
        case 'u': measure_until = strtod(optarg, NULL); have_until = 1; break;
        case 't': answer_timeout_s = strtod(optarg, NULL); break;
        case 'd': dump_count = atol(optarg); break;
        default: usage();
        }
    }
    if (!plan || optind != argc)
        usage();
    load_plan(plan);
    static char out[1 << 20];  /* the latencies go out in a few large writes */
    setvbuf(stdout, out, _IOFBF, sizeof out);
    if (dump_count >= 0)
        return dump(dump_count);
    if (port <= 0 || port > 65535 || connections <= 0 || !have_from || !have_until || answer_timeout_s <= 0)
        usage();
    return run(port, connections, answer_timeout_s);
}
