/* kp_routes: the route table and the DICOMweb handlers of this slice (QIDO-RS, WADO-RS metadata).
 *
 * Matching happens on the event loop (cheap, no I/O); the handlers run on a database worker
 * (gateway/http/README). QIDO statements come from kp_qido; metadata is the instances' stored
 * DICOM JSON, aggregated by PostgreSQL into one array, with an ETag so viewers can revalidate. */
#include "kp_routes.h"

#include "kp_errors.h"
#include "kp_log.h"
#include "kp_qido.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- QIDO-RS ------------------------------------------------------------------------------- */
static int s_qido(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                  kp_qido_level_t level, const char *study, const char *series)
{
    char err[256];
    kp_qido_t *q = NULL;
    int rc = kp_qido_build(level, study, series, req->query, env->cfg->http_qido_limit,
                           env->cfg->http_qido_max_limit, &q, err, sizeof err);
    if (rc) {
        kp_http_error(resp, rc, 0, "invalid QIDO-RS query", err);
        return 0;
    }
    PGresult *res = NULL;
    rc = kp_db_exec(env->db, &res, q->sql, q->nparams, (const char *const *)q->params);
    if (rc) goto done;
    if (PQntuples(res) != 1) {
        rc = KP_EDB;
        goto done;
    }
    resp->status = 200;
    resp->content_type = "application/dicom+json";
    resp->len = (size_t)PQgetlength(res, 0, 0);
    resp->body = strndup(PQgetvalue(res, 0, 0), resp->len);
    if (!resp->body) abort();
    resp->compressible = true;
    resp->warning = q->warning;
    q->warning = NULL;
done:
    if (res) PQclear(res);
    kp_qido_destroy(&q);
    return rc;
}

static int s_qido_studies(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_STUDY, NULL, NULL);
}
static int s_qido_series(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_SERIES, NULL, NULL);
}
static int s_qido_instances(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_INSTANCE, NULL, NULL);
}
static int s_qido_study_series(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_SERIES, r->params[0], NULL);
}
static int s_qido_study_instances(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_INSTANCE, r->params[0], NULL);
}
static int s_qido_series_instances(kp_http_env_t *e, const kp_http_req_t *r, kp_http_resp_t *o)
{
    return s_qido(e, r, o, KP_QIDO_INSTANCE, r->params[0], r->params[1]);
}

/* ---- WADO-RS metadata ---------------------------------------------------------------------- */
#define S_MD_FROM                                                                                  \
    " FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = "          \
    "se.study_pk WHERE st.study_uid = $1 AND ($2::text IS NULL OR se.series_uid = $2) AND "        \
    "($3::text IS NULL OR i.sop_uid = $3)"

static bool s_etag_matches(const char *inm, const char *etag)
{
    if (!inm) return false;
    if (!strcmp(inm, "*")) return true;
    /* A list of (possibly weak) tags: look for the exact quoted value. */
    const char *p = strstr(inm, etag);
    return p != NULL;
}

static int s_metadata(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *params[3] = {req->params[0], req->nparams > 1 ? req->params[1] : NULL,
                             req->nparams > 2 ? req->params[2] : NULL};
    PGresult *res = NULL;
    int rc =
        kp_db_exec(env->db, &res,
                   "SELECT count(*), '\"' || md5(count(*)::text || ':' || "
                   "coalesce(max(i.updated_at)::text, '') || ':' || coalesce(sum(i.pk), 0)::text) "
                   "|| '\"'" S_MD_FROM,
                   3, params);
    if (rc) return rc;
    long count = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    snprintf(resp->etag, sizeof resp->etag, "%s", PQgetvalue(res, 0, 1));
    PQclear(res);
    res = NULL;
    if (count == 0) {
        const char *what = params[2] ? "instance" : params[1] ? "series" : "study";
        char msg[64];
        snprintf(msg, sizeof msg, "no such %s", what);
        kp_http_error(resp, KP_ENOTFOUND, 0, msg,
                      params[2]   ? params[2]
                      : params[1] ? params[1]
                                  : params[0]);
        return 0;
    }
    if (s_etag_matches(req->if_none_match, resp->etag)) {
        resp->status = 304;
        return 0;
    }
    rc = kp_db_exec(env->db, &res,
                    "SELECT coalesce(json_agg(i.metadata ORDER BY se.series_number NULLS LAST, "
                    "se.pk, i.instance_number NULLS LAST, i.pk), '[]'::json)::text" S_MD_FROM,
                    3, params);
    if (rc) return rc;
    resp->status = 200;
    resp->content_type = "application/dicom+json";
    resp->len = (size_t)PQgetlength(res, 0, 0);
    resp->body = strndup(PQgetvalue(res, 0, 0), resp->len);
    if (!resp->body) abort();
    resp->compressible = true;
    PQclear(res);
    return 0;
}

