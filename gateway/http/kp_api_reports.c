/* kp_api_reports: doctors' reports — versions, signing, amendments, PDFs and templates
 * (database worker threads; the API is described in docs/reports.md).
 *
 * Design note. The status model is the one of schema/0006_reports.sql: a report has versions;
 * at most one draft (always the newest version) and at most one final version exist at a time.
 * PUT edits the draft; sign turns the draft final (the version it supersedes, if any, becomes
 * 'amended'); amend opens a new draft superseding the final one, with its text. reports.status
 * is 'draft' while the newest version is a draft, 'final' when it is signed, 'amended' when it
 * is signed and replaces an earlier signed text. reports.lock_version is the optimistic lock:
 * each change takes the report row FOR UPDATE, compares the client's lock_version (409 with the
 * current one on a mismatch) and increments it, all in one transaction.
 *
 * Site scope: a report is visible when its study belongs to one of the caller's sites (or she
 * holds site.all); everything else — another site's report, an unknown id, an unknown study — is
 * the same 404, so existence never leaks. Objects are built as JSON by PostgreSQL
 * (json_build_object), as in kp_api_admin.c; the C side validates input.
 *
 * Audit: every change is recorded (kp_audit_emit) inside its transaction, so the change and its
 * audit record commit together; reads (report.view, debounced per user and report, and
 * report.query) are recorded after the answer is built. PDF renders are 'report.pdf' jobs in the
 * jobs outbox, inserted in the transaction that creates the report_pdfs row and then published on
 * this module's own bus connection (the outbox sweep of pacs-busd delivers them otherwise). */
#include "kp_api.h"

#include "kp_audit.h"
#include "kp_auth.h"
#include "kp_bus.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_routes.h"
#include "kp_storage.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* clang-format off: the SQL fragments below are laid out by hand */
#define S_TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

/* The report (alias r) is visible to the sites of parameter sp (a text[] literal, or NULL for
 * every site). */
#define S_VISIBLE(sp)                                                                              \
    "(" sp "::text[] IS NULL OR EXISTS (SELECT 1 FROM studies vs JOIN sites vz ON vz.id = "        \
    "vs.site_id WHERE vs.study_uid = r.study_uid AND vz.name = ANY(" sp "::text[])))"

/* One version (alias v) without / with its text. */
#define S_VER_FIELDS                                                                               \
    "'version', v.version, 'status', v.status, 'supersedes', (SELECT p.version FROM "              \
    "report_versions p WHERE p.id = v.supersedes), 'language', v.language, 'author', v.author, "   \
    "'author_name', v.author_name, 'signed_by', v.signed_by, 'signed_name', v.signed_name, "       \
    "'signed_at', " S_TS("v.signed_at") ", 'created_at', " S_TS(                                   \
        "v.created_at") ", "                                                                       \
                        "'updated_at', " S_TS("v.updated_at")
#define S_VER_SUM "json_build_object(" S_VER_FIELDS ")"
#define S_VER_OBJ "json_build_object(" S_VER_FIELDS ", 'sections', v.sections)"

/* The study of report r (null when it is not in the index, e.g. during a reindex). */
#define S_STUDY_OBJ                                                                                \
    "(SELECT json_build_object('study_uid', s.study_uid, 'patient_id', s.patient_id, "             \
    "'patient_name', s.patient_name, 'patient_birth_date', s.patient_birth_date, "                 \
    "'patient_sex', s.patient_sex, 'study_date', s.study_date, 'study_time', s.study_time, "       \
    "'accession_number', s.accession_number, 'study_description', s.study_description, "           \
    "'modalities', s.modalities, 'site', si.name) FROM studies s JOIN sites si ON si.id = "        \
    "s.site_id WHERE s.study_uid = r.study_uid)"

/* Report r in short (lists): status, versions in play, the signature of the final one. */
#define S_REP_FIELDS                                                                               \
    "'id', r.id, 'study_uid', r.study_uid, 'language', r.language, 'template_id', "                \
    "r.template_id, 'status', r.status, 'lock_version', r.lock_version, 'created_by', "            \
    "r.created_by, 'created_at', " S_TS("r.created_at") ", 'updated_at', " S_TS(                   \
        "r.updated_at") ", 'current_version', (SELECT max(version) FROM report_versions WHERE "    \
                        "report_id = r.id), "                                                      \
                        "'draft_version', (SELECT version FROM report_versions WHERE report_id = " \
                        "r.id AND status = "                                                       \
                        "'draft'), 'final_version', (SELECT version FROM report_versions WHERE "   \
                        "report_id = r.id AND "                                                    \
                        "status = 'final'), 'signed_by', (SELECT signed_by FROM report_versions "  \
                        "WHERE report_id = "                                                       \
                        "r.id AND status = 'final'), 'signed_name', (SELECT signed_name FROM "     \
                        "report_versions WHERE "                                                   \
                        "report_id = r.id AND status = 'final'), 'signed_at', (SELECT " S_TS(      \
                            "signed_at") " FROM "                                                  \
                                         "report_versions WHERE report_id = r.id AND status = "    \
                                         "'final')"
#define S_REP_SUM "json_build_object(" S_REP_FIELDS ")"

/* The whole report r: the summary, its study, the current (newest) version with its text, and
 * the history (every version without text). */
#define S_REP_OBJ                                                                                  \
    "(" S_REP_SUM "::jsonb || jsonb_build_object('study', " S_STUDY_OBJ                            \
    ", 'current', (SELECT " S_VER_OBJ                                                              \
    " FROM report_versions v WHERE v.report_id = r.id ORDER BY v.version DESC LIMIT "              \
    "1), 'versions', coalesce((SELECT json_agg(" S_VER_SUM " ORDER BY v.version) FROM "            \
    "report_versions v WHERE v.report_id = r.id), '[]'::json)))"

#define S_TPL_OBJ                                                                                  \
    "json_build_object('id', t.id, 'name', t.name, 'language', t.language, 'modality', "           \
    "t.modality, 'body_part', t.body_part, 'sections', t.sections, 'created_by', t.created_by, "   \
    "'created_at', " S_TS("t.created_at") ", 'updated_at', " S_TS("t.updated_at") ")"

#define S_DISPLAY_NAME(u)                                                                          \
    "coalesce((SELECT display_name FROM users WHERE lower(username) = lower(" u ")), '')"

/* One lock for template changes (transaction-scoped), so a rename checked to be free stays so. */
#define S_TPL_LOCK "SELECT pg_advisory_xact_lock(7150006)"
/* clang-format on */

#define S_PDF_JOB       "report.pdf"
#define S_SECTION_MAX   65536 /* bytes per section */
#define S_VIEW_WINDOW   300   /* seconds: one report.view record per user and report */
#define S_VIEW_SLOTS    1024
#define S_MAX_STUDIES   500 /* study UIDs in one GET /api/reports?study=... */
#define S_SITES_LEN     (KP_AUTH_MAX_SITES * 70 + 4)
#define S_LANGUAGE_RULE "language is one of en, ru, es, fr, de"

static const char *const s_section_keys[] = {"clinical_information", "technique", "findings",
                                             "impression", "recommendations"};
#define S_NSECTIONS (sizeof s_section_keys / sizeof s_section_keys[0])

/* ---- helpers ------------------------------------------------------------------------------- */

static int s_fail(kp_http_resp_t *resp, int code, const char *msg, const char *detail)
{
    kp_http_error(resp, code, 0, msg, detail);
    return 0;
}

