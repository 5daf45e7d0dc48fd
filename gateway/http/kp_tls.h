/* kp_tls: the gateway's TLS set-up: an OpenSSL server context (TLS 1.2+, ALPN h2 and
 * http/1.1) and, for a first start without certificates, a self-signed certificate. */
#ifndef KP_TLS_H
#define KP_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>

/* Writes a new self-signed certificate (ECDSA P-256, SAN localhost, 127.0.0.1, ::1 and the host
 * name) to cert_path and its key to key_path (mode 0600), creating missing directories.
 * Neither file may exist. 0 or KP_EIO with a reason in err. */
int kp_tls_generate(const char *cert_path, const char *key_path, char *err, size_t errlen);
/* A server context with the certificate chain and key loaded; NULL with a reason in err. */
SSL_CTX *kp_tls_server_ctx(const char *cert_path, const char *key_path, char *err, size_t errlen);

#endif
