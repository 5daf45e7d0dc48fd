/* kp_qido: QIDO-RS query string -> one parameterised SQL statement (see kp_qido.h).
 *
 * Design: one table (s_attrs) lists every attribute the index has a column for: tag, keyword,
 * VR, level, SQL expression, how it is matched and whether it is returned by default. Parsing
 * walks the query string once, turning each matching key into a WHERE fragment with $n
 * placeholders (the value itself goes into params[]) and each includefield into a return
 * attribute. Attributes the index has no column for (includefield only) come from the stored
 * DICOM JSON of the first instance below the result row (a LATERAL subquery), or of the instance
 * itself at instance level. PostgreSQL assembles the DICOM JSON, so the gateway just forwards a
 * text value. Matching follows PS3.4 C.2.2.2: single value, UID list (backslash), universal
 * (empty or "*"), wildcard (* ?), date/time ranges; PN values always case-insensitively and,
 * with fuzzymatching=true, accent-insensitively as a substring (kp_fold + trigram index). */
#include "kp_qido.h"

#include "kp_errors.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a growable string --------------------------------------------------------------------- */
typedef struct {
    char *p;
    size_t len, cap;
} s_buf_t;

static void s_add(s_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void s_add(s_buf_t *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) abort();
        if (b->p && (size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + (size_t)n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) abort();
        b->p = p;
        b->cap = cap;
    }
}

/* ---- the attribute table ------------------------------------------------------------------- */
enum s_match { M_NONE, M_UID, M_STR, M_STR_CI, M_PN, M_DATE, M_TIME, M_INT, M_MODS };
enum s_kind { K_STR, K_PN, K_INT, K_ARR, K_CONST };

struct s_attr {
    const char *tag, *keyword, *vr;
    kp_qido_level_t level;
    const char *col;  /* SQL expression over st (studies), se (series), i (instances) */
    const char *fold; /* PN only: a pre-folded column for fuzzy matching, or NULL */
    enum s_kind kind;
    enum s_match match;
    bool dflt; /* returned by default at its own level */
};