/* 409 with the report's current lock_version next to the usual error members. */
static int s_conflict(kp_http_resp_t *resp, const char *msg, const char *detail, long lock)
{
    json_t *e = json_pack("{s:s, s:s, s:I}", "code", kp_error_slug(KP_ECONFLICT), "message", msg,
                          "lock_version", (json_int_t)lock);
    if (!e) abort();
    if (detail) json_object_set_new(e, "detail", json_string(detail));
    kp_http_json_resp(resp, 409, json_pack("{s:o}", "error", e));
    return 0;
}

/* Text a user typed: valid UTF-8 (jansson checked it), no NUL, no control characters except
 * tab, line feed and carriage return. */
static bool s_text_ok(json_t *v)
{
    const char *s = json_string_value(v);
    if (!s || strlen(s) != json_string_length(v)) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if ((*p < 0x20 && *p != '\t' && *p != '\n' && *p != '\r') || *p == 0x7f) return false;
    return true;
}

/* Validates a sections object: only the five known keys, each a string of at most
 * S_SECTION_MAX bytes of text. Returns a new object holding exactly the keys given (all five,
 * "" for the missing ones, when complete), or NULL with resp answered (400). */
static json_t *s_sections(json_t *v, bool complete, kp_http_resp_t *resp)
{
    char msg[160];
    if (!json_is_object(v)) {
        s_fail(resp, KP_EINVAL, "sections must be an object",
               "keys: clinical_information, technique, findings, impression, recommendations");
        return NULL;
    }
    const char *key;
    json_t *val;
    json_object_foreach(v, key, val)
    {
        bool known = false;
        for (size_t i = 0; i < S_NSECTIONS; i++)
            known = known || !strcmp(key, s_section_keys[i]);
        if (!known) {
            snprintf(msg, sizeof msg, "unknown section \"%.64s\"", key);
            s_fail(resp, KP_EINVAL, msg,
                   "keys: clinical_information, technique, findings, impression, "
                   "recommendations");
            return NULL;
        }
        if (!json_is_string(val) || !s_text_ok(val)) {
            snprintf(msg, sizeof msg,
                     "section %s must be text (a string without control characters)", key);
            s_fail(resp, KP_EINVAL, msg, NULL);
            return NULL;
        }
        if (json_string_length(val) > S_SECTION_MAX) {
            snprintf(msg, sizeof msg, "section %s is longer than %d bytes", key, S_SECTION_MAX);
            s_fail(resp, KP_EINVAL, msg, NULL);
            return NULL;
        }
    }
    json_t *out = json_object();
    if (!out) abort();
    for (size_t i = 0; i < S_NSECTIONS; i++) {
        json_t *s = json_object_get(v, s_section_keys[i]);
        if (s)
            json_object_set(out, s_section_keys[i], s);
        else if (complete)
            json_object_set_new(out, s_section_keys[i], json_string(""));
    }
    return out;
}

/* An optional string member: 0 absent or null (*out NULL), 1 present, -1 invalid (answered). */
static int s_opt_str(json_t *b, const char *key, size_t max, const char **out, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v) || json_string_length(v) > max || !s_text_ok(v)) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s must be a string of at most %zu bytes", key, max);
        kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
        return -1;
    }
    *out = json_string_value(v);
    return 1;
}

/* The optional member language: as s_opt_str, and -1 (answered) when it is not one we know. */
static int s_opt_language(json_t *b, const char **out, kp_http_resp_t *resp)
{
    int f = s_opt_str(b, "language", 8, out, resp);
    if (f > 0 && !kp_api_language_ok(*out)) {
        s_fail(resp, KP_EINVAL, S_LANGUAGE_RULE, *out);
        return -1;
    }
    return f;
}

/* The member lock_version: 1 present (*out), 0 absent, -1 invalid or absent while required
 * (answered). */
static int s_lock_version(json_t *b, bool required, long *out, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, "lock_version");
    if (!v && !required) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 2147483647) {
        kp_http_error(resp, KP_EINVAL, 0,
                      required ? "lock_version is required: the value of the report you edited"
                               : "lock_version must be a positive integer",
                      NULL);
        return -1;
    }
    *out = (long)json_integer_value(v);
    return 1;
}

/* ---- audit --------------------------------------------------------------------------------- */

static struct {
    pthread_mutex_t mu;
    struct {
        char key[100];
        time_t at;
    } slot[S_VIEW_SLOTS];
} s_views = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* True when user viewed report id within S_VIEW_WINDOW (and notes the view otherwise). The
 * editor fetches a report often while a doctor works on it; one record per look is enough. */
static bool s_viewed_recently(const char *user, const char *id)
{
    char key[100];
    snprintf(key, sizeof key, "%.72s|%.24s", user, id);
    size_t h = 5381;
    for (const char *p = key; *p; p++)
        h = h * 33 + (unsigned char)*p;
    h %= S_VIEW_SLOTS;
    time_t now = time(NULL);
    pthread_mutex_lock(&s_views.mu);
    bool recent = !strcmp(s_views.slot[h].key, key) && now - s_views.slot[h].at < S_VIEW_WINDOW;
    if (!recent) {
        snprintf(s_views.slot[h].key, sizeof s_views.slot[h].key, "%s", key);
        s_views.slot[h].at = now;
    }
    pthread_mutex_unlock(&s_views.mu);
    return recent;
}

/* Records action on this worker's connection (inside the open transaction when there is one:
 * then it commits or rolls back with the change). detail is taken over. */
static int s_audit(kp_http_env_t *env, const kp_http_req_t *req, const char *action,
                   const char *study, const char *patient, json_t *detail)
{
    kp_audit_event_t ev = {.action = action,
                           .outcome = "success",
                           .actor = req->id.user,
                           .client = req->peer,
                           .patient_id = patient && *patient ? patient : NULL,
                           .study_uid = study && *study ? study : NULL,
                           .detail = detail};
    int rc = kp_audit_emit(env->db, NULL, &ev);
    json_decref(detail);
    return rc;
}

/* ---- the bus for PDF jobs ------------------------------------------------------------------ */

static struct {
    pthread_mutex_t mu;
    kp_bus_t *bus;
} s_b = {.mu = PTHREAD_MUTEX_INITIALIZER};

void kp_api_reports_shutdown(void)
{
    pthread_mutex_lock(&s_b.mu);
    kp_bus_destroy(&s_b.bus);
    pthread_mutex_unlock(&s_b.mu);
}

/* Publishes the committed job (id, payload). When that fails the job's lease is ended, so the
 * next outbox sweep publishes it (within jobs.sweep_interval). */
static void s_publish(kp_http_env_t *env, const char *id, const char *payload)
{
    kp_msg_t m = {0};
    int rc = kp_msg_init(&m, S_PDF_JOB, atoll(id), json_loads(payload, 0, NULL));
    pthread_mutex_lock(&s_b.mu);
    if (!s_b.bus) {
        s_b.bus = kp_bus_new(env->cfg, "gateway-reports");
        if (s_b.bus) kp_bus_wait_connected(s_b.bus, 500); /* once: connecting is asynchronous */
    }
    if (!rc) rc = s_b.bus ? kp_bus_submit(s_b.bus, &m) : KP_EBUS;
    pthread_mutex_unlock(&s_b.mu);
    kp_msg_clear(&m);
    if (rc) {
        kp_debug("bus", "job %s not published now; the outbox sweep will", id);
        const char *p[] = {id};
        kp_db_run(env->db,
                  "UPDATE jobs SET lease_until = now() WHERE id = $1::bigint AND state = 'pending'",
                  1, p);
    }
}

/* ---- reading ------------------------------------------------------------------------------- */

/* Runs sql, whose single row holds the answer (JSON text) in column 0 and, for study and
 * patient when they are given, the report's Study UID and Patient ID in columns 1 and 2 (for the
 * audit). Answers status, or 404 (msg, detail) when there is no row. */
