/* pacs-gateway: the HTTPS front door (DICOMweb now; REST, web UI and OHIF later).
 *
 * N event-loop threads (H2O evloop), each with its own listeners on the same ports
 * (SO_REUSEPORT), and a pool of database worker threads, each with its own connection. A loop
 * thread parses and routes a request, copies what the handler needs into a job and queues it;
 * a worker runs the handler (blocking libpq is fine there) and hands the finished response back
 * to the owning loop with h2o_multithread_send_message. A request that died meanwhile (client
 * gone) is noticed through a token in the request's memory pool and the response is dropped.
 * See gateway/http/README for the design. */
#include "kp_config.h"
#include "kp_db.h"
#include "kp_errors.h"
#include "kp_dicom.h"
#include "kp_http.h"
#include "kp_ingest.h"
#include "kp_api.h"
#include "kp_metrics.h"
#include "kp_audit.h"
#include "kp_auth.h"
#include "kp_bus.h"
#include "kp_log.h"
#include "kp_mdcache.h"
#include "kp_ratelimit.h"
#include "kp_routes.h"
#include "kp_static.h"
#include "kp_storage.h"
#include "kp_tls.h"

#include <errno.h>
#include <malloc.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <strings.h>
#include <unistd.h>

#include <h2o.h>
#include <jansson.h>
#include <h2o/http2.h>

/* ---- types --------------------------------------------------------------------------------- */
typedef struct s_loop {
    h2o_context_t ctx;
    h2o_evloop_t *loop;
    pthread_t tid;
    int index;
    int fd_tls, fd_plain;
    h2o_socket_t *listen_tls, *listen_plain;
    h2o_accept_ctx_t accept_tls, accept_plain;
    h2o_multithread_receiver_t receiver;
    int inflight; /* jobs handed to workers and not back yet (this thread only) */
} s_loop_t;

struct s_token;

typedef struct s_job {
    h2o_multithread_message_t super; /* first: the message is the job */
    s_loop_t *owner;
    h2o_req_t *req; /* NULL once H2O disposed of the request (client gone) */
    struct s_token *token;
    kp_http_req_t in;
    kp_http_resp_t out;
    struct s_job *next;
} s_job_t;

/* Lives in the request's pool: its dispose callback tells the job the request is gone. */
struct s_token {
    s_job_t *job;
};

static struct {
    kp_config_t *cfg;
    h2o_globalconf_t globalconf;
    SSL_CTX *ssl_ctx;
    s_loop_t *loops;
    int nloops;
    /* worker pool */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    s_job_t *head, *tail;
    int stopping;
    pthread_t *workers;
    kp_db_t **dbs;
    int nworkers;
    kp_storage_t *st;      /* stored files; STOW-RS temp files */
    kp_ingest_t *ing;      /* the durable store path shared with pacs-dicomd (STOW-RS) */
    kp_mdcache_t *mdcache; /* WADO-RS metadata responses (NULL when disabled) */
    kp_auth_t *auth;       /* tokens, permissions, sessions */
    kp_ratelimit_t *rl_login, *rl_api; /* token buckets: login attempts, the REST API */
    pthread_t reloader;                /* reloads the role -> permission snapshot */
    bool reloader_started;
    pthread_t events; /* study.changed subscriber: invalidates the metadata cache */
    bool events_started;
    int queued; /* jobs waiting for a worker */
} s_g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static volatile sig_atomic_t s_stop;
/* Jobs that may wait per database worker before new requests get 503 + Retry-After. */
#define S_MAX_QUEUED_PER_WORKER 256
static h2o_mime_attributes_t s_compressible = {.is_compressible = 1};
static h2o_mime_attributes_t s_as_is = {.is_compressible = 0};

static void s_on_signal(int sig)
{
    (void)sig;
    s_stop = 1;
}

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- responses (loop thread) --------------------------------------------------------------- */
static const char *s_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 416:
        return "Range Not Satisfiable";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 507:
        return "Insufficient Storage";
    default:
        return "Status";
    }
}

static void s_header(h2o_req_t *req, const char *name, const char *value)
{
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 1, NULL, value,
                          strlen(value));
}

/* Our own pages and the API get a strict policy: only this origin's scripts (no inline script,
 * no eval), styles of the page itself, no plugins, no framing of our pages, forms only to us;
 * our pages may frame blob: URLs (the report editor's PDF preview). The OHIF viewer
 * (and DICOMweb) get one that its bundle runs under - it needs WebAssembly, eval in some of its
 * codecs, workers from blob: URLs and its two inline start-up scripts - but that still confines
 * every request, image, font, worker and frame to this origin (an injected script can neither
 * load code from nor fetch from or post to another origin), forbids plugins and <base> hijacking,
 * and allows framing by our own pages only. */
#define S_CSP_APP                                                                                  \
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' "     \
    "data:; connect-src 'self'; frame-src 'self' blob:; object-src 'none'; base-uri 'none'; "      \
    "form-action 'self'; frame-ancestors 'none'"
#define S_CSP_VIEWER                                                                               \
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' "      \
    "blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; " \
    "connect-src 'self' data: blob:; worker-src 'self' blob:; media-src 'self' blob:; "            \
    "frame-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "             \
    "frame-ancestors 'self'"

static void s_security_headers(h2o_req_t *req, int tls)
{
    if (tls) s_header(req, "strict-transport-security", "max-age=31536000");
    s_header(req, "x-content-type-options", "nosniff");
    const char *p = req->path_normalized.base;
    size_t n = req->path_normalized.len;
    bool ours = (n >= 4 && !memcmp(p, "/app", 4) && (n == 4 || p[4] == '/')) ||
                (n >= 4 && !memcmp(p, "/api", 4) && (n == 4 || p[4] == '/'));
    s_header(req, "x-frame-options", ours ? "DENY" : "SAMEORIGIN");
    s_header(req, "content-security-policy", ours ? S_CSP_APP : S_CSP_VIEWER);
    s_header(req, "referrer-policy", "no-referrer");
}

/* Copies path into out with control characters and spaces replaced, for the access log. */
static void s_log_safe(char *out, size_t outlen, const char *s, size_t len)
{
    size_t k = 0;
    for (size_t i = 0; i < len && k + 1 < outlen; i++)
        out[k++] = ((unsigned char)s[i] < 0x21 || s[i] == 0x7f) ? '?' : s[i];
    out[k] = 0;
}

/* The user of the response being sent on this loop thread (set around s_respond), for the log. */
static __thread const char *s_log_user;

/* The route pattern of the request being answered on this thread, for the metrics: set when
 * the request is routed (or "static" / "redirect"), NULL = refused before routing. */
static __thread const char *s_log_route;
/* The request id of the request being answered on this thread ("" = none: static files). */
static __thread char s_log_rid[40];

static void s_access_log(h2o_req_t *req, int status, size_t bytes)
{
    struct timeval now;
    gettimeofday(&now, NULL);
    double ms = (double)(now.tv_sec - req->timestamps.request_begin_at.tv_sec) * 1e3 +
                (double)(now.tv_usec - req->timestamps.request_begin_at.tv_usec) / 1e3;
    char method[16], path[512];
    s_log_safe(method, sizeof method, req->method.base, req->method.len);
    kp_metrics_http(s_log_route, method, status, ms / 1e3);
    if (KP_LOG_INFO < kp_log_threshold) return;
    const char *rid = s_log_rid[0] ? s_log_rid : NULL;
    s_log_safe(path, sizeof path, req->path.base, req->path.len);
    kp_logc(KP_LOG_INFO, "http", rid, "%s %s %d %zu %.1fms %s", method, path, status, bytes, ms,
            s_log_user && *s_log_user ? s_log_user : "-");
}

