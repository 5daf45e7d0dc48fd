/* pacs-dicomd: the DICOM daemon (DIMSE service provider).
 *
 * Serves C-ECHO, C-STORE, C-FIND (kp_find.c), C-MOVE and C-GET (kp_retrieve.c) through the DCMTK
 * shim (lib/dicom). Each association runs on its own thread; a C-STORE dataset is received
 * bit-preserving straight into a temp file and handed to the shared ingest path (lib/kp_ingest.c,
 * also used by STOW-RS), which applies the durability rule of ARCHITECTURE section 3 before the
 * response is sent: the file is fsync'd and renamed on the association thread, and one committer
 * thread records whole groups of concurrent stores in ONE outbox statement, overlapping the
 * directory fsyncs with the commit. If the database is down the stores fail with a DIMSE failure
 * (A700: out of resources) and the modality retries; a lost bus message is found again by the
 * outbox sweep in pacs-busd.
 *
 * Access: dicom.allowed_aes rejects associations; per operation, a calling AE must be in the
 * modality registry with allow_store / allow_find / allow_retrieve when
 * dicom.store_require_registered / find_require_registered / retrieve_require_registered say
 * so (status 0124 otherwise), and an AE scoped to a site finds and retrieves only that site's
 * studies (kp_access). DICOM TLS: dicom.tls_port adds a TLS listener served by the same pool;
 * C-MOVE destinations registered with tls=true are reached over TLS (lib/dicom). */
#include "kp_access.h"
#include "kp_bus.h"
#include "kp_dbpool.h"
#include "kp_config.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_find.h"
#include "kp_ingest.h"
#include "kp_log.h"
#include "kp_retrieve.h"
#include "kp_storage.h"

#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Counters of this process, published every few seconds as a `metrics.dicomd` bus event; the
 * gateway's /metrics exports the latest of each dicomd (schema/messages.md). */
static struct {
    atomic_llong assoc_accepted, assoc_rejected, stores_ok, stores_failed, bytes_received;
    atomic_llong queries, retrieves, instances_sent, bytes_sent;
} s_m;

static struct {
    kp_config_t *cfg;
    kp_storage_t *st;
    kp_ingest_t *ing;   /* the durable store path (own database connection, bus, committer) */
    kp_find_t *find;    /* C-FIND service, its own database connections */
    kp_retrieve_t *ret; /* C-MOVE / C-GET service, its own connections and audit bus */
    kp_dbpool_t *acc;   /* registry lookups of C-STORE (dicom.store_require_registered) */
} s_d;

static volatile int s_stop;
static volatile sig_atomic_t s_reload;

static void s_on_signal(int sig)
{
    if (sig == SIGHUP)
        s_reload = 1;
    else
        s_stop = 1;
}

/* ---- association acceptance -------------------------------------------------------------- */

static bool s_in_list(const char *list, const char *ae)
{
    const char *p = list;
    size_t al = strlen(ae);
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *e = p;
        while (*e && *e != ',')
            e++;
        const char *t = e;
        while (t > p && t[-1] == ' ')
            t--;
        if ((size_t)(t - p) == al && strncmp(p, ae, al) == 0) return true;
        p = e;
    }
    return false;
}

static int s_on_assoc(void *user, const kp_dicom_assoc_info_t *a)
{
    (void)user;
    const char *calling = a->calling_ae, *called = a->called_ae, *host = a->peer_host;
    const kp_config_t *cfg = s_d.cfg;
    int result = 0;
    const char *why = NULL;
    if (cfg->dicom_check_called_ae && strcmp(called, cfg->dicom_ae_title)) {
        kp_warn("assoc", "rejected association from %s (%s): called AE '%s' is not ours (%s)",
                calling, host, called, cfg->dicom_ae_title);
        result = 2;
        why = "called AE title is not ours";
    } else if (cfg->dicom_allowed_aes[0] && !s_in_list(cfg->dicom_allowed_aes, calling)) {
        kp_warn("assoc", "rejected association from %s (%s): calling AE not in dicom.allowed_aes",
                calling, host);
        result = 1;
        why = "calling AE title not allowed";
    } else {
        kp_debug("assoc", "association from %s (%s) to %s accepted", calling, host, called);
    }
    atomic_fetch_add(result ? &s_m.assoc_rejected : &s_m.assoc_accepted, 1);
    /* every association, accepted or not, is in the audit trail */
    json_t *d = json_pack("{s:s, s:b}", "called_ae", called ? called : "", "tls", a->tls);
    if (d && why) json_object_set_new(d, "reason", json_string(why));
    if (s_d.ret)
        kp_retrieve_audit(s_d.ret, "dicom.association", result ? "failure" : "success", calling,
                          host, NULL, d);
    json_decref(d);
    return result;
}

/* ---- C-STORE ------------------------------------------------------------------------------ */

