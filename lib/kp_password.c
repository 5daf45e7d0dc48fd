/* kp_password: Argon2id password hashes, the password policy, random tokens (see kp_password.h). */
#include "kp_password.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <argon2.h>
#include <ctype.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds on the parameters of a stored string we are willing to verify (the config ranges). */
#define S_MAX_M_KIB 4194304u
#define S_MAX_T     100u
#define S_MAX_P     16u
/* A UTF-8 character is at most 4 bytes. */
#define S_MAX_PW_BYTES (4 * KP_PASSWORD_MAX_LEN)

struct kp_password_policy {
    long min_length;
    char **common; /* sorted, lower case, unique */
    size_t n_common;
};

/* Parsed PHC string: parameters and the byte lengths of salt and hash. */
struct s_phc {
    uint32_t m, t, p;
    size_t salt_len, hash_len;
};

/* ---------------------------------------------------------------- helpers */

/* Number of UTF-8 characters of s, or -1 when s is not valid UTF-8 (overlong forms,
 * surrogates and code points above U+10FFFF are invalid). */
static long s_utf8_length(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    long n = 0;
    while (*p) {
        unsigned c = *p;
        int extra;
        uint32_t cp;
        if (c < 0x80) {
            p++;
            n++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            extra = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            extra = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            extra = 3;
            cp = c & 0x07;
        } else {
            return -1;
        }
        for (int i = 1; i <= extra; i++) {
            if ((p[i] & 0xC0) != 0x80) return -1;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) ||
            (extra == 3 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        p += extra + 1;
        n++;
    }
    return n;
}

/* Reads "<key>=<decimal>" at *p into *out (no sign, no spaces, no leading zero, fits 32 bits). */
static bool s_parse_param(const char **p, const char *key, uint32_t *out)
{
    size_t kl = strlen(key);
    if (strncmp(*p, key, kl) || (*p)[kl] != '=') return false;
    const char *d = *p + kl + 1;
    if (*d < '0' || *d > '9' || (*d == '0' && d[1] >= '0' && d[1] <= '9')) return false;
    uint64_t v = 0;
    while (*d >= '0' && *d <= '9') {
        v = v * 10 + (uint64_t)(*d - '0');
        if (v > UINT32_MAX) return false;
        d++;
    }
    *out = (uint32_t)v;
    *p = d;
    return true;
}

/* Length in bytes of an unpadded standard-base64 field of len characters ending at '$' or NUL;
 * 0 when a character is outside the alphabet or the length is impossible. */
static size_t s_b64_field(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/'))
            return 0;
    }
    if (len % 4 == 1) return 0;
    return len * 3 / 4;
}

/* Parses $argon2id$v=19$m=M,t=T,p=P$SALT$HASH strictly. */
static bool s_parse_phc(const char *s, struct s_phc *out)
{
    static const char prefix[] = "$argon2id$v=19$";
    if (strncmp(s, prefix, sizeof prefix - 1)) return false;
    const char *p = s + sizeof prefix - 1;
    if (!s_parse_param(&p, "m", &out->m) || *p++ != ',') return false;
    if (!s_parse_param(&p, "t", &out->t) || *p++ != ',') return false;
    if (!s_parse_param(&p, "p", &out->p) || *p++ != '$') return false;
    const char *salt = p, *d = strchr(salt, '$');
    if (!d) return false;
    out->salt_len = s_b64_field(salt, (size_t)(d - salt));
    const char *hash = d + 1;
    if (strchr(hash, '$')) return false;
    out->hash_len = s_b64_field(hash, strlen(hash));
    return out->salt_len >= 8 && out->salt_len <= 64 && out->hash_len >= 16 &&
           out->hash_len <= 64 && out->m >= 8 * out->p && out->m <= S_MAX_M_KIB && out->t >= 1 &&
           out->t <= S_MAX_T && out->p >= 1 && out->p <= S_MAX_P;
}

static int s_argon2_rc(int rc)
{
    if (rc == ARGON2_OK) return 0;
    if (rc == ARGON2_MEMORY_ALLOCATION_ERROR) return KP_ENOMEM;
    kp_error("auth", "argon2: %s", argon2_error_message(rc));
    return KP_EINTERNAL;
}