/* For kp_static: the security headers of this request's scheme. */
static void s_static_headers(h2o_req_t *req)
{
    s_security_headers(req, req->scheme == &H2O_URL_SCHEME_HTTPS);
}

/* ---- streamed bodies (loop thread) ----------------------------------------------------------
 * A response whose body is a list of segments (kp_http_seg_t) is sent by a generator: each time
 * H2O asks for more (proceed), up to S_STREAM_CHUNK bytes are read from the stored files into one
 * buffer (memory segments are sent in place), so memory stays bounded whatever the size of the
 * study. The files are opened here, one at a time; a file whose size differs from the one the
 * worker saw (replaced meanwhile) aborts the response rather than send a wrong Content-Length. */
#define S_STREAM_CHUNK (1 << 20)
#define S_STREAM_VECS  16

typedef struct s_stream {
    h2o_generator_t super;
    kp_http_resp_t resp; /* taken over from the job */
    size_t seg;          /* current segment */
    int64_t pos;         /* bytes of it already sent */
    int fd;              /* open file of the current segment, or -1 */
    char *buf;
} s_stream_t;

static void s_stream_dispose(void *p)
{
    s_stream_t *st = p;
    if (st->fd >= 0) close(st->fd);
    free(st->buf);
    kp_http_resp_clear(&st->resp);
}

static void s_stream_send(s_stream_t *st, h2o_req_t *req)
{
    h2o_iovec_t vecs[S_STREAM_VECS];
    size_t n = 0, used = 0;
    while (st->seg < st->resp.nsegs && n < S_STREAM_VECS && used < S_STREAM_CHUNK) {
        kp_http_seg_t *sg = &st->resp.segs[st->seg];
        int64_t left = sg->len - st->pos;
        if (left > 0 && sg->mem) {
            vecs[n++] = h2o_iovec_init(sg->mem + st->pos, (size_t)left);
            st->pos += left;
        } else if (left > 0) {
            if (st->fd < 0) {
                struct stat sb;
                st->fd = open(sg->path, O_RDONLY | O_CLOEXEC);
                if (st->fd < 0 || fstat(st->fd, &sb) || (int64_t)sb.st_size != sg->file_size) {
                    kp_error("http", "%s changed or vanished while being sent; response aborted",
                             sg->path);
                    goto fail;
                }
            }
            if (!st->buf && !(st->buf = malloc(S_STREAM_CHUNK))) abort();
            int64_t room = (int64_t)(S_STREAM_CHUNK - used);
            size_t want = (size_t)(left < room ? left : room);
            ssize_t r = pread(st->fd, st->buf + used, want, (off_t)(sg->off + st->pos));
            if (r <= 0) {
                kp_error("http", "%s: read error while sending; response aborted", sg->path);
                goto fail;
            }
            vecs[n++] = h2o_iovec_init(st->buf + used, (size_t)r);
            used += (size_t)r;
            st->pos += r;
        }
        if (st->pos >= sg->len) {
            if (st->fd >= 0) close(st->fd);
            st->fd = -1;
            st->seg++;
            st->pos = 0;
        }
    }
    h2o_send(req, vecs, n,
             st->seg >= st->resp.nsegs ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
    return;
fail:
    if (st->fd >= 0) close(st->fd);
    st->fd = -1;
    h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
}

static void s_stream_proceed(h2o_generator_t *g, h2o_req_t *req)
{
    s_stream_send((s_stream_t *)g, req);
}

static void s_stream_stop(h2o_generator_t *g, h2o_req_t *req)
{
    (void)g;
    (void)req; /* the pool's dispose callback frees everything */
}

static void s_add_header_copy(h2o_req_t *req, const h2o_token_t *token, const char *v)
{
    h2o_iovec_t c = h2o_strdup(&req->pool, v, strlen(v));
    h2o_add_header(&req->pool, &req->res.headers, token, NULL, c.base, c.len);
}

static void s_add_header_copy_name(h2o_req_t *req, const char *name, const char *v)
{
    h2o_iovec_t c = h2o_strdup(&req->pool, v, strlen(v));
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 0, NULL, c.base,
                          c.len);
}

/* CORS: the Origin of this request when http.cors_origins allows it, else NULL. */
static const char *s_cors_origin(h2o_req_t *req, char *buf, size_t buflen)
{
    const char *list = s_g.cfg->http_cors_origins;
    if (!list || !*list) return NULL;
    ssize_t h = h2o_find_header_by_str(&req->headers, H2O_STRLIT("origin"), -1);
    if (h < 0) return NULL;
    h2o_iovec_t o = req->headers.entries[h].value;
    if (!o.len || o.len >= buflen) return NULL;
    memcpy(buf, o.base, o.len);
    buf[o.len] = 0;
    if (!strcmp(list, "*")) return buf;
    for (const char *p = list; *p;) {
        while (*p == ' ' || *p == ',')
            p++;
        size_t l = strcspn(p, ", ");
        if (l == o.len && !strncasecmp(p, buf, l)) return buf;
        p += l;
    }
    return NULL;
}

/* Adds a header whose value is copied into the request's pool (for values on the stack: a
 * streamed response writes its headers after the caller returned). */
static void s_header_copy(h2o_req_t *req, const char *name, const char *value)
{
    h2o_iovec_t v = h2o_strdup(&req->pool, value, strlen(value));
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 1, NULL, v.base,
                          v.len);
}

static void s_cors_headers(h2o_req_t *req)
{
    char origin[256];
    const char *o = s_cors_origin(req, origin, sizeof origin);
    if (!o) return;
    s_header_copy(req, "access-control-allow-origin", o);
    s_header(req, "vary", "Origin");
    s_header(req, "access-control-expose-headers",
             "ETag, Last-Modified, Warning, Content-Range, Content-Location, Retry-After, "
             "Content-Disposition, X-Request-Id");
}

