/* kp_zap: which CurveZMQ clients pacs-busd lets in (ZeroMQ's ZAP, RFC 27).
 *
 * With bus.curve on, the broker's public key already keeps out peers that do not know it. A
 * multi-host installation also wants the reverse: only workers it has been told about. When
 * bus.curve_clients_file names a file, the broker answers ZeroMQ's authentication requests
 * itself and accepts a CURVE handshake only from a client whose public key is listed there (one
 * key per line, as "public = <Z85>" copied from a key file or the bare 40 characters; a line
 * starting with '#' is a comment, and so is '#' after the key and a blank - Z85 itself uses '#'). Every other client is refused during the handshake: it never gets a job, an event
 * or an answer, and the broker logs its key (at most once a minute per key) so the
 * administrator can tell who knocked. SIGHUP re-reads the file (adding or revoking a key needs
 * no restart; connections already authenticated stay up until they reconnect). */
#ifndef KP_ZAP_H
#define KP_ZAP_H

#include <stddef.h>

typedef struct kp_zap kp_zap_t;

/* Binds the ZAP handler in ctx (before any CURVE socket binds) and loads the key list. NULL on
 * error (logged: unreadable file, a malformed line, no key at all). */
kp_zap_t *kp_zap_start(void *ctx, const char *clients_file);
/* The REP socket to poll for ZMQ_POLLIN. */
void *kp_zap_socket(kp_zap_t *z);
/* Answers the waiting requests. */
void kp_zap_handle(kp_zap_t *z);
/* Re-reads the file; on error keeps the current list (logged). Returns the number of keys. */
size_t kp_zap_reload(kp_zap_t *z);
void kp_zap_stop(kp_zap_t **z);

/* Parses a client list (the file's text): fills keys (32 bytes each, at most max) and returns
 * how many, or -1 with the 1-based line number of the first bad line in *bad_line. */
int kp_zap_parse(const char *text, unsigned char (*keys)[32], size_t max, int *bad_line);

#endif
