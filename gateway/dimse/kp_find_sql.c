/* kp_find_sql: C-FIND identifier -> one parameterised SQL query (see kp_find_sql.h).
 *
 * Design note. A static table maps every attribute we index to the level that owns it, its
 * matching kind and its SQL column expression; patient attributes have a second expression for
 * the PATIENT level (table patients) while the lower levels use the copies on studies (what
 * QIDO-RS returns too, and studies.patient_name_fold has the trigram index). For each key of
 * the identifier with a value, one fragment per kind is appended to the WHERE clause, the
 * value(s) going into $n parameters:
 *   UID          col = ANY(string_to_array($n, '\'))          single value or list of UIDs
 *   text, CS     col = $n | col LIKE $n (wildcards) ...         ORed over a '\' list
 *   PN           same on kp_fold(col) vs kp_fold($n) when names are folded
 *   DA / TM      single value, or ranges A-B, A-, -B (empty values never match a range);
 *                the upper bound compares only the precision it gives (TM 1200 includes
 *                12:00:59); combined date-time (when negotiated) compares date||time
 *   integers     normalised in C, col = ANY($n::int[]) via string_to_array
 *   arrays       ModalitiesInStudy, SOPClassesInStudy: any element matches
 * A value of only '*' is universal matching, as is an empty value. Keys we do not index are
 * return keys only; at IMAGE level they are read from instances.metadata (DICOM JSON). */
#include "kp_find_sql.h"

#include "kp_errors.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LV_PATIENT, LV_STUDY, LV_SERIES, LV_IMAGE };
enum { MK_TEXT, MK_PN, MK_UID, MK_DATE, MK_TIME, MK_INT, MK_ARRAY, MK_NONE };

typedef struct {
    uint32_t tag;
    int level;        /* the level that owns the attribute */
    int kind;         /* MK_* */
    const char *col;  /* SQL expression at levels below PATIENT (and at PATIENT if pcol NULL) */
    const char *pcol; /* expression at the PATIENT level (patient attributes) */
    const char *fold; /* PN: folded expression below PATIENT (indexed column) */
} s_keydef_t;

#define TAG_PATIENT_ID 0x00100020u
#define TAG_STUDY_UID  0x0020000Du
#define TAG_SERIES_UID 0x0020000Eu
#define TAG_SOP_UID    0x00080018u