static void s_respond(h2o_req_t *req, kp_http_resp_t *r)
{
    int tls = req->scheme == &H2O_URL_SCHEME_HTTPS;
    req->res.status = r->status;
    req->res.reason = s_reason(r->status);
    s_security_headers(req, tls);
    s_cors_headers(req);
    if (r->content_type && r->status != 304)
        s_add_header_copy(req, H2O_TOKEN_CONTENT_TYPE, r->content_type);
    if (r->etag[0]) s_add_header_copy(req, H2O_TOKEN_ETAG, r->etag);
    if (r->last_modified[0]) s_add_header_copy(req, H2O_TOKEN_LAST_MODIFIED, r->last_modified);
    if (r->content_range[0]) s_add_header_copy(req, H2O_TOKEN_CONTENT_RANGE, r->content_range);
    if (r->status == 206 || (r->status == 200 && r->content_range[0] == 0 && r->nsegs))
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ACCEPT_RANGES, NULL,
                       H2O_STRLIT("bytes"));
    if (r->allow[0]) s_add_header_copy(req, H2O_TOKEN_ALLOW, r->allow);
    for (int i = 0; i < r->nset_cookie; i++)
        s_add_header_copy(req, H2O_TOKEN_SET_COOKIE, r->set_cookie[i]);
    if (r->status == 401)
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_WWW_AUTHENTICATE, NULL,
                       H2O_STRLIT("Bearer realm=\"klinika-pacs\""));
    if (r->warning) {
        char buf[1024];
        int n = snprintf(buf, sizeof buf, "299 pacs-gateway \"%.900s\"", r->warning);
        h2o_iovec_t v =
            h2o_strdup(&req->pool, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
        h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("warning"), 0, NULL, v.base,
                              v.len);
    }
    if (r->content_disposition[0])
        s_header_copy(req, "content-disposition", r->content_disposition);
    if (r->retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", r->retry_after);
        s_add_header_copy(req, H2O_TOKEN_RETRY_AFTER, ra);
    }
    if (r->status == 200 || r->status == 206 || r->status == 304) {
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL,
                       H2O_STRLIT("private, no-cache"));
    } else {
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL,
                       H2O_STRLIT("no-store"));
    }
    req->res.mime_attr = r->compressible ? &s_compressible : &s_as_is;
    if (r->nsegs && r->status != 304) {
        int64_t total = kp_http_resp_length(r);
        req->res.content_length = (size_t)total;
        s_access_log(req, r->status, (size_t)total);
        s_stream_t *st = h2o_mem_alloc_shared(&req->pool, sizeof *st, s_stream_dispose);
        memset(st, 0, sizeof *st);
        st->super.proceed = s_stream_proceed;
        st->super.stop = s_stream_stop;
        st->fd = -1;
        st->resp = *r; /* the stream owns the segments now */
        memset(r, 0, sizeof *r);
        h2o_start_response(req, &st->super);
        if (h2o_memis(req->input.method.base, req->input.method.len, H2O_STRLIT("HEAD"))) {
            h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
            return;
        }
        s_stream_send(st, req);
        return;
    }
    size_t len = r->status == 304 ? 0 : r->len;
    req->res.content_length = len;
    s_access_log(req, r->status, len);
    h2o_send_inline(req, len ? r->body : "", len);
}

static void s_respond_error(h2o_req_t *req, int code, int status, const char *msg,
                            const char *detail, const char *allow)
{
    kp_http_resp_t r = {0};
    kp_http_error(&r, code, status, msg, detail);
    if (allow) snprintf(r.allow, sizeof r.allow, "%s", allow);
    s_respond(req, &r);
    kp_http_resp_clear(&r);
}

/* Plain HTTP: 301 to the same host and path on the HTTPS port. */
static void s_redirect(h2o_req_t *req)
{
    const char *a = req->authority.base;
    size_t alen = req->authority.len, hl = 0;
    if (alen && a[0] == '[') {
        const char *rb = memchr(a, ']', alen);
        hl = rb ? (size_t)(rb - a) + 1 : 0;
    } else {
        const char *colon = memchr(a, ':', alen);
        hl = colon ? (size_t)(colon - a) : alen;
    }
    bool ok = hl > 0 && hl < 256;
    for (size_t i = 0; ok && i < hl; i++) {
        char c = a[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '.' || c == '-' || c == ':' || c == '[' || c == ']';
    }
    if (!ok) {
        s_respond_error(req, KP_EINVAL, 0, "bad Host header", NULL, NULL);
        return;
    }
    const char *path = req->path.len && req->path.base[0] == '/' ? req->path.base : "/";
    size_t plen = req->path.len && req->path.base[0] == '/' ? req->path.len : 1;
    char port[16] = "";
    if (s_g.cfg->http_https_port != 443)
        snprintf(port, sizeof port, ":%ld", s_g.cfg->http_https_port);
    size_t cap = 8 + hl + sizeof port + plen + 1;
    char *loc = h2o_mem_alloc_pool(&req->pool, cap);
    int n = snprintf(loc, cap, "https://%.*s%s%.*s", (int)hl, a, port, (int)plen, path);
    req->res.status = 301;
    req->res.reason = s_reason(301);
    s_security_headers(req, 0);
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_LOCATION, NULL, loc, (size_t)n);
    req->res.content_length = 0;
    s_log_route = "redirect";
    s_access_log(req, 301, 0);
    s_log_route = NULL;
    h2o_send_inline(req, "", 0);
}

/* ---- worker pool --------------------------------------------------------------------------- */
static void s_job_free(s_job_t *job)
{
    kp_http_req_clear(&job->in);
    kp_http_resp_clear(&job->out);
    free(job);
}

static void s_token_dispose(void *p)
{
    struct s_token *t = p;
    if (t->job) t->job->req = NULL;
}

static void *s_worker_main(void *arg)
{
    kp_http_env_t env = {.db = (kp_db_t *)arg,
                         .cfg = s_g.cfg,
                         .st = s_g.st,
                         .ing = s_g.ing,
                         .mdcache = s_g.mdcache,
                         .auth = s_g.auth};
    for (;;) {
        pthread_mutex_lock(&s_g.mu);
        while (!s_g.head && !s_g.stopping)
            pthread_cond_wait(&s_g.cv, &s_g.mu);
        s_job_t *job = s_g.head;
        if (job) {
            s_g.head = job->next;
            if (!s_g.head) s_g.tail = NULL;
            s_g.queued--;
            kp_metrics_set(KP_MET_DB_QUEUED, s_g.queued);
        }
        pthread_mutex_unlock(&s_g.mu);
        if (!job) break; /* stopping and nothing left */
        kp_metrics_add(KP_MET_DB_BUSY, 1);
        int rc = 0;
        if (job->in.id.authenticated && strcmp(job->in.id.sid, "dev")) {
            int alive = kp_auth_session_alive(s_g.auth, env.db, job->in.id.sid);
            if (alive == 0) {
                kp_http_error(&job->out, KP_EUNAUTH, 0, "the session has ended; log in again",
                              NULL);
                kp_metrics_add(KP_MET_DB_BUSY, -1);
                h2o_multithread_send_message(&job->owner->receiver, &job->super);
                continue;
            }
            if (alive < 0) rc = alive;
        }
        if (!rc) rc = job->in.route->handler(&env, &job->in, &job->out);
        if (!rc && strcmp(job->in.id.sid, "dev")) kp_routes_audit(&env, &job->in, &job->out);
        if (rc) {
            kp_http_resp_clear(&job->out);
            kp_http_error(&job->out, rc, 0, NULL, NULL);
        } else if (!job->out.status) {
            kp_http_error(&job->out, KP_EINTERNAL, 0, "handler produced no response", NULL);
        }
        kp_metrics_add(KP_MET_DB_BUSY, -1);
        h2o_multithread_send_message(&job->owner->receiver, &job->super);
    }
    return NULL;
}

static void s_on_messages(h2o_multithread_receiver_t *rcv, h2o_linklist_t *messages)
{
    (void)rcv;
    while (!h2o_linklist_is_empty(messages)) {
        h2o_multithread_message_t *m =
            H2O_STRUCT_FROM_MEMBER(h2o_multithread_message_t, link, messages->next);
        h2o_linklist_unlink(&m->link);
        s_job_t *job = (s_job_t *)m;
        job->owner->inflight--;
        if (job->req) {
            job->token->job = NULL;
            s_log_user = job->in.id.authenticated ? job->in.id.user : NULL;
            s_log_route = job->in.route ? job->in.route->pattern : NULL;
            memcpy(s_log_rid, job->in.request_id, sizeof s_log_rid);
            s_respond(job->req, &job->out);
            s_log_user = NULL;
            s_log_route = NULL;
            s_log_rid[0] = 0;
        } else {
            char path[256];
            s_log_safe(path, sizeof path, job->in.path, strlen(job->in.path));
            kp_info("http", "%s %s: client went away before the response", job->in.method, path);
        }
        s_job_free(job);
    }
}

