/* kp_api_modalities: the modality registry over REST (database worker threads).
 *
 * /api/modalities (system.configure) manages the same table as `pacsctl ae add|list|remove|echo`
 * (schema/0002_modalities.sql) with the same rules: an AE title has 1 to 16 characters of the
 * DICOM default repertoire, no backslash or control character and no leading or trailing space;
 * a host 1 to 253 bytes; a port 1 to 65535; a site is empty or names an existing site. AE titles
 * are not renamed (register the new one, then remove the old); PUT changes the other fields.
 * POST .../{name}/echo sends a C-ECHO from dicom.ae_title to the registered peer, over DICOM TLS
 * when it is flagged so (our dicom.tls_cert / tls_key, the peer verified against dicom.tls_ca),
 * exactly as `pacsctl ae echo`; the answer is 200 {"ok", "detail"} either way, since a peer that
 * does not answer is a result, not a failed request. Changes are audited as admin.modality by
 * kp_routes_audit. A new row is inserted with ON CONFLICT DO NOTHING (no row back: 409); the
 * site check and the write run in one transaction under the admin API's advisory lock, so a
 * site checked to exist cannot be deleted through the API before the write commits. */
#include "kp_api.h"

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* clang-format off: the SQL fragments below are laid out by hand */
#define S_TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
#define S_MOD_OBJ                                                                                  \
    "json_build_object('ae_title', m.ae_title, 'host', m.host, 'port', m.port, 'description', "    \
    "m.description, 'site', m.site, 'allow_store', m.allow_store, 'allow_find', m.allow_find, "    \
    "'allow_retrieve', m.allow_retrieve, 'tls', m.tls, 'move_associations', "                      \
    "m.move_associations, 'created_at', " S_TS("m.created_at") ", 'updated_at', " S_TS(            \
        "m.updated_at") ")"
/* clang-format on */

#define S_AE_RULE                                                                                  \
    "1 to 16 characters of the DICOM default repertoire, no backslash or control character, not "  \
    "starting or ending with a space"

static int s_fail(kp_http_resp_t *resp, int code, const char *msg, const char *detail)
{
    kp_http_error(resp, code, 0, msg, detail);
    return 0;
}

/* PS3.5 VR AE as pacsctl ae checks it (and the table's CHECK). */
static bool s_ae_ok(const char *ae)
{
    size_t n = strlen(ae);
    if (n < 1 || n > 16 || ae[0] == ' ' || ae[n - 1] == ' ') return false;
    for (size_t i = 0; i < n; i++)
        if (ae[i] < 0x20 || ae[i] > 0x7e || ae[i] == '\\') return false;
    return true;
}

/* An optional boolean member as "true" / "false" (*out NULL when absent or null). 0, or -1
 * invalid (answered). */
static int s_opt_bool(json_t *b, const char *key, const char **out, kp_http_resp_t *resp)
{
    json_t *v = json_object_get(b, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s must be true or false", key);
        kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
        return -1;
    }
    *out = json_is_true(v) ? "true" : "false";
    return 0;
}

/* The fields of POST and PUT (every one optional here; POST checks the required ones). */
typedef struct {
    const char *host, *description, *site;
    const char *allow_store, *allow_find, *allow_retrieve, *tls; /* "true", "false" or NULL */
    char port[8];                                                /* "" when absent */
    char nassoc[8]; /* move_associations, "" when absent */
} s_fields_t;

/* Reads and validates the members other than ae_title. 0, or -1 when answered (400). */
static int s_fields(json_t *b, s_fields_t *f, kp_http_resp_t *resp)
{
    memset(f, 0, sizeof *f);
    if (kp_api_opt_str(b, "host", 253, &f->host, resp) < 0 ||
        kp_api_opt_str(b, "description", 1000, &f->description, resp) < 0 ||
        kp_api_opt_str(b, "site", 64, &f->site, resp) < 0 ||
        s_opt_bool(b, "allow_store", &f->allow_store, resp) < 0 ||
        s_opt_bool(b, "allow_find", &f->allow_find, resp) < 0 ||
        s_opt_bool(b, "allow_retrieve", &f->allow_retrieve, resp) < 0 ||
        s_opt_bool(b, "tls", &f->tls, resp) < 0)
        return -1;
    if (f->host && !*f->host) {
        kp_http_error(resp, KP_EINVAL, 0, "host must have 1 to 253 bytes (name or address)", NULL);
        return -1;
    }
    json_t *p = json_object_get(b, "port");
    if (p && !json_is_null(p)) {
        if (!json_is_integer(p) || json_integer_value(p) < 1 || json_integer_value(p) > 65535) {
            kp_http_error(resp, KP_EINVAL, 0, "port must be a whole number from 1 to 65535", NULL);
            return -1;
        }
        snprintf(f->port, sizeof f->port, "%d", (int)json_integer_value(p));
    }
    json_t *m = json_object_get(b, "move_associations");
    if (m && !json_is_null(m)) {
        if (!json_is_integer(m) || json_integer_value(m) < 1 || json_integer_value(m) > 16) {
            kp_http_error(resp, KP_EINVAL, 0,
                          "move_associations must be a whole number from 1 to 16", NULL);
            return -1;
        }
        snprintf(f->nassoc, sizeof f->nassoc, "%d", (int)json_integer_value(m));
    }
    return 0;
}