#define S_ST KP_QIDO_STUDY
#define S_SE KP_QIDO_SERIES
#define S_IN KP_QIDO_INSTANCE
static const struct s_attr s_attrs[] = {
    {"00080005", "SpecificCharacterSet", "CS", S_ST, "'ISO_IR 192'", NULL, K_CONST, M_NONE, true},
    {"00080020", "StudyDate", "DA", S_ST, "st.study_date", NULL, K_STR, M_DATE, true},
    {"00080030", "StudyTime", "TM", S_ST, "st.study_time", NULL, K_STR, M_TIME, true},
    {"00080050", "AccessionNumber", "SH", S_ST, "st.accession_number", NULL, K_STR, M_STR, true},
    {"00080056", "InstanceAvailability", "CS", S_ST, "'ONLINE'", NULL, K_CONST, M_NONE, true},
    {"00080061", "ModalitiesInStudy", "CS", S_ST, "st.modalities", NULL, K_ARR, M_MODS, true},
    {"00080062", "SOPClassesInStudy", "UI", S_ST, "st.sop_classes", NULL, K_ARR, M_NONE, false},
    {"00080090", "ReferringPhysicianName", "PN", S_ST, "st.referring_physician", NULL, K_PN, M_PN,
     true},
    {"00080201", "TimezoneOffsetFromUTC", "SH", S_ST, "st.timezone_offset", NULL, K_STR, M_STR,
     false},
    {"00081030", "StudyDescription", "LO", S_ST, "st.study_description", NULL, K_STR, M_STR_CI,
     true},
    {"00100010", "PatientName", "PN", S_ST, "st.patient_name", "st.patient_name_fold", K_PN, M_PN,
     true},
    {"00100020", "PatientID", "LO", S_ST, "st.patient_id", NULL, K_STR, M_STR, true},
    {"00100021", "IssuerOfPatientID", "LO", S_ST, "st.issuer_of_patient_id", NULL, K_STR, M_STR,
     false},
    {"00100030", "PatientBirthDate", "DA", S_ST, "st.patient_birth_date", NULL, K_STR, M_DATE,
     true},
    {"00100040", "PatientSex", "CS", S_ST, "st.patient_sex", NULL, K_STR, M_STR, true},
    {"0020000D", "StudyInstanceUID", "UI", S_ST, "st.study_uid", NULL, K_STR, M_UID, true},
    {"00200010", "StudyID", "SH", S_ST, "st.study_id", NULL, K_STR, M_STR, true},
    {"00201206", "NumberOfStudyRelatedSeries", "IS", S_ST, "st.num_series", NULL, K_INT, M_NONE,
     true},
    {"00201208", "NumberOfStudyRelatedInstances", "IS", S_ST, "st.num_instances", NULL, K_INT,
     M_NONE, true},

    {"00080021", "SeriesDate", "DA", S_SE, "se.series_date", NULL, K_STR, M_DATE, true},
    {"00080031", "SeriesTime", "TM", S_SE, "se.series_time", NULL, K_STR, M_TIME, true},
    {"00080060", "Modality", "CS", S_SE, "se.modality", NULL, K_STR, M_STR, true},
    {"00080080", "InstitutionName", "LO", S_SE, "se.institution_name", NULL, K_STR, M_STR_CI,
     false},
    {"00081010", "StationName", "SH", S_SE, "se.station_name", NULL, K_STR, M_STR, false},
    {"0008103E", "SeriesDescription", "LO", S_SE, "se.series_description", NULL, K_STR, M_STR_CI,
     true},
    {"00180015", "BodyPartExamined", "CS", S_SE, "se.body_part", NULL, K_STR, M_STR, false},
    {"0020000E", "SeriesInstanceUID", "UI", S_SE, "se.series_uid", NULL, K_STR, M_UID, true},
    {"00200011", "SeriesNumber", "IS", S_SE, "se.series_number", NULL, K_INT, M_INT, true},
    {"00201209", "NumberOfSeriesRelatedInstances", "IS", S_SE, "se.num_instances", NULL, K_INT,
     M_NONE, true},
    {"00400244", "PerformedProcedureStepStartDate", "DA", S_SE, "se.pps_start_date", NULL, K_STR,
     M_DATE, true},
    {"00400245", "PerformedProcedureStepStartTime", "TM", S_SE, "se.pps_start_time", NULL, K_STR,
     M_TIME, true},

    {"00080016", "SOPClassUID", "UI", S_IN, "i.sop_class_uid", NULL, K_STR, M_UID, true},
    {"00080018", "SOPInstanceUID", "UI", S_IN, "i.sop_uid", NULL, K_STR, M_UID, true},
    {"00080023", "ContentDate", "DA", S_IN, "i.content_date", NULL, K_STR, M_DATE, false},
    {"00080033", "ContentTime", "TM", S_IN, "i.content_time", NULL, K_STR, M_TIME, false},
    {"00200013", "InstanceNumber", "IS", S_IN, "i.instance_number", NULL, K_INT, M_INT, true},
    {"00280008", "NumberOfFrames", "IS", S_IN, "i.number_of_frames", NULL, K_INT, M_NONE, true},
    {"00280010", "Rows", "US", S_IN, "i.rows", NULL, K_INT, M_NONE, true},
    {"00280011", "Columns", "US", S_IN, "i.columns", NULL, K_INT, M_NONE, true},
    {"00280100", "BitsAllocated", "US", S_IN, "i.bits_allocated", NULL, K_INT, M_NONE, true},
};
#define S_NATTR     (sizeof s_attrs / sizeof s_attrs[0])
#define S_MAX_EXTRA 32