static char *s_strndup(const char *s, size_t n)
{
    char *d = strndup(s, n);
    if (!d) abort();
    return d;
}

/* OPTIONS on an API resource: 204 with Allow, plus the CORS preflight answer for an allowed
 * Origin (a disallowed one gets no CORS headers, so the browser refuses the real request). */
static void s_options(h2o_req_t *req, const char *allow)
{
    char methods[80];
    snprintf(methods, sizeof methods, "%s, OPTIONS%s", allow, strstr(allow, "GET") ? ", HEAD" : "");
    req->res.status = 204;
    req->res.reason = s_reason(204);
    s_security_headers(req, 1);
    s_add_header_copy(req, H2O_TOKEN_ALLOW, methods);
    char origin[256];
    const char *o = s_cors_origin(req, origin, sizeof origin);
    if (o) {
        s_header_copy(req, "access-control-allow-origin", o);
        s_header(req, "vary", "Origin");
        s_header_copy(req, "access-control-allow-methods", methods);
        s_header(req, "access-control-allow-headers",
                 "Accept, Content-Type, Authorization, If-None-Match, If-Modified-Since, Range, "
                 "X-Requested-With");
        s_header(req, "access-control-max-age", "600");
    }
    req->res.content_length = 0;
    s_access_log(req, 204, 0);
    h2o_send_inline(req, "", 0);
}

/* ---- events: study.changed -> metadata cache ------------------------------------------------ */
static void *s_events_main(void *arg)
{
    (void)arg;
    kp_bus_sub_t *sub = kp_bus_subscribe(s_g.cfg, ""); /* study.changed, metrics.dicomd */
    if (!sub) {
        kp_warn("cache", "cannot subscribe to study events; metadata is cached for %ld s at most",
                s_g.cfg->http_metadata_cache_ttl);
        return NULL;
    }
    while (!s_stop) {
        kp_msg_t m = {0};
        if (kp_bus_sub_recv(sub, &m, 200)) continue;
        const char *study = json_string_value(json_object_get(m.payload, "study"));
        if (!strcmp(m.type, "study.changed") && study) {
            kp_mdcache_invalidate(s_g.mdcache, study);
            kp_debug("cache", "study %s changed: its metadata leaves the cache", study);
        } else if (!strcmp(m.type, "metrics.dicomd") && m.payload) {
            kp_metrics_dicomd(m.payload);
        }
        kp_msg_clear(&m);
    }
    kp_bus_sub_destroy(&sub);
    return NULL;
}

/* ---- authentication (loop thread) ---------------------------------------------------------- */
static __thread const char *s_deny_detail;

static bool s_header_value(h2o_req_t *req, const h2o_token_t *token, const char *name,
                           h2o_iovec_t *out)
{
    ssize_t h = token ? h2o_find_header(&req->headers, token, -1)
                      : h2o_find_header_by_str(&req->headers, name, strlen(name), -1);
    if (h < 0) return false;
    *out = req->headers.entries[h].value;
    return true;
}

/* The access token of the request: Authorization: Bearer, else the access cookie. */
static bool s_token(h2o_req_t *req, char *out, size_t outlen, bool *via_cookie)
{
    h2o_iovec_t v;
    *via_cookie = false;
    if (s_header_value(req, H2O_TOKEN_AUTHORIZATION, NULL, &v)) {
        if (v.len > 7 && !strncasecmp(v.base, "Bearer ", 7) && v.len - 7 < outlen) {
            memcpy(out, v.base + 7, v.len - 7);
            out[v.len - 7] = 0;
            return true;
        }
        return false;
    }
    if (s_header_value(req, H2O_TOKEN_COOKIE, NULL, &v) &&
        kp_auth_cookie(v.base, v.len, KP_AUTH_ACCESS_COOKIE, out, outlen)) {
        *via_cookie = true;
        return true;
    }
    return false;
}

/* CSRF defence for requests that carry cookies: the X-CSRF-Token header equals the CSRF cookie
 * (double submit), or the Origin header is exactly our own origin (browsers always send it on
 * POST; another site cannot forge it). */
static bool s_same_origin(h2o_req_t *req)
{
    h2o_iovec_t c, h, o;
    char csrf[128];
    if (s_header_value(req, NULL, KP_AUTH_CSRF_HEADER, &h) &&
        s_header_value(req, H2O_TOKEN_COOKIE, NULL, &c) &&
        kp_auth_cookie(c.base, c.len, KP_AUTH_CSRF_COOKIE, csrf, sizeof csrf) &&
        h.len == strlen(csrf) && h.len >= 16 && !memcmp(h.base, csrf, h.len))
        return true;
    if (s_header_value(req, NULL, "origin", &o) && o.len == 8 + req->authority.len &&
        !memcmp(o.base, "https://", 8) &&
        !memcmp(o.base + 8, req->authority.base, req->authority.len))
        return true;
    return false;
}

/* Fills job->in.id and decides: 0 allowed, KP_EUNAUTH (401), KP_EPERM (403; s_deny_detail). */
static int s_authorize(h2o_req_t *req, const char *method, s_job_t *job)
{
    const char *perm = job->in.route->permission;
    kp_identity_t *id = &job->in.id;
    h2o_iovec_t ck;
    bool has_cookie = s_header_value(req, H2O_TOKEN_COOKIE, NULL, &ck);
    bool mutating = strcmp(method, "GET") && strcmp(method, "HEAD") && strcmp(method, "OPTIONS");
    job->in.same_origin = !has_cookie || !mutating || s_same_origin(req);
    if (s_g.cfg->http_dev_allow_all) {
        /* development only (logged at start): everyone is an administrator of every site */
        id->authenticated = true;
        snprintf(id->user, sizeof id->user, "dev");
        snprintf(id->sid, sizeof id->sid, "dev");
        snprintf(id->roles[0], sizeof id->roles[0], "admin");
        id->nroles = 1;
        id->site_all = true;
        return 0;
    }
    /* A mutation from a browser page of another origin is refused whatever it carries (the
     * login form included): browsers always send Origin on cross-origin POSTs. Origins listed
     * in http.cors_origins are allowed. */
    if (mutating) {
        h2o_iovec_t o;
        char corsbuf[256];
        if (s_header_value(req, NULL, "origin", &o) && !s_same_origin(req) &&
            !s_cors_origin(req, corsbuf, sizeof corsbuf)) {
            s_deny_detail = "cross-site request refused (Origin is not this server)";
            return KP_EPERM;
        }
    }
    /* Public routes (login, refresh, the sign-in page) ignore any token: a stale or revoked one
     * must never stop someone from signing in again. */
    if (!strcmp(perm, KP_PERM_PUBLIC)) return 0;
    char token[KP_JWT_MAX_LEN + 1];
    bool via_cookie = false;
    if (s_token(req, token, sizeof token, &via_cookie)) {
        const char *why = NULL;
        if (kp_auth_verify(s_g.auth, token, id, &why)) {
            kp_info("auth", "token refused (%s)", why ? why : "?");
            return KP_EUNAUTH;
        }
        id->via_cookie = via_cookie;
    }
    if (!id->authenticated) return KP_EUNAUTH;
    if (id->via_cookie && mutating && !job->in.same_origin) {
        s_deny_detail = "cross-site request refused: send X-CSRF-Token with the value of the "
                        "__Host-kp_csrf cookie";
        return KP_EPERM;
    }
    if (!kp_auth_allows(s_g.auth, id, perm)) {
        static __thread char detail[128];
        snprintf(detail, sizeof detail, "this needs the permission %s", perm);
        s_deny_detail = detail;
        return KP_EPERM;
    }
    return 0;
}

