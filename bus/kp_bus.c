/* kp_bus: client side of the bus (see kp_bus.h and schema/messages.md).
 *
 * Design: each kp_bus_t / kp_bus_sub_t owns its ZeroMQ context, so handles are independent
 * and destroying one never waits for another (ZMQ_BLOCKY off, ZMQ_LINGER 0). The jobs DEALER
 * has ZMQ_IMMEDIATE set: while the broker is not connected nothing is queued and a send fails
 * at once with EAGAIN, which is what makes kp_bus_submit() non-blocking and honest (the
 * outbox sweep covers the gap). The flip side is that READY cannot be queued before the
 * connection is up, so a worker keeps a `need_ready` flag and polls for POLLOUT until it goes
 * out. A worker replaces its socket (new routing id, fresh READY) when the broker has been
 * silent for heartbeat_liveness x heartbeat_ms; the broker, for its part, re-dispatches the
 * jobs of the old identity once it stops hearing from it. */
#include "kp_bus.h"

#include "kp_curve.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define S_HWM     10000 /* messages queued per socket before sends fail / drop */
#define S_CMD_MAX 16    /* longest command frame we accept */

struct kp_bus {
    kp_curve_t curve; /* transport security (off for plain ipc://) */
    void *ctx;
    void *jobs; /* DEALER to bus.jobs_endpoint */
    void *pub;  /* PUB to bus.events_in */
    char *jobs_endpoint;
    char name[256];
    int hb_ms, liveness;
    /* worker state */
    bool worker, need_ready;
    bool silent; /* the broker went quiet: log the outage once, and its end */
    char types[KP_BUS_MAX_TYPES][KP_MSG_TYPE_MAX + 1];
    int ntypes, credit, held; /* held: jobs received and not yet reported done */
    int64_t last_heard, next_hb;
    /* counters announced in every HB (pacsctl workers shows them) */
    int64_t done, failed, current_id, current_since; /* current_since: wall-clock ms */
    char current_type[KP_MSG_TYPE_MAX + 1];
    int64_t started; /* wall-clock seconds */
    /* when each held job arrived (monotonic ms), for busy_ms: the summed time from receiving a
     * job to reporting it done (jobs held at once overlap; beyond S_TIMED they go untimed) */
    struct {
        int64_t id, at;
    } timed[256];
    int64_t busy_ms;
};

struct kp_bus_sub {
    kp_curve_t curve;
    void *ctx;
    void *sock; /* SUB to bus.events_out */
};

static int64_t s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t s_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int s_setint(void *sock, int opt, int value)
{
    return zmq_setsockopt(sock, opt, &value, sizeof value);
}

/* Options every socket gets: no linger, bounded queues, bounded frames, quick reconnects. */
static int s_common_opts(void *sock)
{
    int64_t maxmsg = KP_MSG_MAX_SIZE;
    if (s_setint(sock, ZMQ_LINGER, 0) || s_setint(sock, ZMQ_SNDHWM, S_HWM) ||
        s_setint(sock, ZMQ_RCVHWM, S_HWM) || s_setint(sock, ZMQ_RECONNECT_IVL, 100) ||
        s_setint(sock, ZMQ_RECONNECT_IVL_MAX, 2000) ||
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg))
        return -1;
    return 0;
}

static void *s_socket(void *ctx, int type, const char *endpoint, const kp_curve_t *curve)
{
    void *sock = zmq_socket(ctx, type);
    if (!sock) {
        kp_error("bus", "cannot create a socket: %s", zmq_strerror(zmq_errno()));
        return NULL;
    }
    if (s_common_opts(sock) || (type == ZMQ_DEALER && s_setint(sock, ZMQ_IMMEDIATE, 1)) ||
        kp_curve_apply_client(sock, curve)) {
        kp_error("bus", "cannot set socket options: %s", zmq_strerror(zmq_errno()));
        goto error;
    }
    if (zmq_connect(sock, endpoint)) {
        kp_error("bus", "cannot connect to %s: %s (hint: check the bus.* endpoints)", endpoint,
                 zmq_strerror(zmq_errno()));
        goto error;
    }
    return sock;
error:
    zmq_close(sock);
    return NULL;
}

