/* kp_api_routes: routing rules and their deliveries over REST (database worker threads).
 *
 * /api/routes (route.manage) manages route_rules (schema/0008_routes.sql), which pacs-router
 * evaluates (docs/routing.md). A rule is validated as a whole by lib/kp_route (conditions, time
 * window, destinations; 400 with a message naming the field), plus here: a DICOM destination
 * must be a registered AE title (the modality registry). STOW-RS secrets (bearer token, basic
 * password) are stored but never returned: a response shows {"type", "set", "username"}. PUT
 * changes the members sent and keeps the others; a STOW-RS destination sent back without its
 * secret (as GET showed it) keeps the stored one for the same URL and auth type.
 * /api/routes/deliveries lists deliveries; .../{id}/retry makes one pending now (409 when it was
 * delivered: never sent twice unless asked differently), .../retry?state=dead all dead ones.
 * Changes are audited as admin.route by kp_routes_audit. */
#include "kp_api.h"

#include "kp_errors.h"
#include "kp_log.h"
#include "kp_route.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* clang-format off */
#define S_TS(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
#define S_RULE_OBJ                                                                                 \
    "json_build_object('id', r.id, 'name', r.name, 'enabled', r.enabled, 'description', "         \
    "r.description, 'trigger', r.trigger, 'stable_seconds', r.stable_seconds, 'conditions', "      \
    "r.conditions, 'time_window', r.time_window, 'destinations', r.destinations, "                 \
    "'max_attempts', r.max_attempts, 'created_by', r.created_by, 'updated_by', r.updated_by, "     \
    "'created_at', " S_TS("r.created_at") ", 'updated_at', " S_TS("r.updated_at") ")"
#define S_DELIVERY_OBJ                                                                             \
    "json_build_object('id', d.id, 'rule_id', d.rule_id, 'rule_name', r.name, 'destination', "    \
    "substr(d.destination, strpos(d.destination, ':') + 1), 'destination_type', "                 \
    "split_part(d.destination, ':', 1), 'study_uid', d.study_uid, 'sop_uid', d.sop_uid, "          \
    "'state', d.state, 'attempts', d.attempts, 'max_attempts', r.max_attempts, "                   \
    "'next_attempt_at', " S_TS("d.next_attempt_at") ", 'last_error', d.last_error, "               \
    "'created_at', " S_TS("d.created_at") ", 'updated_at', " S_TS("d.updated_at") ", "            \
    "'delivered_at', " S_TS("d.delivered_at") ")"
/* clang-format on */

static int s_fail(kp_http_resp_t *resp, int code, const char *msg, const char *detail)
{
    kp_http_error(resp, code, 0, msg, detail);
    return 0;
}

/* The rule as stored (secrets included) by id, or NULL when there is none. */
static int s_load(kp_http_env_t *env, const char *id, json_t **out)
{
    *out = NULL;
    const char *p[] = {id};
    PGresult *r = NULL;
    int rc =
        kp_db_exec(env->db, &r,
                   "SELECT " S_RULE_OBJ "::text FROM route_rules r WHERE r.id = $1::bigint", 1, p);
    if (rc) return rc;
    if (PQntuples(r) == 1) *out = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
    PQclear(r);
    return 0;
}

/* A rule for a response: its destinations without secrets. Takes o over. */
static json_t *s_public(json_t *o)
{
    json_t *pub = kp_route_destinations_public(json_object_get(o, "destinations"));
    json_object_set_new(o, "destinations", pub);
    return o;
}

static int s_answer(kp_http_env_t *env, const char *id, kp_http_resp_t *resp, int status)
{
    json_t *o = NULL;
    int rc = s_load(env, id, &o);
    if (rc) return rc;
    if (!o) return s_fail(resp, KP_ENOTFOUND, "no such route", id);
    kp_http_json_resp(resp, status, s_public(o));
    return 0;
}

int kp_api_routes_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)req;
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "SELECT " S_RULE_OBJ "::text FROM route_rules r ORDER BY r.name", 0, NULL);
    if (rc) return rc;
    json_t *items = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_t *o = json_loads(PQgetvalue(r, i, 0), 0, NULL);
        if (o) json_array_append_new(items, s_public(o));
    }
    PQclear(r);
    kp_http_json_resp(resp, 200, json_pack("{s:o}", "items", items));
    return 0;
}

