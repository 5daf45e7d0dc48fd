/* kp_broker: queues, workers and in-flight jobs of pacs-busd (see kp_broker.h).
 *
 * Design: a job lives in exactly one place at a time, either its type's queue (a doubly-linked
 * FIFO) or the global in-flight list (ordered by dispatch time, so timeouts are found at its
 * head), and always in one hash table keyed by job id for de-duplication and DONE lookup.
 * Workers are few (tens), so they are a plain list searched linearly. The ROUTER has
 * ZMQ_ROUTER_MANDATORY set, so a send to a vanished peer fails with EHOSTUNREACH and the worker
 * is dropped at once instead of after the heartbeat timeout. Every limit (queues, jobs,
 * workers) is bounded so a misbehaving peer can only cost a log line. */
#include "kp_broker.h"

#include "kp_bus.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define S_MAX_QUEUES  1024 /* distinct job types */
#define S_MAX_WORKERS 4096
#define S_IDENT_MAX   255
#define S_CMD_MAX     16

typedef struct s_job s_job_t;
typedef struct s_queue s_queue_t;
typedef struct s_worker s_worker_t;

struct s_job {
    kp_msg_t msg;
    s_queue_t *queue;
    s_worker_t *worker; /* in flight to this worker; NULL while queued */
    int64_t dispatched_at;
    s_job_t *prev, *next; /* in the queue, or in the in-flight list */
    s_job_t *hnext;       /* hash chain */
};

struct s_queue {
    char type[KP_MSG_TYPE_MAX + 1];
    s_job_t *head, *tail;
    size_t queued, inflight;
};

struct s_worker {
    unsigned char ident[S_IDENT_MAX];
    size_t ident_len;
    char name[128];
    char types[KP_BUS_MAX_TYPES][KP_MSG_TYPE_MAX + 1];
    int ntypes, credit, inflight;
    int64_t last_seen, next_hb, last_dispatch;
    int64_t ready_at;               /* monotonic ms of its first READY on this connection */
    int64_t started;                /* the process's start, wall-clock s (READY / HB) */
    int64_t done, failed, busy_ms;  /* its own counters, from its last HB */
    int64_t current_id, running_ms; /* the job it said it was working on, and for how long */
    int64_t hb_at;                  /* monotonic ms of that HB */
    char current_type[KP_MSG_TYPE_MAX + 1];
    bool stalled; /* its send queue was full during this dispatch round */
    s_worker_t *next;
};

struct kp_broker {
    void *router;
    int64_t hb_ms, lost_ms, job_timeout_ms;
    int max_attempts;
    size_t max_jobs; /* queued + in flight (bus.max_jobs); beyond, SUBMITs are dropped: the
                      * outbox keeps them and the sweep publishes them again after the lease */
    bool full;       /* said so in the log; cleared below 90 % */
    s_queue_t **queues;
    size_t nqueues;
    s_worker_t *workers;
    size_t nworkers;
    s_job_t **buckets;
    size_t nbuckets, njobs;
    s_job_t *fl_head, *fl_tail; /* in flight, oldest dispatch first */
    int64_t seq;
};

static int64_t s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- lists and hash ---------------------------------------------------------------------- */

static void s_link_back(s_job_t **head, s_job_t **tail, s_job_t *j)
{
    j->next = NULL;
    j->prev = *tail;
    if (*tail)
        (*tail)->next = j;
    else
        *head = j;
    *tail = j;
}

static void s_link_front(s_job_t **head, s_job_t **tail, s_job_t *j)
{
    j->prev = NULL;
    j->next = *head;
    if (*head)
        (*head)->prev = j;
    else
        *tail = j;
    *head = j;
}

static void s_unlink(s_job_t **head, s_job_t **tail, s_job_t *j)
{
    if (j->prev)
        j->prev->next = j->next;
    else
        *head = j->next;
    if (j->next)
        j->next->prev = j->prev;
    else
        *tail = j->prev;
    j->prev = j->next = NULL;
}

static size_t s_bucket(const kp_broker_t *b, int64_t id)
{
    uint64_t h = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 32) & (b->nbuckets - 1);
}

static s_job_t *s_find(const kp_broker_t *b, int64_t id)
{
    for (s_job_t *j = b->buckets[s_bucket(b, id)]; j; j = j->hnext)
        if (j->msg.id == id) return j;
    return NULL;
}

