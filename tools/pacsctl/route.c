/* pacsctl route: routing rules and deliveries (schema/0008_routes.sql, docs/routing.md).
 *
 *   pacsctl route list
 *   pacsctl route add --json FILE      a rule as /api/routes takes it (name, trigger, conditions,
 *                                      time_window, destinations, ...); "-" reads stdin
 *   pacsctl route remove ID            the rule and its deliveries
 *   pacsctl route deliveries [--state pending|sending|delivered|dead] [--rule ID] [--limit N]
 *   pacsctl route retry ID | --dead    make a delivery (or every dead one) pending now; a
 *                                      delivered one is refused (exit 1)
 *
 * A rule is checked as the API checks it (lib/kp_route: conditions, time window, destinations;
 * a DICOM destination must be a registered AE title). Secrets are never printed. */
#include "kp_errors.h"
#include "kp_route.h"
#include "pacsctl.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int s_list(kp_db_t *db)
{
    PGresult *r = NULL;
    if (kp_db_exec(db, &r,
                   "SELECT r.id, r.name, CASE WHEN r.enabled THEN 'yes' ELSE 'no' END, r.trigger "
                   "|| CASE WHEN r.trigger = 'study' THEN ' (' || r.stable_seconds || 's)' ELSE "
                   "'' END, jsonb_array_length(r.conditions), (SELECT string_agg(CASE d->>'type' "
                   "WHEN 'dicom' THEN d->>'ae' ELSE d->>'url' END, ', ') FROM "
                   "jsonb_array_elements(r.destinations) d), r.max_attempts FROM route_rules r "
                   "ORDER BY r.id",
                   0, NULL))
        return 1;
    printf("%-5s %-24s %-7s %-16s %-5s %-8s %s\n", "id", "name", "enabled", "trigger", "conds",
           "attempts", "destinations");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-5s %-24s %-7s %-16s %-5s %-8s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
               PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4), PQgetvalue(r, i, 6),
               PQgetvalue(r, i, 5));
    if (!PQntuples(r)) printf("(no routing rule: pacsctl route add --json FILE)\n");
    PQclear(r);
    return 0;
}

