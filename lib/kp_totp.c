/* kp_totp: TOTP codes over liboath and recovery codes (see kp_totp.h). */
#include "kp_totp.h"

#include "kp_errors.h"
#include "kp_log.h"
#include "kp_password.h"

#include <ctype.h>
#include <liboath/oath.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdio.h>
#include <qrencode.h>
#include <stdlib.h>
#include <string.h>

/* Crockford's base32 alphabet, lower case: no i, l, o, u. 32 symbols, so a random byte & 31 is
 * uniform. */
static const char s_recovery_alphabet[] = "0123456789abcdefghjkmnpqrstvwxyz";
#define S_RECOVERY_CHARS 16

static pthread_once_t s_once = PTHREAD_ONCE_INIT;
static int s_init_rc;

static void s_init(void)
{
    int rc = oath_init();
    if (rc != OATH_OK) {
        kp_error("auth", "oath_init: %s", oath_strerror(rc));
        s_init_rc = KP_EINTERNAL;
    }
}

int kp_totp_init(void)
{
    pthread_once(&s_once, s_init);
    return s_init_rc;
}

int kp_totp_secret_new(uint8_t secret[KP_TOTP_SECRET_LEN])
{
    if (RAND_bytes(secret, KP_TOTP_SECRET_LEN) != 1) {
        kp_error("auth", "RAND_bytes failed");
        return KP_EINTERNAL;
    }
    return 0;
}

int kp_totp_secret_base32(const uint8_t *secret, size_t len, char *out, size_t outlen)
{
    if (len == 0 || len > 64 || kp_totp_init()) return KP_EINVAL;
    char *b32 = NULL;
    size_t n = 0;
    if (oath_base32_encode((const char *)secret, len, &b32, &n) != OATH_OK) return KP_EINVAL;
    while (n > 0 && b32[n - 1] == '=')
        n--;
    int rc = 0;
    if (n + 1 > outlen)
        rc = KP_EINVAL;
    else {
        memcpy(out, b32, n);
        out[n] = 0;
    }
    free(b32);
    return rc;
}

int kp_totp_secret_decode(const char *b32, uint8_t *secret, size_t cap, size_t *len)
{
    if (kp_totp_init()) return KP_EINVAL;
    size_t l = strlen(b32);
    if (l == 0 || l > 256) return KP_EINVAL;
    /* Normalise: upper case, no spaces, no padding; then pad to a multiple of 8 again. */
    char buf[264];
    size_t n = 0;
    for (size_t i = 0; i < l; i++) {
        unsigned char c = (unsigned char)b32[i];
        if (c == ' ' || c == '-' || c == '=') continue;
        buf[n++] = (char)toupper(c);
    }
    if (n == 0) return KP_EINVAL;
    while (n % 8)
        buf[n++] = '=';
    char *raw = NULL;
    size_t rawlen = 0;
    if (oath_base32_decode(buf, n, &raw, &rawlen) != OATH_OK) return KP_EINVAL;
    int rc = 0;
    if (rawlen == 0 || rawlen > cap)
        rc = KP_EINVAL;
    else {
        memcpy(secret, raw, rawlen);
        *len = rawlen;
    }
    OPENSSL_cleanse(raw, rawlen);
    free(raw);
    return rc;
}

/* Appends s percent-encoded (everything but RFC 3986 unreserved characters). */
static void s_pct(FILE *f, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~')
            fputc(*p, f);
        else
            fprintf(f, "%%%02X", *p);
    }
}

char *kp_totp_uri(const char *issuer, const char *user, const char *secret_b32)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) abort();
    fputs("otpauth://totp/", f);
    s_pct(f, issuer);
    fputc(':', f);
    s_pct(f, user);
    fputs("?secret=", f);
    s_pct(f, secret_b32);
    fputs("&issuer=", f);
    s_pct(f, issuer);
    fprintf(f, "&algorithm=SHA1&digits=%d&period=%d", KP_TOTP_DIGITS, KP_TOTP_PERIOD);
    if (fclose(f)) abort();
    return buf;
}

int64_t kp_totp_step(time_t t)
{
    return (int64_t)t / KP_TOTP_PERIOD;
}

int kp_totp_code(const uint8_t *secret, size_t len, time_t t, unsigned digits, char *out)
{
    if (digits < 6 || digits > 8 || len == 0 || t < 0 || kp_totp_init()) return KP_EINVAL;
    int rc = oath_totp_generate((const char *)secret, len, t, KP_TOTP_PERIOD, 0, digits, out);
    return rc == OATH_OK ? 0 : KP_EINVAL;
}

