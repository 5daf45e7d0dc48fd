/* pacs-router: rules, the scan that turns newly indexed instances into deliveries, and the
 * stable-study check (see workers/README, "pacs-router").
 *
 * PostgreSQL is the truth: the scan walks instances by their pk from a watermark stored in
 * route_scan, so instances indexed while no router ran are routed when one comes back; events
 * (study.changed) only make it sooner. A delivery is an INSERT ... ON CONFLICT DO NOTHING on
 * its unique key, so evaluating an instance twice (after a crash, or the rescanned last
 * ROUTER_SCAN_LAG_S seconds) never creates a second delivery. One router scans at a time
 * (advisory lock); the watermark moves in the transaction that created the deliveries. */
#include "router.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void router_rules_clear(router_t *r)
{
    for (size_t i = 0; i < r->nrules; i++) {
        router_rule_t *u = &r->rules[i];
        kp_route_destroy(&u->match);
        json_decref(u->destinations);
        for (size_t k = 0; k < u->nkeys; k++)
            free(u->keys[k]);
        free(u->keys);
    }
    free(r->rules);
    r->rules = NULL;
    r->nrules = 0;
}

int router_rules_load(router_t *r)
{
    PGresult *res = NULL;
    int rc = kp_db_exec(r->db, &res,
                        "SELECT id, name, trigger, conditions::text, coalesce(time_window::text, "
                        "'null'), destinations::text, extract(epoch FROM created_at)::bigint FROM "
                        "route_rules WHERE enabled ORDER BY id",
                        0, NULL);
    if (rc) return rc;
    router_rules_clear(r);
    int n = PQntuples(res);
    r->rules = calloc((size_t)n + 1, sizeof *r->rules);
    if (!r->rules) abort();
    for (int i = 0; i < n; i++) {
        router_rule_t *u = &r->rules[r->nrules];
        u->id = atoll(PQgetvalue(res, i, 0));
        snprintf(u->name, sizeof u->name, "%s", PQgetvalue(res, i, 1));
        u->study = !strcmp(PQgetvalue(res, i, 2), "study");
        u->created = (time_t)atoll(PQgetvalue(res, i, 6));
        json_t *conds = json_loads(PQgetvalue(res, i, 3), JSON_DECODE_ANY, NULL);
        json_t *win = json_loads(PQgetvalue(res, i, 4), JSON_DECODE_ANY, NULL);
        u->destinations = json_loads(PQgetvalue(res, i, 5), 0, NULL);
        char err[256] = "";
        u->match = kp_route_new(conds, win, err, sizeof err);
        json_decref(conds);
        json_decref(win);
        if (u->match && kp_route_destinations_check(u->destinations, err, sizeof err) == 0) {
            size_t nd = json_array_size(u->destinations);
            u->keys = calloc(nd, sizeof *u->keys);
            if (!u->keys) abort();
            for (size_t k = 0; k < nd; k++) {
                char key[KP_ROUTE_MAX_URL + 8];
                kp_route_destination_key(json_array_get(u->destinations, k), key, sizeof key);
                u->keys[k] = strdup(key);
                if (!u->keys[k]) abort();
                u->nkeys++;
            }
            r->nrules++;
            continue;
        }
        kp_error("rules", "rule %lld (%s) skipped: %s", (long long)u->id, u->name, err);
        kp_route_destroy(&u->match);
        json_decref(u->destinations);
        memset(u, 0, sizeof *u);
    }
    PQclear(res);
    return 0;
}

/* Evaluates one batch of instances after r->cursor in the current transaction; returns how
 * many rows were read (or a negative code) and sets *max_pk. */
