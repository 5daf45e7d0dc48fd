/* kp_routes: the route table and the DICOMweb handlers of this slice (QIDO-RS, WADO-RS metadata).
 *
 * Matching happens on the event loop (cheap, no I/O); the handlers run on a database worker
 * (gateway/http/README). QIDO statements come from kp_qido; metadata is the instances' stored
 * DICOM JSON, aggregated by PostgreSQL into one array, with an ETag so viewers can revalidate. */
#include "kp_routes.h"

#include "kp_errors.h"
#include "kp_api.h"
#include "kp_audit.h"
#include "kp_dicom.h"
#include "kp_frames.h"
#include "kp_image.h"
#include "kp_ingest.h"
#include "kp_multipart.h"
#include "kp_storage.h"
#include "kp_log.h"
#include "kp_mdcache.h"
#include "kp_metrics.h"
#include "kp_qido.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <pthread.h>
#include <jansson.h>
#include <strings.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The sites a request may see, as a PostgreSQL text[] literal in buf, or NULL for all (site.all,
 * or development mode). Site names are [A-Za-z0-9_.-] (schema check), so they need no escaping
 * beyond the quotes. An identity without sites gets an array that matches nothing. */
const char *kp_routes_sites(const kp_http_req_t *req, char *buf, size_t len)
{
    if (req->id.site_all) return NULL;
    size_t k = (size_t)snprintf(buf, len, "{");
    for (int i = 0; i < req->id.nsites && k + 70 < len; i++)
        k += (size_t)snprintf(buf + k, len - k, "%s\"%s\"", i ? "," : "", req->id.sites[i]);
    snprintf(buf + k, len - k, "}");
    return buf;
}

/* ---- QIDO-RS ------------------------------------------------------------------------------- */
static int s_qido(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp,
                  kp_qido_level_t level, const char *study, const char *series)
{
    char err[256];
    kp_qido_t *q = NULL;
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    int rc = kp_qido_build_sites(level, study, series, req->query, env->cfg->http_qido_limit,
                                 env->cfg->http_qido_max_limit, kp_routes_sites(req, sb, sizeof sb),
                                 &q, err, sizeof err);
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
    "($3::text IS NULL OR i.sop_uid = $3) AND ($4::text[] IS NULL OR st.site_id IN (SELECT id "    \
    "FROM sites WHERE name = ANY($4::text[])))"

static bool s_etag_matches(const char *inm, const char *etag)
{
    if (!inm) return false;
    if (!strcmp(inm, "*")) return true;
    /* A list of (possibly weak) tags: look for the exact quoted value. */
    const char *p = strstr(inm, etag);
    return p != NULL;
}

/* True when the resource, last modified at lm (an IMF-fixdate), has not changed since the
 * If-Modified-Since date ims (second precision, as HTTP dates are). */
static bool s_not_modified_since(const char *ims, const char *lm)
{
    if (!ims || !lm || !*lm) return false;
    struct tm a = {0}, b = {0};
    const char *fmt = "%a, %d %b %Y %H:%M:%S GMT";
    if (!strptime(ims, fmt, &a) || !strptime(lm, fmt, &b)) return false;
    return timegm(&b) <= timegm(&a);
}

/* Fills resp from a metadata body (taken over), or answers 304 when the client's copy is
 * current (If-None-Match; else If-Modified-Since). */
static void s_metadata_answer(const kp_http_req_t *req, kp_http_resp_t *resp, char *body,
                              size_t len)
{
    bool fresh = req->if_none_match
                     ? s_etag_matches(req->if_none_match, resp->etag)
                     : s_not_modified_since(req->if_modified_since, resp->last_modified);
    if (fresh) {
        free(body);
        resp->status = 304;
        return;
    }
    resp->status = 200;
    resp->content_type = "application/dicom+json";
    resp->body = body;
    resp->len = len;
    resp->compressible = true;
}

/* GET .../metadata (study, series, instance): the stored DICOM JSON of the instances, one array,
 * served from the metadata cache when it holds the path (kp_mdcache: invalidated by the
 * indexer's study.changed events), else aggregated by PostgreSQL and then cached. */
static int s_metadata(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    const char *params[4] = {req->params[0], req->nparams > 1 ? req->params[1] : NULL,
                             req->nparams > 2 ? req->params[2] : NULL,
                             kp_routes_sites(req, sb, sizeof sb)};
    kp_mdcache_t *mc = env->mdcache;
    uint64_t gen = 0;
    /* The cache key holds the site restriction: a response built for a user who sees every
     * site is never served to one who may not see this study. */
    char key[sizeof sb + 400];
    snprintf(key, sizeof key, "%s|%s", req->path, params[3] ? params[3] : "*");
    if (mc) {
        char *body = NULL;
        size_t len = 0;
        if (kp_mdcache_get(mc, key, &body, &len, resp->etag, resp->last_modified)) {
            s_metadata_answer(req, resp, body, len);
            return 0;
        }
        gen = kp_mdcache_generation(mc, req->params[0]);
    }
    PGresult *res = NULL;
    int rc = kp_db_exec(
        env->db, &res,
        "SELECT count(*), '\"' || md5(count(*)::text || ':' || "
        "coalesce(max(i.updated_at)::text, '') || ':' || coalesce(sum(i.pk), 0)::text) || '\"', "
        "coalesce(to_char(max(i.updated_at) AT TIME ZONE 'UTC', "
        "'Dy, DD Mon YYYY HH24:MI:SS \"GMT\"'), '')" S_MD_FROM,
        4, params);
    if (rc) return rc;
    long count = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    snprintf(resp->etag, sizeof resp->etag, "%s", PQgetvalue(res, 0, 1));
    snprintf(resp->last_modified, sizeof resp->last_modified, "%s", PQgetvalue(res, 0, 2));
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
        resp->last_modified[0] = 0;
        return 0;
    }
    if (!mc &&
        (req->if_none_match ? s_etag_matches(req->if_none_match, resp->etag)
                            : s_not_modified_since(req->if_modified_since, resp->last_modified))) {
        resp->status = 304;
        return 0;
    }
    rc = kp_db_exec(env->db, &res,
                    "SELECT coalesce(json_agg(i.metadata ORDER BY se.series_number NULLS LAST, "
                    "se.pk, i.instance_number NULLS LAST, i.pk), '[]'::json)::text" S_MD_FROM,
                    4, params);
    if (rc) return rc;
    size_t len = (size_t)PQgetlength(res, 0, 0);
    char *body = strndup(PQgetvalue(res, 0, 0), len);
    if (!body) abort();
    PQclear(res);
    if (mc)
        kp_mdcache_put(mc, key, req->params[0], gen, body, len, resp->etag, resp->last_modified);
    s_metadata_answer(req, resp, body, len);
    return 0;
}

/* ---- WADO-RS: shared pieces --------------------------------------------------------------- */

/* One boundary for every multipart response: 40 random-looking characters, so that it cannot
 * plausibly occur in the bytes it separates. */
#define S_BOUNDARY "KlinikaPACS-7d1f0c9e4b2a86f3b5c0e91d2a47"

#define TS_EXPLICIT_LE "1.2.840.10008.1.2.1"
#define TS_IMPLICIT_LE "1.2.840.10008.1.2"

/* What whole instances can be transcoded to (DCMTK codecs), in the order a default is picked. */
static const char *const s_dicom_producible[] = {TS_EXPLICIT_LE,           TS_IMPLICIT_LE,
                                                 "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70",
                                                 "1.2.840.10008.1.2.5",    NULL};
/* What frames can be decoded to. */
static const char *const s_frame_producible[] = {TS_EXPLICIT_LE, TS_IMPLICIT_LE, NULL};

/* The absolute path of a stored file (malloc'd) after checking the stored path's shape, with its
 * size in *size; NULL (and *rc) when the index holds a bad path or the file is missing. */
static char *s_stored(kp_http_env_t *env, const char *rel, int64_t *size, int *rc)
{
    if (!kp_storage_relpath_valid(rel)) {
        *rc = KP_EINTERNAL;
        return NULL;
    }
    size_t n = strlen(env->cfg->storage_root) + strlen(rel) + 2;
    char *path = malloc(n);
    if (!path) abort();
    snprintf(path, n, "%s/%s", env->cfg->storage_root, rel);
    struct stat sb;
    if (stat(path, &sb)) {
        kp_error("wado", "stored file %s is missing", path);
        free(path);
        *rc = KP_EIO;
        return NULL;
    }
    *size = (int64_t)sb.st_size;
    return path;
}

