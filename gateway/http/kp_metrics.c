/* kp_metrics: see kp_metrics.h. */
#include "kp_metrics.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* latency buckets (seconds), the usual Prometheus ladder around our targets */
static const double s_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10};
#define S_NB (sizeof s_bounds / sizeof s_bounds[0])

/* one (route, method, status) counter; one histogram per route */
#define S_MAX_SERIES 2048
#define S_MAX_ROUTES 256

typedef struct {
    const char *route; /* static string from the route table, or a literal */
    char method[8];
    int status;
    uint64_t n;
} s_series_t;

typedef struct {
    const char *route;
    uint64_t bucket[S_NB]; /* non-cumulative here; summed when written */
    uint64_t count;
    double sum;
} s_hist_t;

static struct {
    pthread_mutex_t mu;
    s_series_t series[S_MAX_SERIES];
    size_t nseries;
    s_hist_t hist[S_MAX_ROUTES];
    size_t nhist;
    long value[KP_MET_N];
    uint64_t dropped; /* observations beyond the table sizes (never expected) */
} s_m = {.mu = PTHREAD_MUTEX_INITIALIZER};

void kp_metrics_http(const char *route, const char *method, int status, double seconds)
{
    if (!route) route = "unrouted";
    char m[8];
    size_t ml = 0;
    for (; method && method[ml] && ml < sizeof m - 1; ml++)
        m[ml] = isupper((unsigned char)method[ml]) ? method[ml] : '?';
    m[ml] = 0;
    size_t b = 0;
    while (b < S_NB && seconds > s_bounds[b])
        b++;
    pthread_mutex_lock(&s_m.mu);
    s_series_t *s = NULL;
    for (size_t i = 0; i < s_m.nseries; i++) {
        s_series_t *x = &s_m.series[i];
        if (x->route == route && x->status == status && !strcmp(x->method, m)) {
            s = x;
            break;
        }
    }
    if (!s && s_m.nseries < S_MAX_SERIES) {
        s = &s_m.series[s_m.nseries++];
        s->route = route;
        memcpy(s->method, m, sizeof m);
        s->status = status;
    }
    if (s)
        s->n++;
    else
        s_m.dropped++;
    s_hist_t *h = NULL;
    for (size_t i = 0; i < s_m.nhist; i++)
        if (s_m.hist[i].route == route) {
            h = &s_m.hist[i];
            break;
        }
    if (!h && s_m.nhist < S_MAX_ROUTES) {
        h = &s_m.hist[s_m.nhist++];
        h->route = route;
    }
    if (h) {
        if (b < S_NB) h->bucket[b]++;
        h->count++;
        h->sum += seconds;
    }
    pthread_mutex_unlock(&s_m.mu);
}

void kp_metrics_add(kp_metric_t m, long delta)
{
    if ((int)m < 0 || m >= KP_MET_N) return;
    pthread_mutex_lock(&s_m.mu);
    s_m.value[m] += delta;
    pthread_mutex_unlock(&s_m.mu);
}

void kp_metrics_set(kp_metric_t m, long value)
{
    if ((int)m < 0 || m >= KP_MET_N) return;
    pthread_mutex_lock(&s_m.mu);
    s_m.value[m] = value;
    pthread_mutex_unlock(&s_m.mu);
}

/* A label value: route patterns and methods hold no quote, backslash or newline, but escape
 * anyway (the format's rule). */
void kp_metrics_label(FILE *out, const char *v)
{
    for (; v && *v; v++) {
        if (*v == '\\' || *v == '"')
            fprintf(out, "\\%c", *v);
        else if (*v == '\n')
            fputs("\\n", out);
        else
            fputc(*v, out);
    }
}

