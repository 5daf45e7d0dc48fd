/* kp_retrieve: the C-MOVE and C-GET service of pacs-dicomd (see kp_retrieve.h).
 *
 * Statuses decided here (the shim adds those of the sub-operations, PS3.4 C.4.2.1.5):
 *   0124  not authorized: dicom.retrieve_require_registered and the calling AE is not in the
 *         modality registry with allow_retrieve (PS3.7 C.5 general status, as for C-FIND;
 *         PS3.4 has no retrieve-specific "not authorized" status)
 *   A801  move destination unknown: not in the registry, or registered without allow_retrieve
 *   A701  out of resources, unable to calculate the number of matches: more than 65535
 *         instances (the sub-operation counts of the responses are 16-bit)
 *   A700  the database is unavailable; A900 identifier does not match the model (kp_find_sql)
 * Site scope: a registered calling AE whose registry row names a site retrieves only that
 * site's studies (others are not matched: nothing is sent for them); see kp_access.
 * Catalogue errors go through kp_error_dimse(); A801 and A701 are statuses of the retrieve
 * service itself, not error conditions of the catalogue, so they are named here. */
#include "kp_retrieve.h"

#include "kp_access.h"
#include "kp_audit.h"
#include "kp_bus.h"
#include "kp_db.h"
#include "kp_dbpool.h"
#include "kp_errors.h"
#include "kp_find_sql.h"
#include "kp_log.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CAT "retrieve"

#define STATUS_NOT_AUTHORIZED      0x0124u
#define STATUS_DESTINATION_UNKNOWN 0xA801u
#define STATUS_TOO_MANY_MATCHES    0xA701u
#define MAX_INSTANCES              65535L

struct kp_retrieve {
    const kp_config_t *cfg;
    char *root;
    kp_dbpool_t *pool;
    pthread_mutex_t bus_mu; /* a kp_bus_t is not thread-safe */
    kp_bus_t *bus;
};

kp_retrieve_t *kp_retrieve_new(const kp_config_t *cfg, const char *storage_root, int max_conns)
{
    kp_retrieve_t *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->cfg = cfg;
    r->pool = kp_dbpool_new(cfg->db_conninfo, max_conns);
    r->root = strdup(storage_root ? storage_root : "");
    r->bus = kp_bus_new(cfg, "dicomd-audit");
    if (!r->pool || !r->root || !r->bus) {
        kp_bus_destroy(&r->bus);
        kp_dbpool_destroy(&r->pool);
        free(r->root);
        free(r);
        return NULL;
    }
    pthread_mutex_init(&r->bus_mu, NULL);
    return r;
}

void kp_retrieve_destroy(kp_retrieve_t **rp)
{
    if (!rp || !*rp) return;
    kp_retrieve_t *r = *rp;
    kp_dbpool_destroy(&r->pool);
    kp_bus_destroy(&r->bus);
    free(r->root);
    pthread_mutex_destroy(&r->bus_mu);
    free(r);
    *rp = NULL;
}

/* The registry row of a move destination: 0 and its address, TLS flag and the number of
 * associations the sub-operations may use at once when it is registered with allow_retrieve;
 * KP_EPERM when not registered or not allowed; KP_EDB. */
static int s_lookup(kp_db_t *db, const char *ae, char *host, size_t hostlen, int *port, int *tls,
                    int *nassoc)
{
    PGresult *res = NULL;
    const char *params[] = {ae};
    int rc = kp_db_exec(db, &res,
                        "SELECT host, port, tls, move_associations FROM modalities WHERE "
                        "ae_title = $1 AND "
                        "allow_retrieve",
                        1, params);
    if (rc) return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return KP_EPERM;
    }
    snprintf(host, hostlen, "%s", PQgetvalue(res, 0, 0));
    *port = atoi(PQgetvalue(res, 0, 1));
    *tls = !strcmp(PQgetvalue(res, 0, 2), "t");
    *nassoc = atoi(PQgetvalue(res, 0, 3));
    PQclear(res);
    return 0;
}