/* Writes buf to a new temporary file of the storage (for transcoded instances, so a whole study
 * is never held in memory). Returns its malloc'd path, or NULL. */
static char *s_to_tempfile(kp_http_env_t *env, const kp_buf_t *buf)
{
    char *path = NULL;
    int fd = kp_storage_tmpfile(env->st, &path);
    if (fd < 0) return NULL;
    size_t done = 0;
    while (done < buf->len) {
        ssize_t w = write(fd, buf->data + done, buf->len - done);
        if (w <= 0) break;
        done += (size_t)w;
    }
    close(fd);
    if (done != buf->len) {
        unlink(path);
        free(path);
        return NULL;
    }
    return path;
}

/* Value of query parameter `name` (percent-decoded, '+' as space) into out: 1 found, 0 absent,
 * -1 malformed or too long. */
static int s_query(const char *query, const char *name, char *out, size_t outlen)
{
    if (!query) return 0;
    size_t nl = strlen(name);
    for (const char *p = query; *p;) {
        const char *e = strchr(p, '&');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len > nl && p[nl] == '=' && !strncmp(p, name, nl)) {
            size_t vl = len - nl - 1; /* the raw value, then decoded in place (kp_qido's rules) */
            if (vl >= outlen) return -1;
            memcpy(out, p + nl + 1, vl);
            out[vl] = 0;
            return kp_qido_url_decode(out) ? 1 : -1;
        }
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

/* ---- WADO-RS: study, series and instance retrieval ----------------------------------------- */

/* GET /studies/{s}[/series/{se}[/instances/{i}]]: the Part 10 files as multipart/related;
 * type="application/dicom", streamed from the stored files by the event loop. An instance whose
 * stored syntax the client does not accept is transcoded (DCMTK) into a temporary file first. */
static int s_retrieve(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    const char *params[4] = {req->params[0], req->nparams > 1 ? req->params[1] : NULL,
                             req->nparams > 2 ? req->params[2] : NULL,
                             kp_routes_sites(req, sb, sizeof sb)};
    PGresult *res = NULL;
    int rc = kp_db_exec(env->db, &res,
                        "SELECT i.path, i.transfer_syntax_uid, i.sop_uid" S_MD_FROM
                        " ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS "
                        "LAST, i.pk",
                        4, params);
    if (rc) return rc;
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        const char *what = params[2] ? "instance" : params[1] ? "series" : "study";
        char msg[64];
        snprintf(msg, sizeof msg, "no such %s", what);
        kp_http_error(resp, KP_ENOTFOUND, 0, msg,
                      params[2]   ? params[2]
                      : params[1] ? params[1]
                                  : params[0]);
        return 0;
    }
    for (int r = 0; r < n && !rc; r++) {
        const char *ts = PQgetvalue(res, r, 1);
        const char *want = kp_frames_choose(req->accept, ts, "dicom", s_dicom_producible);
        if (!want) {
            char detail[256];
            snprintf(detail, sizeof detail,
                     "instance %.64s is stored as %.64s; ask for transfer-syntax=*, or one of "
                     "Explicit/Implicit VR Little Endian, JPEG-LS or JPEG lossless, RLE",
                     PQgetvalue(res, r, 2), ts);
            kp_http_resp_clear(resp);
            kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL, detail);
            PQclear(res);
            return 0;
        }
        int64_t size = 0;
        char *path = s_stored(env, PQgetvalue(res, r, 0), &size, &rc);
        if (!path) break;
        char head[256];
        snprintf(head, sizeof head,
                 "%s--" S_BOUNDARY
                 "\r\nContent-Type: application/dicom; transfer-syntax=%s\r\n\r\n",
                 r ? "\r\n" : "", want);
        if (want == ts) {
            kp_http_seg_str(resp, head);
            kp_http_seg_file(resp, path, 0, size, size);
        } else {
            kp_buf_t buf = {0};
            rc = kp_image_transcode(path, want, &buf);
            char *tmp = rc ? NULL : s_to_tempfile(env, &buf);
            if (!rc && !tmp) rc = KP_EIO;
            if (!rc) {
                kp_http_seg_str(resp, head);
                kp_http_seg_tempfile(resp, tmp, (int64_t)buf.len);
            }
            free(tmp);
            kp_buf_free(&buf);
            if (rc == KP_EUNSUPPORTED || rc == KP_EDICOM) {
                char detail[320];
                snprintf(detail, sizeof detail,
                         "instance %.64s (stored as %.64s) cannot be transcoded to %.64s; ask "
                         "for transfer-syntax=*",
                         PQgetvalue(res, r, 2), ts, want);
                kp_http_resp_clear(resp);
                kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL, detail);
                free(path);
                PQclear(res);
                return 0;
            }
        }
        free(path);
    }
    PQclear(res);
    if (rc) return rc;
    kp_http_seg_str(resp, "\r\n--" S_BOUNDARY "--\r\n");
    resp->status = 200;
    snprintf(resp->ctype, sizeof resp->ctype,
             "multipart/related; type=\"application/dicom\"; boundary=" S_BOUNDARY);
    resp->content_type = resp->ctype;
    return 0;
}

/* What the frame, bulk data and rendering routes need of one instance, from the index. */
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
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    const char *params[] = {req->params[0], req->params[1], req->params[2],
                            kp_routes_sites(req, sb, sizeof sb)};
    PGresult *res = NULL;
    int rc = kp_db_exec(env->db, &res,
                        "SELECT i.path, i.transfer_syntax_uid, i.pixel_offset, i.pixel_length, "
                        "coalesce(i.number_of_frames, 1), coalesce(i.rows, 0), "
                        "coalesce(i.columns, 0), coalesce(i.bits_allocated, 0), "
                        "coalesce(i.metadata->'00280002'->'Value'->>0, '1')" S_MD_FROM,
                        4, params);
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

/* ---- WADO-RS: frames ----------------------------------------------------------------------- */

/* GET .../instances/{sop}/frames/{list}: each frame as one part, every part header written
 * exactly as "Content-Type:" (OHIF's parser needs that). Frames go as stored (straight from
 * the file, only the requested frame's bytes) when the client accepts the stored syntax; a
 * client that asks for uncompressed frames of a compressed instance gets them decoded (DCMTK,
 * that frame only). */
static int s_frames(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    long frames[KP_FRAMES_MAX_LIST];
    int nf = kp_frames_parse_list(req->params[3], frames, KP_FRAMES_MAX_LIST);
    if (nf <= 0) {
        kp_http_error(resp, KP_EINVAL, 0, "bad frame list",
                      "frame numbers start at 1, separated by commas (at most 64)");
        return 0;
    }
    s_inst_t in;
    int rc = s_find_instance(env, req, resp, &in);
    if (rc <= 0) return rc;
    rc = 0;
    /* Native pixel data without a file offset (a deflated data set): decoded by DCMTK. */
    bool inflate = !in.has_pixels && kp_frames_native(in.ts);
    const char *want =
        inflate ? (kp_frames_choose(req->accept, TS_EXPLICIT_LE, "frames", s_frame_producible)
                       ? s_frame_producible[0]
                       : NULL)
                : kp_frames_choose(req->accept, in.ts, "frames", s_frame_producible);
    if (!want) {
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "frames can be sent as stored (transfer-syntax=*, or the stored syntax's "
                      "media type) or decoded as application/octet-stream (Explicit VR Little "
                      "Endian)");
        return 0;
    }
    bool decode = want != in.ts;
    const char *media = decode ? "application/octet-stream" : kp_frames_media_type(in.ts);
    int64_t fsize = 0;
    char *path = s_stored(env, in.rel, &fsize, &rc);
    if (!path) return rc;
    int fd = decode ? -1 : open(path, O_RDONLY | O_CLOEXEC);
    if (!decode && fd < 0) {
        free(path);
        return KP_EIO;
    }
    kp_range_t *ranges = decode ? NULL : calloc(KP_FRAMES_MAX_FRAGMENTS, sizeof *ranges);
    if (!decode && !ranges) abort();
    for (int f = 0; f < nf && !rc; f++) {
        char head[256];
        snprintf(head, sizeof head,
                 "--" S_BOUNDARY "\r\nContent-Type: %s; transfer-syntax=%s\r\n\r\n", media, want);
        if (decode) {
            kp_buf_t buf = {0};
            rc = kp_image_frame(path, frames[f], &buf);
            if (rc) break;
            kp_http_seg_str(resp, head);
            kp_http_seg_mem(resp, (char *)buf.data, buf.len);
        } else {
            size_t n = 0;
            rc = kp_frames_locate(fd, in.pix_off, in.has_pixels ? in.pix_len : -1, in.nframes,
                                  in.frame_size, frames[f], ranges, KP_FRAMES_MAX_FRAGMENTS, &n);
            if (rc) break;
            kp_http_seg_str(resp, head);
            for (size_t i = 0; i < n; i++)
                kp_http_seg_file(resp, path, ranges[i].off, ranges[i].len, fsize);
        }
        kp_http_seg_str(resp, "\r\n");
    }
    if (fd >= 0) close(fd);
    free(ranges);
    free(path);
    if (rc) {
        kp_http_resp_clear(resp);
        if (rc == KP_ENOTFOUND) {
            kp_http_error(resp, KP_ENOTFOUND, 0, "no such frame", req->params[3]);
            return 0;
        }
        if (rc == KP_EUNSUPPORTED) {
            kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                          decode ? "no decoder for this transfer syntax here; ask for "
                                   "transfer-syntax=*"
                                 : "this encapsulated pixel data cannot be split into frames "
                                   "without decoding; ask for application/octet-stream");
            return 0;
        }
        return rc;
    }
    kp_http_seg_str(resp, "--" S_BOUNDARY "--\r\n");
    resp->status = 200;
    snprintf(resp->ctype, sizeof resp->ctype,
             "multipart/related; type=\"%s\"; transfer-syntax=%s; boundary=" S_BOUNDARY, media,
             want);
    resp->content_type = resp->ctype;
    resp->compressible = kp_frames_native(want); /* raw pixels shrink well; codestreams don't */
    return 0;
}

