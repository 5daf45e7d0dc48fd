/* pacs-compressor: lossless compression of stored instances (JPEG-LS by default).
 *
 * A worker of the bus like pacs-indexer: READY for `compress` jobs with compress.credit, one
 * job at a time (job.c: transcode, verify pixel for pixel, switch the index row to the new
 * file in one transaction). Besides jobs it
 *   - scans the index for candidates (scan.c) at start-up and every compress.scan_interval,
 *     and, when compress.after is 0, for the studies of study.changed events (gathered for
 *     S_EVENT_WAIT_MS so a burst of arrivals costs one query);
 *   - removes replaced originals once compress.unlink_grace has passed, and any file a crash
 *     left registered (scan.c, compressor_cleanup);
 *   - once per storage, writes the original's note of instances compressed before notes
 *     existed (scan.c, compressor_backfill_notes).
 * With compress.enabled off it takes no jobs and only finishes pending removals. Any number of
 * compressors may run: one scans at a time (advisory lock), the broker spreads the jobs. */
#include "compressor.h"
#include "kp_worker.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define S_EVENT_WAIT_MS 300
#define S_MAX_STUDIES   64

static volatile sig_atomic_t s_stop;

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Studies named by events since the last arrival scan, as a text[] literal being built. */
typedef struct {
    char uids[S_MAX_STUDIES][68];
    int n;
    bool overflow; /* more than S_MAX_STUDIES: scan everything instead */
    long since;
} s_arrivals_t;

static void s_arrival(s_arrivals_t *a, const char *uid)
{
    if (!uid || !*uid || strlen(uid) > 64 || strspn(uid, "0123456789.") != strlen(uid)) return;
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->uids[i], uid)) return;
    if (a->n == 0 && !a->overflow) a->since = s_now_ms();
    if (a->n == S_MAX_STUDIES) {
        a->overflow = true;
        return;
    }
    snprintf(a->uids[a->n++], sizeof a->uids[0], "%s", uid);
}

static void s_scan_arrivals(compressor_t *c, s_arrivals_t *a)
{
    int rc;
    if (a->overflow) {
        rc = compressor_scan(c, NULL);
    } else {
        char list[S_MAX_STUDIES * 70 + 3];
        size_t len = 0;
        list[len++] = '{';
        for (int i = 0; i < a->n; i++)
            len +=
                (size_t)snprintf(list + len, sizeof list - len, "%s%s", i ? "," : "", a->uids[i]);
        list[len++] = '}';
        list[len] = 0;
        rc = compressor_scan(c, list);
    }
    if (rc < 0)
        kp_warn("scan", "arrival scan failed (%s); the next full scan will find them",
                kp_strerror(rc));
    a->n = 0;
    a->overflow = false;
}

