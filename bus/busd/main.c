/* pacs-busd: the message broker of Klinika PACS (ARCHITECTURE sections 2-4).
 *
 * One thread, one zmq_poll loop over four sockets: the jobs ROUTER (bus.jobs_endpoint, served
 * by kp_broker), the event XSUB (bus.events_in, where publishers connect) and XPUB
 * (bus.events_out, where subscribers connect), forwarded both ways like zmq_proxy (messages
 * down, subscriptions up), and the pipe from the outbox sweep thread (kp_sweep). SIGINT and
 * SIGTERM end the loop cleanly; SIGHUP re-reads the configuration file for the log level. The
 * database is optional for brokering: when it is down only the sweep waits. */
#include "kp_broker.h"
#include "kp_sweep.h"
#include "kp_zap.h"

#include "kp_config.h"
#include "kp_curve.h"
#include "kp_errors.h"
#include "kp_log.h"
#include "kp_msg.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#define S_HWM 10000

static volatile sig_atomic_t s_terminate = 0;
static volatile sig_atomic_t s_reload = 0;

static void s_on_signal(int sig)
{
    if (sig == SIGHUP)
        s_reload = 1;
    else
        s_terminate = 1;
}

static int s_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal; /* no SA_RESTART: zmq_poll returns EINTR at once */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) || sigaction(SIGTERM, &sa, NULL) ||
        sigaction(SIGHUP, &sa, NULL))
        return -1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

static void s_reload_config(const kp_config_t *cfg, kp_zap_t *zap)
{
    if (zap) (void)kp_zap_reload(zap);
    kp_config_t *n = kp_config_new();
    char err[512];
    if (!n) abort();
    /* kp_config_load sets the log level only when the whole file is valid. */
    if (kp_config_load(n, cfg->path, err, sizeof err))
        kp_warn("busd", "reload failed, keeping the current settings: %s", err);
    else
        kp_info("busd", "configuration reloaded (log level %s; other bus settings need a restart)",
                n->log_level);
    kp_config_destroy(&n);
}

/* For an ipc:// endpoint: creates its directory and refuses a path where a live broker
 * listens (binding would silently steal its socket file: ZeroMQ unlinks it first). A stale file
 * left by a killed broker is fine, ZeroMQ replaces it. 0 or -1 (logged). */
static int s_prepare_ipc(const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) != 0) return 0;
    const char *path = endpoint + 6;
    if (path[0] == '@' || path[0] == 0) return 0; /* abstract namespace: no file */
    char dir[4096];
    if (strlen(path) >= sizeof dir) {
        kp_error("busd", "ipc path too long: %s", path);
        return -1;
    }
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        for (char *p = dir + 1; *p; p++) {
            if (*p != '/') continue;
            *p = 0;
            if (mkdir(dir, 0750) && errno != EEXIST) goto mkdir_failed;
            *p = '/';
        }
        if (mkdir(dir, 0750) && errno != EEXIST) goto mkdir_failed;
    }
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) {
        kp_error("busd", "ipc path longer than %zu bytes: %s", sizeof sa.sun_path - 1, path);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0) {
        int live = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
        close(fd);
        if (live) {
            kp_error("busd", "another broker is already listening on %s", endpoint);
            return -1;
        }
    }
    return 0;
mkdir_failed:
    kp_error("busd", "cannot create directory %s for %s: %s", dir, endpoint, strerror(errno));
    return -1;
}

