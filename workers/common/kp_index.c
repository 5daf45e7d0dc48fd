/* kp_index: index writer shared by pacs-indexer and pacsctl reindex (see kp_index.h). */
#include "kp_index.h"

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"

#include <errno.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum {
    T_SPECIFIC_CHARSET = 0x00080005,
    T_SOP_CLASS = 0x00080016,
    T_SOP_INSTANCE = 0x00080018,
    T_STUDY_DATE = 0x00080020,
    T_SERIES_DATE = 0x00080021,
    T_CONTENT_DATE = 0x00080023,
    T_STUDY_TIME = 0x00080030,
    T_SERIES_TIME = 0x00080031,
    T_CONTENT_TIME = 0x00080033,
    T_ACCESSION = 0x00080050,
    T_MODALITY = 0x00080060,
    T_INSTITUTION = 0x00080080,
    T_REFERRING = 0x00080090,
    T_TZ_OFFSET = 0x00080201,
    T_STATION = 0x00081010,
    T_STUDY_DESC = 0x00081030,
    T_SERIES_DESC = 0x0008103E,
    T_PATIENT_NAME = 0x00100010,
    T_PATIENT_ID = 0x00100020,
    T_ISSUER = 0x00100021,
    T_BIRTH_DATE = 0x00100030,
    T_SEX = 0x00100040,
    T_BODY_PART = 0x00180015,
    T_STUDY_UID = 0x0020000D,
    T_SERIES_UID = 0x0020000E,
    T_STUDY_ID = 0x00200010,
    T_SERIES_NUMBER = 0x00200011,
    T_INSTANCE_NUMBER = 0x00200013,
    T_FRAMES = 0x00280008,
    T_ROWS = 0x00280010,
    T_COLUMNS = 0x00280011,
    T_BITS_ALLOCATED = 0x00280100,
    T_SPS_ID = 0x00400009,
    T_PPS_START_DATE = 0x00400244,
    T_PPS_START_TIME = 0x00400245,
    T_REQUEST_ATTRS = 0x00400275,
    T_RP_ID = 0x00401001,
};

/* One parsed item, ready to write. Strings are borrowed from the open file. */
typedef struct {
    kp_index_item_t *item;
    kp_dicom_file_t *f;
    const char *patient_id, *issuer, *study_uid, *series_uid, *sop_uid;
    char sha[65];
    int64_t size;
    char *json;
    char pix_off[24], pix_len[24];
    char attrs_from[128]; /* "<mtime ns>|<SOP UID>": newest received instance wins */
    char received_at[40]; /* the file's mtime as an SQL timestamp */
    char patient_pk[24], study_pk[24], series_pk[24]; /* rows it belongs to, once written */
} s_parsed_t;

static const char *s_or_empty(const char *s)
{
    return s ? s : "";
}

/* Text of a valid integer for an integer column, or NULL (bad values never fail the instance). */
static const char *s_int(kp_dicom_file_t *f, uint32_t tag, char buf[16])
{
    const char *v = kp_dicom_get(f, tag);
    if (!v) return NULL;
    while (*v == ' ')
        v++;
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    while (*end == ' ')
        end++;
    if (errno || end == v || (*end && *end != '\\') || n < -2147483647L || n > 2147483647L)
        return NULL;
    snprintf(buf, 16, "%ld", n);
    return buf;
}

static const char *s_nonempty(const char *v)
{
    return v && *v ? v : NULL;
}