/* The statement parameters $1..$10 of INSERT and UPDATE: the AE title, then the fields in
 * table order (NULL: absent, the column's default or current value stays). */
#define S_NPARAMS 10
static void s_params(const char *ae, const s_fields_t *f, const char *p[S_NPARAMS])
{
    const char *v[S_NPARAMS] = {ae,
                                f->host,
                                f->port[0] ? f->port : NULL,
                                f->description,
                                f->site,
                                f->allow_store,
                                f->allow_find,
                                f->allow_retrieve,
                                f->tls,
                                f->nassoc[0] ? f->nassoc : NULL};
    memcpy(p, v, sizeof v);
}

/* Begins the transaction under the admin lock and checks that site (NULL or "" skip) exists.
 * 0, 1 answered 400, or a negative code (the caller rolls back). */
static int s_begin_site(kp_http_env_t *env, kp_http_resp_t *resp, const char *site)
{
    int rc = kp_api_admin_begin(env);
    if (rc || !site || !*site) return rc;
    const char *p[] = {site};
    PGresult *r = NULL;
    if ((rc = kp_db_exec(env->db, &r, "SELECT 1 FROM sites WHERE name = $1", 1, p))) return rc;
    if (PQntuples(r) != 1) {
        kp_http_error(resp, KP_EINVAL, 0, "unknown site (see GET /api/sites; empty for none)",
                      site);
        rc = 1;
    }
    PQclear(r);
    return rc;
}

/* Answers the modality named ae (404 when there is none). */
static int s_answer(kp_http_env_t *env, const char *ae, kp_http_resp_t *resp, int status)
{
    const char *p[] = {ae};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT " S_MOD_OBJ "::text FROM modalities m WHERE m.ae_title = $1", 1, p);
    if (rc) return rc;
    if (PQntuples(r) == 1)
        kp_api_text_resp(resp, status, PQgetvalue(r, 0, 0));
    else
        s_fail(resp, KP_ENOTFOUND, "no such modality", ae);
    PQclear(r);
    return 0;
}

int kp_api_modalities_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    return kp_api_list(env, resp,
                       "SELECT json_build_object('modalities', coalesce(json_agg(" S_MOD_OBJ
                       " ORDER BY m.ae_title), '[]'::json))::text FROM modalities m");
}

int kp_api_modality_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_answer(env, req->params[0], resp, 200);
}

/* POST /api/modalities {ae_title, host, port, description?, site?, allow_store?, allow_find?,
 * allow_retrieve?, tls?, move_associations?} (defaults as pacsctl ae add: every operation
 * allowed, no TLS, one association per C-MOVE). */