static void *s_context(void)
{
    void *ctx = zmq_ctx_new();
    if (!ctx) {
        kp_error("bus", "cannot create a ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        return NULL;
    }
    /* Terminating never waits for unsent messages (we set ZMQ_LINGER 0 on every socket too). */
    zmq_ctx_set(ctx, ZMQ_BLOCKY, 0);
    zmq_ctx_set(ctx, ZMQ_IO_THREADS, 1);
    return ctx;
}

/* Sends [cmd][body] as one message. 0, or KP_EBUS (errno EAGAIN: not connected / queue full). */
static int s_send(void *sock, const char *cmd, const void *body, size_t len, int flags)
{
    if (zmq_send(sock, cmd, strlen(cmd), ZMQ_SNDMORE | flags) < 0) return KP_EBUS;
    /* Once the first frame is accepted the rest of the message is too. */
    if (zmq_send(sock, len ? body : "", len, flags) < 0) return KP_EBUS;
    return 0;
}

/* Receives one whole message without blocking: the first frame into cmd, the second into body
 * (initialised here; the caller closes it). 1: a [cmd][body] or [cmd] message; 0: nothing
 * waiting; KP_EMSG: malformed (wrong frame count or command), drained and dropped. */
static int s_recv(void *sock, char cmd[S_CMD_MAX + 1], zmq_msg_t *body)
{
    zmq_msg_t part;
    int frames = 0, bad = 0;
    zmq_msg_init(body);
    cmd[0] = 0;
    for (;;) {
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            /* EAGAIN before the first frame: nothing waiting. Mid-message cannot happen
             * (multipart messages arrive whole); treat anything else as nothing waiting. */
            if (frames == 0) return 0;
            bad = 1;
            break;
        }
        frames++;
        int more = zmq_msg_more(&part);
        if (frames == 1) {
            size_t n = zmq_msg_size(&part);
            if (n == 0 || n > S_CMD_MAX)
                bad = 1;
            else {
                memcpy(cmd, zmq_msg_data(&part), n);
                cmd[n] = 0;
            }
            zmq_msg_close(&part);
        } else if (frames == 2) {
            zmq_msg_move(body, &part); /* releases body's old (empty) content */
            zmq_msg_close(&part);
        } else {
            bad = 1;
            zmq_msg_close(&part);
        }
        if (!more) break;
    }
    if (bad) {
        zmq_msg_close(body);
        zmq_msg_init(body);
        return KP_EMSG;
    }
    return 1;
}

static int s_open_jobs(kp_bus_t *bus)
{
    bus->jobs = s_socket(bus->ctx, ZMQ_DEALER, bus->jobs_endpoint, &bus->curve);
    return bus->jobs ? 0 : KP_EBUS;
}

kp_bus_t *kp_bus_new(const kp_config_t *cfg, const char *kind)
{
    kp_bus_t *bus = calloc(1, sizeof *bus);
    if (!bus) abort();
    char host[128] = "localhost";
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = 0;
    snprintf(bus->name, sizeof bus->name, "%s:%d:%s", host, (int)getpid(),
             kind && *kind ? kind : "bus");
    bus->hb_ms = (int)cfg->bus_heartbeat_ms;
    bus->liveness = (int)cfg->bus_heartbeat_liveness;
    bus->started = s_wall_ms() / 1000;
    bus->jobs_endpoint = strdup(cfg->bus_jobs_endpoint);
    if (!bus->jobs_endpoint) abort();
    if (kp_curve_client(cfg, &bus->curve)) goto error;
    if (!(bus->ctx = s_context())) goto error;
    if (s_open_jobs(bus)) goto error;
    if (!(bus->pub = s_socket(bus->ctx, ZMQ_PUB, cfg->bus_events_in, &bus->curve))) goto error;
    return bus;
error:
    kp_bus_destroy(&bus);
    return NULL;
}

void kp_bus_destroy(kp_bus_t **busp)
{
    if (!busp || !*busp) return;
    kp_bus_t *bus = *busp;
    if (bus->jobs) zmq_close(bus->jobs);
    if (bus->pub) zmq_close(bus->pub);
    if (bus->ctx) zmq_ctx_term(bus->ctx);
    free(bus->jobs_endpoint);
    free(bus);
    *busp = NULL;
}

