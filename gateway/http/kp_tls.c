/* kp_tls: OpenSSL server context and self-signed certificate generation (see kp_tls.h). */
#include "kp_tls.h"

#include "kp_errors.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void s_ssl_err(char *err, size_t errlen, const char *what)
{
    char buf[256];
    unsigned long e = ERR_get_error();
    ERR_error_string_n(e, buf, sizeof buf);
    snprintf(err, errlen, "%s: %s", what, e ? buf : "unknown OpenSSL error");
    ERR_clear_error();
}

static int s_mkdirs(const char *file)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", file);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return 0;
    *slash = 0;
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(dir, 0700) && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(dir, 0700) && errno != EEXIST) return -1;
    return 0;
}

static FILE *s_create(const char *path, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, "w");
    if (!f) close(fd);
    return f;
}

static bool s_hostname_ok(const char *h)
{
    if (!*h) return false;
    for (; *h; h++)
        if (!((*h >= 'a' && *h <= 'z') || (*h >= 'A' && *h <= 'Z') || (*h >= '0' && *h <= '9') ||
              *h == '-' || *h == '.'))
            return false;
    return true;
}

int kp_tls_generate(const char *cert_path, const char *key_path, char *err, size_t errlen)
{
    int rc = KP_EIO;
    EVP_PKEY *pkey = NULL;
    X509 *x = NULL;
    BIGNUM *bn = NULL;
    FILE *f = NULL;

    pkey = EVP_EC_gen("P-256");
    x = X509_new();
    bn = BN_new();
    if (!pkey || !x || !bn) {
        s_ssl_err(err, errlen, "key generation");
        goto error;
    }
    if (!BN_rand(bn, 63, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) ||
        !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) || !X509_set_version(x, 2) ||
        !X509_gmtime_adj(X509_getm_notBefore(x), -3600) ||
        !X509_gmtime_adj(X509_getm_notAfter(x), 825L * 86400) || !X509_set_pubkey(x, pkey)) {
        s_ssl_err(err, errlen, "certificate fields");
        goto error;
    }
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                               (const unsigned char *)"Klinika PACS (self-signed)", -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                               0);
    X509_set_issuer_name(x, name);
    char host[256] = "", san[512];
    if (gethostname(host, sizeof host - 1) || !s_hostname_ok(host) || !strcmp(host, "localhost"))
        host[0] = 0;
    snprintf(san, sizeof san, "DNS:localhost,IP:127.0.0.1,IP:::1%s%s", host[0] ? ",DNS:" : "",
             host);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
    if (!ext || !X509_add_ext(x, ext, -1)) {
        X509_EXTENSION_free(ext);
        s_ssl_err(err, errlen, "subjectAltName");
        goto error;
    }
    X509_EXTENSION_free(ext);
    if (!X509_sign(x, pkey, EVP_sha256())) {
        s_ssl_err(err, errlen, "signing");
        goto error;
    }
    if (s_mkdirs(key_path) || s_mkdirs(cert_path)) {
        snprintf(err, errlen, "cannot create the directory of %s: %s", key_path, strerror(errno));
        goto error;
    }
    f = s_create(key_path, 0600);
    if (!f || !PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL) || fflush(f) ||
        fsync(fileno(f))) {
        snprintf(err, errlen, "cannot write %s: %s", key_path, strerror(errno));
        goto error;
    }
    fclose(f);
    f = s_create(cert_path, 0644);
    if (!f || !PEM_write_X509(f, x) || fflush(f) || fsync(fileno(f))) {
        snprintf(err, errlen, "cannot write %s: %s", cert_path, strerror(errno));
        goto error;
    }
    rc = 0;
error:
    if (f) fclose(f);
    BN_free(bn);
    X509_free(x);
    EVP_PKEY_free(pkey);
    return rc;
}

SSL_CTX *kp_tls_server_ctx(const char *cert_path, const char *key_path, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        s_ssl_err(err, errlen, "SSL_CTX_new");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_RENEGOTIATION);
    if (!SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1") ||
        SSL_CTX_use_certificate_chain_file(ctx, cert_path) != 1) {
        s_ssl_err(err, errlen, cert_path);
        goto error;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_path, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        s_ssl_err(err, errlen, key_path);
        goto error;
    }
    return ctx;
error:
    SSL_CTX_free(ctx);
    return NULL;
}
