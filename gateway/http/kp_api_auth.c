/* kp_api_auth: /api/auth/login, refresh, logout, me and password (database worker threads).
 *
 * Login: username + password (Argon2id, off the event loop), then, for an enrolled account, a
 * TOTP code or a recovery code. Failures count towards a lockout (auth.lockout_attempts within
 * the account, locked for auth.lockout_minutes). Success creates a session (one refresh-token
 * family) and answers with an access token (JWT, auth.access_ttl) and a refresh token: in the
 * JSON body for API clients, or — with "session": "cookie" — only as HttpOnly; Secure;
 * SameSite=Strict __Host- cookies plus a readable CSRF cookie for browsers. An account that must
 * change its password gets a token without roles: it can only change the password (and log out).
 * Refresh rotates the refresh token; presenting one already used revokes the whole session (a
 * stolen token was replayed). The responses never say whether a user name exists. */
#include "kp_api.h"
#include "kp_metrics.h"

#include "kp_audit.h"
#include "kp_auth.h"
#include "kp_errors.h"
#include "kp_jwt.h"
#include "kp_log.h"
#include "kp_password.h"
#include "kp_totp.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* ---- helpers ------------------------------------------------------------------------------- */

/* Records an audit event (lib/kp_audit.h) on this worker's connection: committed at once, or
 * with the open transaction; published on the gateway's shared audit bus, else by the sweep. A
 * failure is logged by kp_audit_emit and does not change the answer. detail: {key: value}
 * when key and value are given. */
static void s_audit(kp_http_env_t *env, const kp_http_req_t *req, const char *actor,
                    const char *action, bool ok, const char *key, const char *value)
{
    if (!strcmp(action, "auth.login_failed")) kp_metrics_add(KP_MET_LOGIN_FAILURES, 1);
    if (!strcmp(action, "auth.login") && ok) kp_metrics_add(KP_MET_LOGINS, 1);
    json_t *d = key && value ? json_pack("{s:s}", key, value) : NULL;
    kp_audit_event_t ev = {.action = action,
                           .outcome = ok ? "success" : "failure",
                           .actor = actor,
                           .client = req->peer,
                           .detail = d};
    kp_audit_emit(env->db, NULL, &ev);
    json_decref(d);
}

static const char *s_str(json_t *o, const char *k)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v && *v ? v : NULL;
}

static void s_cookie(kp_http_resp_t *resp, const char *name, const char *value, long max_age,
                     bool http_only)
{
    if (resp->nset_cookie >= 4) return;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s=%s; Path=/; Secure; SameSite=Strict; Max-Age=%ld%s", name, value,
             max_age, http_only ? "; HttpOnly" : "");
    resp->set_cookie[resp->nset_cookie++] = strdup(buf);
}

/* A PostgreSQL text[] literal ({a,b}) into a NULL-terminated vector (one malloc). */
static char **s_pg_array(const char *lit, int *n)
{
    size_t len = strlen(lit);
    char **v = malloc(sizeof(char *) * (len + 2) + len + 1);
    if (!v) abort();
    char *buf = (char *)(v + len + 2);
    memcpy(buf, lit, len + 1);
    *n = 0;
    if (len >= 2 && buf[0] == '{') {
        char *p = buf + 1;
        buf[len - 1] = 0;
        while (*p) {
            char *e = strchr(p, ',');
            if (e) *e = 0;
            if (*p == '"') { /* role and site names never hold quotes or backslashes */
                p++;
                size_t l = strlen(p);
                if (l && p[l - 1] == '"') p[l - 1] = 0;
            }
            v[(*n)++] = p; /* an empty element (a used recovery code) keeps its index */
            if (!e) break;
            p = e + 1;
        }
    }
    v[*n] = NULL;
    return v;
}

/* What a session token pair needs to know about a user. */
typedef struct {
    char id[24], username[72], display[256], language[8];
    bool must_change, mfa_missing;
    char **roles, **sites;
    int nroles, nsites;
} s_user_t;

static void s_user_free(s_user_t *u)
{
    free(u->roles);
    free(u->sites);
    u->roles = u->sites = NULL;
}

#define S_USER_COLS                                                                                \
    "u.id, u.username, u.display_name, u.language, u.must_change_password, "                       \
    "coalesce((SELECT array_agg(role ORDER BY role) FROM user_roles WHERE user_id = u.id), "       \
    "'{}')::text, coalesce((SELECT array_agg(s.name ORDER BY s.name) FROM user_sites us JOIN "     \
    "sites s ON s.id = us.site_id WHERE us.user_id = u.id), '{}')::text, (u.totp_secret IS NULL "  \
    "AND EXISTS (SELECT 1 FROM user_roles ur JOIN roles r ON r.name = ur.role WHERE ur.user_id = " \
    "u.id AND r.require_mfa))"

