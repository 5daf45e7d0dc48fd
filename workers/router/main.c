/* pacs-router: auto-routing of stored instances to DICOM peers and DICOMweb (STOW-RS) servers.
 *
 * Rules (route_rules, managed through /api/routes and pacsctl route) say which instances go
 * where; each (rule, destination, instance) - or (rule, destination, study) for the
 * stable-study trigger - becomes one durable row in route_deliveries, sent with retries and
 * exponential backoff until delivered or dead. The loop:
 *   - every router.scan_interval, and soon after study.changed events: reload the rules,
 *     evaluate newly indexed instances (scan.c: a watermark over instances in PostgreSQL, so
 *     nothing is missed while no router runs), turn stable watched studies into deliveries;
 *   - every 250 ms: claim and send due deliveries (send.c; any number of routers may run);
 *   - a worker of the broker (type "route", which nobody queues today), so its heartbeats show
 *     it alive (pacsctl health worker router).
 * With router.enabled off it only keeps its heartbeats. */
#include "router.h"

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"
#include "kp_worker.h"

#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define S_EVENT_WAIT_MS 200
#define S_SEND_EVERY_MS 250

static volatile sig_atomic_t s_stop;

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int main(int argc, char **argv)
{
    int rc = 1;
    kp_config_t *cfg = kp_worker_start(argc, argv, "pacs-router", &s_stop, NULL, &rc);
    if (!cfg) return rc;
    rc = 1;
    router_t r = {.cfg = cfg, .cursor = -1};
    kp_storage_t *st = NULL;
    kp_db_t *db = NULL;
    kp_bus_t *bus = NULL;
    kp_bus_sub_t *sub = NULL;
    bool curl_ok = false;
    if (kp_dicom_init()) goto done;
    if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
        kp_error("main", "cannot initialise libcurl");
        goto done;
    }
    curl_ok = true;
    st = kp_storage_new(cfg->storage_root, false);
    if (!st) goto done;
    int err = 0;
    db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!db) goto done;
    bus = kp_bus_new(cfg, "router");
    if (!bus) goto done;
    r.db = db;
    r.st = st;
    r.bus = bus;
    const char *types[] = {"route"};
    if (kp_bus_worker_ready(bus, types, 1, 1)) goto done;
    if (cfg->router_enabled) {
        sub = kp_bus_subscribe(cfg, "study.");
        if (!sub) goto done;
        kp_info("main", "routing: scan every %lds, backoff %ld..%lds, batch %ld",
                cfg->router_scan_interval, cfg->router_backoff_base, cfg->router_backoff_max,
                cfg->router_batch);
    } else {
        kp_info("main", "routing is off (router.enabled)");
    }

    long next_scan = 0, next_send = 0, event_at = 0;
    bool from_watermark = true;
    while (!s_stop) {
        kp_msg_t m;
        int br = kp_bus_next_job(bus, &m, 50);
        if (br == 0) { /* nobody queues "route" jobs today; one is a hint to scan */
            kp_bus_job_done(bus, m.id, true);
            kp_msg_clear(&m);
            event_at = event_at ? event_at : s_now_ms();
        }
        if (!cfg->router_enabled) continue;
        kp_msg_t ev;
        while (sub && kp_bus_sub_recv(sub, &ev, 0) == 0) {
            if (!event_at) event_at = s_now_ms();
            kp_msg_clear(&ev);
        }
        long now = s_now_ms();
        bool full = now >= next_scan;
        if (full || (event_at && now - event_at >= S_EVENT_WAIT_MS)) {
            int lr = router_rules_load(&r);
            int sr = lr ? lr : router_scan(&r, from_watermark || full);
            int tr = lr ? lr : router_stable(&r);
            if (sr < 0 || tr < 0) {
                kp_warn("scan", "scan failed (%s); retrying", kp_strerror(sr < 0 ? sr : tr));
                kp_db_ensure(db);
            } else {
                from_watermark = false;
            }
            event_at = 0;
            if (full) next_scan = s_now_ms() + cfg->router_scan_interval * 1000L;
        }
        if (now >= next_send) {
            int n = router_send(&r);
            if (n < 0) {
                kp_warn("deliver", "sending failed: %s", kp_strerror(n));
                kp_db_ensure(db);
            }
            /* a full batch: go on at once */
            next_send = n >= cfg->router_batch ? 0 : s_now_ms() + S_SEND_EVERY_MS;
        }
    }
    kp_info("main", "stopping after %ld delivered, %ld retried, %ld dead", r.delivered, r.retried,
            r.dead);
    rc = 0;
done:
    router_rules_clear(&r);
    kp_bus_sub_destroy(&sub);
    kp_bus_destroy(&bus);
    kp_db_destroy(&db);
    kp_storage_destroy(&st);
    if (curl_ok) curl_global_cleanup();
    kp_dicom_shutdown();
    kp_config_destroy(&cfg);
    return rc;
}
