/* kp_api_health: GET /healthz (the process answers) and GET /readyz (it can do its work: the
 * database answers at the schema version this build expects, pacs-busd answers, the storage
 * directory takes a durable write). Both are public (load balancers, container health checks,
 * Kubernetes probes) and say nothing about patients: check names, ok flags, timings and the
 * free space. /readyz answers 503 with the same JSON when a check fails, with Retry-After. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "kp_api.h"
#include "kp_bus.h"
#include "kp_db.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_metrics.h"

static time_t s_started;
/* One broker client for the STATS question, shared by the handler threads (readiness checks
 * are rare; a mutex is cheaper than one ZeroMQ context per thread). */
static struct {
    pthread_mutex_t mu;
    kp_bus_t *bus;
} s_h = {.mu = PTHREAD_MUTEX_INITIALIZER};

void kp_api_health_init(void)
{
    s_started = time(NULL);
}

void kp_api_health_shutdown(void)
{
    pthread_mutex_lock(&s_h.mu);
    kp_bus_destroy(&s_h.bus);
    pthread_mutex_unlock(&s_h.mu);
}

static double s_ms_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

static void s_json(kp_http_resp_t *resp, int status, json_t *body)
{
    char *s = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!s) {
        kp_http_error(resp, KP_ENOMEM, 0, "out of memory", NULL);
        return;
    }
    resp->status = status;
    resp->content_type = "application/json";
    kp_http_seg_mem(resp, s, strlen(s));
}

int kp_api_healthz(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)env;
    (void)req;
    s_json(resp, 200,
           json_pack("{s:s,s:s,s:I}", "status", "ok", "process", "pacs-gateway", "uptime_s",
                     (json_int_t)(s_started ? time(NULL) - s_started : 0)));
    return 0;
}

/* database + schema */
static bool s_check_db(kp_http_env_t *env, json_t *checks)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int v = kp_db_schema_version(env->db);
    double ms = s_ms_since(&t0);
    bool db_ok = v >= 0, schema_ok = v == KP_SCHEMA_VERSION;
    json_object_set_new(checks, "database",
                        json_pack("{s:b,s:f,s:s}", "ok", db_ok, "ms", ms, "detail",
                                  db_ok ? "answers" : kp_strerror(v)));
    json_t *sc = json_pack("{s:b,s:i}", "ok", schema_ok, "expected", KP_SCHEMA_VERSION);
    if (db_ok) json_object_set_new(sc, "version", json_integer(v));
    if (db_ok && !schema_ok)
        json_object_set_new(sc, "detail",
                            json_string(v < KP_SCHEMA_VERSION ? "behind: run pacsctl migrate"
                                                              : "ahead: newer software wrote it"));
    json_object_set_new(checks, "schema", sc);
    return db_ok && schema_ok;
}

/* pacs-busd: a STATS round trip; also counts the workers it knows */
static bool s_check_bus(kp_http_env_t *env, json_t *checks)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    json_t *st = NULL;
    int rc = KP_EBUS;
    pthread_mutex_lock(&s_h.mu);
    if (!s_h.bus) s_h.bus = kp_bus_new(env->cfg, "gateway-health");
    if (s_h.bus) rc = kp_bus_stats(s_h.bus, &st, 1000);
    /* a timed-out question may leave a late answer in the socket: start afresh next time */
    if (rc) kp_bus_destroy(&s_h.bus);
    pthread_mutex_unlock(&s_h.mu);
    json_t *c = json_pack("{s:b,s:f}", "ok", rc == 0, "ms", s_ms_since(&t0));
    if (rc == 0) {
        json_t *w = json_object_get(st, "workers");
        json_object_set_new(c, "workers", json_integer((json_int_t)json_array_size(w)));
    } else {
        json_object_set_new(c, "detail", json_string(kp_strerror(rc)));
    }
    json_decref(st);
    json_object_set_new(checks, "bus", c);
    return rc == 0;
}

/* storage: create, write, fsync and remove a small file in the root; report the free space */
static bool s_check_storage(kp_http_env_t *env, json_t *checks)
{
    const char *root = env->cfg->storage_root;
    char path[4096];
    snprintf(path, sizeof path, "%s/.readyz.%ld.%lu", root, (long)getpid(),
             (unsigned long)pthread_self());
    const char *why = NULL;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        why = strerror(errno);
    } else {
        if (write(fd, "ok\n", 3) != 3 || fsync(fd)) why = strerror(errno);
        close(fd);
        unlink(path);
    }
    json_t *c = json_pack("{s:b}", "ok", why == NULL);
    struct statvfs vfs;
    if (statvfs(root, &vfs) == 0) {
        json_object_set_new(c, "free_bytes",
                            json_integer((json_int_t)vfs.f_bavail * (json_int_t)vfs.f_frsize));
        json_object_set_new(c, "total_bytes",
                            json_integer((json_int_t)vfs.f_blocks * (json_int_t)vfs.f_frsize));
    }
    if (why) json_object_set_new(c, "detail", json_string(why));
    json_object_set_new(checks, "storage", c);
    return why == NULL;
}