int kp_api_route_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    return s_answer(env, req->params[0], resp, 200);
}

/* The members a client may set, and checks on the merged rule: 0, or -1 answered (400). */
static const char *const s_members[] = {"name",        "enabled",        "description",
                                        "trigger",     "stable_seconds", "conditions",
                                        "time_window", "destinations",   "max_attempts"};

static int s_bad(kp_http_resp_t *resp, const char *msg)
{
    kp_http_error(resp, KP_EINVAL, 0, msg, NULL);
    return -1;
}

static int s_validate(kp_http_env_t *env, json_t *rule, kp_http_resp_t *resp)
{
    const char *name = json_string_value(json_object_get(rule, "name"));
    if (!name || !*name || strlen(name) > 128)
        return s_bad(resp, "name: a name of 1 to 128 characters is required");
    for (const char *p = name; *p; p++)
        if ((unsigned char)*p < 0x20) return s_bad(resp, "name: no control characters");
    if (!json_is_boolean(json_object_get(rule, "enabled")))
        return s_bad(resp, "enabled: must be true or false");
    const char *desc = json_string_value(json_object_get(rule, "description"));
    if (!desc || strlen(desc) > 1000)
        return s_bad(resp, "description: a string of at most 1000 bytes");
    const char *trig = json_string_value(json_object_get(rule, "trigger"));
    if (!trig || (strcmp(trig, "instance") && strcmp(trig, "study")))
        return s_bad(resp, "trigger: \"instance\" or \"study\"");
    json_t *ss = json_object_get(rule, "stable_seconds");
    if (!json_is_integer(ss) || json_integer_value(ss) < 0 || json_integer_value(ss) > 604800)
        return s_bad(resp, "stable_seconds: a whole number of seconds from 0 to 604800");
    json_t *ma = json_object_get(rule, "max_attempts");
    if (!json_is_integer(ma) || json_integer_value(ma) < 1 || json_integer_value(ma) > 1000)
        return s_bad(resp, "max_attempts: a whole number from 1 to 1000");
    char err[300];
    kp_route_t *m = kp_route_new(json_object_get(rule, "conditions"),
                                 json_object_get(rule, "time_window"), err, sizeof err);
    if (!m) return s_bad(resp, err);
    kp_route_destroy(&m);
    json_t *cond = json_object_get(rule, "conditions");
    if (!json_is_array(cond)) return s_bad(resp, "conditions: an array (may be empty)");
    json_t *dests = json_object_get(rule, "destinations");
    if (kp_route_destinations_check(dests, err, sizeof err)) return s_bad(resp, err);
    size_t i;
    json_t *d;
    json_array_foreach(dests, i, d)
    {
        const char *ae = json_string_value(json_object_get(d, "ae"));
        if (strcmp(json_string_value(json_object_get(d, "type")), "dicom")) continue;
        const char *p[] = {ae};
        PGresult *r = NULL;
        if (kp_db_exec(env->db, &r, "SELECT 1 FROM modalities WHERE ae_title = $1", 1, p)) {
            kp_http_error(resp, KP_EDB, 0, NULL, NULL);
            return -1;
        }
        bool known = PQntuples(r) == 1;
        PQclear(r);
        if (!known) {
            snprintf(err, sizeof err,
                     "destinations[%zu].ae: %s is not a registered AE title (see /api/modalities)",
                     i, ae);
            return s_bad(resp, err);
        }
    }
    return 0;
}

/* Copies the settable members of body into rule; unknown members are refused (a typo must not
 * silently leave a setting at its default). 0 or -1 answered. */
static int s_merge(json_t *rule, json_t *body, kp_http_resp_t *resp)
{
    const char *key;
    json_t *v;
    json_object_foreach(body, key, v)
    {
        bool known = false;
        for (size_t i = 0; i < sizeof s_members / sizeof s_members[0]; i++)
            if (!strcmp(key, s_members[i])) known = true;
        if (!known) {
            if (!strcmp(key, "id") || !strcmp(key, "created_at") || !strcmp(key, "updated_at") ||
                !strcmp(key, "created_by") || !strcmp(key, "updated_by"))
                continue; /* read-only members a client echoes back */
            char msg[128];
            snprintf(msg, sizeof msg, "%.60s: unknown member of a route", key);
            return s_bad(resp, msg);
        }
        json_object_set(rule, key, v);
    }
    return 0;
}