static void *s_bind(void *ctx, int type, const char *endpoint, const char *what,
                    const kp_curve_t *curve)
{
    int zero = 0, one = 1, hwm = S_HWM;
    int64_t maxmsg = KP_MSG_MAX_SIZE;
    void *sock = zmq_socket(ctx, type);
    if (!sock) {
        kp_error("busd", "cannot create the %s socket: %s", what, zmq_strerror(zmq_errno()));
        return NULL;
    }
    if (zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm) ||
        zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof hwm) ||
        zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) ||
        (type == ZMQ_ROUTER && zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one))) {
        kp_error("busd", "cannot set %s socket options: %s", what, zmq_strerror(zmq_errno()));
        goto error;
    }
    if (kp_curve_apply_server(sock, curve)) {
        kp_error("busd", "cannot set CurveZMQ keys on the %s socket: %s", what,
                 zmq_strerror(zmq_errno()));
        goto error;
    }
    if (s_prepare_ipc(endpoint)) goto error;
    if (zmq_bind(sock, endpoint)) {
        kp_error("busd", "cannot bind the %s socket to %s: %s (hint: check bus.* in the config)",
                 what, endpoint, zmq_strerror(zmq_errno()));
        goto error;
    }
    return sock;
error:
    zmq_close(sock);
    return NULL;
}

/* Removes the socket file of an ipc:// endpoint we bound (ZeroMQ 4.3 leaves it behind). */
static void s_unlink_ipc(const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) == 0 && endpoint[6] != '@' && endpoint[6] != 0)
        unlink(endpoint + 6);
}

/* Moves whole messages from one socket to the other (events down, subscriptions up). A
 * message the destination refuses is dropped whole. */
static void s_forward(void *from, void *to)
{
    for (int n = 0; n < 1000; n++) {
        bool dropping = false;
        int frames = 0;
        for (;;) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, from, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                if (frames == 0) return;
                break;
            }
            frames++;
            int more = zmq_msg_more(&m);
            if (!dropping && zmq_msg_send(&m, to, (more ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) >= 0) {
                /* sent: m now empty */
            } else {
                dropping = true;
                zmq_msg_close(&m);
            }
            if (!more) break;
        }
    }
}

/* Reads the SUBMITs queued by the sweep thread, and tells it which of those jobs the broker
 * already held (queued or in flight), so that it gives their attempt back (kp_sweep.h). */
