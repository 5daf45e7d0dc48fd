/* Tests of pacs-busd through the kp_bus client API: each test starts the real broker as a
 * child process on private ipc:// endpoints (with a database that does not exist, which the
 * broker must shrug off) and drives producers, workers and subscribers against it.
 *
 * The broker binary is $KP_BUSD, else $BUILD/bin/pacs-busd (BUILD defaults to "build"), so the
 * ASan build tests the ASan broker. Set KP_TEST_VERBOSE=1 to see the broker's debug log. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "kp_bus.h"
#include "kp_config.h"
#include "kp_errors.h"
#include "kp_log.h"

typedef struct {
    char dir[64];
    char jobs[128], in[128], out[128];
    const char *job_timeout, *max_attempts;
    pid_t pid;
    kp_config_t *cfg;
} s_env_t;

static volatile pid_t s_child = 0;

static void s_on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "test_broker: timeout, killing pacs-busd\n";
    if (s_child > 0) kill(s_child, SIGKILL);
    (void)!write(2, msg, sizeof msg - 1);
    _exit(2);
}

static int64_t s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void s_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static const char *s_busd_path(void)
{
    static char path[512];
    const char *p = getenv("KP_BUSD");
    if (p && *p) return p;
    const char *build = getenv("BUILD");
    snprintf(path, sizeof path, "%s/bin/pacs-busd", build && *build ? build : "build");
    return path;
}

static void s_start_busd(s_env_t *e)
{
    const char *path = s_busd_path();
    assert_int_equal(access(path, X_OK), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        setenv("KP_BUS_JOBS_ENDPOINT", e->jobs, 1);
        setenv("KP_BUS_EVENTS_IN", e->in, 1);
        setenv("KP_BUS_EVENTS_OUT", e->out, 1);
        setenv("KP_BUS_HEARTBEAT_MS", "100", 1);
        setenv("KP_BUS_HEARTBEAT_LIVENESS", "3", 1);
        setenv("KP_BUS_JOB_TIMEOUT", e->job_timeout, 1);
        setenv("KP_JOBS_MAX_ATTEMPTS", e->max_attempts, 1);
        setenv("KP_DB_CONNINFO", "host=/nonexistent dbname=x", 1);
        setenv("KP_DB_CONNECT_TIMEOUT", "1", 1);
        setenv("KP_LOG_LEVEL", getenv("KP_TEST_VERBOSE") ? "debug" : "warn", 1);
        unsetenv("KP_CONFIG");
        execl(path, path, (char *)NULL);
        _exit(127);
    }
    e->pid = pid;
    s_child = pid;
}

/* SIGTERM, then wait; returns the exit status (or -1 when it had to be killed). */
static int s_stop_busd(s_env_t *e)
{
    if (e->pid <= 0) return 0;
    int status = 0, result = -1;
    kill(e->pid, SIGTERM);
    int64_t deadline = s_now_ms() + 5000;
    for (;;) {
        pid_t r = waitpid(e->pid, &status, WNOHANG);
        if (r == e->pid) {
            result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            break;
        }
        if (s_now_ms() > deadline) {
            kill(e->pid, SIGKILL);
            waitpid(e->pid, &status, 0);
            break;
        }
        s_sleep_ms(10);
    }
    e->pid = 0;
    s_child = 0;
    return result;
}

static void s_kill_busd(s_env_t *e)
{
    kill(e->pid, SIGKILL);
    waitpid(e->pid, NULL, 0);
    e->pid = 0;
    s_child = 0;
}

static int s_setup_with(void **state, const char *job_timeout, const char *max_attempts)
{
    static int counter = 0;
    alarm(60);
    s_env_t *e = calloc(1, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "/tmp/kp-bus-test-%d-%d", (int)getpid(), counter++);
    /* busd creates the directory itself */
    snprintf(e->jobs, sizeof e->jobs, "ipc://%s/jobs", e->dir);
    snprintf(e->in, sizeof e->in, "ipc://%s/events-in", e->dir);
    snprintf(e->out, sizeof e->out, "ipc://%s/events-out", e->dir);
    e->job_timeout = job_timeout;
    e->max_attempts = max_attempts;
    e->cfg = kp_config_new();
    char err[256];
    if (kp_config_set(e->cfg, "bus.jobs_endpoint", e->jobs, err, sizeof err) ||
        kp_config_set(e->cfg, "bus.events_in", e->in, err, sizeof err) ||
        kp_config_set(e->cfg, "bus.events_out", e->out, err, sizeof err) ||
        kp_config_set(e->cfg, "bus.heartbeat_ms", "100", err, sizeof err) ||
        kp_config_set(e->cfg, "bus.heartbeat_liveness", "3", err, sizeof err))
        return -1;
    s_start_busd(e);
    *state = e;
    return 0;
}