unsigned kp_retrieve_handle(void *user, const kp_dicom_retrieve_req_t *req,
                            kp_dicom_retrieve_plan_t *plan)
{
    kp_retrieve_t *r = user;
    const char *op = req->op == KP_DICOM_MOVE ? "C-MOVE" : "C-GET";
    const char *ae = req->calling_ae ? req->calling_ae : "";
    kp_find_sql_t q = {0};
    PGresult *res = NULL;
    char err[160] = "";
    unsigned status = 0;
    int rc = 0;
    kp_db_t *db = kp_dbpool_acquire(r->pool);
    if (!db) {
        rc = KP_EDB;
        kp_dicom_retrieve_set_comment(plan, "database unavailable");
        goto error;
    }
    kp_access_t acc;
    if ((rc = kp_access_lookup(db, ae, KP_ACCESS_RETRIEVE, &acc))) {
        kp_dicom_retrieve_set_comment(plan, "database query failed");
        goto error;
    }
    if (r->cfg->dicom_retrieve_require_registered && !acc.allowed) {
        kp_warn(CAT, "%s from %s (%s) refused: not a registered AE with allow_retrieve", op, ae,
                req->peer_host);
        kp_dicom_retrieve_set_comment(plan, "calling AE title not allowed to retrieve");
        status = STATUS_NOT_AUTHORIZED;
        goto error;
    }
    if (req->op == KP_DICOM_MOVE) {
        char host[256];
        int port = 0, tls = 0, nassoc = 1;
        const char *dest = req->move_destination ? req->move_destination : "";
        rc = *dest ? s_lookup(db, dest, host, sizeof host, &port, &tls, &nassoc) : KP_EPERM;
        if (rc == KP_EPERM) {
            kp_warn(CAT, "C-MOVE from %s (%s) refused: move destination '%s' unknown", ae,
                    req->peer_host, dest);
            kp_dicom_retrieve_set_comment(plan, "move destination unknown");
            status = STATUS_DESTINATION_UNKNOWN;
            goto error;
        }
        if (rc) goto error;
        if ((rc = kp_dicom_retrieve_set_destination(plan, host, port))) {
            kp_dicom_retrieve_set_comment(plan, "move destination address invalid");
            status = STATUS_DESTINATION_UNKNOWN;
            goto error;
        }
        kp_dicom_retrieve_set_tls(plan, tls);
        kp_dicom_retrieve_set_associations(plan, nassoc);
    }
    rc = kp_find_sql_retrieve_scoped(req, MAX_INSTANCES, acc.site_id, &q, err, sizeof err);
    if (rc) {
        kp_warn(CAT, "%s from %s (%s) refused: %s", op, ae, req->peer_host, err);
        kp_dicom_retrieve_set_comment(plan, err);
        goto error;
    }
    rc = kp_db_exec(db, &res, q.sql, q.nparams, (const char *const *)q.params);
    if (rc) {
        kp_dicom_retrieve_set_comment(plan, "database query failed");
        goto error;
    }
    int n = PQntuples(res);
    if (n > MAX_INSTANCES) {
        kp_warn(CAT, "%s from %s: more than %ld instances match", op, ae, MAX_INSTANCES);
        kp_dicom_retrieve_set_comment(plan, "more than 65535 instances; retrieve less at once");
        status = STATUS_TOO_MANY_MATCHES;
        goto error;
    }
    for (int i = 0; i < n; i++) {
        char *path = NULL;
        if (asprintf(&path, "%s/%s", r->root, PQgetvalue(res, i, 0)) < 0) abort();
        rc = kp_dicom_retrieve_add(plan, PQgetvalue(res, i, 2), PQgetvalue(res, i, 1),
                                   PQgetvalue(res, i, 3), path, PQgetvalue(res, i, 4));
        free(path);
        if (rc == KP_ENOMEM) goto error;
        if (rc) /* an index row the shim cannot take (over-long UID): left out, logged */
            kp_warn(CAT, "%s: instance %s cannot be sent: %s", op, PQgetvalue(res, i, 1),
                    kp_strerror(rc));
        rc = 0;
    }
    kp_debug(CAT, "%s %s level from %s: %d instance(s)", op, q.level, ae, n);
    PQclear(res);
    kp_find_sql_clear(&q);
    kp_dbpool_release(r->pool, db);
    return 0;
error:
    if (!status) {
        if (rc != KP_EMISMATCH && rc != KP_EINVAL)
            kp_error(CAT, "%s from %s failed: %s", op, ae, kp_strerror(rc));
        status = kp_error_dimse(rc);
    }
    PQclear(res);
    kp_find_sql_clear(&q);
    kp_dbpool_release(r->pool, db);
    return status;
}

