/* kp_ingest: the durable ingest path shared by C-STORE and STOW-RS (see kp_ingest.h). */
#include "kp_ingest.h"

#include "kp_bus.h"
#include "kp_db.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct kp_ingest_pending {
    char rel[KP_STORAGE_RELPATH_MAX];
    char sop[72];
    int64_t size;
    char ae[20];
    char called[20]; /* called AE title (C-STORE), or "" */
    char rid[40];    /* request id, or "" */
    int rc;          /* result, valid once done */
    bool done;
    bool no_job; /* nothing to record: the instance is indexed at its compressed copy */
    struct kp_ingest_pending *next;
} s_pending_t;

struct kp_ingest {
    const kp_config_t *cfg;
    kp_storage_t *st;
    kp_db_t *db;
    kp_bus_t *bus;
    pthread_t committer;
    pthread_mutex_t mu;
    pthread_cond_t work;  /* the committer waits for items */
    pthread_cond_t ready; /* callers wait for their group */
    s_pending_t *head, *tail;
    bool stopping;
    long stored, failed;
};

static bool s_is_uid(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n > 0 && n <= 64 && strspn(s, "0123456789.") == n;
}

/* ---- committer thread --------------------------------------------------------------------- */

/* Publishes committed jobs. A failed publish is fine: the outbox sweep publishes them later. */
static void s_publish(kp_ingest_t *g, PGresult *r)
{
    for (int i = 0; i < PQntuples(r); i++) {
        kp_msg_t m = {.v = 1, .id = atoll(PQgetvalue(r, i, 0)), .attempt = 0};
        snprintf(m.type, sizeof m.type, "index");
        m.payload = json_loads(PQgetvalue(r, i, 1), 0, NULL);
        if (m.payload && kp_bus_submit(g->bus, &m))
            kp_debug("bus", "job %lld not published now; the outbox sweep will", (long long)m.id);
        kp_msg_clear(&m);
    }
}

/* Makes a group durable: the outbox INSERT (one statement, one WAL flush) is sent first and the
 * directory fsyncs run while PostgreSQL commits, so the two flushes overlap. Only when both
 * succeeded is the group acknowledged. */
/* Sends the outbox insert of one group (pipelined: the caller fsyncs directories meanwhile). */
static int s_send_insert(kp_ingest_t *g, const char *const *params)
{
    int rc = kp_db_ensure(g->db);
    PGconn *conn = kp_db_conn(g->db);
    if (!rc &&
        !PQsendQueryParams(conn,
                           "INSERT INTO jobs (type, payload, lease_until) SELECT 'index', p, "
                           "now() + make_interval(secs => $2::int) FROM "
                           "jsonb_array_elements($1::jsonb) AS p RETURNING id, payload::text",
                           2, NULL, params, NULL, NULL, 0)) {
        kp_error("db", "cannot send the outbox insert: %s", PQerrorMessage(conn));
        rc = KP_EDB;
    }
    return rc;
}