/* ---- WADO-RS: bulk data -------------------------------------------------------------------- */

/* A single "bytes=a-b" / "bytes=a-" / "bytes=-n" range of a body of total bytes: 1 and
 * [*from, *to] set, 0 when absent or not a single byte range (the whole body is sent), -1 when
 * unsatisfiable (416). */
static int s_range(const char *h, int64_t total, int64_t *from, int64_t *to)
{
    if (!h) return 0;
    while (*h == ' ')
        h++;
    if (strncmp(h, "bytes=", 6) || strchr(h, ',')) return 0;
    const char *p = h + 6;
    char *e;
    if (*p == '-') {
        long long n = strtoll(p + 1, &e, 10);
        if (e == p + 1 || *e || n <= 0) return n == 0 && e != p + 1 && !*e ? -1 : 0;
        *from = total > n ? total - n : 0;
        *to = total - 1;
        return total > 0 ? 1 : -1;
    }
    if (*p < '0' || *p > '9') return 0;
    long long a = strtoll(p, &e, 10);
    if (*e != '-') return 0;
    const char *q = e + 1;
    long long b = total - 1;
    if (*q) {
        if (*q < '0' || *q > '9') return 0;
        b = strtoll(q, &e, 10);
        if (*e || b < a) return 0;
    }
    if (a >= total) return -1;
    if (b >= total) b = total - 1;
    *from = a;
    *to = b;
    return 1;
}

/* GET .../instances/{sop}/bulkdata/{tagpath}: the value behind a BulkDataURI of the metadata.
 * Single part application/octet-stream (what OHIF asks for), or multipart/related when the
 * client accepts only that; a single byte Range is honoured (206 / 416). Values that lie
 * unencoded in the file are streamed from it. */
static int s_bulkdata(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    s_inst_t in;
    int rc = s_find_instance(env, req, resp, &in);
    if (rc <= 0) return rc;
    int64_t fsize = 0;
    char *path = s_stored(env, in.rel, &fsize, &rc);
    if (!path) return rc;
    int64_t off = 0, len = 0;
    unsigned char *mem = NULL;
    int derr = 0;
    kp_dicom_file_t *df = kp_dicom_open(path, &derr);
    rc = df ? kp_dicom_bulk(df, req->rest, &off, &len, &mem) : KP_EDICOM;
    kp_dicom_close(&df);
    if (rc == KP_ENOTFOUND || rc == KP_EINVAL || rc == KP_EUNSUPPORTED) {
        free(path);
        if (rc == KP_EUNSUPPORTED)
            kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                          "encapsulated pixel data is retrieved as frames (.../frames/1)");
        else
            kp_http_error(resp, KP_ENOTFOUND, 0, "no such bulk data", req->rest);
        return 0;
    }
    if (rc) {
        free(path);
        return rc;
    }
    bool multipart = req->accept && strstr(req->accept, "multipart/related") &&
                     !strstr(req->accept, "application/octet-stream,") &&
                     strncmp(req->accept, "application/octet-stream", 24) &&
                     !strstr(req->accept, "*/*");
    int64_t from = 0, to = len - 1;
    int rr = multipart ? 0 : s_range(req->range, len, &from, &to);
    if (rr < 0) {
        free(path);
        free(mem);
        kp_http_error(resp, KP_EINVAL, 416, "range not satisfiable", req->range);
        snprintf(resp->content_range, sizeof resp->content_range, "bytes */%lld", (long long)len);
        return 0;
    }
    if (multipart)
        kp_http_seg_str(resp, "--" S_BOUNDARY "\r\nContent-Type: application/octet-stream\r\n\r\n");
    if (mem) {
        if (from > 0) memmove(mem, mem + from, (size_t)(to - from + 1));
        kp_http_seg_mem(resp, (char *)mem, (size_t)(len ? to - from + 1 : 0));
    } else if (len > 0) {
        kp_http_seg_file(resp, path, off + from, to - from + 1, fsize);
    } else {
        kp_http_seg_str(resp, "");
    }
    free(path);
    if (multipart) {
        kp_http_seg_str(resp, "\r\n--" S_BOUNDARY "--\r\n");
        snprintf(resp->ctype, sizeof resp->ctype,
                 "multipart/related; type=\"application/octet-stream\"; boundary=" S_BOUNDARY);
        resp->content_type = resp->ctype;
    } else {
        resp->content_type = "application/octet-stream";
    }
    resp->status = rr == 1 ? 206 : 200;
    if (rr == 1)
        snprintf(resp->content_range, sizeof resp->content_range, "bytes %lld-%lld/%lld",
                 (long long)from, (long long)to, (long long)len);
    return 0;
}

/* ---- rendered and thumbnail ---------------------------------------------------------------- */

/* Rendering options from the query (PS3.18 8.3.5.1: viewport, window, quality) and the media type
 * from ?accept= or the Accept header. 0, or a 400/406 in resp (returns 1). */
static int s_render_opts(const kp_http_req_t *req, kp_http_resp_t *resp, bool thumbnail,
                         kp_render_opts_t *o)
{
    memset(o, 0, sizeof *o);
    char v[128];
    const char *accept = req->accept;
    char qa[128];
    if (s_query(req->query, "accept", qa, sizeof qa) == 1) accept = qa;
    o->fmt = KP_IMAGE_JPEG;
    if (accept && *accept) {
        bool jpeg =
            strstr(accept, "image/jpeg") || strstr(accept, "*/*") || strstr(accept, "image/*");
        bool png = strstr(accept, "image/png") != NULL;
        if (png && (!jpeg || strstr(accept, "image/png") < strstr(accept, "image/jpeg")))
            o->fmt = KP_IMAGE_PNG;
        else if (!jpeg) {
            kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                          "rendered images are image/jpeg or image/png");
            return 1;
        }
    }
    int q = s_query(req->query, "viewport", v, sizeof v);
    if (q < 0) goto bad;
    if (q == 1) {
        char *e;
        long w = strtol(v, &e, 10), h = 0;
        if (e == v || *e != ',') goto bad;
        char *hs = e + 1;
        h = strtol(hs, &e, 10);
        if (e == hs || (*e && *e != ',')) goto bad;
        if (w < 0 || h < 0 || w > KP_IMAGE_MAX_RENDER_DIM || h > KP_IMAGE_MAX_RENDER_DIM ||
            (w == 0 && h == 0))
            goto bad;
        o->width = (int)w;
        o->height = (int)h;
    } else if (thumbnail) {
        o->width = o->height = 128;
    }
    q = s_query(req->query, "window", v, sizeof v);
    if (q < 0) goto bad;
    if (q == 1) {
        char *e;
        double c = strtod(v, &e);
        if (e == v || *e != ',') goto bad;
        char *ws = e + 1;
        double w = strtod(ws, &e);
        if (e == ws || (*e && *e != ',') || !(w >= 1) || c != c) goto bad;
        if (*e == ',' && strcasecmp(e + 1, "linear")) goto bad;
        o->has_window = 1;
        o->center = c;
        o->width_w = w;
    }
    q = s_query(req->query, "quality", v, sizeof v);
    if (q < 0) goto bad;
    if (q == 1) {
        char *e;
        long qual = strtol(v, &e, 10);
        if (e == v || *e || qual < 1 || qual > 100) goto bad;
        o->quality = (int)qual;
    }
    return 0;