static int s_answer_row(kp_http_env_t *env, kp_http_resp_t *resp, const char *sql, int n,
                        const char *const *p, int status, const char *msg, const char *detail,
                        char study[72], char patient[72])
{
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, n, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return s_fail(resp, KP_ENOTFOUND, msg, detail);
    }
    kp_api_text_resp(resp, status, PQgetvalue(r, 0, 0));
    if (study) snprintf(study, 72, "%s", PQgetvalue(r, 0, 1));
    if (patient) snprintf(patient, 72, "%s", PQgetvalue(r, 0, 2));
    PQclear(r);
    return 0;
}

/* Answers the whole report id (status), or 404 when the caller cannot see it. When study and
 * patient are given they receive the report's study UID and Patient ID (for the audit). */
static int s_report_answer(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                           const char *id, int status, char study[72], char patient[72])
{
    char sb[S_SITES_LEN];
    const char *p[] = {id, kp_routes_sites(req, sb, sizeof sb)};
    return s_answer_row(env, resp,
                        "SELECT " S_REP_OBJ "::text, r.study_uid, coalesce((SELECT patient_id FROM "
                        "studies WHERE study_uid = r.study_uid), '') FROM reports r WHERE r.id = "
                        "$1::bigint AND " S_VISIBLE("$2"),
                        2, p, status, "no such report", id, study, patient);
}

/* GET /api/reports/{id} */
int kp_api_report_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char study[72] = "", patient[72] = "";
    int rc = s_report_answer(env, req, resp, req->params[0], 200, study, patient);
    if (rc || resp->status != 200) return rc;
    if (!s_viewed_recently(req->id.user, req->params[0]))
        s_audit(env, req, "report.view", study, patient,
                json_pack("{s:I}", "report_id", (json_int_t)atoll(req->params[0])));
    return 0;
}

/* GET /api/reports/{id}/versions/{n} */
int kp_api_report_version(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char sb[S_SITES_LEN];
    const char *p[] = {req->params[0], req->params[1], kp_routes_sites(req, sb, sizeof sb)};
    char study[72] = "", patient[72] = "";
    int rc = s_answer_row(env, resp,
                          "SELECT (" S_VER_OBJ "::jsonb || jsonb_build_object('report_id', r.id, "
                          "'study_uid', r.study_uid))::text, r.study_uid, coalesce((SELECT "
                          "patient_id FROM studies WHERE study_uid = r.study_uid), '') FROM "
                          "reports r JOIN report_versions v ON v.report_id = r.id WHERE r.id = "
                          "$1::bigint AND v.version = $2::int AND " S_VISIBLE("$3"),
                          3, p, 200, "no such report version", req->params[1], study, patient);
    if (rc || resp->status != 200) return rc;
    char key[48];
    snprintf(key, sizeof key, "%.20s/%.20s", req->params[0], req->params[1]);
    if (!s_viewed_recently(req->id.user, key))
        s_audit(env, req, "report.view", study, patient,
                json_pack("{s:I, s:I}", "report_id", (json_int_t)atoll(req->params[0]), "version",
                          (json_int_t)atoll(req->params[1])));
    return 0;
}

/* GET /api/studies/{study}/reports: the study's reports, each with its version history. 404
 * when the study is unknown or of another site (unless reports of it are visible: a study
 * being re-indexed keeps its reports). */
int kp_api_study_reports(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char sb[S_SITES_LEN];
    const char *p[] = {req->params[0], kp_routes_sites(req, sb, sizeof sb)};
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "WITH st AS (SELECT s.study_uid, s.patient_id FROM studies s JOIN sites si ON si.id = "
        "s.site_id WHERE s.study_uid = $1 AND ($2::text[] IS NULL OR si.name = "
        "ANY($2::text[]))), rs AS (SELECT (" S_REP_SUM "::jsonb || jsonb_build_object('versions', "
        "coalesce((SELECT json_agg(" S_VER_SUM " ORDER BY v.version) FROM report_versions v "
        "WHERE v.report_id = r.id), '[]'::json))) AS o, r.id FROM reports r WHERE r.study_uid = "
        "$1 AND " S_VISIBLE("$2") ") SELECT EXISTS (SELECT 1 FROM st) OR EXISTS (SELECT 1 FROM "
                                  "rs), json_build_object('study_uid', $1::text, 'reports', "
                                  "coalesce((SELECT json_agg(o "
                                  "ORDER BY id) FROM rs), '[]'::json))::text, coalesce((SELECT "
                                  "patient_id FROM st), '')",
        2, p);
    if (rc) return rc;
    if (PQgetvalue(r, 0, 0)[0] != 't') {
        PQclear(r);
        return s_fail(resp, KP_ENOTFOUND, "no such study", req->params[0]);
    }
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 1));
    char patient[72];
    snprintf(patient, sizeof patient, "%s", PQgetvalue(r, 0, 2));
    PQclear(r);
    s_audit(env, req, "report.query", req->params[0], patient,
            json_pack("{s:s}", "query", "study"));
    return 0;
}

/* Appends the UIDs of a comma-separated list to a text[] literal; false on a bad UID. */
static bool s_uid_list(const char *list, char *lit, size_t litlen, int *count)
{
    size_t k = (size_t)snprintf(lit, litlen, "{");
    *count = 0;
    for (const char *s = list; *s;) {
        size_t l = strcspn(s, ",");
        if (l == 0 || l > 64 || strspn(s, "0123456789.") < l || s[0] == '.' || s[l - 1] == '.')
            return false;
        for (size_t i = 1; i < l; i++)
            if (s[i] == '.' && s[i - 1] == '.') return false;
        if (++*count > S_MAX_STUDIES || k + l + 4 >= litlen) return false;
        k += (size_t)snprintf(lit + k, litlen - k, "%s\"%.*s\"", *count > 1 ? "," : "", (int)l, s);
        s += l;
        if (*s == ',') s++;
    }
    snprintf(lit + k, litlen - k, "}");
    return true;
}