void kp_metrics_write(FILE *out)
{
    static const struct {
        const char *name, *type, *help;
    } meta[KP_MET_N] = {
        [KP_MET_LOGIN_FAILURES] = {"klinika_auth_login_failures_total", "counter",
                                   "Sign-ins refused (wrong password or code, locked, unknown)"},
        [KP_MET_LOGINS] = {"klinika_auth_logins_total", "counter", "Successful sign-ins"},
        [KP_MET_RATE_LIMITED] = {"klinika_http_rate_limited_total", "counter",
                                 "Requests answered 429 by the rate limits"},
        [KP_MET_STOW_INSTANCES] = {"klinika_stow_instances_total", "counter",
                                   "Instances stored through STOW-RS"},
        [KP_MET_DB_BUSY] = {"klinika_http_db_workers_busy", "gauge",
                            "Database workers of the gateway running a request now"},
        [KP_MET_DB_QUEUED] = {"klinika_http_db_queue", "gauge",
                              "Requests waiting for a database worker of the gateway"},
        [KP_MET_DB_WORKERS] = {"klinika_http_db_workers", "gauge",
                               "Database workers (connections) of the gateway"},
    };
    pthread_mutex_lock(&s_m.mu);
    for (int i = 0; i < KP_MET_N; i++)
        fprintf(out, "# HELP %s %s\n# TYPE %s %s\n%s %ld\n", meta[i].name, meta[i].help,
                meta[i].name, meta[i].type, meta[i].name, s_m.value[i]);
    fputs("# HELP klinika_http_requests_total HTTP requests answered, by route pattern, method "
          "and status\n# TYPE klinika_http_requests_total counter\n",
          out);
    for (size_t i = 0; i < s_m.nseries; i++) {
        const s_series_t *s = &s_m.series[i];
        fputs("klinika_http_requests_total{route=\"", out);
        kp_metrics_label(out, s->route);
        fprintf(out, "\",method=\"%s\",status=\"%d\"} %llu\n", s->method, s->status,
                (unsigned long long)s->n);
    }
    fputs("# HELP klinika_http_request_duration_seconds Time from the request's arrival to its "
          "answer, by route pattern\n# TYPE klinika_http_request_duration_seconds histogram\n",
          out);
    for (size_t i = 0; i < s_m.nhist; i++) {
        const s_hist_t *h = &s_m.hist[i];
        uint64_t cum = 0;
        for (size_t b = 0; b < S_NB; b++) {
            cum += h->bucket[b];
            fputs("klinika_http_request_duration_seconds_bucket{route=\"", out);
            kp_metrics_label(out, h->route);
            fprintf(out, "\",le=\"%g\"} %llu\n", s_bounds[b], (unsigned long long)cum);
        }
        fputs("klinika_http_request_duration_seconds_bucket{route=\"", out);
        kp_metrics_label(out, h->route);
        fprintf(out, "\",le=\"+Inf\"} %llu\n", (unsigned long long)h->count);
        fputs("klinika_http_request_duration_seconds_sum{route=\"", out);
        kp_metrics_label(out, h->route);
        fprintf(out, "\"} %.6f\n", h->sum);
        fputs("klinika_http_request_duration_seconds_count{route=\"", out);
        kp_metrics_label(out, h->route);
        fprintf(out, "\"} %llu\n", (unsigned long long)h->count);
    }
    pthread_mutex_unlock(&s_m.mu);
}

/* ---- pacs-dicomd's counters (metrics.dicomd events) ------------------------------------------ */

#define S_DICOMD_MAX   32
#define S_DICOMD_STALE 60 /* seconds without an event after which a process is dropped */

static const struct {
    const char *field, *name, *help, *label; /* label: extra label=value, or NULL */
} s_dicomd_series[] = {
    {"associations_accepted", "klinika_dicom_associations_total", "DICOM associations, by result",
     "result=\"accepted\""},
    {"associations_rejected", "klinika_dicom_associations_total", NULL, "result=\"rejected\""},
    {"stores_ok", "klinika_dicom_stores_total", "C-STORE requests, by outcome",
     "outcome=\"success\""},
    {"stores_failed", "klinika_dicom_stores_total", NULL, "outcome=\"failure\""},
    {"bytes_received", "klinika_dicom_received_bytes_total",
     "Bytes of the instances received with C-STORE", NULL},
    {"queries", "klinika_dicom_queries_total", "C-FIND requests", NULL},
    {"retrieves", "klinika_dicom_retrieves_total", "C-MOVE and C-GET requests", NULL},
    {"instances_sent", "klinika_dicom_sent_instances_total",
     "Instances sent by C-MOVE and C-GET sub-operations", NULL},
    {"bytes_sent", "klinika_dicom_sent_bytes_total",
     "Bytes of the instances sent by C-MOVE and C-GET", NULL},
};
#define S_DICOMD_N (sizeof s_dicomd_series / sizeof s_dicomd_series[0])

static struct {
    pthread_mutex_t mu;
    struct {
        char process[160];
        double v[S_DICOMD_N];
        time_t seen;
    } p[S_DICOMD_MAX];
} s_dicomd = {.mu = PTHREAD_MUTEX_INITIALIZER};