/* Rate limits (kp_ratelimit): login attempts per client address and per account name (taken
 * from the JSON body, cheap to parse here), and /api requests per address and per account.
 * DICOMweb is not limited: a viewer fetches hundreds of frames at once. True when refused. */
static bool s_rate_limited(h2o_req_t *req, s_job_t *job, int *retry)
{
    const char *path = job->in.route->pattern;
    if (strncmp(path, "/api/", 5)) return false;
    double now = s_now();
    char key[160];
    const char *peer = job->in.peer; /* filled by s_on_req before the limits are checked */
    if (!strcmp(path, "/api/auth/login")) {
        snprintf(key, sizeof key, "ip:%s", peer);
        if (!kp_ratelimit_take(s_g.rl_login, key, now, retry)) return true;
        json_t *j = req->entity.len && req->entity.len < 65536
                        ? json_loadb(req->entity.base, req->entity.len, 0, NULL)
                        : NULL;
        const char *u = json_string_value(json_object_get(j, "username"));
        bool refused = false;
        if (u && *u) {
            snprintf(key, sizeof key, "user:");
            for (size_t i = 0; u[i] && i < 64; i++) {
                size_t k = strlen(key);
                key[k] = (char)((u[i] >= 'A' && u[i] <= 'Z') ? u[i] + 32 : u[i]);
                key[k + 1] = 0;
            }
            refused = !kp_ratelimit_take(s_g.rl_login, key, now, retry);
        }
        json_decref(j);
        return refused;
    }
    snprintf(key, sizeof key, "ip:%s", peer);
    if (!kp_ratelimit_take(s_g.rl_api, key, now, retry)) return true;
    if (job->in.id.authenticated) {
        snprintf(key, sizeof key, "user:%s", job->in.id.user);
        if (!kp_ratelimit_take(s_g.rl_api, key, now, retry)) return true;
    }
    return false;
}

/* The viewer's pages (not its bundles, which are public code) need a session: a browser without
 * a valid access cookie is sent to the sign-in page, which brings it back. True when answered. */
static bool s_viewer_gate(h2o_req_t *req)
{
    if (s_g.cfg->http_dev_allow_all) return false;
    const char *p = req->path_normalized.base;
    size_t n = req->path_normalized.len;
    const char *last = p;
    for (size_t i = 0; i < n; i++)
        if (p[i] == '/') last = p + i + 1;
    size_t ll = (size_t)(p + n - last);
    bool page = !memchr(last, '.', ll) || (ll == 10 && !memcmp(last, "index.html", 10));
    if (!page) return false;
    char token[KP_JWT_MAX_LEN + 1];
    bool via_cookie;
    kp_identity_t id;
    if (s_token(req, token, sizeof token, &via_cookie) &&
        kp_auth_verify(s_g.auth, token, &id, NULL) == 0)
        return false;
    /* next = the path and query asked for, percent-encoded */
    size_t cap = 32 + req->path.len * 3;
    char *loc = h2o_mem_alloc_pool(&req->pool, cap);
    size_t k = (size_t)snprintf(loc, cap, "/app/login?next=");
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < req->path.len && k + 4 < cap; i++) {
        unsigned char c = (unsigned char)req->path.base[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '/' || c == '-' || c == '_' || c == '.' || c == '~') {
            loc[k++] = (char)c;
        } else {
            loc[k++] = '%';
            loc[k++] = hex[c >> 4];
            loc[k++] = hex[c & 15];
        }
    }
    loc[k] = 0;
    req->res.status = 302;
    req->res.reason = "Found";
    s_security_headers(req, 1);
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_LOCATION, NULL, loc, k);
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL,
                   H2O_STRLIT("no-store"));
    req->res.content_length = 0;
    s_access_log(req, 302, 0);
    h2o_send_inline(req, "", 0);
    return true;
}

/* Reloads the role -> permission snapshot now and then (a role change applies within
 * http.auth_reload seconds; new logins and refreshes read roles from the database directly). */
static void *s_reloader_main(void *arg)
{
    kp_db_t *db = arg;
    long every = s_g.cfg->http_auth_reload;
    double next = s_now() + (double)every;
    while (!s_stop) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
        if (s_now() < next) continue;
        if (kp_auth_reload(s_g.auth, db))
            kp_warn("auth", "cannot reload roles; keeping the old ones");
        next = s_now() + (double)every;
    }
    kp_db_destroy(&db);
    return NULL;
}

/* ---- request entry (loop thread) ----------------------------------------------------------- */
/* The request's id: the client's X-Request-Id when it is 1-36 of A-Z a-z 0-9 . _ - (a proxy or
 * a client correlating its own logs), else 16 random hex digits. Sent back as X-Request-Id. */