static int s_find_attr(const char *key)
{
    char up[9];
    size_t n = strlen(key);
    bool hex = n == 8;
    for (size_t k = 0; hex && k < 8; k++)
        hex = isxdigit((unsigned char)key[k]) != 0;
    if (hex) {
        for (size_t k = 0; k < 8; k++)
            up[k] = (char)toupper((unsigned char)key[k]);
        up[8] = 0;
    }
    for (size_t a = 0; a < S_NATTR; a++)
        if (hex ? !strcmp(s_attrs[a].tag, up) : !strcmp(s_attrs[a].keyword, key)) return (int)a;
    return -1;
}

static bool s_is_tag(const char *key)
{
    if (strlen(key) != 8) return false;
    for (size_t k = 0; k < 8; k++)
        if (!isxdigit((unsigned char)key[k])) return false;
    return true;
}

/* ---- value checks -------------------------------------------------------------------------- */
bool kp_qido_valid_uid(const char *s, size_t len)
{
    if (len == 0 || len > 64 || s[0] == '.' || s[len - 1] == '.') return false;
    for (size_t k = 0; k < len; k++) {
        if (s[k] == '.') {
            if (s[k + 1] == '.') return false;
        } else if (!isdigit((unsigned char)s[k])) {
            return false;
        }
    }
    return true;
}

static bool s_valid_date(const char *s, size_t len)
{
    if (len != 8) return false;
    for (size_t k = 0; k < 8; k++)
        if (!isdigit((unsigned char)s[k])) return false;
    return true;
}

static bool s_valid_time(const char *s, size_t len)
{
    if (len < 2 || len > 13) return false;
    size_t k = 0;
    while (k < len && isdigit((unsigned char)s[k]))
        k++;
    if (k < 2 || k > 6 || (k % 2)) return false;
    if (k == len) return true;
    if (s[k] != '.' || k != 6 || k + 1 == len) return false;
    for (k++; k < len; k++)
        if (!isdigit((unsigned char)s[k])) return false;
    return true;
}

static bool s_valid_int(const char *s)
{
    size_t k = (*s == '-' || *s == '+') ? 1 : 0;
    size_t n = strlen(s + k);
    if (n == 0 || n > 9) return false;
    for (; s[k]; k++)
        if (!isdigit((unsigned char)s[k])) return false;
    return true;
}

static bool s_valid_cs(const char *s, size_t len)
{
    if (len == 0 || len > 16) return false;
    for (size_t k = 0; k < len; k++)
        if (!(isupper((unsigned char)s[k]) || isdigit((unsigned char)s[k]) || s[k] == '_' ||
              s[k] == ' '))
            return false;
    return true;
}

char *kp_qido_like_pattern(const char *v)
{
    size_t n = strlen(v);
    char *out = malloc(2 * n + 1);
    if (!out) abort();
    char *o = out;
    for (; *v; v++) {
        switch (*v) {
        case '*':
            *o++ = '%';
            break;
        case '?':
            *o++ = '_';
            break;
        case '%':
        case '_':
        case '\\':
            *o++ = '\\';
            *o++ = *v;
            break;
        default:
            *o++ = *v;
        }
    }
    *o = 0;
    return out;
}

/* LIKE-escapes a value without turning anything into a wildcard. */
static char *s_like_literal(const char *v)
{
    size_t n = strlen(v);
    char *out = malloc(2 * n + 1);
    if (!out) abort();
    char *o = out;
    for (; *v; v++) {
        if (*v == '%' || *v == '_' || *v == '\\') *o++ = '\\';
        *o++ = *v;
    }
    *o = 0;
    return out;
}