static int s_batch(router_t *r, int64_t *max_pk)
{
    char cur[24], batch[24];
    snprintf(cur, sizeof cur, "%lld", (long long)r->cursor);
    snprintf(batch, sizeof batch, "%ld", r->cfg->router_scan_batch);
    const char *p[] = {cur, batch};
    PGresult *res = NULL;
    int rc = kp_db_exec(
        r->db, &res,
        "SELECT i.pk, i.sop_uid, st.study_uid, se.modality, i.sop_class_uid, i.calling_ae, "
        "i.called_ae, i.metadata::text, extract(epoch FROM i.created_at)::bigint FROM instances i "
        "JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk WHERE i.pk "
        "> $1::bigint ORDER BY i.pk LIMIT $2::int",
        2, p);
    if (rc) return rc;
    int n = PQntuples(res);
    for (int i = 0; i < n && !rc; i++) {
        *max_pk = atoll(PQgetvalue(res, i, 0));
        json_t *md = json_loads(PQgetvalue(res, i, 7), 0, NULL);
        kp_route_instance_t in = {
            .modality = PQgetisnull(res, i, 3) ? NULL : PQgetvalue(res, i, 3),
            .sop_class = PQgetisnull(res, i, 4) ? NULL : PQgetvalue(res, i, 4),
            .calling_ae = PQgetisnull(res, i, 5) ? NULL : PQgetvalue(res, i, 5),
            .called_ae = PQgetisnull(res, i, 6) ? NULL : PQgetvalue(res, i, 6),
            .metadata = md,
            .when = (time_t)atoll(PQgetvalue(res, i, 8)),
        };
        const char *sop = PQgetvalue(res, i, 1), *study = PQgetvalue(res, i, 2);
        for (size_t k = 0; k < r->nrules && !rc; k++) {
            const router_rule_t *u = &r->rules[k];
            if (in.when < u->created || !kp_route_match(u->match, &in)) continue;
            char id[24];
            snprintf(id, sizeof id, "%lld", (long long)u->id);
            if (u->study) {
                const char *q[] = {id, study};
                rc = kp_db_run(r->db,
                               "INSERT INTO route_study_watch (rule_id, study_uid) SELECT "
                               "$1::bigint, $2 WHERE NOT EXISTS (SELECT 1 FROM route_deliveries "
                               "WHERE rule_id = $1::bigint AND study_uid = $2 AND sop_uid IS "
                               "NULL) ON CONFLICT DO NOTHING",
                               2, q);
                continue;
            }
            for (size_t d = 0; d < u->nkeys && !rc; d++) {
                const char *q[] = {id, u->keys[d], study, sop};
                PGresult *ins = NULL;
                rc = kp_db_exec(r->db, &ins,
                                "INSERT INTO route_deliveries (rule_id, destination, study_uid, "
                                "sop_uid) VALUES ($1::bigint, $2, $3, $4) ON CONFLICT (rule_id, "
                                "destination, sop_uid) WHERE sop_uid IS NOT NULL DO NOTHING "
                                "RETURNING id",
                                4, q);
                if (!rc && PQntuples(ins) == 1)
                    kp_info("route", "rule %s: %s -> %s (delivery %s)", u->name, sop, u->keys[d],
                            PQgetvalue(ins, 0, 0));
                if (ins) PQclear(ins);
            }
        }
        json_decref(md);
    }
    PQclear(res);
    return rc ? rc : n;
}