/* INSERT or UPDATE (id non-NULL) from the merged rule; 0 with *out_id, 1 answered, or a code. */
static int s_write(kp_http_env_t *env, const kp_http_req_t *req, json_t *rule, const char *id,
                   kp_http_resp_t *resp, char out_id[24])
{
    char *conds = json_dumps(json_object_get(rule, "conditions"), JSON_COMPACT);
    json_t *tw = json_object_get(rule, "time_window");
    char *win = tw && !json_is_null(tw) ? json_dumps(tw, JSON_COMPACT) : NULL;
    char *dests = json_dumps(json_object_get(rule, "destinations"), JSON_COMPACT);
    char ss[24], ma[24];
    snprintf(ss, sizeof ss, "%lld",
             (long long)json_integer_value(json_object_get(rule, "stable_seconds")));
    snprintf(ma, sizeof ma, "%lld",
             (long long)json_integer_value(json_object_get(rule, "max_attempts")));
    const char *p[] = {json_string_value(json_object_get(rule, "name")),
                       json_is_true(json_object_get(rule, "enabled")) ? "true" : "false",
                       json_string_value(json_object_get(rule, "description")),
                       json_string_value(json_object_get(rule, "trigger")),
                       ss,
                       conds,
                       win,
                       dests,
                       ma,
                       req->id.user,
                       id};
    PGresult *r = NULL;
    int rc = kp_db_begin(env->db);
    if (!rc)
        rc = kp_db_exec(
            env->db, &r,
            id ? "UPDATE route_rules SET name = $1, enabled = $2::boolean, description = $3, "
                 "trigger = $4, stable_seconds = $5::int, conditions = $6::jsonb, time_window = "
                 "$7::jsonb, destinations = $8::jsonb, max_attempts = $9::int, updated_by = $10, "
                 "updated_at = now() WHERE id = $11::bigint AND NOT EXISTS (SELECT 1 FROM "
                 "route_rules o WHERE o.name = $1 AND o.id <> $11::bigint) RETURNING id"
               : "INSERT INTO route_rules (name, enabled, description, trigger, stable_seconds, "
                 "conditions, time_window, destinations, max_attempts, created_by, updated_by) "
                 "SELECT $1, $2::boolean, $3, $4, $5::int, $6::jsonb, $7::jsonb, $8::jsonb, "
                 "$9::int, $10, $10 WHERE $11::text IS NULL ON CONFLICT (name) DO NOTHING "
                 "RETURNING id",
            11, p);
    free(conds);
    free(win);
    free(dests);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        rc = s_fail(resp, KP_ECONFLICT, "a route with this name exists", p[0]) + 1;
        goto out;
    }
    snprintf(out_id, 24, "%s", PQgetvalue(r, 0, 0));
    rc = kp_db_commit(env->db);
out:
    if (r) PQclear(r);
    kp_db_rollback(env->db);
    return rc;
}

int kp_api_routes_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    int rc = 0;
    json_t *rule =
        json_pack("{s:b, s:s, s:s, s:i, s:[], s:n, s:I}", "enabled", 1, "description", "",
                  "trigger", "instance", "stable_seconds", 30, "conditions", "time_window",
                  "max_attempts", (json_int_t)env->cfg->router_max_attempts);
    if (!rule) abort();
    char id[24];
    if (s_merge(rule, b, resp) || s_validate(env, rule, resp)) goto out;
    rc = s_write(env, req, rule, NULL, resp, id);
    if (rc) {
        if (rc == 1) rc = 0;
        goto out;
    }
    kp_info("admin", "%s created route %s (%s)", req->id.user, id,
            json_string_value(json_object_get(rule, "name")));
    rc = s_answer(env, id, resp, 201);
out:
    json_decref(rule);
    json_decref(b);
    return rc;
}