static const s_keydef_t s_keys[] = {
    /* patient */
    {0x00100010, LV_PATIENT, MK_PN, "st.patient_name", "p.patient_name", "st.patient_name_fold"},
    {TAG_PATIENT_ID, LV_PATIENT, MK_TEXT, "st.patient_id", "p.patient_id", NULL},
    {0x00100021, LV_PATIENT, MK_TEXT, "st.issuer_of_patient_id", "p.issuer", NULL},
    {0x00100030, LV_PATIENT, MK_DATE, "st.patient_birth_date", "p.birth_date", NULL},
    {0x00100040, LV_PATIENT, MK_TEXT, "st.patient_sex", "p.sex", NULL},
    {0x00201200, LV_PATIENT, MK_NONE, "p.num_studies", NULL, NULL},
    {0x00201202, LV_PATIENT, MK_NONE,
     "(SELECT coalesce(sum(x.num_series), 0) FROM studies x WHERE x.patient_pk = p.pk)", NULL,
     NULL},
    {0x00201204, LV_PATIENT, MK_NONE,
     "(SELECT coalesce(sum(x.num_instances), 0) FROM studies x WHERE x.patient_pk = p.pk)", NULL,
     NULL},
    /* study */
    {0x00080020, LV_STUDY, MK_DATE, "st.study_date", NULL, NULL},
    {0x00080030, LV_STUDY, MK_TIME, "st.study_time", NULL, NULL},
    {0x00080050, LV_STUDY, MK_TEXT, "st.accession_number", NULL, NULL},
    {0x00200010, LV_STUDY, MK_TEXT, "st.study_id", NULL, NULL},
    {TAG_STUDY_UID, LV_STUDY, MK_UID, "st.study_uid", NULL, NULL},
    {0x00081030, LV_STUDY, MK_TEXT, "st.study_description", NULL, NULL},
    {0x00080090, LV_STUDY, MK_PN, "st.referring_physician", NULL, NULL},
    {0x00080061, LV_STUDY, MK_ARRAY, "st.modalities", NULL, NULL},
    {0x00080062, LV_STUDY, MK_ARRAY, "st.sop_classes", NULL, NULL},
    {0x00080201, LV_STUDY, MK_TEXT, "st.timezone_offset", NULL, NULL},
    {0x00201206, LV_STUDY, MK_NONE, "st.num_series", NULL, NULL},
    {0x00201208, LV_STUDY, MK_NONE, "st.num_instances", NULL, NULL},
    /* series */
    {0x00080060, LV_SERIES, MK_TEXT, "se.modality", NULL, NULL},
    {0x00200011, LV_SERIES, MK_INT, "se.series_number", NULL, NULL},
    {TAG_SERIES_UID, LV_SERIES, MK_UID, "se.series_uid", NULL, NULL},
    {0x0008103E, LV_SERIES, MK_TEXT, "se.series_description", NULL, NULL},
    {0x00080021, LV_SERIES, MK_DATE, "se.series_date", NULL, NULL},
    {0x00080031, LV_SERIES, MK_TIME, "se.series_time", NULL, NULL},
    {0x00180015, LV_SERIES, MK_TEXT, "se.body_part", NULL, NULL},
    {0x00081010, LV_SERIES, MK_TEXT, "se.station_name", NULL, NULL},
    {0x00080080, LV_SERIES, MK_TEXT, "se.institution_name", NULL, NULL},
    {0x00400244, LV_SERIES, MK_DATE, "se.pps_start_date", NULL, NULL},
    {0x00400245, LV_SERIES, MK_TIME, "se.pps_start_time", NULL, NULL},
    {0x00201209, LV_SERIES, MK_NONE, "se.num_instances", NULL, NULL},
    /* image */
    {TAG_SOP_UID, LV_IMAGE, MK_UID, "i.sop_uid", NULL, NULL},
    {0x00080016, LV_IMAGE, MK_UID, "i.sop_class_uid", NULL, NULL},
    {0x00200013, LV_IMAGE, MK_INT, "i.instance_number", NULL, NULL},
    {0x00280010, LV_IMAGE, MK_INT, "i.rows", NULL, NULL},
    {0x00280011, LV_IMAGE, MK_INT, "i.columns", NULL, NULL},
    {0x00280008, LV_IMAGE, MK_INT, "i.number_of_frames", NULL, NULL},
    {0x00280100, LV_IMAGE, MK_INT, "i.bits_allocated", NULL, NULL},
    {0x00080023, LV_IMAGE, MK_DATE, "i.content_date", NULL, NULL},
    {0x00080033, LV_IMAGE, MK_TIME, "i.content_time", NULL, NULL},
    {0x00083002, LV_IMAGE, MK_UID, "i.transfer_syntax_uid", NULL, NULL},
};
#define NKEYS (sizeof s_keys / sizeof s_keys[0])

/* Date/time pairs matched as one date-time when combined matching was negotiated. */
static const uint32_t s_dt_pairs[][2] = {{0x00080020, 0x00080030},
                                         {0x00080021, 0x00080031},
                                         {0x00080023, 0x00080033},
                                         {0x00400244, 0x00400245}};

static const char *const s_level_names[] = {"PATIENT", "STUDY", "SERIES", "IMAGE"};
static const char *const s_from[] = {
    " FROM patients p",
    " FROM studies st JOIN patients p ON p.pk = st.patient_pk",
    " FROM series se JOIN studies st ON st.pk = se.study_pk"
    " JOIN patients p ON p.pk = st.patient_pk",
    " FROM instances i JOIN series se ON se.pk = i.series_pk"
    " JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk",
};
static const char *const s_order[] = {" ORDER BY p.pk", " ORDER BY st.pk", " ORDER BY se.pk",
                                      " ORDER BY i.pk"};