static void s_user_from(PGresult *r, int row, int col, s_user_t *u)
{
    snprintf(u->id, sizeof u->id, "%s", PQgetvalue(r, row, col));
    snprintf(u->username, sizeof u->username, "%s", PQgetvalue(r, row, col + 1));
    snprintf(u->display, sizeof u->display, "%s", PQgetvalue(r, row, col + 2));
    snprintf(u->language, sizeof u->language, "%s", PQgetvalue(r, row, col + 3));
    u->must_change = PQgetvalue(r, row, col + 4)[0] == 't';
    u->roles = s_pg_array(PQgetvalue(r, row, col + 5), &u->nroles);
    u->sites = s_pg_array(PQgetvalue(r, row, col + 6), &u->nsites);
    u->mfa_missing = PQgetvalue(r, row, col + 7)[0] == 't';
}

/* Issues an access token for session sid and writes the answer (JSON, and cookies when asked). */
static int s_answer_tokens(kp_http_env_t *env, kp_http_resp_t *resp, const s_user_t *u,
                           const char *sid, const char *refresh, bool cookies)
{
    /* An account that must change its password or enrol a second factor gets no roles until it
     * has: the token then only opens /api/auth/me, /password, /mfa and /logout. */
    bool restricted = u->must_change || u->mfa_missing;
    char *rnd = kp_random_token(9), *token = NULL;
    if (!rnd) return KP_EINTERNAL;
    char jti[96];
    snprintf(jti, sizeof jti, "%s.%s", sid, rnd);
    free(rnd);
    int rc = kp_jwt_issue(kp_auth_jwt(env->auth), u->username,
                          restricted ? NULL : (const char *const *)u->roles,
                          restricted ? 0 : (size_t)u->nroles, (const char *const *)u->sites,
                          (size_t)u->nsites, time(NULL), jti, &token, NULL);
    if (rc) return rc;
    long ttl = env->cfg->auth_access_ttl;
    json_t *roles = json_array(), *sites = json_array();
    for (int i = 0; i < u->nroles; i++)
        json_array_append_new(roles, json_string(u->roles[i]));
    for (int i = 0; i < u->nsites; i++)
        json_array_append_new(sites, json_string(u->sites[i]));
    json_t *j = json_pack("{s:s, s:I, s:b, s:b, s:{s:s, s:s, s:s, s:o, s:o}}", "token_type",
                          "Bearer", "expires_in", (json_int_t)ttl, "must_change_password",
                          u->must_change, "mfa_enrollment_required", u->mfa_missing, "user",
                          "username", u->username, "display_name", u->display, "language",
                          u->language, "roles", roles, "sites", sites);
    if (cookies) {
        char *csrf = kp_random_token(18);
        s_cookie(resp, KP_AUTH_ACCESS_COOKIE, token, ttl, true);
        s_cookie(resp, KP_AUTH_REFRESH_COOKIE, refresh, env->cfg->auth_session_ttl, true);
        if (csrf) s_cookie(resp, KP_AUTH_CSRF_COOKIE, csrf, env->cfg->auth_session_ttl, false);
        free(csrf);
    } else {
        json_object_set_new(j, "access_token", json_string(token));
        json_object_set_new(j, "refresh_token", json_string(refresh));
    }
    free(token);
    kp_http_json_resp(resp, 200, j);
    resp->compressible = false;
    return 0;
}

/* Creates a session with its first refresh token; *sid and *refresh malloc'd. */
static int s_new_session(kp_http_env_t *env, const kp_http_req_t *req, const char *user_id,
                         char **sid, char **refresh)
{
    *sid = kp_random_token(16);
    *refresh = kp_random_token(32);
    if (!*sid || !*refresh) return KP_EINTERNAL;
    char hash[65], ttl[24];
    kp_sha256_hex(*refresh, hash);
    snprintf(ttl, sizeof ttl, "%ld", env->cfg->auth_session_ttl);
    const char *p[] = {*sid, user_id, ttl, req->peer, req->user_agent ? req->user_agent : "", hash};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "WITH s AS (INSERT INTO sessions (id, user_id, expires_at, client_addr, "
                        "user_agent) VALUES ($1, $2::bigint, now() + make_interval(secs => "
                        "$3::int), $4, left($5, 256)) RETURNING id) INSERT INTO refresh_tokens "
                        "(hash, session_id) SELECT $6, id FROM s",
                        6, p);
    if (r) PQclear(r);
    return rc;
}

static bool s_wants_cookies(json_t *body, const kp_http_req_t *req)
{
    const char *s = s_str(body, "session");
    if (s) return !strcmp(s, "cookie");
    return req->cookie != NULL && req->id.via_cookie;
}

