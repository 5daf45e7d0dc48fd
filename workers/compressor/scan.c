/* pacs-compressor: the policy, the scan that queues `compress` jobs, and the removal of
 * replaced files (see workers/README, "pacs-compressor").
 *
 * The scan is how instances become jobs: PostgreSQL is the truth, so a query over the index
 * finds every instance the policy selects whose current file has no decision yet and no job,
 * and inserts the jobs in the outbox in the same statement (a transaction holding the scan
 * advisory lock, so two compressors never queue the same instance twice). It runs at start-up,
 * every compress.scan_interval, and - on arrival, compress.after = 0 - for the studies named by
 * study.changed events (a hint: a lost event only delays an instance to the next full scan). */
#include "compressor.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

void compressor_path(const char *sop, const char *ts, char out[KP_STORAGE_RELPATH_MAX])
{
    unsigned char nonce[8] = {0};
    if (getrandom(nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce) {
        /* never happens on Linux >= 3.17 for 8 bytes; the clock still separates attempts */
        struct timespec ts_now;
        clock_gettime(CLOCK_REALTIME, &ts_now);
        memcpy(nonce, &ts_now.tv_nsec,
               sizeof nonce < sizeof ts_now.tv_nsec ? sizeof nonce : sizeof ts_now.tv_nsec);
    }
    char key[200];
    int len = snprintf(key, sizeof key, "%s#%s#", sop, ts);
    for (size_t i = 0; i < sizeof nonce && len > 0 && len + 3 < (int)sizeof key; i++)
        len += snprintf(key + len, sizeof key - (size_t)len, "%02x", nonce[i]);
    kp_storage_relpath(key, out);
}

/* "CT, MR" -> {"CT","MR"} (malloc'd). Tokens are modality codes or UIDs: letters, digits, '.',
 * '_' and '-' only. NULL for anything else. */
static char *s_list(const char *key, const char *text)
{
    size_t cap = strlen(text) * 3 + 3, len = 0;
    char *out = malloc(cap);
    if (!out) abort();
    out[len++] = '{';
    const char *p = text;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        if (!*p) break;
        size_t n = strcspn(p, ",");
        size_t t = n;
        while (t && p[t - 1] == ' ')
            t--;
        for (size_t i = 0; i < t; i++) {
            char ch = p[i];
            if (!((ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= 'a' && ch <= 'z') || ch == '.' || ch == '_' || ch == '-')) {
                kp_error("config", "compress.%s: '%.*s' is not a modality or UID", key, (int)t, p);
                free(out);
                return NULL;
            }
        }
        len += (size_t)snprintf(out + len, cap - len, "%s\"%.*s\"", len > 1 ? "," : "", (int)t, p);
        p += n;
    }
    out[len++] = '}';
    out[len] = 0;
    return out;
}

int compressor_policy(compressor_t *c)
{
    const kp_config_t *cfg = c->cfg;
    c->target = !strcmp(cfg->compress_target, "jpeg-lossless") ? "1.2.840.10008.1.2.4.70"
                                                               : "1.2.840.10008.1.2.4.80";
    c->modalities = s_list("modalities", cfg->compress_modalities);
    c->sop_classes = s_list("sop_classes", cfg->compress_sop_classes);
    c->syntaxes = s_list("transfer_syntaxes", cfg->compress_transfer_syntaxes);
    if (!c->modalities || !c->sop_classes || !c->syntaxes) {
        compressor_policy_clear(c);
        return KP_ECONFIG;
    }
    return 0;
}

void compressor_policy_clear(compressor_t *c)
{
    free(c->modalities);
    free(c->sop_classes);
    free(c->syntaxes);
    c->modalities = c->sop_classes = c->syntaxes = NULL;
}

/* The candidates: selected by the policy, old enough, no decision for the current file, no
 * pending job (nor a failed one for this very file: the sweep gave up on it; `pacsctl jobs
 * retry` brings it back). */
#define S_CANDIDATES(STUDY_JOIN)                                                                   \
    "INSERT INTO jobs (type, payload, lease_until) SELECT '" COMPRESSOR_JOB "', "                  \
    "jsonb_build_object('sop', i.sop_uid, 'sha256', i.file_sha256), now() + $7::int * interval "   \
    "'1 second' FROM instances i JOIN series se ON se.pk = i.series_pk " STUDY_JOIN                \
    " WHERE coalesce(i.received_at, i.created_at) <= now() - $1::bigint * interval '1 second' "    \
    "AND (cardinality($2::text[]) = 0 OR se.modality = ANY($2::text[])) "                          \
    "AND (cardinality($3::text[]) = 0 OR i.sop_class_uid = ANY($3::text[])) "                      \
    "AND (cardinality($4::text[]) = 0 OR i.transfer_syntax_uid = ANY($4::text[])) "                \
    "AND NOT EXISTS (SELECT 1 FROM compression c WHERE c.sop_uid = i.sop_uid AND "                 \
    "i.file_sha256 IN (c.before_sha256, c.after_sha256)) "                                         \
    "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.type = '" COMPRESSOR_JOB "' AND "                \
    "j.payload->>'sop' = i.sop_uid AND (j.state = 'pending' OR (j.state = 'failed' AND "           \
    "j.payload->>'sha256' = i.file_sha256))) LIMIT $5::int RETURNING id, payload::text"

