/* pacs-compressor: one `compress` job, i.e. one instance (see workers/README, "pacs-compressor").
 *
 *   1. read the index row; nothing to do when the instance is gone, its current file already
 *      has a decision, or the policy no longer selects it (the job is just marked done);
 *   2. look at the file (kp_compress_inspect) and skip, with a recorded reason, what cannot or
 *      need not be compressed;
 *   3. transcode in memory (kp_image_transcode), keep it only when smaller, write it to a temp
 *      file and check it decodes to the very same pixels and attributes (kp_compress_verify);
 *   4. register the new path in storage_orphans (a lease: should we die before step 5, a
 *      cleanup removes the file), then make it durable under its own name (temp, fsync,
 *      rename, directory fsync) - the index still points to the original, which is untouched;
 *      then, when the original is at the instance's own path, leave the original's note there
 *      (its size and SHA-256, durable: kp_storage_original_write), by which the ingest knows
 *      an identical copy sent again once the original is gone;
 *   5. ONE transaction: the instance row takes the new path, size, digest, syntax, pixel
 *      location and metadata (only if its file is still the one we compressed), the decision
 *      is recorded, the new path leaves storage_orphans and the old one enters it (removed
 *      after compress.unlink_grace), as does the compressed copy of an earlier version the
 *      decision named, the job is marked done;
 *   6. publish study.changed (the gateway drops its cached metadata).
 * So the index points either to the original (complete, untouched) or to the compressed copy
 * (complete, durable, verified) and never to anything else; kill -9 anywhere leaves at worst a
 * registered file that a cleanup removes, and the job, still pending, is done again. */
#include "compressor.h"
#include "kp_compress.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_image.h"
#include "kp_index.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The instance as the index has it (strings copied out of the result). */
typedef struct {
    char path[KP_STORAGE_RELPATH_MAX + 8], sha[72], ts[72], study[72], series[72], modality[20],
        sop_class[72];
    int64_t size;
    bool decided; /* a decision exists for this very file */
} s_row_t;

/* A skip: the reason code (stable, counted by pacsctl stats) and a human-readable detail. */
typedef struct {
    const char *reason;
    char detail[256];
} s_skip_t;

static void s_ctx(char out[24], int64_t job_id)
{
    snprintf(out, 24, "%lld", (long long)job_id);
}

/* Records why a job must be retried (best effort, outside any transaction). */
static void s_job_error(compressor_t *c, int64_t job_id, const char *why)
{
    if (job_id <= 0) return;
    char id[24];
    s_ctx(id, job_id);
    const char *p[] = {id, why};
    kp_db_run(c->db, "UPDATE jobs SET last_error = $2, updated_at = now() WHERE id = $1::bigint", 2,
              p);
}

/* Marks the job done in the current transaction (or on its own). */
static int s_job_done(compressor_t *c, int64_t job_id)
{
    if (job_id <= 0) return 0;
    char id[24];
    s_ctx(id, job_id);
    const char *p[] = {id};
    return kp_db_run(c->db,
                     "UPDATE jobs SET state = 'done', updated_at = now(), last_error = NULL "
                     "WHERE id = $1::bigint AND state = 'pending'",
                     1, p);
}

static int s_read_row(compressor_t *c, const char *sop, s_row_t *row, bool *found)
{
    PGresult *r = NULL;
    const char *p[] = {sop};
    int rc = kp_db_exec(
        c->db, &r,
        "SELECT i.path, i.file_sha256, i.file_size, coalesce(i.transfer_syntax_uid, ''), "
        "st.study_uid, se.series_uid, coalesce(se.modality, ''), coalesce(i.sop_class_uid, ''), "
        "EXISTS (SELECT 1 FROM compression c WHERE c.sop_uid = i.sop_uid AND i.file_sha256 IN "
        "(c.before_sha256, c.after_sha256)) FROM instances i JOIN series se ON se.pk = "
        "i.series_pk JOIN studies st ON st.pk = se.study_pk WHERE i.sop_uid = $1",
        1, p);
    if (rc) return rc;
    *found = PQntuples(r) == 1;
    if (*found) {
        snprintf(row->path, sizeof row->path, "%s", PQgetvalue(r, 0, 0));
        snprintf(row->sha, sizeof row->sha, "%s", PQgetvalue(r, 0, 1));
        row->size = atoll(PQgetvalue(r, 0, 2));
        snprintf(row->ts, sizeof row->ts, "%s", PQgetvalue(r, 0, 3));
        snprintf(row->study, sizeof row->study, "%s", PQgetvalue(r, 0, 4));
        snprintf(row->series, sizeof row->series, "%s", PQgetvalue(r, 0, 5));
        snprintf(row->modality, sizeof row->modality, "%s", PQgetvalue(r, 0, 6));
        snprintf(row->sop_class, sizeof row->sop_class, "%s", PQgetvalue(r, 0, 7));
        row->decided = PQgetvalue(r, 0, 8)[0] == 't';
    }
    PQclear(r);
    return 0;
}