/* ---- POST /api/auth/login ------------------------------------------------------------------ */

static int s_fail_login(kp_http_env_t *env, const char *user_id, kp_http_resp_t *resp, int code,
                        const char *msg)
{
    if (user_id) {
        char n[16], m[16];
        snprintf(n, sizeof n, "%ld", env->cfg->auth_lockout_attempts);
        snprintf(m, sizeof m, "%ld", env->cfg->auth_lockout_minutes);
        const char *p[] = {user_id, n, m};
        PGresult *r = NULL;
        kp_db_exec(env->db, &r,
                   "UPDATE users SET failed_logins = CASE WHEN failed_logins + 1 >= $2::int THEN "
                   "0 ELSE failed_logins + 1 END, locked_until = CASE WHEN failed_logins + 1 >= "
                   "$2::int THEN now() + make_interval(mins => $3::int) ELSE locked_until END "
                   "WHERE id = $1::bigint",
                   3, p);
        if (r) PQclear(r);
    }
    kp_http_error(resp, code, 0, msg, NULL);
    return 0;
}

int kp_api_login(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *body = kp_http_json_body(req, resp);
    if (!body) return 0;
    const char *username = s_str(body, "username"), *password = s_str(body, "password");
    if (!username || !password || strlen(username) > 64 || strlen(password) > 1024) {
        json_decref(body);
        kp_http_error(resp, KP_EINVAL, 0, "username and password are required", NULL);
        return 0;
    }
    const char *p[] = {username};
    PGresult *r = NULL;
    int rc =
        kp_db_exec(env->db, &r,
                   "SELECT " S_USER_COLS ", u.password_hash, u.disabled, coalesce(u.locked_until "
                   "> now(), false), coalesce(ceil(extract(epoch FROM u.locked_until - "
                   "now()) / 60), 0)::int, u.totp_secret, u.totp_last_step, "
                   "u.recovery_codes::text FROM users u WHERE lower(u.username) = lower($1)",
                   1, p);
    if (rc) {
        json_decref(body);
        return rc;
    }
    const char *bad = "invalid user name or password";
    if (PQntuples(r) != 1) {
        PQclear(r);
        kp_password_verify(env->cfg, NULL, password, NULL); /* same time as a real check */
        kp_info("auth", "login refused for unknown user %.64s from %s", username, req->peer);
        s_audit(env, req, username, "auth.login_failed", false, "reason", "unknown user");
        json_decref(body);
        kp_http_error(resp, KP_EUNAUTH, 0, bad, NULL);
        return 0;
    }
    s_user_t u = {0};
    s_user_from(r, 0, 0, &u);
    const char *stored = PQgetvalue(r, 0, 8);
    bool disabled = PQgetvalue(r, 0, 9)[0] == 't', locked = PQgetvalue(r, 0, 10)[0] == 't';
    int locked_min = atoi(PQgetvalue(r, 0, 11));
    bool enrolled = !PQgetisnull(r, 0, 12);
    char secret_b32[128];
    snprintf(secret_b32, sizeof secret_b32, "%s", PQgetvalue(r, 0, 12));
    long long last_step = atoll(PQgetvalue(r, 0, 13));
    int ncodes = 0;
    char **codes = s_pg_array(PQgetvalue(r, 0, 14), &ncodes);
    bool rehash = false;
    char msg[160];
    if (locked) {
        snprintf(msg, sizeof msg,
                 "account locked after repeated failed logins; try again in %d minute%s",
                 locked_min, locked_min == 1 ? "" : "s");
        kp_info("auth", "login refused for %s from %s: locked", u.username, req->peer);
        s_audit(env, req, u.username, "auth.login_failed", false, "reason", "locked");
        kp_http_error(resp, KP_ELOCKED, 0, msg, NULL);
        goto out;
    }
    rc = kp_password_verify(env->cfg, stored, password, &rehash);
    if (rc) {
        kp_info("auth", "login refused for %s from %s: wrong password", u.username, req->peer);
        s_audit(env, req, u.username, "auth.login_failed", false, "reason", "wrong password");
        rc = s_fail_login(env, u.id, resp, KP_EUNAUTH, bad);
        goto out;
    }
    if (disabled) {
        kp_info("auth", "login refused for %s from %s: disabled", u.username, req->peer);
        s_audit(env, req, u.username, "auth.login_failed", false, "reason", "disabled");
        kp_http_error(resp, KP_EUNAUTH, 0, "this account is disabled", NULL);
        goto out;
    }
    if (enrolled) {
        const char *code = s_str(body, "totp"), *rec = s_str(body, "recovery_code");
        uint8_t secret[64];
        size_t slen = 0;
        if (!code && !rec) {
            kp_http_error(resp, KP_EMFA, 0, NULL,
                          "send the 6-digit code of your authenticator app as \"totp\", or a "
                          "recovery code as \"recovery_code\"");
            goto out;
        }
        if (code) {
            int64_t step = 0;
            int tr = kp_totp_secret_decode(secret_b32, secret, sizeof secret, &slen)
                         ? KP_EUNAUTH
                         : kp_totp_verify(secret, slen, code, time(NULL), last_step, &step);
            memset(secret, 0, sizeof secret);
            if (tr) {
                kp_info("auth", "login refused for %s from %s: %s", u.username, req->peer,
                        tr == KP_ECONFLICT ? "replayed code" : "wrong code");
                s_audit(env, req, u.username, "auth.login_failed", false, "reason",
                        tr == KP_ECONFLICT ? "replay" : "wrong code");
                rc = s_fail_login(env, u.id, resp, KP_EMFA,
                                  tr == KP_ECONFLICT ? "this code was already used; wait for the "
                                                       "next one"
                                                     : "wrong authenticator code");
                goto out;
            }
            char st[24];
            snprintf(st, sizeof st, "%lld", (long long)step);
            const char *q[] = {u.id, st};
            PGresult *x = NULL;
            /* the step only moves forward, also when two logins race */
            kp_db_exec(env->db, &x,
                       "UPDATE users SET totp_last_step = greatest(totp_last_step, $2::bigint) "
                       "WHERE id = $1::bigint",
                       2, q);
            if (x) PQclear(x);
        } else {
            int idx = kp_totp_recovery_verify(rec, (const char *const *)codes, (size_t)ncodes);
            char ix[16];
            snprintf(ix, sizeof ix, "%d", idx + 1);
            const char *q[] = {u.id, ix, idx >= 0 ? codes[idx] : ""};
            PGresult *x = NULL;
            /* consume it atomically: only if that slot still holds that hash */
            int ur = idx < 0 ? -1
                             : kp_db_exec(env->db, &x,
                                          "UPDATE users SET recovery_codes[$2::int] = '' WHERE "
                                          "id = $1::bigint AND recovery_codes[$2::int] = $3 "
                                          "RETURNING 1",
                                          3, q);
            bool used = ur == 0 && x && PQntuples(x) == 1;
            if (x) PQclear(x);
            if (!used) {
                kp_info("auth", "login refused for %s from %s: wrong recovery code", u.username,
                        req->peer);
                s_audit(env, req, u.username, "auth.login_failed", false, "reason",
                        "wrong recovery code");
                rc = s_fail_login(env, u.id, resp, KP_EMFA, "wrong or already used recovery code");
                goto out;
            }
            kp_warn("auth", "%s logged in with a recovery code from %s", u.username, req->peer);
        }
    }
    {
        char *newhash = NULL;
        if (rehash) kp_password_hash(env->cfg, password, &newhash);
        const char *q[] = {u.id, newhash};
        PGresult *x = NULL;
        rc = kp_db_exec(env->db, &x,
                        "UPDATE users SET failed_logins = 0, locked_until = NULL, last_login_at = "
                        "now(), password_hash = coalesce($2, password_hash) WHERE id = $1::bigint",
                        2, q);
        if (x) PQclear(x);
        free(newhash);
        if (rc) goto out;
    }
    char *sid = NULL, *refresh = NULL;
    rc = s_new_session(env, req, u.id, &sid, &refresh);
    if (!rc) rc = s_answer_tokens(env, resp, &u, sid, refresh, s_wants_cookies(body, req));
    if (!rc) kp_info("auth", "%s logged in from %s (session %.8s...)", u.username, req->peer, sid);
    if (!rc) {
        char sess[12];
        snprintf(sess, sizeof sess, "%.8s", sid);
        s_audit(env, req, u.username, "auth.login", true, "session", sess);
    }
    free(sid);
    free(refresh);
out:
    free(codes);
    s_user_free(&u);
    PQclear(r);
    json_decref(body);
    return rc;
}