const char *kp_bus_name(const kp_bus_t *bus)
{
    return bus->name;
}

int kp_bus_wait_connected(kp_bus_t *bus, int timeout_ms)
{
    int64_t deadline = s_now_ms() + timeout_ms;
    for (;;) {
        zmq_pollitem_t it = {bus->jobs, 0, ZMQ_POLLOUT, 0};
        int64_t left = deadline - s_now_ms();
        int n = zmq_poll(&it, 1, left > 0 ? (long)left : 0);
        if (n > 0 && (it.revents & ZMQ_POLLOUT)) return 0;
        if (n < 0 && zmq_errno() != EINTR) return KP_EBUS;
        if (s_now_ms() >= deadline) return KP_ETIMEOUT;
    }
}

int kp_bus_submit(kp_bus_t *bus, const kp_msg_t *job)
{
    char *buf = NULL;
    size_t len = 0;
    int rc = KP_EINVAL;
    if (!job || job->id <= 0) goto error;
    if ((rc = kp_msg_encode(job, &buf, &len))) goto error;
    rc = s_send(bus->jobs, KP_BUS_SUBMIT, buf, len, ZMQ_DONTWAIT);
    if (rc)
        kp_debug("bus", "job %lld (%s) not sent: broker not connected or busy (%s)",
                 (long long)job->id, job->type, zmq_strerror(zmq_errno()));
error:
    free(buf);
    return rc;
}

/* --- worker --------------------------------------------------------------------------------- */

static void s_send_ready(kp_bus_t *bus)
{
    char *buf = NULL;
    size_t len = 0;
    json_t *types = json_array();
    json_t *body = json_object();
    if (!types || !body) abort();
    for (int i = 0; i < bus->ntypes; i++)
        json_array_append_new(types, json_string(bus->types[i]));
    int credit = bus->credit - bus->held;
    if (credit < 0) credit = 0;
    json_object_set_new(body, "v", json_integer(KP_MSG_VERSION));
    json_object_set_new(body, "types", types);
    json_object_set_new(body, "credit", json_integer(credit));
    json_object_set_new(body, "name", json_string(bus->name));
    json_object_set_new(body, "started", json_integer(bus->started));
    if (kp_msg_encode_map(body, &buf, &len)) {
        kp_error("bus", "cannot encode READY");
        goto error;
    }
    if (s_send(bus->jobs, KP_BUS_READY, buf, len, ZMQ_DONTWAIT) == 0) {
        bus->need_ready = false;
        bus->next_hb = s_now_ms() + bus->hb_ms;
        kp_info("bus", "worker %s ready for %d type(s), credit %d", bus->name, bus->ntypes, credit);
    }
error:
    free(buf);
    json_decref(body);
}

/* A worker's heartbeat carries its counters: {v, done, failed, started, current: null |
 * {id, type, running_ms}} (schema/messages.md). */
static void s_send_hb(kp_bus_t *bus, int64_t now)
{
    char *buf = NULL;
    size_t len = 0;
    json_t *body = json_pack("{s:i,s:I,s:I,s:I,s:I}", "v", KP_MSG_VERSION, "done",
                             (json_int_t)bus->done, "failed", (json_int_t)bus->failed, "started",
                             (json_int_t)bus->started, "busy_ms", (json_int_t)bus->busy_ms);
    if (!body) abort();
    if (bus->current_id > 0) {
        int64_t running = s_wall_ms() - bus->current_since;
        json_object_set_new(body, "current",
                            json_pack("{s:I,s:s,s:I}", "id", (json_int_t)bus->current_id, "type",
                                      bus->current_type, "running_ms",
                                      (json_int_t)(running > 0 ? running : 0)));
    }
    if (kp_msg_encode_map(body, &buf, &len)) {
        free(buf);
        buf = NULL;
        len = 0;
    }
    /* A failure (not connected) is fine: the broker will notice the silence. */
    (void)s_send(bus->jobs, KP_BUS_HB, buf, len, ZMQ_DONTWAIT);
    free(buf);
    json_decref(body);
    bus->next_hb = now + bus->hb_ms;
}