/* GET /api/reports?study=UID[,UID...]&status=S[,S...]&limit=N&offset=N */
int kp_api_reports_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    size_t cap = (size_t)S_MAX_STUDIES * 68 + 16;
    char *studies = malloc(cap), *lit = malloc(cap);
    if (!studies || !lit) abort();
    char status[64], stlit[64], sb[S_SITES_LEN], ls[24], os[24];
    long limit, offset;
    int n = 0, rc = 0;
    int hs = kp_api_query(req->query, "study", studies, cap);
    int ht = kp_api_query(req->query, "status", status, sizeof status);
    if (hs < 0 || (hs == 1 && !s_uid_list(studies, lit, cap, &n))) {
        rc = s_fail(resp, KP_EINVAL, "study: a comma-separated list of Study Instance UIDs",
                    "at most 500");
        goto out;
    }
    if (ht < 0) {
        rc = s_fail(resp, KP_EINVAL, "status: draft, final or amended (comma-separated)", NULL);
        goto out;
    }
    if (ht == 1) {
        size_t k = (size_t)snprintf(stlit, sizeof stlit, "{");
        int i = 0;
        char *save = NULL;
        for (char *tok = strtok_r(status, ",", &save); tok; tok = strtok_r(NULL, ",", &save), i++) {
            if (strcmp(tok, "draft") && strcmp(tok, "final") && strcmp(tok, "amended")) {
                rc = s_fail(resp, KP_EINVAL, "status: draft, final or amended (comma-separated)",
                            tok);
                goto out;
            }
            k += (size_t)snprintf(stlit + k, sizeof stlit - k, "%s%s", i ? "," : "", tok);
        }
        snprintf(stlit + k, sizeof stlit - k, "}");
    }
    if (kp_api_query_long(req, "limit", 100, 1, 1000, &limit) ||
        kp_api_query_long(req, "offset", 0, 0, 1000000000L, &offset)) {
        rc = s_fail(resp, KP_EINVAL, "bad query parameter", "limit 1..1000 (100); offset >= 0");
        goto out;
    }
    snprintf(ls, sizeof ls, "%ld", limit);
    snprintf(os, sizeof os, "%ld", offset);
    const char *p[] = {hs == 1 ? lit : NULL, ht == 1 ? stlit : NULL,
                       kp_routes_sites(req, sb, sizeof sb), ls, os};
    PGresult *r = NULL;
    rc = kp_db_exec(
        env->db, &r,
        "WITH m AS (SELECT r.* FROM reports r WHERE ($1::text[] IS NULL OR "
        "r.study_uid = ANY($1::text[])) AND ($2::text[] IS NULL OR r.status = "
        "ANY($2::text[])) AND " S_VISIBLE(
            "$3") ") SELECT json_build_object('total', "
                  "(SELECT count(*) FROM m), 'limit', $4::int, 'offset', $5::int, 'items', "
                  "coalesce((SELECT json_agg(o ORDER BY k DESC, id DESC) FROM (SELECT " S_REP_SUM
                  "::jsonb || jsonb_build_object('patient_id', s.patient_id, 'patient_name', "
                  "s.patient_name, 'study_date', s.study_date, 'accession_number', "
                  "s.accession_number, 'modalities', s.modalities) AS o, r.updated_at AS k, "
                  "r.id FROM m r LEFT JOIN studies s ON s.study_uid = r.study_uid ORDER BY "
                  "r.updated_at DESC, r.id DESC LIMIT $4::int OFFSET $5::int) x), "
                  "'[]'::json))::text",
        5, p);
    if (rc) goto out;
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
    PQclear(r);
    s_audit(env, req, "report.query", n == 1 ? studies : NULL, NULL,
            json_pack("{s:s}", "query", req->query ? req->query : ""));
out:
    free(studies);
    free(lit);
    return rc;
}

/* ---- changing ------------------------------------------------------------------------------ */

/* The report row taken FOR UPDATE (inside the caller's transaction), with what the changes
 * need to decide. found false: no such report for this caller (404). */
typedef struct {
    bool found;
    long lock;
    char study[72], patient[72];
    char draft_id[24], final_id[24];
    int draft_ver, final_ver, max_ver, nversions;
    bool draft_supersedes, draft_empty;
} s_rep_t;

static int s_lock_report(kp_http_env_t *env, const kp_http_req_t *req, s_rep_t *o)
{
    memset(o, 0, sizeof *o);
    char sb[S_SITES_LEN];
    const char *p[] = {req->params[0], kp_routes_sites(req, sb, sizeof sb)};
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "SELECT r.lock_version, r.study_uid, coalesce((SELECT patient_id FROM studies WHERE "
        "study_uid = r.study_uid), ''), coalesce(d.id::text, ''), coalesce(d.version, 0), "
        "coalesce(f.id::text, ''), coalesce(f.version, 0), (SELECT coalesce(max(version), 0) "
        "FROM report_versions WHERE report_id = r.id), (SELECT count(*) FROM report_versions "
        "WHERE report_id = r.id), d.supersedes IS NOT NULL, NOT EXISTS (SELECT 1 FROM "
        "jsonb_each_text(coalesce(d.sections, '{}')) e WHERE btrim(e.value, E' \\t\\r\\n') <> "
        "'') FROM reports r LEFT JOIN report_versions d ON d.report_id = r.id AND d.status = "
        "'draft' LEFT JOIN report_versions f ON f.report_id = r.id AND f.status = 'final' WHERE "
        "r.id = $1::bigint AND " S_VISIBLE("$2") " FOR UPDATE OF r",
        2, p);
    if (rc) return rc;
    if (PQntuples(r) == 1) {
        o->found = true;
        o->lock = atol(PQgetvalue(r, 0, 0));
        snprintf(o->study, sizeof o->study, "%s", PQgetvalue(r, 0, 1));
        snprintf(o->patient, sizeof o->patient, "%s", PQgetvalue(r, 0, 2));
        snprintf(o->draft_id, sizeof o->draft_id, "%s", PQgetvalue(r, 0, 3));
        o->draft_ver = atoi(PQgetvalue(r, 0, 4));
        snprintf(o->final_id, sizeof o->final_id, "%s", PQgetvalue(r, 0, 5));
        o->final_ver = atoi(PQgetvalue(r, 0, 6));
        o->max_ver = atoi(PQgetvalue(r, 0, 7));
        o->nversions = atoi(PQgetvalue(r, 0, 8));
        o->draft_supersedes = PQgetvalue(r, 0, 9)[0] == 't';
        o->draft_empty = PQgetvalue(r, 0, 10)[0] == 't';
    }
    PQclear(r);
    return 0;
}

/* Begins the transaction, takes the report and checks the client's lock_version (when given:
 * lock > 0). True: go on. False: stop with *rc, which is 0 when resp is answered (404 / 409) or
 * a negative code. */
static bool s_take(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp, long lock,
                   s_rep_t *o, int *rc)
{
    *rc = kp_db_begin(env->db);
    if (!*rc) *rc = s_lock_report(env, req, o);
    if (*rc) return false;
    if (!o->found) {
        *rc = s_fail(resp, KP_ENOTFOUND, "no such report", req->params[0]);
        return false;
    }
    if (lock > 0 && lock != o->lock) {
        char d[96];
        snprintf(d, sizeof d, "you sent lock_version %ld; the report is at %ld", lock, o->lock);
        *rc = s_conflict(resp, "the report was changed by someone else: reload it", d, o->lock);
        return false;
    }
    return true;
}

/* s_take with the lock_version of an optional body (sign, amend): false with *rc 0 when the
 * body or its lock_version is invalid (answered). */
static bool s_take_body(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                        bool lock_required, s_rep_t *o, int *rc)
{
    *rc = 0;
    json_t *b = kp_api_body_optional(req, resp);
    if (!b) return false;
    long lock = 0;
    bool go =
        s_lock_version(b, lock_required, &lock, resp) >= 0 && s_take(env, req, resp, lock, o, rc);
    json_decref(b);
    return go;
}

static int s_bump(kp_http_env_t *env, const kp_http_req_t *req, const char *status)
{
    const char *p[] = {req->params[0], status};
    return kp_db_run(env->db,
                     "UPDATE reports SET lock_version = lock_version + 1, status = coalesce($2, "
                     "status), updated_at = now() WHERE id = $1::bigint",
                     2, p);
}

/* Commits and answers the whole report (status). */
static int s_finish(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp, int status)
{
    int rc = kp_db_commit(env->db);
    if (rc) return rc;
    return s_report_answer(env, req, resp, req->params[0], status, NULL, NULL);
}