static int s_parse(kp_storage_t *st, s_parsed_t *p)
{
    kp_index_item_t *it = p->item;
    if (!kp_storage_relpath_valid(it->rel)) {
        kp_error("index", "refusing a storage path of unexpected shape: %s", it->rel);
        return KP_EINVAL;
    }
    char *abs = kp_storage_abspath(st, it->rel);
    int err = 0;
    int rc = 0;
    if (it->sha256 && it->size >= 0) {
        snprintf(p->sha, sizeof p->sha, "%s", it->sha256);
        p->size = it->size;
    } else if ((rc = kp_storage_sha256_file(abs, p->sha, &p->size))) {
        kp_error("index", "cannot read %s", abs);
        free(abs);
        return KP_EIO;
    }
    struct stat sb;
    if (stat(abs, &sb)) {
        kp_error("index", "cannot stat %s", abs);
        free(abs);
        return KP_EIO;
    }
    p->f = kp_dicom_open(abs, &err);
    free(abs);
    if (!p->f) return err ? err : KP_EDICOM;
    p->study_uid = s_nonempty(kp_dicom_get(p->f, T_STUDY_UID));
    p->series_uid = s_nonempty(kp_dicom_get(p->f, T_SERIES_UID));
    p->sop_uid = s_nonempty(kp_dicom_get(p->f, T_SOP_INSTANCE));
    if (!p->study_uid || !p->series_uid || !p->sop_uid) {
        kp_error("index", "%s lacks Study, Series or SOP Instance UID", it->rel);
        return KP_EDICOM;
    }
    char expect[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath(p->sop_uid, expect);
    if (strcmp(expect, it->rel))
        kp_warn("index", "%s holds SOP Instance UID %s which does not match its path", it->rel,
                p->sop_uid);
    snprintf(p->attrs_from, sizeof p->attrs_from, "%020lld.%09ld|%s", (long long)sb.st_mtim.tv_sec,
             (long)sb.st_mtim.tv_nsec, p->sop_uid);
    snprintf(p->received_at, sizeof p->received_at, "%lld.%06ld", (long long)sb.st_mtim.tv_sec,
             (long)(sb.st_mtim.tv_nsec / 1000));
    p->patient_id = s_or_empty(kp_dicom_get(p->f, T_PATIENT_ID));
    p->issuer = s_or_empty(kp_dicom_get(p->f, T_ISSUER));
    char prefix[512];
    snprintf(prefix, sizeof prefix, "/dicom-web/studies/%s/series/%s/instances/%s", p->study_uid,
             p->series_uid, p->sop_uid);
    p->json = kp_dicom_json(p->f, prefix, KP_INDEX_BULK_THRESHOLD);
    if (!p->json) {
        kp_error("index", "%s: cannot produce DICOM JSON", it->rel);
        return KP_EDICOM;
    }
    int64_t off, len;
    if (kp_dicom_pixel_location(p->f, &off, &len) == 0) {
        snprintf(p->pix_off, sizeof p->pix_off, "%lld", (long long)off);
        snprintf(p->pix_len, sizeof p->pix_len, "%lld", (long long)len);
    }
    return 0;
}

static int s_cmp(const void *a, const void *b)
{
    const s_parsed_t *x = a, *y = b;
    if (!x->f || !y->f) return (x->f == NULL) - (y->f == NULL);
    int c = strcmp(x->patient_id, y->patient_id);
    if (!c) c = strcmp(x->issuer, y->issuer);
    if (!c) c = strcmp(x->study_uid, y->study_uid);
    if (!c) c = strcmp(x->series_uid, y->series_uid);
    if (!c) c = strcmp(x->sop_uid, y->sop_uid);
    return c;
}

/* Runs an upsert returning (pk, previous parent pk); adds the previous parent to moved when the
 * row now hangs under another parent. */
typedef struct s_set s_set_t;
static void s_set_add(s_set_t *s, const char *pk);

static int s_upsert_child(kp_db_t *db, const char *sql, int n, const char *const *params,
                          const char *parent_pk, char out[24], s_set_t *moved)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r, sql, n, params);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return KP_EDB;
    }
    snprintf(out, 24, "%s", PQgetvalue(r, 0, 0));
    if (!PQgetisnull(r, 0, 1) && strcmp(PQgetvalue(r, 0, 1), parent_pk))
        s_set_add(moved, PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

static int s_returning_pk(kp_db_t *db, const char *sql, int n, const char *const *params,
                          char out[24])
{
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r, sql, n, params);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return KP_EDB;
    }
    snprintf(out, 24, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* Touched rows whose aggregates are recomputed at the end of the transaction. */
struct s_set {
    char (*pk)[24];
    size_t n, cap;
};

static void s_set_add(s_set_t *s, const char *pk)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->pk[i], pk)) return;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->pk = realloc(s->pk, s->cap * sizeof *s->pk);
        if (!s->pk) abort();
    }
    snprintf(s->pk[s->n++], 24, "%s", pk);
}

/* "col = the newer of the two": conflicting attributes resolve to the most recently received
 * instance's (see attrs_from in schema/0001_initial.sql). */
#define NEWER(t, c)                                                                                \
    c " = CASE WHEN EXCLUDED.attrs_from >= " t ".attrs_from THEN EXCLUDED." c " ELSE " t "." c     \
      " END"
#define NEWEST(t) "attrs_from = greatest(EXCLUDED.attrs_from, " t ".attrs_from), updated_at = now()"