/* ---- POST /api/auth/refresh ---------------------------------------------------------------- */

int kp_api_refresh(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char tok[256] = "";
    bool from_cookie = false;
    json_t *body = NULL;
    if (req->body && req->body_len) {
        body = kp_http_json_body(req, resp);
        if (!body) return 0;
        const char *t = s_str(body, "refresh_token");
        if (t && strlen(t) < sizeof tok) snprintf(tok, sizeof tok, "%s", t);
    }
    if (!tok[0] && req->cookie &&
        kp_auth_cookie(req->cookie, strlen(req->cookie), KP_AUTH_REFRESH_COOKIE, tok, sizeof tok))
        from_cookie = true;
    if (!tok[0]) {
        json_decref(body);
        kp_http_error(resp, KP_EUNAUTH, 0, "no refresh token", NULL);
        return 0;
    }
    if (from_cookie && !req->same_origin) {
        json_decref(body);
        kp_http_error(resp, KP_EPERM, 0, "cross-site request refused",
                      "send the X-CSRF-Token header with the value of the __Host-kp_csrf cookie");
        return 0;
    }
    char hash[65], *newtok = kp_random_token(32);
    kp_sha256_hex(tok, hash);
    char newhash[65];
    kp_sha256_hex(newtok ? newtok : "", newhash);
    int rc = kp_db_begin(env->db);
    PGresult *r = NULL;
    const char *p[] = {hash};
    if (!rc)
        rc = kp_db_exec(env->db, &r,
                        "SELECT t.session_id, t.used_at IS NOT NULL, (s.revoked_at IS NULL AND "
                        "s.expires_at > now() AND NOT u.disabled), " S_USER_COLS
                        " FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id JOIN users "
                        "u ON u.id = s.user_id WHERE t.hash = $1 FOR UPDATE OF t, s",
                        1, p);
    s_user_t u = {0};
    char sid[64] = "";
    if (rc) goto fail;
    if (PQntuples(r) != 1) {
        kp_db_rollback(env->db);
        kp_http_error(resp, KP_EUNAUTH, 0, "unknown refresh token; log in again", NULL);
        goto done;
    }
    snprintf(sid, sizeof sid, "%s", PQgetvalue(r, 0, 0));
    bool reused = PQgetvalue(r, 0, 1)[0] == 't', alive = PQgetvalue(r, 0, 2)[0] == 't';
    s_user_from(r, 0, 3, &u);
    PQclear(r);
    r = NULL;
    if (reused) {
        /* A token of this family was presented twice: someone holds a copy. End the session. */
        const char *q[] = {sid};
        rc = kp_db_exec(env->db, &r,
                        "UPDATE sessions SET revoked_at = coalesce(revoked_at, now()), "
                        "revoked_why = coalesce(revoked_why, 'refresh token reused') WHERE id = $1",
                        1, q);
        if (!rc) { /* in the transaction: recorded if and only if the revocation commits */
            char sess[12];
            snprintf(sess, sizeof sess, "%.8s", sid);
            s_audit(env, req, u.username, "auth.refresh_reuse", false, "session", sess);
        }
        if (rc || (rc = kp_db_commit(env->db))) goto fail;
        kp_auth_session_dead(env->auth, sid);
        kp_warn("auth", "refresh token reuse for %s from %s: session %.8s... revoked", u.username,
                req->peer, sid);
        kp_http_error(resp, KP_EUNAUTH, 0,
                      "this refresh token was already used; the session is revoked, log in again",
                      NULL);
        goto done;
    }
    if (!alive) {
        kp_db_rollback(env->db);
        kp_http_error(resp, KP_EUNAUTH, 0, "the session has ended; log in again", NULL);
        goto done;
    }
    const char *q[] = {hash, newhash, sid};
    rc = kp_db_exec(env->db, &r,
                    "WITH a AS (UPDATE refresh_tokens SET used_at = now() WHERE hash = $1), b AS "
                    "(UPDATE sessions SET last_used_at = now() WHERE id = $3) INSERT INTO "
                    "refresh_tokens (hash, session_id) VALUES ($2, $3)",
                    3, q);
    if (r) PQclear(r);
    r = NULL;
    if (rc || (rc = kp_db_commit(env->db))) goto fail;
    rc = s_answer_tokens(env, resp, &u, sid, newtok, from_cookie || s_wants_cookies(body, req));
    goto done;
fail:
    kp_db_rollback(env->db);
done:
    if (r) PQclear(r);
    s_user_free(&u);
    free(newtok);
    json_decref(body);
    return rc;
}