/* POST /api/studies/{study}/reports {language?, template_id?, sections?} */
int kp_api_report_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp), *sections = NULL, *given = NULL;
    if (!b) return 0;
    int rc = 0;
    const char *lang = NULL;
    char *text = NULL, tpl[24] = "", sb[S_SITES_LEN];
    PGresult *r = NULL;
    if (s_opt_language(b, &lang, resp) < 0) goto out;
    json_t *t = json_object_get(b, "template_id");
    if (t && !json_is_null(t)) {
        if (!json_is_integer(t) || json_integer_value(t) < 1) {
            rc = s_fail(resp, KP_EINVAL, "template_id must be a template's id", NULL);
            goto out;
        }
        snprintf(tpl, sizeof tpl, "%lld", (long long)json_integer_value(t));
    }
    json_t *s = json_object_get(b, "sections");
    if (s && !json_is_null(s) && !(given = s_sections(s, false, resp))) goto out;
    for (const char *const *k = (const char *const[]){"id", "status", "lock_version", NULL}; *k;
         k++)
        if (json_object_get(b, *k)) {
            char m[64];
            snprintf(m, sizeof m, "%s cannot be set", *k);
            rc = s_fail(resp, KP_EINVAL, m, NULL);
            goto out;
        }
    sections = json_object();
    if (!sections) abort();
    for (size_t i = 0; i < S_NSECTIONS; i++)
        json_object_set_new(sections, s_section_keys[i], json_string(""));
    const char *lang_from = NULL;
    char tlang[8] = "";
    if ((rc = kp_db_begin(env->db))) goto out;
    const char *ps[] = {req->params[0], kp_routes_sites(req, sb, sizeof sb)};
    if ((rc = kp_db_exec(env->db, &r,
                         "SELECT coalesce(s.patient_id, '') FROM studies s JOIN sites si ON si.id "
                         "= s.site_id WHERE s.study_uid = $1 AND ($2::text[] IS NULL OR si.name = "
                         "ANY($2::text[]))",
                         2, ps)))
        goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such study", req->params[0]);
        goto out;
    }
    char patient[72];
    snprintf(patient, sizeof patient, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    r = NULL;
    if (tpl[0]) {
        const char *pt[] = {tpl};
        if ((rc = kp_db_exec(env->db, &r,
                             "SELECT language, sections::text FROM report_templates WHERE id = "
                             "$1::bigint",
                             1, pt)))
            goto out;
        if (PQntuples(r) != 1) {
            rc = s_fail(resp, KP_EINVAL, "no such template", tpl);
            goto out;
        }
        snprintf(tlang, sizeof tlang, "%s", PQgetvalue(r, 0, 0));
        json_t *ts = json_loads(PQgetvalue(r, 0, 1), 0, NULL);
        for (size_t i = 0; i < S_NSECTIONS; i++) {
            json_t *v = json_object_get(ts, s_section_keys[i]);
            if (json_is_string(v)) json_object_set(sections, s_section_keys[i], v);
        }
        json_decref(ts);
        PQclear(r);
        r = NULL;
        lang_from = tlang;
    }
    if (given) json_object_update(sections, given);
    text = json_dumps(sections, JSON_COMPACT);
    if (!text) abort();
    const char *pi[] = {req->params[0], lang ? lang : lang_from, tpl[0] ? tpl : NULL, req->id.user,
                        text};
    if ((rc = kp_db_exec(
             env->db, &r,
             "WITH l AS (SELECT coalesce($2, (SELECT language FROM users WHERE lower(username) = "
             "lower($4)), 'en') AS language), n AS (INSERT INTO reports (study_uid, language, "
             "template_id, created_by) SELECT $1, l.language, $3::bigint, $4 FROM l RETURNING "
             "id, language) INSERT INTO report_versions (report_id, version, sections, language, "
             "author, author_name) SELECT n.id, 1, $5::jsonb, n.language, $4, " S_DISPLAY_NAME(
                 "$4") " FROM n RETURNING report_id",
             5, pi)))
        goto out;
    char id[24];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    r = NULL;
    json_t *d = json_pack("{s:I}", "report_id", (json_int_t)atoll(id));
    if (tpl[0]) json_object_set_new(d, "template_id", json_integer(atoll(tpl)));
    if ((rc = s_audit(env, req, "report.create", req->params[0], patient, d)) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    kp_info("reports", "%s created report %s of study %s", req->id.user, id, req->params[0]);
    rc = s_report_answer(env, req, resp, id, 201, NULL, NULL);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    free(text);
    json_decref(sections);
    json_decref(given);
    json_decref(b);
    return rc;
}

/* PUT /api/reports/{id} {lock_version, sections?, language?}: edits the draft. sections may
 * hold some of the keys; the others keep their text. */
int kp_api_report_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp), *given = NULL;
    if (!b) return 0;
    int rc = 0;
    long lock = 0;
    const char *lang = NULL;
    char *text = NULL;
    s_rep_t o;
    if (s_lock_version(b, true, &lock, resp) < 0 || s_opt_language(b, &lang, resp) < 0) goto out;
    json_t *s = json_object_get(b, "sections");
    if (s && !(given = s_sections(s, false, resp))) goto out;
    if (!given && !lang) {
        rc = s_fail(resp, KP_EINVAL, "nothing to change: send sections and/or language", NULL);
        goto out;
    }
    if (!s_take(env, req, resp, lock, &o, &rc)) goto out;
    if (!o.draft_id[0]) {
        rc = s_conflict(resp, "the report is signed: amend it to change it",
                        "POST /api/reports/{id}/amend opens a new draft version", o.lock);
        goto out;
    }
    text = given ? json_dumps(given, JSON_COMPACT) : strdup("{}");
    if (!text) abort();
    const char *p[] = {o.draft_id, text, lang, req->id.user};
    if ((rc = kp_db_run(env->db,
                        "UPDATE report_versions SET sections = sections || $2::jsonb, language = "
                        "coalesce($3, language), author = $4, author_name = " S_DISPLAY_NAME(
                            "$4") ", updated_at = now() WHERE id = $1::bigint",
                        4, p)))
        goto out;
    if (lang) {
        const char *q[] = {req->params[0], lang};
        if ((rc = kp_db_run(env->db, "UPDATE reports SET language = $2 WHERE id = $1::bigint", 2,
                            q)))
            goto out;
    }
    if ((rc = s_bump(env, req, NULL))) goto out;
    json_t *keys = json_array();
    const char *k;
    json_t *v;
    json_object_foreach(given, k, v) json_array_append_new(keys, json_string(k));
    json_t *d =
        json_pack("{s:I, s:i, s:I, s:o}", "report_id", (json_int_t)atoll(req->params[0]), "version",
                  o.draft_ver, "lock_version", (json_int_t)(o.lock + 1), "sections", keys);
    if (lang) json_object_set_new(d, "language", json_string(lang));
    if ((rc = s_audit(env, req, "report.update", o.study, o.patient, d))) goto out;
    rc = s_finish(env, req, resp, 200);
out:
    kp_db_rollback(env->db);
    free(text);
    json_decref(given);
    json_decref(b);
    return rc;
}

/* POST /api/reports/{id}/sign {lock_version}: the draft becomes final, signed by the caller. */
int kp_api_report_sign(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    int rc = 0;
    s_rep_t o;
    if (!s_take_body(env, req, resp, true, &o, &rc)) goto out;
    if (!o.draft_id[0]) {
        rc = s_conflict(resp, "nothing to sign: the report has no draft",
                        "it is signed already; amend it to change it", o.lock);
        goto out;
    }
    if (o.draft_empty) {
        rc = s_fail(resp, KP_EINVAL, "an empty report cannot be signed",
                    "write at least one section");
        goto out;
    }
    const char *p[] = {o.draft_id, req->id.user};
    if ((rc = kp_db_run(env->db,
                        "WITH old AS (UPDATE report_versions SET status = 'amended', updated_at = "
                        "now() WHERE id = (SELECT supersedes FROM report_versions WHERE id = "
                        "$1::bigint) AND status = 'final') UPDATE report_versions SET status = "
                        "'final', signed_by = $2, signed_name = " S_DISPLAY_NAME(
                            "$2") ", signed_at = now(), updated_at = now() WHERE id = $1::bigint",
                        2, p)) ||
        (rc = s_bump(env, req, o.draft_supersedes ? "amended" : "final")))
        goto out;
    json_t *d = json_pack("{s:I, s:i}", "report_id", (json_int_t)atoll(req->params[0]), "version",
                          o.draft_ver);
    if (o.draft_supersedes) json_object_set_new(d, "supersedes", json_integer(o.final_ver));
    if ((rc = s_audit(env, req, "report.sign", o.study, o.patient, d))) goto out;
    kp_info("reports", "%s signed report %s version %d", req->id.user, req->params[0], o.draft_ver);
    rc = s_finish(env, req, resp, 200);
out:
    kp_db_rollback(env->db);
    return rc;
}