int compressor_scan(compressor_t *c, const char *studies)
{
    const kp_config_t *cfg = c->cfg;
    char after[24], batch[24], lease[24];
    snprintf(after, sizeof after, "%ld", cfg->compress_after);
    snprintf(batch, sizeof batch, "%ld", cfg->compress_scan_batch);
    snprintf(lease, sizeof lease, "%ld", cfg->jobs_lease);
    PGresult *r = NULL;
    int rc = kp_db_begin(c->db);
    if (rc) return rc;
    if (studies) {
        rc = kp_db_run(c->db, "SELECT pg_advisory_xact_lock(" COMPRESSOR_SCAN_LOCK ")", 0, NULL);
    } else {
        rc = kp_db_exec(c->db, &r, "SELECT pg_try_advisory_xact_lock(" COMPRESSOR_SCAN_LOCK ")", 0,
                        NULL);
        if (!rc && PQgetvalue(r, 0, 0)[0] != 't') {
            PQclear(r);
            kp_db_rollback(c->db);
            kp_debug("scan", "another compressor is scanning");
            return 0;
        }
        PQclear(r);
        r = NULL;
    }
    if (rc) goto fail;
    const char *p[] = {after, c->modalities, c->sop_classes, c->syntaxes, batch, studies, lease};
    if (studies)
        rc = kp_db_exec(c->db, &r,
                        S_CANDIDATES("JOIN studies st ON st.pk = se.study_pk AND st.study_uid = "
                                     "ANY($6::text[])"),
                        7, p);
    else
        rc = kp_db_exec(c->db, &r, S_CANDIDATES("AND $6::text IS NULL"), 7, p);
    if (rc) goto fail;
    if ((rc = kp_db_commit(c->db))) goto fail;
    int n = PQntuples(r);
    for (int i = 0; i < n && c->bus; i++) {
        kp_msg_t m;
        json_t *payload = json_loads(PQgetvalue(r, i, 1), 0, NULL);
        if (kp_msg_init(&m, COMPRESSOR_JOB, atoll(PQgetvalue(r, i, 0)), payload)) continue;
        if (kp_bus_submit(c->bus, &m))
            kp_debug("scan", "job %s left to the sweep", PQgetvalue(r, i, 0));
        kp_msg_clear(&m);
    }
    PQclear(r);
    if (n)
        kp_info("scan", "%d instance(s) queued for compression%s", n, studies ? " on arrival" : "");
    return n;
fail:
    if (r) PQclear(r);
    kp_db_rollback(c->db);
    return rc;
}

/* Removes one registered file if it is due (one transaction holding its row lock, so a
 * compressor renewing the registration waits for us or we skip it). 1 removed, 0 not, or a
 * negative code. */
static int s_remove(compressor_t *c, const char *rel)
{
    PGresult *r = NULL;
    int removed = 0;
    int rc = kp_db_begin(c->db);
    if (rc) return rc;
    const char *p[] = {rel};
    rc = kp_db_exec(c->db, &r,
                    "SELECT o.sop_uid, coalesce(o.inode::text, ''), EXISTS (SELECT 1 FROM "
                    "instances i WHERE i.sop_uid = o.sop_uid AND i.path = o.path) FROM "
                    "storage_orphans o WHERE o.path = $1 AND o.not_before <= now() FOR UPDATE OF "
                    "o SKIP LOCKED",
                    1, p);
    if (rc) goto fail;
    if (PQntuples(r) != 1) {
        PQclear(r);
        kp_db_rollback(c->db);
        return 0;
    }
    char sop[72];
    snprintf(sop, sizeof sop, "%s", PQgetvalue(r, 0, 0));
    const char *inode = PQgetvalue(r, 0, 1);
    bool referenced = PQgetvalue(r, 0, 2)[0] == 't';
    if (!referenced && kp_storage_relpath_valid(rel)) {
        char *abs = kp_storage_abspath(c->st, rel);
        struct stat sb;
        if (lstat(abs, &sb) == 0 && S_ISREG(sb.st_mode)) {
            if (*inode && strtoull(inode, NULL, 10) != (unsigned long long)sb.st_ino) {
                kp_info("cleanup", "%s was stored again since it was replaced; kept", rel);
            } else if (unlink(abs) == 0) {
                removed = 1;
                kp_storage_sync_dir(c->st, rel);
            } else {
                kp_error("cleanup", "cannot remove %s: %s", abs, strerror(errno));
                free(abs);
                rc = KP_EIO;
                goto fail;
            }
        }
        free(abs);
    }
    PQclear(r);
    r = NULL;
    const char *p2[] = {rel, sop};
    rc = kp_db_run(c->db, "DELETE FROM storage_orphans WHERE path = $1", 1, p2);
    if (!rc && !referenced)
        rc = kp_db_run(c->db,
                       "UPDATE compression SET after_path = NULL WHERE sop_uid = $2 AND "
                       "after_path = $1",
                       2, p2);
    if (!rc) rc = kp_db_commit(c->db);
    if (rc) goto fail;
    if (removed) kp_debug("cleanup", "removed %s (%s)", rel, sop);
    return removed;
fail:
    if (r) PQclear(r);
    kp_db_rollback(c->db);
    return rc;
}

