/* kp_sweep: outbox sweep thread of pacs-busd (see kp_sweep.h).
 *
 * The thread owns its database connection and its end of the PAIR socket; the main loop owns
 * the other end. All signals are blocked in the thread so that SIGTERM/SIGHUP reach the main
 * loop. Sends to the main loop time out every 200 ms so a stop request is noticed even when the
 * pipe is full, and stop also sends a wake-up frame, so the thread is only slow to stop while it
 * is inside libpq (bounded by db.connect_timeout and the statement). */
#include "kp_sweep.h"

#include "kp_bus.h"
#include "kp_db.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define S_ENDPOINT "inproc://kp-sweep"
#define S_BATCH    1000 /* rows claimed per statement (the LIMIT below) */
#define S_ROUNDS   100  /* statements per sweep at most: 100 000 jobs */

static const char *const S_SQL_FAIL =
    "UPDATE jobs SET state = 'failed', last_error = 'too many attempts', updated_at = now() "
    "WHERE state = 'pending' AND lease_until < now() AND attempts >= $1::int RETURNING id, type";
static const char *const S_SQL_CLAIM =
    "UPDATE jobs SET lease_until = now() + make_interval(secs => $1::double precision), "
    "attempts = attempts + 1, updated_at = now() "
    "WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' AND lease_until < now() "
    "ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) "
    "RETURNING id, type, payload::text, attempts";
static const char *const S_SQL_BAD_ROW =
    "UPDATE jobs SET state = 'failed', last_error = $2, updated_at = now() WHERE id = $1::bigint";
static const char *const S_SQL_GIVE_BACK =
    "UPDATE jobs SET attempts = greatest(attempts - 1, 0) "
    "WHERE id = ANY($1::bigint[]) AND state = 'pending' AND attempts > 0";
static const char *const S_SQL_PURGE =
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state <> 'pending' "
    "AND updated_at < now() - make_interval(secs => $1::double precision) LIMIT 10000)";

struct kp_sweep {
    const kp_config_t *cfg;
    void *ctx;
    void *main_end;
    pthread_t thread;
    atomic_bool stop;
    kp_db_t *db;
    bool db_down;
    int64_t *held; /* ids the broker already held: their claim is given back */
    size_t nheld, capheld;
};

static int64_t s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sends [SUBMIT][body] to the main loop, retrying while it is busy. 0, or -1 when stopping. */
static int s_send(kp_sweep_t *s, void *pipe, const char *buf, size_t len)
{
    while (!atomic_load(&s->stop)) {
        if (zmq_send(pipe, KP_BUS_SUBMIT, strlen(KP_BUS_SUBMIT), ZMQ_SNDMORE) >= 0) {
            if (zmq_send(pipe, buf, len, 0) >= 0) return 0;
            return -1;
        }
        if (zmq_errno() != EAGAIN && zmq_errno() != EINTR) return -1;
    }
    return -1;
}

static void s_fail_row(kp_sweep_t *s, const char *id, const char *why)
{
    const char *params[2] = {id, why};
    char ctx[32];
    snprintf(ctx, sizeof ctx, "job %s", id);
    kp_logc(KP_LOG_ERROR, "sweep", ctx, "outbox row unusable (%s), marked failed", why);
    (void)kp_db_run(s->db, S_SQL_BAD_ROW, 2, params);
}

/* Turns one claimed row into a SUBMIT for the main loop. -1 when stopping. */
static int s_publish_row(kp_sweep_t *s, void *pipe, PGresult *r, int row)
{
    const char *id = PQgetvalue(r, row, 0), *type = PQgetvalue(r, row, 1);
    const char *payload = PQgetvalue(r, row, 2);
    long attempts = strtol(PQgetvalue(r, row, 3), NULL, 10);
    kp_msg_t m;
    char *buf = NULL;
    size_t len = 0;
    int rc = 0;
    json_error_t jerr;
    json_t *p = json_loads(payload, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(p)) {
        json_decref(p);
        s_fail_row(s, id, "payload is not a JSON object");
        return 0;
    }
    if (kp_msg_init(&m, type, strtoll(id, NULL, 10), p)) { /* takes p */
        s_fail_row(s, id, "job type is not a valid message type");
        return 0;
    }
    m.attempt = attempts < 0 ? 0 : attempts > 1000000 ? 1000000 : (int)attempts;
    if (kp_msg_encode(&m, &buf, &len)) {
        s_fail_row(s, id, "payload cannot be carried on the bus (too big or too deep)");
        goto done;
    }
    rc = s_send(s, pipe, buf, len);
done:
    free(buf);
    kp_msg_clear(&m);
    return rc;
}