static void s_reconnect(kp_bus_t *bus, int64_t now)
{
    if (!bus->silent)
        kp_warn("bus", "broker silent for %d ms, reconnecting to %s", (int)(now - bus->last_heard),
                bus->jobs_endpoint);
    else
        kp_debug("bus", "broker still silent, reconnecting to %s", bus->jobs_endpoint);
    bus->silent = true;
    zmq_close(bus->jobs);
    bus->jobs = NULL;
    if (s_open_jobs(bus)) kp_error("bus", "cannot reopen the broker connection, will retry");
    bus->need_ready = true;
    bus->last_heard = now;
}

int kp_bus_worker_ready(kp_bus_t *bus, const char *const *types, int ntypes, int credit)
{
    if (bus->worker || !types || ntypes < 1 || ntypes > KP_BUS_MAX_TYPES || credit < 1 ||
        credit > KP_BUS_MAX_CREDIT)
        return KP_EINVAL;
    for (int i = 0; i < ntypes; i++) {
        size_t n = types[i] ? strlen(types[i]) : 0;
        if (n == 0 || n > KP_MSG_TYPE_MAX) return KP_EINVAL;
        for (size_t j = 0; j < n; j++)
            if ((unsigned char)types[i][j] <= 0x20 || (unsigned char)types[i][j] >= 0x7f)
                return KP_EINVAL;
        memcpy(bus->types[i], types[i], n + 1);
    }
    bus->ntypes = ntypes;
    bus->credit = credit;
    bus->worker = true;
    bus->need_ready = true;
    bus->last_heard = s_now_ms();
    if (bus->jobs) s_send_ready(bus);
    return 0;
}

void kp_bus_heartbeat(kp_bus_t *bus)
{
    int64_t now = s_now_ms();
    if (bus->worker && bus->jobs && now >= bus->next_hb) s_send_hb(bus, now);
}

/* Reads what is waiting on the jobs socket. 1 with *out filled when a JOB arrived, else 0. */
static int s_worker_drain(kp_bus_t *bus, kp_msg_t *out)
{
    for (int i = 0; i < 1000 && bus->jobs; i++) {
        char cmd[S_CMD_MAX + 1];
        zmq_msg_t body;
        int r = s_recv(bus->jobs, cmd, &body);
        if (r == 0) {
            zmq_msg_close(&body);
            return 0;
        }
        bus->last_heard = s_now_ms();
        if (bus->silent) {
            kp_info("bus", "broker is back on %s", bus->jobs_endpoint);
            bus->silent = false;
        }
        if (r < 0) {
            kp_warn("bus", "dropping a malformed message from the broker (bad framing)");
        } else if (!strcmp(cmd, KP_BUS_JOB)) {
            int rc = kp_msg_decode(zmq_msg_data(&body), zmq_msg_size(&body), out);
            zmq_msg_close(&body);
            if (rc == 0) {
                bus->held++;
                bus->current_id = out->id;
                bus->current_since = s_wall_ms();
                for (size_t t = 0; t < sizeof bus->timed / sizeof bus->timed[0]; t++)
                    if (!bus->timed[t].id) {
                        bus->timed[t].id = out->id;
                        bus->timed[t].at = s_now_ms();
                        break;
                    }
                snprintf(bus->current_type, sizeof bus->current_type, "%s", out->type);
                return 1;
            }
            kp_warn("bus", "dropping a malformed JOB from the broker: %s", kp_strerror(rc));
            continue;
        } else if (strcmp(cmd, KP_BUS_HB) != 0) {
            kp_warn("bus", "dropping an unexpected '%s' message from the broker", cmd);
        }
        zmq_msg_close(&body);
    }
    return 0;
}