int compressor_cleanup(compressor_t *c, const char *only_path)
{
    int rc = 0;
    if (!only_path) {
        char grace[24];
        snprintf(grace, sizeof grace, "%ld", c->cfg->compress_unlink_grace);
        const char *pg[] = {grace};
        rc = kp_db_run(c->db,
                       "INSERT INTO storage_orphans (path, sop_uid, inode, not_before) SELECT "
                       "c.after_path, c.sop_uid, NULL, now() + $1::int * interval '1 second' FROM "
                       "compression c JOIN instances i ON i.sop_uid = c.sop_uid WHERE c.outcome "
                       "= 'compressed' AND c.after_path IS NOT NULL AND i.path <> c.after_path "
                       "ON CONFLICT (path) DO NOTHING",
                       1, pg);
        if (rc) return rc;
    }
    PGresult *r = NULL;
    const char *p[] = {only_path};
    rc = kp_db_exec(c->db, &r,
                    "SELECT path FROM storage_orphans WHERE not_before <= now() AND ($1::text IS "
                    "NULL OR path = $1) ORDER BY not_before LIMIT 1000",
                    1, p);
    if (rc) return rc;
    int removed = 0;
    for (int i = 0; i < PQntuples(r); i++) {
        int one = s_remove(c, PQgetvalue(r, i, 0));
        if (one < 0) {
            rc = one;
            break;
        }
        removed += one;
        if (c->bus) kp_bus_heartbeat(c->bus);
    }
    PQclear(r);
    if (removed && !only_path) kp_info("cleanup", "%d replaced file(s) removed", removed);
    return rc ? rc : removed;
}

int compressor_backfill_notes(compressor_t *c)
{
    if (c->notes_done) return 0;
    char done_path[4096];
    snprintf(done_path, sizeof done_path, "%s/.original-notes", kp_storage_root(c->st));
    if (access(done_path, F_OK) == 0) {
        c->notes_done = true;
        return 0;
    }
    /* the decisions whose compressed copy the index points to, the original having been at the
     * instance's own path; keyset pages in primary-key order */
    char after[72] = "";
    int written = 0, rc = 0;
    for (;;) {
        PGresult *r = NULL;
        const char *p[] = {after};
        rc = kp_db_exec(c->db, &r,
                        "SELECT c.sop_uid, c.before_size, c.before_sha256, c.before_path FROM "
                        "compression c JOIN instances i ON i.sop_uid = c.sop_uid WHERE c.outcome "
                        "= 'compressed' AND i.path = c.after_path AND i.file_sha256 = "
                        "c.after_sha256 AND c.sop_uid > $1 ORDER BY c.sop_uid LIMIT 1000",
                        1, p);
        if (rc) return rc;
        int n = PQntuples(r);
        for (int i = 0; i < n && !rc; i++) {
            const char *sop = PQgetvalue(r, i, 0), *sha = PQgetvalue(r, i, 2);
            int64_t size = atoll(PQgetvalue(r, i, 1)), have_size;
            char canon[KP_STORAGE_RELPATH_MAX], have_sha[65];
            kp_storage_relpath(sop, canon);
            if (strcmp(canon, PQgetvalue(r, i, 3))) continue; /* the original was elsewhere */
            int have = kp_storage_original_read(c->st, sop, &have_size, have_sha);
            if (have == 0) {
                rc = kp_storage_original_write(c->st, sop, size, sha);
                if (rc == KP_EINVAL)
                    rc = 0; /* not a digest: nothing to note */
                else if (!rc)
                    written++;
            }
        }
        if (n) snprintf(after, sizeof after, "%s", PQgetvalue(r, n - 1, 0));
        PQclear(r);
        if (c->bus) kp_bus_heartbeat(c->bus);
        if (rc) return rc;
        if (n < 1000) break;
    }
    FILE *f = fopen(done_path, "w");
    if (f) {
        fputs("original notes written for instances compressed before they existed\n", f);
        fclose(f);
    }
    c->notes_done = true;
    if (written)
        kp_info("cleanup", "%d original note(s) written for instances compressed earlier", written);
    return written;
}