static bool s_connected(kp_sweep_t *s)
{
    if (!s->db) {
        int err = 0;
        s->db = kp_db_connect(s->cfg->db_conninfo, (int)s->cfg->db_connect_timeout, true, &err);
    } else if (kp_db_ensure(s->db)) {
        kp_db_destroy(&s->db);
    }
    if (!s->db) {
        if (!s->db_down)
            kp_warn("sweep",
                    "database unavailable: outbox sweep postponed by %ld s (jobs are "
                    "still brokered)",
                    s->cfg->jobs_sweep_interval);
        s->db_down = true;
        return false;
    }
    if (s->db_down) kp_info("sweep", "database available again, outbox sweep resumed");
    s->db_down = false;
    return true;
}

static void s_sweep(kp_sweep_t *s, void *pipe)
{
    PGresult *r = NULL;
    char max[32], lease[32], keep[32];
    snprintf(max, sizeof max, "%ld", s->cfg->jobs_max_attempts);
    snprintf(lease, sizeof lease, "%ld", s->cfg->jobs_lease);
    snprintf(keep, sizeof keep, "%ld", s->cfg->jobs_retention);
    const char *p_max[] = {max}, *p_lease[] = {lease}, *p_keep[] = {keep};
    if (!s_connected(s)) return;

    if (kp_db_exec(s->db, &r, S_SQL_FAIL, 1, p_max)) goto error;
    for (int i = 0; i < PQntuples(r); i++) {
        char ctx[32];
        snprintf(ctx, sizeof ctx, "job %s", PQgetvalue(r, i, 0));
        kp_logc(KP_LOG_ERROR, "sweep", ctx, "%s failed: not done after %s attempts",
                PQgetvalue(r, i, 1), max);
    }
    PQclear(r);
    r = NULL;

    int total = 0;
    for (int round = 0; round < S_ROUNDS && !atomic_load(&s->stop); round++) {
        if (kp_db_exec(s->db, &r, S_SQL_CLAIM, 1, p_lease)) goto error;
        int n = PQntuples(r);
        for (int i = 0; i < n; i++)
            if (s_publish_row(s, pipe, r, i)) goto error;
        total += n;
        PQclear(r);
        r = NULL;
        if (n < S_BATCH) break;
    }
    if (total) kp_debug("sweep", "%d job(s) past their lease claimed", total);

    if (kp_db_exec(s->db, &r, S_SQL_PURGE, 1, p_keep)) goto error;
    if (atoi(PQcmdTuples(r)) > 0)
        kp_debug("sweep", "%s finished job(s) past retention deleted", PQcmdTuples(r));
error:
    PQclear(r);
}

/* Reads what the main loop sent: HELD lists (kept for s_give_back) and wake-up calls (the stop
 * flag says what they mean). */
static void s_read_pipe(kp_sweep_t *s, void *pipe)
{
    for (;;) {
        zmq_msg_t cmd, body;
        zmq_msg_init(&cmd);
        zmq_msg_init(&body);
        if (zmq_msg_recv(&cmd, pipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&cmd);
            zmq_msg_close(&body);
            return;
        }
        bool held = zmq_msg_size(&cmd) == strlen(KP_SWEEP_HELD) &&
                    !memcmp(zmq_msg_data(&cmd), KP_SWEEP_HELD, strlen(KP_SWEEP_HELD));
        if (zmq_msg_more(&cmd) && zmq_msg_recv(&body, pipe, ZMQ_DONTWAIT) >= 0 && held) {
            size_t n = zmq_msg_size(&body) / sizeof(int64_t);
            if (s->nheld + n > s->capheld) {
                s->capheld = (s->nheld + n) * 2;
                s->held = realloc(s->held, s->capheld * sizeof *s->held);
                if (!s->held) abort();
            }
            memcpy(s->held + s->nheld, zmq_msg_data(&body), n * sizeof(int64_t));
            s->nheld += n;
        }
        zmq_msg_close(&cmd);
        zmq_msg_close(&body);
    }
}

