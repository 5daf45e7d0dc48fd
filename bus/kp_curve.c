/* kp_curve: CurveZMQ keys and socket options (see kp_curve.h). */
#include "kp_curve.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

static bool s_valid_key(const char *k)
{
    if (!k || strlen(k) != KP_CURVE_KEY_LEN) return false;
    uint8_t bin[32];
    return zmq_z85_decode(bin, k) != NULL;
}

int kp_curve_load(const char *path, char public_out[KP_CURVE_KEY_LEN + 1],
                  char secret_out[KP_CURVE_KEY_LEN + 1])
{
    FILE *f = fopen(path, "r");
    if (!f) {
        kp_error("bus", "cannot read the key file %s: %s", path, strerror(errno));
        return KP_ECONFIG;
    }
    char line[256], pub[KP_CURVE_KEY_LEN + 1] = "", sec[KP_CURVE_KEY_LEN + 1] = "";
    while (fgets(line, sizeof line, f)) {
        char key[16], val[128];
        if (sscanf(line, " %15[a-z] = %127s", key, val) != 2) continue;
        if (!strcmp(key, "public") && strlen(val) == KP_CURVE_KEY_LEN) memcpy(pub, val, sizeof pub);
        if (!strcmp(key, "secret") && strlen(val) == KP_CURVE_KEY_LEN) memcpy(sec, val, sizeof sec);
    }
    fclose(f);
    if ((public_out && !s_valid_key(pub)) || (secret_out && !s_valid_key(sec))) {
        kp_error("bus", "%s does not hold a valid CurveZMQ key pair (hint: pacsctl bus keygen)",
                 path);
        return KP_ECONFIG;
    }
    if (public_out) memcpy(public_out, pub, KP_CURVE_KEY_LEN + 1);
    if (secret_out) memcpy(secret_out, sec, KP_CURVE_KEY_LEN + 1);
    return 0;
}

int kp_curve_keygen(const char *path, char public_out[KP_CURVE_KEY_LEN + 1])
{
    char pub[KP_CURVE_KEY_LEN + 1], sec[KP_CURVE_KEY_LEN + 1];
    if (zmq_curve_keypair(pub, sec)) {
        kp_error("bus", "cannot make a CurveZMQ key pair: %s", zmq_strerror(zmq_errno()));
        return KP_EINTERNAL;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        kp_error("bus", "cannot create %s: %s", path, strerror(errno));
        return KP_EIO;
    }
    char text[256];
    int n = snprintf(text, sizeof text,
                     "# CurveZMQ key pair for the Klinika PACS bus. Keep the secret key private.\n"
                     "public = %s\nsecret = %s\n",
                     pub, sec);
    int rc = write(fd, text, (size_t)n) == n && fsync(fd) == 0 ? 0 : KP_EIO;
    close(fd);
    memset(sec, 0, sizeof sec);
    if (rc) {
        unlink(path);
        return rc;
    }
    memcpy(public_out, pub, sizeof pub);
    return 0;
}

static int s_check_curve(void)
{
    if (!zmq_has("curve")) {
        kp_error("bus", "bus.curve is on but this libzmq has no CURVE support");
        return KP_ECONFIG;
    }
    return 0;
}

int kp_curve_client(const kp_config_t *cfg, kp_curve_t *out)
{
    memset(out, 0, sizeof *out);
    if (!cfg->bus_curve) return 0;
    if (s_check_curve()) return KP_ECONFIG;
    if (!s_valid_key(cfg->bus_curve_server_public)) {
        kp_error("bus", "bus.curve is on but bus.curve_server_public is not a 40-character Z85 "
                        "key (hint: the public line of the broker's key file)");
        return KP_ECONFIG;
    }
    memcpy(out->server_public, cfg->bus_curve_server_public, KP_CURVE_KEY_LEN + 1);
    if (cfg->bus_curve_keys_file[0]) {
        if (kp_curve_load(cfg->bus_curve_keys_file, out->public_key, out->secret_key))
            return KP_ECONFIG;
    } else if (zmq_curve_keypair(out->public_key, out->secret_key)) {
        return KP_ECONFIG;
    }
    out->on = true;
    return 0;
}

int kp_curve_server(const kp_config_t *cfg, kp_curve_t *out)
{
    memset(out, 0, sizeof *out);
    if (!cfg->bus_curve) return 0;
    if (s_check_curve()) return KP_ECONFIG;
    if (!cfg->bus_curve_server_secret_file[0]) {
        kp_error("bus", "bus.curve is on but bus.curve_server_secret_file is empty (hint: "
                        "pacsctl bus keygen FILE)");
        return KP_ECONFIG;
    }
    if (kp_curve_load(cfg->bus_curve_server_secret_file, out->public_key, out->secret_key))
        return KP_ECONFIG;
    out->on = true;
    return 0;
}

int kp_curve_apply_client(void *sock, const kp_curve_t *c)
{
    if (!c->on) return 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, c->server_public, KP_CURVE_KEY_LEN) ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, c->public_key, KP_CURVE_KEY_LEN) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->secret_key, KP_CURVE_KEY_LEN))
        return -1;
    return 0;
}

int kp_curve_apply_server(void *sock, const kp_curve_t *c)
{
    if (!c->on) return 0;
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, c->secret_key, KP_CURVE_KEY_LEN))
        return -1;
    return 0;
}