/* Collects the insert's result: 0 and *ok (the inserted rows), or KP_EDB. */
static int s_insert_result(kp_ingest_t *g, PGresult **ok)
{
    PGconn *conn = kp_db_conn(g->db);
    PGresult *r;
    int rc = 0;
    *ok = NULL;
    while ((r = PQgetResult(conn))) {
        if (PQresultStatus(r) == PGRES_TUPLES_OK && !*ok) {
            *ok = r;
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
    if (!*ok && !rc) rc = KP_EDB;
    if (rc) {
        PQclear(*ok);
        *ok = NULL;
    }
    return rc;
}

static int s_commit_group(kp_ingest_t *g, s_pending_t **items, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_pack("{s:s, s:s, s:I, s:s}", "path", items[i]->rel, "sop", items[i]->sop,
                              "size", (json_int_t)items[i]->size, "ae", items[i]->ae);
        if (items[i]->rid[0]) json_object_set_new(o, "rid", json_string(items[i]->rid));
        if (items[i]->called[0]) json_object_set_new(o, "called", json_string(items[i]->called));
        json_array_append_new(arr, o);
    }
    char *payloads = json_dumps(arr, JSON_COMPACT);
    json_decref(arr);
    char lease[16];
    snprintf(lease, sizeof lease, "%ld", g->cfg->jobs_lease);
    const char *params[] = {payloads, lease};
    int rc = s_send_insert(g, params);
    int dir_rc = 0;
    for (size_t i = 0; i < n && !dir_rc; i++) { /* one fsync per distinct directory */
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strncmp(items[i]->rel, items[j]->rel, 5);
        if (!seen) dir_rc = kp_storage_sync_dir(g->st, items[i]->rel);
    }
    PGresult *ok = NULL;
    if (!rc) rc = s_insert_result(g, &ok);
    /* A connection the server closed while idle (a restart of PostgreSQL) fails the first
     * statement after it: once, on a new connection. A duplicate row, were the lost one
     * committed after all, is harmless: indexing is idempotent. */
    if (rc && PQstatus(kp_db_conn(g->db)) != CONNECTION_OK) {
        kp_warn("db", "lost the database connection; retrying the outbox insert on a new one");
        PQclear(ok);
        ok = NULL;
        rc = s_send_insert(g, params);
        if (!rc) rc = s_insert_result(g, &ok);
    }
    free(payloads);
    if (ok && !rc) s_publish(g, ok); /* committed: even if a directory fsync failed, index it */
    PQclear(ok);
    return rc ? rc : dir_rc;
}

static void *s_committer(void *arg)
{
    kp_ingest_t *g = arg;
    size_t cap = (size_t)g->cfg->dicom_commit_batch;
    s_pending_t **group = calloc(cap, sizeof *group);
    if (!group) abort();
    for (;;) {
        pthread_mutex_lock(&g->mu);
        while (!g->head && !g->stopping)
            pthread_cond_wait(&g->work, &g->mu);
        if (!g->head && g->stopping) {
            pthread_mutex_unlock(&g->mu);
            break;
        }
        size_t n = 0;
        while (g->head && n < cap) {
            group[n++] = g->head;
            g->head = g->head->next;
        }
        if (!g->head) g->tail = NULL;
        pthread_mutex_unlock(&g->mu);

        int rc = s_commit_group(g, group, n);
        if (rc) kp_error("store", "could not commit %zu outbox rows: %s", n, kp_strerror(rc));

        pthread_mutex_lock(&g->mu);
        for (size_t i = 0; i < n; i++) {
            group[i]->rc = rc;
            group[i]->done = true;
        }
        pthread_cond_broadcast(&g->ready);
        pthread_mutex_unlock(&g->mu);
    }
    free(group);
    return NULL;
}

/* ---- the store path ----------------------------------------------------------------------- */

/* Header check (values over 4 KiB, pixel data among them, are not read): a data set the indexer
 * could not index is refused now, while the sender can still be told. */
static int s_check(const kp_ingest_req_t *req, kp_ingest_result_t *res)
{
    int derr = 0;
    kp_dicom_file_t *df = kp_dicom_open(req->tmp_path, &derr);
    if (!df) {
        res->reason = "not a readable DICOM data set";
        return KP_EDICOM;
    }
    const char *study = kp_dicom_get(df, 0x0020000D), *series = kp_dicom_get(df, 0x0020000E);
    const char *sop = kp_dicom_get(df, 0x00080018), *cls = kp_dicom_get(df, 0x00080016);
    snprintf(res->sop_uid, sizeof res->sop_uid, "%s", sop ? sop : "");
    snprintf(res->sop_class, sizeof res->sop_class, "%s", cls ? cls : "");
    snprintf(res->study_uid, sizeof res->study_uid, "%s", study ? study : "");
    snprintf(res->series_uid, sizeof res->series_uid, "%s", series ? series : "");
    kp_dicom_close(&df);
    if (!s_is_uid(res->sop_uid)) {
        res->reason = "SOP Instance UID missing or not a valid UID";
        return KP_EINVAL;
    }
    if (!res->study_uid[0] || !res->series_uid[0]) {
        res->reason = "Study or Series Instance UID missing";
        return KP_EDICOM;
    }
    if (req->expected_sop && strcmp(req->expected_sop, res->sop_uid)) {
        res->reason = "SOP Instance UID in the data set differs from the request";
        return KP_EMISMATCH;
    }
    if (req->expected_study && strcmp(req->expected_study, res->study_uid)) {
        res->reason = "Study Instance UID differs from the study of the request";
        return KP_EMISMATCH;
    }
    return 0;
}

int kp_ingest_prepare(kp_ingest_t *g, const kp_ingest_req_t *req, kp_ingest_result_t *res,
                      kp_ingest_pending_t **out)
{
    memset(res, 0, sizeof *res);
    *out = NULL;
    const char *src = req->source ? req->source : "";
    int rc = 0;
    if (req->expected_sop && !s_is_uid(req->expected_sop)) {
        res->reason = "the announced SOP Instance UID is not a valid UID";
        rc = KP_EINVAL;
    }
    if (!rc) rc = s_check(req, res);
    if (rc) {
        unlink(req->tmp_path);
        kp_warn("store", "%s from %s: refused: %s", res->sop_uid[0] ? res->sop_uid : "instance",
                src, res->reason);
        __atomic_add_fetch(&g->failed, 1, __ATOMIC_RELAXED);
        return rc;
    }
    s_pending_t *p = calloc(1, sizeof *p);
    if (!p) abort();
    const char *sop = res->sop_uid;
    snprintf(p->sop, sizeof p->sop, "%s", sop);
    snprintf(p->ae, sizeof p->ae, "%s", src);
    if (req->called_ae) snprintf(p->called, sizeof p->called, "%s", req->called_ae);
    if (req->request_id) snprintf(p->rid, sizeof p->rid, "%s", req->request_id);
    kp_storage_relpath(sop, p->rel);
    struct stat sb;
    if (stat(req->tmp_path, &sb)) {
        rc = KP_EIO;
        goto fail;
    }
    p->size = (int64_t)sb.st_size;
    /* The content hash is the indexer's work (off the acknowledgement path); here only a second
     * copy of a stored instance is compared, byte for byte. */
    char *dst = kp_storage_abspath(g->st, p->rel);
    bool exists = stat(dst, &sb) == 0;
    int64_t dst_size = exists ? (int64_t)sb.st_size : -1;
    bool identical =
        exists && dst_size == p->size && kp_storage_same_content(dst, req->tmp_path) == 1;
    /* An instance pacs-compressor compressed lives in a file of another name, and the file at
     * its path is removed (after compress.unlink_grace): the original's note, left there by the
     * compressor before it switched the index (kp_storage.h), tells its size and SHA-256. Why a
     * file and not the index: a new instance - nearly every one - costs one open() that fails
     * with ENOENT in the directory just looked up, where a query would cost a database round
     * trip on the acknowledgement path. The note is only believed when it can be true: with no
     * file at the path (removed only after the switch committed), or when that file is the very
     * original it describes (still waiting for its removal, or the switch never happened); next
     * to another file (replaced since; a compressor that lost a race) it is stale and ignored.
     * The instance's content is hashed only when the note's size matches. */
    int64_t orig_size = -1;
    char orig_sha[65];
    int note = kp_storage_original_read(g->st, sop, &orig_size, orig_sha);
    bool compressed =
        note == 1 &&
        (!exists || (dst_size == orig_size && kp_storage_file_is(dst, orig_size, orig_sha) == 1));
    free(dst);
    if (compressed && !exists) {
        exists = true;
        identical =
            p->size == orig_size && kp_storage_file_is(req->tmp_path, orig_size, orig_sha) == 1;
    }
    const char *policy = g->cfg->storage_duplicate_policy;
    if (identical) {
        /* Same content again: nothing to write, but still make sure it is indexed - unless it
         * is the original of a compressed instance: that is indexed already (at its compressed
         * copy, or, when the switch never happened, at this very original), and an index job
         * for this path would put the index back on an original being removed, or on nothing. */
        unlink(req->tmp_path);
        res->identical = true;
        p->no_job = compressed;
        kp_info("store", "%s from %s: identical copy already stored%s", sop, src,
                compressed ? " (compressed)" : "");
    } else if (exists && !strcasecmp(policy, "keep")) {
        unlink(req->tmp_path);
        p->no_job = compressed;
        kp_warn("store", "%s from %s differs from the stored copy; kept the first (policy keep)",
                sop, src);
    } else if (exists && !strcasecmp(policy, "reject")) {
        unlink(req->tmp_path);
        kp_warn("store", "%s from %s differs from the stored copy; refused (policy reject)", sop,
                src);
        res->reason = "a different instance with this SOP Instance UID is stored";
        __atomic_add_fetch(&g->failed, 1, __ATOMIC_RELAXED);
        free(p);
        return KP_EDUPLICATE;
    } else {
        if (exists)
            kp_warn("store", "%s from %s differs from the stored copy; replacing it", sop, src);
        /* A note goes before the new file takes the path: once the new file is there, the note
         * (of another original) must not describe it, even after a crash in between. The
         * compressed copy the index leaves is retired by pacs-compressor. */
        if (note == 1 && (rc = kp_storage_original_remove(g->st, sop))) goto fail;
        if ((rc = kp_storage_commit(g->st, req->tmp_path, p->rel, true))) goto fail;
    }
    *out = p;
    return 0;
fail:
    unlink(req->tmp_path);
    __atomic_add_fetch(&g->failed, 1, __ATOMIC_RELAXED);
    res->reason = "storage error";
    kp_error("store", "%s from %s: %s", sop, src, kp_strerror(rc));
    free(p);
    return rc;
}

int kp_ingest_commit(kp_ingest_t *g, kp_ingest_pending_t **ps, size_t n, int *rcs)
{
    int first = 0;
    if (!n) return 0;
    pthread_mutex_lock(&g->mu);
    if (g->stopping) {
        for (size_t i = 0; i < n; i++) {
            ps[i]->rc = KP_EAGAIN;
            ps[i]->done = true;
        }
    } else {
        bool queued = false;
        for (size_t i = 0; i < n; i++) {
            s_pending_t *p = ps[i];
            if (p->no_job) { /* durable and indexed already: nothing to commit */
                p->rc = 0;
                p->done = true;
                continue;
            }
            p->next = NULL;
            if (g->tail)
                g->tail->next = p;
            else
                g->head = p;
            g->tail = p;
            queued = true;
        }
        if (queued) pthread_cond_signal(&g->work);
    }
    for (size_t i = 0; i < n; i++)
        while (!ps[i]->done)
            pthread_cond_wait(&g->ready, &g->mu);
    pthread_mutex_unlock(&g->mu);
    for (size_t i = 0; i < n; i++) {
        s_pending_t *p = ps[i];
        if (rcs) rcs[i] = p->rc;
        if (p->rc) {
            /* The file may be in place, but without an outbox row the sender was not told
             * success: it sends again, and an identical copy is then a cheap no-op. */
            kp_error("store", "%s from %s: not acknowledged: %s", p->sop, p->ae,
                     kp_strerror(p->rc));
            __atomic_add_fetch(&g->failed, 1, __ATOMIC_RELAXED);
            if (!first) first = p->rc;
        } else {
            __atomic_add_fetch(&g->stored, 1, __ATOMIC_RELAXED);
            kp_debug("store", "%s from %s %s %s", p->sop, p->ae,
                     p->no_job ? "stored already, compressed; was" : "stored as", p->rel);
        }
        free(p);
        ps[i] = NULL;
    }
    return first;
}

int kp_ingest_store(kp_ingest_t *g, const kp_ingest_req_t *req, kp_ingest_result_t *res)
{
    kp_ingest_pending_t *p = NULL;
    int rc = kp_ingest_prepare(g, req, res, &p);
    if (rc) return rc;
    rc = kp_ingest_commit(g, &p, 1, NULL);
    if (rc) res->reason = "the archive could not record the instance (database or storage)";
    return rc;
}

void kp_ingest_counts(kp_ingest_t *g, long *stored, long *failed)
{
    *stored = __atomic_load_n(&g->stored, __ATOMIC_RELAXED);
    *failed = __atomic_load_n(&g->failed, __ATOMIC_RELAXED);
}

/* ---- life cycle --------------------------------------------------------------------------- */

kp_ingest_t *kp_ingest_new(const kp_config_t *cfg, kp_storage_t *st, const char *bus_kind)
{
    kp_ingest_t *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->cfg = cfg;
    g->st = st;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->work, NULL);
    pthread_cond_init(&g->ready, NULL);
    int err = 0;
    g->db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!g->db) goto fail;
    g->bus = kp_bus_new(cfg, bus_kind);
    if (!g->bus) goto fail;
    if (pthread_create(&g->committer, NULL, s_committer, g)) {
        kp_error("store", "cannot start the committer thread");
        goto fail;
    }
    return g;
fail:
    kp_bus_destroy(&g->bus);
    kp_db_destroy(&g->db);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->work);
    pthread_cond_destroy(&g->ready);
    free(g);
    return NULL;
}

void kp_ingest_destroy(kp_ingest_t **pg)
{
    kp_ingest_t *g = pg ? *pg : NULL;
    if (!g) return;
    pthread_mutex_lock(&g->mu);
    g->stopping = true;
    pthread_cond_broadcast(&g->work);
    pthread_mutex_unlock(&g->mu);
    pthread_join(g->committer, NULL);
    kp_bus_destroy(&g->bus);
    kp_db_destroy(&g->db);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->work);
    pthread_cond_destroy(&g->ready);
    free(g);
    *pg = NULL;
}