/* Gives the claim back to jobs the broker already held (see KP_SWEEP_HELD). Best effort: on a
 * database error the attempts stay counted. */
static void s_give_back(kp_sweep_t *s)
{
    if (!s->nheld || !s->db) return;
    size_t cap = 24 * (s->nheld > 1000 ? 1000 : s->nheld) + 3;
    char *list = malloc(cap);
    if (!list) abort();
    for (size_t start = 0; start < s->nheld; start += 1000) {
        size_t end = start + 1000 < s->nheld ? start + 1000 : s->nheld, o = 0;
        list[o++] = '{';
        for (size_t i = start; i < end; i++)
            o += (size_t)snprintf(list + o, cap - o, "%s%lld", i > start ? "," : "",
                                  (long long)s->held[i]);
        list[o++] = '}';
        list[o] = 0;
        const char *params[] = {list};
        if (kp_db_run(s->db, S_SQL_GIVE_BACK, 1, params)) break;
    }
    kp_debug("sweep", "%zu job(s) were still held by the broker, attempts given back", s->nheld);
    free(list);
    s->nheld = 0;
}

static void *s_run(void *arg)
{
    kp_sweep_t *s = arg;
    void *pipe = zmq_socket(s->ctx, ZMQ_PAIR);
    int linger = 0, timeout = 200, hwm = 2 * S_BATCH;
    if (!pipe || zmq_setsockopt(pipe, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(pipe, ZMQ_SNDTIMEO, &timeout, sizeof timeout) ||
        zmq_setsockopt(pipe, ZMQ_SNDHWM, &hwm, sizeof hwm) || zmq_connect(pipe, S_ENDPOINT)) {
        kp_error("sweep", "cannot open the sweep pipe: %s; outbox sweep disabled",
                 zmq_strerror(zmq_errno()));
        goto done;
    }
    int64_t next = 0; /* sweep at once at start-up */
    while (!atomic_load(&s->stop)) {
        int64_t now = s_now_ms();
        if (now >= next) {
            s_sweep(s, pipe);
            next = s_now_ms() + s->cfg->jobs_sweep_interval * 1000;
            continue;
        }
        zmq_pollitem_t it = {pipe, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, (long)(next - now)) < 0 && zmq_errno() == ETERM) break;
        s_read_pipe(s, pipe);
        s_give_back(s);
    }
done:
    kp_db_destroy(&s->db);
    free(s->held);
    if (pipe) zmq_close(pipe);
    return NULL;
}

kp_sweep_t *kp_sweep_start(void *ctx, const kp_config_t *cfg, void **pipe)
{
    kp_sweep_t *s = calloc(1, sizeof *s);
    if (!s) abort();
    s->cfg = cfg;
    s->ctx = ctx;
    atomic_init(&s->stop, false);
    int linger = 0, hwm = 2 * S_BATCH;
    sigset_t all, old;
    s->main_end = zmq_socket(ctx, ZMQ_PAIR);
    if (!s->main_end || zmq_setsockopt(s->main_end, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(s->main_end, ZMQ_RCVHWM, &hwm, sizeof hwm) ||
        zmq_bind(s->main_end, S_ENDPOINT)) {
        kp_error("sweep", "cannot open the sweep pipe: %s", zmq_strerror(zmq_errno()));
        goto error;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&s->thread, NULL, s_run, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        kp_error("sweep", "cannot start the sweep thread: %s", strerror(rc));
        goto error;
    }
    *pipe = s->main_end;
    return s;
error:
    if (s->main_end) zmq_close(s->main_end);
    free(s);
    return NULL;
}

bool kp_sweep_stop(kp_sweep_t **sp, int timeout_ms)
{
    if (!sp || !*sp) return true;
    kp_sweep_t *s = *sp;
    atomic_store(&s->stop, true);
    (void)zmq_send(s->main_end, "STOP", 4, ZMQ_DONTWAIT);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    if (pthread_timedjoin_np(s->thread, NULL, &deadline)) {
        kp_warn("sweep", "sweep thread still busy in the database after %d ms", timeout_ms);
        return false;
    }
    zmq_close(s->main_end);
    free(s);
    *sp = NULL;
    return true;
}