/* ---------------------------------------------------------------- hashing */

int kp_password_hash(const kp_config_t *cfg, const char *password, char **out)
{
    *out = NULL;
    size_t pwlen = strlen(password);
    long chars = s_utf8_length(password);
    if (pwlen > S_MAX_PW_BYTES || chars > KP_PASSWORD_MAX_LEN) return KP_EINVAL;
    uint32_t t = (uint32_t)cfg->auth_argon2_t, m = (uint32_t)cfg->auth_argon2_m_kib,
             p = (uint32_t)cfg->auth_argon2_p;
    unsigned char salt[KP_PASSWORD_SALT_LEN];
    if (RAND_bytes(salt, sizeof salt) != 1) {
        kp_error("auth", "RAND_bytes failed");
        return KP_EINTERNAL;
    }
    size_t enclen = argon2_encodedlen(t, m, p, sizeof salt, KP_PASSWORD_HASH_LEN, Argon2_id);
    char *enc = malloc(enclen);
    if (!enc) abort();
    int rc = s_argon2_rc(argon2id_hash_encoded(t, m, p, password, pwlen, salt, sizeof salt,
                                               KP_PASSWORD_HASH_LEN, enc, enclen));
    OPENSSL_cleanse(salt, sizeof salt);
    if (rc) {
        free(enc);
        return rc;
    }
    *out = enc;
    return 0;
}

int kp_password_verify(const kp_config_t *cfg, const char *stored, const char *password,
                       bool *needs_rehash)
{
    if (needs_rehash) *needs_rehash = false;
    size_t pwlen = strlen(password);
    if (!stored) {
        /* Unknown user: the same work as a real check, then a refusal. */
        static const unsigned char salt[KP_PASSWORD_SALT_LEN] = "kp-dummy-salt-16";
        unsigned char hash[KP_PASSWORD_HASH_LEN];
        argon2id_hash_raw((uint32_t)cfg->auth_argon2_t, (uint32_t)cfg->auth_argon2_m_kib,
                          (uint32_t)cfg->auth_argon2_p, password,
                          pwlen > S_MAX_PW_BYTES ? S_MAX_PW_BYTES : pwlen, salt, sizeof salt, hash,
                          sizeof hash);
        return KP_EUNAUTH;
    }
    struct s_phc phc;
    if (!s_parse_phc(stored, &phc)) {
        kp_warn("auth", "stored password hash is not an Argon2id v19 string within bounds");
        return KP_EINVAL;
    }
    /* No valid password is this long, and hashing megabytes on request costs us. */
    if (pwlen > S_MAX_PW_BYTES) return KP_EUNAUTH;
    int rc = argon2id_verify(stored, password, pwlen);
    if (rc == ARGON2_VERIFY_MISMATCH) return KP_EUNAUTH;
    if (rc == ARGON2_MEMORY_ALLOCATION_ERROR) return KP_ENOMEM;
    if (rc != ARGON2_OK) {
        kp_warn("auth", "stored password hash refused by argon2: %s", argon2_error_message(rc));
        return KP_EINVAL;
    }
    if (needs_rehash)
        *needs_rehash =
            phc.m != (uint32_t)cfg->auth_argon2_m_kib || phc.t != (uint32_t)cfg->auth_argon2_t ||
            phc.p != (uint32_t)cfg->auth_argon2_p || phc.salt_len != KP_PASSWORD_SALT_LEN ||
            phc.hash_len != KP_PASSWORD_HASH_LEN;
    return 0;
}

/* ---------------------------------------------------------------- policy */

