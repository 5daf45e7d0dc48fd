/* pacs-auditor: appends audit events (outbox jobs of type `audit`, see lib/kp_audit.h) to the
 * hash-chained audit_log (schema/0004_audit.sql).
 *
 * A worker of the bus like pacs-indexer: READY for `audit` jobs, then batches of whatever is
 * waiting (up to S_BATCH jobs, S_BATCH_WAIT_MS to gather them), each batch in ONE transaction:
 *   1. pg_advisory_xact_lock(KP_AUDIT_CHAIN_LOCK): one appender at a time, whatever the number
 *      of auditors (taken before the tail is read, so under READ COMMITTED the next statement
 *      sees the tail the previous holder committed);
 *   2. claim the jobs: UPDATE jobs SET state = 'done' ... WHERE state = 'pending' RETURNING the
 *      payload (the row, not the bus message, is the truth; a job already done - delivered
 *      twice - is not returned; a job whose row is not committed yet is not visible and comes
 *      back with the sweep);
 *   3. skip events whose event_id (the job id) is already in audit_log (a job made pending
 *      again by hand);
 *   4. read the tail (seq, hash), compute seq / prev_hash / hash for each event in job-id
 *      order, insert them all in one statement;
 *   5. COMMIT.
 * kill -9 at any point either loses the whole transaction (the jobs stay pending and come back)
 * or nothing. A batch that fails (a malformed payload, say) is retried job by job, so one bad
 * job cannot block the others; a job that fails alone gets last_error and DONE ok=false, and
 * the sweep retries it until jobs.max_attempts. */
#include "kp_worker.h"
#include "kp_audit.h"
#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define S_BATCH         256
#define S_BATCH_WAIT_MS 20
#define S_CREDIT        512

