/* kp_api_worklist: the web application's worklist (GET /api/worklist) and the queue/worker
 * screen's data (GET /api/system/status); database worker threads.
 *
 * The worklist is one page of studies with their newest report, in one parameterised statement
 * plus a count. It is site-scoped exactly like QIDO-RS (kp_routes_sites: the user's sites, or all
 * with site.all) and uses the indexes of schema/0001 and 0005: studies_listing for the default
 * order (newest first, read page by page), the trigram index on lower(patient_name) for names,
 * btree indexes for Patient ID, accession and date, the GIN index for ModalitiesInStudy. The
 * report of a study is its most recently changed one (a study rarely has more); its fields are
 * filled only for users holding report.read, everyone else gets "report": null and may not
 * filter by report status (403). */
#include "kp_api.h"

#include "kp_bus.h"
#include "kp_errors.h"
#include "kp_routes.h"

#include <ctype.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_VALUE_MAX 256

/* The newest report of the study (its newest version) for the page's rows. */
#define S_REPORT_JOIN                                                                              \
    " LEFT JOIN LATERAL (SELECT r.id, r.status, r.updated_at, v.version, v.author, v.author_name " \
    "FROM reports r JOIN report_versions v ON v.report_id = r.id WHERE r.study_uid = st.study_uid" \
    " ORDER BY r.updated_at DESC, r.id DESC, v.version DESC LIMIT 1) rep ON $11::bool"

/* The filters: $1 lower-case LIKE pattern of the name, $2 Patient ID, $3 accession, $4 / $5 the
 * date range (YYYYMMDD), $6 modalities (any of), $8 the sites (NULL = all); then one of the
 * report status conditions below on $7 (the status of the study's most recently changed
 * report). The report condition is chosen in C, not folded by an OR in SQL: PostgreSQL turns
 * an EXISTS into a semi-join (or anti-join) only when it stands at the top of the WHERE, and
 * the per-row subplan it makes otherwise is estimated so dear that JIT compilation alone then
 * costs 300 ms. Each variant still names $7, so that all take the same parameters. */
#define S_WHERE(report)                                                                            \
    " WHERE ($1::text IS NULL OR lower(st.patient_name) LIKE lower($1)) AND ($2::text IS NULL OR " \
    "st.patient_id = $2) AND ($3::text IS NULL OR st.accession_number = $3) AND ($4::text IS "     \
    "NULL OR st.study_date >= $4) AND ($5::text IS NULL OR st.study_date <= $5) AND ($6::text[] "  \
    "IS NULL OR st.modalities && $6::text[]) AND ($8::text[] IS NULL OR st.site_id IN (SELECT "    \
    "id FROM sites WHERE name = ANY($8::text[])))" report
#define S_RS_ANY " AND $7::text IS NULL"
#define S_RS_NONE                                                                                  \
    " AND $7::text = 'none' AND NOT EXISTS (SELECT 1 FROM reports r0 WHERE r0.study_uid = "        \
    "st.study_uid)"
#define S_RS_IS                                                                                    \
    " AND EXISTS (SELECT 1 FROM reports r1 WHERE r1.study_uid = st.study_uid AND r1.status = "     \
    "$7::text AND NOT EXISTS (SELECT 1 FROM reports r2 WHERE r2.study_uid = r1.study_uid AND "     \
    "(r2.updated_at, r2.id) > (r1.updated_at, r1.id)))"

#define S_ITEM                                                                                     \
    "json_build_object('study_uid', st.study_uid, 'patient_name', coalesce(st.patient_name, ''), " \
    "'patient_id', coalesce(st.patient_id, ''), 'patient_birth_date', "                            \
    "coalesce(st.patient_birth_date, ''), 'patient_sex', coalesce(st.patient_sex, ''), "           \
    "'accession', coalesce(st.accession_number, ''), 'study_date', coalesce(st.study_date, ''), "  \
    "'study_time', coalesce(st.study_time, ''), 'description', "                                   \
    "coalesce(st.study_description, ''), 'modalities', to_json(st.modalities), 'series', "         \
    "st.num_series, 'instances', st.num_instances, 'site', si.name, 'report', CASE WHEN rep.id "   \
    "IS NULL THEN NULL ELSE json_build_object('id', rep.id, 'status', rep.status, 'version', "     \
    "rep.version, 'updated_at', to_char(rep.updated_at AT TIME ZONE 'UTC', "                       \
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'author', rep.author, 'author_name', rep.author_name) "    \
    "END)"

