/* kp_routes: the route table and the DICOMweb handlers of this slice (QIDO-RS, WADO-RS metadata).
 *
 * Matching happens on the event loop (cheap, no I/O); the handlers run on a database worker
 * (gateway/http/README). QIDO statements come from kp_qido; metadata is the instances' stored
 * DICOM JSON, aggregated by PostgreSQL into one array, with an ETag so viewers can revalidate. */
#include "kp_routes.h"

#include "kp_errors.h"
#include "kp_frames.h"
#include "kp_storage.h"
#include "kp_log.h"
#include "kp_qido.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* ---- WADO-RS: instances and frames --------------------------------------------------------- */

/* One boundary for every multipart response: 40 random-looking characters, so that it cannot
 * plausibly occur in the bytes it separates. */
#define S_BOUNDARY "KlinikaPACS-7d1f0c9e4b2a86f3b5c0e91d2a47"

typedef struct {
    char *buf;
    size_t len, cap;
} s_body_t;

static void s_body_put(s_body_t *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        while (b->len + n + 1 > b->cap) b->cap = b->cap ? b->cap * 2 : 65536;
        b->buf = realloc(b->buf, b->cap);
        if (!b->buf) abort();
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void s_body_str(s_body_t *b, const char *s) { s_body_put(b, s, strlen(s)); }

/* Appends len bytes of fd at off. 0 or KP_EIO. */
static int s_body_file(s_body_t *b, int fd, int64_t off, int64_t len)
{
    if (len < 0 || len > ((int64_t)1 << 32)) return KP_EIO;
    if (b->len + (size_t)len + 1 > b->cap) {
        while (b->len + (size_t)len + 1 > b->cap) b->cap = b->cap ? b->cap * 2 : 65536;
        b->buf = realloc(b->buf, b->cap);
        if (!b->buf) abort();
    }
    size_t got = 0;
    while (got < (size_t)len) {
        ssize_t r = pread(fd, b->buf + b->len + got, (size_t)len - got, (off_t)(off + (int64_t)got));
        if (r <= 0) return KP_EIO;
        got += (size_t)r;
    }
    b->len += got;
    return 0;
}

/* The stored file of an instance: opens it (read-only) after checking the stored path's shape. */
static int s_open_stored(kp_http_env_t *env, const char *rel)
{
    if (!kp_storage_relpath_valid(rel)) return KP_EINTERNAL;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", env->cfg->storage_root, rel);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) kp_error("wado", "stored file %s cannot be opened", path);
    return fd < 0 ? KP_EIO : fd;
}

/* What the retrieval routes need of one instance, from the index. */
typedef struct {
    char rel[KP_STORAGE_RELPATH_MAX + 8], ts[72];
    bool has_pixels;
    int64_t pix_off, pix_len, frame_size;
    long nframes;
} s_inst_t;

/* Looks the instance of the path up: 1 found (*out filled), 0 not found (resp is the 404), or
 * a negative code. */
static int s_find_instance(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                           s_inst_t *out)
{
    const char *params[] = {req->params[0], req->params[1], req->params[2]};
    PGresult *res = NULL;
    int rc = kp_db_exec(env->db, &res,
                        "SELECT i.path, i.transfer_syntax_uid, i.pixel_offset, i.pixel_length, "
                        "coalesce(i.number_of_frames, 1), coalesce(i.rows, 0), "
                        "coalesce(i.columns, 0), coalesce(i.bits_allocated, 0), "
                        "coalesce(i.metadata->'00280002'->'Value'->>0, '1')" S_MD_FROM,
                        3, params);
    if (rc) return rc;
    if (PQntuples(res) != 1) {
        PQclear(res);
        kp_http_error(resp, KP_ENOTFOUND, 0, "no such instance", req->params[2]);
        return 0;
    }
    snprintf(out->rel, sizeof out->rel, "%s", PQgetvalue(res, 0, 0));
    snprintf(out->ts, sizeof out->ts, "%s", PQgetvalue(res, 0, 1));
    out->has_pixels = !PQgetisnull(res, 0, 2);
    out->pix_off = atoll(PQgetvalue(res, 0, 2));
    out->pix_len = atoll(PQgetvalue(res, 0, 3));
    out->nframes = atol(PQgetvalue(res, 0, 4));
    out->frame_size = (int64_t)atol(PQgetvalue(res, 0, 5)) * atol(PQgetvalue(res, 0, 6)) *
                      atol(PQgetvalue(res, 0, 8)) * atol(PQgetvalue(res, 0, 7)) / 8;
    PQclear(res);
    return 1;
}

/* GET .../instances/{sop}: the Part 10 file as multipart/related; type="application/dicom". */
static int s_instance(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    s_inst_t in;
    int rc = s_find_instance(env, req, resp, &in);
    if (rc <= 0) return rc;
    const char *rel = in.rel, *ts = in.ts;
    if (!kp_frames_acceptable(req->accept, ts, "dicom")) {
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "the instance is stored in another transfer syntax; ask for "
                      "transfer-syntax=* (transcoding is not available yet)");
        return 0;
    }
    int fd = s_open_stored(env, rel);
    if (fd < 0) return fd;
    struct stat sb;
    s_body_t b = {0};
    char head[256];
    snprintf(head, sizeof head,
             "--" S_BOUNDARY "\r\nContent-Type: application/dicom; transfer-syntax=%s\r\n\r\n", ts);
    s_body_str(&b, head);
    rc = fstat(fd, &sb) ? KP_EIO : s_body_file(&b, fd, 0, (int64_t)sb.st_size);
    close(fd);
    if (rc) {
        free(b.buf);
        return rc;
    }
    s_body_str(&b, "\r\n--" S_BOUNDARY "--\r\n");
    resp->status = 200;
    snprintf(resp->ctype, sizeof resp->ctype,
             "multipart/related; type=\"application/dicom\"; boundary=" S_BOUNDARY);
    resp->content_type = resp->ctype;
    resp->body = b.buf;
    resp->len = b.len;
    return 0;
}