static void s_read_sweep(void *pipe, kp_broker_t *broker)
{
    int64_t held[KP_SWEEP_HELD_MAX];
    size_t nheld = 0, fresh = 0;
    for (int n = 0; n < KP_SWEEP_HELD_MAX; n++) {
        zmq_msg_t cmd, body;
        zmq_msg_init(&cmd);
        zmq_msg_init(&body);
        if (zmq_msg_recv(&cmd, pipe, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&cmd);
            zmq_msg_close(&body);
            break;
        }
        if (zmq_msg_more(&cmd) && zmq_msg_recv(&body, pipe, ZMQ_DONTWAIT) >= 0) {
            int64_t id;
            int rc = kp_broker_submit(broker, zmq_msg_data(&body), zmq_msg_size(&body),
                                      "outbox sweep", &id);
            /* held already (1), or not taken because the broker is full (back-pressure):
             * neither is a real publication, so the attempt is given back */
            if ((rc == 1 || rc == KP_EAGAIN) && id > 0) held[nheld++] = id;
            if (rc == 0) fresh++;
        }
        zmq_msg_close(&cmd);
        zmq_msg_close(&body);
    }
    if (fresh)
        kp_info("busd", "%zu job(s) not done within their lease queued again by the outbox sweep",
                fresh);
    /* Best effort: when the sweep's inbound queue is full the attempts simply stay counted. */
    if (nheld &&
        zmq_send(pipe, KP_SWEEP_HELD, strlen(KP_SWEEP_HELD), ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        (void)zmq_send(pipe, held, nheld * sizeof *held, ZMQ_DONTWAIT);
}

int main(int argc, char **argv)
{
    int status = 1;
    bool exit_now = false, term_ctx = true;
    void *ctx = NULL, *router = NULL, *xsub = NULL, *xpub = NULL, *pipe = NULL;
    kp_broker_t *broker = NULL;
    kp_sweep_t *sweep = NULL;
    kp_zap_t *zap = NULL;
    kp_config_t *cfg = kp_config_from_args(argc, argv, "pacs-busd", &exit_now, NULL);
    if (!cfg) return exit_now ? 0 : 1;
    if (exit_now) {
        status = 0;
        goto error;
    }
    if (s_signals()) {
        kp_error("busd", "cannot install signal handlers: %s", strerror(errno));
        goto error;
    }
    if (!(ctx = zmq_ctx_new())) {
        kp_error("busd", "cannot create a ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        goto error;
    }
    zmq_ctx_set(ctx, ZMQ_BLOCKY, 0);
    kp_curve_t curve;
    if (kp_curve_server(cfg, &curve)) goto error;
    if (cfg->bus_curve_clients_file[0]) {
        if (!curve.on) {
            kp_error("busd", "bus.curve_clients_file is set but bus.curve is off: the client "
                             "list needs CurveZMQ (set bus.curve = true)");
            goto error;
        }
        /* before the sockets bind, so that no handshake ever goes unchecked */
        if (!(zap = kp_zap_start(ctx, cfg->bus_curve_clients_file))) goto error;
    }
    if (!(router = s_bind(ctx, ZMQ_ROUTER, cfg->bus_jobs_endpoint, "jobs", &curve))) goto error;
    if (!(xsub = s_bind(ctx, ZMQ_XSUB, cfg->bus_events_in, "events-in", &curve))) goto error;
    if (!(xpub = s_bind(ctx, ZMQ_XPUB, cfg->bus_events_out, "events-out", &curve))) goto error;
    broker = kp_broker_new(router, cfg);
    if (!(sweep = kp_sweep_start(ctx, cfg, &pipe))) goto error;
    kp_info("busd", "brokering jobs on %s, events %s -> %s (heartbeat %ld ms x %ld)%s",
            cfg->bus_jobs_endpoint, cfg->bus_events_in, cfg->bus_events_out, cfg->bus_heartbeat_ms,
            cfg->bus_heartbeat_liveness, curve.on ? ", CurveZMQ on" : "");
    memset(curve.secret_key, 0, sizeof curve.secret_key);

    while (!s_terminate) {
        if (s_reload) {
            s_reload = 0;
            s_reload_config(cfg, zap);
        }
        int timeout = kp_broker_tick(broker);
        zmq_pollitem_t items[] = {
            {router, 0, ZMQ_POLLIN, 0},
            {xsub, 0, ZMQ_POLLIN, 0},
            {xpub, 0, ZMQ_POLLIN, 0},
            {pipe, 0, ZMQ_POLLIN, 0},
            {zap ? kp_zap_socket(zap) : NULL, 0, ZMQ_POLLIN, 0},
        };
        if (zmq_poll(items, zap ? 5 : 4, timeout) < 0) {
            if (zmq_errno() == EINTR) continue;
            kp_error("busd", "poll failed: %s", zmq_strerror(zmq_errno()));
            goto error;
        }
        if (items[0].revents & ZMQ_POLLIN) kp_broker_read(broker);
        if (items[1].revents & ZMQ_POLLIN) s_forward(xsub, xpub);
        if (items[2].revents & ZMQ_POLLIN) s_forward(xpub, xsub);
        if (items[3].revents & ZMQ_POLLIN) s_read_sweep(pipe, broker);
        if (zap && (items[4].revents & ZMQ_POLLIN)) kp_zap_handle(zap);
    }
    kp_info("busd", "terminating");
    status = 0;
error:
    if (sweep && !kp_sweep_stop(&sweep, 2000)) term_ctx = false;
    kp_broker_destroy(&broker);
    if (router) {
        zmq_close(router);
        s_unlink_ipc(cfg->bus_jobs_endpoint);
    }
    if (xsub) {
        zmq_close(xsub);
        s_unlink_ipc(cfg->bus_events_in);
    }
    if (xpub) {
        zmq_close(xpub);
        s_unlink_ipc(cfg->bus_events_out);
    }
    kp_zap_stop(&zap);
    /* With the sweep thread stuck in libpq its socket is still open and zmq_ctx_term would
     * wait for it: leave the context to process exit instead. */
    if (ctx && term_ctx) zmq_ctx_term(ctx);
    kp_config_destroy(&cfg);
    return status;
}