static void s_request_id(h2o_req_t *req, char out[40])
{
    static __thread uint64_t state;
    h2o_iovec_t v;
    bool ok = s_header_value(req, NULL, "x-request-id", &v) && v.len >= 1 && v.len <= 36;
    for (size_t i = 0; ok && i < v.len; i++) {
        char c = v.base[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '.' || c == '_' || c == '-';
    }
    if (ok) {
        memcpy(out, v.base, v.len);
        out[v.len] = 0;
    } else {
        if (!state) {
            if (getrandom(&state, sizeof state, 0) != sizeof state)
                state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
            state |= 1;
        }
        state ^= state >> 12; /* xorshift64*: ids need to be distinct, not secret */
        state ^= state << 25;
        state ^= state >> 27;
        snprintf(out, 40, "%016llx", (unsigned long long)(state * 0x2545F4914F6CDD1DULL));
    }
    s_add_header_copy_name(req, "x-request-id", out);
}

static int s_on_req(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    s_loop_t *L = H2O_STRUCT_FROM_MEMBER(s_loop_t, ctx, req->conn->ctx);
    if (req->scheme != &H2O_URL_SCHEME_HTTPS) {
        s_redirect(req);
        return 0;
    }
    size_t hsize = 0;
    for (size_t i = 0; i < req->headers.size; i++)
        hsize += req->headers.entries[i].name->len + req->headers.entries[i].value.len + 4;
    if (hsize > (size_t)s_g.cfg->http_max_header_kb * 1024) {
        s_respond_error(req, KP_EHEADERS, 0, NULL, NULL, NULL);
        return 0;
    }
    char method[12];
    if (req->method.len >= sizeof method) {
        s_respond_error(req, KP_EMETHOD, 0, NULL, NULL, NULL);
        return 0;
    }
    memcpy(method, req->method.base, req->method.len);
    method[req->method.len] = 0;
    /* Everything outside /dicom-web, /api and /app is the OHIF viewer: files, no database. */
    s_log_route = NULL;
    s_log_rid[0] = 0;
    if (!kp_static_is_api_path(req->path_normalized.base, req->path_normalized.len)) {
        s_log_route = "static";
        if (!s_viewer_gate(req)) kp_static_serve(req, s_static_headers, s_access_log);
        s_log_route = NULL;
        return 0;
    }

    s_job_t *job = calloc(1, sizeof *job);
    if (!job) abort();
    s_request_id(req, job->in.request_id);
    memcpy(s_log_rid, job->in.request_id, sizeof s_log_rid);
    char allow[64];
    bool head = !strcmp(method, "HEAD"), options = !strcmp(method, "OPTIONS");
    kp_route_result_t m = kp_routes_match(head ? "GET" : method, req->path_normalized.base,
                                          req->path_normalized.len, &job->in, allow, sizeof allow);
    if (m == KP_ROUTE_OK) s_log_route = job->in.route->pattern;
    if (options && m == KP_ROUTE_BAD_METHOD) {
        /* OPTIONS, and CORS preflight when http.cors_origins allows the Origin. */
        s_job_free(job);
        s_options(req, allow);
        return 0;
    }
    if (m != KP_ROUTE_OK) {
        s_job_free(job);
        if (m == KP_ROUTE_NOT_FOUND)
            s_respond_error(req, KP_ENOTFOUND, 0, "no such resource", NULL, NULL);
        else if (m == KP_ROUTE_BAD_UID)
            s_respond_error(req, KP_EINVAL, 0, "invalid UID in the path",
                            "UIDs are digits and dots, at most 64 characters", NULL);
        else
            s_respond_error(req, KP_EMETHOD, 0, NULL, NULL, allow);
        return 0;
    }
    /* Who asks, and may they: token (bearer or cookie) verified here (CPU only), the route's
     * permission checked against the roles; the session's liveness is checked by the worker. */
    {
        struct sockaddr_storage sa;
        socklen_t sl = req->conn->callbacks->get_peername(req->conn, (struct sockaddr *)&sa);
        if (!sl || h2o_socket_getnumerichost((struct sockaddr *)&sa, sl, job->in.peer) == SIZE_MAX)
            job->in.peer[0] = 0;
    }
    int deny = s_authorize(req, method, job);
    int retry = 0;
    if (!deny && s_rate_limited(req, job, &retry)) {
        s_job_free(job);
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry);
        s_add_header_copy(req, H2O_TOKEN_RETRY_AFTER, ra);
        kp_metrics_add(KP_MET_RATE_LIMITED, 1);
        s_respond_error(req, KP_ERATELIMIT, 0, "too many requests", "try again later", NULL);
        return 0;
    }
    if (deny) {
        s_job_free(job);
        if (deny == KP_EUNAUTH)
            s_respond_error(req, KP_EUNAUTH, 0, "authentication required",
                            "log in (POST /api/auth/login) and send the access token", NULL);
        else
            s_respond_error(req, KP_EPERM, 0, "permission denied", s_deny_detail, NULL);
        return 0;
    }
    snprintf(job->in.method, sizeof job->in.method, "%s", method);
    job->in.path = s_strndup(req->path_normalized.base, req->path_normalized.len);
    if (req->query_at != SIZE_MAX)
        job->in.query =
            s_strndup(req->path.base + req->query_at + 1, req->path.len - req->query_at - 1);
    ssize_t h = h2o_find_header(&req->headers, H2O_TOKEN_IF_NONE_MATCH, -1);
    if (h >= 0)
        job->in.if_none_match =
            s_strndup(req->headers.entries[h].value.base, req->headers.entries[h].value.len);
    h = h2o_find_header(&req->headers, H2O_TOKEN_ACCEPT, -1);
    if (h >= 0)
        job->in.accept =
            s_strndup(req->headers.entries[h].value.base, req->headers.entries[h].value.len);
    h = h2o_find_header(&req->headers, H2O_TOKEN_IF_MODIFIED_SINCE, -1);
    if (h >= 0)
        job->in.if_modified_since =
            s_strndup(req->headers.entries[h].value.base, req->headers.entries[h].value.len);
    h = h2o_find_header(&req->headers, H2O_TOKEN_RANGE, -1);
    if (h >= 0)
        job->in.range =
            s_strndup(req->headers.entries[h].value.base, req->headers.entries[h].value.len);
    h = h2o_find_header(&req->headers, H2O_TOKEN_CONTENT_TYPE, -1);
    if (h >= 0)
        job->in.content_type =
            s_strndup(req->headers.entries[h].value.base, req->headers.entries[h].value.len);
    job->in.head = head;
    h2o_iovec_t hv;
    if (s_header_value(req, H2O_TOKEN_USER_AGENT, NULL, &hv))
        job->in.user_agent = s_strndup(hv.base, hv.len < 256 ? hv.len : 256);
    if (s_header_value(req, H2O_TOKEN_COOKIE, NULL, &hv))
        job->in.cookie = s_strndup(hv.base, hv.len < 8192 ? hv.len : 8192);

    {
        size_t al = req->authority.len < 256 ? req->authority.len : 0;
        bool ok = al > 0;
        for (size_t i = 0; ok && i < al; i++) {
            char c = req->authority.base[i];
            ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '-' || c == ':' || c == '[' || c == ']';
        }
        if (ok) {
            job->in.origin = malloc(al + 9);
            if (!job->in.origin) abort();
            memcpy(job->in.origin, "https://", 8);
            memcpy(job->in.origin + 8, req->authority.base, al);
            job->in.origin[al + 8] = 0;
        }
    }
    /* H2O 2.2.5 hands over the whole body (it enforces http.max_body_mb, 413). It belongs to the
     * request, which may vanish while a worker runs, so the worker gets its own copy. */
    if (req->entity.base && req->entity.len) {
        job->in.body = malloc(req->entity.len);
        if (!job->in.body) {
            s_job_free(job);
            s_respond_error(req, KP_ENOMEM, 0, "request body too large for memory", NULL, NULL);
            return 0;
        }
        memcpy(job->in.body, req->entity.base, req->entity.len);
        job->in.body_len = req->entity.len;
    }
    /* Back-pressure: a bounded queue; beyond it the client is told to retry. */
    pthread_mutex_lock(&s_g.mu);
    int queued = s_g.queued;
    pthread_mutex_unlock(&s_g.mu);
    if (queued >= S_MAX_QUEUED_PER_WORKER * s_g.nworkers) {
        s_job_free(job);
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_RETRY_AFTER, NULL, H2O_STRLIT("1"));
        s_respond_error(req, KP_EAGAIN, 0, "server busy", NULL, NULL);
        return 0;
    }
    job->owner = L;
    job->req = req;
    job->token = h2o_mem_alloc_shared(&req->pool, sizeof *job->token, s_token_dispose);
    job->token->job = job;
    L->inflight++;
    pthread_mutex_lock(&s_g.mu);
    if (s_g.tail)
        s_g.tail->next = job;
    else
        s_g.head = job;
    s_g.tail = job;
    s_g.queued++;
    kp_metrics_set(KP_MET_DB_QUEUED, s_g.queued);
    pthread_cond_signal(&s_g.cv);
    pthread_mutex_unlock(&s_g.mu);
    return 0;
}