static int s_upsert_patient(kp_db_t *db, s_parsed_t *p, char patient_pk[24])
{
    kp_dicom_file_t *f = p->f;
    const char *pat[] = {p->patient_id,
                         p->issuer,
                         kp_dicom_get(f, T_PATIENT_NAME),
                         kp_dicom_get(f, T_BIRTH_DATE),
                         kp_dicom_get(f, T_SEX),
                         p->attrs_from};
    return s_returning_pk(
        db,
        "INSERT INTO patients (patient_id, issuer, patient_name, birth_date, sex, "
        "attrs_from) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (patient_id, "
        "issuer) DO UPDATE SET " NEWER("patients", "patient_name") ", " NEWER(
            "patients", "birth_date") ", " NEWER("patients",
                                                 "sex") ", " NEWEST("patients") " RETURNING pk",
        6, pat, patient_pk);
}

/* ---- site rules ---------------------------------------------------------------------------- */
#define S_MAX_SITE_RULES 64
static struct {
    int kind; /* 1 calling_ae, 2 institution */
    char value[128];
    char site[64];
} s_site_rules[S_MAX_SITE_RULES];
static int s_nsite_rules;

void kp_index_set_site_map(const char *map)
{
    s_nsite_rules = 0;
    if (!map) return;
    const char *p = map;
    while (*p && s_nsite_rules < S_MAX_SITE_RULES) {
        while (*p == ' ' || *p == ';') p++;
        if (!*p) break;
        size_t len = strcspn(p, ";");
        char rule[256];
        snprintf(rule, sizeof rule, "%.*s", (int)(len < 255 ? len : 255), p);
        p += len;
        char *colon = strchr(rule, ':'), *eq = strrchr(rule, '=');
        int kind = 0;
        if (colon && eq && eq > colon) {
            *colon = 0;
            *eq = 0;
            char *k = rule;
            while (*k == ' ') k++;
            size_t kl = strlen(k);
            while (kl && k[kl - 1] == ' ') k[--kl] = 0;
            kind = !strcmp(k, "calling_ae") ? 1 : !strcmp(k, "institution") ? 2 : 0;
        }
        char *val = colon ? colon + 1 : NULL, *site = eq ? eq + 1 : NULL;
        while (val && *val == ' ') val++;
        while (site && *site == ' ') site++;
        if (val) {
            size_t vl = strlen(val);
            while (vl && val[vl - 1] == ' ') val[--vl] = 0;
        }
        if (site) {
            size_t sl = strlen(site);
            while (sl && site[sl - 1] == ' ') site[--sl] = 0;
        }
        if (!kind || !val || !*val || !site || !*site) {
            kp_warn("index", "sites.map: rule '%.*s' ignored (calling_ae:AE=SITE or "
                             "institution:NAME=SITE)",
                    (int)(len < 200 ? len : 200), p - len);
            continue;
        }
        s_site_rules[s_nsite_rules].kind = kind;
        snprintf(s_site_rules[s_nsite_rules].value, sizeof s_site_rules[0].value, "%s", val);
        snprintf(s_site_rules[s_nsite_rules].site, sizeof s_site_rules[0].site, "%s", site);
        s_nsite_rules++;
    }
}

const char *kp_index_site_for(const char *calling_ae, const char *institution)
{
    for (int i = 0; i < s_nsite_rules; i++) {
        if (s_site_rules[i].kind == 1 && calling_ae && !strcmp(calling_ae, s_site_rules[i].value))
            return s_site_rules[i].site;
        if (s_site_rules[i].kind == 2 && institution &&
            !strcasecmp(institution, s_site_rules[i].value))
            return s_site_rules[i].site;
    }
    return NULL;
}