static void s_hash_add(kp_broker_t *b, s_job_t *j)
{
    if (b->njobs + 1 > b->nbuckets) {
        size_t n = b->nbuckets * 2;
        s_job_t **nb = calloc(n, sizeof *nb);
        if (!nb) abort();
        s_job_t **old = b->buckets;
        size_t oldn = b->nbuckets;
        b->buckets = nb;
        b->nbuckets = n;
        for (size_t i = 0; i < oldn; i++) {
            for (s_job_t *x = old[i], *nx; x; x = nx) {
                nx = x->hnext;
                size_t k = s_bucket(b, x->msg.id);
                x->hnext = nb[k];
                nb[k] = x;
            }
        }
        free(old);
    }
    size_t k = s_bucket(b, j->msg.id);
    j->hnext = b->buckets[k];
    b->buckets[k] = j;
    b->njobs++;
}

static void s_hash_remove(kp_broker_t *b, s_job_t *j)
{
    for (s_job_t **pp = &b->buckets[s_bucket(b, j->msg.id)]; *pp; pp = &(*pp)->hnext) {
        if (*pp == j) {
            *pp = j->hnext;
            b->njobs--;
            return;
        }
    }
}

/* ---- queues and jobs --------------------------------------------------------------------- */

static s_queue_t *s_queue(kp_broker_t *b, const char *type, bool create)
{
    for (size_t i = 0; i < b->nqueues; i++)
        if (!strcmp(b->queues[i]->type, type)) return b->queues[i];
    if (!create || b->nqueues >= S_MAX_QUEUES) return NULL;
    s_queue_t **nq = realloc(b->queues, (b->nqueues + 1) * sizeof *nq);
    if (!nq) abort();
    b->queues = nq;
    s_queue_t *q = calloc(1, sizeof *q);
    if (!q) abort();
    snprintf(q->type, sizeof q->type, "%s", type);
    b->queues[b->nqueues++] = q;
    return q;
}

/* Removes a job from wherever it is and frees it. */
static void s_job_free(kp_broker_t *b, s_job_t *j)
{
    if (j->worker) {
        s_unlink(&b->fl_head, &b->fl_tail, j);
        j->worker->inflight--;
        j->queue->inflight--;
    } else {
        s_unlink(&j->queue->head, &j->queue->tail, j);
        j->queue->queued--;
    }
    s_hash_remove(b, j);
    kp_msg_clear(&j->msg);
    free(j);
    if (b->full && b->njobs < b->max_jobs / 10 * 9) {
        b->full = false;
        kp_info("bus", "below 90 %% of bus.max_jobs again: accepting new jobs");
    }
}

/* Puts an in-flight job back at the front of its queue for another try, or gives up on it
 * after jobs.max_attempts deliveries (a job that kills every worker must not loop forever);
 * the outbox sweep then retries it after its lease and finally marks it failed. */
static void s_requeue(kp_broker_t *b, s_job_t *j)
{
    s_unlink(&b->fl_head, &b->fl_tail, j);
    j->worker->inflight--;
    j->queue->inflight--;
    j->worker = NULL;
    if (j->msg.attempt < INT_MAX) j->msg.attempt++;
    if (j->msg.attempt >= b->max_attempts) {
        char ctx[32];
        snprintf(ctx, sizeof ctx, "job %lld", (long long)j->msg.id);
        kp_logc(KP_LOG_ERROR, "bus", ctx,
                "%s given up after %d deliveries; left to the outbox sweep", j->msg.type,
                j->msg.attempt);
        s_hash_remove(b, j);
        kp_msg_clear(&j->msg);
        free(j);
        return;
    }
    s_link_front(&j->queue->head, &j->queue->tail, j);
    j->queue->queued++;
}

/* ---- peers ------------------------------------------------------------------------------- */

/* A printable name for a peer that has not said READY: its routing id in hex. */
static void s_ident_hex(const void *ident, size_t len, char *out, size_t outlen)
{
    const unsigned char *p = ident;
    size_t o = 0;
    for (size_t i = 0; i < len && o + 3 < outlen; i++)
        o += (size_t)snprintf(out + o, 3, "%02x", p[i]);
    out[o] = 0;
}

static s_worker_t *s_worker_find(kp_broker_t *b, const void *ident, size_t len)
{
    for (s_worker_t *w = b->workers; w; w = w->next)
        if (w->ident_len == len && !memcmp(w->ident, ident, len)) return w;
    return NULL;
}