/* ---- POST /api/auth/logout, GET /api/auth/me, POST /api/auth/password ---------------------- */

static void s_clear_cookies(kp_http_resp_t *resp)
{
    s_cookie(resp, KP_AUTH_ACCESS_COOKIE, "", 0, true);
    s_cookie(resp, KP_AUTH_REFRESH_COOKIE, "", 0, true);
    s_cookie(resp, KP_AUTH_CSRF_COOKIE, "", 0, false);
}

int kp_api_logout(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->id.sid};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "UPDATE sessions SET revoked_at = coalesce(revoked_at, now()), "
                        "revoked_why = coalesce(revoked_why, 'logout') WHERE id = $1",
                        1, p);
    if (r) PQclear(r);
    if (rc) return rc;
    kp_auth_session_dead(env->auth, req->id.sid);
    kp_info("auth", "%s logged out (session %.8s...)", req->id.user, req->id.sid);
    {
        char sess[12];
        snprintf(sess, sizeof sess, "%.8s", req->id.sid);
        s_audit(env, req, req->id.user, "auth.logout", true, "session", sess);
    }
    s_clear_cookies(resp);
    resp->status = 204;
    return 0;
}

int kp_api_me(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->id.user};
    PGresult *r = NULL;
    int rc =
        kp_db_exec(env->db, &r,
                   "SELECT " S_USER_COLS ", u.email, u.totp_secret IS NOT NULL, "
                   "coalesce(to_char(u.last_login_at AT TIME ZONE 'UTC', "
                   "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '') FROM users u WHERE lower(u.username) "
                   "= lower($1)",
                   1, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        kp_http_error(resp, KP_EUNAUTH, 0, "no such user any more", NULL);
        return 0;
    }
    s_user_t u = {0};
    s_user_from(r, 0, 0, &u);
    json_t *roles = json_array(), *sites = json_array();
    for (int i = 0; i < u.nroles; i++)
        json_array_append_new(roles, json_string(u.roles[i]));
    for (int i = 0; i < u.nsites; i++)
        json_array_append_new(sites, json_string(u.sites[i]));
    /* the permissions this token grants now (none while restricted) */
    const char *tr[KP_AUTH_MAX_ROLES];
    for (int i = 0; i < req->id.nroles; i++)
        tr[i] = req->id.roles[i];
    char *perms = kp_auth_permissions_json(env->auth, tr, req->id.nroles);
    json_t *pj = json_loads(perms, 0, NULL);
    free(perms);
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:s, s:o, s:o, s:o, s:b, s:b, s:b, s:s, s:b}", "username", u.username,
        "display_name", u.display, "email", PQgetvalue(r, 0, 8), "language", u.language, "roles",
        roles, "sites", sites, "permissions", pj ? pj : json_array(), "site_all", req->id.site_all,
        "mfa_enrolled", PQgetvalue(r, 0, 9)[0] == 't', "must_change_password", u.must_change,
        "last_login_at", PQgetvalue(r, 0, 10), "mfa_enrollment_required", u.mfa_missing);
    s_user_free(&u);
    PQclear(r);
    kp_http_json_resp(resp, 200, j);
    return 0;
}