/* ---- the table ----------------------------------------------------------------------------- */
static const kp_route_t s_routes[] = {
    {"GET", "/dicom-web/studies", "study.read", s_qido_studies},
    {"GET", "/dicom-web/series", "study.read", s_qido_series},
    {"GET", "/dicom-web/instances", "study.read", s_qido_instances},
    {"GET", "/dicom-web/studies/{study}/series", "study.read", s_qido_study_series},
    {"GET", "/dicom-web/studies/{study}/instances", "study.read", s_qido_study_instances},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances", "study.read",
     s_qido_series_instances},
    {"GET", "/dicom-web/studies/{study}/metadata", "study.read", s_metadata},
    {"GET", "/dicom-web/studies/{study}/series/{series}/metadata", "study.read", s_metadata},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata",
     "study.read", s_metadata},
};
#define S_NROUTES (sizeof s_routes / sizeof s_routes[0])

/* Matches path against pattern; fills params (unvalidated). Returns the number of params, or -1
 * when the shapes differ. */
static int s_match(const char *pattern, const char *path, size_t pathlen,
                   char params[KP_HTTP_MAX_PARAMS][65], bool *bad_uid)
{
    const char *p = pattern, *s = path, *end = path + pathlen;
    int n = 0;
    while (*p && s < end) {
        if (*p != '/' || *s != '/') return -1;
        p++, s++;
        const char *pe = strchr(p, '/');
        size_t pl = pe ? (size_t)(pe - p) : strlen(p);
        const char *se = memchr(s, '/', (size_t)(end - s));
        size_t sl = se ? (size_t)(se - s) : (size_t)(end - s);
        if (pl && p[0] == '{') {
            if (sl == 0 || n >= KP_HTTP_MAX_PARAMS) return -1;
            if (sl > 64 || !kp_qido_valid_uid(s, sl)) {
                *bad_uid = true;
                params[n][0] = 0;
            } else {
                memcpy(params[n], s, sl);
                params[n][sl] = 0;
            }
            n++;
        } else if (pl != sl || memcmp(p, s, sl)) {
            return -1;
        }
        p += pl;
        s += sl;
    }
    return (*p || s < end) ? -1 : n;
}

kp_route_result_t kp_routes_match(const char *method, const char *path, size_t pathlen,
                                  kp_http_req_t *req, char *allow, size_t allowlen)
{
    bool shape = false, bad_uid_any = false;
    size_t al = 0;
    if (allowlen) allow[0] = 0;
    for (size_t r = 0; r < S_NROUTES; r++) {
        char params[KP_HTTP_MAX_PARAMS][65];
        bool bad_uid = false;
        int n = s_match(s_routes[r].pattern, path, pathlen, params, &bad_uid);
        if (n < 0) continue;
        if (bad_uid) {
            bad_uid_any = true;
            continue;
        }
        shape = true;
        if (!strcmp(method, s_routes[r].method)) {
            req->route = &s_routes[r];
            req->nparams = n;
            memcpy(req->params, params, sizeof params);
            return KP_ROUTE_OK;
        }
        if (allowlen && !strstr(allow, s_routes[r].method)) {
            int w = snprintf(allow + al, allowlen - al, "%s%s", al ? ", " : "", s_routes[r].method);
            if (w > 0 && (size_t)w < allowlen - al) al += (size_t)w;
        }
    }
    if (bad_uid_any) return KP_ROUTE_BAD_UID;
    return shape ? KP_ROUTE_BAD_METHOD : KP_ROUTE_NOT_FOUND;
}
