/* kp_http: JSON error bodies and the request/response copies handlers work on (see kp_http.h). */
#include "kp_http.h"

#include "kp_errors.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static void s_segs_free(kp_http_resp_t *resp)
{
    for (size_t i = 0; i < resp->nsegs; i++) {
        if (resp->segs[i].temp && resp->segs[i].path) unlink(resp->segs[i].path);
        free(resp->segs[i].mem);
        free(resp->segs[i].path);
    }
}

void kp_http_error(kp_http_resp_t *resp, int code, int status, const char *message,
                   const char *detail)
{
    free(resp->body);
    s_segs_free(resp);
    free(resp->segs);
    resp->segs = NULL;
    resp->nsegs = resp->segcap = 0;
    resp->content_range[0] = 0;
    resp->status = status > 0 ? status : kp_error_http(code);
    /* 503: the database, the storage or the bus is unavailable for now; clients may retry */
    if (resp->status == 503 && resp->retry_after <= 0) resp->retry_after = 5;
    const char *slug = kp_error_slug(code);
    json_t *e =
        json_pack("{s:s, s:s}", "code", slug, "message", message ? message : kp_strerror(code));
    if (!e) abort();
    if (detail) {
        json_t *d = json_string(detail);
        json_object_set_new(e, "detail", d ? d : json_string("(detail is not valid UTF-8)"));
    }
    json_t *root = json_pack("{s:o}", "error", e);
    if (!root) abort();
    resp->body = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!resp->body) abort();
    resp->len = strlen(resp->body);
    resp->content_type = "application/json";
    resp->compressible = false;
    resp->etag[0] = 0;
}

static kp_http_seg_t *s_seg_new(kp_http_resp_t *resp)
{
    if (resp->nsegs == resp->segcap) {
        resp->segcap = resp->segcap ? resp->segcap * 2 : 16;
        resp->segs = realloc(resp->segs, resp->segcap * sizeof *resp->segs);
        if (!resp->segs) abort();
    }
    kp_http_seg_t *s = &resp->segs[resp->nsegs++];
    memset(s, 0, sizeof *s);
    return s;
}

void kp_http_seg_mem(kp_http_resp_t *resp, char *mem, size_t len)
{
    kp_http_seg_t *s = s_seg_new(resp);
    s->mem = mem ? mem : strdup("");
    if (!s->mem) abort();
    s->len = mem ? (int64_t)len : 0;
}

void kp_http_seg_str(kp_http_resp_t *resp, const char *str)
{
    char *d = strdup(str);
    if (!d) abort();
    kp_http_seg_mem(resp, d, strlen(d));
}

void kp_http_seg_file(kp_http_resp_t *resp, const char *path, int64_t off, int64_t len,
                      int64_t file_size)
{
    kp_http_seg_t *s = s_seg_new(resp);
    s->path = strdup(path);
    if (!s->path) abort();
    s->off = off;
    s->len = len;
    s->file_size = file_size;
}

void kp_http_seg_tempfile(kp_http_resp_t *resp, const char *path, int64_t size)
{
    kp_http_seg_file(resp, path, 0, size, size);
    resp->segs[resp->nsegs - 1].temp = true;
}

int64_t kp_http_resp_length(const kp_http_resp_t *resp)
{
    if (!resp->nsegs) return (int64_t)resp->len;
    int64_t n = 0;
    for (size_t i = 0; i < resp->nsegs; i++)
        n += resp->segs[i].len;
    return n;
}

void kp_http_resp_clear(kp_http_resp_t *resp)
{
    for (int i = 0; i < resp->nset_cookie; i++)
        free(resp->set_cookie[i]);
    free(resp->body);
    free(resp->warning);
    s_segs_free(resp);
    free(resp->segs);
    memset(resp, 0, sizeof *resp);
}

void kp_http_req_clear(kp_http_req_t *req)
{
    free(req->path);
    free(req->query);
    free(req->if_none_match);
    free(req->accept);
    free(req->range);
    free(req->if_modified_since);
    free(req->content_type);
    free(req->body);
    free(req->origin);
    free(req->user_agent);
    free(req->cookie);
    memset(req, 0, sizeof *req);
}

json_t *kp_http_json_body(const kp_http_req_t *req, kp_http_resp_t *resp)
{
    const char *ct = req->content_type;
    if (!ct || strncasecmp(ct, "application/json", 16) ||
        (ct[16] && ct[16] != ';' && ct[16] != ' ')) {
        kp_http_error(resp, KP_EUNSUPPORTED, 0, "send the request body as application/json", NULL);
        return NULL;
    }
    json_error_t je;
    json_t *j = req->body ? json_loadb(req->body, req->body_len, 0, &je) : NULL;
    if (!j || !json_is_object(j)) {
        json_decref(j);
        kp_http_error(resp, KP_EINVAL, 0, "the request body must be a JSON object", NULL);
        return NULL;
    }
    return j;
}

void kp_http_json_resp(kp_http_resp_t *resp, int status, json_t *j)
{
    resp->body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!resp->body) abort();
    resp->len = strlen(resp->body);
    resp->status = status;
    resp->content_type = "application/json";
}