int kp_api_route_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    json_t *b = kp_http_json_body(req, resp);
    if (!b) return 0;
    const char *id = req->params[0];
    json_t *rule = NULL;
    char out[24];
    int rc = s_load(env, id, &rule);
    if (rc) goto out;
    if (!rule) {
        rc = s_fail(resp, KP_ENOTFOUND, "no such route", id);
        goto out;
    }
    json_t *old = json_incref(json_object_get(rule, "destinations"));
    if (s_merge(rule, b, resp)) {
        json_decref(old);
        goto out;
    }
    json_t *dests = json_object_get(rule, "destinations");
    if (json_is_array(dests)) {
        json_t *copy = json_deep_copy(dests);
        kp_route_destinations_keep_secrets(copy, old);
        json_object_set_new(rule, "destinations", copy);
    }
    json_decref(old);
    if (s_validate(env, rule, resp)) goto out;
    rc = s_write(env, req, rule, id, resp, out);
    if (rc) {
        if (rc == 1) rc = 0;
        goto out;
    }
    kp_info("admin", "%s changed route %s", req->id.user, id);
    rc = s_answer(env, id, resp, 200);
out:
    json_decref(rule);
    json_decref(b);
    return rc;
}

int kp_api_route_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->params[0]};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r, "DELETE FROM route_rules WHERE id = $1::bigint RETURNING name",
                        1, p);
    if (rc) return rc;
    if (PQntuples(r) != 1) {
        s_fail(resp, KP_ENOTFOUND, "no such route", p[0]);
    } else {
        kp_info("admin", "%s removed route %s (%s) and its deliveries", req->id.user, p[0],
                PQgetvalue(r, 0, 0));
        resp->status = 204;
    }
    PQclear(r);
    return 0;
}

