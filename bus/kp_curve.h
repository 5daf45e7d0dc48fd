/* kp_curve: CurveZMQ transport security for the bus (ZeroMQ's built-in encryption).
 *
 * Between hosts the bus runs over tcp://, encrypted and with the broker authenticated by its
 * public key: every process is configured with bus.curve = true and the broker's public key
 * (bus.curve_server_public); the broker reads its key pair from bus.curve_server_secret_file; a
 * client uses its own key pair from bus.curve_keys_file, or a fresh one made at start when that
 * setting is empty. Key files are written by `pacsctl bus keygen FILE` (mode 0600) and hold two
 * lines, "public = <Z85>" and "secret = <Z85>". With bus.curve = false (the default, for ipc://
 * on one host) sockets are plain. */
#ifndef KP_CURVE_H
#define KP_CURVE_H

#include "kp_config.h"

#include <stdbool.h>

#define KP_CURVE_KEY_LEN 40 /* Z85 text of a 32-byte key */

typedef struct {
    bool on;
    char server_public[KP_CURVE_KEY_LEN + 1];
    char public_key[KP_CURVE_KEY_LEN + 1];
    char secret_key[KP_CURVE_KEY_LEN + 1];
} kp_curve_t;

/* Client settings from the config (out->on false when bus.curve is off). 0 or KP_ECONFIG with
 * the reason logged (missing or malformed keys, unreadable key file, no CURVE in libzmq). */
int kp_curve_client(const kp_config_t *cfg, kp_curve_t *out);
/* Broker settings from the config (its key pair from bus.curve_server_secret_file). */
int kp_curve_server(const kp_config_t *cfg, kp_curve_t *out);
/* Applies the settings to a socket before connect/bind: 0, or -1 with zmq_errno() set. Does
 * nothing when c->on is false. */
int kp_curve_apply_client(void *sock, const kp_curve_t *c);
int kp_curve_apply_server(void *sock, const kp_curve_t *c);
/* Writes a new key pair to path (created 0600, never overwriting) and its public key into
 * public_out. 0, KP_EIO (exists or cannot be written) or KP_EINTERNAL. */
int kp_curve_keygen(const char *path, char public_out[KP_CURVE_KEY_LEN + 1]);
/* Reads a key file; either output may be NULL. 0 or KP_ECONFIG (logged). */
int kp_curve_load(const char *path, char public_out[KP_CURVE_KEY_LEN + 1],
                  char secret_out[KP_CURVE_KEY_LEN + 1]);

#endif