#define MAX_PARAMS 4096
#define MAX_COLS   1024

/* ---- a growing buffer and the parameter list ---------------------------------------------- */

typedef struct {
    char *s;
    size_t len, cap;
} s_buf_t;

static void s_put(s_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void s_put(s_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) abort();
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 1024;
        while (cap <= b->len + (size_t)n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) abort(); /* out of memory aborts (CONVENTIONS 4) */
        b->s = s;
        b->cap = cap;
    }
}

typedef struct {
    s_buf_t where;
    char **params;
    int nparams;
    bool overflow;
    bool fold;
} s_ctx_t;

/* Adds a parameter (copied) and returns its number, 0 when there are too many. */
static int s_param(s_ctx_t *c, const char *v, size_t n)
{
    if (c->nparams >= MAX_PARAMS || c->overflow) { /* the last slot is for the LIMIT */
        c->overflow = true;
        if (c->nparams > MAX_PARAMS || !c->params) return 0;
    }
    if (!c->params) {
        c->params = calloc(MAX_PARAMS + 1, sizeof *c->params);
        if (!c->params) abort();
    }
    char *p = strndup(v, n);
    if (!p) abort();
    c->params[c->nparams++] = p;
    return c->nparams;
}

static void s_and(s_ctx_t *c)
{
    s_put(&c->where, c->where.len ? " AND " : " WHERE ");
}

/* ---- values --------------------------------------------------------------------------------- */

static bool s_has_wildcard(const char *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == '*' || v[i] == '?') return true;
    return false;
}

static bool s_universal(const char *v)
{
    if (!v) return true;
    size_t n = strlen(v);
    return n == 0 || strspn(v, "*") == n;
}

char *kp_find_sql_like(const char *value)
{
    size_t n = strlen(value);
    char *out = malloc(2 * n + 1), *o = out;
    if (!out) abort();
    for (size_t i = 0; i < n; i++) {
        char ch = value[i];
        if (ch == '*')
            *o++ = '%';
        else if (ch == '?')
            *o++ = '_';
        else {
            if (ch == '%' || ch == '_' || ch == '\\') *o++ = '\\';
            *o++ = ch;
        }
    }
    *o = 0;
    return out;
}

/* Column expression of k at the given level (as its natural SQL type). */
static const char *s_col(const s_keydef_t *k, int level)
{
    return level == LV_PATIENT && k->pcol ? k->pcol : k->col;
}

/* Site scope (kp_find_sql_opts_t.site_id): a condition on the study's site at the STUDY
 * level and below, on the patient having a study there at the PATIENT level; nothing at all
 * for a scope naming no existing site. Returns the number of the site parameter, 0 if none. */
static int s_scope(s_ctx_t *c, int level, int site_id)
{
    if (site_id == 0) return 0;
    s_and(c);
    if (site_id < 0) {
        s_put(&c->where, "FALSE");
        return 0;
    }
    char v[16];
    snprintf(v, sizeof v, "%d", site_id);
    int p = s_param(c, v, strlen(v));
    if (level == LV_PATIENT)
        s_put(&c->where,
              "EXISTS (SELECT 1 FROM studies x WHERE x.patient_pk = p.pk AND x.site_id = $%d::int)",
              p);
    else
        s_put(&c->where, "st.site_id = $%d::int", p);
    return p;
}

/* The column expression of k, with the patient aggregates (related studies, series,
 * instances) counted over the scoped site only when sp (its parameter) is set. */