/* PUT /api/auth/me: what a user may change about her own account without an administrator,
 * today the language of the interface and of new reports. A cookie-authenticated request passes
 * the CSRF check first (main.c), like every other mutation. */
int kp_api_me_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *body = kp_http_json_body(req, resp);
    if (!body) return 0;
    const char *key;
    json_t *v;
    json_object_foreach(body, key, v)
    {
        if (strcmp(key, "language")) {
            kp_http_error(resp, KP_EINVAL, 0, "only language can be changed here", key);
            json_decref(body);
            return 0;
        }
    }
    const char *lang = s_str(body, "language");
    if (!lang || !kp_api_language_ok(lang)) {
        kp_http_error(resp, KP_EINVAL, 0, "language is one of en, ru, es, fr, de", lang);
        json_decref(body);
        return 0;
    }
    const char *p[] = {req->id.user, lang};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "UPDATE users SET language = $2, updated_at = now() WHERE lower(username) "
                        "= lower($1)",
                        2, p);
    json_decref(body);
    if (rc) return rc;
    bool found = atoi(PQcmdTuples(r)) == 1;
    PQclear(r);
    if (!found) {
        kp_http_error(resp, KP_EUNAUTH, 0, "no such user any more", NULL);
        return 0;
    }
    return kp_api_me(env, req, resp);
}