/* True when value is an element of the PostgreSQL text[] literal list ("{}" = any). The lists
 * are made by compressor_policy() from plain comma-separated tokens, so a token match on the
 * quoted form is exact. */
static bool s_selected(const char *list, const char *value)
{
    if (!strcmp(list, "{}")) return true;
    char q[96];
    snprintf(q, sizeof q, "\"%s\"", value);
    return strstr(list, q) != NULL;
}

/* The compressed copy of an earlier version of the instance (an instance stored again after it
 * was compressed) is known only from its decision, which is about to be overwritten: register
 * it for removal first, in the same transaction (the removal itself checks that no index row
 * points to it). keep_path is the file the index points to now. */
static int s_retire_previous(compressor_t *c, const char *sop, const char *keep_path)
{
    char grace[24];
    snprintf(grace, sizeof grace, "%ld", c->cfg->compress_unlink_grace);
    const char *p[] = {sop, keep_path, grace};
    return kp_db_run(c->db,
                     "INSERT INTO storage_orphans (path, sop_uid, inode, not_before) SELECT "
                     "after_path, sop_uid, NULL, now() + $3::int * interval '1 second' FROM "
                     "compression WHERE sop_uid = $1 AND after_path IS NOT NULL AND after_path "
                     "<> $2 ON CONFLICT (path) DO NOTHING",
                     3, p);
}

/* Records a skip decision for the file of row and finishes the job, in one transaction. */
static int s_record_skip(compressor_t *c, int64_t job_id, const char *sop, const s_row_t *row,
                         const s_skip_t *why)
{
    char id[24], size[24];
    s_ctx(id, job_id);
    snprintf(size, sizeof size, "%lld", (long long)row->size);
    const char *p[] = {sop,  why->reason, why->detail, row->sha,
                       size, row->ts,     row->path,   job_id > 0 ? id : NULL};
    int rc = kp_db_begin(c->db);
    if (!rc) rc = s_retire_previous(c, sop, row->path);
    if (!rc)
        rc = kp_db_run(
            c->db,
            "INSERT INTO compression (sop_uid, outcome, reason, detail, before_sha256, "
            "before_size, before_syntax, before_path, job_id) VALUES ($1, 'skipped', $2, $3, $4, "
            "$5::bigint, $6, $7, $8::bigint) ON CONFLICT (sop_uid) DO UPDATE SET outcome = "
            "'skipped', reason = $2, detail = $3, before_sha256 = $4, before_size = $5::bigint, "
            "before_syntax = $6, before_path = $7, after_sha256 = NULL, after_size = NULL, "
            "after_syntax = NULL, after_path = NULL, job_id = $8::bigint, decided_at = now()",
            8, p);
    if (!rc) rc = s_job_done(c, job_id);
    if (!rc) rc = kp_db_commit(c->db);
    if (rc) {
        kp_db_rollback(c->db);
        return rc;
    }
    c->skipped++;
    char ctx[24];
    s_ctx(ctx, job_id);
    kp_logc(KP_LOG_INFO, "compress", ctx, "%s skipped (%s): %s", sop, why->reason, why->detail);
    return 0;
}