static int s_setup(void **state)
{
    return s_setup_with(state, "120", "10");
}
static int s_setup_timeout(void **state)
{
    return s_setup_with(state, "1", "2");
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    int status = s_stop_busd(e);
    char path[160];
    const char *names[] = {"jobs", "events-in", "events-out"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", e->dir, names[i]);
        unlink(path);
    }
    rmdir(e->dir);
    kp_config_destroy(&e->cfg);
    free(e);
    alarm(0);
    /* SIGTERM must give a clean exit */
    if (status != 0) fprintf(stderr, "pacs-busd exited with status %d\n", status);
    return status == 0 ? 0 : -1;
}

/* ---- helpers ----------------------------------------------------------------------------- */

static void s_job(kp_msg_t *m, const char *type, int64_t id)
{
    char path[64], sop[64];
    snprintf(path, sizeof path, "ab/cd/1.2.3.%lld.dcm", (long long)id);
    snprintf(sop, sizeof sop, "1.2.3.%lld", (long long)id);
    json_t *p = json_pack("{s:s,s:s,s:s,s:I,s:s}", "path", path, "sop", sop, "sha256",
                          "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                          "size", (json_int_t)1234, "ae", "MODALITY1");
    assert_int_equal(kp_msg_init(m, type, id, p), 0);
}

/* Submits until the broker connection takes it (it may still be coming up). */
static void s_submit(kp_bus_t *bus, const char *type, int64_t id)
{
    kp_msg_t m;
    s_job(&m, type, id);
    int64_t deadline = s_now_ms() + 5000;
    int rc;
    while ((rc = kp_bus_submit(bus, &m)) == KP_EBUS && s_now_ms() < deadline)
        s_sleep_ms(10);
    assert_int_equal(rc, 0);
    kp_msg_clear(&m);
}

typedef struct {
    kp_bus_t *bus;
    int got;
    int64_t ids[512];
    int attempts[512];
} s_worker_t;

static kp_bus_t *s_worker(const kp_config_t *cfg, const char *kind, const char *type, int credit)
{
    kp_bus_t *w = kp_bus_new(cfg, kind);
    assert_non_null(w);
    const char *types[] = {type};
    assert_int_equal(kp_bus_worker_ready(w, types, 1, credit), 0);
    return w;
}

/* Runs the workers' loops until `want` more jobs arrived in total or timeout_ms passed.
 * Returns how many arrived. */
static int s_collect(s_worker_t *ws, int nw, int want, int timeout_ms)
{
    int got = 0;
    int64_t deadline = s_now_ms() + timeout_ms;
    while (s_now_ms() < deadline && (want <= 0 || got < want)) {
        for (int i = 0; i < nw; i++) {
            if (!ws[i].bus) continue;
            kp_msg_t m;
            int rc = kp_bus_next_job(ws[i].bus, &m, 10);
            if (rc == KP_ETIMEOUT) continue;
            assert_int_equal(rc, 0);
            assert_true(ws[i].got < 512);
            ws[i].ids[ws[i].got] = m.id;
            ws[i].attempts[ws[i].got] = m.attempt;
            ws[i].got++;
            got++;
            assert_non_null(json_object_get(m.payload, "path"));
            kp_msg_clear(&m);
        }
    }
    return got;
}

static json_t *s_stats(kp_bus_t *admin)
{
    json_t *st = NULL;
    assert_int_equal(kp_bus_stats(admin, &st, 3000), 0);
    assert_non_null(st);
    return st;
}

static long s_queue_field(json_t *st, const char *type, const char *field)
{
    json_t *q = json_object_get(json_object_get(st, "queues"), type);
    return q ? (long)json_integer_value(json_object_get(q, field)) : 0;
}

/* Keeps the workers' loops turning until the broker lists n workers. */
static void s_wait_workers(kp_bus_t *admin, s_worker_t *ws, int nw, size_t n)
{
    int64_t deadline = s_now_ms() + 5000;
    for (;;) {
        assert_int_equal(s_collect(ws, nw, 0, 30), 0);
        json_t *st = s_stats(admin);
        size_t have = json_array_size(json_object_get(st, "workers"));
        json_decref(st);
        if (have == n) return;
        assert_true(s_now_ms() < deadline);
    }
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_jobs_exactly_once_and_balanced(void **state)
{
    s_env_t *e = *state;
    kp_bus_t *prod = kp_bus_new(e->cfg, "test-producer");
    assert_non_null(prod);
    s_worker_t ws[2] = {{.bus = s_worker(e->cfg, "w1", "index", 100)},
                        {.bus = s_worker(e->cfg, "w2", "index", 100)}};
    s_wait_workers(prod, ws, 2, 2);

    enum { N = 40 };
    for (int i = 0; i < N; i++)
        s_submit(prod, "index", 1001 + i);
    assert_int_equal(s_collect(ws, 2, N, 5000), N);
    assert_int_equal(s_collect(ws, 2, 0, 300), 0); /* nothing more: no duplicate */
    int seen[N] = {0};
    for (int w = 0; w < 2; w++) {
        for (int k = 0; k < ws[w].got; k++) {
            int64_t id = ws[w].ids[k];
            assert_true(id >= 1001 && id < 1001 + N);
            seen[id - 1001]++;
            assert_int_equal(ws[w].attempts[k], 0);
        }
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    /* both idle with equal credit: the broker alternates */
    assert_true(ws[0].got >= N / 4 && ws[1].got >= N / 4);

    json_t *st = s_stats(prod);
    assert_int_equal(s_queue_field(st, "index", "queued"), 0);
    assert_int_equal(s_queue_field(st, "index", "inflight"), N);
    json_decref(st);
    for (int w = 0; w < 2; w++)
        for (int k = 0; k < ws[w].got; k++)
            assert_int_equal(kp_bus_job_done(ws[w].bus, ws[w].ids[k], true), 0);
    /* DONE is processed asynchronously: poll the stats */
    int64_t deadline = s_now_ms() + 3000;
    long inflight;
    do {
        s_collect(ws, 2, 0, 20);
        st = s_stats(prod);
        inflight = s_queue_field(st, "index", "inflight");
        json_decref(st);
    } while (inflight && s_now_ms() < deadline);
    assert_int_equal(inflight, 0);
    kp_bus_destroy(&ws[0].bus);
    kp_bus_destroy(&ws[1].bus);
    kp_bus_destroy(&prod);
    assert_null(prod);
    kp_bus_destroy(&prod); /* idempotent */
}

/* One worker takes jobs then disappears (destroyed, or just silent): the other gets them with
 * attempt + 1. */
static void s_lost_worker(s_env_t *e, bool destroy)
{
    kp_bus_t *prod = kp_bus_new(e->cfg, "test-producer");
    s_worker_t ws[2] = {{.bus = s_worker(e->cfg, "doomed", "index", 100)}, {0}};
    s_wait_workers(prod, ws, 1, 1);
    for (int i = 0; i < 5; i++)
        s_submit(prod, "index", 2001 + i);
    assert_int_equal(s_collect(ws, 1, 5, 3000), 5);
    ws[1].bus = s_worker(e->cfg, "survivor", "index", 100);
    s_wait_workers(prod, ws, 2, 2);
    s_worker_t *survivor = &ws[1];
    if (destroy) kp_bus_destroy(&ws[0].bus);
    /* silent: ws[0] is simply not pumped any more (its socket stays open) */
    assert_int_equal(s_collect(survivor, 1, 5, 3000), 5);
    for (int k = 0; k < 5; k++) {
        assert_int_equal(survivor->ids[k], 2001 + k); /* order kept */
        assert_int_equal(survivor->attempts[k], 1);
    }
    json_t *st = s_stats(prod);
    assert_int_equal(json_array_size(json_object_get(st, "workers")), 1);
    json_decref(st);
    kp_bus_destroy(&ws[0].bus);
    kp_bus_destroy(&ws[1].bus);
    kp_bus_destroy(&prod);
}

static void test_destroyed_worker_jobs_redispatched(void **state)
{
    s_lost_worker(*state, true);
}
static void test_silent_worker_jobs_redispatched(void **state)
{
    s_lost_worker(*state, false);
}

static void test_duplicate_submit_ignored(void **state)
{
    s_env_t *e = *state;
    kp_bus_t *prod = kp_bus_new(e->cfg, "test-producer");
    /* queued duplicates (no worker for "dup" yet) */
    s_submit(prod, "dup", 7);
    s_submit(prod, "dup", 7);
    s_submit(prod, "dup", 8);
    json_t *st = s_stats(prod); /* same connection: answered after the SUBMITs */
    assert_int_equal(s_queue_field(st, "dup", "queued"), 2);
    json_decref(st);
    s_worker_t w = {.bus = s_worker(e->cfg, "dupw", "dup", 10)};
    assert_int_equal(s_collect(&w, 1, 2, 3000), 2);
    /* an in-flight duplicate */
    s_submit(prod, "dup", 7);
    assert_int_equal(s_collect(&w, 1, 0, 400), 0);
    st = s_stats(prod);
    assert_int_equal(s_queue_field(st, "dup", "queued"), 0);
    assert_int_equal(s_queue_field(st, "dup", "inflight"), 2);
    json_decref(st);
    /* once done, the same id is a new delivery (the outbox sweep relies on that) */
    assert_int_equal(kp_bus_job_done(w.bus, 7, true), 0);
    s_collect(&w, 1, 0, 100);
    s_submit(prod, "dup", 7);
    assert_int_equal(s_collect(&w, 1, 1, 3000), 1);
    assert_int_equal(w.ids[2], 7);
    kp_bus_destroy(&w.bus);
    kp_bus_destroy(&prod);
}

static void test_events_reach_subscriber(void **state)
{
    s_env_t *e = *state;
    kp_bus_sub_t *sub = kp_bus_subscribe(e->cfg, "study.");
    assert_non_null(sub);
    assert_true(kp_bus_sub_fd(sub) >= 0);
    kp_bus_t *pub = kp_bus_new(e->cfg, "test-publisher");
    kp_msg_t ev, other, got;
    assert_int_equal(kp_msg_init(&ev, "study.changed", 0, json_pack("{s:s}", "study", "1.2.3.4")),
                     0);
    assert_int_equal(kp_msg_init(&other, "audit.login", 0, NULL), 0);
    /* PUB/SUB drops what is sent before the subscription reached the publisher: repeat */
    int64_t deadline = s_now_ms() + 5000;
    int rc = KP_ETIMEOUT;
    while (rc == KP_ETIMEOUT && s_now_ms() < deadline) {
        assert_int_equal(kp_bus_publish(pub, &other), 0);
        assert_int_equal(kp_bus_publish(pub, &ev), 0);
        rc = kp_bus_sub_recv(sub, &got, 50);
    }
    assert_int_equal(rc, 0);
    assert_string_equal(got.type, "study.changed");
    assert_string_equal(json_string_value(json_object_get(got.payload, "study")), "1.2.3.4");
    kp_msg_clear(&got);
    /* the prefix filter holds: only study.* arrives */
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kp_bus_publish(pub, &other), 0);
        assert_int_equal(kp_bus_publish(pub, &ev), 0);
    }
    int n = 0;
    while (kp_bus_sub_recv(sub, &got, 200) == 0) {
        assert_string_equal(got.type, "study.changed");
        kp_msg_clear(&got);
        n++;
    }
    assert_true(n >= 5);
    assert_int_equal(kp_bus_sub_recv(sub, &got, 0), KP_ETIMEOUT);
    kp_msg_clear(&ev);
    kp_msg_clear(&other);
    kp_bus_destroy(&pub);
    kp_bus_sub_destroy(&sub);
    assert_null(sub);
}

static void test_stats(void **state)
{
    s_env_t *e = *state;
    kp_bus_t *admin = kp_bus_new(e->cfg, "pacsctl");
    json_t *st = s_stats(admin);
    assert_true(json_is_object(json_object_get(st, "queues")));
    assert_int_equal(json_array_size(json_object_get(st, "workers")), 0);
    json_decref(st);
    s_worker_t w = {.bus = s_worker(e->cfg, "statw", "index", 7)};
    s_wait_workers(admin, &w, 1, 1);
    s_submit(admin, "index", 31);
    assert_int_equal(s_collect(&w, 1, 1, 3000), 1);
    st = s_stats(admin);
    json_t *wk = json_array_get(json_object_get(st, "workers"), 0);
    const char *name = json_string_value(json_object_get(wk, "name"));
    assert_non_null(name);
    assert_non_null(strstr(name, ":statw"));
    assert_string_equal(json_string_value(json_array_get(json_object_get(wk, "types"), 0)),
                        "index");
    assert_int_equal(json_integer_value(json_object_get(wk, "credit")), 6);
    assert_int_equal(json_integer_value(json_object_get(wk, "inflight")), 1);
    assert_true(json_integer_value(json_object_get(wk, "last_seen_ms")) < 1000);
    assert_int_equal(s_queue_field(st, "index", "inflight"), 1);
    json_decref(st);
    /* a worker bus cannot ask for stats (its replies would mix with jobs) */
    assert_int_equal(kp_bus_stats(w.bus, &st, 100), KP_EINVAL);
    kp_bus_destroy(&w.bus);
    kp_bus_destroy(&admin);
}

static void test_job_timeout_redispatch(void **state)
{
    s_env_t *e = *state; /* bus.job_timeout = 1 s, jobs.max_attempts = 2 */
    kp_bus_t *prod = kp_bus_new(e->cfg, "test-producer");
    s_worker_t w = {.bus = s_worker(e->cfg, "slow", "index", 5)};
    s_wait_workers(prod, &w, 1, 1);
    s_submit(prod, "index", 77);
    assert_int_equal(s_collect(&w, 1, 1, 3000), 1);
    /* not done within 1 s: the same job comes again, attempt 1 */
    assert_int_equal(s_collect(&w, 1, 1, 3000), 1);
    assert_int_equal(w.ids[1], 77);
    assert_int_equal(w.attempts[0], 0);
    assert_int_equal(w.attempts[1], 1);
    /* after max_attempts deliveries the broker gives up (the outbox sweep takes over) */
    assert_int_equal(s_collect(&w, 1, 0, 1800), 0);
    json_t *st = s_stats(prod);
    assert_int_equal(s_queue_field(st, "index", "queued"), 0);
    assert_int_equal(s_queue_field(st, "index", "inflight"), 0);
    json_decref(st);
    kp_bus_destroy(&w.bus);
    kp_bus_destroy(&prod);
}

static void test_restart_worker_reconnects(void **state)
{
    s_env_t *e = *state;
    kp_bus_t *prod = kp_bus_new(e->cfg, "test-producer");
    s_worker_t w = {.bus = s_worker(e->cfg, "phoenix", "index", 10)};
    s_wait_workers(prod, &w, 1, 1);
    s_kill_busd(e);
    assert_int_equal(s_collect(&w, 1, 0, 500), 0); /* the worker notices the silence */
    s_start_busd(e);
    /* the submit may be swallowed by a connection that is not yet known dead: repeat it
     * (the broker de-duplicates) until the reconnected worker receives the job */
    kp_msg_t zero = {0};
    assert_int_equal(kp_bus_submit(prod, &zero), KP_EINVAL); /* a job needs its outbox id */
    int64_t deadline = s_now_ms() + 8000;
    int got = 0;
    while (!got && s_now_ms() < deadline) {
        kp_msg_t m;
        s_job(&m, "index", 901);
        (void)kp_bus_submit(prod, &m);
        kp_msg_clear(&m);
        got = s_collect(&w, 1, 1, 200);
    }
    assert_int_equal(got, 1);
    assert_int_equal(w.ids[0], 901);
    kp_bus_destroy(&w.bus);
    kp_bus_destroy(&prod);
}

/* Garbage straight on the ROUTER: every message is dropped with a log line, the broker lives. */
static void test_malformed_input_survives(void **state)
{
    s_env_t *e = *state;
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    assert_int_equal(zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero), 0);
    assert_int_equal(zmq_connect(s, e->jobs), 0);
    const char garbage[] = "\xdf\xff\xff\xff\xff\x01\x02";
    assert_true(zmq_send(s, "SUBMIT", 6, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, garbage, sizeof garbage, 0) >= 0);
    assert_true(zmq_send(s, "READY", 5, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, "\x81\xa5types\x90", 8, 0) >= 0); /* no types */
    assert_true(zmq_send(s, "DONE", 4, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, "\x80", 1, 0) >= 0);
    assert_true(zmq_send(s, "NOPE", 4, 0) >= 0);
    assert_true(zmq_send(s, "", 0, 0) >= 0);
    assert_true(zmq_send(s, "AN-OVERLONG-COMMAND-NAME", 24, 0) >= 0);
    for (int i = 0; i < 4; i++)
        assert_true(zmq_send(s, "x", 1, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, "x", 1, 0) >= 0);
    /* an envelope of version 2 */
    kp_msg_t m;
    s_job(&m, "index", 5);
    m.v = 2;
    char *buf;
    size_t len;
    assert_int_equal(kp_msg_encode(&m, &buf, &len), 0);
    assert_true(zmq_send(s, "SUBMIT", 6, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, buf, len, 0) >= 0);
    free(buf);
    kp_msg_clear(&m);
    /* then STATS on the same connection still answers, with nothing queued */
    assert_true(zmq_send(s, "STATS", 5, ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(s, "", 0, 0) >= 0);
    zmq_pollitem_t it = {s, 0, ZMQ_POLLIN, 0};
    assert_int_equal(zmq_poll(&it, 1, 3000), 1);
    char cmd[16];
    int n = zmq_recv(s, cmd, sizeof cmd, 0);
    assert_int_equal(n, 5);
    assert_memory_equal(cmd, "STATS", 5);
    zmq_msg_t body;
    zmq_msg_init(&body);
    assert_true(zmq_msg_recv(&body, s, 0) >= 0);
    json_t *st = NULL;
    assert_int_equal(kp_msg_decode_map(zmq_msg_data(&body), zmq_msg_size(&body), &st), 0);
    zmq_msg_close(&body);
    assert_int_equal(json_object_size(json_object_get(st, "queues")), 0);
    assert_int_equal(json_array_size(json_object_get(st, "workers")), 0);
    json_decref(st);
    zmq_close(s);
    zmq_ctx_term(ctx);
    assert_int_equal(kill(e->pid, 0), 0); /* still running */
}

static void test_second_broker_refused(void **state)
{
    s_env_t *e = *state;
    /* wait until the first broker is up, then a second one on the same paths must refuse */
    kp_bus_t *prod = kp_bus_new(e->cfg, "probe");
    json_t *st = s_stats(prod);
    json_decref(st);
    kp_bus_destroy(&prod);
    s_env_t second = *e;
    s_start_busd(&second);
    int status = 0;
    assert_int_equal(waitpid(second.pid, &status, 0), second.pid);
    s_child = e->pid;
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 1);
    prod = kp_bus_new(e->cfg, "probe");
    st = s_stats(prod); /* the first one still answers */
    json_decref(st);
    kp_bus_destroy(&prod);
}