int kp_api_password(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *body = kp_http_json_body(req, resp);
    if (!body) return 0;
    const char *cur = s_str(body, "current_password"), *nw = s_str(body, "new_password");
    int rc = 0;
    if (!cur || !nw) {
        kp_http_error(resp, KP_EINVAL, 0, "current_password and new_password are required", NULL);
        goto out;
    }
    const char *p[] = {req->id.user};
    PGresult *r = NULL;
    rc = kp_db_exec(env->db, &r,
                    "SELECT id, password_hash FROM users WHERE lower(username) = lower($1)", 1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        PQclear(r);
        kp_http_error(resp, KP_EUNAUTH, 0, "no such user any more", NULL);
        goto out;
    }
    char id[24];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    int vr = kp_password_verify(env->cfg, PQgetvalue(r, 0, 1), cur, NULL);
    PQclear(r);
    if (vr) {
        s_audit(env, req, req->id.user, "auth.password", false, "reason", "wrong current password");
        rc = s_fail_login(env, id, resp, KP_EUNAUTH, "the current password is wrong");
        goto out;
    }
    const char *why = NULL;
    if (!strcmp(cur, nw)) {
        kp_http_error(resp, KP_EINVAL, 0, "the new password must differ from the current one",
                      NULL);
        goto out;
    }
    if (kp_password_policy_check(kp_auth_policy(env->auth), req->id.user, nw, &why)) {
        kp_http_error(resp, KP_EINVAL, 0, why ? why : "password refused by the policy", NULL);
        goto out;
    }
    char *hash = NULL;
    if ((rc = kp_password_hash(env->cfg, nw, &hash))) goto out;
    const char *q[] = {id, hash, req->id.sid};
    r = NULL;
    /* other sessions end: whoever knew the old password is logged out */
    rc = kp_db_exec(env->db, &r,
                    "WITH a AS (UPDATE users SET password_hash = $2, must_change_password = "
                    "false, updated_at = now() WHERE id = $1::bigint) UPDATE sessions SET "
                    "revoked_at = now(), revoked_why = 'password changed' WHERE user_id = "
                    "$1::bigint AND id <> $3 AND revoked_at IS NULL RETURNING id",
                    3, q);
    for (int i = 0; r && i < PQntuples(r); i++)
        kp_auth_session_dead(env->auth, PQgetvalue(r, i, 0));
    if (r) PQclear(r);
    free(hash);
    if (rc) goto out;
    kp_info("auth", "%s changed the password", req->id.user);
    s_audit(env, req, req->id.user, "auth.password", true, NULL, NULL);
    kp_http_json_resp(resp, 200,
                      json_pack("{s:b, s:s}", "ok", 1, "next",
                                "POST /api/auth/refresh for a token with your roles"));
out:
    json_decref(body);
    return rc;
}

/* ---- second factor: POST /api/auth/mfa/setup, /mfa/confirm, /mfa/disable ------------------ */

/* Starts (or restarts) enrolment: a new secret is kept aside (totp_pending) and shown once as
 * base32 and as the otpauth:// URI an authenticator app reads from a QR code. */
int kp_api_mfa_setup(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    /* Replacing an enrolled factor needs the password: a stolen access token alone must not be
     * able to plant a second factor of its own. */
    {
        const char *p0[] = {req->id.user};
        PGresult *r0 = NULL;
        int rc0 = kp_db_exec(env->db, &r0,
                             "SELECT password_hash, totp_secret IS NOT NULL FROM users WHERE "
                             "lower(username) = lower($1)",
                             1, p0);
        if (rc0) return rc0;
        bool enrolled = PQntuples(r0) == 1 && PQgetvalue(r0, 0, 1)[0] == 't';
        if (enrolled) {
            json_t *b = req->body && req->body_len ? kp_http_json_body(req, resp) : NULL;
            const char *pw = b ? s_str(b, "password") : NULL;
            bool ok = pw && kp_password_verify(env->cfg, PQgetvalue(r0, 0, 0), pw, NULL) == 0;
            json_decref(b);
            if (!ok) {
                PQclear(r0);
                kp_http_resp_clear(resp);
                kp_http_error(resp, KP_EUNAUTH, 0,
                              "a second factor is enrolled: confirm with {\"password\": ...} to "
                              "replace it",
                              NULL);
                return 0;
            }
        }
        PQclear(r0);
    }
    uint8_t secret[KP_TOTP_SECRET_LEN];
    char b32[KP_TOTP_SECRET_B32_MAX];
    if (kp_totp_secret_new(secret) || kp_totp_secret_base32(secret, sizeof secret, b32, sizeof b32))
        return KP_EINTERNAL;
    memset(secret, 0, sizeof secret);
    const char *p[] = {req->id.user, b32};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "UPDATE users SET totp_pending = $2, updated_at = now() WHERE "
                        "lower(username) = lower($1) RETURNING totp_secret IS NOT NULL",
                        2, p);
    if (rc) return rc;
    bool already = PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    char *uri = kp_totp_uri(env->cfg->auth_totp_issuer, req->id.user, b32);
    char *qr = uri ? kp_totp_qr_svg(uri, 4) : NULL;
    kp_http_json_resp(resp, 200,
                      json_pack("{s:s, s:s, s:s, s:i, s:i, s:b, s:s}", "secret", b32, "otpauth_uri",
                                uri ? uri : "", "qr_svg", qr ? qr : "", "digits", KP_TOTP_DIGITS,
                                "period", KP_TOTP_PERIOD, "replaces_existing", already, "next",
                                "POST /api/auth/mfa/confirm with {\"code\": \"123456\"}"));
    free(qr);
    free(uri);
    return 0;
}

/* Confirms enrolment with a code from the app: the pending secret becomes the factor and ten
 * recovery codes are issued (shown this once; stored hashed). */