/* One word for the audit trail: success, warning (some sub-operations failed), cancelled,
 * refused (nothing was sent: not authorized, unknown destination, bad identifier...) or
 * failure (sub-operations failed or could not be performed). */
static const char *s_result(unsigned status)
{
    switch (status) {
    case 0x0000:
        return "success";
    case 0xFE00:
        return "cancelled";
    case 0x0122:
    case 0x0124:
    case 0xA700:
    case 0xA701:
    case 0xA801:
    case 0xA900:
        return "refused";
    default:
        return (status & 0xF000) == 0xB000 ? "warning" : "failure";
    }
}

void kp_retrieve_done(void *user, const kp_dicom_retrieve_req_t *req,
                      const kp_dicom_retrieve_result_t *res)
{
    kp_retrieve_t *r = user;
    char st[8];
    snprintf(st, sizeof st, "%04X", res->status & 0xFFFFu);
    json_t *studies = json_array();
    for (size_t i = 0; i < res->nstudies; i++)
        json_array_append_new(studies, json_string(res->study_uids[i]));
    json_t *pl = json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:o, s:i, s:i, s:i, s:i, s:s, s:s, s:s}", "operation",
        req->op == KP_DICOM_MOVE ? "C-MOVE" : "C-GET", "calling_ae",
        req->calling_ae ? req->calling_ae : "", "called_ae", req->called_ae ? req->called_ae : "",
        "peer", req->peer_host ? req->peer_host : "", "level", req->level ? req->level : "",
        "studies", studies, "completed", (int)res->completed, "failed", (int)res->failed, "warning",
        (int)res->warning, "remaining", (int)res->remaining, "status", st, "result",
        s_result(res->status), "error", res->error ? res->error : "");
    if (!pl) {
        kp_warn(CAT, "audit event not built (invalid UTF-8 in an AE title?)");
        return;
    }
    if (req->op == KP_DICOM_MOVE)
        json_object_set_new(pl, "destination",
                            json_string(req->move_destination ? req->move_destination : ""));
    /* the durable record (outbox -> pacs-auditor), then the live event for monitors */
    char ae[20];
    snprintf(ae, sizeof ae, "%s", req->calling_ae ? req->calling_ae : "");
    kp_retrieve_audit(r, req->op == KP_DICOM_MOVE ? "dicom.move" : "dicom.get",
                      res->status == 0 ? "success" : "failure", ae, req->peer_host,
                      res->nstudies == 1 ? res->study_uids[0] : NULL, pl);
    kp_msg_t m;
    if (kp_msg_init(&m, "audit.dicom", 0, pl)) return;
    pthread_mutex_lock(&r->bus_mu);
    int rc = kp_bus_publish(r->bus, &m);
    pthread_mutex_unlock(&r->bus_mu);
    if (rc) kp_debug(CAT, "audit event not published: %s", kp_strerror(rc));
    kp_msg_clear(&m);
}

void kp_retrieve_audit(kp_retrieve_t *r, const char *action, const char *outcome, const char *actor,
                       const char *client, const char *study, json_t *detail)
{
    kp_db_t *db = kp_dbpool_acquire(r->pool);
    if (!db) {
        kp_warn(CAT, "%s of %s not recorded in the audit trail: no database connection", action,
                actor ? actor : "?");
        return;
    }
    char pid[72] = "";
    if (study) {
        const char *p[] = {study};
        PGresult *res = NULL;
        if (!kp_db_exec(db, &res, "SELECT patient_id FROM studies WHERE study_uid = $1", 1, p) &&
            PQntuples(res) == 1)
            snprintf(pid, sizeof pid, "%s", PQgetvalue(res, 0, 0));
        if (res) PQclear(res);
    }
    kp_audit_event_t ev = {.action = action,
                           .outcome = outcome,
                           .actor = actor && *actor ? actor : NULL,
                           .client = client,
                           .patient_id = pid[0] ? pid : NULL,
                           .study_uid = study,
                           .detail = detail};
    if (kp_audit_emit(db, NULL, &ev))
        kp_warn(CAT, "%s of %s not recorded in the audit trail", action, actor ? actor : "?");
    kp_dbpool_release(r->pool, db);
}