static const char *s_scoped_col(const s_keydef_t *k, int level, int sp, char *buf, size_t len)
{
    const char *what = k->tag == 0x00201200   ? "count(*)"
                       : k->tag == 0x00201202 ? "coalesce(sum(x.num_series), 0)"
                       : k->tag == 0x00201204 ? "coalesce(sum(x.num_instances), 0)"
                                              : NULL;
    if (!sp || !what) return s_col(k, level);
    snprintf(buf, len,
             "(SELECT %s FROM studies x WHERE x.patient_pk = p.pk AND x.site_id = $%d::int)", what,
             sp);
    return buf;
}

static const s_keydef_t *s_keydef(uint32_t tag)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (s_keys[i].tag == tag) return &s_keys[i];
    return NULL;
}

/* One element of a '\' list for text, PN and array kinds. */
static void s_match_one(s_ctx_t *c, const s_keydef_t *k, int level, const char *v, size_t n)
{
    const char *col = s_col(k, level);
    bool wild = s_has_wildcard(v, n);
    char *tmp = strndup(v, n);
    if (!tmp) abort();
    char *val = wild ? kp_find_sql_like(tmp) : tmp;
    int p = s_param(c, val, strlen(val));
    if (wild) free(tmp);
    free(val);
    if (!p) return;
    if (k->kind == MK_ARRAY) {
        if (wild)
            s_put(&c->where, "EXISTS (SELECT 1 FROM unnest(%s) AS m(v) WHERE m.v LIKE $%d)", col,
                  p);
        else
            s_put(&c->where, "$%d = ANY(%s)", p, col);
    } else if (k->kind == MK_PN && c->fold) {
        if (level == LV_PATIENT || !k->fold)
            s_put(&c->where, "kp_fold(%s) %s kp_fold($%d)", col, wild ? "LIKE" : "=", p);
        else
            s_put(&c->where, "%s %s kp_fold($%d)", k->fold, wild ? "LIKE" : "=", p);
    } else {
        s_put(&c->where, "%s %s $%d", col, wild ? "LIKE" : "=", p);
    }
}

static void s_match_list(s_ctx_t *c, const s_keydef_t *k, int level, const char *v)
{
    /* an element of only '*' makes the whole key match universally */
    for (const char *p = v;;) {
        const char *e = strchr(p, '\\');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n > 0 && strspn(p, "*") >= n) return;
        if (!e) break;
        p = e + 1;
    }
    int parts = 0;
    for (const char *p = v;;) {
        const char *e = strchr(p, '\\');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n > 0) {
            s_put(&c->where, parts ? " OR " : "(");
            s_match_one(c, k, level, p, n);
            parts++;
        }
        if (!e) break;
        p = e + 1;
    }
    if (parts > 0) s_put(&c->where, ")");
}

/* Splits "A-B" / "A-" / "-B" / "A" into lo and hi (empty when open); returns true for a
 * range. */
static bool s_range(const char *v, char *lo, char *hi, size_t cap)
{
    const char *dash = strchr(v, '-');
    if (!dash) {
        snprintf(lo, cap, "%s", v);
        snprintf(hi, cap, "%s", v);
        return false;
    }
    size_t n = (size_t)(dash - v);
    snprintf(lo, cap, "%.*s", (int)(n < cap ? n : cap - 1), v);
    snprintf(hi, cap, "%s", dash + 1);
    return true;
}

static void s_match_datetime(s_ctx_t *c, const char *col, const char *v, bool time)
{
    char lo[80], hi[80];
    if (strlen(v) >= sizeof lo) { /* longer than any DA/TM range: matches nothing */
        s_put(&c->where, "FALSE");
        return;
    }
    if (!s_range(v, lo, hi, sizeof lo)) {
        int p = s_param(c, v, strlen(v));
        if (p) s_put(&c->where, "%s = $%d", col, p);
        return;
    }
    s_put(&c->where, "(%s <> ''", col);
    if (*lo) {
        int p = s_param(c, lo, strlen(lo));
        if (p) s_put(&c->where, " AND %s >= $%d::text", col, p);
    }
    if (*hi) {
        int p = s_param(c, hi, strlen(hi));
        if (p && time)
            s_put(&c->where, " AND left(%s, length($%d::text)) <= $%d::text", col, p, p);
        else if (p)
            s_put(&c->where, " AND %s <= $%d::text", col, p);
    }
    s_put(&c->where, ")");
}