static int s_upsert_study(kp_db_t *db, s_parsed_t *p, const char *patient_pk, char study_pk[24],
                          s_set_t *old_patients)
{
    kp_dicom_file_t *f = p->f;
    const char *stu[] = {patient_pk,
                         p->study_uid,
                         kp_dicom_get(f, T_STUDY_DATE),
                         kp_dicom_get(f, T_STUDY_TIME),
                         kp_dicom_get(f, T_ACCESSION),
                         kp_dicom_get(f, T_STUDY_ID),
                         kp_dicom_get(f, T_STUDY_DESC),
                         kp_dicom_get(f, T_REFERRING),
                         kp_dicom_get(f, T_PATIENT_NAME),
                         p->patient_id,
                         p->issuer,
                         kp_dicom_get(f, T_BIRTH_DATE),
                         kp_dicom_get(f, T_SEX),
                         kp_dicom_get(f, T_TZ_OFFSET),
                         kp_dicom_get(f, T_SPECIFIC_CHARSET),
                         p->attrs_from,
                         kp_index_site_for(p->item->calling_ae,
                                           kp_dicom_get(f, 0x00080080 /* InstitutionName */))};
    /* The site is decided by the study's first instance and never changed by later ones. */
    return s_upsert_child(
        db,
        "WITH old AS (SELECT patient_pk FROM studies WHERE study_uid = $2) "
        "INSERT INTO studies (patient_pk, study_uid, study_date, study_time, accession_number, "
        "study_id, study_description, referring_physician, patient_name, patient_name_fold, "
        "patient_id, issuer_of_patient_id, patient_birth_date, patient_sex, timezone_offset, "
        "specific_charset, attrs_from, site_id) VALUES ($1::bigint, $2, $3, $4, $5, $6, $7, $8, "
        "$9, kp_fold($9), $10, $11, $12, $13, $14, $15, $16, coalesce((SELECT id FROM sites "
        "WHERE name = $17), (SELECT id FROM sites WHERE name = 'default'))) ON CONFLICT "
        "(study_uid) DO UPDATE "
        "SET " NEWER(
            "studies", "patient_pk") ", " NEWER("studies", "study_date") ", " NEWER("studies",
                                                                                    "study_time") ", " NEWER("studies", "accession_number") ", " NEWER("studies", "study_id") ", " NEWER("studies", "study_description") ", " NEWER("studies", "referring_physician") ", " NEWER("studies", "patient_name") ", " NEWER("studies",
                                                                                                                                                                                                                                                                                                                       "patient_name_fold") ", " NEWER("studies",
                                                                                                                                                                                                                                                                                                                                                       "patient_id") ", " NEWER("studies",
                                                                                                                                                                                                                                                                                                                                                                                "issuer_of_patient_id") ", " NEWER("studies", "patient_birth_date") ", " NEWER("studies",
                                                                                                                                                                                                                                                                                                                                                                                                                                                               "patient_sex") ", " NEWER("studies", "timezone_offset") ", " NEWER("studies",
                                                                                                                                                                                                                                                                                                                                                                                                                                                                                                                                  "specific_charset") ", " NEWEST("studies") " RETURNING pk, (SELECT patient_pk FROM old)",
        17, stu, patient_pk, study_pk, old_patients);
}

static int s_upsert_series(kp_db_t *db, s_parsed_t *p, const char *study_pk, char series_pk[24],
                           s_set_t *old_studies)
{
    kp_dicom_file_t *f = p->f;
    char nbuf[16];
    const char *ser[] = {study_pk,
                         p->series_uid,
                         kp_dicom_get(f, T_MODALITY),
                         s_int(f, T_SERIES_NUMBER, nbuf),
                         kp_dicom_get(f, T_SERIES_DESC),
                         kp_dicom_get(f, T_SERIES_DATE),
                         kp_dicom_get(f, T_SERIES_TIME),
                         kp_dicom_get(f, T_BODY_PART),
                         kp_dicom_get(f, T_STATION),
                         kp_dicom_get(f, T_PPS_START_DATE),
                         kp_dicom_get(f, T_PPS_START_TIME),
                         kp_dicom_get_in_seq(f, T_REQUEST_ATTRS, T_SPS_ID),
                         kp_dicom_get_in_seq(f, T_REQUEST_ATTRS, T_RP_ID),
                         kp_dicom_get(f, T_INSTITUTION),
                         p->attrs_from};
    return s_upsert_child(db,
                          "WITH old AS (SELECT study_pk FROM series WHERE series_uid = $2) "
                          "INSERT INTO series (study_pk, series_uid, modality, series_number, "
                          "series_description, "
                          "series_date, series_time, body_part, station_name, pps_start_date, "
                          "pps_start_time, "
                          "request_spsid, request_rpid, institution_name, attrs_from) VALUES "
                          "($1::bigint, $2, $3, "
                          "$4::int, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON CONFLICT "
                          "(series_uid) DO "
                          "UPDATE SET " NEWER("series", "study_pk") ", " NEWER("series", "modality") ", " NEWER("series",
                                                                                                                "series_number") ", " NEWER("series", "series_description") ", " NEWER("series", "series_date") ", " NEWER("series", "series_time") ", " NEWER("series", "body_part") ", " NEWER("series", "station_name") ", " NEWER("series", "pps_start_date") ", " NEWER("series", "pps_start_time") ", " NEWER("series",
                                                                                                                                                                                                                                                                                                                                                                                                                    "request_spsid") ", " NEWER("series",
                                                                                                                                                                                                                                                                                                                                                                                                                                                "request_rpid") ", " NEWER("series", "institution_name") ", " NEWEST("series") " RETURNING pk, (SELECT study_pk FROM old)",
                          15, ser, study_pk, series_pk, old_studies);
}