static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void s_lower_ascii(char *s)
{
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

static void s_load_list(kp_password_policy_t *pol, const char *path)
{
    if (!path || !*path) {
        kp_warn("auth", "auth.common_passwords is empty: the common-password check is off");
        return;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        kp_warn("auth", "cannot read common-password list %s (%s): that check is skipped", path,
                strerror(errno));
        return;
    }
    size_t cap = 0;
    char *line = NULL;
    size_t linecap = 0;
    ssize_t n;
    while ((n = getline(&line, &linecap, f)) >= 0) {
        while (n > 0 && isspace((unsigned char)line[n - 1]))
            line[--n] = 0;
        char *s = line;
        while (isspace((unsigned char)*s))
            s++;
        if (!*s || *s == '#') continue;
        if (pol->n_common == cap) {
            cap = cap ? 2 * cap : 1024;
            pol->common = realloc(pol->common, cap * sizeof *pol->common);
            if (!pol->common) abort();
        }
        char *e = strdup(s);
        if (!e) abort();
        s_lower_ascii(e);
        pol->common[pol->n_common++] = e;
    }
    free(line);
    fclose(f);
    qsort(pol->common, pol->n_common, sizeof *pol->common, s_cmp_str);
    size_t w = 0;
    for (size_t i = 0; i < pol->n_common; i++) {
        if (w && !strcmp(pol->common[w - 1], pol->common[i]))
            free(pol->common[i]);
        else
            pol->common[w++] = pol->common[i];
    }
    pol->n_common = w;
    kp_debug("auth", "loaded %zu common passwords from %s", w, path);
}

kp_password_policy_t *kp_password_policy_new(const kp_config_t *cfg)
{
    kp_password_policy_t *pol = calloc(1, sizeof *pol);
    if (!pol) abort();
    pol->min_length = cfg->auth_password_min_length;
    s_load_list(pol, cfg->auth_common_passwords);
    return pol;
}

void kp_password_policy_destroy(kp_password_policy_t **polp)
{
    if (!polp || !*polp) return;
    kp_password_policy_t *pol = *polp;
    for (size_t i = 0; i < pol->n_common; i++)
        free(pol->common[i]);
    free(pol->common);
    free(pol);
    *polp = NULL;
}

size_t kp_password_policy_list_size(const kp_password_policy_t *pol)
{
    return pol->n_common;
}

int kp_password_policy_check(const kp_password_policy_t *pol, const char *username,
                             const char *password, const char **reason)
{
    const char *why = NULL;
    char *lower = NULL;
    long chars = s_utf8_length(password);
    if (chars < 0) {
        why = "The password contains bytes that are not valid UTF-8 text.";
        goto error;
    }
    if (chars < pol->min_length) {
        why = "The password is too short.";
        goto error;
    }
    if (chars > KP_PASSWORD_MAX_LEN) {
        why = "The password is too long (at most 256 characters).";
        goto error;
    }
    if (username && *username) {
        if (!strcasecmp(password, username)) {
            why = "The password must not be the user name.";
            goto error;
        }
        if (strlen(username) >= 3 && strcasestr(password, username)) {
            why = "The password must not contain the user name.";
            goto error;
        }
    }
    if (pol->n_common) {
        lower = strdup(password);
        if (!lower) abort();
        s_lower_ascii(lower);
        if (bsearch(&lower, pol->common, pol->n_common, sizeof *pol->common, s_cmp_str)) {
            why = "The password is one of the most common passwords.";
            goto error;
        }
        free(lower);
    }
    if (reason) *reason = NULL;
    return 0;
error:
    free(lower);
    if (reason) *reason = why;
    return KP_EINVAL;
}

/* ---------------------------------------------------------------- tokens */

char *kp_random_token(size_t nbytes)
{
    if (nbytes == 0 || nbytes > 4096) return NULL;
    unsigned char *raw = malloc(nbytes);
    char *b64 = malloc(4 * ((nbytes + 2) / 3) + 1);
    if (!raw || !b64) abort();
    if (RAND_bytes(raw, (int)nbytes) != 1) {
        kp_error("auth", "RAND_bytes failed");
        free(raw);
        free(b64);
        return NULL;
    }
    int n = EVP_EncodeBlock((unsigned char *)b64, raw, (int)nbytes);
    OPENSSL_cleanse(raw, nbytes);
    free(raw);
    while (n > 0 && b64[n - 1] == '=')
        n--;
    b64[n] = 0;
    for (int i = 0; i < n; i++) {
        if (b64[i] == '+')
            b64[i] = '-';
        else if (b64[i] == '/')
            b64[i] = '_';
    }
    return b64;
}

void kp_sha256_hex(const char *str, char out[65])
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)str, strlen(str), md);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = 0;
}

bool kp_secret_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la != lb) return false;
    return CRYPTO_memcmp(a, b, la) == 0;
}