bad:
    kp_http_error(resp, KP_EINVAL, 0, "bad rendering parameter",
                  "viewport=width,height (1..8192); window=center,width[,linear] with width >= "
                  "1; quality=1..100");
    return 1;
}

static int s_render_error(kp_http_resp_t *resp, int rc, const char *what)
{
    if (rc == KP_ENOTFOUND) {
        kp_http_error(resp, KP_ENOTFOUND, 0, "nothing to render", what);
        return 0;
    }
    if (rc == KP_EUNSUPPORTED || rc == KP_EDICOM) {
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "this image cannot be rendered here (no decoder for its transfer syntax, "
                      "or not an image)");
        return 0;
    }
    return rc;
}

/* Renders frame `frame` of the stored file rel into resp (single part). */
static int s_render_one(kp_http_env_t *env, const char *rel, kp_render_opts_t *o,
                        kp_http_resp_t *resp, const char *what)
{
    int rc = 0;
    int64_t size;
    char *path = s_stored(env, rel, &size, &rc);
    if (!path) return rc;
    kp_buf_t buf = {0};
    int w = 0, h = 0;
    rc = kp_image_render(path, o, &buf, &w, &h);
    free(path);
    if (rc) return s_render_error(resp, rc, what);
    resp->status = 200;
    resp->content_type = o->fmt == KP_IMAGE_PNG ? "image/png" : "image/jpeg";
    resp->body = (char *)buf.data;
    resp->len = buf.len;
    return 0;
}

/* .../instances/{i}/rendered and /thumbnail, .../frames/{f}/rendered and /thumbnail. */
static int s_rendered_instance(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    bool thumb = strstr(req->path, "/thumbnail") != NULL;
    kp_render_opts_t o;
    if (s_render_opts(req, resp, thumb, &o)) return 0;
    if (req->nparams > 3) {
        long frames[KP_FRAMES_MAX_LIST];
        int nf = kp_frames_parse_list(req->params[3], frames, KP_FRAMES_MAX_LIST);
        if (nf != 1) {
            kp_http_error(resp, KP_EINVAL, 0, "bad frame list",
                          "a rendered frame is one frame number, starting at 1");
            return 0;
        }
        o.frame = frames[0];
    }
    s_inst_t in;
    int rc = s_find_instance(env, req, resp, &in);
    if (rc <= 0) return rc;
    return s_render_one(env, in.rel, &o, resp, req->params[2]);
}

/* Study and series level. /thumbnail: one image of a representative instance (the middle
 * instance of the first series, by number, that has pixel data). /rendered: every instance with
 * pixel data rendered (first frame), as multipart/related parts in series/instance order. */
static int s_rendered_group(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    bool thumb = strstr(req->path, "/thumbnail") != NULL;
    kp_render_opts_t o;
    if (s_render_opts(req, resp, thumb, &o)) return 0;
    char sb[KP_AUTH_MAX_SITES * 70 + 4];
    const char *params[4] = {req->params[0], req->nparams > 1 ? req->params[1] : NULL, NULL,
                             kp_routes_sites(req, sb, sizeof sb)};
    PGresult *res = NULL;
    int rc = kp_db_exec(env->db, &res,
                        "SELECT i.path, se.pk" S_MD_FROM
                        " AND (i.pixel_offset IS NOT NULL OR i.transfer_syntax_uid LIKE "
                        "'1.2.840.10008.1.2.4.%' OR i.transfer_syntax_uid = "
                        "'1.2.840.10008.1.2.5') ORDER BY se.series_number NULLS LAST, se.pk, "
                        "i.instance_number NULLS LAST, i.pk",
                        4, params);
    if (rc) return rc;
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        kp_http_error(resp, KP_ENOTFOUND, 0, "no images to render",
                      params[1] ? params[1] : params[0]);
        return 0;
    }
    if (thumb) {
        int last = 0; /* the rows of the first series */
        while (last + 1 < n && !strcmp(PQgetvalue(res, last + 1, 1), PQgetvalue(res, 0, 1)))
            last++;
        char rel[KP_STORAGE_RELPATH_MAX + 8];
        snprintf(rel, sizeof rel, "%s", PQgetvalue(res, last / 2, 0));
        PQclear(res);
        return s_render_one(env, rel, &o, resp, params[1] ? params[1] : params[0]);
    }
    const char *media = o.fmt == KP_IMAGE_PNG ? "image/png" : "image/jpeg";
    int done = 0;
    for (int r = 0; r < n && !rc; r++) {
        int64_t size;
        char *path = s_stored(env, PQgetvalue(res, r, 0), &size, &rc);
        if (!path) break;
        kp_buf_t buf = {0};
        int w, h;
        int rr = kp_image_render(path, &o, &buf, &w, &h);
        free(path);
        if (rr == KP_EUNSUPPORTED || rr == KP_EDICOM || rr == KP_ENOTFOUND) continue;
        if (rr) {
            rc = rr;
            break;
        }
        char head[160];
        snprintf(head, sizeof head, "%s--" S_BOUNDARY "\r\nContent-Type: %s\r\n\r\n",
                 done ? "\r\n" : "", media);
        kp_http_seg_str(resp, head);
        kp_http_seg_mem(resp, (char *)buf.data, buf.len);
        done++;
    }
    PQclear(res);
    if (rc) {
        kp_http_resp_clear(resp);
        return rc;
    }
    if (!done) {
        kp_http_resp_clear(resp);
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "none of these images can be rendered here");
        return 0;
    }
    kp_http_seg_str(resp, "\r\n--" S_BOUNDARY "--\r\n");
    resp->status = 200;
    snprintf(resp->ctype, sizeof resp->ctype,
             "multipart/related; type=\"%s\"; boundary=" S_BOUNDARY, media);
    resp->content_type = resp->ctype;
    return 0;
}

/* ---- STOW-RS ------------------------------------------------------------------------------- */

typedef struct {
    kp_http_env_t *env;
    char **tmp; /* temp file per part ("" path for a part that failed before ingest) */
    char **why; /* per part: NULL, or why it failed before ingest */
    int nparts, cap;
    int fd; /* of the current part */
    int64_t part_bytes;
    bool bad_type;
} s_stow_t;

static int s_stow_begin(void *user, const char *ctype)
{
    s_stow_t *s = user;
    if (s->nparts == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->tmp = realloc(s->tmp, (size_t)s->cap * sizeof *s->tmp);
        s->why = realloc(s->why, (size_t)s->cap * sizeof *s->why);
        if (!s->tmp || !s->why) abort();
    }
    int i = s->nparts++;
    s->tmp[i] = NULL;
    s->why[i] = NULL;
    s->fd = -1;
    s->part_bytes = 0;
    size_t tl = strcspn(ctype, "; ");
    if (*ctype && !(tl == 17 && !strncasecmp(ctype, "application/dicom", 17))) {
        s->why[i] = "the part is not application/dicom";
        return 0;
    }
    s->fd = kp_storage_tmpfile(s->env->st, &s->tmp[i]);
    if (s->fd < 0) {
        s->tmp[i] = NULL;
        return KP_EIO;
    }
    return 0;
}