static void test_sighup_reload_keeps_running(void **state)
{
    s_env_t *e = *state;
    kp_bus_t *admin = kp_bus_new(e->cfg, "pacsctl");
    json_t *st = s_stats(admin);
    json_decref(st);
    assert_int_equal(kill(e->pid, SIGHUP), 0);
    s_sleep_ms(50);
    st = s_stats(admin);
    json_decref(st);
    kp_bus_destroy(&admin);
}

int main(void)
{
    signal(SIGALRM, s_on_alarm);
    signal(SIGPIPE, SIG_IGN);
    kp_log_init("test_broker");
    kp_log_set_level(getenv("KP_TEST_VERBOSE") ? "debug" : "error");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_jobs_exactly_once_and_balanced, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_destroyed_worker_jobs_redispatched, s_setup,
                                        s_teardown),
        cmocka_unit_test_setup_teardown(test_silent_worker_jobs_redispatched, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_submit_ignored, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_events_reach_subscriber, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_stats, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_job_timeout_redispatch, s_setup_timeout, s_teardown),
        cmocka_unit_test_setup_teardown(test_restart_worker_reconnects, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_malformed_input_survives, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_second_broker_refused, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_sighup_reload_keeps_running, s_setup, s_teardown),
    };
    return cmocka_run_group_tests_name("bus/pacs-busd", tests, NULL, NULL);
}