/* Step 2: reasons not to transcode this file at all; NULL reason when it may be tried. */
static int s_inspect(compressor_t *c, const char *abs, int64_t size, s_skip_t *skip)
{
    kp_compress_info_t info;
    int rc = kp_compress_inspect(abs, &info);
    skip->reason = NULL;
    if (rc == KP_EDICOM) {
        skip->reason = "unreadable";
        snprintf(skip->detail, sizeof skip->detail, "the stored file cannot be parsed as DICOM");
        return 0;
    }
    if (rc) return rc;
    if (info.float_pixels) {
        skip->reason = "float-pixel-data";
        snprintf(skip->detail, sizeof skip->detail,
                 "Float/Double Float Pixel Data has no lossless JPEG form");
    } else if (!info.has_pixels) {
        skip->reason = "no-pixel-data";
        snprintf(skip->detail, sizeof skip->detail, "no pixel data (%s)",
                 info.ts_name[0] ? info.ts_name : "unknown syntax");
    } else if (info.encapsulated) {
        skip->reason = "already-compressed";
        snprintf(skip->detail, sizeof skip->detail, "stored as %s%s", info.ts_name,
                 info.decodable ? "" : " (no decoder here)");
    } else if (info.bits_allocated != 8 && info.bits_allocated != 16) {
        skip->reason = "unsupported-bit-depth";
        snprintf(skip->detail, sizeof skip->detail,
                 "BitsAllocated %d (lossless JPEG and JPEG-LS take 8 or 16)", info.bits_allocated);
    } else if (size > c->cfg->compress_max_file_mb * 1048576L) {
        skip->reason = "too-large";
        snprintf(skip->detail, sizeof skip->detail, "%lld bytes, over compress.max_file_mb",
                 (long long)size);
    }
    return 0;
}

/* Writes buf to a new temp file of the storage (not yet fsync'd: kp_storage_commit does it).
 * *tmp: its malloc'd path. 0 or KP_EIO. */
static int s_write_tmp(compressor_t *c, const kp_buf_t *buf, char **tmp)
{
    int fd = kp_storage_tmpfile(c->st, tmp);
    if (fd < 0) return fd;
    size_t done = 0;
    while (done < buf->len) {
        ssize_t w = write(fd, buf->data + done, buf->len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            kp_error("compress", "write to %s failed: %s", *tmp, strerror(errno));
            close(fd);
            unlink(*tmp);
            free(*tmp);
            *tmp = NULL;
            return KP_EIO;
        }
        done += (size_t)w;
    }
    close(fd);
    return 0;
}

/* What the index row takes from the new file. */
typedef struct {
    char rel[KP_STORAGE_RELPATH_MAX], sha[65], size[24], ts[72], pix_off[24], pix_len[24];
    char *json;
} s_new_t;

static int s_describe(const char *tmp, const s_row_t *row, const char *sop, s_new_t *n)
{
    int64_t size = 0;
    if (kp_storage_sha256_file(tmp, n->sha, &size)) return KP_EIO;
    snprintf(n->size, sizeof n->size, "%lld", (long long)size);
    int err = 0;
    kp_dicom_file_t *f = kp_dicom_open(tmp, &err);
    if (!f) return err ? err : KP_EDICOM;
    snprintf(n->ts, sizeof n->ts, "%s", kp_dicom_transfer_syntax(f));
    int64_t off = 0, len = 0;
    if (kp_dicom_pixel_location(f, &off, &len) == 0) {
        snprintf(n->pix_off, sizeof n->pix_off, "%lld", (long long)off);
        snprintf(n->pix_len, sizeof n->pix_len, "%lld", (long long)len);
    }
    char prefix[512];
    snprintf(prefix, sizeof prefix, "/dicom-web/studies/%s/series/%s/instances/%s", row->study,
             row->series, sop);
    n->json = kp_dicom_json(f, prefix, KP_INDEX_BULK_THRESHOLD);
    kp_dicom_close(&f);
    return n->json ? 0 : KP_EDICOM;
}

