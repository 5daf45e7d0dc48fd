/* kp_crypt: encrypted, authenticated files for backups (see kp_crypt.h). */
#include "kp_crypt.h"

#include "kp_errors.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define S_CHUNK KP_CRYPT_CHUNK
static const unsigned char s_magic[8] = {'K', 'P', 'B', 'K', '1', 0, 0, 0};

static void s_nonce(const unsigned char prefix[8], uint32_t n, unsigned char nonce[12])
{
    memcpy(nonce, prefix, 8);
    nonce[8] = (unsigned char)(n >> 24);
    nonce[9] = (unsigned char)(n >> 16);
    nonce[10] = (unsigned char)(n >> 8);
    nonce[11] = (unsigned char)n;
}

bool kp_crypt_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        c += w;
        n -= (size_t)w;
    }
    return true;
}

static int s_chunk_out(kp_crypt_enc_t *e, bool final)
{
    unsigned char nonce[12], tag[16], aad[9], hdr[4];
    s_nonce(e->prefix, e->n, nonce);
    memcpy(aad, s_magic, 8);
    aad[8] = final ? 1 : 0;
    unsigned char *ct = malloc(e->len + 16);
    if (!ct) abort();
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int l = 0, l2 = 0;
    bool ok = c && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, e->key, nonce) == 1 &&
              EVP_EncryptUpdate(c, NULL, &l, aad, sizeof aad) == 1 &&
              EVP_EncryptUpdate(c, ct, &l, e->buf, (int)e->len) == 1 &&
              EVP_EncryptFinal_ex(c, ct + l, &l2) == 1 &&
              EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag) == 1;
    EVP_CIPHER_CTX_free(c);
    uint32_t len = (uint32_t)e->len;
    hdr[0] = (unsigned char)(len >> 24);
    hdr[1] = (unsigned char)(len >> 16);
    hdr[2] = (unsigned char)(len >> 8);
    hdr[3] = (unsigned char)len;
    ok = ok && kp_crypt_write_all(e->fd, hdr, 4) && kp_crypt_write_all(e->fd, ct, e->len) &&
         kp_crypt_write_all(e->fd, tag, 16);
    free(ct);
    e->n++;
    e->len = 0;
    return ok ? 0 : KP_EIO;
}

int kp_crypt_enc_open_fd(kp_crypt_enc_t *e, const unsigned char key[32], int fd)
{
    memset(e, 0, sizeof *e);
    memcpy(e->key, key, 32);
    e->fd = fd;
    e->buf = malloc(S_CHUNK);
    e->sha = EVP_MD_CTX_new();
    if (e->fd < 0 || !e->buf || !e->sha || RAND_bytes(e->prefix, 8) != 1 ||
        EVP_DigestInit_ex((EVP_MD_CTX *)e->sha, EVP_sha256(), NULL) != 1 ||
        !kp_crypt_write_all(e->fd, s_magic, 8) || !kp_crypt_write_all(e->fd, e->prefix, 8)) {
        kp_crypt_enc_close(e, NULL, false); /* frees, closes fd */
        return KP_EIO;
    }
    return 0;
}

int kp_crypt_enc_write(kp_crypt_enc_t *e, const void *data, size_t n)
{
    const unsigned char *p = data;
    EVP_DigestUpdate((EVP_MD_CTX *)e->sha, p, n);
    e->bytes += n;
    while (n) {
        size_t take = S_CHUNK - e->len < n ? S_CHUNK - e->len : n;
        memcpy(e->buf + e->len, p, take);
        e->len += take;
        p += take;
        n -= take;
        if (e->len == S_CHUNK && s_chunk_out(e, false)) return KP_EIO;
    }
    return 0;
}