/* POST /api/reports/{id}/amend {lock_version?}: a new draft version with the final text,
 * superseding the final version. */
int kp_api_report_amend(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    int rc = 0;
    s_rep_t o;
    if (!s_take_body(env, req, resp, false, &o, &rc)) goto out;
    if (o.draft_id[0] || !o.final_id[0]) {
        rc = s_conflict(resp,
                        o.draft_supersedes ? "an amendment of this report is open already"
                                           : "the report is not signed yet: edit its draft",
                        "only a signed report without a draft can be amended", o.lock);
        goto out;
    }
    char ver[16];
    snprintf(ver, sizeof ver, "%d", o.max_ver + 1);
    const char *p[] = {req->params[0], ver, o.final_id, req->id.user};
    if ((rc = kp_db_run(env->db,
                        "INSERT INTO report_versions (report_id, version, supersedes, sections, "
                        "language, author, author_name) SELECT $1::bigint, $2::int, f.id, "
                        "f.sections, f.language, $4, " S_DISPLAY_NAME(
                            "$4") " FROM report_versions f WHERE f.id = $3::bigint",
                        4, p)) ||
        (rc = s_bump(env, req, "draft")))
        goto out;
    json_t *d = json_pack("{s:I, s:i, s:i}", "report_id", (json_int_t)atoll(req->params[0]),
                          "version", o.max_ver + 1, "supersedes", o.final_ver);
    if ((rc = s_audit(env, req, "report.amend", o.study, o.patient, d))) goto out;
    kp_info("reports", "%s amends report %s (version %d supersedes %d)", req->id.user,
            req->params[0], o.max_ver + 1, o.final_ver);
    rc = s_finish(env, req, resp, 201);
out:
    kp_db_rollback(env->db);
    return rc;
}

/* DELETE /api/reports/{id}[?lock_version=N]: only a report that was never signed (its only
 * version is a draft). */
int kp_api_report_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    long lock = 0;
    if (kp_api_query_long(req, "lock_version", 0, 1, 2147483647L, &lock))
        return s_fail(resp, KP_EINVAL, "lock_version must be a positive integer", NULL);
    s_rep_t o;
    int rc = 0;
    if (!s_take(env, req, resp, lock, &o, &rc)) goto out;
    if (o.nversions != 1 || !o.draft_id[0]) {
        rc = s_conflict(resp, "a signed report cannot be deleted",
                        "only a report whose only version is a draft can be deleted; amend a "
                        "signed one",
                        o.lock);
        goto out;
    }
    const char *p[] = {req->params[0]};
    if ((rc = kp_db_run(env->db, "DELETE FROM reports WHERE id = $1::bigint", 1, p))) goto out;
    if ((rc = s_audit(env, req, "report.delete", o.study, o.patient,
                      json_pack("{s:I}", "report_id", (json_int_t)atoll(req->params[0])))) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    kp_info("reports", "%s deleted draft report %s", req->id.user, req->params[0]);
    resp->status = 204;
out:
    kp_db_rollback(env->db);
    return rc;
}

/* ---- PDFs ---------------------------------------------------------------------------------- */

/* The optional ?version=N of the PDF routes, as text in vs ("" when absent). False when it is
 * invalid (answered: 400). */
static bool s_version_param(const kp_http_req_t *req, kp_http_resp_t *resp, char vs[16])
{
    long version = 0;
    vs[0] = 0;
    if (kp_api_query_long(req, "version", 0, 1, 2147483647L, &version)) {
        s_fail(resp, KP_EINVAL, "version must be a version number", NULL);
        return false;
    }
    if (version) snprintf(vs, 16, "%ld", version);
    return true;
}

/* POST /api/reports/{id}/pdf[?version=N]: asks pacs-reporter to render the final version (or
 * signed version N). 202 {pdf_id, job_id, state, report_id, version}; a render of that version
 * that is still pending is answered instead of queueing a second one. */