static int s_add(const kp_config_t *cfg, kp_db_t *db, int argc, char **argv)
{
    const char *file = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            file = argv[++i];
        } else {
            fprintf(stderr, "pacsctl: route add: unknown option '%s' (--json FILE)\n", argv[i]);
            return 2;
        }
    }
    if (!file) {
        fprintf(stderr, "pacsctl: route add needs --json FILE\n");
        return 2;
    }
    json_error_t je;
    json_t *b = !strcmp(file, "-") ? json_loadf(stdin, 0, &je) : json_load_file(file, 0, &je);
    if (!json_is_object(b)) {
        fprintf(stderr, "pacsctl: route add: %s: not a JSON object (%s, line %d)\n", file, je.text,
                je.line);
        json_decref(b);
        return 1;
    }
    int rc = 1;
    char err[300] = "";
    const char *name = json_string_value(json_object_get(b, "name"));
    const char *trig = json_string_value(json_object_get(b, "trigger"));
    json_t *en = json_object_get(b, "enabled"), *ss = json_object_get(b, "stable_seconds"),
           *ma = json_object_get(b, "max_attempts");
    const char *desc = json_string_value(json_object_get(b, "description"));
    json_t *conds = json_object_get(b, "conditions"), *win = json_object_get(b, "time_window"),
           *dests = json_object_get(b, "destinations");
    kp_route_t *m = NULL;
    if (!name || !*name || strlen(name) > 128) {
        snprintf(err, sizeof err, "name: a name of 1 to 128 characters is required");
    } else if (trig && strcmp(trig, "instance") && strcmp(trig, "study")) {
        snprintf(err, sizeof err, "trigger: \"instance\" or \"study\"");
    } else if (en && !json_is_boolean(en)) {
        snprintf(err, sizeof err, "enabled: true or false");
    } else if (ss && (!json_is_integer(ss) || json_integer_value(ss) < 0 ||
                      json_integer_value(ss) > 604800)) {
        snprintf(err, sizeof err, "stable_seconds: 0 to 604800");
    } else if (ma && (!json_is_integer(ma) || json_integer_value(ma) < 1 ||
                      json_integer_value(ma) > 1000)) {
        snprintf(err, sizeof err, "max_attempts: 1 to 1000");
    } else if (conds && !json_is_array(conds)) {
        snprintf(err, sizeof err, "conditions: an array");
    } else if (!(m = kp_route_new(conds, win, err, sizeof err))) {
        /* err set */
    } else {
        kp_route_destinations_check(dests, err, sizeof err);
    }
    kp_route_destroy(&m);
    size_t i;
    json_t *d;
    json_array_foreach(dests, i, d)
    {
        if (err[0]) break;
        if (strcmp(json_string_value(json_object_get(d, "type")), "dicom")) continue;
        const char *p[] = {json_string_value(json_object_get(d, "ae"))};
        PGresult *r = NULL;
        if (kp_db_exec(db, &r, "SELECT 1 FROM modalities WHERE ae_title = $1", 1, p)) goto out;
        if (PQntuples(r) != 1)
            snprintf(err, sizeof err,
                     "destinations[%zu].ae: %s is not a registered AE title (pacsctl ae add)", i,
                     p[0]);
        PQclear(r);
    }
    if (err[0]) {
        fprintf(stderr, "pacsctl: route add: %s\n", err);
        goto out;
    }
    char *cj = json_dumps(conds ? conds : json_array(), JSON_COMPACT | JSON_ENCODE_ANY);
    char *wj = win && !json_is_null(win) ? json_dumps(win, JSON_COMPACT) : NULL;
    char *dj = json_dumps(dests, JSON_COMPACT);
    char ssb[24], mab[24];
    snprintf(ssb, sizeof ssb, "%lld", ss ? (long long)json_integer_value(ss) : 30LL);
    snprintf(mab, sizeof mab, "%lld",
             ma ? (long long)json_integer_value(ma) : (long long)cfg->router_max_attempts);
    const char *p[] = {name,
                       en && json_is_false(en) ? "false" : "true",
                       desc ? desc : "",
                       trig ? trig : "instance",
                       ssb,
                       cj,
                       wj,
                       dj,
                       mab};
    PGresult *r = NULL;
    int qr = kp_db_exec(db, &r,
                        "INSERT INTO route_rules (name, enabled, description, trigger, "
                        "stable_seconds, conditions, time_window, destinations, max_attempts, "
                        "created_by, updated_by) VALUES ($1, $2::boolean, $3, $4, $5::int, "
                        "$6::jsonb, $7::jsonb, $8::jsonb, $9::int, 'pacsctl', 'pacsctl') ON "
                        "CONFLICT (name) DO NOTHING RETURNING id",
                        9, p);
    free(cj);
    free(wj);
    free(dj);
    if (qr) goto out;
    if (PQntuples(r) != 1) {
        fprintf(stderr, "pacsctl: route add: a route named %s exists\n", name);
    } else {
        printf("route %s (%s) added\n", PQgetvalue(r, 0, 0), name);
        rc = 0;
    }
    PQclear(r);
out:
    json_decref(b);
    return rc;
}

static int s_remove(kp_db_t *db, const char *id)
{
    if (strspn(id, "0123456789") != strlen(id) || strlen(id) > 18) {
        fprintf(stderr, "pacsctl: route remove: '%s' is not a route id\n", id);
        return 2;
    }
    const char *p[] = {id};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, "DELETE FROM route_rules WHERE id = $1::bigint RETURNING name", 1, p))
        return 1;
    int rc = PQntuples(r) == 1 ? 0 : 1;
    if (rc)
        fprintf(stderr, "pacsctl: route remove: no route %s\n", id);
    else
        printf("route %s (%s) removed with its deliveries\n", id, PQgetvalue(r, 0, 0));
    PQclear(r);
    return rc;
}

