/* kp_api_admin: the administration API — users, roles and sites (database worker threads).
 *
 * /api/users (user.manage), /api/roles and /api/permissions (role.manage), /api/sites
 * (site.manage); docs/security.md ("Admin API") lists the endpoints. The same rules as
 * `pacsctl user` apply (the password policy, Argon2id hashes, names per the schema's CHECKs),
 * plus guard rails the CLI does not need: an administrator cannot disable, delete or demote
 * herself, the last active user holding user.manage cannot lose it, and a delegated manager
 * cannot grant, or act on an account holding, permissions she does not hold herself.
 *
 * Design note. Every change runs in one transaction that first takes one advisory lock
 * (S_LOCK), so two administrators cannot both remove "the other" last manager, and a role or
 * site checked to exist cannot vanish before the insert that refers to it. A change that takes
 * something away from a user (roles, sites, disabling, a password reset) revokes the user's
 * sessions (except the caller's own), and marks them dead in this gateway's session cache at
 * once (kp_auth_session_dead); other gateways notice within their cache time (5 s). A role
 * change reloads this gateway's role -> permission snapshot (kp_auth_reload) before answering.
 * Objects are built as JSON by PostgreSQL (json_build_object), so the C side only validates
 * input and passes text through. Unique names are enforced with INSERT ... ON CONFLICT DO
 * NOTHING (no row back: 409), never by catching a failed statement. */
#include "kp_api.h"

#include "kp_auth.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_password.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* clang-format off: the SQL fragments below are laid out by hand */
/* One lock for every administrative change (transaction-scoped). */
#define S_LOCK    "SELECT pg_advisory_xact_lock(7150002)"
#define S_TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
/* Room for a text[] literal of up to KP_AUTH_MAX_SITES quoted names of 64 characters. */
#define S_LIT_LEN (KP_AUTH_MAX_SITES * 68 + 8)
#define S_ALNUM   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#define S_LOWER   "abcdefghijklmnopqrstuvwxyz"

/* Active (not disabled) users holding user.manage through one of their roles. */
#define S_MANAGERS                                                                                 \
    "(SELECT count(DISTINCT u.id) FROM users u JOIN user_roles ur ON ur.user_id = u.id JOIN "      \
    "role_permissions rp ON rp.role = ur.role WHERE rp.permission = 'user.manage' AND NOT "        \
    "u.disabled)"

#define S_USER_OBJ                                                                                 \
    "json_build_object('username', u.username, 'display_name', u.display_name, 'email', "          \
    "u.email, 'language', u.language, 'roles', array(SELECT role FROM user_roles WHERE user_id "   \
    "= u.id ORDER BY role), 'sites', array(SELECT s.name FROM user_sites us JOIN sites s ON s.id " \
    "= us.site_id WHERE us.user_id = u.id ORDER BY s.name), 'state', CASE WHEN u.disabled THEN "   \
    "'disabled' WHEN u.locked_until > now() THEN 'locked' WHEN u.must_change_password THEN "       \
    "'must_change_password' ELSE 'active' END, 'disabled', u.disabled, 'locked', "                 \
    "coalesce(u.locked_until > now(), false), 'locked_until', CASE WHEN u.locked_until > now() "   \
    "THEN " S_TS("u.locked_until") " END, 'must_change_password', u.must_change_password, "        \
                                   "'mfa_enrolled', u.totp_secret IS NOT NULL, "                   \
                                   "'last_login_at', " S_TS(                                       \
                                       "u.last_login_at") ", "                                     \
                                                          "'created_at', " S_TS(                   \
                                                              "u.created_at") ", "                 \
                                                                              "'updated_at',"      \
                                                                              " " S_TS("u."        \
                                                                                       "updated_"  \
                                                                                       "at") ")"

#define S_ROLE_OBJ                                                                                 \
    "json_build_object('name', r.name, 'description', r.description, 'builtin', r.builtin, "       \
    "'require_mfa', r.require_mfa, 'permissions', array(SELECT permission FROM role_permissions "  \
    "WHERE role = r.name ORDER BY permission), 'users', (SELECT count(*) FROM user_roles WHERE "   \
    "role = r.name), 'created_at', " S_TS("r.created_at") ", 'updated_at', " S_TS(                 \
        "r.updated_at") ")"

#define S_SITE_OBJ                                                                                 \
    "json_build_object('name', s.name, 'description', s.description, 'studies', (SELECT "          \
    "count(*) FROM studies WHERE site_id = s.id), 'users', (SELECT count(*) FROM user_sites "      \
    "WHERE site_id = s.id), 'created_at', " S_TS("s.created_at") ")"

/* The names of a text[] literal ($1) missing from a table, comma-separated ('' when none). */
#define S_MISSING(table)                                                                           \
    "SELECT coalesce(string_agg(x, ', '), '') FROM unnest($1::text[]) x WHERE NOT EXISTS "         \
    "(SELECT 1 FROM " table " t WHERE t.name = x)"

/* clang-format on */

/* ---- helpers ------------------------------------------------------------------------------- */

static int s_fail(kp_http_resp_t *resp, int code, const char *msg, const char *detail)
{
    kp_http_error(resp, code, 0, msg, detail);
    return 0;
}

/* A body that may be left out entirely (then {}). */
json_t *kp_api_body_optional(const kp_http_req_t *req, kp_http_resp_t *resp)
{
    if (!req->body_len) {
        json_t *j = json_object();
        if (!j) abort();
        return j;
    }
    return kp_http_json_body(req, resp);
}

void kp_api_text_resp(kp_http_resp_t *resp, int status, const char *text)
{
    resp->body = strdup(text);
    if (!resp->body) abort();
    resp->len = strlen(resp->body);
    resp->status = status;
    resp->content_type = "application/json";
    resp->compressible = true;
}

/* One row, one column of JSON text from sql, parsed into *out (NULL when there is no row). */
static int s_one_json(kp_http_env_t *env, const char *sql, int n, const char *const *p,
                      json_t **out)
{
    *out = NULL;
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, n, p);
    if (rc) return rc;
    if (PQntuples(r) == 1) {
        *out = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
        if (!*out) rc = KP_EINTERNAL;
    }
    PQclear(r);
    return rc;
}