static const char s_instance_sql[] =
        "WITH old AS (SELECT series_pk FROM instances WHERE sop_uid = $2) "
        "INSERT INTO instances (series_pk, sop_uid, sop_class_uid, instance_number, "
        "transfer_syntax_uid, rows, columns, bits_allocated, number_of_frames, content_date, "
        "content_time, path, file_size, file_sha256, pixel_offset, pixel_length, "
        "charset_fallback, calling_ae, metadata, received_at, called_ae) VALUES ($1::bigint, $2, $3, $4::int, "
        "$5, "
        "$6::int, $7::int, $8::int, $9::int, $10, $11, $12, $13::bigint, $14, $15::bigint, "
        "$16::bigint, $17::boolean, $18, $19::jsonb, to_timestamp($20::double precision), $21) ON "
        "CONFLICT (sop_uid) DO UPDATE SET "
        "series_pk = EXCLUDED.series_pk, sop_class_uid = EXCLUDED.sop_class_uid, "
        "instance_number = EXCLUDED.instance_number, transfer_syntax_uid = "
        "EXCLUDED.transfer_syntax_uid, rows = EXCLUDED.rows, columns = EXCLUDED.columns, "
        "bits_allocated = EXCLUDED.bits_allocated, number_of_frames = EXCLUDED.number_of_frames, "
        "content_date = EXCLUDED.content_date, content_time = EXCLUDED.content_time, path = "
        "EXCLUDED.path, file_size = EXCLUDED.file_size, file_sha256 = EXCLUDED.file_sha256, "
        "pixel_offset = EXCLUDED.pixel_offset, pixel_length = EXCLUDED.pixel_length, "
        "charset_fallback = EXCLUDED.charset_fallback, calling_ae = "
        "coalesce(EXCLUDED.calling_ae, instances.calling_ae), called_ae = "
        "coalesce(EXCLUDED.called_ae, instances.called_ae), metadata = EXCLUDED.metadata, "
        "received_at = EXCLUDED.received_at, "
        "updated_at = now() RETURNING (SELECT series_pk FROM old)";

/* Upserts the batch's instances in one pipeline (libpq pipeline mode: every statement is sent
 * before the first answer is read, so the batch costs one round trip, not one per instance).
 * Each statement returns the series the instance was in before, so a moved instance's old series
 * gets its aggregates fixed. */
static int s_upsert_instances(kp_db_t *db, s_parsed_t **v, size_t m, s_set_t *old_series)
{
    PGconn *c = kp_db_conn(db);
    if (!m) return 0;
    if (PQenterPipelineMode(c) != 1) {
        kp_error("index", "cannot enter pipeline mode: %s", PQerrorMessage(c));
        return KP_EDB;
    }
    int rc = 0;
    size_t sent = 0;
    for (size_t i = 0; i < m; i++) {
        s_parsed_t *p = v[i];
        kp_dicom_file_t *f = p->f;
        char b1[16], b2[16], b3[16], b4[16], b5[16], size[24];
        snprintf(size, sizeof size, "%lld", (long long)p->size);
        const char *ins[] = {p->series_pk,
                             p->sop_uid,
                             kp_dicom_get(f, T_SOP_CLASS),
                             s_int(f, T_INSTANCE_NUMBER, b1),
                             kp_dicom_transfer_syntax(f),
                             s_int(f, T_ROWS, b2),
                             s_int(f, T_COLUMNS, b3),
                             s_int(f, T_BITS_ALLOCATED, b4),
                             s_int(f, T_FRAMES, b5),
                             kp_dicom_get(f, T_CONTENT_DATE),
                             kp_dicom_get(f, T_CONTENT_TIME),
                             p->item->rel,
                             size,
                             p->sha,
                             p->pix_off[0] ? p->pix_off : NULL,
                             p->pix_len[0] ? p->pix_len : NULL,
                             kp_dicom_charset_fallback(f) ? "true" : "false",
                             p->item->calling_ae ? p->item->calling_ae
                                                 : kp_dicom_get(f, 0x00020016),
                             p->json,
                             p->received_at,
                             p->item->called_ae};
        if (!PQsendQueryParams(c, s_instance_sql, 21, NULL, ins, NULL, NULL, 0)) {
            kp_error("index", "cannot send an instance upsert: %s", PQerrorMessage(c));
            rc = KP_EDB;
            break;
        }
        sent++;
    }
    if (PQpipelineSync(c) != 1) rc = KP_EDB;
    for (size_t i = 0; i < sent; i++) {
        PGresult *r = PQgetResult(c);
        if (!r) {
            rc = KP_EDB;
            break;
        }
        if (PQresultStatus(r) == PGRES_TUPLES_OK) {
            if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) &&
                strcmp(PQgetvalue(r, 0, 0), v[i]->series_pk))
                s_set_add(old_series, PQgetvalue(r, 0, 0)); /* moved: fix its old series */
        } else if (!rc) {
            const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
            rc = state && (!strcmp(state, "40001") || !strcmp(state, "40P01")) ? KP_EAGAIN
                                                                                : KP_EDB;
            char msg[512];
            snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
            msg[strcspn(msg, "\n")] = 0;
            kp_error("index", "instance upsert failed: %s", msg);
        }
        PQclear(r);
        while ((r = PQgetResult(c))) PQclear(r); /* the NULL that ends this statement's results */
    }
    PGresult *r = PQgetResult(c); /* the sync point */
    if (!r || PQresultStatus(r) != PGRES_PIPELINE_SYNC) rc = rc ? rc : KP_EDB;
    PQclear(r);
    if (PQexitPipelineMode(c) != 1) {
        kp_error("index", "cannot leave pipeline mode: %s; reconnecting", PQerrorMessage(c));
        kp_db_disconnect(db); /* the transaction dies with the connection */
        rc = rc ? rc : KP_EDB;
    }
    return rc;
}

