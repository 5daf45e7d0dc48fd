/* kp_audit: audit events into the outbox, and the hash of one chain link (see kp_audit.h). */
#include "kp_audit.h"

#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"
#include "kp_password.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t s_mu = PTHREAD_MUTEX_INITIALIZER;
static kp_bus_t *s_shared_bus; /* guarded by s_mu */

void kp_audit_set_bus(kp_bus_t *bus)
{
    pthread_mutex_lock(&s_mu);
    s_shared_bus = bus;
    pthread_mutex_unlock(&s_mu);
}

static void s_now_iso(char out[32])
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%06dZ", (int)(ts.tv_nsec / 1000) % 1000000);
}

static void s_set_str(json_t *o, const char *key, const char *v)
{
    if (!v) return;
    json_t *s = json_string(v);
    if (s) json_object_set_new(o, key, s); /* invalid UTF-8 is left out rather than failing */
}

static void s_submit(kp_bus_t *bus, int64_t id, const char *payload_text)
{
    kp_msg_t m = {.v = KP_MSG_VERSION, .id = id, .attempt = 0};
    snprintf(m.type, sizeof m.type, KP_AUDIT_JOB);
    m.payload = json_loads(payload_text, 0, NULL);
    if (m.payload && kp_bus_submit(bus, &m))
        kp_debug("bus", "audit job %lld not published now; the outbox sweep will", (long long)id);
    kp_msg_clear(&m);
}

int kp_audit_emit(kp_db_t *db, kp_bus_t *bus, const kp_audit_event_t *ev)
{
    if (!ev || !ev->action || !*ev->action || strlen(ev->action) > 64 || !ev->outcome ||
        (strcmp(ev->outcome, "success") && strcmp(ev->outcome, "failure")) ||
        (ev->detail && !json_is_object(ev->detail)))
        return KP_EINVAL;
    char now[32];
    if (!ev->at) s_now_iso(now);
    json_t *pl = json_object();
    s_set_str(pl, "at", ev->at ? ev->at : now);
    s_set_str(pl, "action", ev->action);
    s_set_str(pl, "outcome", ev->outcome);
    s_set_str(pl, "actor", ev->actor);
    s_set_str(pl, "client", ev->client);
    s_set_str(pl, "patient_id", ev->patient_id);
    s_set_str(pl, "study_uid", ev->study_uid);
    if (ev->detail) json_object_set(pl, "detail", ev->detail);
    char *text = json_dumps(pl, JSON_COMPACT);
    json_decref(pl);
    if (!text) abort();

    PGconn *conn = kp_db_conn(db);
    bool in_tx = conn && PQtransactionStatus(conn) == PQTRANS_INTRANS;
    bool publish = false;
    if (!in_tx) {
        if (bus) {
            publish = true;
        } else {
            pthread_mutex_lock(&s_mu);
            publish = s_shared_bus != NULL;
            pthread_mutex_unlock(&s_mu);
        }
    }
    /* Published now: the normal lease (the column default) before the sweep retries it. Not
     * published: an expired lease, so the next sweep picks it up. */
    const char *params[] = {text, publish ? "t" : "f"};
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r,
                        "INSERT INTO jobs (type, payload, lease_until) VALUES ('" KP_AUDIT_JOB
                        "', $1::jsonb, CASE WHEN $2::boolean THEN now() + interval '30 seconds' "
                        "ELSE now() END) RETURNING id, payload::text",
                        2, params);
    free(text);
    if (rc) {
        kp_error("audit", "could not record audit event %s (%s) of %s: %s", ev->action,
                 ev->outcome, ev->actor ? ev->actor : "-", kp_strerror(rc));
        return rc;
    }
    int64_t id = PQntuples(r) == 1 ? atoll(PQgetvalue(r, 0, 0)) : 0;
    if (publish && id > 0) {
        if (bus) {
            s_submit(bus, id, PQgetvalue(r, 0, 1));
        } else {
            pthread_mutex_lock(&s_mu);
            if (s_shared_bus) s_submit(s_shared_bus, id, PQgetvalue(r, 0, 1));
            pthread_mutex_unlock(&s_mu);
        }
    }
    PQclear(r);
    return 0;
}

/* ---- the chain ---------------------------------------------------------------------------- */

static json_t *s_str_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

char *kp_audit_canonical(const kp_audit_record_t *rec)
{
    json_t *parts[] = {
        json_integer((json_int_t)rec->seq),
        s_str_or_null(rec->event_id),
        s_str_or_null(rec->at),
        s_str_or_null(rec->actor),
        s_str_or_null(rec->action),
        s_str_or_null(rec->outcome),
        s_str_or_null(rec->client),
        s_str_or_null(rec->patient_id),
        s_str_or_null(rec->study_uid),
        rec->detail ? json_deep_copy(rec->detail) : json_null(),
        s_str_or_null(rec->prev_hash),
    };
    size_t n = sizeof parts / sizeof parts[0];
    json_t *arr = json_array();
    bool ok = true;
    for (size_t i = 0; i < n; i++) {
        if (!parts[i]) {
            ok = false; /* not valid UTF-8 */
            continue;
        }
        json_array_append_new(arr, parts[i]);
    }
    char *out = ok ? json_dumps(arr, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(arr);
    return out;
}

int kp_audit_hash(const kp_audit_record_t *rec, char out[65])
{
    char *c = kp_audit_canonical(rec);
    if (!c) return KP_EINVAL;
    kp_sha256_hex(c, out);
    free(c);
    return 0;
}
