/* kp_zap: the broker's CurveZMQ client allow-list (see kp_zap.h).
 *
 * ZAP (ZeroMQ RFC 27): libzmq sends each handshake to the REP socket bound at
 * inproc://zeromq.zap.01 in the same context as [version "1.0"][request id][domain][address]
 * [routing id][mechanism] + the mechanism's credentials (for CURVE, the client's 32-byte public
 * key), and waits for [version][request id][status "200"|"400"|...][status text][user id]
 * [metadata]. The broker's poll loop answers; the handshake waits meanwhile, which is fine: the
 * answer is a lookup in a short list. */
#include "kp_zap.h"

#include "kp_curve.h"
#include "kp_log.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define S_MAX_KEYS   4096
#define S_MAX_FILE   (1 << 20)
#define S_LOG_SLOTS  64
#define S_LOG_PERIOD 60

struct kp_zap {
    void *rep;
    char *path;
    unsigned char (*keys)[32];
    size_t nkeys;
    struct {
        unsigned char key[32];
        time_t at;
    } logged[S_LOG_SLOTS]; /* refusals already logged recently */
    size_t next_slot;
};

static char *s_trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = 0;
    return s;
}

int kp_zap_parse(const char *text, unsigned char (*keys)[32], size_t max, int *bad_line)
{
    size_t n = 0;
    int line = 0;
    const char *p = text;
    *bad_line = 0;
    while (*p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        line++;
        char buf[256];
        if (len >= sizeof buf) goto bad;
        memcpy(buf, p, len);
        buf[len] = 0;
        /* Z85 uses '#' and '=' too: a comment is a line starting with '#', or '#' after the
         * key and a blank */
        char *s = s_trim(buf);
        if (*s == '#' || !*s) {
            p = e ? e + 1 : p + len;
            continue;
        }
        if (!strncmp(s, "public", 6) && (s[6] == ' ' || s[6] == '\t' || s[6] == '=')) {
            s = s_trim(s + 6); /* "public = KEY", as in a key file */
            if (*s != '=') goto bad;
            s = s_trim(s + 1);
        } else if (!strncmp(s, "secret", 6)) {
            goto bad; /* a whole key file pasted: the broker must never hold client secrets */
        }
        if (strlen(s) < KP_CURVE_KEY_LEN || n >= max) goto bad;
        char *rest = s + KP_CURVE_KEY_LEN;
        if (*rest && *rest != ' ' && *rest != '\t') goto bad;
        rest = s_trim(rest);
        if (*rest && *rest != '#') goto bad;
        s[KP_CURVE_KEY_LEN] = 0;
        if (!zmq_z85_decode(keys[n], s)) goto bad;
        n++;
        p = e ? e + 1 : p + len;
    }
    return (int)n;
bad:
    *bad_line = line;
    return -1;
}

/* Loads the file into a new array. 0 or -1 (logged). */
static int s_load(const char *path, unsigned char (**out)[32], size_t *nout)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        kp_error("busd", "cannot read bus.curve_clients_file %s: %s", path, strerror(errno));
        return -1;
    }
    char *text = malloc(S_MAX_FILE + 1);
    if (!text) abort();
    size_t len = fread(text, 1, S_MAX_FILE + 1, f);
    fclose(f);
    if (len > S_MAX_FILE) {
        kp_error("busd", "%s is larger than 1 MiB", path);
        free(text);
        return -1;
    }
    text[len] = 0;
    unsigned char(*keys)[32] = calloc(S_MAX_KEYS, 32);
    if (!keys) abort();
    int bad, n = kp_zap_parse(text, keys, S_MAX_KEYS, &bad);
    free(text);
    if (n < 0) {
        kp_error("busd",
                 "%s line %d: expected a client's public key (\"public = <40 Z85 characters>\" "
                 "or the bare key; never a secret line)",
                 path, bad);
        free(keys);
        return -1;
    }
    if (n == 0) {
        kp_error("busd", "%s lists no client key: no worker could connect", path);
        free(keys);
        return -1;
    }
    *out = keys;
    *nout = (size_t)n;
    return 0;
}

