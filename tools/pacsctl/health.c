/* `pacsctl health ...`: one check, one line, exit 0 (healthy) or 1. Meant for container health
 * checks (compose/docker-compose.yml) and systemd's ExecStartPost / watchdog scripts:
 *   pacsctl health db              the index answers at this build's schema version
 *   pacsctl health bus             pacs-busd answers a STATS question
 *   pacsctl health dicom           pacs-dicomd on 127.0.0.1:dicom.port answers an association
 *                                  (accepted and C-ECHO, or rejected by its allow-list: either
 *                                  way the daemon is serving)
 *   pacsctl health worker KIND     the broker knows a live worker of KIND (indexer, auditor, ...)
 *                                  on this host (its peer name starts with this host name) */
#include <arpa/inet.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <unistd.h>

#include "kp_bus.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "pacsctl.h"

static int s_db(const kp_config_t *cfg)
{
    int err = 0;
    kp_db_t *db = kp_db_connect(cfg->db_conninfo, 2, true, &err);
    if (!db) {
        printf("db: unhealthy (%s)\n", kp_strerror(err));
        return 1;
    }
    printf("db: healthy (schema %d)\n", KP_SCHEMA_VERSION);
    kp_db_destroy(&db);
    return 0;
}

/* The broker's STATS, or NULL (reason printed with the prefix what). */
static json_t *s_stats(const kp_config_t *cfg, const char *what)
{
    kp_bus_t *bus = kp_bus_new(cfg, "health");
    json_t *js = NULL;
    int rc = bus ? kp_bus_stats(bus, &js, 2000) : KP_EINVAL;
    kp_bus_destroy(&bus);
    if (rc || !js) {
        printf("%s: unhealthy (the broker at %s does not answer: %s)\n", what,
               cfg->bus_jobs_endpoint, kp_strerror(rc ? rc : KP_EMSG));
        json_decref(js);
        return NULL;
    }
    return js;
}

static int s_bus(const kp_config_t *cfg)
{
    json_t *js = s_stats(cfg, "bus");
    if (!js) return 1;
    printf("bus: healthy (%zu workers)\n", json_array_size(json_object_get(js, "workers")));
    json_decref(js);
    return 0;
}

static int s_worker(const kp_config_t *cfg, const char *kind)
{
    char host[256];
    if (gethostname(host, sizeof host)) snprintf(host, sizeof host, "?");
    host[sizeof host - 1] = 0;
    json_t *js = s_stats(cfg, kind);
    if (!js) return 1;
    /* a worker is lost after heartbeat_liveness missed beats: anything seen more recently lives */
    long long live_ms = (long long)cfg->bus_heartbeat_ms * cfg->bus_heartbeat_liveness;
    size_t hl = strlen(host), i, n = 0;
    json_t *w;
    json_array_foreach(json_object_get(js, "workers"), i, w)
    {
        const char *name = json_string_value(json_object_get(w, "name"));
        if (!name) continue;
        const char *k = strrchr(name, ':');
        if (!k || strcmp(k + 1, kind) || strncmp(name, host, hl) || name[hl] != ':') continue;
        if (json_integer_value(json_object_get(w, "last_seen_ms")) <= live_ms) n++;
    }
    json_decref(js);
    if (!n) {
        printf("%s: unhealthy (no live %s worker of host %s known to the broker)\n", kind, kind,
               host);
        return 1;
    }
    printf("%s: healthy (%zu on %s)\n", kind, n, host);
    return 0;
}

static int s_dicom(const kp_config_t *cfg)
{
    char err[256] = "";
    int rc = kp_dicom_echo("127.0.0.1", (int)cfg->dicom_port, "KP_HEALTHCHECK", cfg->dicom_ae_title,
                           5, err, sizeof err);
    if (rc == 0 || rc == KP_EPERM) {
        printf("dicom: healthy (port %d, %s)\n", (int)cfg->dicom_port,
               rc ? "association rejected by the allow-list" : "C-ECHO answered");
        return 0;
    }
    printf("dicom: unhealthy (port %d: %s)\n", (int)cfg->dicom_port,
           err[0] ? err : kp_strerror(rc));
    return 1;
}

int pacsctl_health(const kp_config_t *cfg, int argc, char **argv)
{
    if (argc == 1 && !strcmp(argv[0], "db")) return s_db(cfg);
    if (argc == 1 && !strcmp(argv[0], "bus")) return s_bus(cfg);
    if (argc == 1 && !strcmp(argv[0], "dicom")) {
        if (kp_dicom_init()) return 1;
        int rc = s_dicom(cfg);
        kp_dicom_shutdown();
        return rc;
    }
    if (argc == 2 && !strcmp(argv[0], "worker")) return s_worker(cfg, argv[1]);
    fprintf(stderr, "usage: pacsctl health db | bus | dicom | worker KIND\n");
    return 2;
}

/* ---- pacsctl status ---------------------------------------------------------------------------
 * The state of the whole installation at a terminal: the same checks as /readyz and the health
 * probes, plus the job queues and the workers per kind. Exit 0 when everything is healthy. */