void kp_metrics_dicomd(const json_t *payload)
{
    const char *proc = json_string_value(json_object_get(payload, "process"));
    if (!proc || !*proc || strlen(proc) >= sizeof s_dicomd.p[0].process) return;
    time_t now = time(NULL);
    pthread_mutex_lock(&s_dicomd.mu);
    int slot = -1, oldest = 0;
    for (int i = 0; i < S_DICOMD_MAX; i++) {
        if (s_dicomd.p[i].seen && !strcmp(s_dicomd.p[i].process, proc)) {
            slot = i;
            break;
        }
        if (s_dicomd.p[i].seen < s_dicomd.p[oldest].seen) oldest = i;
    }
    if (slot < 0) { /* a free slot (seen 0) or the longest silent process's */
        slot = oldest;
        snprintf(s_dicomd.p[slot].process, sizeof s_dicomd.p[slot].process, "%s", proc);
    }
    for (size_t k = 0; k < S_DICOMD_N; k++) {
        json_t *v = json_object_get(payload, s_dicomd_series[k].field);
        s_dicomd.p[slot].v[k] = json_is_number(v) ? json_number_value(v) : 0;
    }
    s_dicomd.p[slot].seen = now;
    pthread_mutex_unlock(&s_dicomd.mu);
}

void kp_metrics_write_dicomd(FILE *out)
{
    time_t now = time(NULL);
    pthread_mutex_lock(&s_dicomd.mu);
    for (size_t k = 0; k < S_DICOMD_N; k++) {
        if (s_dicomd_series[k].help)
            fprintf(out, "# HELP %s %s (per pacs-dicomd process)\n# TYPE %s counter\n",
                    s_dicomd_series[k].name, s_dicomd_series[k].help, s_dicomd_series[k].name);
        for (int i = 0; i < S_DICOMD_MAX; i++) {
            if (!s_dicomd.p[i].seen || now - s_dicomd.p[i].seen > S_DICOMD_STALE) continue;
            fprintf(out, "%s{process=\"", s_dicomd_series[k].name);
            kp_metrics_label(out, s_dicomd.p[i].process);
            fprintf(out, "\"%s%s} %.17g\n", s_dicomd_series[k].label ? "," : "",
                    s_dicomd_series[k].label ? s_dicomd_series[k].label : "", s_dicomd.p[i].v[k]);
        }
    }
    pthread_mutex_unlock(&s_dicomd.mu);
}

/* ---- the address allow-list ----------------------------------------------------------------- */
/* Parses "a.b.c.d", "::1", "a.b.c.d/n" into 16 bytes (IPv4 as ::ffff:a.b.c.d) and a prefix
 * length over those 16 bytes. */
static bool s_parse(const char *s, size_t len, unsigned char ip[16], int *bits)
{
    char buf[64];
    if (len == 0 || len >= sizeof buf) return false;
    memcpy(buf, s, len);
    buf[len] = 0;
    char *slash = strchr(buf, '/');
    long prefix = -1;
    if (slash) {
        char *end;
        *slash = 0;
        prefix = strtol(slash + 1, &end, 10);
        if (end == slash + 1 || *end || prefix < 0) return false;
    }
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, buf, &a4) == 1) {
        if (prefix > 32) return false;
        memset(ip, 0, 10);
        ip[10] = ip[11] = 0xff;
        memcpy(ip + 12, &a4, 4);
        *bits = 96 + (int)(prefix < 0 ? 32 : prefix);
        return true;
    }
    if (inet_pton(AF_INET6, buf, &a6) == 1) {
        if (prefix > 128) return false;
        memcpy(ip, &a6, 16);
        *bits = (int)(prefix < 0 ? 128 : prefix);
        return true;
    }
    return false;
}

bool kp_metrics_addr_allowed(const char *allow, const char *addr)
{
    if (!allow || !addr) return false;
    unsigned char a[16];
    int abits;
    if (!s_parse(addr, strlen(addr), a, &abits) || abits != 128) return false;
    const char *p = allow;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        const char *e = p;
        while (*e && *e != ',' && *e != ' ' && *e != '\t')
            e++;
        if (e == p) break;
        if (e - p == 1 && *p == '*') return true;
        unsigned char n[16];
        int bits;
        if (s_parse(p, (size_t)(e - p), n, &bits)) {
            int full = bits / 8, rest = bits % 8;
            if (!memcmp(a, n, (size_t)full) &&
                (!rest || ((a[full] ^ n[full]) & (0xff << (8 - rest)) & 0xff) == 0))
                return true;
        }
        p = e;
    }
    return false;
}
