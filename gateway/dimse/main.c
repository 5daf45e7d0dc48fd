/* pacs-dicomd: the DICOM daemon (DIMSE service provider).
 *
 * Serves C-ECHO, C-STORE and C-FIND (kp_find.c) through the DCMTK shim (lib/dicom). Each
 * association runs on its own thread; a C-STORE dataset is received bit-preserving straight into a
 * temp file, and then the durability rule of ARCHITECTURE section 3 is applied before the response
 * is sent:
 *
 *   association thread                      committer thread (one)
 *   ------------------                      ----------------------
 *   hash the file, apply the duplicate
 *   policy, fsync it, rename into place  ->  queue
 *   wait                                     take everything queued (a group), fsync each
 *                                            distinct directory once, insert the group's
 *                                            outbox rows in ONE statement (one commit)
 *   send the status                      <-  wake the group; publish `index` jobs on the bus
 *
 * So many concurrent stores share one transaction and one journal flush, while each file's own
 * fsync runs in parallel on its association thread. If the database is down the stores fail
 * with a DIMSE failure (A700: out of resources) and the modality retries; a lost bus message is
 * found again by the outbox sweep in pacs-busd. */
#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_find.h"
#include "kp_log.h"
#include "kp_msg.h"
#include "kp_storage.h"

#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct s_pending {
    char rel[KP_STORAGE_RELPATH_MAX];
    char sop[72];
    int64_t size;
    char ae[20];
    int rc; /* result, valid once done */
    bool done;
    struct s_pending *next;
} s_pending_t;

static struct {
    kp_config_t *cfg;
    kp_storage_t *st;
    kp_db_t *db;
    kp_bus_t *bus;
    kp_find_t *find; /* C-FIND service, its own database connections */
    pthread_mutex_t mu;
    pthread_cond_t work;  /* committer waits for items */
    pthread_cond_t ready; /* association threads wait for their group */
    s_pending_t *head, *tail;
    bool stopping;
    long stored, failed;
} s_d = {.mu = PTHREAD_MUTEX_INITIALIZER,
         .work = PTHREAD_COND_INITIALIZER,
         .ready = PTHREAD_COND_INITIALIZER};

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

static int s_on_assoc(void *user, const char *calling, const char *called, const char *host)
{
    (void)user;
    const kp_config_t *cfg = s_d.cfg;
    if (cfg->dicom_check_called_ae && strcmp(called, cfg->dicom_ae_title)) {
        kp_warn("assoc", "rejected association from %s (%s): called AE '%s' is not ours (%s)",
                calling, host, called, cfg->dicom_ae_title);
        return 2;
    }
    if (cfg->dicom_allowed_aes[0] && !s_in_list(cfg->dicom_allowed_aes, calling)) {
        kp_warn("assoc", "rejected association from %s (%s): calling AE not in dicom.allowed_aes",
                calling, host);
        return 1;
    }
    kp_debug("assoc", "association from %s (%s) to %s accepted", calling, host, called);
    return 0;
}

/* ---- C-STORE ------------------------------------------------------------------------------ */

static int s_wait_committed(s_pending_t *p)
{
    pthread_mutex_lock(&s_d.mu);
    if (s_d.stopping) {
        pthread_mutex_unlock(&s_d.mu);
        return KP_EAGAIN;
    }
    p->next = NULL;
    if (s_d.tail)
        s_d.tail->next = p;
    else
        s_d.head = p;
    s_d.tail = p;
    pthread_cond_signal(&s_d.work);
    while (!p->done)
        pthread_cond_wait(&s_d.ready, &s_d.mu);
    pthread_mutex_unlock(&s_d.mu);
    return p->rc;
}