int kp_api_modalities_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *ae;
    s_fields_t f;
    int rc = 0;
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "ae_title", 64, &ae, resp) < 0) goto out;
    if (!ae || !s_ae_ok(ae)) {
        rc = s_fail(resp, KP_EINVAL, "ae_title is required: " S_AE_RULE, NULL);
        goto out;
    }
    if (s_fields(b, &f, resp)) goto out;
    if (!f.host || !f.port[0]) {
        rc = s_fail(resp, KP_EINVAL, "host and port are required", NULL);
        goto out;
    }
    if ((rc = s_begin_site(env, resp, f.site))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    const char *p[S_NPARAMS];
    s_params(ae, &f, p);
    rc = kp_db_exec(env->db, &r,
                    "INSERT INTO modalities (ae_title, host, port, description, site, allow_store, "
                    "allow_find, allow_retrieve, tls, move_associations) VALUES ($1, $2, $3::int, "
                    "coalesce($4, ''), coalesce($5, ''), coalesce($6::boolean, true), "
                    "coalesce($7::boolean, true), coalesce($8::boolean, true), "
                    "coalesce($9::boolean, false), coalesce($10::smallint, 1)) ON CONFLICT "
                    "(ae_title) DO NOTHING RETURNING pk",
                    S_NPARAMS, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a modality with this AE title is registered", ae);
        goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    kp_info("admin", "%s registered modality %s (%s:%s)", req->id.user, ae, f.host, f.port);
    rc = s_answer(env, ae, resp, 201);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    json_decref(b);
    return rc;
}

/* PUT /api/modalities/{ae} {host?, port?, description?, site?, allow_*?, tls?,
 * move_associations?}: the members sent change, the others stay. */
int kp_api_modality_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *ae = req->params[0], *newae;
    s_fields_t f;
    int rc = 0;
    PGresult *r = NULL;
    if (kp_api_opt_str(b, "ae_title", 64, &newae, resp) < 0) goto out;
    if (newae && strcmp(newae, ae)) {
        rc = s_fail(resp, KP_EINVAL, "an AE title cannot be changed",
                    "register the new AE title (POST /api/modalities), then remove the old one");
        goto out;
    }
    if (s_fields(b, &f, resp)) goto out;
    if ((rc = s_begin_site(env, resp, f.site))) {
        if (rc == 1) rc = 0;
        goto out;
    }
    const char *p[S_NPARAMS];
    s_params(ae, &f, p);
    rc = kp_db_exec(env->db, &r,
                    "UPDATE modalities SET host = coalesce($2, host), port = coalesce($3::int, "
                    "port), description = coalesce($4, description), site = coalesce($5, site), "
                    "allow_store = coalesce($6::boolean, allow_store), allow_find = "
                    "coalesce($7::boolean, allow_find), allow_retrieve = coalesce($8::boolean, "
                    "allow_retrieve), tls = coalesce($9::boolean, tls), move_associations = "
                    "coalesce($10::smallint, move_associations), updated_at = now() WHERE "
                    "ae_title = $1 RETURNING pk",
                    S_NPARAMS, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such modality", ae);
        goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    kp_info("admin", "%s changed modality %s", req->id.user, ae);
    rc = s_answer(env, ae, resp, 200);
out:
    kp_db_rollback(env->db);
    if (r) PQclear(r);
    json_decref(b);
    return rc;
}

/* DELETE /api/modalities/{ae} */
int kp_api_modality_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->params[0]};
    PGresult *r = NULL;
    int rc =
        kp_db_exec(env->db, &r, "DELETE FROM modalities WHERE ae_title = $1 RETURNING pk", 1, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        s_fail(resp, KP_ENOTFOUND, "no such modality", p[0]);
    } else {
        kp_info("admin", "%s removed modality %s", req->id.user, p[0]);
        resp->status = 204;
    }
    PQclear(r);
    return 0;
}

/* POST /api/modalities/{ae}/echo: 200 {"ok": true|false, "detail": "..."} (404 when the AE
 * title is not registered). Waits up to dicom.acse_timeout seconds per message on this worker
 * thread, as pacsctl ae echo does. */
int kp_api_modality_echo(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *ae = req->params[0];
    const char *p[] = {ae};
    PGresult *r = NULL;
    int rc =
        kp_db_exec(env->db, &r, "SELECT host, port, tls FROM modalities WHERE ae_title = $1", 1, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return s_fail(resp, KP_ENOTFOUND, "no such modality", ae);
    }
    char host[256], err[512] = "", detail[1024];
    snprintf(host, sizeof host, "%s", PQgetvalue(r, 0, 0));
    int port = atoi(PQgetvalue(r, 0, 1));
    bool tls = !strcmp(PQgetvalue(r, 0, 2), "t");
    PQclear(r);
    const kp_config_t *cfg = env->cfg;
    const char *how = tls ? " (TLS)" : "";
    bool ok = false;
    if (tls && !*cfg->dicom_tls_ca) {
        snprintf(detail, sizeof detail,
                 "%s is registered with TLS: set dicom.tls_ca (and dicom.tls_cert, "
                 "dicom.tls_key for a client certificate)",
                 ae);
    } else {
        kp_dicom_tls_t t = {.cert_file = cfg->dicom_tls_cert,
                            .key_file = cfg->dicom_tls_key,
                            .ca_file = cfg->dicom_tls_ca};
        ok = !kp_dicom_echo_tls(host, port, cfg->dicom_ae_title, ae, (int)cfg->dicom_acse_timeout,
                                tls ? &t : NULL, err, sizeof err);
        snprintf(detail, sizeof detail, "C-ECHO %s -> %s at %s:%d%s%s%s", cfg->dicom_ae_title, ae,
                 host, port, how, ok ? ": success" : " failed: ", ok ? "" : err);
    }
    kp_info("admin", "%s: %s", req->id.user, detail);
    json_t *j = json_pack("{s:b, s:s}", "ok", ok, "detail", detail);
    if (!j) j = json_pack("{s:b, s:s}", "ok", ok, "detail", "(not valid UTF-8)");
    if (!j) abort();
    kp_http_json_resp(resp, 200, j);
    return 0;
}