static bool s_name_ok(const char *s, const char *first, const char *rest)
{
    size_t n = strlen(s);
    return n >= 1 && n <= 64 && strchr(first, s[0]) && strspn(s + 1, rest) == n - 1;
}
static bool s_username_ok(const char *s)
{
    return s_name_ok(s, S_ALNUM, S_ALNUM "_.@-");
}
static bool s_role_ok(const char *s)
{
    return s_name_ok(s, S_LOWER, S_LOWER "0123456789_.-");
}
static bool s_site_ok(const char *s)
{
    return s_name_ok(s, S_ALNUM, S_ALNUM "_.-");
}
static bool s_perm_ok(const char *s)
{
    return s_name_ok(s, S_LOWER, S_LOWER ".");
}

#define S_USERNAME_RULE "1 to 64 characters A-Z a-z 0-9 _ . @ -, starting with a letter or digit"
#define S_ROLE_RULE     "1 to 64 characters a-z 0-9 _ . -, starting with a lower-case letter"
#define S_SITE_RULE     "1 to 64 characters A-Z a-z 0-9 _ . -, starting with a letter or digit"

bool kp_api_language_ok(const char *s)
{
    static const char *const langs[] = {"en", "ru", "es", "fr", "de"};
    for (size_t i = 0; i < sizeof langs / sizeof langs[0]; i++)
        if (!strcmp(s, langs[i])) return true;
    return false;
}

/* Empty, or something@something without spaces or control characters. */
static bool s_email_ok(const char *s)
{
    if (!*s) return true;
    const char *at = strchr(s, '@');
    if (!at || at == s || !at[1] || strchr(at + 1, '@')) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == 0x7f) return false;
    return true;
}

/* An optional string member: 0 absent or null (*out NULL), 1 present, -1 invalid (answered). */
int kp_api_opt_str(json_t *b, const char *key, size_t max, const char **out, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v) || json_string_length(v) > max ||
        strlen(json_string_value(v)) != json_string_length(v)) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s must be a string of at most %zu bytes", key, max);
        kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
        return -1;
    }
    *out = json_string_value(v);
    return 1;
}

/* An optional boolean member: *out -1 absent or null, else 0/1. 0, or -1 invalid (answered). */
static int s_opt_bool(json_t *b, const char *key, int *out, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, key);
    *out = -1;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s must be true or false", key);
        kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

/* An optional array of names as a PostgreSQL text[] literal (names hold no quotes or
 * backslashes once validated): 0 absent or null, 1 present (*count set), -1 invalid
 * (answered). */
static int s_opt_names(json_t *b, const char *key, bool (*ok)(const char *), const char *rule,
                       int max, char lit[S_LIT_LEN], int *count, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, key);
    char msg[128];
    snprintf(lit, S_LIT_LEN, "{}");
    *count = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_array(v) || json_array_size(v) > (size_t)max) {
        snprintf(msg, sizeof msg, "%s must be an array of at most %d names", key, max);
        kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
        return -1;
    }
    size_t k = (size_t)snprintf(lit, S_LIT_LEN, "{"), i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        const char *s = json_string_value(e);
        if (!s || strlen(s) != json_string_length(e) || !ok(s)) {
            snprintf(msg, sizeof msg, "%s: \"%.64s\" is not a valid name (%s)", key,
                     s ? s : "(not a string)", rule);
            kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
            return -1;
        }
        k += (size_t)snprintf(lit + k, S_LIT_LEN - k, "%s\"%s\"", i ? "," : "", s);
    }
    snprintf(lit + k, S_LIT_LEN - k, "}");
    *count = (int)json_array_size(v);
    return 1;
}

/* True when the array member key holds the string s. */
static bool s_array_has(json_t *b, const char *key, const char *s)
{
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(b, key), i, e)
    {
        const char *v = json_string_value(e);
        if (v && !strcmp(v, s)) return true;
    }
    return false;
}

/* Checks that every name of lit exists (sql: S_MISSING(table)). 0 all known, 1 answered 400,
 * or a negative code. */
static int s_known(kp_http_env_t *env, kp_http_resp_t *resp, const char *sql, const char *lit,
                   const char *what)
{
    const char *p[] = {lit};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, 1, p);
    if (rc) return rc;
    const char *missing = PQgetvalue(r, 0, 0);
    if (*missing) {
        char msg[96];
        snprintf(msg, sizeof msg, "unknown %s", what);
        kp_http_error(resp, KP_EINVAL, 0, msg, missing);
        rc = 1;
    }
    PQclear(r);
    return rc;
}

static int s_hex(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* The value of key in a raw query string, percent-decoded: 1 found, 0 absent, -1 malformed. */
int kp_api_query(const char *query, const char *key, char *out, size_t outlen)
{
    size_t kl = strlen(key);
    for (const char *p = query; p && *p;) {
        const char *e = strchr(p, '&');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l >= kl && !memcmp(p, key, kl) && (l == kl || p[kl] == '=')) {
            size_t o = 0;
            for (size_t i = kl + 1; i < l; i++) {
                char c = p[i];
                if (c == '+')
                    c = ' ';
                else if (c == '%') {
                    int hi = i + 2 < l ? s_hex(p[i + 1]) : -1,
                        lo = i + 2 < l ? s_hex(p[i + 2]) : -1;
                    if (hi < 0 || lo < 0 || (hi | lo) == 0) return -1;
                    c = (char)(hi * 16 + lo);
                    i += 2;
                }
                if (o + 1 >= outlen) return -1;
                out[o++] = c;
            }
            out[o] = 0;
            return 1;
        }
        p = e ? e + 1 : p + l;
    }
    return 0;
}

int kp_api_query_long(const kp_http_req_t *req, const char *key, long dflt, long min, long max,
                      long *out)
{
    char v[24];
    int q = kp_api_query(req->query, key, v, sizeof v);
    *out = dflt;
    if (q == 0) return 0;
    char *e;
    long n = q < 0 ? 0 : strtol(v, &e, 10);
    if (q < 0 || e == v || *e || n < min || n > max) return -1;
    *out = n;
    return 0;
}

/* Revokes the sessions of user_id (all but the caller's own) and returns their ids in *res
 * (to be marked dead once the transaction commits). */
static int s_revoke(kp_http_env_t *env, const kp_http_req_t *req, const char *user_id,
                    const char *why, PGresult **res)
{
    const char *p[] = {user_id, why, req->id.sid};
    return kp_db_exec(env->db, res,
                      "UPDATE sessions SET revoked_at = now(), revoked_why = $2 WHERE user_id = "
                      "$1::bigint AND revoked_at IS NULL AND id <> $3 RETURNING id",
                      3, p);
}