static int s_stow_data(void *user, const unsigned char *p, size_t n)
{
    s_stow_t *s = user;
    if (s->fd < 0) return 0; /* a part being skipped */
    s->part_bytes += (int64_t)n;
    while (n) {
        ssize_t w = write(s->fd, p, n);
        if (w <= 0) return KP_EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int s_stow_end(void *user)
{
    s_stow_t *s = user;
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    if (!s->why[s->nparts - 1] && s->part_bytes == 0) s->why[s->nparts - 1] = "empty part";
    return 0;
}

static void s_stow_free(s_stow_t *s)
{
    if (s->fd >= 0) close(s->fd);
    for (int i = 0; i < s->nparts; i++) {
        if (s->tmp[i]) unlink(s->tmp[i]);
        free(s->tmp[i]);
    }
    free(s->tmp);
    free(s->why);
}

static json_t *s_json_str(const char *vr, const char *v)
{
    return json_pack("{s:s, s:[s]}", "vr", vr, "Value", v);
}

/* POST /dicom-web/studies[/{study}]: the parts are parsed first (into temp files, streamed through
 * kp_multipart), so a malformed or truncated body stores nothing (400); then every part goes
 * through the same durable path as C-STORE (kp_ingest: header check, fsync, rename, outbox row,
 * index job), all parts in one commit, and the response lists what was stored
 * (ReferencedSOPSequence) and what failed and why (FailedSOPSequence). 200 all stored, 202 some,
 * 409 none. */
static int s_stow(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char boundary[KP_MULTIPART_BOUNDARY_MAX + 1], type[128];
    int rc = kp_multipart_content_type(req->content_type ? req->content_type : "", boundary,
                                       sizeof boundary, type, sizeof type);
    if (rc == KP_EUNSUPPORTED || (!rc && type[0] && strcmp(type, "application/dicom"))) {
        kp_http_error(resp, KP_EUNSUPPORTED, 0, "unsupported media type",
                      "send multipart/related; type=\"application/dicom\" with one Part 10 "
                      "instance per part");
        return 0;
    }
    if (rc) {
        kp_http_error(resp, KP_EINVAL, 0, "bad Content-Type",
                      "the multipart boundary is missing or invalid");
        return 0;
    }
    if (!req->body || !req->body_len) {
        kp_http_error(resp, KP_EINVAL, 0, "empty request body", NULL);
        return 0;
    }
    /* storage (nearly) full: 507 before anything is written (storage.min_free_mb) */
    struct statvfs vfs;
    long long need =
        (long long)env->cfg->storage_min_free_mb * 1024 * 1024 + (long long)req->body_len;
    if (env->cfg->storage_min_free_mb > 0 && statvfs(kp_storage_tmpdir(env->st), &vfs) == 0 &&
        (long long)vfs.f_bavail * (long long)vfs.f_frsize < need) {
        kp_http_error(resp, KP_EIO, 507, "the storage is full",
                      "nothing was stored; try again once space is freed (storage.min_free_mb)");
        resp->retry_after = 60;
        return 0;
    }
    s_stow_t st = {.env = env, .fd = -1};
    kp_multipart_cb_t cb = {
        .part_begin = s_stow_begin, .part_data = s_stow_data, .part_end = s_stow_end, .user = &st};
    kp_multipart_t *mp = kp_multipart_new(boundary, &cb, KP_MULTIPART_HEADER_DEFAULT);
    if (!mp) abort();
    rc = kp_multipart_feed(mp, (const unsigned char *)req->body, req->body_len);
    if (!rc) rc = kp_multipart_finish(mp);
    int nparts = kp_multipart_nparts(mp);
    kp_multipart_destroy(&mp);
    if (rc || st.nparts == 0) {
        s_stow_free(&st);
        if (rc == KP_EIO) return KP_EIO;
        kp_http_error(resp, KP_EINVAL, 0, "malformed multipart body",
                      rc ? "the body is truncated or not multipart/related with the announced "
                           "boundary; nothing was stored"
                         : "the body holds no parts");
        return 0;
    }
    (void)nparts;
    const char *study = req->nparams > 0 ? req->params[0] : NULL;
    kp_ingest_result_t *res = calloc((size_t)st.nparts, sizeof *res);
    kp_ingest_pending_t **pend = calloc((size_t)st.nparts, sizeof *pend);
    int *rcs = calloc((size_t)st.nparts, sizeof *rcs);
    int *slot = calloc((size_t)st.nparts, sizeof *slot);
    if (!res || !pend || !rcs || !slot) abort();
    int npend = 0;
    for (int i = 0; i < st.nparts; i++) {
        if (st.why[i]) {
            rcs[i] = KP_EUNSUPPORTED;
            res[i].reason = st.why[i];
            continue;
        }
        kp_ingest_req_t in = {.tmp_path = st.tmp[i],
                              .expected_study = study,
                              .source = "STOW-RS",
                              .request_id = req->request_id};
        kp_ingest_pending_t *p = NULL;
        rcs[i] = kp_ingest_prepare(env->ing, &in, &res[i], &p);
        free(st.tmp[i]); /* consumed by prepare */
        st.tmp[i] = NULL;
        if (!rcs[i]) {
            slot[npend] = i;
            pend[npend++] = p;
        }
    }
    int *crc = calloc((size_t)(npend ? npend : 1), sizeof *crc);
    if (!crc) abort();
    kp_ingest_commit(env->ing, pend, (size_t)npend, crc);
    for (int k = 0; k < npend; k++) {
        rcs[slot[k]] = crc[k];
        if (crc[k]) res[slot[k]].reason = "the archive could not record the instance";
    }
    json_t *ok = json_array(), *failed = json_array();
    int nok = 0, nfail = 0;
    bool transient = false;
    for (int i = 0; i < st.nparts; i++) {
        json_t *item = json_object();
        if (res[i].sop_class[0])
            json_object_set_new(item, "00081150", s_json_str("UI", res[i].sop_class));
        if (res[i].sop_uid[0])
            json_object_set_new(item, "00081155", s_json_str("UI", res[i].sop_uid));
        if (!rcs[i]) {
            char url[400];
            snprintf(url, sizeof url, "%s/dicom-web/studies/%s/series/%s/instances/%s",
                     req->origin ? req->origin : "", res[i].study_uid, res[i].series_uid,
                     res[i].sop_uid);
            json_object_set_new(item, "00081190", s_json_str("UR", url));
            json_array_append_new(ok, item);
            nok++;
        } else {
            unsigned reason = kp_error_dimse(rcs[i]);
            if (rcs[i] == KP_EUNSUPPORTED) reason = 0xC000;
            if (rcs[i] == KP_EDB || rcs[i] == KP_EIO || rcs[i] == KP_EAGAIN) transient = true;
            json_object_set_new(item, "00081197",
                                json_pack("{s:s, s:[i]}", "vr", "US", "Value", (int)reason));
            json_array_append_new(failed, item);
            const char *why = res[i].reason ? res[i].reason : kp_strerror(rcs[i]);
            kp_info("stow", "part %d failed: %s", i + 1, why);
            if (!resp->warning) { /* the first failure's reason, for people reading headers */
                char w[256];
                snprintf(w, sizeof w, "part %d: %s", i + 1, why);
                resp->warning = strdup(w);
            }
            nfail++;
        }
    }
    json_t *root = json_object();
    if (study) {
        char url[300];
        snprintf(url, sizeof url, "%s/dicom-web/studies/%s", req->origin ? req->origin : "", study);
        json_object_set_new(root, "00081190", s_json_str("UR", url));
    }
    if (nfail)
        json_object_set_new(root, "00081198", json_pack("{s:s, s:o}", "vr", "SQ", "Value", failed));
    else
        json_decref(failed);
    if (nok)
        json_object_set_new(root, "00081199", json_pack("{s:s, s:o}", "vr", "SQ", "Value", ok));
    else
        json_decref(ok);
    resp->body = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!resp->body) abort();
    resp->len = strlen(resp->body);
    resp->content_type = "application/dicom+json";
    resp->status = nfail == 0 ? 200 : nok ? 202 : transient ? 503 : 409;
    kp_info("stow", "%d instance(s) stored, %d failed", nok, nfail);
    free(res);
    free(pend);
    free(rcs);
    free(slot);
    free(crc);
    s_stow_free(&st);
    return 0;
}

/* ---- WADO-URI ------------------------------------------------------------------------------ */

/* GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=[&contentType=][&frameNumber=]
 * [&rows=&columns=][&windowCenter=&windowWidth=][&imageQuality=][&transferSyntax=] (PS3.18 9):
 * application/dicom (the file, or transcoded) or image/jpeg / image/png (rendered). */
static int s_wado_uri(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    char rt[16], uids[3][80], ctype[64], v[64];
    static const char *const names[3] = {"studyUID", "seriesUID", "objectUID"};
    if (s_query(req->query, "requestType", rt, sizeof rt) != 1 || strcmp(rt, "WADO")) {
        kp_http_error(resp, KP_EINVAL, 0, "requestType=WADO is required", NULL);
        return 0;
    }
    for (int i = 0; i < 3; i++) {
        if (s_query(req->query, names[i], uids[i], sizeof uids[i]) != 1 ||
            !kp_qido_valid_uid(uids[i], strlen(uids[i]))) {
            kp_http_error(resp, KP_EINVAL, 0, "studyUID, seriesUID and objectUID must be UIDs",
                          names[i]);
            return 0;
        }
    }
    int q = s_query(req->query, "contentType", ctype, sizeof ctype);
    if (q < 0) goto bad;
    if (q == 0) snprintf(ctype, sizeof ctype, "image/jpeg"); /* the standard's default */
    kp_http_req_t sub = *req; /* same request, the UIDs as path parameters */
    sub.nparams = 3;
    for (int i = 0; i < 3; i++)
        snprintf(sub.params[i], sizeof sub.params[i], "%.64s", uids[i]);
    s_inst_t in;
    int rc = s_find_instance(env, &sub, resp, &in);
    if (rc <= 0) return rc;
    int64_t size;
    char *path = s_stored(env, in.rel, &size, &rc);
    if (!path) return rc;
    if (!strcmp(ctype, "application/dicom")) {
        char ts[72] = "";
        if (s_query(req->query, "transferSyntax", ts, sizeof ts) < 0) {
            free(path);
            goto bad;
        }
        if (!ts[0] || !strcmp(ts, in.ts)) {
            kp_http_seg_file(resp, path, 0, size, size);
        } else {
            kp_buf_t buf = {0};
            rc = kp_image_transcode(path, ts, &buf);
            if (rc) {
                free(path);
                if (rc == KP_EUNSUPPORTED || rc == KP_EDICOM) {
                    kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                                  "cannot transcode this instance to the requested transferSyntax");
                    return 0;
                }
                return rc;
            }
            kp_http_seg_mem(resp, (char *)buf.data, buf.len);
        }
        free(path);
        resp->status = 200;
        resp->content_type = "application/dicom";
        return 0;
    }
    free(path);
    kp_render_opts_t o = {.fmt = KP_IMAGE_JPEG};
    if (!strcmp(ctype, "image/png"))
        o.fmt = KP_IMAGE_PNG;
    else if (strcmp(ctype, "image/jpeg") && strcmp(ctype, "image/*") && strcmp(ctype, "*/*")) {
        kp_http_error(resp, KP_ENOTACCEPTABLE, 0, NULL,
                      "contentType is application/dicom, image/jpeg or image/png");
        return 0;
    }
    static const char *const ints[] = {"frameNumber", "rows", "columns", "imageQuality"};
    long iv[4] = {1, 0, 0, 0};
    for (int i = 0; i < 4; i++) {
        q = s_query(req->query, ints[i], v, sizeof v);
        if (q < 0) goto bad;
        if (q == 1) {
            char *e;
            iv[i] = strtol(v, &e, 10);
            if (e == v || *e || iv[i] < (i == 0 ? 1 : 0) ||
                iv[i] > (i == 3   ? 100
                         : i == 0 ? 1000000
                                  : KP_IMAGE_MAX_RENDER_DIM))
                goto bad;
        }
    }
    o.frame = iv[0];
    o.height = (int)iv[1];
    o.width = (int)iv[2];
    o.quality = (int)iv[3];
    char wc[64], ww[64];
    int qc = s_query(req->query, "windowCenter", wc, sizeof wc),
        qw = s_query(req->query, "windowWidth", ww, sizeof ww);
    if (qc < 0 || qw < 0 || qc != qw) goto bad;
    if (qc == 1) {
        char *e1, *e2;
        o.center = strtod(wc, &e1);
        o.width_w = strtod(ww, &e2);
        if (e1 == wc || *e1 || e2 == ww || *e2 || !(o.width_w >= 1)) goto bad;
        o.has_window = 1;
    }
    return s_render_one(env, in.rel, &o, resp, uids[2]);
bad:
    kp_http_error(resp, KP_EINVAL, 0, "bad WADO-URI parameter",
                  "frameNumber >= 1; rows/columns 0..8192; imageQuality 1..100; windowCenter and "
                  "windowWidth together");
    return 0;
}