int kp_totp_verify(const uint8_t *secret, size_t len, const char *code, time_t now,
                   int64_t last_step, int64_t *step)
{
    if (strlen(code) != KP_TOTP_DIGITS) return KP_EUNAUTH;
    for (int i = 0; i < KP_TOTP_DIGITS; i++)
        if (code[i] < '0' || code[i] > '9') return KP_EUNAUTH;
    int64_t base = kp_totp_step(now), best = -1;
    bool replay = false;
    for (int d = -1; d <= 1; d++) {
        int64_t s = base + d;
        char want[KP_TOTP_DIGITS + 1];
        if (s < 0 || kp_totp_code(secret, len, (time_t)(s * KP_TOTP_PERIOD), KP_TOTP_DIGITS, want))
            continue;
        bool hit = CRYPTO_memcmp(want, code, KP_TOTP_DIGITS) == 0;
        OPENSSL_cleanse(want, sizeof want);
        if (!hit) continue;
        if (s <= last_step)
            replay = true;
        else if (s > best)
            best = s;
    }
    if (best >= 0) {
        if (step) *step = best;
        return 0;
    }
    return replay ? KP_ECONFLICT : KP_EUNAUTH;
}

/* Canonical form of a typed recovery code (16 alphabet characters), or false. */
static bool s_recovery_normalise(const char *in, char out[S_RECOVERY_CHARS + 1])
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
        if (*p == '-' || *p == ' ') continue;
        char c = (char)tolower(*p);
        if (c == 'o')
            c = '0';
        else if (c == 'i' || c == 'l')
            c = '1';
        if (!strchr(s_recovery_alphabet, c) || c == 0 || n == S_RECOVERY_CHARS) return false;
        out[n++] = c;
    }
    out[n] = 0;
    return n == S_RECOVERY_CHARS;
}

int kp_totp_recovery_new(char codes[KP_TOTP_RECOVERY_COUNT][KP_TOTP_RECOVERY_CODE_MAX],
                         char hashes[KP_TOTP_RECOVERY_COUNT][65])
{
    unsigned char rnd[S_RECOVERY_CHARS];
    for (int i = 0; i < KP_TOTP_RECOVERY_COUNT; i++) {
        char canon[S_RECOVERY_CHARS + 1];
        bool dup;
        do {
            if (RAND_bytes(rnd, sizeof rnd) != 1) {
                kp_error("auth", "RAND_bytes failed");
                return KP_EINTERNAL;
            }
            for (int k = 0; k < S_RECOVERY_CHARS; k++)
                canon[k] = s_recovery_alphabet[rnd[k] & 31];
            canon[S_RECOVERY_CHARS] = 0;
            kp_sha256_hex(canon, hashes[i]);
            dup = false;
            for (int j = 0; j < i; j++)
                dup = dup || !strcmp(hashes[j], hashes[i]);
        } while (dup);
        snprintf(codes[i], KP_TOTP_RECOVERY_CODE_MAX, "%.4s-%.4s-%.4s-%.4s", canon, canon + 4,
                 canon + 8, canon + 12);
        OPENSSL_cleanse(canon, sizeof canon);
    }
    OPENSSL_cleanse(rnd, sizeof rnd);
    return 0;
}

int kp_totp_recovery_verify(const char *code, const char *const *hashes, size_t n)
{
    char canon[S_RECOVERY_CHARS + 1];
    if (!code || !s_recovery_normalise(code, canon)) return KP_EUNAUTH;
    char h[65];
    kp_sha256_hex(canon, h);
    int found = KP_EUNAUTH;
    for (size_t i = 0; i < n; i++) {
        /* Used-up slots are public knowledge; skipping them leaks nothing secret. */
        if (!hashes[i] || strlen(hashes[i]) != 64) continue;
        if (CRYPTO_memcmp(h, hashes[i], 64) == 0 && found < 0) found = (int)i;
    }
    return found;
}

char *kp_totp_qr_svg(const char *text, int module_px)
{
    if (!text || !*text) return NULL;
    if (module_px < 1 || module_px > 32) module_px = 4;
    QRcode *qr = QRcode_encodeString(text, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
    if (!qr) return NULL;
    const int quiet = 4, w = qr->width, side = (w + 2 * quiet) * module_px;
    /* one <path> of unit squares: small and exact */
    size_t cap = 256 + (size_t)w * (size_t)w * 24;
    char *svg = malloc(cap);
    if (!svg) abort();
    size_t n = (size_t)snprintf(svg, cap,
                                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                                "viewBox=\"0 0 %d %d\" shape-rendering=\"crispEdges\">"
                                "<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/><path fill=\"#000\" d=\"",
                                side, side, w + 2 * quiet, w + 2 * quiet);
    for (int y = 0; y < w; y++)
        for (int x = 0; x < w; x++)
            if (qr->data[y * w + x] & 1)
                n += (size_t)snprintf(svg + n, cap - n, "M%d %dh1v1h-1z", x + quiet, y + quiet);
    snprintf(svg + n, cap - n, "\"/></svg>");
    QRcode_free(qr);
    return svg;
}