int kp_api_readyz(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    json_t *checks = json_object();
    bool ok = s_check_db(env, checks);
    ok = s_check_bus(env, checks) && ok;
    ok = s_check_storage(env, checks) && ok;
    s_json(resp, ok ? 200 : 503, json_pack("{s:b,s:o}", "ready", ok, "checks", checks));
    if (!ok) resp->retry_after = 5;
    return 0;
}

/* ---- GET /metrics ---------------------------------------------------------------------------
 * Prometheus text format. Open to the addresses of http.metrics_allow only (the scraper needs
 * no account; everything here is operational, nothing about patients). The gateway's own
 * counters (kp_metrics) come first, then what this handler reads: job queues from the outbox,
 * sessions, the index's size, the broker's queues and workers, and the storage file system.
 * The index totals are cached for S_INDEX_TTL seconds (a count over millions of rows). */
#define S_INDEX_TTL 15

static struct {
    pthread_mutex_t mu;
    time_t at;
    long long studies, instances, bytes;
} s_idx = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void s_gauge(FILE *out, const char *name, const char *help, const char *type, double v)
{
    fprintf(out, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static void s_metrics_db(kp_http_env_t *env, FILE *out)
{
    PGresult *r = NULL;
    bool up = kp_db_exec(env->db, &r,
                         "SELECT type, state, count(*), coalesce(extract(epoch FROM now() - "
                         "min(created_at)), 0) FROM jobs GROUP BY type, state ORDER BY 1, 2",
                         0, NULL) == 0;
    s_gauge(out, "klinika_db_up", "1 when the gateway's query to PostgreSQL succeeded", "gauge",
            up);
    if (!up) return;
    fputs("# HELP klinika_jobs Jobs in the outbox by type and state (pending = queued or running)\n"
          "# TYPE klinika_jobs gauge\n",
          out);
    for (int i = 0; i < PQntuples(r); i++) {
        fputs("klinika_jobs{type=\"", out);
        kp_metrics_label(out, PQgetvalue(r, i, 0));
        fprintf(out, "\",state=\"%s\"} %s\n", PQgetvalue(r, i, 1), PQgetvalue(r, i, 2));
    }
    fputs("# HELP klinika_jobs_oldest_pending_seconds Age of the oldest pending job by type\n"
          "# TYPE klinika_jobs_oldest_pending_seconds gauge\n",
          out);
    for (int i = 0; i < PQntuples(r); i++) {
        if (strcmp(PQgetvalue(r, i, 1), "pending")) continue;
        fputs("klinika_jobs_oldest_pending_seconds{type=\"", out);
        kp_metrics_label(out, PQgetvalue(r, i, 0));
        fprintf(out, "\"} %s\n", PQgetvalue(r, i, 3));
    }
    PQclear(r);
    if (kp_db_exec(env->db, &r,
                   "SELECT (SELECT count(*) FROM sessions WHERE revoked_at IS NULL AND expires_at "
                   "> now()), (SELECT coalesce(max(pk), 0) FROM instances), (SELECT "
                   "coalesce(max(seq), 0) FROM audit_log)",
                   0, NULL) == 0) {
        s_gauge(out, "klinika_sessions_active", "Sign-in sessions neither ended nor expired",
                "gauge", atof(PQgetvalue(r, 0, 0)));
        s_gauge(out, "klinika_instances_indexed_total",
                "Instances ever indexed (the index's highest row id; rate() = instances per "
                "second)",
                "counter", atof(PQgetvalue(r, 0, 1)));
        s_gauge(out, "klinika_audit_records_total", "Records in the audit trail", "counter",
                atof(PQgetvalue(r, 0, 2)));
        PQclear(r);
    }
    time_t now = time(NULL);
    pthread_mutex_lock(&s_idx.mu);
    bool fresh = s_idx.at && now - s_idx.at < S_INDEX_TTL;
    pthread_mutex_unlock(&s_idx.mu);
    if (!fresh &&
        kp_db_exec(env->db, &r,
                   "SELECT (SELECT count(*) FROM studies), count(*), coalesce(sum(file_size), 0) "
                   "FROM instances",
                   0, NULL) == 0) {
        pthread_mutex_lock(&s_idx.mu);
        s_idx.studies = atoll(PQgetvalue(r, 0, 0));
        s_idx.instances = atoll(PQgetvalue(r, 0, 1));
        s_idx.bytes = atoll(PQgetvalue(r, 0, 2));
        s_idx.at = now;
        pthread_mutex_unlock(&s_idx.mu);
        PQclear(r);
    }
    pthread_mutex_lock(&s_idx.mu);
    s_gauge(out, "klinika_index_studies", "Studies in the index", "gauge", (double)s_idx.studies);
    s_gauge(out, "klinika_index_instances", "Instances in the index", "gauge",
            (double)s_idx.instances);
    s_gauge(out, "klinika_storage_used_bytes", "Bytes of the stored instance files", "gauge",
            (double)s_idx.bytes);
    pthread_mutex_unlock(&s_idx.mu);
}

static void s_metrics_bus(kp_http_env_t *env, FILE *out)
{
    json_t *st = NULL;
    pthread_mutex_lock(&s_h.mu);
    if (!s_h.bus) s_h.bus = kp_bus_new(env->cfg, "gateway-health");
    int rc = s_h.bus ? kp_bus_stats(s_h.bus, &st, 1000) : KP_EBUS;
    if (rc) kp_bus_destroy(&s_h.bus);
    pthread_mutex_unlock(&s_h.mu);
    s_gauge(out, "klinika_bus_up", "1 when pacs-busd answered the gateway's STATS question",
            "gauge", rc == 0);
    if (rc) return;
    /* per queue type, then per worker (its kind is the last part of host:pid:kind) */
    static const struct {
        const char *name, *help, *field, *type;
        bool per_worker;
        double scale;
    } series[] = {
        {"klinika_bus_queued", "Jobs the broker holds for a worker, by type", "queued", "gauge",
         false, 1},
        {"klinika_bus_inflight", "Jobs dispatched to a worker and not yet done, by type",
         "inflight", "gauge", false, 1},
        {"klinika_worker_last_seen_seconds",
         "Seconds since the broker last heard from a worker (heartbeats)", "last_seen_ms", "gauge",
         true, 1e-3},
        {"klinika_worker_inflight", "Jobs a worker is running", "inflight", "gauge", true, 1},
        /* from the workers' heartbeats: per process, so they restart at 0 with it */
        {"klinika_worker_jobs_done_total", "Jobs a worker reported done since it started", "done",
         "counter", true, 1},
        {"klinika_worker_jobs_failed_total", "Jobs a worker reported failed since it started",
         "failed", "counter", true, 1},
        {"klinika_worker_busy_seconds_total",
         "Summed time from receiving each job to reporting it done (rate / rate of jobs done = "
         "mean job duration)",
         "busy_ms", "counter", true, 1e-3},
    };
    for (size_t k = 0; k < sizeof series / sizeof series[0]; k++) {
        fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", series[k].name, series[k].help, series[k].name,
                series[k].type);
        if (!series[k].per_worker) {
            const char *type;
            json_t *q;
            json_object_foreach(json_object_get(st, "queues"), type, q)
            {
                fprintf(out, "%s{type=\"", series[k].name);
                kp_metrics_label(out, type);
                fprintf(out, "\"} %lld\n",
                        (long long)json_integer_value(json_object_get(q, series[k].field)));
            }
            continue;
        }
        size_t i;
        json_t *w;
        json_array_foreach(json_object_get(st, "workers"), i, w)
        {
            const char *name = json_string_value(json_object_get(w, "name"));
            const char *kind = name ? strrchr(name, ':') : NULL;
            fprintf(out, "%s{worker=\"", series[k].name);
            kp_metrics_label(out, name ? name : "?");
            fputs("\",kind=\"", out);
            kp_metrics_label(out, kind ? kind + 1 : "?");
            fprintf(out, "\"} %.17g\n",
                    (double)json_integer_value(json_object_get(w, series[k].field)) *
                        series[k].scale);
        }
    }
    json_decref(st);
}

int kp_api_metrics(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    if (!kp_metrics_addr_allowed(env->cfg->http_metrics_allow, req->peer)) {
        kp_http_error(resp, KP_EPERM, 0, "metrics are not served to this address",
                      "add it to http.metrics_allow");
        return 0;
    }
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    if (!out) return KP_ENOMEM;
    s_gauge(out, "klinika_process_start_time_seconds", "When pacs-gateway started (Unix time)",
            "gauge", (double)s_started);
    fprintf(out,
            "# HELP klinika_schema_version The schema version this build expects\n"
            "# TYPE klinika_schema_version gauge\nklinika_schema_version %d\n",
            KP_SCHEMA_VERSION);
    kp_metrics_write(out);
    kp_metrics_write_dicomd(out);
    s_metrics_db(env, out);
    s_metrics_bus(env, out);
    struct statvfs vfs;
    if (statvfs(env->cfg->storage_root, &vfs) == 0) {
        s_gauge(out, "klinika_storage_free_bytes",
                "Free bytes of the storage file system (for unprivileged users)", "gauge",
                (double)vfs.f_bavail * (double)vfs.f_frsize);
        s_gauge(out, "klinika_storage_size_bytes", "Size of the storage file system", "gauge",
                (double)vfs.f_blocks * (double)vfs.f_frsize);
    }
    if (fclose(out) || !buf) {
        free(buf);
        return KP_ENOMEM;
    }
    resp->status = 200;
    resp->content_type = "text/plain; version=0.0.4; charset=utf-8";
    resp->compressible = true;
    kp_http_seg_mem(resp, buf, len);
    return 0;
}