static int s_mark_dead(kp_http_env_t *env, PGresult *res)
{
    int n = res ? PQntuples(res) : 0;
    for (int i = 0; i < n; i++)
        kp_auth_session_dead(env->auth, PQgetvalue(res, i, 0));
    return n;
}

int kp_api_admin_begin(kp_http_env_t *env)
{
    int rc = kp_db_begin(env->db);
    if (!rc) rc = kp_db_run(env->db, S_LOCK, 0, NULL);
    return rc;
}

/* The number of active users holding user.manage now (inside the transaction): *n. */
static int s_managers(kp_http_env_t *env, long *n)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, "SELECT " S_MANAGERS, 0, NULL);
    if (rc) return rc;
    *n = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* The permissions produced by perms_sql ($2, $3 its parameters) that the caller's roles ($1)
 * do not hold. A manager may not hand out, or act on an account holding, more than she holds
 * herself: otherwise a user.manage holder could give herself admin, or reset an
 * administrator's password and sign in as her. 0 none, 1 answered 403, or a negative code. */
static int s_beyond_caller(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                           const char *perms_sql, const char *p2, const char *p3,
                           const char *message)
{
    char mine[KP_AUTH_MAX_ROLES * 68 + 8];
    size_t k = (size_t)snprintf(mine, sizeof mine, "{");
    for (int i = 0; i < req->id.nroles; i++)
        k +=
            (size_t)snprintf(mine + k, sizeof mine - k, "%s\"%s\"", i ? "," : "", req->id.roles[i]);
    snprintf(mine + k, sizeof mine - k, "}");
    char sql[1024];
    snprintf(sql, sizeof sql,
             "SELECT coalesce(string_agg(DISTINCT p, ', '), '') FROM (%s) x(p) WHERE NOT EXISTS "
             "(SELECT 1 FROM role_permissions WHERE role = ANY($1::text[]) AND permission = p)",
             perms_sql);
    const char *p[] = {mine, p2, p3};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, 3, p);
    if (rc) return rc;
    const char *missing = PQgetvalue(r, 0, 0);
    if (*missing) {
        kp_http_error(resp, KP_EPERM, 0, message, missing);
        rc = 1;
    }
    PQclear(r);
    return rc;
}

/* clang-format off */
/* Permissions of the roles $2 (text[]) that user $3 does not hold yet ($3 0: a new user). */
#define S_ROLES_GRANTED                                                                            \
    "SELECT rp.permission FROM role_permissions rp WHERE rp.role = ANY($2::text[]) AND NOT "      \
    "EXISTS (SELECT 1 FROM user_roles ur WHERE ur.user_id = $3::bigint AND ur.role = rp.role)"
/* Permissions user $2 holds ($3 unused, NULL). */
#define S_USER_HOLDS                                                                               \
    "SELECT rp.permission FROM user_roles ur JOIN role_permissions rp ON rp.role = ur.role WHERE " \
    "ur.user_id = $2::bigint AND $3::text IS NULL"
/* Permissions of $2 (text[]) that role $3 does not hold yet. */
#define S_PERMS_ADDED                                                                              \
    "SELECT x FROM unnest($2::text[]) x WHERE NOT EXISTS (SELECT 1 FROM role_permissions WHERE "  \
    "role = $3 AND permission = x)"
/* clang-format on */
#define S_NOT_YOURS "you cannot grant permissions you do not hold"
#define S_ABOVE_YOU "this account holds permissions you do not hold"

#define S_LAST_MANAGER                                                                             \
    "the last active user holding user.manage cannot lose it (give the permission to another "     \
    "user first)"

/* A list endpoint: one statement yielding the whole JSON answer as text. */
int kp_api_list(kp_http_env_t *env, kp_http_resp_t *resp, const char *sql)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, 0, NULL);
    if (rc) return rc;
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* One object by name (sql selects it as text with $1 = name): the answer, or 404 "no such
 * <what>". *out (may be NULL) gets the object instead of answering, for the caller to extend. */
static int s_object(kp_http_env_t *env, kp_http_resp_t *resp, int status, const char *sql,
                    const char *what, const char *name, json_t **out)
{
    const char *p[] = {name};
    json_t *o = NULL;
    int rc = s_one_json(env, sql, 1, p, &o);
    if (rc) return rc;
    if (!o) {
        char msg[48];
        snprintf(msg, sizeof msg, "no such %s", what);
        return s_fail(resp, KP_ENOTFOUND, msg, name);
    }
    if (out) {
        *out = o;
        return 0;
    }
    kp_http_json_resp(resp, status, o);
    return 0;
}

/* ---- users --------------------------------------------------------------------------------- */

static int s_user_answer(kp_http_env_t *env, const char *name, kp_http_resp_t *resp, int status,
                         const char *password)
{
    json_t *o = NULL;
    int rc = s_object(env, resp, status,
                      "SELECT " S_USER_OBJ "::text FROM users u WHERE lower(u.username) = "
                      "lower($1)",
                      "user", name, &o);
    if (rc || !o) return rc;
    if (password) json_object_set_new(o, "password", json_string(password));
    kp_http_json_resp(resp, status, o);
    resp->compressible = false;
    return 0;
}

/* GET /api/users[?q=text][&limit=N][&offset=N] */
int kp_api_users_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char q[256];
    int hq = kp_api_query(req->query, "q", q, sizeof q);
    long limit, offset;
    if (hq < 0 || kp_api_query_long(req, "limit", 100, 1, 1000, &limit) ||
        kp_api_query_long(req, "offset", 0, 0, 1000000000L, &offset))
        return s_fail(resp, KP_EINVAL, "bad query parameter",
                      "q: text to search in user names, display names and e-mail addresses (at "
                      "most 255 bytes); limit 1..1000 (100); offset >= 0");
    char ls[24], os[24];
    snprintf(ls, sizeof ls, "%ld", limit);
    snprintf(os, sizeof os, "%ld", offset);
    const char *p[] = {hq == 1 && q[0] ? q : NULL, ls, os};