int kp_bus_next_job(kp_bus_t *bus, kp_msg_t *out, int timeout_ms)
{
    memset(out, 0, sizeof *out);
    if (!bus->worker) return KP_EINVAL;
    int64_t lost_after = (int64_t)bus->hb_ms * bus->liveness;
    int64_t deadline = s_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        if (s_worker_drain(bus, out)) return 0;
        int64_t now = s_now_ms();
        if (!bus->jobs || now - bus->last_heard > lost_after) s_reconnect(bus, now);
        if (!bus->jobs) { /* could not even create a socket: wait and retry */
            if (now >= deadline) return KP_ETIMEOUT;
            usleep(100 * 1000);
            continue;
        }
        if (bus->need_ready) s_send_ready(bus);
        if (now >= bus->next_hb) s_send_hb(bus, now);
        if (now >= deadline) return KP_ETIMEOUT;
        int64_t wake = deadline;
        if (bus->next_hb < wake) wake = bus->next_hb;
        if (bus->last_heard + lost_after + 1 < wake) wake = bus->last_heard + lost_after + 1;
        int64_t wait = wake - now;
        if (wait < 0) wait = 0;
        zmq_pollitem_t it = {bus->jobs, 0, ZMQ_POLLIN | (bus->need_ready ? ZMQ_POLLOUT : 0), 0};
        if (zmq_poll(&it, 1, (long)wait) < 0) {
            if (zmq_errno() == EINTR) return KP_ETIMEOUT;
            kp_error("bus", "poll failed: %s", zmq_strerror(zmq_errno()));
            return KP_EBUS;
        }
    }
}

int kp_bus_job_done(kp_bus_t *bus, int64_t id, bool ok)
{
    char *buf = NULL;
    size_t len = 0;
    int rc = KP_EBUS;
    json_t *body = json_pack("{s:I,s:b}", "id", (json_int_t)id, "ok", ok);
    if (!body) abort();
    if (bus->held > 0) bus->held--;
    if (ok)
        bus->done++;
    else
        bus->failed++;
    if (id == bus->current_id) bus->current_id = 0;
    for (size_t t = 0; t < sizeof bus->timed / sizeof bus->timed[0]; t++)
        if (bus->timed[t].id == id) {
            bus->busy_ms += s_now_ms() - bus->timed[t].at;
            bus->timed[t].id = 0;
            break;
        }
    if ((rc = kp_msg_encode_map(body, &buf, &len))) goto error;
    rc = bus->jobs ? s_send(bus->jobs, KP_BUS_DONE, buf, len, ZMQ_DONTWAIT) : KP_EBUS;
    if (rc) kp_debug("bus", "DONE for job %lld not sent: broker not connected", (long long)id);
error:
    free(buf);
    json_decref(body);
    return rc;
}

/* --- admin ---------------------------------------------------------------------------------- */

int kp_bus_stats(kp_bus_t *bus, json_t **out, int timeout_ms)
{
    *out = NULL;
    if (bus->worker) return KP_EINVAL;
    int64_t deadline = s_now_ms() + timeout_ms;
    int64_t left;
    if (kp_bus_wait_connected(bus, timeout_ms)) return KP_ETIMEOUT;
    if (s_send(bus->jobs, KP_BUS_STATS, NULL, 0, ZMQ_DONTWAIT)) return KP_ETIMEOUT;
    while ((left = deadline - s_now_ms()) > 0) {
        zmq_pollitem_t it = {bus->jobs, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, (long)left) < 0 && zmq_errno() != EINTR) return KP_EBUS;
        char cmd[S_CMD_MAX + 1];
        zmq_msg_t body;
        int r;
        while ((r = s_recv(bus->jobs, cmd, &body)) != 0) {
            int rc = KP_EMSG;
            if (r > 0 && !strcmp(cmd, KP_BUS_STATS))
                rc = kp_msg_decode_map(zmq_msg_data(&body), zmq_msg_size(&body), out);
            else
                kp_debug("bus", "ignoring a '%s' message while waiting for STATS", cmd);
            zmq_msg_close(&body);
            if (r > 0 && !strcmp(cmd, KP_BUS_STATS)) {
                if (rc) kp_warn("bus", "malformed STATS answer from the broker");
                return rc;
            }
        }
        zmq_msg_close(&body);
    }
    return KP_ETIMEOUT;
}

/* --- events --------------------------------------------------------------------------------- */

int kp_bus_publish(kp_bus_t *bus, const kp_msg_t *ev)
{
    char *buf = NULL;
    size_t len = 0;
    int rc = kp_msg_encode(ev, &buf, &len);
    if (rc) goto error;
    /* The topic frame is the type, so subscribers filter by type prefix. A PUB never blocks:
     * without subscribers, or past the HWM, the message is dropped. */
    if (s_send(bus->pub, ev->type, buf, len, ZMQ_DONTWAIT))
        kp_debug("bus", "event %s dropped: %s", ev->type, zmq_strerror(zmq_errno()));
error:
    free(buf);
    return rc;
}