/* ---- the table ----------------------------------------------------------------------------- */
static const kp_route_t s_routes[] = {
    {"GET", "/dicom-web/studies", "study.read", s_qido_studies},
    {"POST", "/dicom-web/studies", "study.upload", s_stow},
    {"GET", "/dicom-web/series", "study.read", s_qido_series},
    {"GET", "/dicom-web/instances", "study.read", s_qido_instances},
    {"GET", "/dicom-web/studies/{study}", "study.download", s_retrieve},
    {"POST", "/dicom-web/studies/{study}", "study.upload", s_stow},
    {"GET", "/dicom-web/studies/{study}/series", "study.read", s_qido_study_series},
    {"GET", "/dicom-web/studies/{study}/instances", "study.read", s_qido_study_instances},
    {"GET", "/dicom-web/studies/{study}/metadata", "study.read", s_metadata},
    {"GET", "/dicom-web/studies/{study}/rendered", "study.read", s_rendered_group},
    {"GET", "/dicom-web/studies/{study}/thumbnail", "study.read", s_rendered_group},
    {"GET", "/dicom-web/studies/{study}/series/{series}", "study.download", s_retrieve},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances", "study.read",
     s_qido_series_instances},
    {"GET", "/dicom-web/studies/{study}/series/{series}/metadata", "study.read", s_metadata},
    {"GET", "/dicom-web/studies/{study}/series/{series}/rendered", "study.read", s_rendered_group},
    {"GET", "/dicom-web/studies/{study}/series/{series}/thumbnail", "study.read", s_rendered_group},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}", "study.download",
     s_retrieve},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata",
     "study.read", s_metadata},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/rendered",
     "study.read", s_rendered_instance},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/thumbnail",
     "study.read", s_rendered_instance},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
     "study.read", s_frames},
    {"GET",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
     "study.read", s_rendered_instance},
    {"GET",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
     "study.read", s_rendered_instance},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tagpath...}",
     "study.read", s_bulkdata},
    {"GET", "/wado", "study.download", s_wado_uri},
    /* the REST API (kp_api_*.c) and our web application's pages (kp_www.c) */
    {"POST", "/api/auth/login", KP_PERM_PUBLIC, kp_api_login},
    {"POST", "/api/auth/refresh", KP_PERM_PUBLIC, kp_api_refresh},
    {"POST", "/api/auth/logout", KP_PERM_AUTHENTICATED, kp_api_logout},
    {"GET", "/api/auth/me", KP_PERM_AUTHENTICATED, kp_api_me},
    {"PUT", "/api/auth/me", KP_PERM_AUTHENTICATED, kp_api_me_update},
    {"POST", "/api/auth/password", KP_PERM_AUTHENTICATED, kp_api_password},
    {"POST", "/api/auth/mfa/setup", KP_PERM_AUTHENTICATED, kp_api_mfa_setup},
    {"POST", "/api/auth/mfa/confirm", KP_PERM_AUTHENTICATED, kp_api_mfa_confirm},
    {"POST", "/api/auth/mfa/disable", KP_PERM_AUTHENTICATED, kp_api_mfa_disable},
    /* the admin API (kp_api_admin.c) */
    {"GET", "/api/users", "user.manage", kp_api_users_list},
    {"POST", "/api/users", "user.manage", kp_api_users_create},
    {"GET", "/api/users/{name}", "user.manage", kp_api_user_get},
    {"PUT", "/api/users/{name}", "user.manage", kp_api_user_update},
    {"DELETE", "/api/users/{name}", "user.manage", kp_api_user_delete},
    {"POST", "/api/users/{name}/password", "user.manage", kp_api_user_password},
    {"POST", "/api/users/{name}/unlock", "user.manage", kp_api_user_unlock},
    {"POST", "/api/users/{name}/reset-mfa", "user.manage", kp_api_user_reset_mfa},
    {"GET", "/api/roles", "role.manage", kp_api_roles_list},
    {"POST", "/api/roles", "role.manage", kp_api_roles_create},
    {"GET", "/api/roles/{name}", "role.manage", kp_api_role_get},
    {"PUT", "/api/roles/{name}", "role.manage", kp_api_role_update},
    {"DELETE", "/api/roles/{name}", "role.manage", kp_api_role_delete},
    {"GET", "/api/permissions", "role.manage", kp_api_permissions_list},
    {"GET", "/api/sites", "site.manage", kp_api_sites_list},
    {"POST", "/api/sites", "site.manage", kp_api_sites_create},
    {"GET", "/api/sites/{name}", "site.manage", kp_api_site_get},
    {"PUT", "/api/sites/{name}", "site.manage", kp_api_site_update},
    {"DELETE", "/api/sites/{name}", "site.manage", kp_api_site_delete},
    /* the modality registry (kp_api_modalities.c; the table of pacsctl ae) */
    {"GET", "/api/modalities", "system.configure", kp_api_modalities_list},
    {"POST", "/api/modalities", "system.configure", kp_api_modalities_create},
    {"GET", "/api/modalities/{ae}", "system.configure", kp_api_modality_get},
    {"PUT", "/api/modalities/{ae}", "system.configure", kp_api_modality_update},
    {"DELETE", "/api/modalities/{ae}", "system.configure", kp_api_modality_delete},
    {"POST", "/api/modalities/{ae}/echo", "system.configure", kp_api_modality_echo},
    /* routing rules and deliveries (kp_api_routes.c; pacs-router sends them). The literal
     * /api/routes/deliveries comes before /api/routes/{id} ({id} is digits only anyway). */
    {"GET", "/api/routes/deliveries", "route.manage", kp_api_route_deliveries},
    {"POST", "/api/routes/deliveries/retry", "route.manage", kp_api_route_deliveries_retry},
    {"POST", "/api/routes/deliveries/{id}/retry", "route.manage", kp_api_route_delivery_retry},
    {"GET", "/api/routes", "route.manage", kp_api_routes_list},
    {"POST", "/api/routes", "route.manage", kp_api_routes_create},
    {"GET", "/api/routes/{id}", "route.manage", kp_api_route_get},
    {"PUT", "/api/routes/{id}", "route.manage", kp_api_route_update},
    {"DELETE", "/api/routes/{id}", "route.manage", kp_api_route_delete},
    {"GET", "/api/audit", "audit.read", kp_api_audit_list},
    /* the web application's worklist and queue/worker status (kp_api_worklist.c) */
    {"GET", "/api/worklist", "study.read", kp_api_worklist},
    {"GET", "/api/system/status", "system.configure", kp_api_system_status},
    /* doctors' reports (kp_api_reports.c; docs/reports.md) */
    {"GET", "/api/studies/{study}/reports", "report.read", kp_api_study_reports},
    {"POST", "/api/studies/{study}/reports", "report.write", kp_api_report_create},
    {"GET", "/api/reports", "report.read", kp_api_reports_list},
    {"GET", "/api/reports/{id}", "report.read", kp_api_report_get},
    {"PUT", "/api/reports/{id}", "report.write", kp_api_report_update},
    {"DELETE", "/api/reports/{id}", "report.delete", kp_api_report_delete},
    {"POST", "/api/reports/{id}/sign", "report.sign", kp_api_report_sign},
    {"POST", "/api/reports/{id}/amend", "report.sign", kp_api_report_amend},
    {"GET", "/api/reports/{id}/versions/{n}", "report.read", kp_api_report_version},
    {"POST", "/api/reports/{id}/pdf", "report.export", kp_api_report_pdf_request},
    {"GET", "/api/reports/{id}/pdf", "report.export", kp_api_report_pdf_get},
    {"GET", "/api/report-pdfs/{pdf_id}", "report.export", kp_api_report_pdf_state},
    {"GET", "/api/report-templates", "report.read", kp_api_templates_list},
    {"POST", "/api/report-templates", "system.configure", kp_api_template_create},
    {"GET", "/api/report-templates/{id}", "report.read", kp_api_template_get},
    {"PUT", "/api/report-templates/{id}", "system.configure", kp_api_template_update},
    {"DELETE", "/api/report-templates/{id}", "system.configure", kp_api_template_delete},
    {"GET", "/api/openapi.json", KP_PERM_PUBLIC, kp_api_openapi},
    {"GET", "/healthz", KP_PERM_PUBLIC, kp_api_healthz},
    {"GET", "/readyz", KP_PERM_PUBLIC, kp_api_readyz},
    {"GET", "/metrics", KP_PERM_PUBLIC, kp_api_metrics},
    {"GET", "/app/login", KP_PERM_PUBLIC, kp_api_www},
    {"GET", "/app/login.js", KP_PERM_PUBLIC, kp_api_www},
    {"GET", "/app", KP_PERM_PUBLIC, kp_api_www},
    {"GET", "/app/{file...}", KP_PERM_PUBLIC, kp_api_www},
};
#define S_NROUTES (sizeof s_routes / sizeof s_routes[0])