#define S_FILTER                                                                                   \
    " FROM users u WHERE ($1::text IS NULL OR strpos(lower(u.username || ' ' || u.display_name "   \
    "|| ' ' || u.email), lower($1)) > 0)"
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT json_build_object('total', (SELECT count(*)" S_FILTER
                        "), 'limit', $2::int, 'offset', $3::int, 'users', coalesce((SELECT "
                        "json_agg(o ORDER BY k) FROM (SELECT " S_USER_OBJ " AS o, "
                        "lower(u.username) COLLATE \"C\" AS k" S_FILTER " ORDER BY k LIMIT "
                        "$2::int OFFSET $3::int) x), '[]'::json))::text",
                        3, p);
#undef S_FILTER
    if (rc) return rc;
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* GET /api/users/{name} */
int kp_api_user_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_user_answer(env, req->params[0], resp, 200, NULL);
}

/* POST /api/users {username, display_name?, email?, language?, roles[], sites[]?, password?,
 * temporary?} */
int kp_api_users_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    int rc = 0, temporary = -1, nroles = 0, nsites = 0;
    char *generated = NULL, *hash = NULL;
    const char *username, *display, *email, *lang, *pw;
    char roles[S_LIT_LEN], sites[S_LIT_LEN];
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "username", 64, &username, resp) < 0) goto out;
    if (!username || !s_username_ok(username)) {
        rc = s_fail(resp, KP_EINVAL, "username is required: " S_USERNAME_RULE, NULL);
        goto out;
    }
    if (kp_api_opt_str(b, "display_name", 200, &display, resp) < 0 ||
        kp_api_opt_str(b, "email", 254, &email, resp) < 0 ||
        kp_api_opt_str(b, "language", 8, &lang, resp) < 0 ||
        kp_api_opt_str(b, "password", 4096, &pw, resp) < 0 ||
        s_opt_bool(b, "temporary", &temporary, resp) < 0)
        goto out;
    if (email && !s_email_ok(email)) {
        rc = s_fail(resp, KP_EINVAL, "email is not an e-mail address", email);
        goto out;
    }
    if (lang && !kp_api_language_ok(lang)) {
        rc = s_fail(resp, KP_EINVAL, "language is one of en, ru, es, fr, de", lang);
        goto out;
    }
    int hr =
        s_opt_names(b, "roles", s_role_ok, S_ROLE_RULE, KP_AUTH_MAX_ROLES, roles, &nroles, resp);
    if (hr < 0) goto out;
    if (!nroles) {
        rc = s_fail(resp, KP_EINVAL, "roles: give at least one role", "GET /api/roles lists them");
        goto out;
    }
    if (s_opt_names(b, "sites", s_site_ok, S_SITE_RULE, KP_AUTH_MAX_SITES, sites, &nsites, resp) <
        0)
        goto out;
    if (pw) {
        const char *why = NULL;
        if (kp_password_policy_check(kp_auth_policy(env->auth), username, pw, &why)) {
            rc = s_fail(resp, KP_EINVAL, why ? why : "password refused by the policy", NULL);
            goto out;
        }
    } else if (!(generated = kp_random_token(18))) { /* 24 characters: passes the policy */
        rc = KP_EINTERNAL;
        goto out;
    }
    if ((rc = kp_password_hash(env->cfg, pw ? pw : generated, &hash))) goto out;
    const char *must = (!pw || temporary == 1) ? "true" : "false";
    if ((rc = kp_api_admin_begin(env))) goto out;
    if ((rc = s_known(env, resp, S_MISSING("roles"), roles, "role")) ||
        (rc = s_known(env, resp, S_MISSING("sites"), sites, "site")) ||
        (rc = s_beyond_caller(env, req, resp, S_ROLES_GRANTED, roles, "0", S_NOT_YOURS))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    const char *p[] = {username, display, email, lang, hash, must};
    rc = kp_db_exec(env->db, &r,
                    "INSERT INTO users (username, display_name, email, language, password_hash, "
                    "must_change_password) VALUES ($1, coalesce($2, ''), coalesce($3, ''), "
                    "coalesce($4, 'en'), $5, $6::boolean) ON CONFLICT ((lower(username))) DO "
                    "NOTHING RETURNING id",
                    6, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a user with this name exists", username);
        goto out;
    }
    const char *q[] = {PQgetvalue(r, 0, 0), roles, sites};
    if ((rc = kp_db_run(env->db,
                        "WITH a AS (INSERT INTO user_roles (user_id, role) SELECT DISTINCT "
                        "$1::bigint, x FROM unnest($2::text[]) x) INSERT INTO user_sites "
                        "(user_id, site_id) SELECT $1::bigint, id FROM sites WHERE name = "
                        "ANY($3::text[])",
                        3, q)) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    kp_info("admin", "%s created user %s (roles %s, sites %s)", req->id.user, username, roles,
            sites);
    rc = s_user_answer(env, username, resp, 201, generated);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    if (generated) memset(generated, 0, strlen(generated));
    free(generated);
    free(hash);
    json_decref(b);
    return rc;
}

/* PUT /api/users/{name} {display_name?, email?, language?, roles?, sites?, disabled?} */
int kp_api_user_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *name = req->params[0];
    int rc = 0, disabled = -1, nroles = 0, nsites = 0;
    const char *display, *email, *lang, *uname;
    char roles[S_LIT_LEN], sites[S_LIT_LEN];
    PGresult *r = NULL, *revoked = NULL;
    if (kp_api_opt_str(b, "username", 64, &uname, resp) < 0 ||
        kp_api_opt_str(b, "display_name", 200, &display, resp) < 0 ||
        kp_api_opt_str(b, "email", 254, &email, resp) < 0 ||
        kp_api_opt_str(b, "language", 8, &lang, resp) < 0 ||
        s_opt_bool(b, "disabled", &disabled, resp) < 0)
        goto out;
    if (uname && strcasecmp(uname, name)) {
        rc = s_fail(resp, KP_EINVAL, "a user cannot be renamed", NULL);
        goto out;
    }
    if (json_object_get(b, "password")) {
        rc = s_fail(resp, KP_EINVAL, "set passwords with POST /api/users/{name}/password", NULL);
        goto out;
    }
    if (email && !s_email_ok(email)) {
        rc = s_fail(resp, KP_EINVAL, "email is not an e-mail address", email);
        goto out;
    }
    if (lang && !kp_api_language_ok(lang)) {
        rc = s_fail(resp, KP_EINVAL, "language is one of en, ru, es, fr, de", lang);
        goto out;
    }
    int hr =
        s_opt_names(b, "roles", s_role_ok, S_ROLE_RULE, KP_AUTH_MAX_ROLES, roles, &nroles, resp);
    if (hr < 0) goto out;
    int hs =
        s_opt_names(b, "sites", s_site_ok, S_SITE_RULE, KP_AUTH_MAX_SITES, sites, &nsites, resp);
    if (hs < 0) goto out;
    if ((rc = kp_api_admin_begin(env))) goto out;
    const char *p[] = {name};
    rc = kp_db_exec(env->db, &r,
                    "SELECT id, username, disabled, array(SELECT role FROM user_roles WHERE "
                    "user_id = u.id ORDER BY role)::text, array(SELECT site_id FROM user_sites "
                    "WHERE user_id = u.id ORDER BY site_id)::text, EXISTS (SELECT 1 FROM "
                    "user_roles WHERE user_id = u.id AND role = 'admin') FROM users u WHERE "
                    "lower(username) = lower($1) FOR UPDATE",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such user", name);
        goto out;
    }
    char id[24], username[72], *roles_before = strdup(PQgetvalue(r, 0, 3)),
                               *sites_before = strdup(PQgetvalue(r, 0, 4));
    if (!roles_before || !sites_before) abort();
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    snprintf(username, sizeof username, "%s", PQgetvalue(r, 0, 1));
    bool was_disabled = PQgetvalue(r, 0, 2)[0] == 't';
    bool was_admin = PQgetvalue(r, 0, 5)[0] == 't';
    bool self = !strcasecmp(username, req->id.user);
    PQclear(r);
    r = NULL;
    const char *conflict = NULL;
    if (self && disabled == 1)
        conflict = "you cannot disable your own account";
    else if (self && hr == 1 && was_admin && !s_array_has(b, "roles", "admin"))
        conflict = "you cannot remove your own admin role";
    if (!conflict && hr == 1 && (rc = s_known(env, resp, S_MISSING("roles"), roles, "role")))
        goto free_before;
    if (!conflict && hs == 1 && (rc = s_known(env, resp, S_MISSING("sites"), sites, "site")))
        goto free_before;
    if (conflict) {
        rc = s_fail(resp, KP_ECONFLICT, conflict, NULL);
        goto free_before;
    }
    if ((!self && (rc = s_beyond_caller(env, req, resp, S_USER_HOLDS, id, NULL, S_ABOVE_YOU))) ||
        (hr == 1 &&
         (rc = s_beyond_caller(env, req, resp, S_ROLES_GRANTED, roles, id, S_NOT_YOURS))))
        goto free_before;
    long managers_before = 0;
    if ((rc = s_managers(env, &managers_before))) goto free_before;
    const char *u[] = {id, display, email, lang, disabled < 0 ? NULL : disabled ? "true" : "false"};
    rc = kp_db_run(env->db,
                   "UPDATE users SET display_name = coalesce($2, display_name), email = "
                   "coalesce($3, email), language = coalesce($4, language), disabled = "
                   "coalesce($5::boolean, disabled), updated_at = now() WHERE id = $1::bigint",
                   5, u);
    if (!rc && hr == 1) {
        const char *q[] = {id, roles};
        rc = kp_db_run(env->db,
                       "WITH d AS (DELETE FROM user_roles WHERE user_id = $1::bigint AND NOT "
                       "role = ANY($2::text[])) INSERT INTO user_roles (user_id, role) SELECT "
                       "DISTINCT $1::bigint, x FROM unnest($2::text[]) x ON CONFLICT DO NOTHING",
                       2, q);
    }
    if (!rc && hs == 1) {
        const char *q[] = {id, sites};
        rc = kp_db_run(env->db,
                       "WITH n AS (SELECT id FROM sites WHERE name = ANY($2::text[])), d AS "
                       "(DELETE FROM user_sites WHERE user_id = $1::bigint AND site_id NOT IN "
                       "(SELECT id FROM n)) INSERT INTO user_sites (user_id, site_id) SELECT "
                       "$1::bigint, id FROM n ON CONFLICT DO NOTHING",
                       2, q);
    }
    if (rc) goto free_before;
    const char *c[] = {id};
    rc = kp_db_exec(env->db, &r,
                    "SELECT array(SELECT role FROM user_roles WHERE user_id = $1::bigint ORDER "
                    "BY role)::text, array(SELECT site_id FROM user_sites WHERE user_id = "
                    "$1::bigint ORDER BY site_id)::text, EXISTS (SELECT 1 FROM user_roles ur "
                    "JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = "
                    "$1::bigint AND rp.permission = 'user.manage'), " S_MANAGERS,
                    1, c);
    if (rc) goto free_before;
    bool roles_changed = strcmp(roles_before, PQgetvalue(r, 0, 0)) != 0;
    bool sites_changed = strcmp(sites_before, PQgetvalue(r, 0, 1)) != 0;
    bool manages = PQgetvalue(r, 0, 2)[0] == 't';
    long managers = atol(PQgetvalue(r, 0, 3));
    PQclear(r);
    r = NULL;
    if (self && !manages && strcmp(req->id.sid, "dev")) {
        rc = s_fail(resp, KP_ECONFLICT, "you cannot remove your own user.manage permission", NULL);
        goto free_before;
    }
    if (managers == 0 && managers_before > 0) {
        rc = s_fail(resp, KP_ECONFLICT, S_LAST_MANAGER, NULL);
        goto free_before;
    }
    bool disabling = disabled == 1 && !was_disabled;
    if (roles_changed || sites_changed || disabling) {
        rc = s_revoke(env, req, id,
                      disabling ? "account disabled by an administrator"
                                : "roles or sites changed by an administrator",
                      &revoked);
        if (rc) goto free_before;
    }
    if ((rc = kp_db_commit(env->db))) goto free_before;
    int n = s_mark_dead(env, revoked);
    kp_info("admin", "%s changed user %s%s%s%s (%d session%s revoked)", req->id.user, username,
            roles_changed ? ", roles" : "", sites_changed ? ", sites" : "",
            disabled == 1   ? ", disabled"
            : disabled == 0 ? ", enabled"
                            : "",
            n, n == 1 ? "" : "s");
    rc = s_user_answer(env, username, resp, 200, NULL);
free_before:
    free(roles_before);
    free(sites_before);
out:
    if (rc > 0) rc = 0; /* answered by s_known */
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    if (revoked) PQclear(revoked);
    json_decref(b);
    return rc;
}