/* A set as a PostgreSQL array literal ("{1,2,3}"), malloc'd. */
static char *s_set_array(const s_set_t *set)
{
    size_t cap = 3 + set->n * 25, len = 0;
    char *a = malloc(cap);
    if (!a) abort();
    a[len++] = '{';
    for (size_t i = 0; i < set->n; i++)
        len += (size_t)snprintf(a + len, cap - len, "%s%s", i ? "," : "", set->pk[i]);
    a[len++] = '}';
    a[len] = 0;
    return a;
}

/* Recomputes the aggregates of every touched series, study and patient (each statement sees
 * every committed instance: the rows were locked by this transaction's upserts), and removes
 * rows left empty by instances that moved. */
static int s_aggregate(kp_db_t *db, s_set_t *series, s_set_t *studies, s_set_t *patients)
{
    static const char *const sql[] = {
        "UPDATE series se SET num_instances = (SELECT count(*) FROM instances WHERE series_pk = "
        "se.pk) WHERE se.pk = ANY($1::bigint[])",
        "DELETE FROM series WHERE pk = ANY($1::bigint[]) AND num_instances = 0",
        "UPDATE studies s SET num_series = coalesce(a.ns, 0), num_instances = coalesce(a.ni, 0), "
        "modalities = coalesce(a.mods, '{}'), sop_classes = coalesce(c.classes, '{}') FROM "
        "unnest($1::bigint[]) AS t(pk) LEFT JOIN (SELECT study_pk, count(*) AS ns, "
        "sum(num_instances) AS ni, array_agg(DISTINCT modality ORDER BY modality) FILTER (WHERE "
        "modality <> '') AS mods FROM series WHERE study_pk = ANY($1::bigint[]) GROUP BY "
        "study_pk) a ON a.study_pk = t.pk LEFT JOIN (SELECT se.study_pk, array_agg(DISTINCT "
        "i.sop_class_uid ORDER BY i.sop_class_uid) AS classes FROM instances i JOIN series se ON "
        "se.pk = i.series_pk WHERE se.study_pk = ANY($1::bigint[]) AND i.sop_class_uid IS NOT "
        "NULL GROUP BY se.study_pk) c ON c.study_pk = t.pk WHERE s.pk = t.pk",
        "DELETE FROM studies WHERE pk = ANY($1::bigint[]) AND num_series = 0",
        "UPDATE patients p SET num_studies = (SELECT count(*) FROM studies WHERE patient_pk = "
        "p.pk) WHERE p.pk = ANY($1::bigint[])",
        "DELETE FROM patients WHERE pk = ANY($1::bigint[]) AND num_studies = 0",
    };
    const s_set_t *sets[] = {series, series, studies, studies, patients, patients};
    int rc = 0;
    for (size_t i = 0; !rc && i < sizeof sql / sizeof sql[0]; i++) {
        if (!sets[i]->n) continue;
        char *arr = s_set_array(sets[i]);
        const char *pp[] = {arr};
        rc = kp_db_run(db, sql[i], 1, pp);
        free(arr);
    }
    return rc;
}

/* Marks the batch's jobs done in one statement. An item whose job is already finished (delivered
 * again) gets result 1 and is skipped; the row lock taken here also makes a concurrent second
 * delivery of the same job wait for this transaction and then find it done. */
