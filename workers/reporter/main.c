/* pacs-reporter: renders report versions to PDF and stores them into their study.
 *
 * A worker of the bus like pacs-indexer: READY for `report.pdf` jobs ({"pdf_id": N}, inserted
 * by the reports API together with a report_pdfs row in state 'pending'), one job at a time:
 *   1. BEGIN; lock the report_pdfs row (FOR UPDATE: a job delivered twice to two reporters is
 *      done once, the second sees 'done'); a row already done just marks the job done;
 *   2. read the version, its report and the study (index row + the path of one stored instance);
 *   3. render the PDF (lib/kp_pdf; the same input gives the same bytes) and store it durably at
 *      storage.root/reports/aa/bb/<sha256>.pdf (temp file, fsync, rename, directory fsync);
 *   4. build the Encapsulated PDF instance (lib/dicom/kp_encap) and store it through kp_ingest,
 *      the path of C-STORE and STOW-RS, so it is indexed like any received instance. Its SOP
 *      Instance UID is derived from the pdf row (study, id, creation time) and the series UID
 *      from the report, so a job redone after a crash between this step and the next makes
 *      the same instance again (kp_ingest sees an identical copy), never a second one;
 *   5. mark report_pdfs done (path, size, sha256, sop_uid) and the job done; COMMIT.
 * A permanent failure (the study is not in the archive, a version without text, the fonts are
 * missing) marks report_pdfs and the job failed with the reason; a transient one (database,
 * storage) records last_error and lets the outbox sweep retry, until jobs.max_attempts, when it
 * becomes permanent. A job's failure never stops the worker. */
#include "kp_worker.h"
#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_dicom.h"
#include "kp_encap.h"
#include "kp_errors.h"
#include "kp_ingest.h"
#include "kp_log.h"
#include "kp_msg.h"
#include "kp_pdf.h"
#include "kp_storage.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define S_JOB    "report.pdf"
#define S_SOURCE "REPORTER" /* recorded with the index job as the calling AE */

static volatile sig_atomic_t s_stop;

typedef struct {
    const kp_config_t *cfg;
    kp_db_t *db;
    kp_bus_t *bus;
    kp_storage_t *st;
    kp_ingest_t *ing;
} s_worker_t;

/* A job's outcome: 0 done; otherwise an error code with a reason, permanent or not. */
typedef struct {
    int rc;
    bool permanent;
    char reason[256];
} s_outcome_t;

static void s_fail(s_outcome_t *o, int rc, bool permanent, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void s_fail(s_outcome_t *o, int rc, bool permanent, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->reason, sizeof o->reason, fmt, ap);
    va_end(ap);
    o->rc = rc;
    o->permanent = permanent;
}