#define S_PAGE(order, report)                                                                      \
    "SELECT coalesce(json_agg(" S_ITEM " ORDER BY " order "), '[]'::json)::text FROM (SELECT "     \
    "st.* FROM studies st" S_WHERE(                                                                \
        report) " ORDER BY " order " LIMIT $9::int OFFSET "                                        \
                "$10::bigint) st LEFT JOIN sites si ON si.id = st.site_id" S_REPORT_JOIN

#define S_BY_DATE "st.study_date DESC NULLS LAST, st.study_time DESC NULLS LAST, st.pk DESC"
#define S_BY_NAME "lower(st.patient_name) ASC NULLS LAST, st.study_date DESC NULLS LAST, st.pk DESC"

/* [report condition: any, none, a status][sort: date, name] */
static const char *const s_sql_page[3][2] = {
    {S_PAGE(S_BY_DATE, S_RS_ANY), S_PAGE(S_BY_NAME, S_RS_ANY)},
    {S_PAGE(S_BY_DATE, S_RS_NONE), S_PAGE(S_BY_NAME, S_RS_NONE)},
    {S_PAGE(S_BY_DATE, S_RS_IS), S_PAGE(S_BY_NAME, S_RS_IS)},
};
static const char *const s_sql_count[3] = {
    "SELECT count(*) FROM studies st" S_WHERE(S_RS_ANY),
    "SELECT count(*) FROM studies st" S_WHERE(S_RS_NONE),
    "SELECT count(*) FROM studies st" S_WHERE(S_RS_IS),
};

/* A date parameter (YYYY-MM-DD or YYYYMMDD, a real calendar date) as YYYYMMDD into out. */
static bool s_date(const char *in, char out[9])
{
    size_t n = strlen(in);
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        if (isdigit((unsigned char)in[i])) {
            if (k >= 8) return false;
            out[k++] = in[i];
        } else if (!(n == 10 && (i == 4 || i == 7) && in[i] == '-')) {
            return false;
        }
    }
    if (k != 8) return false;
    out[8] = 0;
    int y = (out[0] - '0') * 1000 + (out[1] - '0') * 100 + (out[2] - '0') * 10 + (out[3] - '0');
    int m = (out[4] - '0') * 10 + (out[5] - '0'), d = (out[6] - '0') * 10 + (out[7] - '0');
    if (y < 1800 || m < 1 || m > 12 || d < 1) return false;
    struct tm tm = {.tm_year = y - 1900, .tm_mon = m - 1, .tm_mday = d, .tm_hour = 12};
    time_t t = timegm(&tm);
    struct tm back;
    gmtime_r(&t, &back);
    return back.tm_mday == d && back.tm_mon == m - 1;
}

/* The name filter as a lower-case LIKE pattern: '*' any run, '?' one character, anything else
 * literal; without a wildcard it is a prefix ("ivan" finds "Ivanov^Ivan"). Users type in any
 * case: both sides go through lower() (the trigram index of 0005). False when empty. */
static bool s_name_pattern(const char *in, char *out, size_t outlen)
{
    size_t k = 0;
    bool wild = false;
    for (const char *p = in; *p && k + 3 < outlen; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '*') {
            out[k++] = '%';
            wild = true;
        } else if (c == '?') {
            out[k++] = '_';
            wild = true;
        } else {
            if (c == '%' || c == '_' || c == '\\') out[k++] = '\\';
            out[k++] = (char)c; /* lower-cased by PostgreSQL, Cyrillic included */
        }
    }
    if (!wild && k + 1 < outlen) out[k++] = '%';
    out[k] = 0;
    return k > 0 && strcmp(out, "%") != 0;
}