/* Writes the final chunk, fsyncs and closes; sha256 (hex) of the plaintext when not NULL. */
int kp_crypt_enc_close(kp_crypt_enc_t *e, char sha256[65], bool ok)
{
    int rc = ok && e->buf && e->sha && e->fd >= 0 ? s_chunk_out(e, true) : KP_EIO;
    if (!rc && fsync(e->fd)) rc = KP_EIO;
    if (e->fd >= 0) close(e->fd);
    e->fd = -1;
    unsigned char d[32] = {0};
    unsigned int dl = 0;
    if (e->sha) EVP_DigestFinal_ex((EVP_MD_CTX *)e->sha, d, &dl);
    if (sha256)
        for (int i = 0; i < 32; i++)
            snprintf(sha256 + 2 * i, 3, "%02x", d[i]);
    EVP_MD_CTX_free((EVP_MD_CTX *)e->sha);
    e->sha = NULL;
    free(e->buf);
    e->buf = NULL;
    OPENSSL_cleanse(e->key, sizeof e->key);
    return rc;
}

int kp_crypt_decrypt_stream(FILE *f, const unsigned char key[32],
                            int (*fn)(void *user, const unsigned char *p, size_t n), void *user,
                            char sha256[65], const char **why)
{
    *why = NULL;
    unsigned char head[16];
    int rc = 0;
    if (fread(head, 1, 16, f) != 16 || memcmp(head, s_magic, 8)) {
        *why = "not a Klinika backup file";
        return KP_EINVAL;
    }
    unsigned char *ct = malloc(S_CHUNK + 16), *pt = malloc(S_CHUNK + 16);
    EVP_MD_CTX *sha = EVP_MD_CTX_new();
    if (!ct || !pt || !sha) abort();
    EVP_DigestInit_ex(sha, EVP_sha256(), NULL);
    bool final = false;
    for (uint32_t n = 0; !rc && !final; n++) {
        unsigned char hdr[4], tag[16], nonce[12], aad[9];
        if (fread(hdr, 1, 4, f) != 4) {
            *why = "truncated (no final chunk)";
            rc = KP_EINVAL;
            break;
        }
        uint32_t len =
            (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
        if (len > S_CHUNK || fread(ct, 1, len, f) != len || fread(tag, 1, 16, f) != 16) {
            *why = "truncated or damaged";
            rc = KP_EINVAL;
            break;
        }
        s_nonce(head + 8, n, nonce);
        memcpy(aad, s_magic, 8);
        /* the final flag is not stored: try "not final", then "final" (a chunk shorter than
         * S_CHUNK can only be the last one, but a full one may be too) */
        for (int fl = 0; fl < 2; fl++) {
            aad[8] = (unsigned char)fl;
            EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
            int l = 0, l2 = 0;
            bool ok = c && EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce) == 1 &&
                      EVP_DecryptUpdate(c, NULL, &l, aad, sizeof aad) == 1 &&
                      EVP_DecryptUpdate(c, pt, &l, ct, (int)len) == 1 &&
                      EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag) == 1 &&
                      EVP_DecryptFinal_ex(c, pt + l, &l2) == 1;
            EVP_CIPHER_CTX_free(c);
            if (ok) {
                final = fl == 1;
                EVP_DigestUpdate(sha, pt, len);
                if (fn && len) rc = fn(user, pt, len);
                goto next;
            }
        }
        *why = "altered, or encrypted with another key (authentication failed)";
        rc = KP_EINVAL;
    next:;
    }
    if (!rc && fgetc(f) != EOF) {
        *why = "data after the final chunk";
        rc = KP_EINVAL;
    }
    unsigned char d[32];
    unsigned int dl = 0;
    EVP_DigestFinal_ex(sha, d, &dl);
    if (sha256)
        for (int i = 0; i < 32; i++)
            snprintf(sha256 + 2 * i, 3, "%02x", d[i]);
    EVP_MD_CTX_free(sha);
    free(ct);
    free(pt);
    return rc;
}

int kp_crypt_decrypt(const char *path, const unsigned char key[32],
                     int (*fn)(void *user, const unsigned char *p, size_t n), void *user,
                     char sha256[65], const char **why)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        *why = e == ENOENT ? "missing" : strerror(e);
        return e == ENOENT ? KP_ENOTFOUND : KP_EIO;
    }
    int rc = kp_crypt_decrypt_stream(f, key, fn, user, sha256, why);
    fclose(f);
    return rc;
}