/* A column, or NULL when SQL NULL. */
static const char *s_col(PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

static void s_sha256_hex(const void *buf, size_t len, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(buf, len, md, &n, EVP_sha256(), NULL);
    for (unsigned i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

static int s_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return KP_EIO;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Creates root/rel's directory chain (rel = "reports/aa/bb/<file>"), fsyncing the parent of
 * each directory it makes. 0 or KP_EIO. */
static int s_make_dirs(s_worker_t *w, const char *rel)
{
    char path[PATH_MAX];
    const char *root = kp_storage_root(w->st);
    for (const char *slash = strchr(rel, '/'); slash; slash = strchr(slash + 1, '/')) {
        snprintf(path, sizeof path, "%s/%.*s", root, (int)(slash - rel), rel);
        if (mkdir(path, 0750) == 0) {
            char *cut = strrchr(path, '/');
            *cut = 0;
            if (kp_storage_fsync_path(w->st, path)) return KP_EIO;
        } else if (errno != EEXIST) {
            kp_error("report", "cannot create %s: %s", path, strerror(errno));
            return KP_EIO;
        }
    }
    return 0;
}

/* Stores the PDF durably at reports/aa/bb/<sha256>.pdf (content-addressed: an identical file
 * already there is kept). rel receives the relative path. 0 or KP_EIO. */
static int s_store_pdf(s_worker_t *w, const unsigned char *pdf, size_t len, const char *sha,
                       char rel[128])
{
    snprintf(rel, 128, "reports/%.2s/%.2s/%s.pdf", sha, sha + 2, sha);
    char *dst = kp_storage_abspath(w->st, rel);
    char have[65];
    int64_t size = 0;
    int rc = 0;
    if (kp_storage_sha256_file(dst, have, &size) == 0 && (size_t)size == len && !strcmp(have, sha))
        goto out; /* stored before (a redone job, or the same PDF for another request) */
    char *tmp = NULL;
    int fd = kp_storage_tmpfile(w->st, &tmp);
    if (fd < 0) {
        rc = KP_EIO;
        goto out;
    }
    rc = s_write_all(fd, pdf, len);
    if (!rc && w->cfg->storage_fsync && fsync(fd)) rc = KP_EIO;
    close(fd);
    if (!rc) rc = s_make_dirs(w, rel);
    if (!rc && rename(tmp, dst)) {
        kp_error("report", "cannot rename %s to %s: %s", tmp, dst, strerror(errno));
        rc = KP_EIO;
    }
    if (!rc) {
        char *dir = strdup(dst);
        if (!dir) abort();
        *strrchr(dir, '/') = 0;
        rc = kp_storage_fsync_path(w->st, dir);
        free(dir);
    }
    if (rc) unlink(tmp);
    free(tmp);
out:
    free(dst);
    return rc;
}

/* Local date (DA) and time (TM) of a Unix time. */
static void s_da_tm(int64_t t, char da[16], char tm[16])
{
    time_t tt = (time_t)t;
    struct tm lt;
    localtime_r(&tt, &lt);
    strftime(da, 16, "%Y%m%d", &lt);
    strftime(tm, 16, "%H%M%S", &lt);
}

/* Builds the instance and stores it through kp_ingest. */
static int s_store_instance(s_worker_t *w, const kp_encap_pdf_t *in, const char *ctx,
                            s_outcome_t *o)
{
    kp_buf_t dcm = {0};
    int rc = kp_encap_pdf_build(in, &dcm);
    if (rc) {
        s_fail(o, rc, rc != KP_ENOMEM, "cannot build the encapsulated PDF: %s", kp_strerror(rc));
        return rc;
    }
    char *tmp = NULL;
    int fd = kp_storage_tmpfile(w->st, &tmp);
    if (fd < 0) {
        kp_buf_free(&dcm);
        s_fail(o, KP_EIO, false, "cannot create a temporary file");
        return KP_EIO;
    }
    rc = s_write_all(fd, dcm.data, dcm.len);
    close(fd);
    kp_buf_free(&dcm);
    if (rc) {
        unlink(tmp);
        free(tmp);
        s_fail(o, rc, false, "cannot write the encapsulated PDF");
        return rc;
    }
    kp_ingest_req_t req = {.tmp_path = tmp,
                           .expected_sop = in->sop_uid,
                           .expected_study = in->study_uid,
                           .source = S_SOURCE};
    kp_ingest_result_t res;
    rc = kp_ingest_store(w->ing, &req, &res); /* consumes tmp */
    free(tmp);
    if (rc == KP_EDUPLICATE) {
        /* storage.duplicate_policy reject and an earlier attempt stored this instance (its UID
         * belongs to this pdf row alone) with other bytes: that one stays */
        kp_logc(KP_LOG_WARN, "report", ctx, "instance %s was stored by an earlier attempt; kept",
                in->sop_uid);
        return 0;
    }
    if (rc) {
        s_fail(o, rc, rc == KP_EINVAL || rc == KP_EDICOM || rc == KP_EMISMATCH,
               "storing the encapsulated PDF failed: %s",
               res.reason ? res.reason : kp_strerror(rc));
        return rc;
    }
    kp_logc(KP_LOG_INFO, "report", ctx, "encapsulated PDF %s stored in study %s%s", in->sop_uid,
            in->study_uid, res.identical ? " (identical copy was there)" : "");
    return 0;
}

/* Marks job jidb done without rendering (its PDF row is gone, or rendered already). */
static void s_job_done(s_worker_t *w, const char *jidb, s_outcome_t *o)
{
    const char *p[] = {jidb};
    int rc =
        kp_db_run(w->db, "UPDATE jobs SET state = 'done', updated_at = now() WHERE id = $1", 1, p);
    if (rc) s_fail(o, rc, false, "database error");
}

/* The members that kp_pdf_report_t and kp_encap_pdf_t both have, from row 0 of the study query
 * of s_render (columns 0 to 9, without 7: study_id). */
#define S_STUDY_FIELDS(r)                                                                          \
    .patient_name = s_col(r, 0, 0), .patient_id = s_col(r, 0, 1), .birth_date = s_col(r, 0, 2),    \
    .sex = s_col(r, 0, 3), .study_date = s_col(r, 0, 4), .study_time = s_col(r, 0, 5),             \
    .accession = s_col(r, 0, 6), .study_description = s_col(r, 0, 8),                              \
    .referring_physician = s_col(r, 0, 9)

/* Does the job inside the open transaction (see the top). On success the report_pdfs and jobs
 * rows are updated but not committed. */
static void s_render(s_worker_t *w, int64_t job_id, int64_t pdf_id, const char *ctx, s_outcome_t *o)
{
    PGresult *p = NULL, *s = NULL;
    json_t *sections = NULL;
    unsigned char *pdf = NULL;
    size_t pdf_len = 0;
    char idb[24], jidb[24];
    snprintf(idb, sizeof idb, "%lld", (long long)pdf_id);
    snprintf(jidb, sizeof jidb, "%lld", (long long)job_id);
    const char *p1[] = {idb};
    int rc = kp_db_exec(
        w->db, &p,
        "SELECT p.state, v.version, v.status, v.sections::text, v.language, "
        "coalesce(nullif(v.author_name, ''), v.author), "
        "coalesce(nullif(v.signed_name, ''), v.signed_by), "
        "extract(epoch FROM v.signed_at)::bigint, "
        "(SELECT o.version FROM report_versions o WHERE o.id = v.supersedes), r.id, r.study_uid, "
        "extract(epoch FROM p.created_at)::text, extract(epoch FROM r.created_at)::text, "
        "extract(epoch FROM p.created_at)::bigint "
        "FROM report_pdfs p JOIN report_versions v ON v.id = p.version_id "
        "JOIN reports r ON r.id = v.report_id WHERE p.id = $1::bigint FOR UPDATE OF p",
        1, p1);
    if (rc) {
        s_fail(o, rc, false, "database error reading the report");
        goto out;
    }
    if (PQntuples(p) == 0) { /* deleted with its report: nothing to do */
        kp_logc(KP_LOG_WARN, "report", ctx, "report_pdfs row %s no longer exists; job done", idb);
        s_job_done(w, jidb, o);
        goto out;
    }
    if (!strcmp(PQgetvalue(p, 0, 0), "done")) { /* delivered again after success */
        kp_logc(KP_LOG_INFO, "report", ctx, "PDF %s is rendered already; job done", idb);
        s_job_done(w, jidb, o);
        goto out;
    }
    int version = atoi(PQgetvalue(p, 0, 1));
    const char *vstatus = PQgetvalue(p, 0, 2), *language = PQgetvalue(p, 0, 4);
    const char *signed_name = s_col(p, 0, 6), *signed_at = s_col(p, 0, 7);
    const char *amends = s_col(p, 0, 8), *report_id = PQgetvalue(p, 0, 9);
    const char *study_uid = PQgetvalue(p, 0, 10);
    sections = json_loads(PQgetvalue(p, 0, 3), 0, NULL);
    if (!json_is_object(sections)) {
        s_fail(o, KP_EINVAL, true, "the version's sections are not a JSON object");
        goto out;
    }

    const char *p2[] = {study_uid};
    rc = kp_db_exec(
        w->db, &s,
        "SELECT s.patient_name, s.patient_id, s.patient_birth_date, s.patient_sex, s.study_date, "
        "s.study_time, s.accession_number, s.study_id, s.study_description, "
        "s.referring_physician, array_to_string(ARRAY(SELECT m FROM unnest(s.modalities) m "
        "WHERE m <> 'DOC'), ', '), "
        "(SELECT i.path FROM series se JOIN instances i ON i.series_pk = se.pk WHERE "
        "se.study_pk = s.pk ORDER BY coalesce(se.modality, '') = 'DOC', i.pk LIMIT 1), "
        "coalesce((SELECT max(series_number) FROM series WHERE study_pk = s.pk), 0) "
        "FROM studies s WHERE s.study_uid = $1",
        1, p2);
    if (rc) {
        s_fail(o, rc, false, "database error reading the study");
        goto out;
    }
    if (PQntuples(s) == 0) {
        s_fail(o, KP_ENOTFOUND, true, "study %s is not in the archive", study_uid);
        goto out;
    }

    /* names of the instance: stable for this pdf row and this report (see the top); creation
     * times as epoch text, which no session setting (time zone, DateStyle) changes */
    char sop_uid[65], series_uid[65], name[512];
    snprintf(name, sizeof name, "klinika report pdf|%s|%s|%s", study_uid, idb,
             PQgetvalue(p, 0, 11));
    kp_encap_uid_from_name(name, sop_uid);
    snprintf(name, sizeof name, "klinika report series|%s|%s|%s", study_uid, report_id,
             PQgetvalue(p, 0, 12));
    kp_encap_uid_from_name(name, series_uid);
    int series_number = 0;
    {
        const char *p3[] = {series_uid};
        PGresult *sn = NULL;
        if (kp_db_exec(w->db, &sn, "SELECT series_number FROM series WHERE series_uid = $1", 1,
                       p3) == 0) {
            if (PQntuples(sn) && !PQgetisnull(sn, 0, 0)) series_number = atoi(PQgetvalue(sn, 0, 0));
            PQclear(sn);
        }
        if (series_number <= 0) series_number = atoi(PQgetvalue(s, 0, 12)) + 1;
    }

    kp_pdf_report_t r = {
        .language = language,
        .font_dir = w->cfg->report_font_dir,
        .clinic_name = w->cfg->report_clinic_name,
        .clinic_address = w->cfg->report_clinic_address,
        .logo_path = w->cfg->report_logo,
        S_STUDY_FIELDS(s),
        .modalities = s_col(s, 0, 10),
        .version = version,
        .amends_version = amends ? atoi(amends) : 0,
        .superseded = !strcmp(vstatus, "amended"),
        .author_name = PQgetvalue(p, 0, 5),
        .signed_name = !signed_at                    ? NULL
                       : signed_name && *signed_name ? signed_name
                                                     : "?",
        .signed_at = signed_at ? atoll(signed_at) : 0,
    };
    bool any = false;
    for (int i = 0; i < KP_PDF_NSECTIONS; i++) {
        json_t *v = json_object_get(sections, kp_pdf_section_key(i));
        r.sections[i] = json_is_string(v) ? json_string_value(v) : NULL;
        any = any || (r.sections[i] && *r.sections[i]);
    }
    if (!any) {
        s_fail(o, KP_EINVAL, true, "the report version has no text");
        goto out;
    }
    int pages = 0;
    rc = kp_pdf_render(&r, &pdf, &pdf_len, &pages);
    if (rc) {
        s_fail(o, rc, true, "rendering failed: %s%s", kp_strerror(rc),
               rc == KP_EIO ? " (fonts missing? see report.font_dir)" : "");
        goto out;
    }
    kp_bus_heartbeat(w->bus);
    char sha[65], rel[128];
    s_sha256_hex(pdf, pdf_len, sha);
    rc = s_store_pdf(w, pdf, pdf_len, sha, rel);
    if (rc) {
        s_fail(o, rc, false, "cannot store the PDF file");
        goto out;
    }

    /* the instance: dated when signed, else when the PDF was asked for */
    char da[16], tm[16], title[256];
    s_da_tm(signed_at ? atoll(signed_at) : atoll(PQgetvalue(p, 0, 13)), da, tm);
    kp_pdf_document_title(language, version, title, sizeof title);
    char series_desc[256];
    kp_pdf_document_title(language, 0, series_desc, sizeof series_desc);
    char *source = NULL;
    const char *src_rel = s_col(s, 0, 11);
    if (src_rel) source = kp_storage_abspath(w->st, src_rel);
    kp_encap_pdf_t in = {
        .pdf = pdf,
        .pdf_len = pdf_len,
        .source_path = source,
        .study_uid = study_uid,
        S_STUDY_FIELDS(s),
        .study_id = s_col(s, 0, 7),
        .series_uid = series_uid,
        .sop_uid = sop_uid,
        .series_number = series_number,
        .instance_number = version,
        .series_description = series_desc,
        .document_title = title,
        .content_date = da,
        .content_time = tm,
        .manufacturer = "Klinika PACS",
    };
    kp_bus_heartbeat(w->bus);
    rc = s_store_instance(w, &in, ctx, o);
    free(source);
    kp_bus_heartbeat(w->bus);
    if (rc) goto out;

    char size[24];
    snprintf(size, sizeof size, "%zu", pdf_len);
    const char *p4[] = {idb, rel, size, sha, sop_uid, jidb};
    rc = kp_db_run(w->db,
                   "WITH p AS (UPDATE report_pdfs SET state = 'done', error = NULL, path = $2, "
                   "size = $3::bigint, sha256 = $4, sop_uid = $5, updated_at = now() WHERE id = "
                   "$1::bigint) UPDATE jobs SET state = 'done', last_error = NULL, updated_at = "
                   "now() WHERE id = $6::bigint",
                   6, p4);
    if (rc) {
        s_fail(o, rc, false, "database error recording the PDF");
        goto out;
    }
    kp_logc(KP_LOG_INFO, "report", ctx, "PDF %s: %d page(s), %zu bytes, %s", idb, pages, pdf_len,
            rel);
out:
    free(pdf);
    json_decref(sections);
    if (p) PQclear(p);
    if (s) PQclear(s);
}

/* Records a failure outside the job's transaction: always last_error; when permanent also
 * report_pdfs failed and the job failed. Best effort (the database may be what failed). */
static void s_record_failure(s_worker_t *w, int64_t job_id, int64_t pdf_id, const s_outcome_t *o)
{
    char jidb[24], idb[24];
    snprintf(jidb, sizeof jidb, "%lld", (long long)job_id);
    snprintf(idb, sizeof idb, "%lld", (long long)pdf_id);
    if (o->permanent) {
        const char *p[] = {jidb, idb, o->reason};
        kp_db_run(w->db,
                  "WITH p AS (UPDATE report_pdfs SET state = 'failed', error = $3, updated_at = "
                  "now() WHERE id = $2::bigint AND state <> 'done') UPDATE jobs SET state = "
                  "'failed', last_error = $3, updated_at = now() WHERE id = $1::bigint",
                  3, p);
    } else {
        const char *p[] = {jidb, o->reason};
        kp_db_run(w->db,
                  "UPDATE jobs SET last_error = $2, updated_at = now() WHERE id = $1::bigint", 2,
                  p);
    }
}

/* One job, start to end; returns whether it succeeded (for DONE). */
static bool s_job(s_worker_t *w, const kp_msg_t *m)
{
    char ctx[72];
    const char *rid = json_string_value(json_object_get(m->payload, "rid"));
    if (rid) /* the gateway's request id (X-Request-Id), as the indexer logs it */
        snprintf(ctx, sizeof ctx, "%lld rid=%.40s", (long long)m->id, rid);
    else
        snprintf(ctx, sizeof ctx, "%lld", (long long)m->id);
    json_t *id = json_object_get(m->payload, "pdf_id");
    s_outcome_t o = {0};
    int64_t pdf_id = json_is_integer(id) ? (int64_t)json_integer_value(id) : 0;
    if (strcmp(m->type, S_JOB) || m->id <= 0 || pdf_id <= 0) {
        kp_logc(KP_LOG_ERROR, "job", ctx, "malformed %s job (pdf_id missing); marked failed",
                m->type);
        s_fail(&o, KP_EMSG, true, "malformed report.pdf job (pdf_id missing)");
        if (m->id > 0) s_record_failure(w, m->id, 0, &o);
        return false;
    }
    int rc = kp_db_begin(w->db);
    if (rc) {
        s_fail(&o, rc, false, "database unavailable");
    } else {
        s_render(w, m->id, pdf_id, ctx, &o);
        if (o.rc)
            kp_db_rollback(w->db);
        else if ((rc = kp_db_commit(w->db)))
            s_fail(&o, rc, false, "database error on commit");
    }
    if (!o.rc) return true;
    /* the last attempt the sweep would make: give up now, with the reason */
    if (!o.permanent && m->attempt + 1 >= w->cfg->jobs_max_attempts) o.permanent = true;
    kp_logc(o.permanent ? KP_LOG_ERROR : KP_LOG_WARN, "report", ctx, "PDF %lld %s: %s",
            (long long)pdf_id, o.permanent ? "failed" : "not rendered now (will be retried)",
            o.reason);
    s_record_failure(w, m->id, pdf_id, &o);
    if (!o.permanent && kp_db_ensure(w->db)) usleep(500 * 1000); /* database down: no spin */
    return false;
}

static int s_by_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* `pacs-reporter --bench-render N`: renders a typical report (five sections, two pages, in
 * Russian, with the configured letterhead) N times and prints the median and 90th percentile
 * time of kp_pdf_render(), for the benchmark of issue 7. No database or bus is used. */
static int s_bench(const kp_config_t *cfg, int n)
{
    static const char *const para =
        "Лёгкие расправлены, без очаговых и инфильтративных изменений. Трахея и главные бронхи "
        "проходимы. Средостение не смещено, **лимфатические узлы не увеличены**. Сердце обычной "
        "формы; *перикард* без выпота. Плевральные полости свободны.";
    char findings[8192] = "";
    for (int i = 0; i < 12; i++) {
        size_t l = strlen(findings);
        snprintf(findings + l, sizeof findings - l, "%s%s", i ? "\n\n" : "", para);
    }
    kp_pdf_report_t r = {
        .language = "ru",
        .font_dir = cfg->report_font_dir,
        .clinic_name = cfg->report_clinic_name[0] ? cfg->report_clinic_name : "Клиника",
        .clinic_address = cfg->report_clinic_address,
        .logo_path = cfg->report_logo,
        .patient_name = "Иванов^Иван^Петрович",
        .patient_id = "P-000123",
        .birth_date = "19700102",
        .sex = "M",
        .study_date = "20261127",
        .study_time = "101500",
        .accession = "A-2026-0001",
        .study_description = "КТ органов грудной клетки",
        .modalities = "CT",
        .referring_physician = "Петров^Пётр",
        .version = 1,
        .signed_name = "Др. Анна Щукина",
        .signed_at = 1795000000,
    };
    r.sections[KP_PDF_CLINICAL] = "Кашель в течение трёх недель.";
    r.sections[KP_PDF_TECHNIQUE] = "МСКТ, толщина среза 1 мм, без контрастного усиления.";
    r.sections[KP_PDF_FINDINGS] = findings;
    r.sections[KP_PDF_IMPRESSION] = "Патологических изменений не выявлено.";
    r.sections[KP_PDF_RECOMMENDATIONS] = "- контроль через 12 месяцев\n- консультация терапевта";
    double *ms = calloc((size_t)n, sizeof *ms);
    if (!ms) abort();
    int pages = 0;
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        struct timespec a, b;
        unsigned char *pdf = NULL;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int rc = kp_pdf_render(&r, &pdf, &len, &pages);
        clock_gettime(CLOCK_MONOTONIC, &b);
        free(pdf);
        if (rc) {
            fprintf(stderr, "pacs-reporter: render failed: %s\n", kp_strerror(rc));
            free(ms);
            return 1;
        }
        ms[i] = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    }
    qsort(ms, (size_t)n, sizeof *ms, s_by_double);
    printf("pdf render: median %.1f ms, p90 %.1f ms over %d renders (%d pages, %zu bytes)\n",
           ms[n / 2], ms[(n * 9) / 10 < n ? (n * 9) / 10 : n - 1], n, pages, len);
    free(ms);
    return 0;
}

int main(int argc, char **argv)
{
    int rc = 1;
    int rest[argc + 1];
    memset(rest, 0, sizeof rest);
    kp_config_t *cfg = kp_worker_start(argc, argv, "pacs-reporter", &s_stop, rest, &rc);
    if (!cfg) return rc;
    rc = 1;
    for (int i = 1; i < argc; i++) {
        if (!rest[i]) continue;
        if (!strcmp(argv[i], "--bench-render") && i + 1 < argc && atoi(argv[i + 1]) > 0) {
            if (cfg->report_timezone[0]) setenv("TZ", cfg->report_timezone, 1);
            rc = s_bench(cfg, atoi(argv[i + 1]));
            kp_config_destroy(&cfg);
            return rc;
        }
        fprintf(stderr, "pacs-reporter: unknown argument %s (try --help; --bench-render N)\n",
                argv[i]);
        kp_config_destroy(&cfg);
        return 1;
    }
    if (cfg->report_timezone[0]) setenv("TZ", cfg->report_timezone, 1);
    tzset();

    s_worker_t w = {.cfg = cfg};
    if (kp_dicom_init()) goto done;
    w.st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!w.st) goto done;
    int err = 0;
    w.db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!w.db) goto done;
    w.ing = kp_ingest_new(cfg, w.st, "reporter");
    if (!w.ing) goto done;
    w.bus = kp_bus_new(cfg, "reporter");
    if (!w.bus) goto done;
    char font[PATH_MAX];
    snprintf(font, sizeof font, "%s/DejaVuSans.ttf", cfg->report_font_dir);
    if (access(font, R_OK))
        kp_warn("main",
                "%s is missing: reports cannot be rendered until report.font_dir is "
                "fixed (Debian: apt-get install fonts-dejavu-core)",
                font);
    const char *types[] = {S_JOB};
    if (kp_bus_worker_ready(w.bus, types, 1, (int)cfg->report_credit)) goto done;
    kp_info("main", "rendering report PDFs (credit %ld, fonts %s)", cfg->report_credit,
            cfg->report_font_dir);

    long done_ok = 0, failed = 0;
    while (!s_stop) {
        kp_msg_t m = {0};
        int r = kp_bus_next_job(w.bus, &m, 500);
        if (r == KP_ETIMEOUT) continue;
        if (r) {
            kp_warn("bus", "receive failed: %s", kp_strerror(r));
            usleep(100 * 1000);
            continue;
        }
        bool ok = s_job(&w, &m);
        if (ok)
            done_ok++;
        else
            failed++;
        kp_bus_job_done(w.bus, m.id, ok);
        kp_msg_clear(&m);
    }
    kp_info("main", "stopping after %ld PDFs rendered, %ld jobs failed", done_ok, failed);
    rc = 0;
done:
    kp_bus_destroy(&w.bus);
    kp_ingest_destroy(&w.ing);
    kp_db_destroy(&w.db);
    kp_storage_destroy(&w.st);
    kp_dicom_shutdown();
    kp_config_destroy(&cfg);
    return rc;
}
