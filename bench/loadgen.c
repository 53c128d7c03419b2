/* Open-loop HTTP/1.1 load generator for bench/http.py.
 *
 *   loadgen HOST PORT RATE SECONDS CONNECTIONS REQUEST_FILE [TRACE_FILE]
 *
 * Sends the raw request in REQUEST_FILE at a constant total RATE (requests/s)
 * over CONNECTIONS keep-alive connections, one thread each.  Connection k
 * sends at start + (k + n * CONNECTIONS) / RATE.  Latency is measured from
 * that intended send time, not from when the request actually went out, so a
 * server that stalls is charged for every request it delayed (no
 * coordinated omission, as in wrk2).  Prints one JSON line of results.
 * With TRACE_FILE, every request is also written there as a line
 * "<intended send, us from start> <status, -1 for a broken connection> <latency us>"
 * (bench/faults.py reads when failures happened and when they stopped). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char* host;
static int port, nconn;
static double rate, seconds;
static char* request;
static size_t request_len;
static int64_t start_ns;

typedef struct {
  int id;
  int64_t* lat;
  size_t n, cap;
  long ok, errors;
  int64_t (*trace)[3]; /* intended offset ns, status, latency ns; NULL unless tracing */
  size_t traced, trace_cap;
} worker_t;

static int tracing;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int connect_to(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  inet_pton(AF_INET, host, &a.sin_addr);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr*)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Reads one response; returns its status code, or -1 if the connection failed. */
static int read_response(int fd, char* buf, size_t cap) {
  size_t have = 0;
  char* end = NULL;
  while (!end) {
    ssize_t r = read(fd, buf + have, cap - 1 - have);
    if (r <= 0) return -1;
    have += (size_t)r;
    buf[have] = 0;
    end = strstr(buf, "\r\n\r\n");
    if (!end && have >= cap - 1) return -1;
  }
  int status = atoi(buf + 9);
  long body = 0;
  char* cl = strcasestr(buf, "content-length:");
  if (cl && cl < end) body = atol(cl + 15);
  size_t need = (size_t)(end + 4 - buf) + (size_t)body;
  while (have < need) {
    size_t chunk = need - have < cap - 1 ? need - have : cap - 1;
    ssize_t r = read(fd, buf, chunk);  /* body beyond the headers: discard */
    if (r <= 0) return -1;
    have += (size_t)r;
  }
  return status;
}

/* Writes all of buf; 0 if the connection broke first. */
static int send_all(int fd, const char* buf, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t w = send(fd, buf + done, len - done, MSG_NOSIGNAL);
    if (w <= 0) return 0;
    done += (size_t)w;
  }
  return 1;
}

static void* run(void* arg) {
  worker_t* w = arg;
  char buf[1 << 16];
  int fd = connect_to();
  int64_t interval = (int64_t)(1e9 * nconn / rate);
  int64_t intended = start_ns + (int64_t)(1e9 * w->id / rate);
  int64_t stop = start_ns + (int64_t)(1e9 * seconds);
  for (; intended < stop; intended += interval) {
    struct timespec ts = {intended / 1000000000, intended % 1000000000};
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    int status = -1, sent_whole = 0;
    if (fd >= 0) {
      sent_whole = send_all(fd, request, request_len);
      /* a server may answer before it has read the whole body (a 429 decided from the headers)
         and then close: its answer is still there to read */
      status = read_response(fd, buf, sizeof buf);
      if (!sent_whole && status >= 0) {
        close(fd);
        fd = connect_to();
      }
    }
    int64_t done = now_ns();
    if (tracing) {
      if (w->traced == w->trace_cap) {
        w->trace_cap = w->trace_cap ? 2 * w->trace_cap : 4096;
        w->trace = realloc(w->trace, w->trace_cap * sizeof *w->trace);
      }
      w->trace[w->traced][0] = intended - start_ns;
      w->trace[w->traced][1] = status;
      w->trace[w->traced][2] = done - intended;
      w->traced++;
    }
    if (status == 200) {
      if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 4096;
        w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
      }
      w->lat[w->n++] = done - intended;
      w->ok++;
    } else {
      w->errors++;
      if (status < 0) {  /* reconnect after a broken connection */
        if (fd >= 0) close(fd);
        fd = connect_to();
      }
    }
  }
  if (fd >= 0) close(fd);
  return NULL;
}

static int cmp(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  if (argc != 7 && argc != 8) {
    fprintf(stderr, "usage: loadgen HOST PORT RATE SECONDS CONNECTIONS REQUEST_FILE [TRACE_FILE]\n");
    return 2;
  }
  tracing = argc == 8;
  host = argv[1];
  port = atoi(argv[2]);
  rate = atof(argv[3]);
  seconds = atof(argv[4]);
  nconn = atoi(argv[5]);
  FILE* f = fopen(argv[6], "rb");
  if (!f) {
    perror(argv[6]);
    return 2;
  }
  fseek(f, 0, SEEK_END);
  request_len = (size_t)ftell(f);
  rewind(f);
  request = malloc(request_len);
  if (fread(request, 1, request_len, f) != request_len) return 2;
  fclose(f);

  worker_t* ws = calloc((size_t)nconn, sizeof *ws);
  pthread_t* ts = calloc((size_t)nconn, sizeof *ts);
  start_ns = now_ns() + 200000000;  /* every thread connected before the clock starts */
  for (int i = 0; i < nconn; ++i) {
    ws[i].id = i;
    pthread_create(&ts[i], NULL, run, &ws[i]);
  }
  long ok = 0, errors = 0;
  size_t total = 0;
  for (int i = 0; i < nconn; ++i) {
    pthread_join(ts[i], NULL);
    ok += ws[i].ok;
    errors += ws[i].errors;
    total += ws[i].n;
  }
  double elapsed = (now_ns() - start_ns) / 1e9;
  int64_t* all = malloc((total ? total : 1) * sizeof *all);
  size_t k = 0;
  for (int i = 0; i < nconn; ++i) {
    memcpy(all + k, ws[i].lat, ws[i].n * sizeof *all);
    k += ws[i].n;
  }
  qsort(all, total, sizeof *all, cmp);
  if (tracing) {
    FILE* out = fopen(argv[7], "w");
    if (!out) {
      perror(argv[7]);
      return 2;
    }
    for (int i = 0; i < nconn; ++i)
      for (size_t j = 0; j < ws[i].traced; ++j)
        fprintf(out, "%lld %lld %lld\n", (long long)(ws[i].trace[j][0] / 1000), (long long)ws[i].trace[j][1],
                (long long)(ws[i].trace[j][2] / 1000));
    fclose(out);
  }
#define PCT(p) (total ? all[(size_t)((p) * (total - 1))] / 1e3 : 0.0)
  printf("{\"target_rps\": %.0f, \"achieved_rps\": %.1f, \"ok\": %ld, \"errors\": %ld, "
         "\"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
         rate, ok / elapsed, ok, errors, PCT(0.5), PCT(0.99), PCT(0.999), PCT(1.0));
  return 0;
}