int router_scan(router_t *r, bool from_watermark)
{
    int total = 0;
    for (;;) {
        PGresult *res = NULL;
        int rc = kp_db_begin(r->db);
        if (rc) return rc;
        rc = kp_db_exec(r->db, &res, "SELECT pg_try_advisory_xact_lock(" ROUTER_SCAN_LOCK ")", 0,
                        NULL);
        if (rc) goto fail;
        bool locked = PQgetvalue(res, 0, 0)[0] == 't';
        PQclear(res);
        res = NULL;
        if (!locked) {
            kp_db_rollback(r->db);
            kp_debug("scan", "another router is scanning");
            return total;
        }
        rc = kp_db_exec(r->db, &res, "SELECT watermark FROM route_scan WHERE id = 1 FOR UPDATE", 0,
                        NULL);
        if (rc) goto fail;
        int64_t wm = PQntuples(res) == 1 ? atoll(PQgetvalue(res, 0, 0)) : 0;
        PQclear(res);
        res = NULL;
        /* another router may have moved the watermark past our cursor */
        if (from_watermark || r->cursor < wm) r->cursor = wm;
        from_watermark = false;
        int64_t max_pk = r->cursor;
        int n = s_batch(r, &max_pk);
        if (n < 0) {
            rc = n;
            goto fail;
        }
        /* the new watermark: everything up to the cursor, except what was indexed within the
         * lag (kept for the next scans to look at again) */
        char cur[24], old[24], lag[24];
        snprintf(cur, sizeof cur, "%lld", (long long)max_pk);
        snprintf(old, sizeof old, "%lld", (long long)wm);
        snprintf(lag, sizeof lag, "%d", ROUTER_SCAN_LAG_S);
        const char *p[] = {cur, old, lag};
        rc = kp_db_run(r->db,
                       "UPDATE route_scan SET watermark = greatest(watermark, least($1::bigint, "
                       "coalesce((SELECT min(pk) - 1 FROM instances WHERE pk > $2::bigint AND pk "
                       "<= $1::bigint AND created_at > now() - $3::int * interval '1 second'), "
                       "$1::bigint))), updated_at = now() WHERE id = 1",
                       3, p);
        if (rc) goto fail;
        if ((rc = kp_db_commit(r->db))) goto fail;
        r->cursor = max_pk;
        total += n;
        if (n < r->cfg->router_scan_batch) return total;
        if (r->bus) kp_bus_heartbeat(r->bus);
        continue;
    fail:
        if (res) PQclear(res);
        kp_db_rollback(r->db);
        return rc;
    }
}

int router_stable(router_t *r)
{
    PGresult *res = NULL;
    int rc = kp_db_begin(r->db);
    if (rc) return rc;
    rc = kp_db_exec(
        r->db, &res,
        "WITH due AS (SELECT w.rule_id, w.study_uid FROM route_study_watch w JOIN route_rules ru "
        "ON ru.id = w.rule_id JOIN studies st ON st.study_uid = w.study_uid WHERE ru.enabled AND "
        "ru.trigger = 'study' AND NOT EXISTS (SELECT 1 FROM series se JOIN instances i ON "
        "i.series_pk = se.pk WHERE se.study_pk = st.pk AND greatest(i.created_at, i.updated_at) "
        "> now() - ru.stable_seconds * interval '1 second') FOR UPDATE OF w SKIP LOCKED), "
        "gone AS (DELETE FROM route_study_watch w USING due WHERE w.rule_id = due.rule_id AND "
        "w.study_uid = due.study_uid) "
        "INSERT INTO route_deliveries (rule_id, destination, study_uid, sop_uid) SELECT "
        "due.rule_id, CASE d->>'type' WHEN 'dicom' THEN 'dicom:' || (d->>'ae') ELSE 'stow:' || "
        "(d->>'url') END, due.study_uid, NULL FROM due JOIN route_rules ru ON ru.id = "
        "due.rule_id, jsonb_array_elements(ru.destinations) d ON CONFLICT (rule_id, "
        "destination, study_uid) WHERE sop_uid IS NULL DO NOTHING RETURNING id, rule_id, "
        "destination, study_uid",
        0, NULL);
    if (!rc) rc = kp_db_commit(r->db);
    if (rc) {
        if (res) PQclear(res);
        kp_db_rollback(r->db);
        return rc;
    }
    int n = PQntuples(res);
    for (int i = 0; i < n; i++)
        kp_info("route", "rule %s: study %s is stable -> %s (delivery %s)", PQgetvalue(res, i, 1),
                PQgetvalue(res, i, 3), PQgetvalue(res, i, 2), PQgetvalue(res, i, 0));
    PQclear(res);
    return n;
}