/* GET .../instances/{sop}/frames/{list}: the frames' bytes as stored (no decoding), one part
 * each, every part header written exactly as "Content-Type:" (OHIF's parser needs that). */
static int s_frames(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    long frames[KP_FRAMES_MAX_LIST];
    int nf = kp_frames_parse_list(req->params[3], frames, KP_FRAMES_MAX_LIST);
    if (nf <= 0) {
        kp_http_error(resp, KP_EINVAL, 0, "bad frame list",
                      "frame numbers start at 1, separated by commas");
        return 0;
    }
    s_inst_t in;
    int rc = s_find_instance(env, req, resp, &in);
    if (rc <= 0) return rc;
    rc = 0;
    const char *rel = in.rel, *ts = in.ts;
    bool has_pixels = in.has_pixels;
    int64_t pix_off = in.pix_off, pix_len = in.pix_len, frame_size = in.frame_size;
    long nframes = in.nframes;
    if (!has_pixels) {
        kp_http_error(resp, KP_ENOTFOUND, 0, "the instance has no pixel data stored as frames",
                      req->params[2]);
        return 0;
    }
    if (!kp_frames_acceptable(req->accept, ts, "frames")) {
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "frames are sent in their stored transfer syntax; ask for "
                      "transfer-syntax=* (decoding is not available yet)");
        return 0;
    }
    const char *media = kp_frames_media_type(ts);
    int fd = s_open_stored(env, rel);
    if (fd < 0) return fd;
    s_body_t b = {0};
    kp_range_t *ranges = calloc(KP_FRAMES_MAX_FRAGMENTS, sizeof *ranges);
    if (!ranges) abort();
    for (int f = 0; f < nf && !rc; f++) {
        size_t n = 0;
        rc = kp_frames_locate(fd, pix_off, pix_len, nframes, frame_size, frames[f], ranges,
                              KP_FRAMES_MAX_FRAGMENTS, &n);
        if (rc) break;
        char head[256];
        snprintf(head, sizeof head, "--" S_BOUNDARY "\r\nContent-Type: %s; transfer-syntax=%s\r\n\r\n",
                 media, ts);
        s_body_str(&b, head);
        for (size_t i = 0; i < n && !rc; i++) rc = s_body_file(&b, fd, ranges[i].off, ranges[i].len);
        s_body_str(&b, "\r\n");
    }
    close(fd);
    free(ranges);
    if (rc) {
        free(b.buf);
        if (rc == KP_ENOTFOUND) {
            kp_http_error(resp, KP_ENOTFOUND, 0, "no such frame", req->params[3]);
            return 0;
        }
        if (rc == KP_EUNSUPPORTED) {
            kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                          "this encapsulated pixel data cannot be split into frames without "
                          "decoding");
            return 0;
        }
        return rc;
    }
    s_body_str(&b, "--" S_BOUNDARY "--\r\n");
    resp->status = 200;
    snprintf(resp->ctype, sizeof resp->ctype,
             "multipart/related; type=\"%s\"; transfer-syntax=%s; boundary=" S_BOUNDARY, media, ts);
    resp->content_type = resp->ctype;
    resp->body = b.buf;
    resp->len = b.len;
    resp->compressible = kp_frames_native(ts); /* raw pixels shrink well; codestreams don't */
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
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}", "study.download",
     s_instance},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
     "study.read", s_frames},
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
            bool frames = pl == 8 && !memcmp(p, "{frames}", 8);
            if (frames ? (sl > 64 || strspn(s, "0123456789,") < sl)
                       : (sl > 64 || !kp_qido_valid_uid(s, sl))) {
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