static int s_hex(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool s_url_decode(char *s, bool plus_is_space)
{
    char *o = s;
    for (char *p = s; *p; p++) {
        if (*p == '+' && plus_is_space) {
            *o++ = ' ';
        } else if (*p == '%') {
            int h = p[1] ? s_hex(p[1]) : -1, l = (h >= 0 && p[2]) ? s_hex(p[2]) : -1;
            if (h < 0 || l < 0 || (h == 0 && l == 0)) return false;
            *o++ = (char)(h * 16 + l);
            p += 2;
        } else {
            *o++ = *p;
        }
    }
    *o = 0;
    return true;
}

bool kp_qido_url_decode(char *s)
{
    return s_url_decode(s, true);
}

bool kp_path_url_decode(char *s)
{
    return s_url_decode(s, false);
}

/* ---- building ------------------------------------------------------------------------------ */
typedef struct {
    kp_qido_t *q;
    s_buf_t where;
    s_buf_t warn;
    bool selected[S_NATTR];
    bool matched[S_NATTR];
    char extra[S_MAX_EXTRA][9];
    int nextra;
    char *err;
    size_t errlen;
} s_state_t;

static int s_param(s_state_t *st, char *owned)
{
    if (st->q->nparams >= KP_QIDO_MAX_PARAMS) {
        free(owned);
        return -1;
    }
    st->q->params[st->q->nparams++] = owned;
    return st->q->nparams;
}

static char *s_dup(const char *s, size_t n)
{
    char *d = strndup(s, n);
    if (!d) abort();
    return d;
}

static void s_warn(s_state_t *st, const char *fmt, const char *what)
{
    /* Only printable ASCII without quotes reaches a header. */
    char clean[65];
    size_t k = 0;
    for (const char *p = what; *p && k < 64; p++)
        clean[k++] = (*p >= 0x20 && *p < 0x7f && *p != '"' && *p != '\\') ? *p : '?';
    clean[k] = 0;
    if (st->warn.len) s_add(&st->warn, "; ");
    s_add(&st->warn, fmt, clean);
}

static int s_bad(s_state_t *st, const char *fmt, const char *a, const char *b)
{
    snprintf(st->err, st->errlen, fmt, a, b);
    return KP_EINVAL;
}

#define S_PARAM_OR_FAIL(st, n, value)                                                              \
    do {                                                                                           \
        (n) = s_param((st), (value));                                                              \
        if ((n) < 0) return s_bad((st), "too many query parameters%s%s", "", "");                  \
    } while (0)

static int s_match_range(s_state_t *st, const struct s_attr *a, const char *v)
{
    bool time = a->match == M_TIME;
    bool (*valid)(const char *, size_t) = time ? s_valid_time : s_valid_date;
    const char *dash = strchr(v, '-');
    int n;
    if (!dash) {
        if (!valid(v, strlen(v))) return s_bad(st, "%s: '%s' is not a valid value", a->keyword, v);
        S_PARAM_OR_FAIL(st, n, s_dup(v, strlen(v)));
        s_add(&st->where, " AND %s = $%d", a->col, n);
        return 0;
    }
    size_t la = (size_t)(dash - v), lb = strlen(dash + 1);
    if ((la == 0 && lb == 0) || (la && !valid(v, la)) || (lb && !valid(dash + 1, lb)))
        return s_bad(st, "%s: '%s' is not a valid range", a->keyword, v);
    if (la) {
        S_PARAM_OR_FAIL(st, n, s_dup(v, la));
        s_add(&st->where, " AND %s >= $%d", a->col, n);
    }
    if (lb) {
        /* A time's upper bound covers everything it is a prefix of (1200 includes 120059.9). */
        char *hi = malloc(lb + 2);
        if (!hi) abort();
        memcpy(hi, dash + 1, lb);
        hi[lb] = time ? '~' : 0;
        hi[lb + 1] = 0;
        S_PARAM_OR_FAIL(st, n, hi);
        s_add(&st->where, " AND %s <= $%d", a->col, n);
    }
    s_add(&st->where, " AND %s <> ''", a->col);
    return 0;
}

static int s_match_list(s_state_t *st, const struct s_attr *a, const char *v, const char *seps,
                        bool (*valid)(const char *, size_t), const char *single_op,
                        const char *list_op)
{
    s_buf_t arr = {0};
    size_t count = 0;
    const char *p = v;
    s_add(&arr, "{");
    for (;;) {
        size_t l = strcspn(p, seps);
        if (!valid(p, l)) {
            free(arr.p);
            char item[80];
            snprintf(item, sizeof item, "%.*s", (int)(l > 70 ? 70 : l), p);
            return s_bad(st, "%s: '%s' is not a valid value", a->keyword, item);
        }
        s_add(&arr, "%s\"%.*s\"", count ? "," : "", (int)l, p);
        count++;
        if (!p[l]) break;
        p += l + 1;
    }
    s_add(&arr, "}");
    int n;
    if (count == 1 && single_op) {
        free(arr.p);
        S_PARAM_OR_FAIL(st, n, s_dup(v, strlen(v)));
        s_add(&st->where, " AND %s %s $%d", a->col, single_op, n);
    } else {
        S_PARAM_OR_FAIL(st, n, arr.p);
        s_add(&st->where, " AND %s %s ($%d::text[])", a->col, list_op, n);
    }
    return 0;
}

static int s_match(s_state_t *st, int ai, const char *v)
{
    const struct s_attr *a = &s_attrs[ai];
    if (st->matched[ai]) return s_bad(st, "%s is given twice%s", a->keyword, "");
    st->matched[ai] = true;
    st->selected[ai] = true;
    if (!*v || !strcmp(v, "*")) return 0; /* universal matching */
    bool wild = strpbrk(v, "*?") != NULL;
    int n;
    switch (a->match) {
    case M_UID:
        return s_match_list(st, a, v, "\\", kp_qido_valid_uid, "=", "= ANY");
    case M_MODS:
        return s_match_list(st, a, v, ",\\", s_valid_cs, NULL, "&&");
    case M_DATE:
    case M_TIME:
        return s_match_range(st, a, v);
    case M_INT:
        if (!s_valid_int(v)) return s_bad(st, "%s: '%s' is not an integer", a->keyword, v);
        S_PARAM_OR_FAIL(st, n, s_dup(v, strlen(v)));
        s_add(&st->where, " AND %s = $%d::int", a->col, n);
        return 0;
    case M_STR:
        S_PARAM_OR_FAIL(st, n, wild ? kp_qido_like_pattern(v) : s_dup(v, strlen(v)));
        s_add(&st->where, " AND %s %s $%d", a->col, wild ? "LIKE" : "=", n);
        return 0;
    case M_STR_CI:
        S_PARAM_OR_FAIL(st, n, wild ? kp_qido_like_pattern(v) : s_dup(v, strlen(v)));
        s_add(&st->where, " AND lower(%s) %s lower($%d)", a->col, wild ? "LIKE" : "=", n);
        return 0;
    case M_PN:
        if (st->q->fuzzy) {
            char fold[64];
            if (a->fold)
                snprintf(fold, sizeof fold, "%s", a->fold);
            else
                snprintf(fold, sizeof fold, "kp_fold(%s)", a->col);
            if (wild) {
                S_PARAM_OR_FAIL(st, n, kp_qido_like_pattern(v));
                s_add(&st->where, " AND %s LIKE kp_fold($%d)", fold, n);
            } else {
                S_PARAM_OR_FAIL(st, n, s_like_literal(v));
                s_add(&st->where, " AND %s LIKE '%%' || kp_fold($%d) || '%%'", fold, n);
            }
        } else {
            S_PARAM_OR_FAIL(st, n, wild ? kp_qido_like_pattern(v) : s_dup(v, strlen(v)));
            s_add(&st->where, " AND lower(%s) %s lower($%d)", a->col, wild ? "LIKE" : "=", n);
        }
        return 0;
    case M_NONE:
        break;
    }
    return 0;
}

static void s_add_extra(s_state_t *st, const char *tag)
{
    char up[9];
    for (int k = 0; k < 8; k++)
        up[k] = (char)toupper((unsigned char)tag[k]);
    up[8] = 0;
    for (int k = 0; k < st->nextra; k++)
        if (!strcmp(st->extra[k], up)) return;
    if (st->nextra < S_MAX_EXTRA) memcpy(st->extra[st->nextra++], up, 9);
}

static int s_includefield(s_state_t *st, char *v)
{
    kp_qido_level_t level = st->q->level;
    for (char *save = NULL, *f = strtok_r(v, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        while (*f == ' ')
            f++;
        if (!*f) continue;
        if (!strcmp(f, "all")) {
            for (size_t a = 0; a < S_NATTR; a++)
                if (s_attrs[a].level <= level) st->selected[a] = true;
            continue;
        }
        int ai = s_find_attr(f);
        if (ai >= 0 && s_attrs[ai].level <= level)
            st->selected[ai] = true;
        else if (ai >= 0)
            s_add_extra(st, s_attrs[ai].tag);
        else if (s_is_tag(f))
            s_add_extra(st, f);
        else
            s_warn(st, "includefield %s is not supported and was ignored", f);
    }
    return 0;
}

static int s_number(s_state_t *st, const char *key, const char *v, long max, long *out)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (!*v || *end || errno || n < 0 || n > max)
        return s_bad(st, "%s: '%s' is not a valid number", key, v);
    *out = n;
    return 0;
}

static void s_value_expr(s_buf_t *b, const struct s_attr *a)
{
    switch (a->kind) {
    case K_CONST:
        s_add(b, "jsonb_build_object('vr','%s','Value',jsonb_build_array(%s))", a->vr, a->col);
        break;
    case K_STR:
        s_add(b,
              "CASE WHEN coalesce(%s,'') = '' THEN '{\"vr\":\"%s\"}'::jsonb ELSE "
              "jsonb_build_object('vr','%s','Value',to_jsonb(string_to_array(%s, '\\'))) END",
              a->col, a->vr, a->vr, a->col);
        break;
    case K_PN:
        s_add(b,
              "CASE WHEN coalesce(%s,'') = '' THEN '{\"vr\":\"PN\"}'::jsonb ELSE "
              "jsonb_build_object('vr','PN','Value',(SELECT jsonb_agg(jsonb_strip_nulls("
              "jsonb_build_object('Alphabetic',nullif(split_part(v,'=',1),''),"
              "'Ideographic',nullif(split_part(v,'=',2),''),"
              "'Phonetic',nullif(split_part(v,'=',3),'')))) "
              "FROM unnest(string_to_array(%s, '\\')) v)) END",
              a->col, a->col);
        break;
    case K_INT:
        s_add(b,
              "CASE WHEN %s IS NULL THEN '{\"vr\":\"%s\"}'::jsonb ELSE "
              "jsonb_build_object('vr','%s','Value',jsonb_build_array(%s)) END",
              a->col, a->vr, a->vr, a->col);
        break;
    case K_ARR:
        s_add(b,
              "CASE WHEN coalesce(cardinality(%s),0) = 0 THEN '{\"vr\":\"%s\"}'::jsonb ELSE "
              "jsonb_build_object('vr','%s','Value',to_jsonb(%s)) END",
              a->col, a->vr, a->vr, a->col);
        break;
    }
}

static int s_parse(s_state_t *st, char *query, long default_limit, long max_limit)
{
    kp_qido_t *q = st->q;
    q->limit = default_limit;
    bool have_limit = false;
    long limit = 0;
    /* fuzzymatching changes how PN keys match wherever it appears: find it first. */
    for (int pass = 0; pass < 2; pass++) {
        char *copy = strdup(query);
        if (!copy) abort();
        int rc = 0;
        for (char *save = NULL, *pair = strtok_r(copy, "&", &save); pair && !rc;
             pair = strtok_r(NULL, "&", &save)) {
            char *eq = strchr(pair, '=');
            char *val = eq ? eq + 1 : pair + strlen(pair);
            if (eq) *eq = 0;
            if (!kp_qido_url_decode(pair) || !kp_qido_url_decode(val)) {
                rc = s_bad(st, "malformed percent-encoding in the query%s%s", "", "");
                break;
            }
            if (!*pair) continue;
            bool fz = !strcmp(pair, "fuzzymatching");
            if (pass == 0) {
                if (fz) {
                    if (!strcmp(val, "true"))
                        q->fuzzy = true;
                    else if (!strcmp(val, "false") || !*val)
                        q->fuzzy = false;
                    else
                        rc = s_bad(st, "fuzzymatching: '%s' is not true or false%s", val, "");
                }
                continue;
            }
            if (fz) continue;
            if (!strcmp(pair, "limit")) {
                rc = s_number(st, "limit", val, 1000000000L, &limit);
                have_limit = true;
            } else if (!strcmp(pair, "offset")) {
                rc = s_number(st, "offset", val, 1000000000L, &q->offset);
            } else if (!strcmp(pair, "includefield")) {
                rc = s_includefield(st, val);
            } else {
                int ai = s_find_attr(pair);
                if (ai < 0) {
                    s_warn(st, "unknown query parameter %s was ignored", pair);
                } else if (s_attrs[ai].level > q->level || s_attrs[ai].match == M_NONE) {
                    s_warn(st, "%s cannot be matched at this level and was ignored",
                           s_attrs[ai].keyword);
                } else {
                    rc = s_match(st, ai, val);
                }
            }
        }
        free(copy);
        if (rc) return rc;
    }
    if (have_limit) {
        if (limit == 0) limit = default_limit;
        if (limit > max_limit) {
            char m[24];
            snprintf(m, sizeof m, "%ld", max_limit);
            s_warn(st, "limit was reduced to %s", m);
            limit = max_limit;
        }
        q->limit = limit;
    }
    return 0;
}

int kp_qido_build(kp_qido_level_t level, const char *study_uid, const char *series_uid,
                  const char *query, long default_limit, long max_limit, kp_qido_t **out, char *err,
                  size_t errlen)
{
    return kp_qido_build_sites(level, study_uid, series_uid, query, default_limit, max_limit, NULL,
                               out, err, errlen);
}

int kp_qido_build_sites(kp_qido_level_t level, const char *study_uid, const char *series_uid,
                        const char *query, long default_limit, long max_limit, const char *sites,
                        kp_qido_t **out, char *err, size_t errlen)
{
    *out = NULL;
    s_state_t st = {.err = err, .errlen = errlen};
    st.q = calloc(1, sizeof *st.q);
    if (!st.q) abort();
    kp_qido_t *q = st.q;
    q->level = level;
    s_buf_t sql = {0};
    int rc = 0, n;
    s_add(&st.where, "true");
    if (study_uid) {
        if (!kp_qido_valid_uid(study_uid, strlen(study_uid))) {
            rc = s_bad(&st, "'%s' is not a valid Study Instance UID%s", study_uid, "");
            goto error;
        }
        n = s_param(&st, s_dup(study_uid, strlen(study_uid)));
        s_add(&st.where, " AND st.study_uid = $%d", n);
    }
    if (series_uid) {
        if (!kp_qido_valid_uid(series_uid, strlen(series_uid))) {
            rc = s_bad(&st, "'%s' is not a valid Series Instance UID%s", series_uid, "");
            goto error;
        }
        n = s_param(&st, s_dup(series_uid, strlen(series_uid)));
        s_add(&st.where, " AND se.series_uid = $%d", n);
    }
    if (sites) { /* only the studies of these sites (the caller's, unless it holds site.all) */
        n = s_param(&st, s_dup(sites, strlen(sites)));
        s_add(&st.where, " AND st.site_id IN (SELECT id FROM sites WHERE name = ANY($%d::text[]))",
              n);
    }
    rc = s_parse(&st, query ? (char *)query : "", default_limit, max_limit);
    if (rc) goto error;

    /* Return attributes: the level's defaults, the defaults of levels the path does not fix,
     * the UIDs that identify the row, matching keys and includefield (already marked). */
    for (size_t a = 0; a < S_NATTR; a++) {
        const struct s_attr *at = &s_attrs[a];
        if (!at->dflt || at->level > level) continue;
        if (at->level == level || (at->level == KP_QIDO_STUDY && !study_uid) ||
            (at->level == KP_QIDO_SERIES && !series_uid))
            st.selected[a] = true;
        if (at->match == M_UID && at->level < level) st.selected[a] = true;
    }

    const char *from, *order, *md;
    switch (level) {
    case KP_QIDO_STUDY:
        from = "studies st";
        order = "st.study_date DESC NULLS LAST, st.study_time DESC NULLS LAST, st.pk DESC";
        md = "m.md";
        break;
    case KP_QIDO_SERIES:
        from = "series se JOIN studies st ON st.pk = se.study_pk";
        order = "st.pk, se.series_number NULLS LAST, se.pk";
        md = "m.md";
        break;
    default:
        from = "instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = "
               "se.study_pk";
        order = "st.pk, se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk";
        md = "i.metadata";
        break;
    }

    s_add(&sql, "SELECT coalesce(json_agg(q.j ORDER BY q.rn), '[]'::json)::text FROM (SELECT "
                "'{}'::jsonb");
    for (size_t a = 0; a < S_NATTR; a++) {
        if (!st.selected[a]) continue;
        s_add(&sql, " || jsonb_build_object('%s', ", s_attrs[a].tag);
        s_value_expr(&sql, &s_attrs[a]);
        s_add(&sql, ")");
    }
    for (int k = 0; k < st.nextra; k++) {
        n = s_param(&st, s_dup(st.extra[k], 8));
        if (n < 0) {
            rc = s_bad(&st, "too many query parameters%s%s", "", "");
            goto error;
        }
        s_add(&sql,
              " || CASE WHEN %s ? $%d THEN jsonb_build_object($%d::text, %s -> $%d) ELSE "
              "'{}'::jsonb END",
              md, n, n, md, n);
    }
    s_add(&sql, " AS j, row_number() OVER (ORDER BY %s) AS rn FROM %s", order, from);
    if (st.nextra && level == KP_QIDO_STUDY)
        s_add(&sql, " LEFT JOIN LATERAL (SELECT i2.metadata AS md FROM series se2 JOIN instances "
                    "i2 ON i2.series_pk = se2.pk WHERE se2.study_pk = st.pk ORDER BY "
                    "se2.series_number NULLS LAST, se2.pk, i2.instance_number NULLS LAST, i2.pk "
                    "LIMIT 1) m ON true");
    else if (st.nextra && level == KP_QIDO_SERIES)
        s_add(&sql, " LEFT JOIN LATERAL (SELECT i2.metadata AS md FROM instances i2 WHERE "
                    "i2.series_pk = se.pk ORDER BY i2.instance_number NULLS LAST, i2.pk LIMIT 1) "
                    "m ON true");
    char lim[24], off[24];
    snprintf(lim, sizeof lim, "%ld", q->limit);
    snprintf(off, sizeof off, "%ld", q->offset);
    int nl = s_param(&st, s_dup(lim, strlen(lim)));
    int no = s_param(&st, s_dup(off, strlen(off)));
    if (nl < 0 || no < 0) {
        rc = s_bad(&st, "too many query parameters%s%s", "", "");
        goto error;
    }
    s_add(&sql, " WHERE %s ORDER BY %s LIMIT $%d::bigint OFFSET $%d::bigint) q", st.where.p, order,
          nl, no);
    q->sql = sql.p;
    q->warning = st.warn.p;
    free(st.where.p);
    *out = q;
    return 0;
error:
    free(sql.p);
    free(st.where.p);
    free(st.warn.p);
    kp_qido_destroy(&q);
    return rc;
}

void kp_qido_destroy(kp_qido_t **qp)
{
    if (!qp || !*qp) return;
    kp_qido_t *q = *qp;
    for (int k = 0; k < q->nparams; k++)
        free(q->params[k]);
    free(q->sql);
    free(q->warning);
    free(q);
    *qp = NULL;
}