/* Step 4: the lease on the new path (committed on its own, before the file exists). */
static int s_register_new(compressor_t *c, const char *rel, const char *sop)
{
    char lease[24];
    snprintf(lease, sizeof lease, "%d", COMPRESSOR_WRITE_LEASE_S);
    const char *p[] = {rel, sop, lease};
    return kp_db_run(c->db,
                     "INSERT INTO storage_orphans (path, sop_uid, inode, not_before) VALUES ($1, "
                     "$2, NULL, now() + $3::int * interval '1 second') ON CONFLICT (path) DO "
                     "UPDATE SET sop_uid = $2, inode = NULL, not_before = greatest("
                     "storage_orphans.not_before, EXCLUDED.not_before)",
                     3, p);
}

/* Step 5. Returns 0 (switched), 1 (the row changed meanwhile: someone else compressed it, or
 * a new copy was stored; nothing written), or a negative code. */
static int s_switch(compressor_t *c, int64_t job_id, const char *sop, const s_row_t *row,
                    const s_new_t *n, ino_t old_ino)
{
    char id[24], before[24], grace[24], ino[24];
    s_ctx(id, job_id);
    snprintf(before, sizeof before, "%lld", (long long)row->size);
    snprintf(grace, sizeof grace, "%ld", c->cfg->compress_unlink_grace);
    snprintf(ino, sizeof ino, "%llu", (unsigned long long)old_ino);
    PGresult *r = NULL;
    int rc = kp_db_begin(c->db);
    if (rc) return rc;
    const char *p1[] = {sop};
    rc = kp_db_exec(c->db, &r,
                    "SELECT file_sha256, path FROM instances WHERE sop_uid = $1 FOR UPDATE", 1, p1);
    if (rc) goto fail;
    if (PQntuples(r) != 1 || strcmp(PQgetvalue(r, 0, 0), row->sha) ||
        strcmp(PQgetvalue(r, 0, 1), row->path)) {
        rc = 1;
        goto fail;
    }
    PQclear(r);
    r = NULL;
    /* our lease on the new path must still be there: a cleanup that found it expired may have
     * removed the file (it takes the same row lock) */
    const char *p2[] = {n->rel};
    rc = kp_db_exec(c->db, &r, "DELETE FROM storage_orphans WHERE path = $1 RETURNING 1", 1, p2);
    if (rc) goto fail;
    if (PQntuples(r) != 1) {
        kp_warn("compress", "%s: the registration of %s vanished; compressing again", sop, n->rel);
        rc = KP_EAGAIN;
        goto fail;
    }
    PQclear(r);
    r = NULL;
    const char *p3[] = {sop,
                        n->rel,
                        n->size,
                        n->sha,
                        n->ts,
                        n->pix_off[0] ? n->pix_off : NULL,
                        n->pix_len[0] ? n->pix_len : NULL,
                        n->json};
    rc = kp_db_run(c->db,
                   "UPDATE instances SET path = $2, file_size = $3::bigint, file_sha256 = $4, "
                   "transfer_syntax_uid = $5, pixel_offset = $6::bigint, pixel_length = "
                   "$7::bigint, metadata = $8::jsonb, updated_at = now() WHERE sop_uid = $1",
                   8, p3);
    if (rc) goto fail;
    if ((rc = s_retire_previous(c, sop, n->rel))) goto fail;
    const char *p4[] = {sop,    row->sha, before, row->ts, row->path,
                        n->sha, n->size,  n->ts,  n->rel,  job_id > 0 ? id : NULL};
    rc = kp_db_run(
        c->db,
        "INSERT INTO compression (sop_uid, outcome, reason, detail, before_sha256, before_size, "
        "before_syntax, before_path, after_sha256, after_size, after_syntax, after_path, job_id) "
        "VALUES ($1, 'compressed', NULL, NULL, $2, $3::bigint, $4, $5, $6, $7::bigint, $8, $9, "
        "$10::bigint) ON CONFLICT (sop_uid) DO UPDATE SET outcome = 'compressed', reason = NULL, "
        "detail = NULL, before_sha256 = $2, before_size = $3::bigint, before_syntax = $4, "
        "before_path = $5, after_sha256 = $6, after_size = $7::bigint, after_syntax = $8, "
        "after_path = $9, job_id = $10::bigint, decided_at = now()",
        10, p4);
    if (rc) goto fail;
    const char *p5[] = {row->path, sop, ino, grace};
    rc = kp_db_run(c->db,
                   "INSERT INTO storage_orphans (path, sop_uid, inode, not_before) VALUES ($1, "
                   "$2, $3::bigint, now() + $4::int * interval '1 second') ON CONFLICT (path) DO "
                   "UPDATE SET sop_uid = $2, inode = $3::bigint, not_before = EXCLUDED.not_before",
                   4, p5);
    if (!rc) rc = s_job_done(c, job_id);
    if (!rc) rc = kp_db_commit(c->db);
    if (rc) goto fail;
    return 0;
fail:
    if (r) PQclear(r);
    kp_db_rollback(c->db);
    return rc;
}