/* DELETE /api/users/{name}: removes the account (its roles, sites and sessions go with it). */
int kp_api_user_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *name = req->params[0];
    PGresult *r = NULL, *revoked = NULL;
    int rc = kp_api_admin_begin(env);
    if (rc) goto out;
    const char *p[] = {name};
    rc = kp_db_exec(env->db, &r,
                    "SELECT id, username FROM users WHERE lower(username) = lower($1) FOR UPDATE",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such user", name);
        goto out;
    }
    char id[24], username[72];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    snprintf(username, sizeof username, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    r = NULL;
    if (!strcasecmp(username, req->id.user)) {
        rc = s_fail(resp, KP_ECONFLICT, "you cannot delete your own account", NULL);
        goto out;
    }
    long before = 0, managers = 0;
    if ((rc = s_beyond_caller(env, req, resp, S_USER_HOLDS, id, NULL, S_ABOVE_YOU)) ||
        (rc = s_managers(env, &before)) ||
        (rc = s_revoke(env, req, id, "account deleted", &revoked)))
        goto out;
    const char *q[] = {id};
    if ((rc = kp_db_run(env->db, "DELETE FROM users WHERE id = $1::bigint", 1, q))) goto out;
    if ((rc = s_managers(env, &managers))) goto out;
    if (managers == 0 && before > 0) {
        rc = s_fail(resp, KP_ECONFLICT, S_LAST_MANAGER, NULL);
        goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    s_mark_dead(env, revoked);
    kp_info("admin", "%s deleted user %s", req->id.user, username);
    resp->status = 204;
out:
    if (rc > 0) rc = 0; /* answered by s_beyond_caller */
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    if (revoked) PQclear(revoked);
    return rc;
}

/* POST /api/users/{name}/password {password?, temporary?}: without a password one is generated
 * (and returned this once); temporary (default true; always for a generated one) makes the user
 * change it at the next login. Clears a lockout and ends the user's sessions. */
int kp_api_user_password(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_api_body_optional(req, resp);
    if (!b) return 0;
    const char *name = req->params[0], *pw = NULL;
    int rc = 0, temporary = -1;
    char *generated = NULL, *hash = NULL;
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "password", 4096, &pw, resp) < 0 ||
        s_opt_bool(b, "temporary", &temporary, resp) < 0)
        goto out;
    const char *p[] = {name};
    if ((rc = kp_db_exec(env->db, &r,
                         "SELECT id, username FROM users WHERE lower(username) = lower($1)", 1, p)))
        goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such user", name);
        goto out;
    }
    char id[24], username[72];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    snprintf(username, sizeof username, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    r = NULL;
    if (strcasecmp(username, req->id.user) &&
        (rc = s_beyond_caller(env, req, resp, S_USER_HOLDS, id, NULL, S_ABOVE_YOU))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    if (pw) {
        const char *why = NULL;
        if (kp_password_policy_check(kp_auth_policy(env->auth), username, pw, &why)) {
            rc = s_fail(resp, KP_EINVAL, why ? why : "password refused by the policy", NULL);
            goto out;
        }
    } else if (!(generated = kp_random_token(18))) {
        rc = KP_EINTERNAL;
        goto out;
    }
    if ((rc = kp_password_hash(env->cfg, pw ? pw : generated, &hash))) goto out;
    bool must = !pw || temporary != 0;
    const char *q[] = {id, hash, must ? "true" : "false", req->id.sid};
    rc = kp_db_exec(env->db, &r,
                    "WITH u AS (UPDATE users SET password_hash = $2, must_change_password = "
                    "$3::boolean, failed_logins = 0, locked_until = NULL, updated_at = now() "
                    "WHERE id = $1::bigint) UPDATE sessions SET revoked_at = now(), revoked_why "
                    "= 'password reset by an administrator' WHERE user_id = $1::bigint AND "
                    "revoked_at IS NULL AND id <> $4 RETURNING id",
                    4, q);
    if (rc) goto out;
    int n = s_mark_dead(env, r);
    kp_info("admin", "%s reset the password of %s (%d session%s revoked)", req->id.user, username,
            n, n == 1 ? "" : "s");
    json_t *j = json_pack("{s:s, s:b, s:i}", "username", username, "must_change_password", must,
                          "sessions_revoked", n);
    if (generated) json_object_set_new(j, "password", json_string(generated));
    kp_http_json_resp(resp, 200, j);
    resp->compressible = false;
out:
    if (r) PQclear(r);
    if (generated) memset(generated, 0, strlen(generated));
    free(generated);
    free(hash);
    json_decref(b);
    return rc;
}

static int s_user_simple(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                         const char *sql, const char *done)
{
    const char *p[] = {req->params[0]};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, sql, 1, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return s_fail(resp, KP_ENOTFOUND, "no such user", req->params[0]);
    }
    char username[72];
    snprintf(username, sizeof username, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    kp_info("admin", "%s %s %s", req->id.user, done, username);
    return s_user_answer(env, username, resp, 200, NULL);
}

/* POST /api/users/{name}/unlock: ends a lockout after failed logins. */
int kp_api_user_unlock(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_user_simple(env, req, resp,
                         "UPDATE users SET failed_logins = 0, locked_until = NULL, updated_at = "
                         "now() WHERE lower(username) = lower($1) RETURNING username",
                         "unlocked");
}

/* POST /api/users/{name}/reset-mfa: removes the second factor (enrol again at next login). */
int kp_api_user_reset_mfa(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_user_simple(env, req, resp,
                         "UPDATE users SET totp_secret = NULL, totp_pending = NULL, "
                         "totp_last_step = 0, recovery_codes = '{}', updated_at = now() WHERE "
                         "lower(username) = lower($1) RETURNING username",
                         "reset the second factor of");
}

/* ---- roles and permissions ----------------------------------------------------------------- */

static int s_role_answer(kp_http_env_t *env, const char *name, kp_http_resp_t *resp, int status)
{
    return s_object(env, resp, status, "SELECT " S_ROLE_OBJ "::text FROM roles r WHERE r.name = $1",
                    "role", name, NULL);
}

/* After a committed role change: this gateway applies it at once (others within
 * http.auth_reload seconds). */
static void s_reload(kp_http_env_t *env)
{
    int rc = kp_auth_reload(env->auth, env->db);
    if (rc) kp_warn("admin", "cannot reload the role permissions now: %s", kp_strerror(rc));
}

int kp_api_roles_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    return kp_api_list(env, resp,
                       "SELECT json_build_object('roles', coalesce(json_agg(" S_ROLE_OBJ
                       " ORDER BY r.builtin DESC, r.name), '[]'::json))::text FROM roles r");
}