static unsigned s_on_store(void *user, const kp_dicom_store_req_t *req)
{
    (void)user;
    s_pending_t p = {0};
    int rc = 0;
    const char *sop = req->sop_instance_uid;
    size_t sl = sop ? strlen(sop) : 0;
    if (!sl || sl > 64 || strspn(sop, "0123456789.") != sl) {
        kp_warn("store", "refused an instance with an invalid SOP Instance UID from %s",
                req->calling_ae);
        unlink(req->tmp_path);
        return kp_error_dimse(KP_EINVAL);
    }
    snprintf(p.sop, sizeof p.sop, "%s", sop);
    snprintf(p.ae, sizeof p.ae, "%s", req->calling_ae);
    /* Header check (values over 4 KiB, pixel data among them, are not read): a data set the
     * indexer could not index is refused now, while the modality can still be told. */
    int derr = 0;
    kp_dicom_file_t *df = kp_dicom_open(req->tmp_path, &derr);
    if (!df) {
        kp_warn("store", "%s from %s: not a readable DICOM data set", sop, req->calling_ae);
        unlink(req->tmp_path);
        return kp_error_dimse(KP_EDICOM);
    }
    const char *study = kp_dicom_get(df, 0x0020000D), *series = kp_dicom_get(df, 0x0020000E);
    const char *ds_sop = kp_dicom_get(df, 0x00080018);
    int bad = !study || !*study || !series || !*series ? KP_EDICOM
              : !ds_sop || strcmp(ds_sop, sop)         ? KP_EMISMATCH
                                                       : 0;
    kp_dicom_close(&df);
    if (bad) {
        kp_warn("store", "%s from %s: refused: %s", sop, req->calling_ae,
                bad == KP_EDICOM ? "Study or Series Instance UID missing"
                                 : "SOP Instance UID in the data set differs from the request");
        unlink(req->tmp_path);
        return kp_error_dimse(bad);
    }
    kp_storage_relpath(sop, p.rel);
    struct stat sb;
    if (stat(req->tmp_path, &sb)) {
        rc = KP_EIO;
        goto fail;
    }
    p.size = (int64_t)sb.st_size;
    /* The content hash is the indexer's work (off the acknowledgement path); here only a
     * second copy of a stored instance is compared, byte for byte. */
    char *dst = kp_storage_abspath(s_d.st, p.rel);
    bool exists = stat(dst, &sb) == 0;
    bool identical =
        exists && (int64_t)sb.st_size == p.size && kp_storage_same_content(dst, req->tmp_path) == 1;
    free(dst);
    if (identical) {
        /* Same content again: nothing to write, but still make sure it is indexed. */
        unlink(req->tmp_path);
        kp_info("store", "%s from %s: identical copy already stored", sop, req->calling_ae);
    } else if (exists && !strcasecmp(s_d.cfg->storage_duplicate_policy, "keep")) {
        unlink(req->tmp_path);
        kp_warn("store", "%s from %s differs from the stored copy; kept the first (policy keep)",
                sop, req->calling_ae);
    } else if (exists && !strcasecmp(s_d.cfg->storage_duplicate_policy, "reject")) {
        unlink(req->tmp_path);
        kp_warn("store", "%s from %s differs from the stored copy; refused (policy reject)", sop,
                req->calling_ae);
        return kp_error_dimse(KP_EDUPLICATE);
    } else {
        if (exists)
            kp_warn("store", "%s from %s differs from the stored copy; replacing it", sop,
                    req->calling_ae);
        if ((rc = kp_storage_commit(s_d.st, req->tmp_path, p.rel, true))) goto fail;
    }
    rc = s_wait_committed(&p);
    if (rc) {
        /* The file may be in place, but without an outbox row the sender was not told success:
         * it sends again, and an identical copy is then a cheap no-op. */
        kp_error("store", "%s from %s: not acknowledged: %s", sop, req->calling_ae,
                 kp_strerror(rc));
        __atomic_add_fetch(&s_d.failed, 1, __ATOMIC_RELAXED);
        return kp_error_dimse(rc);
    }
    __atomic_add_fetch(&s_d.stored, 1, __ATOMIC_RELAXED);
    kp_debug("store", "%s from %s stored as %s", sop, req->calling_ae, p.rel);
    return 0x0000;
fail:
    unlink(req->tmp_path);
    __atomic_add_fetch(&s_d.failed, 1, __ATOMIC_RELAXED);
    kp_error("store", "%s from %s: %s", sop, req->calling_ae, kp_strerror(rc));
    return kp_error_dimse(rc);
}

/* ---- committer thread ------------------------------------------------------------------- */

/* Publishes committed jobs. A failed publish is fine: the outbox sweep publishes them later. */
static void s_publish(PGresult *r)
{
    for (int i = 0; i < PQntuples(r); i++) {
        kp_msg_t m = {.v = 1, .id = atoll(PQgetvalue(r, i, 0)), .attempt = 0};
        snprintf(m.type, sizeof m.type, "index");
        m.payload = json_loads(PQgetvalue(r, i, 1), 0, NULL);
        if (m.payload && kp_bus_submit(s_d.bus, &m))
            kp_debug("bus", "job %lld not published now; the outbox sweep will", (long long)m.id);
        kp_msg_clear(&m);
    }
}

/* Makes a group durable: the outbox INSERT (one statement, one WAL flush) is sent first and the
 * directory fsyncs run while PostgreSQL commits, so the two flushes overlap. Only when both
 * succeeded is the group acknowledged. */