static int s_claim_jobs(kp_db_t *db, s_parsed_t *ps, size_t n)
{
    size_t cap = 2 + n * 21, len = 0;
    char *ids = malloc(cap);
    if (!ids) abort();
    ids[len++] = '{';
    for (size_t i = 0; i < n; i++)
        if (ps[i].item->job_id > 0)
            len += (size_t)snprintf(ids + len, cap - len, "%s%lld", len > 1 ? "," : "",
                                    (long long)ps[i].item->job_id);
    ids[len++] = '}';
    ids[len] = 0;
    int rc = 0;
    PGresult *r = NULL;
    if (len > 2) {
        const char *params[] = {ids};
        rc = kp_db_exec(db, &r,
                        "UPDATE jobs SET state = 'done', updated_at = now(), last_error = NULL "
                        "WHERE id = ANY($1::bigint[]) AND state = 'pending' RETURNING id",
                        1, params);
    }
    free(ids);
    if (rc) return rc;
    for (size_t i = 0; i < n; i++) {
        int64_t id = ps[i].item->job_id;
        if (id <= 0) continue;
        bool claimed = false;
        for (int j = 0; r && j < PQntuples(r) && !claimed; j++)
            claimed = atoll(PQgetvalue(r, j, 0)) == id;
        for (size_t k = 0; k < i && claimed; k++) /* the same job twice in one batch */
            if (ps[k].item->job_id == id) claimed = false;
        if (!claimed) ps[i].item->result = 1;
    }
    PQclear(r);
    return 0;
}

/* Orders of the batch for each level: rows are locked in key order at every level, so any
 * number of indexers lock in the same global order and never deadlock on each other. */
static int s_by_study(const void *a, const void *b)
{
    const s_parsed_t *x = *(s_parsed_t *const *)a, *y = *(s_parsed_t *const *)b;
    return strcmp(x->study_uid, y->study_uid);
}

static int s_by_series(const void *a, const void *b)
{
    const s_parsed_t *x = *(s_parsed_t *const *)a, *y = *(s_parsed_t *const *)b;
    return strcmp(x->series_uid, y->series_uid);
}

static int s_by_sop(const void *a, const void *b)
{
    const s_parsed_t *x = *(s_parsed_t *const *)a, *y = *(s_parsed_t *const *)b;
    return strcmp(x->sop_uid, y->sop_uid);
}

/* Same entity at a level (patient key, study UID, series UID). */
static bool s_same(int level, const s_parsed_t *x, const s_parsed_t *y)
{
    switch (level) {
    case 0:
        return !strcmp(x->patient_id, y->patient_id) && !strcmp(x->issuer, y->issuer);
    case 1:
        return !strcmp(x->study_uid, y->study_uid);
    default:
        return !strcmp(x->series_uid, y->series_uid);
    }
}

/* Writes each distinct patient, study and series of the batch ONCE, with the attributes of its
 * most recently received instance in the batch (the database keeps the newer of that and what
 * it has), then every instance. v holds the valid items, sorted per level in turn. */
static int s_write_entities(kp_db_t *db, s_parsed_t **v, size_t m, s_set_t *moved_pat,
                            s_set_t *moved_st, s_set_t *moved_ser, kp_index_tick_fn tick,
                            void *tick_user)
{
    int rc = 0;
    for (int level = 0; level < 3 && !rc; level++) {
        if (level == 1) qsort(v, m, sizeof *v, s_by_study);
        if (level == 2) qsort(v, m, sizeof *v, s_by_series);
        for (size_t a = 0; a < m && !rc;) {
            size_t b = a + 1, newest = a;
            for (; b < m && s_same(level, v[a], v[b]); b++)
                if (strcmp(v[b]->attrs_from, v[newest]->attrs_from) > 0) newest = b;
            s_parsed_t *p = v[newest];
            char pk[24];
            if (level == 0)
                rc = s_upsert_patient(db, p, pk);
            else if (level == 1)
                rc = s_upsert_study(db, p, p->patient_pk, pk, moved_pat);
            else
                rc = s_upsert_series(db, p, p->study_pk, pk, moved_st);
            for (size_t i = a; i < b && !rc; i++)
                snprintf(level == 0   ? v[i]->patient_pk
                         : level == 1 ? v[i]->study_pk
                                      : v[i]->series_pk,
                         24, "%s", pk);
            a = b;
        }
    }
    if (tick) tick(tick_user);
    if (!rc) qsort(v, m, sizeof *v, s_by_sop);
    if (!rc) rc = s_upsert_instances(db, v, m, moved_ser);
    if (tick) tick(tick_user);
    return rc;
}

