/* kp_crypt: encrypted, authenticated files (pacsctl backup's objects, dumps and manifests).
 *
 * Format: "KPBK1\0\0\0", an 8-byte random nonce prefix, then chunks of at most 1 MiB of
 * plaintext, each as [u32 big-endian length][AES-256-GCM ciphertext][16-byte tag], with the
 * nonce = prefix || chunk number and the associated data = magic || final flag. The last chunk
 * (possibly empty) is the only one with the final flag: a truncated, reordered, altered or
 * extended file, or the wrong key, fails authentication. */
#ifndef KP_CRYPT_H
#define KP_CRYPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define KP_CRYPT_CHUNK (1u << 20)

typedef struct {
    unsigned char key[32], prefix[8];
    uint32_t n; /* chunks written */
    int fd;
    unsigned char *buf;
    size_t len;
    void *sha;      /* EVP_MD_CTX: SHA-256 of the plaintext */
    uint64_t bytes; /* plaintext bytes written */
} kp_crypt_enc_t;

/* Starts an encrypted file on fd (taken over: closed by kp_crypt_enc_close). 0 or KP_EIO. */
int kp_crypt_enc_open_fd(kp_crypt_enc_t *e, const unsigned char key[32], int fd);
/* Adds plaintext. 0 or KP_EIO. */
int kp_crypt_enc_write(kp_crypt_enc_t *e, const void *data, size_t n);
/* Writes the final chunk (unless ok is false), fsyncs, closes; sha256 (hex) of the plaintext
 * when not NULL. Frees everything in every case. 0 or KP_EIO. */
int kp_crypt_enc_close(kp_crypt_enc_t *e, char sha256[65], bool ok);

/* Decrypts a whole file from f (or from path), calling fn(user, data, n) with each chunk's
 * plaintext (fn may be NULL). 0; KP_EINVAL when the file is not intact (*why says how);
 * KP_ENOTFOUND / KP_EIO for the path; or what fn returned. sha256 (hex) of the plaintext when
 * not NULL. */
int kp_crypt_decrypt_stream(FILE *f, const unsigned char key[32],
                            int (*fn)(void *user, const unsigned char *p, size_t n), void *user,
                            char sha256[65], const char **why);
int kp_crypt_decrypt(const char *path, const unsigned char key[32],
                     int (*fn)(void *user, const unsigned char *p, size_t n), void *user,
                     char sha256[65], const char **why);

/* write(2) until done (EINTR retried). false on error (errno set). */
bool kp_crypt_write_all(int fd, const void *p, size_t n);

#endif