/* ---- listeners and loops ------------------------------------------------------------------- */
static int s_listen_fd(const char *host, long port, int reuseport, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%ld", port);
    int g = getaddrinfo(host, ps, &hints, &ai);
    if (g) {
        snprintf(err, errlen, "http.bind '%s': %s", host, gai_strerror(g));
        return -1;
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, 1024)) {
        snprintf(err, errlen, "cannot listen on %s port %ld: %s%s", host, port, strerror(errno),
                 errno == EADDRINUSE ? " (is another pacs-gateway running?)" : "");
        if (fd >= 0) close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    return fd;
}

static void s_on_accept(h2o_socket_t *listener, const char *err)
{
    if (err) return;
    s_loop_t *L = listener->data;
    h2o_accept_ctx_t *actx = listener == L->listen_tls ? &L->accept_tls : &L->accept_plain;
    for (int k = 0; k < 16; k++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept(listener);
        if (!sock) break;
        h2o_accept(actx, sock);
    }
}

static void *s_loop_main(void *arg)
{
    s_loop_t *L = arg;
    /* The loop, its context and the context's message queue are created on this thread: H2O
     * 2.2.5 keeps its buffer recyclers in thread-local storage and a socket remembers the
     * recycler of the thread that created it, so a queue made on the main thread would have
     * every loop thread recycling through the main thread's lists at once (heap corruption
     * under load, seen with 32 concurrent connections). */
    L->loop = h2o_evloop_create();
    h2o_context_init(&L->ctx, L->loop, &s_g.globalconf);
    h2o_multithread_register_receiver(L->ctx.queue, &L->receiver, s_on_messages);
    L->accept_tls =
        (h2o_accept_ctx_t){.ctx = &L->ctx, .hosts = s_g.globalconf.hosts, .ssl_ctx = s_g.ssl_ctx};
    L->accept_plain = (h2o_accept_ctx_t){.ctx = &L->ctx, .hosts = s_g.globalconf.hosts};
    L->listen_tls = h2o_evloop_socket_create(L->loop, L->fd_tls, H2O_SOCKET_FLAG_DONT_READ);
    L->listen_tls->data = L;
    h2o_socket_read_start(L->listen_tls, s_on_accept);
    if (L->fd_plain >= 0) {
        L->listen_plain = h2o_evloop_socket_create(L->loop, L->fd_plain, H2O_SOCKET_FLAG_DONT_READ);
        L->listen_plain->data = L;
        h2o_socket_read_start(L->listen_plain, s_on_accept);
    }
    while (!s_stop)
        h2o_evloop_run(L->loop, 200);

    /* Graceful shutdown: stop accepting, let in-flight requests finish (bounded). */
    h2o_socket_read_stop(L->listen_tls);
    h2o_socket_close(L->listen_tls);
    L->listen_tls = NULL;
    if (L->listen_plain) {
        h2o_socket_read_stop(L->listen_plain);
        h2o_socket_close(L->listen_plain);
        L->listen_plain = NULL;
    }
    h2o_context_request_shutdown(&L->ctx);
    double deadline = s_now() + (double)s_g.cfg->http_shutdown_timeout;
    while (L->inflight > 0 && s_now() < deadline)
        h2o_evloop_run(L->loop, 50);
    if (L->inflight > 0)
        kp_warn("http", "loop %d: %d request(s) still running at shutdown", L->index, L->inflight);
    /* Flush what was just sent; idle keep-alive connections are simply closed by exit. */
    double flush = s_now() + 0.5;
    while (s_now() < flush && (!h2o_linklist_is_empty(&L->ctx.http1._conns) ||
                               !h2o_linklist_is_empty(&L->ctx.http2._conns)))
        h2o_evloop_run(L->loop, 20);
    return NULL;
}