static bool s_tcp_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    bool ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

static void s_line(bool ok, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_line(bool ok, const char *what, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%-4s %-10s ", ok ? "ok" : "FAIL", what);
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
}

int pacsctl_status(const kp_config_t *cfg)
{
    bool all = true;
    int err = 0;
    kp_db_t *db = kp_db_connect(cfg->db_conninfo, 2, false, &err);
    int v = db ? kp_db_schema_version(db) : err;
    s_line(db != NULL, "database", "%s", db ? "answers" : kp_strerror(err));
    all &= db != NULL;
    if (db) {
        bool ok = v == KP_SCHEMA_VERSION;
        s_line(ok, "schema", "version %d (this build: %d)%s", v, KP_SCHEMA_VERSION,
               ok                      ? ""
               : v < KP_SCHEMA_VERSION ? ": run pacsctl migrate"
                                       : ": newer software");
        all &= ok;
    }
    json_t *js = NULL;
    kp_bus_t *bus = kp_bus_new(cfg, "status");
    int br = bus ? kp_bus_stats(bus, &js, 2000) : KP_EINVAL;
    kp_bus_destroy(&bus);
    s_line(br == 0, "bus", "%s %s", cfg->bus_jobs_endpoint, br ? kp_strerror(br) : "answers");
    all &= br == 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/.status.%ld", cfg->storage_root, (long)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    bool sw = fd >= 0 && write(fd, "ok\n", 3) == 3 && fsync(fd) == 0;
    if (fd >= 0) close(fd);
    unlink(path);
    struct statvfs vfs;
    bool sv = statvfs(cfg->storage_root, &vfs) == 0;
    s_line(sw, "storage", "%s %s, %.1f GiB free of %.1f GiB", cfg->storage_root,
           sw ? "writable" : "NOT writable",
           sv ? (double)vfs.f_bavail * (double)vfs.f_frsize / 1073741824.0 : 0.0,
           sv ? (double)vfs.f_blocks * (double)vfs.f_frsize / 1073741824.0 : 0.0);
    all &= sw;
    if (kp_dicom_init() == 0) {
        char e[256] = "";
        int dr = kp_dicom_echo("127.0.0.1", (int)cfg->dicom_port, "KP_HEALTHCHECK",
                               cfg->dicom_ae_title, 3, e, sizeof e);
        bool ok = dr == 0 || dr == KP_EPERM;
        s_line(ok, "dicom", "%s on port %ld: %s", cfg->dicom_ae_title, cfg->dicom_port,
               ok ? "answers" : (e[0] ? e : kp_strerror(dr)));
        all &= ok;
        kp_dicom_shutdown();
    }
    bool hp = s_tcp_open((int)cfg->http_https_port);
    s_line(hp, "https", "127.0.0.1:%ld %s", cfg->http_https_port,
           hp ? "accepts connections" : "does not accept connections");
    all &= hp;

    /* workers per kind, from the broker */
    if (js) {
        printf("\nworkers by kind      live  newest heartbeat (ms ago)\n");
        const char *kinds[64];
        int counts[64], n = 0;
        long long newest[64];
        size_t i;
        json_t *w;
        json_array_foreach(json_object_get(js, "workers"), i, w)
        {
            const char *name = json_string_value(json_object_get(w, "name"));
            const char *k = name ? strrchr(name, ':') : NULL;
            if (!k) continue;
            k++;
            int j = 0;
            while (j < n && strcmp(kinds[j], k))
                j++;
            if (j == n && n < 64) {
                kinds[n] = k;
                counts[n] = 0;
                newest[n] = -1;
                n++;
            }
            if (j >= n) continue;
            long long seen = json_integer_value(json_object_get(w, "last_seen_ms"));
            counts[j]++;
            if (newest[j] < 0 || seen < newest[j]) newest[j] = seen;
        }
        for (int j = 0; j < n; j++)
            printf("  %-18s %-5d %lld\n", kinds[j], counts[j], newest[j]);
        if (!n) printf("  (none)\n");
    }
    /* the outbox */
    if (db) {
        PGresult *r = NULL;
        if (kp_db_exec(db, &r,
                       "SELECT type, count(*) FILTER (WHERE state = 'pending'), count(*) FILTER "
                       "(WHERE state = 'failed'), coalesce(round(extract(epoch FROM now() - "
                       "min(created_at) FILTER (WHERE state = 'pending'))), 0) FROM jobs GROUP "
                       "BY type ORDER BY type",
                       0, NULL) == 0) {
            printf("\njob queue            pending  failed  oldest pending (s)\n");
            for (int i = 0; i < PQntuples(r); i++)
                printf("  %-18s %-8s %-7s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
                       PQgetvalue(r, i, 2), PQgetvalue(r, i, 3));
            if (!PQntuples(r)) printf("  (empty)\n");
            PQclear(r);
        }
    }
    json_decref(js);
    kp_db_destroy(&db);
    printf("\n%s\n", all ? "healthy" : "NOT healthy");
    return all ? 0 : 1;
}