/* GET /api/routes/deliveries?state=&rule=&study=&limit=&offset= (newest first) */
int kp_api_route_deliveries(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char state[16] = "", rule[24] = "", study[72] = "";
    long limit, offset;
    if (kp_api_query(req->query, "state", state, sizeof state) < 0 ||
        (state[0] && strcmp(state, "pending") && strcmp(state, "sending") &&
         strcmp(state, "delivered") && strcmp(state, "dead")))
        return s_fail(resp, KP_EINVAL, "state: pending, sending, delivered or dead", NULL);
    if (kp_api_query(req->query, "rule", rule, sizeof rule) < 0 ||
        (rule[0] && (strspn(rule, "0123456789") != strlen(rule) || strlen(rule) > 18)))
        return s_fail(resp, KP_EINVAL, "rule: a route id", NULL);
    if (kp_api_query(req->query, "study", study, sizeof study) < 0)
        return s_fail(resp, KP_EINVAL, "study: a Study Instance UID", NULL);
    if (kp_api_query_long(req, "limit", 100, 1, 1000, &limit) ||
        kp_api_query_long(req, "offset", 0, 0, 100000000, &offset))
        return s_fail(resp, KP_EINVAL, "limit: 1 to 1000; offset: 0 or more", NULL);
    char lim[24], off[24];
    snprintf(lim, sizeof lim, "%ld", limit);
    snprintf(off, sizeof off, "%ld", offset);
    const char *p[] = {state[0] ? state : NULL, rule[0] ? rule : NULL, study[0] ? study : NULL, lim,
                       off};
    PGresult *r = NULL;
    int rc = kp_db_exec(
        env->db, &r,
        "WITH f AS (SELECT d.*, count(*) OVER () AS total FROM route_deliveries d WHERE ($1::text "
        "IS NULL OR d.state = $1) AND ($2::bigint IS NULL OR d.rule_id = $2::bigint) AND "
        "($3::text IS NULL OR d.study_uid = $3) ORDER BY d.id DESC LIMIT $4::int OFFSET $5::int) "
        "SELECT json_build_object('items', coalesce((SELECT json_agg(" S_DELIVERY_OBJ
        " ORDER BY d.id DESC) FROM f d JOIN route_rules r ON r.id = d.rule_id), '[]'::json), "
        "'total', coalesce((SELECT max(total) FROM f), (SELECT count(*) FROM route_deliveries d "
        "WHERE ($1::text IS NULL OR d.state = $1) AND ($2::bigint IS NULL OR d.rule_id = "
        "$2::bigint) AND ($3::text IS NULL OR d.study_uid = $3))))::text",
        5, p);
    if (rc) return rc;
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* POST /api/routes/deliveries/{id}/retry: pending now, attempts from 0 (409 when delivered) */
int kp_api_route_delivery_retry(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *p[] = {req->params[0]};
    PGresult *r = NULL;
    /* one transaction: the answer is the row as this request left it (a router may claim it
     * the moment it commits) */
    int rc = kp_db_begin(env->db);
    if (rc) return rc;
    rc = kp_db_exec(env->db, &r,
                    "WITH old AS (SELECT id, state FROM route_deliveries WHERE id = $1::bigint "
                    "FOR UPDATE), upd AS (UPDATE route_deliveries d SET state = 'pending', "
                    "attempts = 0, next_attempt_at = now(), lease_until = NULL, updated_at = "
                    "now() FROM old WHERE d.id = old.id AND old.state IN ('pending', 'dead') "
                    "RETURNING d.id) SELECT old.state, (SELECT count(*) FROM upd) FROM old",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        s_fail(resp, KP_ENOTFOUND, "no such delivery", p[0]);
        goto out;
    }
    char state[16];
    snprintf(state, sizeof state, "%s", PQgetvalue(r, 0, 0));
    bool done = atoi(PQgetvalue(r, 0, 1)) == 1;
    PQclear(r);
    r = NULL;
    if (!done) {
        s_fail(resp, KP_ECONFLICT,
               !strcmp(state, "delivered") ? "delivered already: it is never sent twice"
                                           : "being sent now",
               state);
        goto out;
    }
    rc = kp_db_exec(env->db, &r,
                    "SELECT " S_DELIVERY_OBJ "::text FROM route_deliveries d JOIN route_rules r "
                    "ON r.id = d.rule_id WHERE d.id = $1::bigint",
                    1, p);
    if (rc) goto out;
    if (PQntuples(r) != 1) {
        s_fail(resp, KP_ENOTFOUND, "no such delivery", p[0]);
        goto out;
    }
    if ((rc = kp_db_commit(env->db))) goto out;
    kp_info("admin", "%s retries delivery %s (was %s)", req->id.user, p[0], state);
    kp_api_text_resp(resp, 200, PQgetvalue(r, 0, 0));
out:
    kp_db_rollback(env->db); /* nothing to undo after the commit */
    if (r) PQclear(r);
    return rc;
}

/* POST /api/routes/deliveries/retry?state=dead[&rule=ID]: every dead delivery pending now */
int kp_api_route_deliveries_retry(kp_http_env_t *env, const kp_http_req_t *req,
                                  kp_http_resp_t *resp)
{
    char state[16] = "", rule[24] = "";
    if (kp_api_query(req->query, "state", state, sizeof state) != 1 || strcmp(state, "dead"))
        return s_fail(resp, KP_EINVAL,
                      "state=dead is required (only dead deliveries are "
                      "retried in bulk)",
                      NULL);
    if (kp_api_query(req->query, "rule", rule, sizeof rule) < 0 ||
        (rule[0] && (strspn(rule, "0123456789") != strlen(rule) || strlen(rule) > 18)))
        return s_fail(resp, KP_EINVAL, "rule: a route id", NULL);
    const char *p[] = {rule[0] ? rule : NULL};
    PGresult *r = NULL;
    int rc = kp_db_exec(env->db, &r,
                        "WITH upd AS (UPDATE route_deliveries SET state = 'pending', attempts = 0, "
                        "next_attempt_at = now(), lease_until = NULL, updated_at = now() WHERE "
                        "state = 'dead' AND ($1::bigint IS NULL OR rule_id = $1::bigint) "
                        "RETURNING id) SELECT count(*) FROM upd",
                        1, p);
    if (rc) return rc;
    long n = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    kp_info("admin", "%s retries %ld dead deliveries", req->id.user, n);
    kp_http_json_resp(resp, 200, json_pack("{s:i}", "retried", (int)n));
    return 0;
}
