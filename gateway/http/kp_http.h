/* kp_http: what a route handler sees (a copied request) and fills in (a response).
 *
 * Handlers run on a database worker thread, never on an event loop, so they get a private copy
 * of everything they need from the H2O request (which belongs to the loop thread and may vanish
 * when the client goes away) and write a response that the loop thread then sends. Errors are
 * JSON bodies {"error": {"code", "message", "detail"}} built from the error catalogue. */
#ifndef KP_HTTP_H
#define KP_HTTP_H

#include "kp_auth.h"
#include "kp_config.h"
#include "kp_db.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KP_HTTP_MAX_PARAMS 4

struct kp_route;

typedef struct kp_http_req {
    char method[12];
    char *path;              /* normalised path without the query (owned) */
    char *query;             /* raw text after '?', or NULL (owned) */
    char *if_none_match;     /* If-None-Match header value, or NULL (owned) */
    char *accept;            /* Accept header value, or NULL (owned) */
    char *range;             /* Range header value, or NULL (owned) */
    char *if_modified_since; /* If-Modified-Since header value, or NULL (owned) */
    char *content_type;      /* Content-Type of the request body, or NULL (owned) */
    char *body;              /* request body (a private copy, owned), or NULL */
    size_t body_len;
    char *origin;        /* "https://" + the request's authority, for absolute URLs (owned) */
    bool head;           /* a HEAD request (routed as GET; the body is not sent) */
    char peer[64];       /* client address (for sessions, lockout and audit) */
    char *user_agent;    /* User-Agent header, or NULL (owned) */
    char *cookie;        /* Cookie header, or NULL (owned) */
    bool same_origin;    /* a cookie-carrying mutation passed the CSRF check (X-CSRF-Token
                          * equal to the CSRF cookie, or Origin equal to our own origin) */
    kp_identity_t id;    /* who asks (id.authenticated false for public routes) */
    char request_id[40]; /* X-Request-Id: the client's (if 1-36 of A-Z a-z 0-9 . _ -) or ours;
                          * in the access log, the response, and the jobs it causes */
    const struct kp_route *route;
    char params[KP_HTTP_MAX_PARAMS][65]; /* the {uid} / {frames} segments of the path */
    int nparams;
    char rest[256]; /* a trailing {tagpath...}: the rest of the path (e.g. 00420011 or
                     * 00540016/0/00181072), validated as hex tags and item numbers */
} kp_http_req_t;

/* A piece of a streamed body: owned bytes, or a byte range of a stored file that the event loop
 * reads and sends chunk by chunk (so a whole study is never held in memory). */
typedef struct kp_http_seg {
    char *mem;         /* owned bytes, or NULL for a file range */
    char *path;        /* absolute path of the file (owned) when mem is NULL */
    int64_t off, len;  /* the range (mem: off 0, len bytes) */
    int64_t file_size; /* the file's size when the range was planned: a file that changed
                        * size since (replaced by a compressed copy) aborts the response */
    bool temp;         /* a temporary file of this response: unlinked when it is freed */
} kp_http_seg_t;

typedef struct kp_http_resp {
    int status;
    const char *content_type; /* static string, or ctype below */
    char ctype[256];          /* room for a Content-Type built per response (multipart) */
    char *body;               /* owned, may be NULL */
    size_t len;
    char etag[72];          /* quoted entity tag or "" */
    char allow[64];         /* Allow header for 405, or "" */
    char *warning;          /* Warning header text (owned) or NULL */
    bool compressible;      /* may be gzipped when the client accepts it */
    char content_range[96]; /* Content-Range for 206 / 416, or "" */
    char last_modified[40]; /* Last-Modified (IMF-fixdate), or "" */
    char *set_cookie[4];    /* Set-Cookie header values (owned) */
    int nset_cookie;
    int retry_after;               /* > 0: a Retry-After header (seconds), e.g. with 503 */
    char content_disposition[128]; /* Content-Disposition (a download), or "" */
    /* A streamed body: when nsegs > 0 the body is these segments in order and body is NULL. */
    kp_http_seg_t *segs;
    size_t nsegs, segcap;
} kp_http_resp_t;

struct kp_storage;
struct kp_ingest;
struct kp_mdcache;
struct kp_auth;

/* What a handler may use: its own database connection, the configuration (read-only), the
 * storage, the shared ingest path (STOW-RS) and the metadata cache (both thread-safe). */
typedef struct kp_http_env {
    kp_db_t *db;
    const kp_config_t *cfg;
    struct kp_storage *st;
    struct kp_ingest *ing;
    struct kp_mdcache *mdcache; /* may be NULL */
    struct kp_auth *auth;
} kp_http_env_t;

/* A route handler: fills resp; returns 0 (resp complete) or a negative KP_E* code, in which case
 * the caller turns it into a JSON error unless resp->status was already set. */
typedef int (*kp_route_fn)(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* Makes resp a JSON error for code (status from the catalogue unless status > 0 overrides it:
 * 405 and 431 have no catalogue row of their own). detail may be NULL. */
void kp_http_error(kp_http_resp_t *resp, int code, int status, const char *message,
                   const char *detail);
/* Appends a segment of owned bytes (taken over; freed with resp). */
void kp_http_seg_mem(kp_http_resp_t *resp, char *mem, size_t len);
/* Appends a copy of the string s. */
void kp_http_seg_str(kp_http_resp_t *resp, const char *s);
/* Appends len bytes of the file at path (copied) from off; file_size is its size now. */
void kp_http_seg_file(kp_http_resp_t *resp, const char *path, int64_t off, int64_t len,
                      int64_t file_size);
/* Appends a whole temporary file (taken over: unlinked when the response is freed). */
void kp_http_seg_tempfile(kp_http_resp_t *resp, const char *path, int64_t size);
/* Total length of the body (segments or body). */
int64_t kp_http_resp_length(const kp_http_resp_t *resp);
/* The request body as a JSON object (the caller json_decref()s it), or NULL with resp set: 415
 * unless Content-Type is application/json (a form on another site cannot send that without a
 * CORS preflight), 400 when it is not a JSON object. */
struct json_t;
struct json_t *kp_http_json_body(const kp_http_req_t *req, kp_http_resp_t *resp);
/* Makes resp a JSON answer with status from j (taken over: freed here). */
void kp_http_json_resp(kp_http_resp_t *resp, int status, struct json_t *j);
/* Frees what resp owns (body, warning, segments) and clears it. */
void kp_http_resp_clear(kp_http_resp_t *resp);
/* Frees what req owns and clears it. */
void kp_http_req_clear(kp_http_req_t *req);

#endif
