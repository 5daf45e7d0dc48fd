/* kp_http: what a route handler sees (a copied request) and fills in (a response).
 *
 * Handlers run on a database worker thread, never on an event loop, so they get a private copy
 * of everything they need from the H2O request (which belongs to the loop thread and may vanish
 * when the client goes away) and write a response that the loop thread then sends. Errors are
 * JSON bodies {"error": {"code", "message", "detail"}} built from the error catalogue. */
#ifndef KP_HTTP_H
#define KP_HTTP_H

#include "kp_config.h"
#include "kp_db.h"

#include <stdbool.h>
#include <stddef.h>

#define KP_HTTP_MAX_PARAMS 4

struct kp_route;

typedef struct kp_http_req {
    char method[12];
    char *path;          /* normalised path without the query (owned) */
    char *query;         /* raw text after '?', or NULL (owned) */
    char *if_none_match; /* If-None-Match header value, or NULL (owned) */
    char *accept;        /* Accept header value, or NULL (owned) */
    const struct kp_route *route;
    char params[KP_HTTP_MAX_PARAMS][65]; /* the {uid} / {frames} segments of the path */
    int nparams;
} kp_http_req_t;

typedef struct kp_http_resp {
    int status;
    const char *content_type; /* static string, or ctype below */
    char ctype[256];          /* room for a Content-Type built per response (multipart) */
    char *body;               /* owned, may be NULL */
    size_t len;
    char etag[72];     /* quoted entity tag or "" */
    char allow[64];    /* Allow header for 405, or "" */
    char *warning;     /* Warning header text (owned) or NULL */
    bool compressible; /* may be gzipped when the client accepts it */
} kp_http_resp_t;

/* What a handler may use: its own database connection and the configuration (read-only). */
typedef struct kp_http_env {
    kp_db_t *db;
    const kp_config_t *cfg;
} kp_http_env_t;

/* A route handler: fills resp; returns 0 (resp complete) or a negative KP_E* code, in which case
 * the caller turns it into a JSON error unless resp->status was already set. */
typedef int (*kp_route_fn)(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* Makes resp a JSON error for code (status from the catalogue unless status > 0 overrides it:
 * 405 and 431 have no catalogue row of their own). detail may be NULL. */
void kp_http_error(kp_http_resp_t *resp, int code, int status, const char *message,
                   const char *detail);
/* Frees what resp owns (body, warning) and clears it. */
void kp_http_resp_clear(kp_http_resp_t *resp);
/* Frees what req owns and clears it. */
void kp_http_req_clear(kp_http_req_t *req);

#endif