/* ---- audit of DICOMweb and admin requests ---------------------------------------------------
 * After a handler succeeded, the worker records who did what (kp_audit: an outbox job for
 * pacs-auditor): study.query (QIDO, with the query), study.download (whole instances, WADO-URI),
 * study.upload (STOW-RS, with the counts in the response), admin.* (a change through the admin
 * API). study.view (metadata, frames, rendered, bulk data) is recorded once per user and study
 * within S_VIEW_WINDOW seconds: a viewer fetches hundreds of frames for one look at a study. */
#define S_VIEW_WINDOW 300
#define S_VIEW_SLOTS  2048

static struct {
    pthread_mutex_t mu;
    struct {
        char key[160];
        time_t at;
    } slot[S_VIEW_SLOTS];
} s_views = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* True when (user, study) was recorded as viewed within the window (and notes it otherwise). */
static bool s_viewed_recently(const char *user, const char *study)
{
    char key[160];
    snprintf(key, sizeof key, "%.72s|%.72s", user, study);
    size_t h = 5381;
    for (const char *p = key; *p; p++)
        h = h * 33 + (unsigned char)*p;
    time_t now = time(NULL);
    pthread_mutex_lock(&s_views.mu);
    bool recent = !strcmp(s_views.slot[h % S_VIEW_SLOTS].key, key) &&
                  now - s_views.slot[h % S_VIEW_SLOTS].at < S_VIEW_WINDOW;
    if (!recent) {
        snprintf(s_views.slot[h % S_VIEW_SLOTS].key, sizeof s_views.slot[0].key, "%s", key);
        s_views.slot[h % S_VIEW_SLOTS].at = now;
    }
    pthread_mutex_unlock(&s_views.mu);
    return recent;
}

static bool s_is_qido(kp_route_fn f)
{
    return f == s_qido_studies || f == s_qido_series || f == s_qido_instances ||
           f == s_qido_study_series || f == s_qido_study_instances || f == s_qido_series_instances;
}