int kp_api_mfa_confirm(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *body = kp_http_json_body(req, resp);
    if (!body) return 0;
    const char *code = s_str(body, "code");
    const char *p[] = {req->id.user};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT id, totp_pending FROM users WHERE lower(username) = lower($1) "
                        "AND totp_pending IS NOT NULL",
                        1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1 || !code) {
        PQclear(r);
        kp_http_error(resp, KP_EINVAL, 0,
                      code ? "no enrolment in progress (POST /api/auth/mfa/setup first)"
                           : "send {\"code\": \"<6 digits>\"}",
                      NULL);
        goto out;
    }
    char id[24], b32[KP_TOTP_SECRET_B32_MAX + 8];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    snprintf(b32, sizeof b32, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    uint8_t secret[64];
    size_t slen = 0;
    int64_t step = 0;
    int vr = kp_totp_secret_decode(b32, secret, sizeof secret, &slen)
                 ? KP_EUNAUTH
                 : kp_totp_verify(secret, slen, code, time(NULL), 0, &step);
    memset(secret, 0, sizeof secret);
    if (vr) {
        s_audit(env, req, req->id.user, "auth.mfa", false, "change", "enrol: wrong code");
        kp_http_error(resp, KP_EINVAL, 0, "wrong code: check the time of the device", NULL);
        goto out;
    }
    char codes[KP_TOTP_RECOVERY_COUNT][KP_TOTP_RECOVERY_CODE_MAX];
    char hashes[KP_TOTP_RECOVERY_COUNT][65];
    if ((rc = kp_totp_recovery_new(codes, hashes))) goto out;
    char arr[KP_TOTP_RECOVERY_COUNT * 68 + 4] = "{";
    for (int i = 0; i < KP_TOTP_RECOVERY_COUNT; i++)
        snprintf(arr + strlen(arr), sizeof arr - strlen(arr), "%s%s", i ? "," : "", hashes[i]);
    strcat(arr, "}");
    char st[24];
    snprintf(st, sizeof st, "%lld", (long long)step);
    const char *q[] = {id, arr, st};
    r = NULL;
    rc = kp_db_exec(env->db, &r,
                    "UPDATE users SET totp_secret = totp_pending, totp_pending = NULL, "
                    "totp_last_step = $3::bigint, recovery_codes = $2::text[], updated_at = now() "
                    "WHERE id = $1::bigint",
                    3, q);
    if (r) PQclear(r);
    if (rc) goto out;
    json_t *list = json_array();
    for (int i = 0; i < KP_TOTP_RECOVERY_COUNT; i++)
        json_array_append_new(list, json_string(codes[i]));
    memset(codes, 0, sizeof codes);
    kp_info("auth", "%s enrolled a second factor", req->id.user);
    s_audit(env, req, req->id.user, "auth.mfa", true, "change", "enrolled");
    kp_http_json_resp(
        resp, 200,
        json_pack("{s:b, s:o, s:s}", "enrolled", 1, "recovery_codes", list, "note",
                  "store the recovery codes somewhere safe: each works once, they are "
                  "not shown again"));
out:
    json_decref(body);
    return rc;
}

/* Removes the second factor after the password is confirmed (not allowed when a role of the
 * account requires one: an administrator resets it instead with pacsctl user reset-mfa). */
int kp_api_mfa_disable(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *body = kp_http_json_body(req, resp);
    if (!body) return 0;
    const char *pw = s_str(body, "password");
    const char *p[] = {req->id.user};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT id, password_hash, EXISTS (SELECT 1 FROM user_roles ur JOIN roles "
                        "ro ON ro.name = ur.role WHERE ur.user_id = u.id AND ro.require_mfa) FROM "
                        "users u WHERE lower(username) = lower($1)",
                        1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1 || !pw ||
        kp_password_verify(env->cfg, PQgetvalue(r, 0, 1), pw, NULL) != 0) {
        PQclear(r);
        s_audit(env, req, req->id.user, "auth.mfa", false, "change", "disable: wrong password");
        kp_http_error(resp, KP_EUNAUTH, 0, "confirm with your current password", NULL);
        goto out;
    }
    bool required = PQgetvalue(r, 0, 2)[0] == 't';
    char id[24];
    snprintf(id, sizeof id, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    if (required) {
        kp_http_error(resp, KP_EPERM, 0, "a role of this account requires a second factor", NULL);
        goto out;
    }
    const char *q[] = {id};
    r = NULL;
    rc = kp_db_exec(env->db, &r,
                    "UPDATE users SET totp_secret = NULL, totp_pending = NULL, totp_last_step = 0, "
                    "recovery_codes = '{}', updated_at = now() WHERE id = $1::bigint",
                    1, q);
    if (r) PQclear(r);
    if (rc) goto out;
    kp_info("auth", "%s removed the second factor", req->id.user);
    s_audit(env, req, req->id.user, "auth.mfa", true, "change", "disabled");
    resp->status = 204;
out:
    json_decref(body);
    return rc;
}