kp_zap_t *kp_zap_start(void *ctx, const char *clients_file)
{
    kp_zap_t *z = calloc(1, sizeof *z);
    if (!z) abort();
    z->path = strdup(clients_file);
    if (!z->path) abort();
    if (s_load(clients_file, &z->keys, &z->nkeys)) goto error;
    int zero = 0;
    if (!(z->rep = zmq_socket(ctx, ZMQ_REP)) ||
        zmq_setsockopt(z->rep, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_bind(z->rep, "inproc://zeromq.zap.01")) {
        kp_error("busd", "cannot start the CurveZMQ authenticator: %s", zmq_strerror(zmq_errno()));
        goto error;
    }
    kp_info("busd", "CurveZMQ clients restricted to the %zu key(s) in %s", z->nkeys, z->path);
    return z;
error:
    kp_zap_stop(&z);
    return NULL;
}

void *kp_zap_socket(kp_zap_t *z)
{
    return z->rep;
}

size_t kp_zap_reload(kp_zap_t *z)
{
    unsigned char(*keys)[32] = NULL;
    size_t n = 0;
    if (s_load(z->path, &keys, &n)) {
        kp_warn("busd", "keeping the %zu client key(s) loaded before", z->nkeys);
        return z->nkeys;
    }
    free(z->keys);
    z->keys = keys;
    z->nkeys = n;
    kp_info("busd", "CurveZMQ client list reloaded: %zu key(s)", n);
    return n;
}

static bool s_known(const kp_zap_t *z, const unsigned char *key)
{
    for (size_t i = 0; i < z->nkeys; i++)
        if (!memcmp(z->keys[i], key, 32)) return true;
    return false;
}

/* Logs a refusal unless the same key was logged within the last minute. */
static void s_log_refusal(kp_zap_t *z, const unsigned char *key, const char *address,
                          const char *why)
{
    time_t now = time(NULL);
    if (key) {
        for (size_t i = 0; i < S_LOG_SLOTS; i++)
            if (z->logged[i].at && now - z->logged[i].at < S_LOG_PERIOD &&
                !memcmp(z->logged[i].key, key, 32))
                return;
        memcpy(z->logged[z->next_slot].key, key, 32);
        z->logged[z->next_slot].at = now;
        z->next_slot = (z->next_slot + 1) % S_LOG_SLOTS;
    }
    char z85[KP_CURVE_KEY_LEN + 1] = "-";
    if (key) zmq_z85_encode(z85, key, 32);
    kp_warn("busd",
            "refused a bus client from %s: %s (public key %s; to admit it, add the key to "
            "bus.curve_clients_file and send SIGHUP)",
            address, why, z85);
}

#define S_FRAMES 7

void kp_zap_handle(kp_zap_t *z)
{
    for (int round = 0; round < 100; round++) {
        zmq_msg_t f[S_FRAMES + 1];
        int n = 0, more = 1;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, z->rep, n ? 0 : ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                if (n == 0) return;
                break;
            }
            more = zmq_msg_more(&m);
            if (n < S_FRAMES + 1)
                f[n++] = m;
            else
                zmq_msg_close(&m);
        }
        /* version, request id, domain, address, routing id, mechanism, key */
        const char *status = "400", *text = "refused";
        char address[64] = "?", mech[16] = "";
        if (n > 3)
            snprintf(address, sizeof address, "%.*s", (int)zmq_msg_size(&f[3]),
                     (const char *)zmq_msg_data(&f[3]));
        if (n > 5)
            snprintf(mech, sizeof mech, "%.*s", (int)zmq_msg_size(&f[5]),
                     (const char *)zmq_msg_data(&f[5]));
        bool well_formed = n == S_FRAMES && zmq_msg_size(&f[0]) == 3 &&
                           !memcmp(zmq_msg_data(&f[0]), "1.0", 3) && !strcmp(mech, "CURVE") &&
                           zmq_msg_size(&f[6]) == 32;
        if (!well_formed) {
            s_log_refusal(z, NULL, address, "not a CURVE handshake");
        } else if (s_known(z, zmq_msg_data(&f[6]))) {
            status = "200";
            text = "OK";
        } else {
            s_log_refusal(z, zmq_msg_data(&f[6]), address, "public key not in the client list");
        }
        /* the reply must echo the request id */
        zmq_send(z->rep, "1.0", 3, ZMQ_SNDMORE);
        if (n > 1)
            zmq_send(z->rep, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
        else
            zmq_send(z->rep, "", 0, ZMQ_SNDMORE);
        zmq_send(z->rep, status, 3, ZMQ_SNDMORE);
        zmq_send(z->rep, text, strlen(text), ZMQ_SNDMORE);
        zmq_send(z->rep, "", 0, ZMQ_SNDMORE);
        zmq_send(z->rep, "", 0, 0);
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
    }
}

void kp_zap_stop(kp_zap_t **zp)
{
    if (!zp || !*zp) return;
    kp_zap_t *z = *zp;
    if (z->rep) zmq_close(z->rep);
    free(z->keys);
    free(z->path);
    free(z);
    *zp = NULL;
}