static void s_answer_text(kp_http_resp_t *resp, int status, char *text)
{
    resp->status = status;
    resp->content_type = "application/json";
    resp->body = text;
    resp->len = strlen(text);
    resp->compressible = true;
}

int kp_api_worklist(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    static const char *const names[] = {"name",    "patient_id", "accession",     "date_from",
                                        "date_to", "modality",   "report_status", "sort"};
    enum { NAME, PID, ACC, DFROM, DTO, MOD, RSTAT, SORT, NNAMES };
    char v[NNAMES][S_VALUE_MAX];
    bool have[NNAMES] = {0};
    for (int i = 0; i < NNAMES; i++) {
        int f = kp_api_query(req->query, names[i], v[i], sizeof v[i]);
        if (f < 0) {
            kp_http_error(resp, KP_EINVAL, 0, "invalid query parameter", names[i]);
            return 0;
        }
        have[i] = f == 1 && v[i][0];
    }
    const char *p[11] = {0};
    char name[2 * S_VALUE_MAX], dfrom[9], dto[9], mods[S_VALUE_MAX + 8], limit[24], offset[24];
    if (have[NAME] && s_name_pattern(v[NAME], name, sizeof name)) p[0] = name;
    if (have[PID]) p[1] = v[PID];
    if (have[ACC]) p[2] = v[ACC];
    if (have[DFROM]) {
        if (!s_date(v[DFROM], dfrom)) {
            kp_http_error(resp, KP_EINVAL, 0, "date_from is YYYY-MM-DD or YYYYMMDD", v[DFROM]);
            return 0;
        }
        p[3] = dfrom;
    }
    if (have[DTO]) {
        if (!s_date(v[DTO], dto)) {
            kp_http_error(resp, KP_EINVAL, 0, "date_to is YYYY-MM-DD or YYYYMMDD", v[DTO]);
            return 0;
        }
        p[4] = dto;
    }
    if (have[MOD]) {
        /* CT or CT,MR: DICOM code strings (upper-case letters, digits, '_'), as a text[] */
        size_t k = (size_t)snprintf(mods, sizeof mods, "{");
        const char *s = v[MOD];
        while (*s) {
            size_t l = strcspn(s, ",");
            bool ok = l >= 1 && l <= 16;
            for (size_t i = 0; i < l && ok; i++)
                ok = isupper((unsigned char)s[i]) || isdigit((unsigned char)s[i]) || s[i] == '_';
            if (!ok) {
                kp_http_error(resp, KP_EINVAL, 0,
                              "modality is a modality code or a comma-separated list of them",
                              "e.g. CT or CT,MR");
                return 0;
            }
            k += (size_t)snprintf(mods + k, sizeof mods - k, "%s%.*s", k > 1 ? "," : "", (int)l, s);
            s += l;
            if (*s == ',') s++;
        }
        snprintf(mods + k, sizeof mods - k, "}");
        p[5] = mods;
    }
    bool reports = kp_auth_allows(env->auth, &req->id, "report.read");
    if (have[RSTAT]) {
        if (strcmp(v[RSTAT], "none") && strcmp(v[RSTAT], "draft") && strcmp(v[RSTAT], "final") &&
            strcmp(v[RSTAT], "amended")) {
            kp_http_error(resp, KP_EINVAL, 0, "report_status is none, draft, final or amended",
                          v[RSTAT]);
            return 0;
        }
        if (!reports) {
            kp_http_error(resp, KP_EPERM, 0, "filtering by report status needs report.read",
                          "permission report.read");
            return 0;
        }
        p[6] = v[RSTAT];
    }
    int rs = !p[6] ? 0 : !strcmp(p[6], "none") ? 1 : 2, by = 0;
    if (have[SORT]) {
        if (!strcmp(v[SORT], "patient_name"))
            by = 1;
        else if (strcmp(v[SORT], "study_date")) {
            kp_http_error(resp, KP_EINVAL, 0, "sort is study_date or patient_name", v[SORT]);
            return 0;
        }
    }
    long lim = 50, off = 0;
    if (kp_api_query_long(req, "limit", 50, 1, 500, &lim) ||
        kp_api_query_long(req, "offset", 0, 0, 100000000L, &off)) {
        kp_http_error(resp, KP_EINVAL, 0, "limit is 1..500, offset a number >= 0", NULL);
        return 0;
    }
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    p[7] = kp_routes_sites(req, sb, sizeof sb);
    snprintf(limit, sizeof limit, "%ld", lim);
    snprintf(offset, sizeof offset, "%ld", off);
    p[8] = limit;
    p[9] = offset;
    p[10] = reports ? "true" : "false";

    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, s_sql_count[rs], 8, p);
    if (rc) return rc;
    char total[24];
    snprintf(total, sizeof total, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    r = NULL;
    rc = kp_db_exec(env->db, &r, s_sql_page[rs][by], 11, p);
    if (rc) return rc;
    size_t il = (size_t)PQgetlength(r, 0, 0);
    size_t cap = il + 128;
    char *out = malloc(cap);
    if (!out) abort();
    snprintf(out, cap, "{\"total\":%s,\"limit\":%ld,\"offset\":%ld,\"items\":%s}", total, lim, off,
             PQgetvalue(r, 0, 0));
    PQclear(r);
    s_answer_text(resp, 200, out);
    return 0;
}