static int s_write(kp_db_t *db, s_parsed_t *ps, size_t n, kp_index_tick_fn tick, void *tick_user)
{
    s_set_t series = {0}, studies = {0}, patients = {0}, moved = {0}, moved_st = {0},
            moved_pat = {0};
    s_parsed_t **v = calloc(n, sizeof *v);
    if (!v) abort();
    size_t m = 0;
    int rc = kp_db_begin(db);
    if (!rc) rc = kp_db_run(db, "SET LOCAL synchronous_commit = off", 0, NULL);
    if (!rc) rc = s_claim_jobs(db, ps, n);
    for (size_t i = 0; !rc && i < n; i++) {
        s_parsed_t *p = &ps[i];
        if (p->item->result == 1) continue;
        if (!p->f || p->item->result < 0) {
            int why = p->item->result < 0 ? p->item->result : KP_EDICOM;
            /* claimed as done above; record the failure instead */
            char idb[24];
            snprintf(idb, sizeof idb, "%lld", (long long)p->item->job_id);
            const char *pp[] = {idb, kp_strerror(why)};
            if (p->item->job_id)
                rc = kp_db_run(db,
                               "UPDATE jobs SET state = 'failed', last_error = $2 WHERE id = "
                               "$1::bigint",
                               2, pp);
            p->item->result = why;
            continue;
        }
        v[m++] = p; /* ps is sorted by patient key: the order level 0 needs */
    }
    if (!rc) rc = s_write_entities(db, v, m, &moved_pat, &moved_st, &moved, tick, tick_user);
    for (size_t i = 0; !rc && i < m; i++) {
        s_set_add(&patients, v[i]->patient_pk);
        s_set_add(&studies, v[i]->study_pk);
        s_set_add(&series, v[i]->series_pk);
        v[i]->item->result = 0;
        snprintf(v[i]->item->study_uid, sizeof v[i]->item->study_uid, "%s", v[i]->study_uid);
    }
    free(v);
    if (!rc && moved.n) {
        /* Old series of moved instances: find their studies and patients too. */
        for (size_t i = 0; !rc && i < moved.n; i++) {
            const char *pp[] = {moved.pk[i]};
            PGresult *r = NULL;
            rc = kp_db_exec(db, &r,
                            "SELECT se.study_pk, st.patient_pk FROM series se JOIN studies st ON "
                            "st.pk = se.study_pk WHERE se.pk = $1::bigint",
                            1, pp);
            if (rc) break;
            if (PQntuples(r) == 1) {
                s_set_add(&series, moved.pk[i]);
                s_set_add(&studies, PQgetvalue(r, 0, 0));
                s_set_add(&patients, PQgetvalue(r, 0, 1));
            }
            PQclear(r);
        }
    }
    for (size_t i = 0; !rc && i < moved_st.n; i++) { /* a series moved to another study */
        const char *pp[] = {moved_st.pk[i]};
        PGresult *r = NULL;
        rc = kp_db_exec(db, &r, "SELECT patient_pk FROM studies WHERE pk = $1::bigint", 1, pp);
        if (rc) break;
        s_set_add(&studies, moved_st.pk[i]);
        if (PQntuples(r) == 1) s_set_add(&patients, PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    for (size_t i = 0; i < moved_pat.n; i++)
        s_set_add(&patients, moved_pat.pk[i]);
    if (!rc) rc = s_aggregate(db, &series, &studies, &patients);
    if (!rc) rc = kp_db_commit(db);
    if (rc) kp_db_rollback(db);
    free(series.pk);
    free(studies.pk);
    free(patients.pk);
    free(moved.pk);
    free(moved_st.pk);
    free(moved_pat.pk);
    return rc;
}

int kp_index_batch(kp_db_t *db, kp_storage_t *st, kp_index_item_t *items, size_t n,
                   kp_index_tick_fn tick, void *tick_user)
{
    if (!n) return 0;
    s_parsed_t *ps = calloc(n, sizeof *ps);
    if (!ps) abort();
    for (size_t i = 0; i < n; i++) {
        ps[i].item = &items[i];
        items[i].result = 0;
        int rc = s_parse(st, &ps[i]);
        if (rc) {
            items[i].result = rc;
            kp_dicom_close(&ps[i].f);
            kp_warn("index", "cannot index %s: %s", items[i].rel, kp_strerror(rc));
        }
        if (tick) tick(tick_user);
    }
    qsort(ps, n, sizeof *ps, s_cmp);
    int rc = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        rc = s_write(db, ps, n, tick, tick_user);
        if (rc != KP_EAGAIN) break;
        for (size_t i = 0; i < n; i++)
            if (items[i].result == 0 || items[i].result == 1) items[i].result = 0;
    }
    if (rc) {
        for (size_t i = 0; i < n; i++)
            if (items[i].result >= 0) items[i].result = rc;
    }
    for (size_t i = 0; i < n; i++) {
        kp_dicom_close(&ps[i].f);
        free(ps[i].json);
    }
    free(ps);
    return rc;
}