/* The received file is made durable and recorded through the shared ingest path (kp_ingest.c),
 * the same one STOW-RS uses; only then is the status sent. */
static unsigned s_on_store(void *user, const kp_dicom_store_req_t *req)
{
    (void)user;
    if (s_d.cfg->dicom_store_require_registered) {
        kp_access_t acc;
        kp_db_t *db = kp_dbpool_acquire(s_d.acc);
        int rc = db ? kp_access_lookup(db, req->calling_ae, KP_ACCESS_STORE, &acc) : KP_EDB;
        kp_dbpool_release(s_d.acc, db);
        if (!rc && !acc.allowed) {
            kp_warn("store",
                    "C-STORE %s from %s (%s) refused: not a registered AE with allow_store",
                    req->sop_instance_uid ? req->sop_instance_uid : "?", req->calling_ae,
                    req->peer_host);
            rc = KP_EPERM;
        }
        if (rc) {
            (void)unlink(req->tmp_path); /* the callback owns the received file */
            return kp_error_dimse(rc);
        }
    }
    kp_ingest_req_t in = {.tmp_path = req->tmp_path,
                          .expected_sop = req->sop_instance_uid ? req->sop_instance_uid : "",
                          .source = req->calling_ae,
                          .called_ae = req->called_ae};
    kp_ingest_result_t res;
    struct stat sb;
    long long size = stat(req->tmp_path, &sb) == 0 ? (long long)sb.st_size : 0;
    int rc = kp_ingest_store(s_d.ing, &in, &res);
    atomic_fetch_add(rc ? &s_m.stores_failed : &s_m.stores_ok, 1);
    if (!rc) atomic_fetch_add(&s_m.bytes_received, size);
    return rc ? kp_error_dimse(rc) : 0x0000;
}

/* ---- C-FIND, C-MOVE, C-GET: the shim has one user pointer; each service gets its own ----- */

static unsigned s_on_find(void *user, const kp_dicom_find_req_t *req, kp_dicom_find_results_t *out)
{
    (void)user;
    unsigned st = kp_find_handle(s_d.find, req, out);
    atomic_fetch_add(&s_m.queries, 1);
    /* the query in the audit trail: level and the keys that had a value (the filter) */
    json_t *keys = json_object();
    const char *study = NULL;
    for (size_t i = 0; keys && i < req->nkeys; i++) {
        if (!req->keys[i].value || !*req->keys[i].value) continue;
        char tag[9];
        snprintf(tag, sizeof tag, "%08X", (unsigned)req->keys[i].tag);
        json_object_set_new(keys, tag, json_string(req->keys[i].value));
        if (req->keys[i].tag == 0x0020000D && !strchr(req->keys[i].value, '\\'))
            study = req->keys[i].value;
    }
    char sts[8];
    snprintf(sts, sizeof sts, "%04X", st & 0xFFFFu);
    json_t *d = json_pack("{s:s, s:o, s:s}", "level", req->level ? req->level : "", "keys",
                          keys ? keys : json_object(), "status", sts);
    kp_retrieve_audit(s_d.ret, "dicom.find", (st == 0 || st == 0xFE00) ? "success" : "failure",
                      req->calling_ae, req->peer_host, study, d);
    json_decref(d);
    return st;
}

static unsigned s_on_retrieve(void *user, const kp_dicom_retrieve_req_t *req,
                              kp_dicom_retrieve_plan_t *plan)
{
    (void)user;
    return kp_retrieve_handle(s_d.ret, req, plan);
}

static void s_on_retrieve_done(void *user, const kp_dicom_retrieve_req_t *req,
                               const kp_dicom_retrieve_result_t *res)
{
    (void)user;
    atomic_fetch_add(&s_m.retrieves, 1);
    atomic_fetch_add(&s_m.instances_sent, (long long)res->completed + res->warning);
    atomic_fetch_add(&s_m.bytes_sent, (long long)res->bytes_sent);
    kp_retrieve_done(s_d.ret, req, res);
}

/* ---- metrics: a metrics.dicomd event every 5 s (fire and forget: counters are cumulative,
 * so a lost event only delays the next value) ------------------------------------------------ */