/* ---- GET /api/system/status ---------------------------------------------------------------- */
/* One broker client for the STATS question, shared by the handler threads behind a mutex (the
 * screen asks every few seconds at most). */
static struct {
    pthread_mutex_t mu;
    kp_bus_t *bus;
} s_sys = {.mu = PTHREAD_MUTEX_INITIALIZER};

void kp_api_worklist_shutdown(void)
{
    pthread_mutex_lock(&s_sys.mu);
    kp_bus_destroy(&s_sys.bus);
    pthread_mutex_unlock(&s_sys.mu);
}

int kp_api_system_status(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "SELECT coalesce(json_agg(json_build_object('type', type, 'state', state, 'count', n, "
        "'oldest_pending_s', oldest) ORDER BY type, state), '[]'::json)::text FROM (SELECT type, "
        "state, count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE "
        "state = 'pending')), 0)::int AS oldest FROM jobs GROUP BY type, state) j",
        0, NULL);
    if (rc) return rc;
    json_t *jobs = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
    PQclear(r);
    json_t *st = NULL;
    pthread_mutex_lock(&s_sys.mu);
    if (!s_sys.bus) s_sys.bus = kp_bus_new(env->cfg, "gateway-status");
    int brc = s_sys.bus ? kp_bus_stats(s_sys.bus, &st, 1000) : KP_EBUS;
    /* a timed-out question may leave a late answer in the socket: start afresh next time */
    if (brc) kp_bus_destroy(&s_sys.bus);
    pthread_mutex_unlock(&s_sys.mu);
    json_t *bus = json_object();
    json_object_set_new(bus, "ok", json_boolean(brc == 0));
    if (brc == 0 && st) {
        json_t *q = json_object_get(st, "queues"), *w = json_object_get(st, "workers");
        json_object_set(bus, "queues", q ? q : json_object());
        json_object_set(bus, "workers", w ? w : json_array());
    } else {
        json_object_set_new(bus, "error", json_string(kp_strerror(brc)));
        json_object_set_new(bus, "queues", json_object());
        json_object_set_new(bus, "workers", json_array());
    }
    json_decref(st);
    json_t *j = json_object();
    json_object_set_new(j, "bus", bus);
    json_object_set_new(j, "jobs", jobs ? jobs : json_array());
    kp_http_json_resp(resp, 200, j);
    return 0;
}