int kp_api_role_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_role_answer(env, req->params[0], resp, 200);
}

int kp_api_permissions_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    return kp_api_list(env, resp,
                       "SELECT json_build_object('permissions', coalesce(json_agg("
                       "json_build_object('name', name, 'description', description) ORDER BY "
                       "name), '[]'::json))::text FROM permissions");
}

/* The common members of POST and PUT /api/roles. -1 when answered. */
static int s_role_fields(json_t *b, kp_http_resp_t *resp, const char **desc, int *mfa,
                         char perms[S_LIT_LEN], int *hp)
{
    int n = 0;
    if (kp_api_opt_str(b, "description", 1000, desc, resp) < 0 ||
        s_opt_bool(b, "require_mfa", mfa, resp) < 0)
        return -1;
    *hp = s_opt_names(b, "permissions", s_perm_ok, "see GET /api/permissions", 32, perms, &n, resp);
    return *hp < 0 ? -1 : 0;
}

/* POST /api/roles {name, description?, permissions[], require_mfa?} */
int kp_api_roles_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    int rc = 0, mfa = -1, hp = 0;
    const char *name, *desc;
    char perms[S_LIT_LEN];
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "name", 64, &name, resp) < 0) goto out;
    if (!name || !s_role_ok(name)) {
        rc = s_fail(resp, KP_EINVAL, "name is required: " S_ROLE_RULE, NULL);
        goto out;
    }
    if (s_role_fields(b, resp, &desc, &mfa, perms, &hp)) goto out;
    if ((rc = kp_api_admin_begin(env))) goto out;
    if ((rc = s_known(env, resp, S_MISSING("permissions"), perms, "permission")) ||
        (rc = s_beyond_caller(env, req, resp, S_PERMS_ADDED, perms, "", S_NOT_YOURS))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    const char *p[] = {name, desc, mfa == 1 ? "true" : "false", perms};
    rc = kp_db_exec(env->db, &r,
                    "WITH r AS (INSERT INTO roles (name, description, require_mfa) VALUES ($1, "
                    "coalesce($2, ''), $3::boolean) ON CONFLICT (name) DO NOTHING RETURNING "
                    "name), p AS (INSERT INTO role_permissions (role, permission) SELECT DISTINCT "
                    "r.name, x FROM r, unnest($4::text[]) x) SELECT name FROM r",
                    4, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a role with this name exists", name);
        goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    s_reload(env);
    kp_info("admin", "%s created role %s (%s)", req->id.user, name, perms);
    rc = s_role_answer(env, name, resp, 201);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    json_decref(b);
    return rc;
}

/* PUT /api/roles/{name} {description?, permissions?, require_mfa?}. Built-in roles: only
 * require_mfa may change (description and permissions may be sent unchanged). */
int kp_api_role_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *name = req->params[0], *desc, *newname;
    int rc = 0, mfa = -1, hp = 0;
    char perms[S_LIT_LEN];
    PGresult *r = NULL, *revoked = NULL;
    if (kp_api_opt_str(b, "name", 64, &newname, resp) < 0) goto out;
    if (newname && strcmp(newname, name)) {
        rc = s_fail(resp, KP_EINVAL, "a role cannot be renamed", NULL);
        goto out;
    }
    if (s_role_fields(b, resp, &desc, &mfa, perms, &hp)) goto out;
    if ((rc = kp_api_admin_begin(env))) goto out;
    const char *p[] = {name, hp == 1 ? perms : NULL, desc};
    rc = kp_db_exec(env->db, &r,
                    "SELECT builtin, require_mfa, $2::text[] IS NOT NULL AND array(SELECT "
                    "DISTINCT x FROM unnest($2::text[]) x ORDER BY 1) IS DISTINCT FROM "
                    "array(SELECT permission FROM role_permissions WHERE role = $1 ORDER BY 1), "
                    "$3::text IS NOT NULL AND $3 <> description FROM roles WHERE name = $1 FOR "
                    "UPDATE",
                    3, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such role", name);
        goto out;
    }
    bool builtin = PQgetvalue(r, 0, 0)[0] == 't', had_mfa = PQgetvalue(r, 0, 1)[0] == 't';
    bool perms_change = PQgetvalue(r, 0, 2)[0] == 't', desc_change = PQgetvalue(r, 0, 3)[0] == 't';
    PQclear(r);
    r = NULL;
    if (builtin && (perms_change || desc_change)) {
        rc = s_fail(resp, KP_ECONFLICT,
                    "a built-in role keeps its permissions and description; only require_mfa "
                    "may change",
                    "create a custom role instead (POST /api/roles)");
        goto out;
    }
    if (hp == 1 &&
        ((rc = s_known(env, resp, S_MISSING("permissions"), perms, "permission")) ||
         (rc = s_beyond_caller(env, req, resp, S_PERMS_ADDED, perms, name, S_NOT_YOURS)))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    long before = 0;
    if ((rc = s_managers(env, &before))) goto out;
    const char *u[] = {name, desc, mfa < 0 ? NULL : mfa ? "true" : "false"};
    if ((rc = kp_db_run(env->db,
                        "UPDATE roles SET description = coalesce($2, description), require_mfa = "
                        "coalesce($3::boolean, require_mfa), updated_at = now() WHERE name = $1",
                        3, u)))
        goto out;
    if (perms_change) {
        const char *q[] = {name, perms};
        if ((rc = kp_db_run(env->db,
                            "WITH d AS (DELETE FROM role_permissions WHERE role = $1 AND NOT "
                            "permission = ANY($2::text[])) INSERT INTO role_permissions (role, "
                            "permission) SELECT DISTINCT $1, x FROM unnest($2::text[]) x ON "
                            "CONFLICT DO NOTHING",
                            2, q)))
            goto out;
        long managers = 0;
        if ((rc = s_managers(env, &managers))) goto out;
        if (managers == 0 && before > 0) {
            rc = s_fail(resp, KP_ECONFLICT, S_LAST_MANAGER, NULL);
            goto out;
        }
    }
    if (mfa == 1 && !had_mfa) {
        /* members without a second factor log in again and are asked to enrol */
        const char *q[] = {name, req->id.sid};
        if ((rc = kp_db_exec(env->db, &revoked,
                             "UPDATE sessions s SET revoked_at = now(), revoked_why = 'a role "
                             "now requires a second factor' FROM users u WHERE s.user_id = u.id "
                             "AND u.totp_secret IS NULL AND s.revoked_at IS NULL AND s.id <> $2 "
                             "AND EXISTS (SELECT 1 FROM user_roles WHERE user_id = u.id AND role "
                             "= $1) RETURNING s.id",
                             2, q)))
            goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    s_mark_dead(env, revoked);
    s_reload(env);
    kp_info("admin", "%s changed role %s%s%s", req->id.user, name,
            perms_change ? " (permissions)" : "",
            mfa == 1   ? " (requires MFA)"
            : mfa == 0 ? " (MFA optional)"
                       : "");
    rc = s_role_answer(env, name, resp, 200);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    if (revoked) PQclear(revoked);
    json_decref(b);
    return rc;
}

/* DELETE /api/roles/{name}: a custom role no user holds. */
int kp_api_role_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *name = req->params[0];
    PGresult *r = NULL;
    int rc = kp_api_admin_begin(env);
    if (rc) goto out;
    const char *p[] = {name};
    rc = kp_db_exec(env->db, &r,
                    "SELECT builtin, (SELECT count(*) FROM user_roles WHERE role = $1) FROM "
                    "roles WHERE name = $1 FOR UPDATE",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such role", name);
        goto out;
    }
    bool builtin = PQgetvalue(r, 0, 0)[0] == 't';
    char detail[96];
    snprintf(detail, sizeof detail, "%s user(s) hold it: change their roles first",
             PQgetvalue(r, 0, 1));
    bool assigned = atol(PQgetvalue(r, 0, 1)) > 0;
    PQclear(r);
    r = NULL;
    if (builtin || assigned) {
        rc = s_fail(resp, KP_ECONFLICT,
                    builtin ? "a built-in role cannot be deleted" : "the role is still assigned",
                    builtin ? NULL : detail);
        goto out;
    }
    if ((rc = kp_db_run(env->db, "DELETE FROM roles WHERE name = $1", 1, p)) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    s_reload(env);
    kp_info("admin", "%s deleted role %s", req->id.user, name);
    resp->status = 204;
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    return rc;
}

/* ---- sites --------------------------------------------------------------------------------- */

static int s_site_answer(kp_http_env_t *env, const char *name, kp_http_resp_t *resp, int status)
{
    return s_object(env, resp, status, "SELECT " S_SITE_OBJ "::text FROM sites s WHERE s.name = $1",
                    "site", name, NULL);
}

int kp_api_sites_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    return kp_api_list(env, resp,
                       "SELECT json_build_object('sites', coalesce(json_agg(" S_SITE_OBJ
                       " ORDER BY s.name), '[]'::json))::text FROM sites s");
}

int kp_api_site_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_site_answer(env, req->params[0], resp, 200);
}

