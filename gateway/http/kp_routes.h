/* kp_routes: the one route table of pacs-gateway (method, path pattern, permission, handler).
 *
 * Patterns are literal segments and {name} placeholders; every placeholder is a DICOM UID and is
 * validated here (digits and dots, at most 64 characters), so handlers never see a bad one —
 * except {frames}, a comma-separated list of frame numbers (digits and commas only), and {name}, a
 * user, role or site name (a letter or digit, then letters, digits and _ . @ -; at most 64): a
 * segment that is not a valid name does not match at all (404), so ".." never reaches a handler.
 * {id}, {n} and {pdf_id} (reports API) are positive numbers of 1 to 18 digits without a leading
 * zero; any other segment does not match either (404). */
#ifndef KP_ROUTES_H
#define KP_ROUTES_H

#include "kp_http.h"

typedef struct kp_route {
    const char *method;
    const char *pattern;
    const char *permission; /* e.g. "study.read"; checked before the handler runs */
    kp_route_fn handler;
} kp_route_t;

typedef enum {
    KP_ROUTE_OK = 0,     /* *route and the params are set */
    KP_ROUTE_NOT_FOUND,  /* no pattern matches the path: 404 */
    KP_ROUTE_BAD_METHOD, /* a pattern matches but not with this method: 405, allow is set */
    KP_ROUTE_BAD_UID     /* a {uid} segment is not a valid UID: 400 */
} kp_route_result_t;

/* Finds the route for method + path (path without the query). On KP_ROUTE_OK fills
 * req->route, req->params and req->nparams; on KP_ROUTE_BAD_METHOD writes the allowed methods
 * ("GET, POST") into allow. Pure: no allocation, no I/O. */
kp_route_result_t kp_routes_match(const char *method, const char *path, size_t pathlen,
                                  kp_http_req_t *req, char *allow, size_t allowlen);

/* The whole table (for `pacs-gateway --routes`, docs/security.md and the permission tests). */
const kp_route_t *kp_routes_table(size_t *n);

/* Records the audit event of a request that succeeded (DICOMweb query/view/download/upload,
 * admin changes); called by the database worker after the handler. */
void kp_routes_audit(kp_http_env_t *env, const kp_http_req_t *req, const kp_http_resp_t *resp);

/* The sites req may see, as a PostgreSQL text[] literal written into buf (returned), or NULL for
 * every site (site.all). An identity without sites gets an array that matches nothing. */
const char *kp_routes_sites(const kp_http_req_t *req, char *buf, size_t len);

#endif