static int s_deliveries(kp_db_t *db, int argc, char **argv)
{
    const char *state = NULL, *rule = NULL, *limit = "50";
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--state") && i + 1 < argc)
            state = argv[++i];
        else if (!strcmp(argv[i], "--rule") && i + 1 < argc)
            rule = argv[++i];
        else if (!strcmp(argv[i], "--limit") && i + 1 < argc)
            limit = argv[++i];
        else {
            fprintf(stderr, "pacsctl: route deliveries: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (state && strcmp(state, "pending") && strcmp(state, "sending") &&
        strcmp(state, "delivered") && strcmp(state, "dead")) {
        fprintf(stderr, "pacsctl: --state pending, sending, delivered or dead\n");
        return 2;
    }
    if ((rule && (strspn(rule, "0123456789") != strlen(rule) || !*rule || strlen(rule) > 18)) ||
        strspn(limit, "0123456789") != strlen(limit) || !*limit || strlen(limit) > 6) {
        fprintf(stderr, "pacsctl: --rule and --limit take whole numbers\n");
        return 2;
    }
    const char *p[] = {state, rule, limit};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r,
                   "SELECT d.id, r.name, substr(d.destination, strpos(d.destination, ':') + 1), "
                   "coalesce(d.sop_uid, 'study ' || d.study_uid), d.state, d.attempts || '/' || "
                   "r.max_attempts, to_char(d.next_attempt_at AT TIME ZONE 'UTC', "
                   "'YYYY-MM-DD HH24:MI:SS'), coalesce(d.last_error, '') FROM route_deliveries d "
                   "JOIN route_rules r ON r.id = d.rule_id WHERE ($1::text IS NULL OR d.state = "
                   "$1) AND ($2::bigint IS NULL OR d.rule_id = $2::bigint) ORDER BY d.id DESC "
                   "LIMIT $3::int",
                   3, p))
        return 1;
    printf("%-6s %-18s %-24s %-40s %-9s %-8s %-19s %s\n", "id", "rule", "destination", "instance",
           "state", "attempts", "next attempt (UTC)", "last error");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-6s %-18s %-24s %-40s %-9s %-8s %-19s %s\n", PQgetvalue(r, i, 0),
               PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
               PQgetvalue(r, i, 5), PQgetvalue(r, i, 6), PQgetvalue(r, i, 7));
    PQclear(r);
    return 0;
}

static int s_retry(kp_db_t *db, const char *what)
{
    PGresult *r = NULL;
    if (!strcmp(what, "--dead")) {
        if (kp_db_exec(db, &r,
                       "WITH upd AS (UPDATE route_deliveries SET state = 'pending', attempts = 0, "
                       "next_attempt_at = now(), lease_until = NULL, updated_at = now() WHERE "
                       "state = 'dead' RETURNING id) SELECT count(*) FROM upd",
                       0, NULL))
            return 1;
        printf("%s dead deliveries pending again\n", PQgetvalue(r, 0, 0));
        PQclear(r);
        return 0;
    }
    if (strspn(what, "0123456789") != strlen(what) || !*what || strlen(what) > 18) {
        fprintf(stderr, "pacsctl: route retry ID|--dead\n");
        return 2;
    }
    const char *p[] = {what};
    if (kp_db_exec(db, &r,
                   "WITH old AS (SELECT id, state FROM route_deliveries WHERE id = $1::bigint FOR "
                   "UPDATE), upd AS (UPDATE route_deliveries d SET state = 'pending', attempts = "
                   "0, next_attempt_at = now(), lease_until = NULL, updated_at = now() FROM old "
                   "WHERE d.id = old.id AND old.state IN ('pending', 'dead') RETURNING d.id) "
                   "SELECT old.state, (SELECT count(*) FROM upd) FROM old",
                   1, p))
        return 1;
    int rc = 1;
    if (PQntuples(r) != 1)
        fprintf(stderr, "pacsctl: route retry: no delivery %s\n", what);
    else if (atoi(PQgetvalue(r, 0, 1)) != 1)
        fprintf(stderr, "pacsctl: route retry: delivery %s is %s%s\n", what, PQgetvalue(r, 0, 0),
                !strcmp(PQgetvalue(r, 0, 0), "delivered") ? " (never sent twice)" : " now");
    else {
        printf("delivery %s pending again (was %s)\n", what, PQgetvalue(r, 0, 0));
        rc = 0;
    }
    PQclear(r);
    return rc;
}

int pacsctl_route(const kp_config_t *cfg, int argc, char **argv)
{
    const char *cmd = argc ? argv[0] : "list";
    if ((!strcmp(cmd, "remove") || !strcmp(cmd, "retry")) && argc < 2) {
        fprintf(stderr, "pacsctl: route %s needs %s\n", cmd,
                !strcmp(cmd, "retry") ? "a delivery id or --dead" : "a route id");
        return 2;
    }
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    int rc = 2;
    if (!strcmp(cmd, "list"))
        rc = s_list(db);
    else if (!strcmp(cmd, "add"))
        rc = s_add(cfg, db, argc - 1, argv + 1);
    else if (!strcmp(cmd, "remove"))
        rc = s_remove(db, argv[1]);
    else if (!strcmp(cmd, "deliveries"))
        rc = s_deliveries(db, argc - 1, argv + 1);
    else if (!strcmp(cmd, "retry"))
        rc = s_retry(db, argv[1]);
    else
        fprintf(stderr,
                "pacsctl: unknown route command '%s' (list, add, remove, deliveries, retry)\n",
                cmd);
    kp_db_destroy(&db);
    return rc;
}