/* POST /api/sites {name, description?} */
int kp_api_sites_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *name, *desc;
    int rc = 0;
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "name", 64, &name, resp) < 0) goto out;
    if (!name || !s_site_ok(name)) {
        rc = s_fail(resp, KP_EINVAL, "name is required: " S_SITE_RULE, NULL);
        goto out;
    }
    if (kp_api_opt_str(b, "description", 1000, &desc, resp) < 0) goto out;
    const char *p[] = {name, desc};
    rc = kp_db_exec(env->db, &r,
                    "INSERT INTO sites (name, description) VALUES ($1, coalesce($2, '')) ON "
                    "CONFLICT (name) DO NOTHING RETURNING id",
                    2, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a site with this name exists", name);
        goto out;
    }
    kp_info("admin", "%s created site %s", req->id.user, name);
    rc = s_site_answer(env, name, resp, 201);
out:
    if (r) PQclear(r);
    json_decref(b);
    return rc;
}

/* PUT /api/sites/{name} {description}: sites are not renamed (tokens and sites.map name them). */
int kp_api_site_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *name = req->params[0], *newname, *desc;
    int rc = 0;
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "name", 64, &newname, resp) < 0 ||
        kp_api_opt_str(b, "description", 1000, &desc, resp) < 0)
        goto out;
    if (newname && strcmp(newname, name)) {
        rc = s_fail(resp, KP_EINVAL, "a site cannot be renamed",
                    "tokens and the sites.map rules refer to sites by name");
        goto out;
    }
    const char *p[] = {name, desc};
    rc = kp_db_exec(env->db, &r,
                    "UPDATE sites SET description = coalesce($2, description) WHERE name = $1 "
                    "RETURNING id",
                    2, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such site", name);
        goto out;
    }
    kp_info("admin", "%s changed site %s", req->id.user, name);
    rc = s_site_answer(env, name, resp, 200);