/* Combined date-time range (PS3.4 C.2.2.2.5.1): date||time between lo and hi. */
static void s_match_combined(s_ctx_t *c, const char *dcol, const char *tcol, const char *dv,
                             const char *tv)
{
    char dlo[80], dhi[80], tlo[80], thi[80];
    if (strlen(dv) >= sizeof dlo || strlen(tv) >= sizeof tlo) {
        s_put(&c->where, "FALSE");
        return;
    }
    s_range(dv, dlo, dhi, sizeof dlo);
    s_range(tv, tlo, thi, sizeof tlo);
    char lo[160], hi[160];
    snprintf(lo, sizeof lo, "%s%s", dlo, *dlo ? tlo : "");
    snprintf(hi, sizeof hi, "%s%s", dhi, *dhi ? thi : "");
    s_put(&c->where, "(%s <> ''", dcol);
    if (*lo) {
        int p = s_param(c, lo, strlen(lo));
        if (p) s_put(&c->where, " AND %s || coalesce(%s, '') >= $%d::text", dcol, tcol, p);
    }
    if (*hi) {
        int p = s_param(c, hi, strlen(hi));
        if (p)
            s_put(&c->where, " AND left(%s || coalesce(%s, ''), length($%d::text)) <= $%d::text",
                  dcol, tcol, p, p);
    }
    s_put(&c->where, ")");
}

/* Integers: each list element normalised (leading zeros, '+'); invalid elements are dropped
 * (they match nothing). */
static void s_match_int(s_ctx_t *c, const char *col, const char *v)
{
    s_buf_t norm = {0};
    const char *p = v;
    for (;;) {
        const char *e = strchr(p, '\\');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        char tmp[32];
        if (n > 0 && n < sizeof tmp) {
            memcpy(tmp, p, n);
            tmp[n] = 0;
            char *end;
            long long x = strtoll(tmp, &end, 10);
            if (*end == 0 && x >= -2147483648LL && x <= 2147483647LL)
                s_put(&norm, "%s%lld", norm.len ? "\\" : "", x);
        }
        if (!e) break;
        p = e + 1;
    }
    if (!norm.len) {
        s_put(&c->where, "FALSE");
    } else {
        int pn = s_param(c, norm.s, norm.len);
        if (pn) s_put(&c->where, "%s = ANY(string_to_array($%d::text, '\\')::int[])", col, pn);
    }
    free(norm.s);
}

static void s_match(s_ctx_t *c, const s_keydef_t *k, int level, const char *v)
{
    const char *col = s_col(k, level);
    switch (k->kind) {
    case MK_UID: {
        int p = s_param(c, v, strlen(v));
        if (p) s_put(&c->where, "%s = ANY(string_to_array($%d::text, '\\'))", col, p);
        break;
    }
    case MK_DATE:
    case MK_TIME:
        s_match_datetime(c, col, v, k->kind == MK_TIME);
        break;
    case MK_INT:
        s_match_int(c, col, v);
        break;
    default:
        s_match_list(c, k, level, v);
        break;
    }
}

/* ---- the query -------------------------------------------------------------------------- */

static const kp_dicom_find_key_t *s_key_in(const kp_dicom_find_key_t *keys, size_t n, uint32_t tag)
{
    for (size_t i = 0; i < n; i++)
        if (keys[i].tag == tag) return &keys[i];
    return NULL;
}

static const kp_dicom_find_key_t *s_req_key(const kp_dicom_find_req_t *req, uint32_t tag)
{
    return s_key_in(req->keys, req->nkeys, tag);
}

static int s_fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int s_fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