static int s_commit_group(s_pending_t **items, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, json_pack("{s:s, s:s, s:I, s:s}", "path", items[i]->rel, "sop",
                                             items[i]->sop, "size", (json_int_t)items[i]->size,
                                             "ae", items[i]->ae));
    char *payloads = json_dumps(arr, JSON_COMPACT);
    json_decref(arr);
    char lease[16];
    snprintf(lease, sizeof lease, "%ld", s_d.cfg->jobs_lease);
    const char *params[] = {payloads, lease};
    int rc = kp_db_ensure(s_d.db);
    PGconn *conn = kp_db_conn(s_d.db);
    if (!rc &&
        !PQsendQueryParams(conn,
                           "INSERT INTO jobs (type, payload, lease_until) SELECT 'index', p, "
                           "now() + make_interval(secs => $2::int) FROM "
                           "jsonb_array_elements($1::jsonb) AS p RETURNING id, payload::text",
                           2, NULL, params, NULL, NULL, 0)) {
        kp_error("db", "cannot send the outbox insert: %s", PQerrorMessage(conn));
        rc = KP_EDB;
    }
    free(payloads);
    int dir_rc = 0;
    for (size_t i = 0; i < n && !dir_rc; i++) { /* one fsync per distinct directory */
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strncmp(items[i]->rel, items[j]->rel, 5);
        if (!seen) dir_rc = kp_storage_sync_dir(s_d.st, items[i]->rel);
    }
    if (rc) return rc;
    PGresult *r, *ok = NULL;
    while ((r = PQgetResult(conn))) {
        if (PQresultStatus(r) == PGRES_TUPLES_OK && !ok) {
            ok = r;
            continue;
        }
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
            msg[strcspn(msg, "\n")] = 0;
            kp_error("db", "outbox insert failed: %s", msg);
            rc = KP_EDB;
        }
        PQclear(r);
    }
    if (!ok && !rc) rc = KP_EDB;
    if (ok && !rc) s_publish(ok); /* committed: even if a directory fsync failed, index it */
    PQclear(ok);
    return rc ? rc : dir_rc;
}

static void *s_committer(void *arg)
{
    (void)arg;
    size_t cap = (size_t)s_d.cfg->dicom_commit_batch;
    s_pending_t **group = calloc(cap, sizeof *group);
    if (!group) abort();
    for (;;) {
        pthread_mutex_lock(&s_d.mu);
        while (!s_d.head && !s_d.stopping)
            pthread_cond_wait(&s_d.work, &s_d.mu);
        if (!s_d.head && s_d.stopping) {
            pthread_mutex_unlock(&s_d.mu);
            break;
        }
        size_t n = 0;
        while (s_d.head && n < cap) {
            group[n++] = s_d.head;
            s_d.head = s_d.head->next;
        }
        if (!s_d.head) s_d.tail = NULL;
        pthread_mutex_unlock(&s_d.mu);

        int rc = s_commit_group(group, n);
        if (rc) kp_error("store", "could not commit %zu outbox rows: %s", n, kp_strerror(rc));

        pthread_mutex_lock(&s_d.mu);
        for (size_t i = 0; i < n; i++) {
            group[i]->rc = rc;
            group[i]->done = true;
        }
        pthread_cond_broadcast(&s_d.ready);
        pthread_mutex_unlock(&s_d.mu);
    }
    free(group);
    return NULL;
}

int main(int argc, char **argv)
{
    bool exit_now = false;
    int rc = 1;
    pthread_t committer;
    bool committer_started = false;
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
    int err = 0;
    s_d.db = kp_db_connect(s_d.cfg->db_conninfo, (int)s_d.cfg->db_connect_timeout, true, &err);
    if (!s_d.db) goto done;
    s_d.bus = kp_bus_new(s_d.cfg, "dicomd");
    if (!s_d.bus) goto done;
    s_d.find = kp_find_new(s_d.cfg, (int)s_d.cfg->dicom_max_associations);
    if (!s_d.find) goto done;
    if (pthread_create(&committer, NULL, s_committer, NULL)) goto done;
    committer_started = true;

    kp_dicom_scp_config_t scp = {
        .ae_title = s_d.cfg->dicom_ae_title,
        .port = (int)s_d.cfg->dicom_port,
        .max_pdu = (int)s_d.cfg->dicom_max_pdu,
        .max_associations = (int)s_d.cfg->dicom_max_associations,
        .acse_timeout = (int)s_d.cfg->dicom_acse_timeout,
        .dimse_timeout = (int)s_d.cfg->dicom_dimse_timeout,
        .tmp_dir = kp_storage_tmpdir(s_d.st),
        .on_store = s_on_store,
        .on_assoc = s_on_assoc,
        .on_find = kp_find_handle,
        .user = s_d.find,
        .stop = &s_stop,
    };
    kp_info("main", "listening as %s on port %ld (storage %s)", s_d.cfg->dicom_ae_title,
            s_d.cfg->dicom_port, kp_storage_root(s_d.st));
    rc = kp_dicom_scp_run(&scp) ? 1 : 0;
    kp_info("main", "stopping: %ld instances stored, %ld failed", s_d.stored, s_d.failed);
done:
    if (committer_started) {
        pthread_mutex_lock(&s_d.mu);
        s_d.stopping = true;
        pthread_cond_broadcast(&s_d.work);
        pthread_mutex_unlock(&s_d.mu);
        pthread_join(committer, NULL);
    }
    kp_find_destroy(&s_d.find);
    kp_bus_destroy(&s_d.bus);
    kp_db_destroy(&s_d.db);
    kp_storage_destroy(&s_d.st);
    kp_dicom_shutdown();
    kp_config_destroy(&s_d.cfg);
    return rc;
}