/* Forgets a worker and queues its in-flight jobs again (keeping their order). */
static void s_worker_remove(kp_broker_t *b, s_worker_t *w, const char *why)
{
    int n = 0;
    for (s_job_t *j = b->fl_tail, *prev; j; j = prev) {
        prev = j->prev;
        if (j->worker == w) {
            s_requeue(b, j);
            n++;
        }
    }
    kp_warn("bus", "worker %s lost (%s); %d job(s) queued again", w->name, why, n);
    for (s_worker_t **pp = &b->workers; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    }
    b->nworkers--;
    free(w);
}

/* Sends [ident][cmd][body]. 0; KP_EAGAIN when the peer's queue is full; KP_EBUS when the peer
 * is gone (EHOSTUNREACH) or the send failed otherwise. */
static int s_send_to(kp_broker_t *b, const void *ident, size_t ilen, const char *cmd,
                     const void *body, size_t len)
{
    if (zmq_send(b->router, ident, ilen, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return zmq_errno() == EAGAIN ? KP_EAGAIN : KP_EBUS;
    if (zmq_send(b->router, cmd, strlen(cmd), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(b->router, len ? body : "", len, ZMQ_DONTWAIT) < 0)
        return KP_EBUS;
    return 0;
}

/* ---- commands ---------------------------------------------------------------------------- */

/* 0 queued, 1 already queued or in flight (ignored), or a negative code (dropped). *id is the
 * job id when the message decoded, else 0. */
static int s_submit(kp_broker_t *b, const void *body, size_t len, const char *from, int64_t *id)
{
    kp_msg_t m;
    *id = 0;
    int rc = kp_msg_decode(body, len, &m);
    if (rc) {
        kp_warn("bus", "dropping a malformed SUBMIT from %s: %s", from, kp_strerror(rc));
        return rc;
    }
    *id = m.id;
    rc = KP_EINVAL;
    char ctx[32];
    snprintf(ctx, sizeof ctx, "job %lld", (long long)m.id);
    if (m.id <= 0) {
        kp_warn("bus", "dropping a SUBMIT of type %s from %s: job id must be > 0", m.type, from);
        goto done;
    }
    if (s_find(b, m.id)) {
        kp_logc(KP_LOG_DEBUG, "bus", ctx, "already queued or in flight, SUBMIT ignored");
        rc = 1;
        goto done;
    }
    rc = KP_EAGAIN;
    if (b->njobs >= b->max_jobs) {
        if (!b->full)
            kp_warn("bus",
                    "holding bus.max_jobs = %zu jobs: new jobs wait in the outbox until workers "
                    "catch up (back-pressure; nothing is lost)",
                    b->max_jobs);
        b->full = true;
        kp_logc(KP_LOG_DEBUG, "bus", ctx,
                "broker full (%zu jobs), SUBMIT dropped (the outbox keeps it)", b->max_jobs);
        goto done;
    }
    s_queue_t *q = s_queue(b, m.type, true);
    if (!q) {
        kp_logc(KP_LOG_WARN, "bus", ctx, "too many job types, SUBMIT of type %s dropped", m.type);
        goto done;
    }
    s_job_t *j = calloc(1, sizeof *j);
    if (!j) abort();
    j->msg = m; /* takes the payload */
    memset(&m, 0, sizeof m);
    j->queue = q;
    s_link_back(&q->head, &q->tail, j);
    q->queued++;
    s_hash_add(b, j);
    kp_logc(KP_LOG_DEBUG, "bus", ctx, "queued %s (attempt %d) from %s", j->msg.type, j->msg.attempt,
            from);
    rc = 0;
done:
    kp_msg_clear(&m);
    return rc;
}

static bool s_type_ok(const char *s, size_t n)
{
    if (n == 0 || n > KP_MSG_TYPE_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f) return false;
    return true;
}

static void s_ready(kp_broker_t *b, const void *ident, size_t ilen, const void *body, size_t len,
                    const char *from)
{
    json_t *m = NULL;
    const char *why = "not a map";
    if (kp_msg_decode_map(body, len, &m)) goto bad;
    json_t *v = json_object_get(m, "v"), *types = json_object_get(m, "types");
    json_t *credit = json_object_get(m, "credit"), *name = json_object_get(m, "name");
    why = "unsupported version";
    if (v && (!json_is_integer(v) || json_integer_value(v) != KP_MSG_VERSION)) goto bad;
    why = "types must be a list of 1 to 32 job types";
    if (!json_is_array(types) || json_array_size(types) < 1 ||
        json_array_size(types) > KP_BUS_MAX_TYPES)
        goto bad;
    for (size_t i = 0; i < json_array_size(types); i++) {
        json_t *t = json_array_get(types, i);
        if (!json_is_string(t) || !s_type_ok(json_string_value(t), json_string_length(t))) goto bad;
    }
    why = "credit must be an integer in 0..100000";
    if (!json_is_integer(credit) || json_integer_value(credit) < 0 ||
        json_integer_value(credit) > KP_BUS_MAX_CREDIT)
        goto bad;
    why = "name must be a string";
    if (name && !json_is_string(name)) goto bad;

    s_worker_t *w = s_worker_find(b, ident, ilen);
    if (!w) {
        if (b->nworkers >= S_MAX_WORKERS) {
            why = "too many workers";
            goto bad;
        }
        w = calloc(1, sizeof *w);
        if (!w) abort();
        memcpy(w->ident, ident, ilen);
        w->ident_len = ilen;
        w->ready_at = s_now_ms();
        w->next = b->workers;
        b->workers = w;
        b->nworkers++;
    }
    const char *nm = name ? json_string_value(name) : from;
    size_t nl = strnlen(nm, sizeof w->name - 1);
    memcpy(w->name, nm, nl);
    w->name[nl] = 0;
    w->ntypes = (int)json_array_size(types);
    for (int i = 0; i < w->ntypes; i++)
        snprintf(w->types[i], sizeof w->types[i], "%s",
                 json_string_value(json_array_get(types, (size_t)i)));
    w->credit = (int)json_integer_value(credit);
    json_t *started = json_object_get(m, "started");
    if (json_is_integer(started)) w->started = json_integer_value(started);
    w->last_seen = s_now_ms();
    w->next_hb = w->last_seen; /* greet it with a heartbeat right away */
    kp_info("bus", "worker %s ready: %d type(s) starting with %s, credit %d", w->name, w->ntypes,
            w->types[0], w->credit);
    json_decref(m);
    return;
bad:
    kp_warn("bus", "dropping a malformed READY from %s: %s", from, why);
    json_decref(m);
}

static void s_done(kp_broker_t *b, s_worker_t *w, const void *body, size_t len, const char *from)
{
    json_t *m = NULL;
    if (kp_msg_decode_map(body, len, &m)) goto bad;
    json_t *id = json_object_get(m, "id"), *ok = json_object_get(m, "ok");
    if (!json_is_integer(id) || json_integer_value(id) <= 0 || (ok && !json_is_boolean(ok)))
        goto bad;
    /* DONE returns one credit, even for a job re-dispatched meanwhile or held from before a
     * reconnect: the worker accounts its credit that way (see kp_bus.c). */
    if (w && w->credit < KP_BUS_MAX_CREDIT) w->credit++;
    bool success = !ok || json_is_true(ok);
    char ctx[32];
    snprintf(ctx, sizeof ctx, "job %lld", (long long)json_integer_value(id));
    s_job_t *j = s_find(b, json_integer_value(id));
    if (j && (j->worker || success)) {
        /* Done is done, whoever did it. A failed job is left to the outbox sweep, which retries
         * it after its lease (counting attempts), rather than being retried hot here. */
        kp_logc(success ? KP_LOG_DEBUG : KP_LOG_WARN, "bus", ctx, "%s by %s",
                success ? "done" : "failed", from);
        s_job_free(b, j);
    }
    json_decref(m);
    return;
bad:
    kp_warn("bus", "dropping a malformed DONE from %s", from);
    json_decref(m);
}

/* A worker's HB body: its counters (schema/messages.md). An empty body (older peers, pacsctl)
 * or a malformed one changes nothing: a heartbeat is a sign of life first. */
static void s_hb(s_worker_t *w, const void *body, size_t len)
{
    json_t *m = NULL;
    if (!w || !len || kp_msg_decode_map(body, len, &m)) goto done;
    json_t *done = json_object_get(m, "done"), *failed = json_object_get(m, "failed");
    json_t *cur = json_object_get(m, "current"), *started = json_object_get(m, "started");
    if (json_is_integer(done)) w->done = json_integer_value(done);
    if (json_is_integer(failed)) w->failed = json_integer_value(failed);
    json_t *busy = json_object_get(m, "busy_ms");
    if (json_is_integer(busy)) w->busy_ms = json_integer_value(busy);
    if (json_is_integer(started)) w->started = json_integer_value(started);
    w->current_id = 0;
    json_t *cid = json_object_get(cur, "id"), *ctype = json_object_get(cur, "type");
    json_t *crun = json_object_get(cur, "running_ms");
    if (json_is_integer(cid) && json_integer_value(cid) > 0 && json_is_string(ctype) &&
        s_type_ok(json_string_value(ctype), json_string_length(ctype))) {
        w->current_id = json_integer_value(cid);
        snprintf(w->current_type, sizeof w->current_type, "%s", json_string_value(ctype));
        w->running_ms = json_is_integer(crun) ? json_integer_value(crun) : 0;
    }
    w->hb_at = s_now_ms();
done:
    json_decref(m);
}

/* "host:pid:kind" (kp_bus_new) split for STATS; other names leave the parts empty. */
static void s_name_parts(const char *name, json_t *out)
{
    const char *c1 = strchr(name, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) return;
    char *end;
    long pid = strtol(c1 + 1, &end, 10);
    if (end != c2 || pid <= 0) return;
    json_t *host = json_stringn(name, (size_t)(c1 - name)), *kind = json_string(c2 + 1);
    if (host && kind) {
        json_object_set_new(out, "host", host);
        json_object_set_new(out, "pid", json_integer(pid));
        json_object_set_new(out, "kind", kind);
    } else {
        json_decref(host);
        json_decref(kind);
    }
}

static void s_stats(kp_broker_t *b, const void *ident, size_t ilen)
{
    char *buf = NULL;
    size_t len = 0;
    int64_t now = s_now_ms();
    json_t *queues = json_object(), *workers = json_array();
    if (!queues || !workers) abort();
    for (size_t i = 0; i < b->nqueues; i++) {
        s_queue_t *q = b->queues[i];
        json_object_set_new(queues, q->type,
                            json_pack("{s:I,s:I}", "queued", (json_int_t)q->queued, "inflight",
                                      (json_int_t)q->inflight));
    }
    for (s_worker_t *w = b->workers; w; w = w->next) {
        json_t *types = json_array();
        if (!types) abort();
        for (int i = 0; i < w->ntypes; i++)
            json_array_append_new(types, json_string(w->types[i]));
        /* A name that is not UTF-8 would make json_string fail: send the hex id instead. */
        json_t *name = json_string(w->name);
        if (!name) {
            char hex[2 * S_IDENT_MAX + 1];
            s_ident_hex(w->ident, w->ident_len, hex, sizeof hex);
            name = json_string(hex);
        }
        json_t *jobs = json_array();
        if (!jobs) abort();
        for (s_job_t *j = b->fl_head; j && json_array_size(jobs) < 16; j = j->next)
            if (j->worker == w) json_array_append_new(jobs, json_integer(j->msg.id));
        json_t *e = json_pack("{s:o,s:o,s:i,s:i,s:I,s:I,s:I,s:I,s:I,s:I,s:o}", "name", name,
                              "types", types, "credit", w->credit, "inflight", w->inflight,
                              "last_seen_ms", (json_int_t)(now - w->last_seen), "connected_ms",
                              (json_int_t)(now - w->ready_at), "started", (json_int_t)w->started,
                              "done", (json_int_t)w->done, "failed", (json_int_t)w->failed,
                              "busy_ms", (json_int_t)w->busy_ms, "jobs", jobs);
        if (!e) abort();
        s_name_parts(w->name, e);
        if (w->current_id > 0) {
            json_t *c =
                json_pack("{s:I,s:s,s:I}", "id", (json_int_t)w->current_id, "type", w->current_type,
                          "running_ms", (json_int_t)(w->running_ms + (now - w->hb_at)));
            if (c) json_object_set_new(e, "current", c);
        }
        json_array_append_new(workers, e);
    }
    json_t *body =
        json_pack("{s:i,s:o,s:o}", "v", KP_MSG_VERSION, "queues", queues, "workers", workers);
    if (!body) abort();
    if (kp_msg_encode_map(body, &buf, &len)) {
        kp_error("bus", "cannot encode the STATS answer (too many queues or workers?)");
        goto done;
    }
    if (s_send_to(b, ident, ilen, KP_BUS_STATS, buf, len))
        kp_debug("bus", "STATS answer not delivered");
done:
    free(buf);
    json_decref(body);
}

static void s_handle(kp_broker_t *b, const void *ident, size_t ilen, const char *cmd,
                     const void *body, size_t len)
{
    s_worker_t *w = s_worker_find(b, ident, ilen);
    char from[2 * S_IDENT_MAX + 8];
    if (w) {
        w->last_seen = s_now_ms();
        snprintf(from, sizeof from, "%s", w->name);
    } else {
        memcpy(from, "peer ", 5);
        s_ident_hex(ident, ilen, from + 5, sizeof from - 5);
    }
    int64_t id;
    if (!strcmp(cmd, KP_BUS_SUBMIT))
        (void)s_submit(b, body, len, from, &id);
    else if (!strcmp(cmd, KP_BUS_HB)) {
        /* From an unknown peer (one we declared lost) it is ignored: receiving no heartbeats
         * back, that worker reconnects and says READY again. */
        s_hb(w, body, len);
    } else if (!strcmp(cmd, KP_BUS_READY))
        s_ready(b, ident, ilen, body, len, from);
    else if (!strcmp(cmd, KP_BUS_DONE))
        s_done(b, w, body, len, from);
    else if (!strcmp(cmd, KP_BUS_STATS))
        s_stats(b, ident, ilen);
    else
        kp_warn("bus", "dropping an unknown command '%s' from %s", cmd, from);
}

/* ---- public ------------------------------------------------------------------------------ */

kp_broker_t *kp_broker_new(void *router, const kp_config_t *cfg)
{
    kp_broker_t *b = calloc(1, sizeof *b);
    if (!b) abort();
    b->router = router;
    b->hb_ms = cfg->bus_heartbeat_ms;
    b->lost_ms = cfg->bus_heartbeat_ms * cfg->bus_heartbeat_liveness;
    b->job_timeout_ms = cfg->bus_job_timeout * 1000;
    b->max_attempts = (int)cfg->jobs_max_attempts;
    b->max_jobs = (size_t)cfg->bus_max_jobs;
    b->nbuckets = 1024;
    b->buckets = calloc(b->nbuckets, sizeof *b->buckets);
    if (!b->buckets) abort();
    return b;
}

void kp_broker_destroy(kp_broker_t **bp)
{
    if (!bp || !*bp) return;
    kp_broker_t *b = *bp;
    for (size_t i = 0; i < b->nbuckets; i++) {
        for (s_job_t *j = b->buckets[i], *n; j; j = n) {
            n = j->hnext;
            kp_msg_clear(&j->msg);
            free(j);
        }
    }
    free(b->buckets);
    for (size_t i = 0; i < b->nqueues; i++)
        free(b->queues[i]);
    free(b->queues);
    for (s_worker_t *w = b->workers, *n; w; w = n) {
        n = w->next;
        free(w);
    }
    free(b);
    *bp = NULL;
}

int kp_broker_submit(kp_broker_t *b, const void *body, size_t len, const char *from, int64_t *id)
{
    return s_submit(b, body, len, from, id);
}

void kp_broker_read(kp_broker_t *b)
{
    for (int n = 0; n < 1000; n++) {
        zmq_msg_t part[3], extra;
        int frames = 0;
        bool bad = false;
        for (;;) {
            zmq_msg_t *f = frames < 3 ? &part[frames] : &extra;
            zmq_msg_init(f);
            if (zmq_msg_recv(f, b->router, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(f);
                if (frames) bad = true; /* cannot happen: messages arrive whole */
                break;
            }
            int more = zmq_msg_more(f);
            if (frames >= 3) {
                zmq_msg_close(f);
                bad = true;
            }
            frames++;
            if (!more) break;
        }
        if (frames == 0) return;
        int kept = frames < 3 ? frames : 3;
        char cmd[S_CMD_MAX + 1] = "";
        size_t ilen = kept >= 1 ? zmq_msg_size(&part[0]) : 0;
        if (kept < 2 || ilen == 0 || ilen > S_IDENT_MAX) bad = true;
        if (!bad) {
            size_t cl = zmq_msg_size(&part[1]);
            if (cl == 0 || cl > S_CMD_MAX)
                bad = true;
            else {
                memcpy(cmd, zmq_msg_data(&part[1]), cl);
                cmd[cl] = 0;
            }
        }
        if (bad) {
            kp_warn("bus", "dropping a malformed message (%d frame(s); expected [command][body])",
                    frames > 0 ? frames - 1 : 0);
        } else {
            const void *body = kept == 3 ? zmq_msg_data(&part[2]) : "";
            size_t blen = kept == 3 ? zmq_msg_size(&part[2]) : 0;
            s_handle(b, zmq_msg_data(&part[0]), ilen, cmd, body, blen);
        }
        for (int i = 0; i < kept; i++)
            zmq_msg_close(&part[i]);
    }
}

static s_worker_t *s_pick(kp_broker_t *b, const char *type)
{
    s_worker_t *best = NULL;
    for (s_worker_t *w = b->workers; w; w = w->next) {
        if (w->credit <= 0 || w->stalled) continue;
        bool serves = false;
        for (int i = 0; i < w->ntypes && !serves; i++)
            serves = !strcmp(w->types[i], type);
        if (!serves) continue;
        if (!best || w->inflight < best->inflight ||
            (w->inflight == best->inflight && w->last_dispatch < best->last_dispatch))
            best = w;
    }
    return best;
}

static void s_dispatch(kp_broker_t *b, int64_t now)
{
    for (s_worker_t *w = b->workers; w; w = w->next)
        w->stalled = false;
    for (size_t i = 0; i < b->nqueues; i++) {
        s_queue_t *q = b->queues[i];
        s_worker_t *w;
        while (q->head && (w = s_pick(b, q->type))) {
            s_job_t *j = q->head;
            char *buf = NULL;
            size_t len = 0;
            if (kp_msg_encode(&j->msg, &buf, &len)) { /* it decoded, so this cannot happen */
                kp_error("bus", "cannot encode job %lld, dropped", (long long)j->msg.id);
                s_job_free(b, j);
                continue;
            }
            int rc = s_send_to(b, w->ident, w->ident_len, KP_BUS_JOB, buf, len);
            free(buf);
            if (rc == KP_EAGAIN) {
                w->stalled = true;
                continue;
            }
            if (rc) {
                s_worker_remove(b, w, "unreachable");
                continue;
            }
            s_unlink(&q->head, &q->tail, j);
            q->queued--;
            j->worker = w;
            j->dispatched_at = now;
            s_link_back(&b->fl_head, &b->fl_tail, j);
            q->inflight++;
            w->inflight++;
            w->credit--;
            w->last_dispatch = ++b->seq;
            char ctx[32];
            snprintf(ctx, sizeof ctx, "job %lld", (long long)j->msg.id);
            kp_logc(KP_LOG_DEBUG, "bus", ctx, "%s (attempt %d) sent to %s", j->msg.type,
                    j->msg.attempt, w->name);
        }
    }
}

int kp_broker_tick(kp_broker_t *b)
{
    int64_t now = s_now_ms();
    int64_t wake = now + b->hb_ms;
    for (s_worker_t *w = b->workers, *n; w; w = n) {
        n = w->next;
        if (now - w->last_seen > b->lost_ms) {
            s_worker_remove(b, w, "no heartbeat");
            continue;
        }
        if (now >= w->next_hb) {
            if (s_send_to(b, w->ident, w->ident_len, KP_BUS_HB, NULL, 0) == KP_EBUS) {
                s_worker_remove(b, w, "unreachable");
                continue;
            }
            w->next_hb = now + b->hb_ms;
        }
        if (w->next_hb < wake) wake = w->next_hb;
        if (w->last_seen + b->lost_ms + 1 < wake) wake = w->last_seen + b->lost_ms + 1;
    }
    while (b->fl_head && now - b->fl_head->dispatched_at >= b->job_timeout_ms) {
        s_job_t *j = b->fl_head;
        char ctx[32];
        snprintf(ctx, sizeof ctx, "job %lld", (long long)j->msg.id);
        kp_logc(KP_LOG_WARN, "bus", ctx, "%s not done by %s within %lld s, dispatching again",
                j->msg.type, j->worker->name, (long long)(b->job_timeout_ms / 1000));
        s_requeue(b, j);
    }
    s_dispatch(b, now);
    if (b->fl_head && b->fl_head->dispatched_at + b->job_timeout_ms < wake)
        wake = b->fl_head->dispatched_at + b->job_timeout_ms;
    int64_t wait = wake - s_now_ms();
    return wait < 0 ? 0 : (int)wait;
}