int main(int argc, char **argv)
{
    int rc = 1;
    kp_config_t *cfg = kp_worker_start(argc, argv, "pacs-compressor", &s_stop, NULL, &rc);
    if (!cfg) return rc;
    rc = 1;

    compressor_t c = {.cfg = cfg};
    kp_storage_t *st = NULL;
    kp_db_t *db = NULL;
    kp_bus_t *bus = NULL;
    kp_bus_sub_t *sub = NULL;
    bool enabled = cfg->compress_enabled;
    if (compressor_policy(&c)) goto done;
    if (kp_dicom_init()) goto done;
    st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!st) goto done;
    int err = 0;
    db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!db) goto done;
    bus = kp_bus_new(cfg, "compressor");
    if (!bus) goto done;
    c.db = db;
    c.st = st;
    c.bus = bus;
    /* a worker of the broker either way: its heartbeats show it alive (pacsctl health worker
     * compressor); while compression is off it only closes jobs queued before */
    const char *types[] = {COMPRESSOR_JOB};
    if (kp_bus_worker_ready(bus, types, 1, enabled ? (int)cfg->compress_credit : 1)) goto done;
    if (enabled) {
        if (cfg->compress_after == 0) {
            sub = kp_bus_subscribe(cfg, "study.");
            if (!sub) goto done;
        }
        kp_info("main", "compressing to %s (%s), %s; modalities %s, SOP classes %s, syntaxes %s",
                c.target, cfg->compress_target, cfg->compress_after ? "after an age" : "on arrival",
                c.modalities, c.sop_classes, c.syntaxes);
    } else {
        kp_info("main", "compression is off (compress.enabled); finishing pending file removals");
    }

    s_arrivals_t arrivals = {0};
    long next_pass = 0; /* the periodic pass: cleanup, then a full scan */
    while (!s_stop) {
        long now = s_now_ms();
        if (now >= next_pass) {
            int nr = compressor_backfill_notes(&c);
            if (nr < 0) kp_warn("cleanup", "writing original notes failed: %s", kp_strerror(nr));
            int cr = compressor_cleanup(&c, NULL);
            if (cr < 0) kp_warn("cleanup", "cleanup failed: %s", kp_strerror(cr));
            if (enabled) {
                int sr = compressor_scan(&c, NULL);
                if (sr < 0) kp_warn("scan", "scan failed: %s", kp_strerror(sr));
            }
            next_pass = s_now_ms() + cfg->compress_scan_interval * 1000L;
        }
        if (!enabled) {
            /* a job queued while compression was on: closed untouched, so the instance has
             * neither a decision nor a job and the next scan after re-enabling queues it */
            kp_msg_t m;
            if (kp_bus_next_job(bus, &m, 500) == 0) {
                char id[24];
                snprintf(id, sizeof id, "%lld", (long long)m.id);
                const char *p[] = {id};
                bool ok = kp_db_run(db,
                                    "UPDATE jobs SET state = 'done', last_error = 'compression "
                                    "is off', updated_at = now() WHERE id = $1::bigint AND "
                                    "state = 'pending'",
                                    1, p) == 0;
                kp_bus_job_done(bus, m.id, ok);
                kp_msg_clear(&m);
            }
            continue;
        }
        kp_msg_t m;
        int r = kp_bus_next_job(bus, &m, 200);
        if (r == 0) {
            const char *sop = json_string_value(json_object_get(m.payload, "sop"));
            if (strcmp(m.type, COMPRESSOR_JOB) || m.id <= 0 || !sop || !*sop) {
                kp_error("job", "job %lld of type %s is not a valid compress job; dropped",
                         (long long)m.id, m.type);
                kp_bus_job_done(bus, m.id, false);
            } else {
                int jr = compressor_job(&c, m.id, sop);
                kp_bus_job_done(bus, m.id, jr == 0);
                if (jr && kp_db_ensure(db)) usleep(500 * 1000); /* database down: do not spin */
            }
            kp_msg_clear(&m);
        } else if (r != KP_ETIMEOUT) {
            kp_warn("bus", "receive failed: %s", kp_strerror(r));
            usleep(100 * 1000);
        }
        kp_msg_t ev;
        while (sub && kp_bus_sub_recv(sub, &ev, 0) == 0) {
            s_arrival(&arrivals, json_string_value(json_object_get(ev.payload, "study")));
            kp_msg_clear(&ev);
        }
        if ((arrivals.n || arrivals.overflow) && s_now_ms() - arrivals.since >= S_EVENT_WAIT_MS)
            s_scan_arrivals(&c, &arrivals);
    }
    kp_info("main", "stopping after %ld compressed (%lld -> %lld bytes), %ld skipped, %ld retried",
            c.compressed, (long long)c.bytes_before, (long long)c.bytes_after, c.skipped, c.failed);
    rc = 0;
done:
    kp_bus_sub_destroy(&sub);
    kp_bus_destroy(&bus);
    kp_db_destroy(&db);
    kp_storage_destroy(&st);
    kp_dicom_shutdown();
    compressor_policy_clear(&c);
    kp_config_destroy(&cfg);
    return rc;
}