out:
    if (r) PQclear(r);
    json_decref(b);
    return rc;
}

/* DELETE /api/sites/{name}: not the default site, nor one that studies or users refer to. */
int kp_api_site_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *name = req->params[0];
    PGresult *r = NULL;
    int rc = kp_api_admin_begin(env);
    if (rc) goto out;
    const char *p[] = {name};
    rc = kp_db_exec(env->db, &r,
                    "SELECT id, (SELECT count(*) FROM studies WHERE site_id = s.id), (SELECT "
                    "count(*) FROM user_sites WHERE site_id = s.id) FROM sites s WHERE name = $1 "
                    "FOR UPDATE",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such site", name);
        goto out;
    }
    long studies = atol(PQgetvalue(r, 0, 1)), users = atol(PQgetvalue(r, 0, 2));
    bool dflt = !strcmp(PQgetvalue(r, 0, 0), "1");
    PQclear(r);
    r = NULL;
    char detail[128];
    snprintf(detail, sizeof detail, "%ld stud%s and %ld user(s) belong to it", studies,
             studies == 1 ? "y" : "ies", users);
    if (dflt || studies || users) {
        rc = s_fail(resp, KP_ECONFLICT,
                    dflt ? "the default site cannot be deleted" : "the site is still in use",
                    dflt ? NULL : detail);
        goto out;
    }
    if ((rc = kp_db_run(env->db, "DELETE FROM sites WHERE name = $1", 1, p)) ||
        (rc = kp_db_commit(env->db)))
        goto out;
    kp_info("admin", "%s deleted site %s", req->id.user, name);
    resp->status = 204;
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    return rc;
}