static void s_add_col(s_buf_t *sel, uint32_t *tags, int *ncols, uint32_t tag, const char *expr,
                      int kind)
{
    for (int i = 0; i < *ncols; i++)
        if (tags[i] == tag) return;
    if (*ncols >= MAX_COLS) return;
    if (kind == MK_ARRAY)
        s_put(sel, "%sarray_to_string(%s, '\\')", *ncols ? ", " : "", expr);
    else if (kind == MK_INT || kind == MK_NONE)
        s_put(sel, "%s(%s)::text", *ncols ? ", " : "", expr);
    else
        s_put(sel, "%s%s", *ncols ? ", " : "", expr);
    tags[(*ncols)++] = tag;
}

void kp_find_sql_clear(kp_find_sql_t *q)
{
    if (!q) return;
    free(q->sql);
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
    free(q->params);
    free(q->col_tags);
    memset(q, 0, sizeof *q);
}

int kp_find_sql_build(const kp_dicom_find_req_t *req, const kp_find_sql_opts_t *opts,
                      kp_find_sql_t *q, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    if (err && errlen) err[0] = 0;
    if (!req || !opts) return s_fail(err, errlen, KP_EINVAL, "invalid request");
    int model = req->model;
    if (model != KP_DICOM_FIND_PATIENT_ROOT && model != KP_DICOM_FIND_STUDY_ROOT)
        return s_fail(err, errlen, KP_EMISMATCH, "unknown information model");
    int level = -1;
    for (int i = 0; req->level && i < 4; i++)
        if (!strcmp(req->level, s_level_names[i])) level = i;
    if (level < 0 || (model == KP_DICOM_FIND_STUDY_ROOT && level == LV_PATIENT))
        return s_fail(err, errlen, KP_EMISMATCH,
                      req->level ? "QueryRetrieveLevel not valid" : "QueryRetrieveLevel missing");
    if (req->nkeys > MAX_COLS) return s_fail(err, errlen, KP_EINVAL, "too many keys");

    /* hierarchical query: the unique key of every level above must be a single value */
    const uint32_t uniq[] = {TAG_PATIENT_ID, TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID};
    static const char *const uniq_names[] = {"PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                             "SOPInstanceUID"};
    int top = model == KP_DICOM_FIND_PATIENT_ROOT ? LV_PATIENT : LV_STUDY;
    for (int l = top; l < level; l++) {
        const kp_dicom_find_key_t *k = s_req_key(req, uniq[l]);
        if (!k || !k->value || !*k->value || s_has_wildcard(k->value, strlen(k->value)) ||
            (l == LV_PATIENT && strchr(k->value, '\\')))
            return s_fail(err, errlen, KP_EMISMATCH,
                          "%s (unique key of the %s level) missing or not a single value",
                          uniq_names[l], s_level_names[l]);
    }

    s_ctx_t c = {.fold = opts->fold_names};
    s_buf_t sel = {0};
    uint32_t *tags = calloc(MAX_COLS + 8, sizeof *tags);
    if (!tags) abort();
    int ncols = 0;
    /* site scope first, so that its parameter is $1 for the aggregate expressions below */
    int sp = s_scope(&c, level, opts->site_id);

    /* unique keys of the query level and the levels above are always returned */
    for (int l = top; l <= level; l++) {
        const s_keydef_t *k = s_keydef(uniq[l]);
        s_add_col(&sel, tags, &ncols, k->tag, s_col(k, level), k->kind);
    }
    bool combined_done[sizeof s_dt_pairs / sizeof s_dt_pairs[0]] = {0};
    for (size_t i = 0; i < req->nkeys; i++) {
        const kp_dicom_find_key_t *rk = &req->keys[i];
        const s_keydef_t *k = s_keydef(rk->tag);
        if (!k || k->level > level) {
            /* not indexed here: a return key only; at IMAGE level taken from the metadata */
            if (level == LV_IMAGE && strcmp(rk->vr, "SQ") && ncols < MAX_COLS) {
                char hex[9];
                snprintf(hex, sizeof hex, "%08X", (unsigned)rk->tag);
                int p = s_param(&c, hex, 8);
                if (!p) continue;
                s_put(&sel,
                      "%s(SELECT string_agg(CASE jsonb_typeof(v) WHEN 'object' THEN "
                      "coalesce(v->>'Alphabetic', '') ELSE v #>> '{}' END, '\\' ORDER BY n) "
                      "FROM jsonb_array_elements(CASE jsonb_typeof(i.metadata->$%d->'Value') "
                      "WHEN 'array' THEN i.metadata->$%d->'Value' ELSE '[]'::jsonb END) "
                      "WITH ORDINALITY AS a(v, n))",
                      ncols ? ", " : "", p, p);
                tags[ncols++] = rk->tag;
            }
            continue;
        }
        char scoped[200];
        s_add_col(&sel, tags, &ncols, k->tag, s_scoped_col(k, level, sp, scoped, sizeof scoped),
                  k->kind);
        if (s_universal(rk->value) || k->kind == MK_NONE) continue;
        if (req->combined_datetime && (k->kind == MK_DATE || k->kind == MK_TIME)) {
            size_t pi = 0;
            const kp_dicom_find_key_t *dk = NULL, *tk = NULL;
            for (; pi < sizeof s_dt_pairs / sizeof s_dt_pairs[0]; pi++)
                if (s_dt_pairs[pi][0] == k->tag || s_dt_pairs[pi][1] == k->tag) break;
            if (pi < sizeof s_dt_pairs / sizeof s_dt_pairs[0]) {
                dk = s_req_key(req, s_dt_pairs[pi][0]);
                tk = s_req_key(req, s_dt_pairs[pi][1]);
            }
            if (dk && tk && !s_universal(dk->value) && !s_universal(tk->value) &&
                strchr(dk->value, '-')) {
                if (!combined_done[pi]) {
                    combined_done[pi] = true;
                    s_and(&c);
                    s_match_combined(&c, s_col(s_keydef(dk->tag), level),
                                     s_col(s_keydef(tk->tag), level), dk->value, tk->value);
                }
                continue;
            }
        }
        size_t before = c.where.len;
        s_and(&c);
        size_t mark = c.where.len;
        s_match(&c, k, level, rk->value);
        if (c.where.len == mark) { /* nothing added (e.g. a list with a '*' element) */
            c.where.len = before;
            if (c.where.s) c.where.s[before] = 0;
        }
    }
    if (c.overflow) {
        free(sel.s);
        free(c.where.s);
        free(tags);
        q->params = c.params;
        q->nparams = c.nparams;
        kp_find_sql_clear(q);
        return s_fail(err, errlen, KP_EINVAL, "too many values in the identifier");
    }
    char lim[24];
    snprintf(lim, sizeof lim, "%ld", opts->limit > 0 ? opts->limit + 1 : 1);
    int lp = s_param(&c, lim, strlen(lim)); /* room kept for it: see s_param */

    s_buf_t sql = {0};
    s_put(&sql, "SELECT %s%s%s%s LIMIT $%d::bigint", sel.s, s_from[level],
          c.where.s ? c.where.s : "", s_order[level], lp);
    free(sel.s);
    free(c.where.s);
    q->sql = sql.s;
    q->params = c.params;
    q->nparams = c.nparams;
    q->col_tags = tags;
    q->ncols = ncols;
    snprintf(q->level, sizeof q->level, "%s", s_level_names[level]);
    return 0;
}

/* ---- C-MOVE / C-GET ------------------------------------------------------------------------ */

/* Hierarchical retrieve (PS3.4 C.4.2.2.1): the unique key of every level from the top of the
 * model down to the retrieve level must be present; above the retrieve level with a single
 * value, at it (STUDY, SERIES, IMAGE) a single value or a list of UIDs; never a wildcard or an
 * empty value. Other keys are ignored. The instances come in study, series, instance number
 * order so that a destination receives each series together. */
int kp_find_sql_retrieve(const kp_dicom_retrieve_req_t *req, long limit, kp_find_sql_t *q,
                         char *err, size_t errlen)
{
    return kp_find_sql_retrieve_scoped(req, limit, 0, q, err, errlen);
}

int kp_find_sql_retrieve_scoped(const kp_dicom_retrieve_req_t *req, long limit, int site_id,
                                kp_find_sql_t *q, char *err, size_t errlen)
{
    memset(q, 0, sizeof *q);
    if (err && errlen) err[0] = 0;
    if (!req) return s_fail(err, errlen, KP_EINVAL, "invalid request");
    int model = req->model;
    if (model != KP_DICOM_FIND_PATIENT_ROOT && model != KP_DICOM_FIND_STUDY_ROOT)
        return s_fail(err, errlen, KP_EMISMATCH, "unknown information model");
    int level = -1;
    for (int i = 0; req->level && i < 4; i++)
        if (!strcmp(req->level, s_level_names[i])) level = i;
    if (level < 0 || (model == KP_DICOM_FIND_STUDY_ROOT && level == LV_PATIENT))
        return s_fail(err, errlen, KP_EMISMATCH,
                      req->level ? "QueryRetrieveLevel not valid" : "QueryRetrieveLevel missing");

    static const uint32_t uniq[] = {TAG_PATIENT_ID, TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID};
    static const char *const uniq_names[] = {"PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                             "SOPInstanceUID"};
    static const char *const cols[] = {"st.patient_id", "st.study_uid", "se.series_uid",
                                       "i.sop_uid"};
    const int top = model == KP_DICOM_FIND_PATIENT_ROOT ? LV_PATIENT : LV_STUDY;
    for (int l = top; l <= level; l++) {
        const kp_dicom_find_key_t *k = s_key_in(req->keys, req->nkeys, uniq[l]);
        const char *v = k ? k->value : NULL;
        bool list_ok = l == level && l != LV_PATIENT;
        bool bad = !v || !*v || s_has_wildcard(v, strlen(v)) || (!list_ok && strchr(v, '\\'));
        if (!bad && list_ok) /* no empty element in a list */
            bad = v[0] == '\\' || v[strlen(v) - 1] == '\\' || strstr(v, "\\\\");
        if (bad)
            return s_fail(err, errlen, KP_EMISMATCH, "%s %s", uniq_names[l],
                          list_ok ? "missing, empty or with wildcards"
                                  : "missing or not a single value");
    }

    s_ctx_t c = {0};
    for (int l = top; l <= level; l++) {
        const char *v = s_key_in(req->keys, req->nkeys, uniq[l])->value;
        int p = s_param(&c, v, strlen(v));
        s_and(&c);
        if (l == level && l != LV_PATIENT)
            s_put(&c.where, "%s = ANY(string_to_array($%d, '\\'))", cols[l], p);
        else
            s_put(&c.where, "%s = $%d", cols[l], p);
    }
    (void)s_scope(&c, LV_IMAGE, site_id);
    char lim[24];
    snprintf(lim, sizeof lim, "%ld", limit > 0 ? limit + 1 : 1);
    int lp = s_param(&c, lim, strlen(lim));
    s_buf_t sql = {0};
    s_put(&sql,
          "SELECT i.path, i.sop_uid, coalesce(i.sop_class_uid, "
          "i.metadata->'00080016'->'Value'->>0, ''), coalesce(i.transfer_syntax_uid, ''), "
          "st.study_uid%s%s ORDER BY st.pk, se.pk, i.instance_number NULLS LAST, i.pk "
          "LIMIT $%d::bigint",
          s_from[LV_IMAGE], c.where.s, lp);
    free(c.where.s);
    q->sql = sql.s;
    q->params = c.params;
    q->nparams = c.nparams;
    q->ncols = 5;
    snprintf(q->level, sizeof q->level, "%s", s_level_names[level]);
    return 0;
}
