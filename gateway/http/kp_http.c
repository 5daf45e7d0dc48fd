/* kp_http: JSON error bodies and the request/response copies handlers work on (see kp_http.h). */
#include "kp_http.h"

#include "kp_errors.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

void kp_http_error(kp_http_resp_t *resp, int code, int status, const char *message,
                   const char *detail)
{
    free(resp->body);
    resp->status = status > 0 ? status : kp_error_http(code);
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

void kp_http_resp_clear(kp_http_resp_t *resp)
{
    free(resp->body);
    free(resp->warning);
    memset(resp, 0, sizeof *resp);
}

void kp_http_req_clear(kp_http_req_t *req)
{
    free(req->path);
    free(req->query);
    free(req->if_none_match);
    free(req->accept);
    memset(req, 0, sizeof *req);
}