static volatile sig_atomic_t s_stop;

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static const char *s_str(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* "{1,2,3}" for a bigint[] / text[] parameter (malloc'd). */
static char *s_id_array(const int64_t *ids, size_t n)
{
    size_t cap = 3 + n * 21, len = 0;
    char *s = malloc(cap);
    if (!s) abort();
    s[len++] = '{';
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(s + len, cap - len, "%s%lld", i ? "," : "", (long long)ids[i]);
    s[len++] = '}';
    s[len] = 0;
    return s;
}

typedef struct {
    int64_t id;
    json_t *payload;
    const char *at;
    int row; /* in the claim result */
} s_claimed_t;

static int s_by_id(const void *a, const void *b)
{
    const s_claimed_t *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Appends the events of jobs ids[0..n) in one transaction (see the top). *appended: rows
 * written. 0 or a negative code (the transaction rolled back). */
static int s_append(kp_db_t *db, const int64_t *ids, size_t n, long *appended)
{
    PGresult *claim = NULL, *r = NULL;
    s_claimed_t *cl = NULL;
    size_t ncl = 0;
    json_t *rows = json_array(), *bad = json_array();
    char *idarr = s_id_array(ids, n);
    long written = 0;
    int rc = kp_db_begin(db);
    if (rc) goto out;
    if ((rc = kp_db_run(db, "SELECT pg_advisory_xact_lock(" KP_AUDIT_CHAIN_LOCK ")", 0, NULL)))
        goto fail;
    const char *p1[] = {idarr};
    rc = kp_db_exec(
        db, &claim,
        "UPDATE jobs SET state = 'done', updated_at = now(), last_error = NULL WHERE "
        "id = ANY($1::bigint[]) AND state = 'pending' AND type = '" KP_AUDIT_JOB
        "' RETURNING id, payload::text, " KP_AUDIT_AT_SQL(
            "coalesce((payload->>'at')::timestamptz, created_at)") ", "
                                                                   "EXISTS (SELECT 1 FROM "
                                                                   "audit_log a WHERE a.event_id = "
                                                                   "jobs.id::text)",
        1, p1);
    if (rc) goto fail;
    int nrows = PQntuples(claim);
    cl = calloc((size_t)nrows + 1, sizeof *cl);
    if (!cl) abort();
    for (int i = 0; i < nrows; i++) {
        if (PQgetvalue(claim, i, 3)[0] == 't') continue; /* recorded already */
        s_claimed_t c = {
            .id = atoll(PQgetvalue(claim, i, 0)), .row = i, .at = PQgetvalue(claim, i, 2)};
        c.payload = json_loads(PQgetvalue(claim, i, 1), 0, NULL);
        const char *action = c.payload ? s_str(c.payload, "action") : NULL;
        const char *outcome = c.payload ? s_str(c.payload, "outcome") : NULL;
        if (!json_is_object(c.payload) || !action || !*action || !outcome ||
            (strcmp(outcome, "success") && strcmp(outcome, "failure"))) {
            kp_logc(KP_LOG_ERROR, "job", PQgetvalue(claim, i, 0),
                    "malformed audit event (action and outcome are required); marked failed");
            json_array_append_new(bad, json_integer((json_int_t)c.id));
            json_decref(c.payload);
            continue;
        }
        cl[ncl++] = c;
    }
    qsort(cl, ncl, sizeof *cl, s_by_id);

    int64_t seq = 0;
    char prev[65] = KP_AUDIT_GENESIS;
    if (ncl) {
        rc = kp_db_exec(db, &r, "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", 0,
                        NULL);
        if (rc) goto fail;
        if (PQntuples(r) == 1) {
            seq = atoll(PQgetvalue(r, 0, 0));
            snprintf(prev, sizeof prev, "%s", PQgetvalue(r, 0, 1));
        }
        PQclear(r);
        r = NULL;
    }
    for (size_t i = 0; i < ncl; i++) {
        char event_id[24], hash[65];
        snprintf(event_id, sizeof event_id, "%lld", (long long)cl[i].id);
        json_t *pl = cl[i].payload, *detail = json_object_get(pl, "detail");
        if (json_is_null(detail)) detail = NULL;
        kp_audit_record_t rec = {
            .seq = seq + 1,
            .event_id = event_id,
            .at = cl[i].at,
            .actor = s_str(pl, "actor"),
            .action = s_str(pl, "action"),
            .outcome = s_str(pl, "outcome"),
            .client = s_str(pl, "client"),
            .patient_id = s_str(pl, "patient_id"),
            .study_uid = s_str(pl, "study_uid"),
            .detail = detail,
            .prev_hash = prev,
        };
        if (kp_audit_hash(&rec, hash)) { /* cannot happen: the payload came from jsonb */
            json_array_append_new(bad, json_integer((json_int_t)cl[i].id));
            continue;
        }
        json_t *row = json_pack("{s:I, s:s, s:s, s:s, s:s, s:s, s:s}", "seq", (json_int_t)rec.seq,
                                "event_id", event_id, "at", rec.at, "action", rec.action, "outcome",
                                rec.outcome, "prev_hash", prev, "hash", hash);
        const char *opt[][2] = {{"actor", rec.actor},
                                {"client", rec.client},
                                {"patient_id", rec.patient_id},
                                {"study_uid", rec.study_uid}};
        for (size_t k = 0; k < 4; k++)
            if (opt[k][1]) json_object_set_new(row, opt[k][0], json_string(opt[k][1]));
        if (detail) json_object_set(row, "detail", detail);
        json_array_append_new(rows, row);
        seq++;
        memcpy(prev, hash, sizeof prev);
    }
    if (json_array_size(rows)) {
        char *text = json_dumps(rows, JSON_COMPACT);
        if (!text) abort();
        const char *p2[] = {text};
        rc = kp_db_run(db,
                       "INSERT INTO audit_log (seq, event_id, at, actor, action, outcome, client, "
                       "patient_id, study_uid, detail, prev_hash, hash) SELECT seq, event_id, "
                       "at::timestamptz, actor, action, outcome, client, patient_id, study_uid, "
                       "detail, prev_hash, hash FROM jsonb_to_recordset($1::jsonb) AS x(seq "
                       "bigint, event_id text, at text, actor text, action text, outcome text, "
                       "client text, patient_id text, study_uid text, detail jsonb, prev_hash "
                       "text, hash text)",
                       1, p2);
        free(text);
        if (rc) goto fail;
        written = (long)json_array_size(rows);
    }
    if (json_array_size(bad)) {
        char *text = json_dumps(bad, JSON_COMPACT);
        const char *p3[] = {text};
        rc = kp_db_run(db,
                       "UPDATE jobs SET state = 'failed', last_error = 'malformed audit event' "
                       "WHERE id IN (SELECT (jsonb_array_elements_text($1::jsonb))::bigint)",
                       1, p3);
        free(text);
        if (rc) goto fail;
    }
    rc = kp_db_commit(db);
    if (rc) goto out;
    *appended += written;
    goto out;
fail:
    kp_db_rollback(db);
out:
    for (size_t i = 0; i < ncl; i++)
        json_decref(cl[i].payload);
    free(cl);
    if (claim) PQclear(claim);
    if (r) PQclear(r);
    json_decref(rows);
    json_decref(bad);
    free(idarr);
    return rc;
}

/* Records why a job could not be appended (outside any transaction; best effort). */
static void s_job_error(kp_db_t *db, int64_t id, int code)
{
    char idb[24];
    snprintf(idb, sizeof idb, "%lld", (long long)id);
    const char *p[] = {idb, kp_strerror(code)};
    kp_db_run(db, "UPDATE jobs SET last_error = $2, updated_at = now() WHERE id = $1::bigint", 2,
              p);
}

int main(int argc, char **argv)
{
    int rc = 1;
    kp_config_t *cfg = kp_worker_start(argc, argv, "pacs-auditor", &s_stop, NULL, &rc);
    if (!cfg) return rc;
    rc = 1;

    kp_db_t *db = NULL;
    kp_bus_t *bus = NULL;
    kp_msg_t *msgs = calloc(S_BATCH, sizeof *msgs);
    int64_t *ids = calloc(S_BATCH, sizeof *ids);
    if (!msgs || !ids) abort();
    int err = 0;
    db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, &err);
    if (!db) goto done;
    bus = kp_bus_new(cfg, "auditor");
    if (!bus) goto done;
    const char *types[] = {KP_AUDIT_JOB};
    if (kp_bus_worker_ready(bus, types, 1, S_CREDIT)) goto done;
    kp_info("main", "appending audit events (batch %d, credit %d)", S_BATCH, S_CREDIT);

    long appended = 0;
    while (!s_stop) {
        int r = kp_bus_next_job(bus, &msgs[0], 500);
        if (r == KP_ETIMEOUT) continue;
        if (r) {
            kp_warn("bus", "receive failed: %s", kp_strerror(r));
            usleep(100 * 1000);
            continue;
        }
        size_t n = 1;
        long until = s_now_ms() + S_BATCH_WAIT_MS;
        while (n < S_BATCH) {
            long left = until - s_now_ms();
            if (kp_bus_next_job(bus, &msgs[n], left > 0 ? (int)left : 0)) break;
            n++;
        }
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(msgs[i].type, KP_AUDIT_JOB) || msgs[i].id <= 0) {
                kp_error("job", "job %lld of type %s is not an audit job; dropped",
                         (long long)msgs[i].id, msgs[i].type);
                kp_bus_job_done(bus, msgs[i].id, false);
                continue;
            }
            ids[m++] = msgs[i].id;
        }
        int br = m ? s_append(db, ids, m, &appended) : 0;
        if (!br) {
            for (size_t i = 0; i < m; i++)
                kp_bus_job_done(bus, ids[i], true);
        } else {
            kp_warn("audit", "batch of %zu not appended (%s); retrying job by job", m,
                    kp_strerror(br));
            for (size_t i = 0; i < m; i++) {
                int jr = s_append(db, &ids[i], 1, &appended);
                if (jr) {
                    char idb[24];
                    snprintf(idb, sizeof idb, "%lld", (long long)ids[i]);
                    kp_logc(KP_LOG_ERROR, "audit", idb, "not appended (%s); stays pending",
                            kp_strerror(jr));
                    s_job_error(db, ids[i], jr);
                }
                kp_bus_job_done(bus, ids[i], jr == 0);
                kp_bus_heartbeat(bus);
            }
            if (kp_db_ensure(db)) usleep(500 * 1000); /* database down: do not spin */
        }
        for (size_t i = 0; i < n; i++)
            kp_msg_clear(&msgs[i]);
    }
    kp_info("main", "stopping after %ld audit records appended", appended);
    rc = 0;
done:
    kp_bus_destroy(&bus);
    kp_db_destroy(&db);
    free(msgs);
    free(ids);
    kp_config_destroy(&cfg);
    return rc;
}