int kp_api_report_pdf_request(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char vs[16], job[24] = "", payload[64] = "";
    if (!s_version_param(req, resp, vs)) return 0;
    s_rep_t o;
    PGresult *r = NULL;
    int rc = 0;
    if (!s_take(env, req, resp, 0, &o, &rc)) goto out;
    const char *pv[] = {req->params[0], vs[0] ? vs : NULL};
    if ((rc = kp_db_exec(env->db, &r,
                         "SELECT id, version, status FROM report_versions WHERE report_id = "
                         "$1::bigint AND (CASE WHEN $2::int IS NULL THEN status = 'final' ELSE "
                         "version = $2::int END)",
                         2, pv)))
        goto out;
    if (PQntuples(r) != 1) {
        rc = vs[0] ? s_fail(resp, KP_ENOTFOUND, "no such report version", vs)
                   : s_conflict(resp, "the report has no signed version to render", "sign it first",
                                o.lock);
        goto out;
    }
    if (!strcmp(PQgetvalue(r, 0, 2), "draft")) {
        rc = s_conflict(resp, "a draft is not rendered: sign it first",
                        "only signed versions become PDFs", o.lock);
        goto out;
    }
    char vid[24], vnum[16];
    snprintf(vid, sizeof vid, "%s", PQgetvalue(r, 0, 0));
    snprintf(vnum, sizeof vnum, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    r = NULL;
    char lease[24];
    snprintf(lease, sizeof lease, "%ld", env->cfg->jobs_lease);
    /* the request id travels with the job into the reporter's log lines (rid=...) */
    const char *pp[] = {vid, req->id.user, lease, req->request_id};
    /* A pending render of this version whose job is still alive is reused; otherwise one
     * statement makes the report_pdfs row and its outbox job (ids drawn first, so each refers
     * to the other). */
    if ((rc = kp_db_exec(
             env->db, &r,
             "WITH old AS (SELECT p.id, p.job_id FROM report_pdfs p JOIN jobs j ON j.id = "
             "p.job_id WHERE p.version_id = $1::bigint AND p.state = 'pending' AND j.state = "
             "'pending' ORDER BY p.id DESC LIMIT 1), ids AS (SELECT nextval('report_pdfs_id_seq') "
             "AS pid, nextval('jobs_id_seq') AS jid WHERE NOT EXISTS (SELECT 1 FROM old)), p AS "
             "(INSERT INTO report_pdfs (id, version_id, job_id, requested_by) SELECT pid, "
             "$1::bigint, jid, $2 FROM ids), j AS (INSERT INTO jobs (id, type, payload, "
             "lease_until) SELECT jid, '" S_PDF_JOB "', jsonb_strip_nulls(jsonb_build_object("
             "'pdf_id', pid, 'rid', nullif($4, ''))), now() "
             "+ make_interval(secs => $3::int) FROM ids RETURNING id, payload::text) SELECT "
             "pid, jid, true, (SELECT payload FROM j) FROM ids UNION ALL SELECT id, job_id, "
             "false, NULL FROM old",
             4, pp)))
        goto out;
    if (PQntuples(r) != 1) {
        rc = KP_EDB;
        goto out;
    }
    char pdf[24];
    snprintf(pdf, sizeof pdf, "%s", PQgetvalue(r, 0, 0));
    bool fresh = PQgetvalue(r, 0, 2)[0] == 't';
    if (fresh) {
        snprintf(job, sizeof job, "%s", PQgetvalue(r, 0, 1));
        snprintf(payload, sizeof payload, "%s", PQgetvalue(r, 0, 3));
    }
    json_t *d =
        json_pack("{s:I, s:I, s:I, s:s}", "report_id", (json_int_t)atoll(req->params[0]), "version",
                  (json_int_t)atoll(vnum), "pdf_id", (json_int_t)atoll(pdf), "step", "request");
    json_t *out = json_pack("{s:I, s:I, s:s, s:I, s:I}", "pdf_id", (json_int_t)atoll(pdf), "job_id",
                            (json_int_t)atoll(PQgetvalue(r, 0, 1)), "state", "pending", "report_id",
                            (json_int_t)atoll(req->params[0]), "version", (json_int_t)atoll(vnum));
    PQclear(r);
    r = NULL;
    if ((rc = s_audit(env, req, "report.export", o.study, o.patient, d)) ||
        (rc = kp_db_commit(env->db))) {
        json_decref(out);
        goto out;
    }
    if (fresh) s_publish(env, job, payload);
    kp_http_json_resp(resp, 202, out);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    return rc;
}

/* A path from report_pdfs.path is used only when it is relative and harmless: [A-Za-z0-9_.-/],
 * no empty, "." or ".." component. */
static bool s_safe_relpath(const char *p)
{
    if (!*p || *p == '/' || strlen(p) > 512) return false;
    static const char ok[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/";
    if (strspn(p, ok) != strlen(p)) return false;
    for (const char *s = p; *s;) {
        size_t l = strcspn(s, "/");
        if (l == 0 || (l == 1 && s[0] == '.') || (l == 2 && s[0] == '.' && s[1] == '.'))
            return false;
        s += l;
        if (*s == '/') s++;
        if (*s == 0 && s[-1] == '/') return false;
    }
    return true;
}

/* GET /api/reports/{id}/pdf[?version=N]: the newest rendered PDF of the final version (or of
 * signed version N): 200 application/pdf, 202 {"state": "pending", ...} while it renders, 404
 * when there is none (the message says whether rendering failed). */
int kp_api_report_pdf_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char vs[16], sb[S_SITES_LEN];
    if (!s_version_param(req, resp, vs)) return 0;
    const char *p[] = {req->params[0], vs[0] ? vs : NULL, kp_routes_sites(req, sb, sizeof sb)};
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "SELECT v.version, p.id, p.state, coalesce(p.path, ''), coalesce(p.error, ''), "
        "r.study_uid, coalesce((SELECT patient_id FROM studies WHERE study_uid = r.study_uid), "
        "'') FROM reports r JOIN report_versions v ON v.report_id = r.id AND v.status <> 'draft' "
        "AND (CASE WHEN $2::int IS NULL THEN v.status = 'final' ELSE v.version = $2::int END) "
        "LEFT JOIN LATERAL (SELECT * FROM report_pdfs x WHERE x.version_id = v.id ORDER BY "
        "x.state = 'done' DESC, x.state = 'pending' DESC, x.id DESC LIMIT 1) p ON true WHERE "
        "r.id = $1::bigint AND " S_VISIBLE("$3"),
        3, p);
    if (rc) return rc;
    if (PQntuples(r) != 1 || PQgetisnull(r, 0, 1)) {
        PQclear(r);
        return s_fail(resp, KP_ENOTFOUND, "no PDF of this report",
                      "sign the report and POST /api/reports/{id}/pdf to render one");
    }
    const char *state = PQgetvalue(r, 0, 2);
    if (!strcmp(state, "pending")) {
        kp_http_json_resp(resp, 202,
                          json_pack("{s:s, s:I, s:I}", "state", "pending", "pdf_id",
                                    (json_int_t)atoll(PQgetvalue(r, 0, 1)), "version",
                                    (json_int_t)atoll(PQgetvalue(r, 0, 0))));
        PQclear(r);
        return 0;
    }
    if (strcmp(state, "done")) {
        rc = s_fail(resp, KP_ENOTFOUND, "rendering the PDF failed", PQgetvalue(r, 0, 4));
        PQclear(r);
        return rc;
    }
    const char *rel = PQgetvalue(r, 0, 3);
    char *abs = NULL;
    struct stat sta;
    if (!s_safe_relpath(rel) || !(abs = kp_storage_abspath(env->st, rel)) || stat(abs, &sta) != 0 ||
        !S_ISREG(sta.st_mode)) {
        kp_error("reports", "PDF %s of report %s: file %s is missing or not a safe path",
                 PQgetvalue(r, 0, 1), req->params[0], rel);
        free(abs);
        PQclear(r);
        return s_fail(resp, KP_EIO, "the PDF file is missing from storage", NULL);
    }
    kp_http_seg_file(resp, abs, 0, (int64_t)sta.st_size, (int64_t)sta.st_size);
    free(abs);
    resp->status = 200;
    resp->content_type = "application/pdf";
    snprintf(resp->content_disposition, sizeof resp->content_disposition,
             "attachment; filename=\"report-%s-v%s.pdf\"", req->params[0], PQgetvalue(r, 0, 0));
    char study[72], patient[72];
    snprintf(study, sizeof study, "%s", PQgetvalue(r, 0, 5));
    snprintf(patient, sizeof patient, "%s", PQgetvalue(r, 0, 6));
    json_t *d = json_pack("{s:I, s:I, s:I, s:s}", "report_id", (json_int_t)atoll(req->params[0]),
                          "version", (json_int_t)atoll(PQgetvalue(r, 0, 0)), "pdf_id",
                          (json_int_t)atoll(PQgetvalue(r, 0, 1)), "step", "download");
    PQclear(r);
    s_audit(env, req, "report.export", study, patient, d);
    return 0;
}

/* GET /api/report-pdfs/{pdf_id}: the state of one render (for progress in the UI). */
int kp_api_report_pdf_state(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char sb[S_SITES_LEN];
    const char *p[] = {req->params[0], kp_routes_sites(req, sb, sizeof sb)};
    return s_answer_row(
        env, resp,
        "SELECT json_build_object('pdf_id', p.id, 'report_id', r.id, 'version', v.version, "
        "'state', p.state, 'error', p.error, 'size', p.size, 'sha256', p.sha256, 'sop_uid', "
        "p.sop_uid, 'job_id', p.job_id, 'job_state', (SELECT state FROM jobs WHERE id = "
        "p.job_id), 'requested_by', p.requested_by, 'created_at', " S_TS(
            "p.created_at") ", "
                            "'updated_at', " S_TS(
                                "p.updated_at") ")::text FROM report_pdfs p JOIN report_versions "
                                                "v ON v.id = p.version_id JOIN reports r ON r.id = "
                                                "v.report_id WHERE p.id = $1::bigint "
                                                "AND " S_VISIBLE("$2"),
        2, p, 200, "no such PDF", req->params[0], NULL, NULL);
}

/* ---- templates ----------------------------------------------------------------------------- */

/* DICOM code strings for modality and body part: '' (any) or upper-case letters, digits, space
 * and underscore, at most 16 characters. */
static bool s_cs_ok(const char *s)
{
    return strlen(s) <= 16 && strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _") == strlen(s);
}

static int s_template_answer(kp_http_env_t *env, kp_http_resp_t *resp, const char *id, int status)
{
    const char *p[] = {id};
    return s_answer_row(env, resp,
                        "SELECT " S_TPL_OBJ "::text FROM report_templates t WHERE t.id = "
                        "$1::bigint",
                        1, p, status, "no such template", id, NULL, NULL);
}

