/* pacs-indexer: turns stored files into index rows.
 *
 * A worker of the bus: it announces READY for `index` jobs with a credit, takes jobs as they
 * come, and whenever several are waiting writes up to indexer.batch of them in one transaction
 * (kp_index_batch), which also marks their outbox rows done, so a job delivered twice is
 * harmless. After a commit it publishes `study.changed` for each touched study (the gateway's
 * metadata cache listens). If the database is down the jobs are reported not-ok to the broker
 * and stay pending in the outbox; the sweep in pacs-busd publishes them again later. */
#include "kp_worker.h"
#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_index.h"
#include "kp_log.h"
#include "kp_msg.h"
#include "kp_storage.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t s_stop;

static const char *s_str(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static void s_tick(void *user)
{
    kp_bus_heartbeat(user);
}

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void s_publish_changes(kp_bus_t *bus, kp_index_item_t *items, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (items[i].result != 0 || !items[i].study_uid[0]) continue;
        bool dup = false;
        for (size_t j = 0; j < i && !dup; j++)
            dup = items[j].result == 0 && !strcmp(items[j].study_uid, items[i].study_uid);
        if (dup) continue;
        kp_msg_t ev = {.v = 1, .id = 0, .attempt = 0};
        snprintf(ev.type, sizeof ev.type, "study.changed");
        ev.payload = json_pack("{s:s}", "study", items[i].study_uid);
        kp_bus_publish(bus, &ev);
        kp_msg_clear(&ev);
    }
}

int main(int argc, char **argv)
{
    int rc = 1;
    kp_config_t *cfg = kp_worker_start(argc, argv, "pacs-indexer", &s_stop, NULL, &rc);
    if (!cfg) return rc;
    rc = 1;

    kp_storage_t *st = NULL;
    kp_db_t *db = NULL;
    kp_bus_t *bus = NULL;
    size_t cap = (size_t)cfg->indexer_batch;
    kp_msg_t *msgs = calloc(cap, sizeof *msgs);
    kp_index_item_t *items = calloc(cap, sizeof *items);
    size_t *ix = calloc(cap, sizeof *ix); /* items[i] came from msgs[ix[i]] */
    if (!msgs || !items || !ix) abort();

    if (kp_dicom_init()) goto done;
    kp_index_set_site_map(cfg->sites_map);
    st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!st) goto done;
    int err = 0;
    db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!db) goto done;
    bus = kp_bus_new(cfg, "indexer"); /* shown by the broker as host:pid:indexer */
    if (!bus) goto done;
    const char *types[] = {"index"};
    if (kp_bus_worker_ready(bus, types, 1, (int)cfg->indexer_credit)) goto done;
    kp_info("main", "indexing jobs (batch %zu, credit %ld)", cap, cfg->indexer_credit);

    long indexed = 0;
    while (!s_stop) {
        size_t n = 0;
        int r = kp_bus_next_job(bus, &msgs[0], 500);
        if (r == KP_ETIMEOUT) continue;
        if (r) {
            kp_warn("bus", "receive failed: %s", kp_strerror(r));
            usleep(100 * 1000);
            continue;
        }
        n = 1;
        /* Collect what is waiting, and for a moment what is about to arrive, so that a burst is
         * written in a few large transactions rather than many small ones. */
        long until = s_now_ms() + cfg->indexer_batch_wait_ms;
        while (n < cap) {
            long left = until - s_now_ms();
            if (kp_bus_next_job(bus, &msgs[n], left > 0 ? (int)left : 0)) break;
            n++;
        }

        size_t m = 0; /* valid items; malformed jobs are answered at once */
        for (size_t i = 0; i < n; i++) {
            json_t *pl = msgs[i].payload;
            const char *path = s_str(pl, "path");
            json_t *size = json_object_get(pl, "size");
            if (strcmp(msgs[i].type, "index") || !path || !kp_storage_relpath_valid(path)) {
                kp_logc(KP_LOG_ERROR, "job", NULL, "job %lld: malformed index job dropped",
                        (long long)msgs[i].id);
                kp_bus_job_done(bus, msgs[i].id, false);
                continue;
            }
            items[m] = (kp_index_item_t){
                .job_id = msgs[i].id,
                .rel = path,
                .sha256 = s_str(pl, "sha256"),
                .size = json_is_integer(size) ? json_integer_value(size) : -1,
                .calling_ae = s_str(pl, "ae"),
                .called_ae = s_str(pl, "called"),
            };
            ix[m] = i;
            m++;
        }
        int br = kp_index_batch(db, st, items, m, s_tick, bus);
        if (br) {
            kp_error("index", "batch of %zu not written (%s); jobs stay pending", m,
                     kp_strerror(br));
            usleep(200 * 1000);
        } else {
            for (size_t i = 0; i < m; i++) {
                char idb[80]; /* the job, and the request that caused it */
                const char *rid = s_str(msgs[ix[i]].payload, "rid");
                if (rid)
                    snprintf(idb, sizeof idb, "%lld rid=%.40s", (long long)items[i].job_id, rid);
                else
                    snprintf(idb, sizeof idb, "%lld", (long long)items[i].job_id);
                if (items[i].result == 0) {
                    indexed++;
                    kp_logc(KP_LOG_DEBUG, "index", idb, "indexed %s", items[i].rel);
                } else if (items[i].result < 0) {
                    kp_logc(KP_LOG_WARN, "index", idb, "%s could not be indexed: %s", items[i].rel,
                            kp_strerror(items[i].result));
                }
            }
            s_publish_changes(bus, items, m);
        }
        for (size_t i = 0; i < m; i++)
            kp_bus_job_done(bus, items[i].job_id, br == 0);
        for (size_t i = 0; i < n; i++)
            kp_msg_clear(&msgs[i]);
    }
    kp_info("main", "stopping after %ld instances indexed", indexed);
    rc = 0;
done:
    kp_bus_destroy(&bus);
    kp_db_destroy(&db);
    kp_storage_destroy(&st);
    kp_dicom_shutdown();
    free(msgs);
    free(items);
    free(ix);
    kp_config_destroy(&cfg);
    return rc;
}