static void s_publish(compressor_t *c, const char *study)
{
    if (!c->bus) return;
    kp_msg_t ev = {.v = 1};
    snprintf(ev.type, sizeof ev.type, "study.changed");
    ev.payload = json_pack("{s:s}", "study", study);
    kp_bus_publish(c->bus, &ev);
    kp_msg_clear(&ev);
}

static void s_tick(compressor_t *c)
{
    if (c->bus) kp_bus_heartbeat(c->bus);
}

int compressor_job(compressor_t *c, int64_t job_id, const char *sop)
{
    char ctx[24];
    s_ctx(ctx, job_id);
    s_row_t row = {0};
    bool found = false;
    kp_buf_t buf = {0};
    char *abs = NULL, *tmp = NULL;
    s_new_t n = {0};
    s_skip_t skip = {0};
    int rc = s_read_row(c, sop, &row, &found);
    if (rc) goto retry;
    if (!found || row.decided || !s_selected(c->modalities, row.modality) ||
        !s_selected(c->sop_classes, row.sop_class) || !s_selected(c->syntaxes, row.ts)) {
        kp_logc(KP_LOG_DEBUG, "compress", ctx, "%s: nothing to do (%s)", sop,
                !found        ? "no such instance"
                : row.decided ? "decided already"
                              : "not selected");
        rc = s_job_done(c, job_id);
        if (rc) goto retry;
        return 0;
    }
    abs = kp_storage_abspath(c->st, row.path);
    struct stat sb;
    bool missing = stat(abs, &sb) != 0;
    if (missing || (int64_t)sb.st_size != row.size) {
        kp_logc(KP_LOG_ERROR, "compress", ctx, "%s: stored file %s is %s", sop, row.path,
                missing ? "missing" : "not the size the index says");
        rc = KP_EIO;
        goto retry;
    }
    if ((rc = s_inspect(c, abs, row.size, &skip))) goto retry;
    if (skip.reason) goto skipped;
    /* The file at the instance's own path is the one a note will describe (step 4): it must
     * be the very file the index row describes. A path is only ever replaced by a rename, never
     * written in place, so the same inode before and after hashing means the same content. A
     * difference means a new copy was stored and its index job has not run yet: later. */
    char canon[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath(sop, canon);
    bool at_canon = !strcmp(row.path, canon);
    if (at_canon) {
        char sha[65];
        int64_t got = -1;
        struct stat sb2;
        if (kp_storage_sha256_file(abs, sha, &got) || stat(abs, &sb2) || sb2.st_ino != sb.st_ino ||
            got != row.size || strcmp(sha, row.sha)) {
            kp_logc(KP_LOG_INFO, "compress", ctx,
                    "%s: the stored file is not the one the index describes (yet); again later",
                    sop);
            rc = KP_EAGAIN;
            goto retry;
        }
    }
    s_tick(c);

    rc = kp_image_transcode(abs, c->target, &buf);
    s_tick(c);
    if (rc == KP_EUNSUPPORTED || rc == KP_EDICOM) {
        skip.reason = rc == KP_EDICOM ? "undecodable" : "encoder-refused";
        snprintf(skip.detail, sizeof skip.detail, "DCMTK cannot transcode this image to %s%s",
                 c->target, rc == KP_EDICOM ? " (pixel data unreadable)" : "");
        goto skipped;
    }
    if (rc) goto retry;
    if ((int64_t)buf.len >= row.size) {
        skip.reason = "not-smaller";
        snprintf(skip.detail, sizeof skip.detail, "%lld bytes compressed, %lld stored",
                 (long long)buf.len, (long long)row.size);
        goto skipped;
    }
    if ((rc = s_write_tmp(c, &buf, &tmp))) goto retry;
    kp_buf_free(&buf);
    char why[200];
    rc = kp_compress_verify(abs, tmp, why, sizeof why);
    s_tick(c);
    if (rc == KP_EMISMATCH || rc == KP_EUNSUPPORTED || rc == KP_EDICOM) {
        skip.reason = rc == KP_EMISMATCH ? "roundtrip-mismatch" : "roundtrip-failed";
        snprintf(skip.detail, sizeof skip.detail, "%s", why);
        goto skipped;
    }
    if (rc) goto retry;
    if ((rc = s_describe(tmp, &row, sop, &n))) {
        if (rc != KP_EDICOM) goto retry;
        skip.reason = "roundtrip-failed";
        snprintf(skip.detail, sizeof skip.detail, "the compressed copy cannot be indexed");
        goto skipped;
    }
    /* the copy keeps the arrival time: a reindex orders it as the original */
    struct timespec times[2] = {sb.st_atim, sb.st_mtim};
    utimensat(AT_FDCWD, tmp, times, 0);
    compressor_path(sop, c->target, n.rel);
    if ((rc = s_register_new(c, n.rel, sop))) goto retry;
    if ((rc = kp_storage_commit(c->st, tmp, n.rel, false))) goto retry;
    free(tmp);
    tmp = NULL;
    if (at_canon) {
        /* The original's note, durable before the switch: from the moment the index points to
         * the copy, the ingest must recognise the original without its file (kp_storage.h). A
         * crash before the switch leaves it next to the original it describes, which is still
         * the indexed file, so it stays true; a new copy stored since makes it stale, which the
         * ingest sees (and which this check keeps to a narrow race). */
        struct stat sb3;
        if (stat(abs, &sb3) || sb3.st_ino != sb.st_ino) {
            kp_logc(KP_LOG_INFO, "compress", ctx, "%s changed while being compressed; again later",
                    sop);
            rc = KP_EAGAIN;
            goto retry;
        }
        if ((rc = kp_storage_original_write(c->st, sop, row.size, row.sha))) goto retry;
    }
    rc = s_switch(c, job_id, sop, &row, &n, sb.st_ino);
    if (rc == 1) {
        /* The row moved on while we worked; its new state decides (the job runs again and
         * finds it decided, or compresses the new file). Our file stays registered. */
        kp_logc(KP_LOG_INFO, "compress", ctx, "%s changed while being compressed; again later",
                sop);
        rc = KP_EAGAIN;
        goto retry;
    }
    if (rc) goto retry;
    c->compressed++;
    c->bytes_before += row.size;
    c->bytes_after += atoll(n.size);
    kp_logc(KP_LOG_INFO, "compress", ctx, "%s compressed: %lld -> %s bytes (%s)", sop,
            (long long)row.size, n.size, n.ts);
    s_publish(c, row.study);
    if (c->cfg->compress_unlink_grace == 0) compressor_cleanup(c, row.path);
    free(n.json);
    free(abs);
    return 0;

skipped:
    if (tmp) unlink(tmp);
    free(tmp);
    kp_buf_free(&buf);
    free(n.json);
    free(abs);
    rc = s_record_skip(c, job_id, sop, &row, &skip);
    if (rc) {
        s_job_error(c, job_id, kp_strerror(rc));
        c->failed++;
    }
    return rc;
retry:
    if (tmp) unlink(tmp);
    free(tmp);
    kp_buf_free(&buf);
    free(n.json);
    free(abs);
    kp_logc(KP_LOG_WARN, "compress", ctx, "%s: not compressed now (%s); the job will be retried",
            sop, kp_strerror(rc));
    s_job_error(c, job_id, kp_strerror(rc));
    c->failed++;
    return rc;
}
