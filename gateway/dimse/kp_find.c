/* kp_find: the C-FIND service of pacs-dicomd (see kp_find.h).
 *
 * Statuses (PS3.4 C.4.1.1.4, PS3.7 C): every match is sent as Pending (FF00) by the shim, then
 *   0000  matching complete
 *   A700  out of resources: the database is unavailable, or more than dicom.find_max_results
 *         matches (the first find_max_results are sent, then A700 with an Error Comment)
 *   A900  identifier does not match the SOP class: QueryRetrieveLevel missing or invalid for
 *         the model, unique key of a level above missing (kp_find_sql)
 *   C000  unable to process: identifier too large to translate
 *   0124  not authorized: dicom.find_require_registered and the calling AE is not in the
 *         modality registry with allow_find
 * Site scope: a registered calling AE whose registry row names a site finds only that site's
 * studies (and patients with a study there); kp_access, kp_find_sql_opts_t.site_id.
 * Codes go through the error catalogue (kp_error_dimse), never by hand. */
#include "kp_find.h"

#include "kp_access.h"
#include "kp_db.h"
#include "kp_dbpool.h"
#include "kp_errors.h"
#include "kp_find_sql.h"
#include "kp_log.h"

#include <stdlib.h>
#include <string.h>

#define CAT "find"

struct kp_find {
    const kp_config_t *cfg;
    kp_dbpool_t *pool;
};

kp_find_t *kp_find_new(const kp_config_t *cfg, int max_conns)
{
    kp_find_t *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->cfg = cfg;
    f->pool = kp_dbpool_new(cfg->db_conninfo, max_conns);
    if (!f->pool) {
        free(f);
        return NULL;
    }
    return f;
}

void kp_find_destroy(kp_find_t **fp)
{
    if (!fp || !*fp) return;
    kp_dbpool_destroy(&(*fp)->pool);
    free(*fp);
    *fp = NULL;
}

unsigned kp_find_handle(void *user, const kp_dicom_find_req_t *req, kp_dicom_find_results_t *out)
{
    kp_find_t *f = user;
    const kp_config_t *cfg = f->cfg;
    kp_find_sql_t q = {0};
    kp_db_t *db = NULL;
    PGresult *r = NULL;
    char err[160] = "";
    int rc = 0;
    const char *ae = req->calling_ae ? req->calling_ae : "";
    const long limit = cfg->dicom_find_max_results;
    kp_find_sql_opts_t opts = {.fold_names = cfg->dicom_find_case_insensitive_names,
                               .limit = limit};

    db = kp_dbpool_acquire(f->pool);
    if (!db) {
        rc = KP_EDB;
        kp_dicom_find_set_comment(out, "database unavailable");
        goto error;
    }
    kp_access_t acc;
    if ((rc = kp_access_lookup(db, ae, KP_ACCESS_FIND, &acc))) goto error;
    if (cfg->dicom_find_require_registered && !acc.allowed) {
        kp_warn(CAT, "C-FIND from %s (%s) refused: not a registered AE with allow_find", ae,
                req->peer_host);
        kp_dicom_find_set_comment(out, "calling AE title not allowed to query");
        rc = KP_EPERM;
        goto error;
    }
    opts.site_id = acc.site_id;
    rc = kp_find_sql_build(req, &opts, &q, err, sizeof err);
    if (rc) {
        kp_warn(CAT, "C-FIND from %s (%s) refused: %s", ae, req->peer_host, err);
        kp_dicom_find_set_comment(out, err);
        goto error;
    }
    rc = kp_db_exec(db, &r, q.sql, q.nparams, (const char *const *)q.params);
    if (rc) {
        kp_dicom_find_set_comment(out, "database query failed");
        goto error;
    }
    int n = PQntuples(r);
    int shown = n > limit ? (int)limit : n;
    for (int i = 0; i < shown; i++) {
        if ((rc = kp_dicom_find_add_result(out))) goto error;
        for (int j = 0; j < q.ncols && j < PQnfields(r); j++) {
            int src = kp_dicom_find_set(out, q.col_tags[j],
                                        PQgetisnull(r, i, j) ? "" : PQgetvalue(r, i, j));
            if (src == KP_ENOMEM) {
                rc = src;
                goto error;
            }
            if (src)
                kp_debug(CAT, "C-FIND: value of (%04X,%04X) does not fit its VR; left empty",
                         (unsigned)(q.col_tags[j] >> 16), (unsigned)(q.col_tags[j] & 0xFFFF));
        }
    }
    if (n > limit) {
        rc = KP_ETOOBIG;
        snprintf(err, sizeof err, "more than %ld matches; refine the query", limit);
        kp_warn(CAT, "C-FIND %s level from %s: %s (sent the first %ld)", q.level, ae, err, limit);
        kp_dicom_find_set_comment(out, err);
        goto error;
    }
    kp_info(CAT, "C-FIND %s level from %s (%s): %d match(es)", q.level, ae, req->peer_host, n);
    PQclear(r);
    kp_dbpool_release(f->pool, db);
    kp_find_sql_clear(&q);
    return 0x0000;
error:
    if (rc != KP_ETOOBIG && rc != KP_EPERM && rc != KP_EMISMATCH && rc != KP_EINVAL)
        kp_error(CAT, "C-FIND from %s failed: %s", ae, kp_strerror(rc));
    PQclear(r);
    kp_dbpool_release(f->pool, db);
    kp_find_sql_clear(&q);
    return kp_error_dimse(rc);
}