void kp_routes_audit(kp_http_env_t *env, const kp_http_req_t *req, const kp_http_resp_t *resp)
{
    const kp_route_t *r = req->route;
    if (!r || !req->id.authenticated || resp->status >= 400 || resp->status == 304) return;
    const char *perm = r->permission, *action = NULL;
    char study[72] = "";
    if (!strncmp(r->pattern, "/dicom-web/studies/{study}", 26))
        snprintf(study, sizeof study, "%s", req->params[0]);
    if (!strcmp(r->pattern, "/wado")) {
        if (s_query(req->query, "studyUID", study, sizeof study) != 1) study[0] = 0;
    }
    json_t *d = json_object();
    if (!strcmp(perm, "study.upload")) {
        action = "study.upload";
        json_t *b = resp->body ? json_loadb(resp->body, resp->len, 0, NULL) : NULL;
        json_t *ok = json_object_get(json_object_get(b, "00081199"), "Value");
        json_t *bad = json_object_get(json_object_get(b, "00081198"), "Value");
        json_object_set_new(d, "stored", json_integer((json_int_t)json_array_size(ok)));
        kp_metrics_add(KP_MET_STOW_INSTANCES, (long)json_array_size(ok));
        json_object_set_new(d, "failed", json_integer((json_int_t)json_array_size(bad)));
        if (!study[0] && json_array_size(ok)) { /* the study of the first stored instance */
            const char *url = json_string_value(json_array_get(
                json_object_get(json_object_get(json_array_get(ok, 0), "00081190"), "Value"), 0));
            const char *st = url ? strstr(url, "/studies/") : NULL;
            if (st) snprintf(study, sizeof study, "%.*s", (int)strcspn(st + 9, "/"), st + 9);
        }
        json_decref(b);
    } else if (!strcmp(perm, "study.download")) {
        action = "study.download";
    } else if (!strcmp(perm, "study.read")) {
        if (s_is_qido(r->handler)) {
            action = "study.query";
            json_object_set_new(d, "query", json_string(req->query ? req->query : ""));
        } else if (study[0] && !s_viewed_recently(req->id.user, study)) {
            action = "study.view";
        }
    } else if (!strncmp(r->pattern, "/api/modalities", 15) && strcmp(req->method, "GET") &&
               r->handler != kp_api_modality_echo) {
        /* a change of the modality registry (an echo changes nothing) */
        action = "admin.modality";
        json_t *b = req->nparams || !resp->body ? NULL : json_loadb(resp->body, resp->len, 0, NULL);
        const char *ae =
            req->nparams ? req->params[0] : json_string_value(json_object_get(b, "ae_title"));
        json_object_set_new(d, "target", json_string(ae ? ae : ""));
        json_decref(b);
    } else if (!strcmp(perm, "route.manage") && strcmp(req->method, "GET")) {
        /* a change of a routing rule, or a manual retry of deliveries */
        action = "admin.route";
        json_t *b = req->nparams || !resp->body ? NULL : json_loadb(resp->body, resp->len, 0, NULL);
        json_t *rid = json_object_get(b, "id");
        char target[96];
        if (r->handler == kp_api_route_delivery_retry)
            snprintf(target, sizeof target, "delivery %s", req->params[0]);
        else if (r->handler == kp_api_route_deliveries_retry)
            snprintf(target, sizeof target, "dead deliveries");
        else if (req->nparams)
            snprintf(target, sizeof target, "route %s", req->params[0]);
        else
            snprintf(target, sizeof target, "route %lld", (long long)json_integer_value(rid));
        json_object_set_new(d, "target", json_string(target));
        json_decref(b);
    } else if ((!strcmp(perm, "user.manage") || !strcmp(perm, "role.manage") ||
                !strcmp(perm, "site.manage")) &&
               strcmp(req->method, "GET")) {
        action = !strcmp(perm, "user.manage")   ? "admin.user"
                 : !strcmp(perm, "role.manage") ? "admin.role"
                                                : "admin.site";
        json_object_set_new(d, "target", json_string(req->nparams ? req->params[0] : ""));
    }
    if (!action) {
        json_decref(d);
        return;
    }
    json_object_set_new(d, "method", json_string(req->method));
    json_object_set_new(d, "path", json_string(req->path));
    char pid[72] = "";
    if (study[0]) {
        const char *p[] = {study};
        PGresult *res = NULL;
        if (!kp_db_exec(env->db, &res, "SELECT patient_id FROM studies WHERE study_uid = $1", 1,
                        p) &&
            PQntuples(res) == 1)
            snprintf(pid, sizeof pid, "%s", PQgetvalue(res, 0, 0));
        if (res) PQclear(res);
    }
    kp_audit_event_t ev = {.action = action,
                           .outcome = "success",
                           .actor = req->id.user,
                           .client = req->peer,
                           .patient_id = pid[0] ? pid : NULL,
                           .study_uid = study[0] ? study : NULL,
                           .detail = d};
    if (kp_audit_emit(env->db, NULL, &ev))
        kp_warn("audit", "%s by %s not recorded", action, req->id.user);
    json_decref(d);
}

const kp_route_t *kp_routes_table(size_t *n)
{
    *n = S_NROUTES;
    return s_routes;
}

/* Matches path against pattern; fills params (unvalidated). Returns the number of params, or -1
 * when the shapes differ. */
static int s_match(const char *pattern, const char *path, size_t pathlen,
                   char params[KP_HTTP_MAX_PARAMS][65], char *rest, bool *bad_uid)
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
        if (pl == 12 && !memcmp(p, "{tagpath...}", 12)) {
            /* the rest of the path: 8-hex-digit tags, with item numbers between them */
            size_t rl = (size_t)(end - s);
            if (!rest || rl == 0 || rl >= 256) return -1;
            bool ok = true;
            const char *q = s;
            for (int k = 0; q < end && ok; k++) {
                const char *qe = memchr(q, '/', (size_t)(end - q));
                size_t ql = qe ? (size_t)(qe - q) : (size_t)(end - q);
                ok = (k % 2 == 0) ? (ql == 8 && strspn(q, "0123456789abcdefABCDEF") >= 8)
                                  : (ql >= 1 && ql <= 6 && strspn(q, "0123456789") >= ql);
                if (ok && !qe && k % 2 == 1) ok = false; /* must end with a tag */
                q = qe ? qe + 1 : end;
                if (qe && qe + 1 == end) ok = false;
            }
            if (!ok) return -1;
            memcpy(rest, s, rl);
            rest[rl] = 0;
            return n;
        }
        if (pl == 9 && !memcmp(p, "{file...}", 9)) {
            /* the rest of the path under /app: a file of the web application or a route of its
             * router; [A-Za-z0-9_.-] segments, no dot first (no "..", no hidden files) */
            size_t rl = (size_t)(end - s);
            if (!rest || rl >= 256) return -1;
            for (size_t k = 0; k < rl; k++) {
                char c = s[k];
                bool seg_start = k == 0 || s[k - 1] == '/';
                if (seg_start && (c == '.' || c == '/')) return -1;
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '_' || c == '-' || c == '.' || c == '/'))
                    return -1;
            }
            memcpy(rest, s, rl);
            rest[rl] = 0;
            return n;
        }
        if (pl == 6 && !memcmp(p, "{name}", 6)) {
            /* a user, role or site name: a letter or digit, then [A-Za-z0-9_.@-], at most 64
             * (the schema's CHECKs are stricter per kind; the handler finds no such name). A
             * segment that cannot be a name ("..", "a b") matches nothing: 404. */
            static const char an[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                     "0123456789";
            if (sl == 0 || sl > 64 || n >= KP_HTTP_MAX_PARAMS || !memchr(an, s[0], sizeof an - 1))
                return -1;
            for (size_t k = 1; k < sl; k++)
                if (!memchr(an, s[k], sizeof an - 1) && !memchr("_.@-", s[k], 4)) return -1;
            memcpy(params[n], s, sl);
            params[n][sl] = 0;
            n++;
            p += pl;
            s += sl;
            continue;
        }
        if (pl == 4 && !memcmp(p, "{ae}", 4)) {
            /* an AE title (the modality registry): percent-decoded, 1 to 16 characters of the
             * DICOM default repertoire without backslash ("CT%20SCAN%202" is "CT SCAN 2"); the
             * handler checks leading and trailing spaces like any other input */
            char ae[49];
            if (sl == 0 || sl >= sizeof ae || n >= KP_HTTP_MAX_PARAMS) return -1;
            memcpy(ae, s, sl);
            ae[sl] = 0;
            if (!kp_path_url_decode(ae)) return -1;
            size_t al = strlen(ae);
            if (al < 1 || al > 16) return -1;
            for (size_t k = 0; k < al; k++)
                if ((unsigned char)ae[k] < 0x20 || (unsigned char)ae[k] > 0x7e || ae[k] == '\\')
                    return -1;
            memcpy(params[n], ae, al + 1);
            n++;
            p += pl;
            s += sl;
            continue;
        }
        if ((pl == 4 && !memcmp(p, "{id}", 4)) || (pl == 3 && !memcmp(p, "{n}", 3)) ||
            (pl == 8 && !memcmp(p, "{pdf_id}", 8))) {
            /* a row id or version number (reports API): 1 to 18 digits, no leading zero; any
             * other segment matches nothing (404) */
            if (sl == 0 || sl > 18 || n >= KP_HTTP_MAX_PARAMS || s[0] == '0' ||
                strspn(s, "0123456789") < sl)
                return -1;
            memcpy(params[n], s, sl);
            params[n][sl] = 0;
            n++;
            p += pl;
            s += sl;
            continue;
        }
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
        char params[KP_HTTP_MAX_PARAMS][65], rest[256] = "";
        bool bad_uid = false;
        int n = s_match(s_routes[r].pattern, path, pathlen, params, rest, &bad_uid);
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
            memcpy(req->rest, rest, sizeof rest);
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