static void *s_metrics_main(void *arg)
{
    (void)arg;
    kp_bus_t *bus = kp_bus_new(s_d.cfg, "dicomd-metrics");
    if (!bus) {
        kp_warn("main", "no bus for metrics events: /metrics will not show this dicomd");
        return NULL;
    }
    char host[128] = "localhost", process[160];
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = 0;
    snprintf(process, sizeof process, "%s:%d", host, (int)getpid());
    long long started = (long long)time(NULL);
    for (int tick = 0; !s_stop; tick++) {
        if (tick % 50 == 0) {
            json_t *p = json_pack(
                "{s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "process", process, "started",
                started, "associations_accepted", atomic_load(&s_m.assoc_accepted),
                "associations_rejected", atomic_load(&s_m.assoc_rejected), "stores_ok",
                atomic_load(&s_m.stores_ok), "stores_failed", atomic_load(&s_m.stores_failed),
                "bytes_received", atomic_load(&s_m.bytes_received), "queries",
                atomic_load(&s_m.queries), "retrieves", atomic_load(&s_m.retrieves),
                "instances_sent", atomic_load(&s_m.instances_sent), "bytes_sent",
                atomic_load(&s_m.bytes_sent));
            kp_msg_t m;
            if (p && kp_msg_init(&m, "metrics.dicomd", 0, p) == 0) { /* takes p */
                (void)kp_bus_publish(bus, &m);
                kp_msg_clear(&m);
            }
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kp_bus_destroy(&bus);
    return NULL;
}

int main(int argc, char **argv)
{
    bool exit_now = false;
    int rc = 1;
    s_d.cfg = kp_config_from_args(argc, argv, "pacs-dicomd", &exit_now, NULL);
    if (!s_d.cfg) return exit_now ? 0 : 1;
    if (exit_now) {
        kp_config_destroy(&s_d.cfg);
        return 0;
    }
    struct sigaction sa = {.sa_handler = s_on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (kp_dicom_init()) goto done;
    s_d.st = kp_storage_new(s_d.cfg->storage_root, s_d.cfg->storage_fsync);
    if (!s_d.st) goto done;
    int removed = kp_storage_clean_tmp(s_d.st, 3600);
    if (removed) kp_info("storage", "removed %d stale temp files", removed);
    s_d.ing = kp_ingest_new(s_d.cfg, s_d.st, "dicomd");
    if (!s_d.ing) goto done;
    s_d.find = kp_find_new(s_d.cfg, (int)s_d.cfg->dicom_max_associations);
    if (!s_d.find) goto done;
    s_d.ret =
        kp_retrieve_new(s_d.cfg, kp_storage_root(s_d.st), (int)s_d.cfg->dicom_max_associations);
    if (!s_d.ret) goto done;
    s_d.acc = kp_dbpool_new(s_d.cfg->db_conninfo, (int)s_d.cfg->dicom_max_associations);
    if (!s_d.acc) goto done;

    kp_dicom_scp_config_t scp = {
        .ae_title = s_d.cfg->dicom_ae_title,
        .port = (int)s_d.cfg->dicom_port,
        .max_pdu = (int)s_d.cfg->dicom_max_pdu,
        .max_associations = (int)s_d.cfg->dicom_max_associations,
        .acse_timeout = (int)s_d.cfg->dicom_acse_timeout,
        .dimse_timeout = (int)s_d.cfg->dicom_dimse_timeout,
        .tmp_dir = kp_storage_tmpdir(s_d.st),
        .min_free_bytes = (long long)s_d.cfg->storage_min_free_mb * 1024 * 1024,
        .on_store = s_on_store,
        .on_assoc_info = s_on_assoc,
        .on_find = s_on_find,
        .on_retrieve = s_on_retrieve,
        .on_retrieve_done = s_on_retrieve_done,
        .user = NULL,
        .stop = &s_stop,
        .tls_port = (int)s_d.cfg->dicom_tls_port,
        .tls = {.cert_file = s_d.cfg->dicom_tls_cert,
                .key_file = s_d.cfg->dicom_tls_key,
                .ca_file = s_d.cfg->dicom_tls_ca,
                .require_peer_cert = s_d.cfg->dicom_tls_require_client_cert},
    };
    if (s_d.cfg->dicom_tls_port)
        kp_info("main", "listening as %s on port %ld and DICOM TLS port %ld (storage %s)",
                s_d.cfg->dicom_ae_title, s_d.cfg->dicom_port, s_d.cfg->dicom_tls_port,
                kp_storage_root(s_d.st));
    else
        kp_info("main", "listening as %s on port %ld (storage %s)", s_d.cfg->dicom_ae_title,
                s_d.cfg->dicom_port, kp_storage_root(s_d.st));
    pthread_t metrics;
    bool metrics_on = pthread_create(&metrics, NULL, s_metrics_main, NULL) == 0;
    rc = kp_dicom_scp_run(&scp) ? 1 : 0;
    s_stop = 1;
    if (metrics_on) pthread_join(metrics, NULL);
    long stored, failed;
    kp_ingest_counts(s_d.ing, &stored, &failed);
    kp_info("main", "stopping: %ld instances stored, %ld failed", stored, failed);
done:
    kp_ingest_destroy(&s_d.ing);
    kp_find_destroy(&s_d.find);
    kp_retrieve_destroy(&s_d.ret);
    kp_dbpool_destroy(&s_d.acc);
    kp_storage_destroy(&s_d.st);
    kp_dicom_shutdown();
    kp_config_destroy(&s_d.cfg);
    return rc;
}