static void s_setup_globalconf(const kp_config_t *cfg)
{
    h2o_globalconf_t *gc = &s_g.globalconf;
    h2o_config_init(gc);
    kp_static_init(cfg, gc);
    gc->server_name = h2o_iovec_init(H2O_STRLIT("Klinika-PACS"));
    gc->max_request_entity_size = (size_t)cfg->http_max_body_mb << 20;
    gc->handshake_timeout = 10000;
    gc->http1.req_timeout = (uint64_t)cfg->http_request_timeout * 1000;
    gc->http2.idle_timeout = (uint64_t)cfg->http_request_timeout * 1000;
    gc->http2.graceful_shutdown_timeout = (uint64_t)cfg->http_shutdown_timeout * 1000;
    /* H2O 2.2.5 predates the HTTP/2 rapid-reset fix: keep per-connection concurrency small. */
    gc->http2.max_concurrent_requests_per_connection = 16;
    h2o_hostconf_t *host =
        h2o_config_register_host(gc, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *pc = h2o_config_register_path(host, "/", 0);
    h2o_handler_t *h = h2o_create_handler(pc, sizeof *h);
    h->on_req = s_on_req;
    h2o_compress_args_t ca = {.min_size = 256, .gzip = {.quality = 1}, .brotli = {.quality = -1}};
    h2o_compress_register(pc, &ca);
}

static int s_tls_setup(const kp_config_t *cfg)
{
    char err[512];
    char *cert = kp_config_abspath(cfg->http_tls_cert), *key = kp_config_abspath(cfg->http_tls_key);
    int rc = -1;
    struct stat sb;
    bool have_cert = stat(cert, &sb) == 0, have_key = stat(key, &sb) == 0;
    if (!have_cert && !have_key && cfg->http_tls_generate) {
        if (kp_tls_generate(cert, key, err, sizeof err)) {
            kp_error("tls", "cannot generate a self-signed certificate: %s", err);
            goto done;
        }
        kp_warn("tls",
                "generated a self-signed certificate %s (key %s); browsers will warn until "
                "a real certificate is configured (http.tls_cert, http.tls_key)",
                cert, key);
    } else if (!have_cert || !have_key) {
        kp_error("tls", "missing %s (set http.tls_cert and http.tls_key%s)", have_cert ? key : cert,
                 cfg->http_tls_generate ? "; a certificate is generated only when both are absent"
                                        : ", or http.tls_generate = true");
        goto done;
    }
    s_g.ssl_ctx = kp_tls_server_ctx(cert, key, err, sizeof err);
    if (!s_g.ssl_ctx) {
        kp_error("tls", "%s", err);
        goto done;
    }
    h2o_ssl_register_alpn_protocols(s_g.ssl_ctx, h2o_http2_alpn_protocols);
    rc = 0;
done:
    free(cert);
    free(key);
    return rc;
}

/* `pacs-gateway --routes`: the route table as JSON lines (method, path, permission), for
 * docs/security.md and the permission tests. */
static int s_print_routes(void)
{
    size_t n = 0;
    const kp_route_t *r = kp_routes_table(&n);
    for (size_t i = 0; i < n; i++)
        printf("{\"method\": \"%s\", \"path\": \"%s\", \"permission\": \"%s\"}\n", r[i].method,
               r[i].pattern, r[i].permission);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--routes")) return s_print_routes();
    if (argc == 2 && !strcmp(argv[1], "--openapi")) {
        puts(kp_openapi_json());
        kp_openapi_free();
        return 0;
    }
    /* Streamed responses use 1 MiB buffers, decoded frames and rendered images are large too:
     * keep such blocks in the heap for reuse instead of a fresh mmap (and page faults, and an
     * munmap) per response, which cost more CPU than the copying itself. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 128 << 20);
    kp_log_init("pacs-gateway");
    bool exit_now = false;
    kp_config_t *cfg = kp_config_from_args(argc, argv, "pacs-gateway", &exit_now, NULL);
    if (!cfg) return 1;
    if (exit_now) {
        kp_config_destroy(&cfg);
        return 0;
    }
    s_g.cfg = cfg;
    int status = 1;

    struct sigaction sa = {.sa_handler = s_on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (cfg->http_dev_allow_all)
        kp_warn("auth", "authentication is NOT enforced (http.dev_allow_all = true): every "
                        "request is allowed; never expose this gateway to a network");
    if (s_tls_setup(cfg)) goto out;
    if (kp_dicom_init()) goto out;
    s_g.st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!s_g.st) goto out;
    s_g.ing = kp_ingest_new(cfg, s_g.st, "gateway");
    if (!s_g.ing) goto out;
    /* audit events (kp_api_auth.c) are published at once on this bus, which kp_audit guards
     * with its mutex for the database workers; without it the outbox sweep delivers them */
    static kp_bus_t *audit_bus;
    audit_bus = kp_bus_new(cfg, "gateway-audit");
    kp_audit_set_bus(audit_bus);
    s_g.auth = kp_auth_new(cfg);
    if (!s_g.auth) goto out;
    kp_api_health_init();
    s_g.rl_login = kp_ratelimit_new((double)cfg->http_rate_login_per_min / 60.0,
                                    (double)cfg->http_rate_login_per_min);
    s_g.rl_api = kp_ratelimit_new((double)cfg->http_rate_api_per_sec,
                                  2.0 * (double)cfg->http_rate_api_per_sec);
    kp_www_init(cfg->http_www_dir);
    if (!cfg->http_dev_allow_all) {
        kp_db_t *adb = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, NULL);
        if (!adb || kp_auth_reload(s_g.auth, adb)) {
            kp_error("auth", "cannot load roles and permissions");
            kp_db_destroy(&adb);
            goto out;
        }
        if (pthread_create(&s_g.reloader, NULL, s_reloader_main, adb) == 0)
            s_g.reloader_started = true;
        else
            kp_db_destroy(&adb);
    }
    if (cfg->http_metadata_cache_mb > 0) {
        s_g.mdcache = kp_mdcache_new((size_t)cfg->http_metadata_cache_mb << 20,
                                     (int)cfg->http_metadata_cache_ttl);
        if (!s_g.mdcache) goto out;
        if (pthread_create(&s_g.events, NULL, s_events_main, NULL) == 0) s_g.events_started = true;
    }
    s_setup_globalconf(cfg);

    /* A stale server sharing the port through SO_REUSEPORT would silently take a share of the
     * connections: first bind each port once without SO_REUSEPORT, which fails when anyone
     * listens there. */
    char err[512];
    long ports[2] = {cfg->http_https_port, cfg->http_http_port};
    for (int p = 0; p < 2; p++) {
        if (!ports[p]) continue;
        int fd = s_listen_fd(cfg->http_bind, ports[p], 0, err, sizeof err);
        if (fd < 0) {
            kp_error("http", "%s", err);
            goto out;
        }
        close(fd);
    }

    s_g.nloops = cfg->http_threads ? (int)cfg->http_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (s_g.nloops < 1) s_g.nloops = 1;
    s_g.loops = calloc((size_t)s_g.nloops, sizeof *s_g.loops);
    if (!s_g.loops) abort();
    for (int i = 0; i < s_g.nloops; i++) {
        s_loop_t *L = &s_g.loops[i];
        L->index = i;
        L->fd_plain = -1;
        L->fd_tls = s_listen_fd(cfg->http_bind, cfg->http_https_port, 1, err, sizeof err);
        if (L->fd_tls < 0 ||
            (cfg->http_http_port && (L->fd_plain = s_listen_fd(cfg->http_bind, cfg->http_http_port,
                                                               1, err, sizeof err)) < 0)) {
            kp_error("http", "%s", err);
            goto out;
        }
    }

    /* Database workers, each with its own connection. */
    s_g.nworkers = (int)cfg->http_db_pool;
    s_g.dbs = calloc((size_t)s_g.nworkers, sizeof *s_g.dbs);
    s_g.workers = calloc((size_t)s_g.nworkers, sizeof *s_g.workers);
    if (!s_g.dbs || !s_g.workers) abort();
    for (int i = 0; i < s_g.nworkers; i++) {
        s_g.dbs[i] = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, true, NULL);
        if (!s_g.dbs[i]) goto out_dbs;
    }
    kp_metrics_set(KP_MET_DB_WORKERS, s_g.nworkers);
    for (int i = 0; i < s_g.nworkers; i++)
        pthread_create(&s_g.workers[i], NULL, s_worker_main, s_g.dbs[i]);

    for (int i = 0; i < s_g.nloops; i++) {
        s_loop_t *L = &s_g.loops[i];
        pthread_create(&L->tid, NULL, s_loop_main, L);
    }
    kp_info("http", "listening: https://%s:%ld/dicom-web (%d loop threads, %d database workers)%s",
            cfg->http_bind, cfg->http_https_port, s_g.nloops, s_g.nworkers,
            cfg->http_http_port ? "" : "; plain HTTP disabled");
    if (cfg->http_http_port)
        kp_info("http", "http://%s:%ld/ redirects to HTTPS", cfg->http_bind, cfg->http_http_port);

    for (int i = 0; i < s_g.nloops; i++)
        pthread_join(s_g.loops[i].tid, NULL);
    kp_info("http", "stopped accepting; stopping database workers");
    pthread_mutex_lock(&s_g.mu);
    s_g.stopping = 1;
    pthread_cond_broadcast(&s_g.cv);
    pthread_mutex_unlock(&s_g.mu);
    for (int i = 0; i < s_g.nworkers; i++)
        pthread_join(s_g.workers[i], NULL);
    status = 0;
out_dbs:
    for (int i = 0; i < s_g.nworkers; i++)
        kp_db_destroy(&s_g.dbs[i]);
out:
    s_stop = 1;
    if (s_g.events_started) pthread_join(s_g.events, NULL);
    if (s_g.reloader_started) pthread_join(s_g.reloader, NULL);
    kp_auth_destroy(&s_g.auth);
    kp_ratelimit_destroy(&s_g.rl_login);
    kp_ratelimit_destroy(&s_g.rl_api);
    kp_mdcache_destroy(&s_g.mdcache);
    kp_audit_set_bus(NULL);
    kp_bus_destroy(&audit_bus);
    kp_api_health_shutdown();
    kp_openapi_free();
    kp_api_reports_shutdown();
    kp_api_worklist_shutdown();
    kp_ingest_destroy(&s_g.ing);
    kp_storage_destroy(&s_g.st);
    kp_dicom_shutdown();
    kp_info("http", "exiting (status %d)", status);
    /* The loops, contexts and SSL_CTX stay allocated until exit: H2O has no complete teardown
     * in 2.2.5 (see tests/lsan.supp); they remain reachable through s_g. */
    kp_config_destroy(&cfg);
    s_g.cfg = NULL;
    return status;
}