/* GET /api/report-templates?modality=&body_part=&language= : templates for that modality or
 * any (''), most specific first. */
int kp_api_templates_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char v[3][64];
    const char *names[] = {"modality", "body_part", "language"};
    const char *p[3] = {0};
    for (int i = 0; i < 3; i++) {
        int f = kp_api_query(req->query, names[i], v[i], sizeof v[i]);
        if (f < 0) return s_fail(resp, KP_EINVAL, "invalid query parameter", names[i]);
        if (f && v[i][0]) p[i] = v[i];
    }
    if ((p[0] && !s_cs_ok(p[0])) || (p[1] && !s_cs_ok(p[1])))
        return s_fail(resp, KP_EINVAL, "modality and body_part are DICOM code strings",
                      "upper-case letters, digits, space and _, at most 16");
    if (p[2] && !kp_api_language_ok(p[2])) return s_fail(resp, KP_EINVAL, S_LANGUAGE_RULE, p[2]);
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT json_build_object('templates', coalesce(json_agg(" S_TPL_OBJ
                        " ORDER BY t.modality = '', t.body_part = '', t.name, t.language), "
                        "'[]'::json))::text FROM report_templates t WHERE ($1::text IS NULL OR "
                        "t.modality IN ('', $1)) AND ($2::text IS NULL OR t.body_part IN ('', "
                        "$2)) AND ($3::text IS NULL OR t.language = $3)",
                        3, p);
    if (rc) return rc;
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* GET /api/report-templates/{id} */
int kp_api_template_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_template_answer(env, resp, req->params[0], 200);
}

/* The fields of a template body. For a creation name and language are required. 0 ok, -1
 * answered (400). */
typedef struct {
    const char *name, *language, *modality, *body_part;
    char *sections; /* JSON text (malloc'd) or NULL */
} s_tpl_t;

static int s_template_fields(json_t *b, bool create, s_tpl_t *t, kp_http_resp_t *resp)
{
    memset(t, 0, sizeof *t);
    if (s_opt_str(b, "name", 200, &t->name, resp) < 0 ||
        s_opt_str(b, "language", 8, &t->language, resp) < 0 ||
        s_opt_str(b, "modality", 16, &t->modality, resp) < 0 ||
        s_opt_str(b, "body_part", 16, &t->body_part, resp) < 0)
        return -1;
    if ((create || t->name) && (!t->name || !*t->name)) {
        s_fail(resp, KP_EINVAL, "name is required (1 to 200 bytes)", NULL);
        return -1;
    }
    if ((create || t->language) && (!t->language || !kp_api_language_ok(t->language))) {
        s_fail(resp, KP_EINVAL, S_LANGUAGE_RULE, t->language);
        return -1;
    }
    if ((t->modality && !s_cs_ok(t->modality)) || (t->body_part && !s_cs_ok(t->body_part))) {
        s_fail(resp, KP_EINVAL, "modality and body_part are DICOM code strings ('' = any)",
               "upper-case letters, digits, space and _, at most 16");
        return -1;
    }
    json_t *s = json_object_get(b, "sections");
    if (s && !json_is_null(s)) {
        json_t *n = s_sections(s, true, resp);
        if (!n) return -1;
        t->sections = json_dumps(n, JSON_COMPACT);
        json_decref(n);
        if (!t->sections) abort();
    }
    return 0;
}

static int s_template_audit(kp_http_env_t *env, const kp_http_req_t *req, const char *id,
                            const char *name)
{
    json_t *d =
        json_pack("{s:s, s:I}", "method", req->method, "template_id", (json_int_t)atoll(id));
    if (name) json_object_set_new(d, "name", json_string(name));
    return s_audit(env, req, "report.template", NULL, NULL, d);
}

/* POST /api/report-templates {name, language, modality?, body_part?, sections?} */
int kp_api_template_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    s_tpl_t t;
    int rc = 0;
    PGresult *r = NULL;
    if (s_template_fields(b, true, &t, resp) < 0) goto out;
    const char *p[] = {t.name, t.language, t.modality, t.body_part, t.sections, req->id.user};
    if ((rc = kp_db_begin(env->db)) ||
        (rc = kp_db_exec(env->db, &r,
                         "INSERT INTO report_templates (name, language, modality, body_part, "
                         "sections, created_by) VALUES ($1, $2, coalesce($3, ''), coalesce($4, "
                         "''), coalesce($5::jsonb, '{\"clinical_information\": \"\", "
                         "\"technique\": \"\", \"findings\": \"\", \"impression\": \"\", "
                         "\"recommendations\": \"\"}'), $6) ON CONFLICT (name, language) DO "
                         "NOTHING RETURNING id",
                         6, p)))
        goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a template with this name and language exists", t.name);
        goto out;
    }
    char id[24];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    if ((rc = s_template_audit(env, req, id, t.name)) || (rc = kp_db_commit(env->db))) goto out;
    rc = s_template_answer(env, resp, id, 201);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    free(t.sections);
    json_decref(b);
    return rc;
}

/* PUT /api/report-templates/{id} with any of name, language, modality, body_part, sections
 * (sections replace the stored ones; keys left out become ""). */
int kp_api_template_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    s_tpl_t t;
    int rc = 0;
    PGresult *r = NULL;
    if (s_template_fields(b, false, &t, resp) < 0) goto out;
    const char *p[] = {req->params[0], t.name, t.language, t.modality, t.body_part, t.sections};
    if ((rc = kp_db_begin(env->db)) || (rc = kp_db_run(env->db, S_TPL_LOCK, 0, NULL)) ||
        (rc = kp_db_exec(env->db, &r,
                         "SELECT EXISTS (SELECT 1 FROM report_templates WHERE id = $1::bigint), "
                         "EXISTS (SELECT 1 FROM report_templates o, report_templates t WHERE t.id "
                         "= $1::bigint AND o.id <> t.id AND o.name = coalesce($2, t.name) AND "
                         "o.language = coalesce($3, t.language))",
                         3, p)))
        goto out;
    if (PQgetvalue(r, 0, 0)[0] != 't') {
        rc = s_fail(resp, KP_ENOTFOUND, "no such template", req->params[0]);
        goto out;
    }
    if (PQgetvalue(r, 0, 1)[0] == 't') {
        rc = s_fail(resp, KP_ECONFLICT, "a template with this name and language exists", t.name);
        goto out;
    }
    if ((rc = kp_db_run(env->db,
                        "UPDATE report_templates SET name = coalesce($2, name), language = "
                        "coalesce($3, language), modality = coalesce($4, modality), body_part = "
                        "coalesce($5, body_part), sections = coalesce($6::jsonb, sections), "
                        "updated_at = now() WHERE id = $1::bigint",
                        6, p)) ||
        (rc = s_template_audit(env, req, req->params[0], t.name)) || (rc = kp_db_commit(env->db)))
        goto out;
    rc = s_template_answer(env, resp, req->params[0], 200);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    free(t.sections);
    json_decref(b);
    return rc;
}

/* DELETE /api/report-templates/{id} (reports made from it keep their text; template_id
 * becomes null) */
int kp_api_template_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->params[0]};
    PGresult *r = NULL;
    int rc = kp_db_begin(env->db);
    if (!rc)
        rc = kp_db_exec(env->db, &r,
                        "DELETE FROM report_templates WHERE id = $1::bigint RETURNING name", 1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such template", req->params[0]);
        goto out;
    }
    if ((rc = s_template_audit(env, req, req->params[0], PQgetvalue(r, 0, 0))) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    resp->status = 204;
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    return rc;
}