kp_bus_sub_t *kp_bus_subscribe(const kp_config_t *cfg, const char *type_prefix)
{
    kp_bus_sub_t *sub = calloc(1, sizeof *sub);
    if (!sub) abort();
    const char *prefix = type_prefix ? type_prefix : "";
    if (kp_curve_client(cfg, &sub->curve)) goto error;
    if (!(sub->ctx = s_context())) goto error;
    if (!(sub->sock = zmq_socket(sub->ctx, ZMQ_SUB))) goto error;
    if (s_common_opts(sub->sock) || kp_curve_apply_client(sub->sock, &sub->curve) ||
        zmq_setsockopt(sub->sock, ZMQ_SUBSCRIBE, prefix, strlen(prefix))) {
        kp_error("bus", "cannot set subscriber options: %s", zmq_strerror(zmq_errno()));
        goto error;
    }
    if (zmq_connect(sub->sock, cfg->bus_events_out)) {
        kp_error("bus", "cannot connect to %s: %s (hint: check bus.events_out)",
                 cfg->bus_events_out, zmq_strerror(zmq_errno()));
        goto error;
    }
    return sub;
error:
    kp_bus_sub_destroy(&sub);
    return NULL;
}

void kp_bus_sub_destroy(kp_bus_sub_t **subp)
{
    if (!subp || !*subp) return;
    kp_bus_sub_t *sub = *subp;
    if (sub->sock) zmq_close(sub->sock);
    if (sub->ctx) zmq_ctx_term(sub->ctx);
    free(sub);
    *subp = NULL;
}

int kp_bus_sub_recv(kp_bus_sub_t *sub, kp_msg_t *out, int timeout_ms)
{
    memset(out, 0, sizeof *out);
    int64_t deadline = s_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        char topic[KP_MSG_TYPE_MAX + 2];
        zmq_msg_t body;
        int r;
        /* s_recv's command buffer is shorter than a type: read the topic frame by hand. */
        zmq_msg_t part;
        zmq_msg_init(&part);
        zmq_msg_init(&body);
        r = 0;
        if (zmq_msg_recv(&part, sub->sock, ZMQ_DONTWAIT) >= 0) {
            size_t n = zmq_msg_size(&part);
            int frames = 1;
            r = n >= 1 && n <= KP_MSG_TYPE_MAX ? 1 : KP_EMSG;
            if (r > 0) {
                memcpy(topic, zmq_msg_data(&part), n);
                topic[n] = 0;
            }
            while (zmq_msg_more(&part)) {
                zmq_msg_close(&part);
                zmq_msg_init(&part);
                if (zmq_msg_recv(&part, sub->sock, ZMQ_DONTWAIT) < 0) break;
                if (++frames == 2) {
                    zmq_msg_copy(&body, &part);
                }
            }
            if (frames != 2) r = KP_EMSG;
        }
        zmq_msg_close(&part);
        if (r < 0) {
            kp_warn("bus", "dropping a malformed event (bad framing)");
        } else if (r > 0) {
            int rc = kp_msg_decode(zmq_msg_data(&body), zmq_msg_size(&body), out);
            if (rc == 0 && strcmp(out->type, topic) == 0) {
                zmq_msg_close(&body);
                return 0;
            }
            if (rc == 0) kp_msg_clear(out);
            kp_warn("bus", "dropping a malformed event '%s': %s", topic,
                    rc ? kp_strerror(rc) : "topic does not match its type");
        }
        zmq_msg_close(&body);
        if (r != 0) continue;
        int64_t left = deadline - s_now_ms();
        if (left <= 0) return KP_ETIMEOUT;
        zmq_pollitem_t it = {sub->sock, 0, ZMQ_POLLIN, 0};
        int n = zmq_poll(&it, 1, (long)left);
        if (n < 0) return zmq_errno() == EINTR ? KP_ETIMEOUT : KP_EBUS;
        if (n == 0) return KP_ETIMEOUT;
    }
}

int kp_bus_sub_fd(kp_bus_sub_t *sub)
{
    int fd = -1;
    size_t len = sizeof fd;
    if (zmq_getsockopt(sub->sock, ZMQ_FD, &fd, &len)) return -1;
    return fd;
}
