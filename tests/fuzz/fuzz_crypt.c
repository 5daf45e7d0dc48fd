/* libFuzzer driver for lib/kp_crypt (the format of pacsctl backup's files, which may come from
 * an untrusted copy): any input read as an encrypted file must be refused or decrypted, never
 * crash or read out of bounds; any input used as plaintext must encrypt and decrypt back to
 * itself with the same SHA-256; and one flipped byte anywhere in that ciphertext must be
 * refused as not intact (KP_EINVAL).
 * Seeds: tests/fuzz/corpus/crypt/ (including files encrypted with the driver's key). */
#define _GNU_SOURCE
#include "kp_crypt.h"
#include "kp_errors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const unsigned char s_key[32] = "klinika-fuzz-key-0123456789abcde";

typedef struct {
    unsigned char *buf;
    size_t len, cap;
} s_buf_t;

static int s_collect(void *user, const unsigned char *p, size_t n)
{
    s_buf_t *b = user;
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2;
        b->buf = realloc(b->buf, b->cap);
        if (!b->buf) abort();
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
    return 0;
}

static int s_decrypt_mem(const unsigned char *p, size_t n, s_buf_t *out, char sha[65])
{
    if (!n) return KP_EINVAL;
    FILE *f = fmemopen((void *)p, n, "rb");
    if (!f) abort();
    const char *why = NULL;
    int rc = kp_crypt_decrypt_stream(f, s_key, out ? s_collect : NULL, out, sha, &why);
    fclose(f);
    if (rc && !why) abort(); /* a refusal always says why */
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* 1. the input as an encrypted file */
    int rc = s_decrypt_mem(data, size, NULL, NULL);
    if (rc != 0 && rc != KP_EINVAL) abort();

    /* 2. the input as plaintext: a round trip */
    int fd = memfd_create("kp-crypt", 0);
    if (fd < 0) abort();
    kp_crypt_enc_t e;
    if (kp_crypt_enc_open_fd(&e, s_key, dup(fd))) abort();
    if (kp_crypt_enc_write(&e, data, size)) abort();
    char sha_in[65], sha_out[65];
    if (kp_crypt_enc_close(&e, sha_in, true)) abort();
    off_t clen = lseek(fd, 0, SEEK_END);
    unsigned char *ct = malloc((size_t)clen);
    if (!ct || pread(fd, ct, (size_t)clen, 0) != clen) abort();
    close(fd);
    s_buf_t out = {0};
    if (s_decrypt_mem(ct, (size_t)clen, &out, sha_out)) abort();
    if (out.len != size || (size && memcmp(out.buf, data, size)) || strcmp(sha_in, sha_out))
        abort();
    free(out.buf);

    /* 3. one flipped byte anywhere is refused */
    size_t pos = 0;
    for (size_t i = 0; i < size; i++)
        pos = pos * 31 + data[i];
    pos %= (size_t)clen;
    ct[pos] ^= (unsigned char)(1u << (size % 8));
    if (s_decrypt_mem(ct, (size_t)clen, NULL, NULL) != KP_EINVAL) abort();
    free(ct);
    return 0;
}
