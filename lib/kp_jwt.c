/* kp_jwt: access tokens over libjwt 1.10 with our own header and claim checks (see kp_jwt.h). */
#include "kp_jwt.h"

#include "kp_errors.h"
#include "kp_log.h"
#include "kp_password.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <jwt.h>
#include <limits.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* Largest key file we read. */
#define S_MAX_KEY_FILE 65536
#define S_KID_MAX      64
/* HS256 secrets: at least this many bytes (RFC 7518 3.2: a key as long as the hash). */
#define S_HS_MIN_BYTES 32

struct s_key {
    char kid[S_KID_MAX + 1];
    unsigned char *bytes; /* HS256: the secret; RS256: public key PEM */
    size_t len;
};

struct kp_jwt {
    jwt_alg_t alg;
    const char *alg_name;    /* "HS256" or "RS256" */
    unsigned char *sign_key; /* HS256: the secret; RS256: private key PEM */
    size_t sign_len;
    struct s_key *keys; /* keys[0] is the current key */
    size_t n_keys;
    char *issuer, *audience;
    long ttl, leeway;
};

/* ---------------------------------------------------------------- base64 */

static int s_b64_value(char c, bool url)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == (url ? '-' : '+')) return 62;
    if (c == (url ? '_' : '/')) return 63;
    return -1;
}

/* Decodes base64 (url: base64url without padding; otherwise standard with optional padding)
 * into a malloc'd buffer with a NUL after the data. NULL on a bad character or length. */
static unsigned char *s_b64_decode(const char *in, size_t len, bool url, size_t *outlen)
{
    if (!url)
        while (len > 0 && in[len - 1] == '=')
            len--;
    if (len % 4 == 1) return NULL;
    unsigned char *out = malloc(len * 3 / 4 + 1);
    if (!out) abort();
    size_t n = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = s_b64_value(in[i], url);
        if (v < 0) {
            free(out);
            return NULL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    out[n] = 0;
    *outlen = n;
    return out;
}

/* Decodes one base64url segment holding a JSON object (duplicate keys refused). */
static json_t *s_segment_json(const char *seg, size_t len)
{
    size_t n;
    unsigned char *raw = s_b64_decode(seg, len, true, &n);
    if (!raw) return NULL;
    json_t *js = json_loadb((const char *)raw, n, JSON_REJECT_DUPLICATES, NULL);
    free(raw);
    if (js && !json_is_object(js)) {
        json_decref(js);
        js = NULL;
    }
    return js;
}

/* ---------------------------------------------------------------- key files */

static void s_wipe_free(unsigned char *p, size_t len)
{
    if (!p) return;
    OPENSSL_cleanse(p, len);
    free(p);
}

/* Reads a whole file (at most S_MAX_KEY_FILE bytes) with a NUL after it. 0 or KP_EIO. */
static int s_read_file(const char *path, unsigned char **buf, size_t *len)
{
    *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        kp_error("auth", "cannot open key file %s: %s", path, strerror(errno));
        return KP_EIO;
    }
    unsigned char *b = malloc(S_MAX_KEY_FILE + 1);
    if (!b) abort();
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, b + n, S_MAX_KEY_FILE + 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            kp_error("auth", "cannot read key file %s: %s", path, strerror(errno));
            goto error;
        }
        if (r == 0) break;
        n += (size_t)r;
        if (n > S_MAX_KEY_FILE) {
            kp_error("auth", "key file %s is larger than %d bytes", path, S_MAX_KEY_FILE);
            goto error;
        }
    }
    close(fd);
    b[n] = 0;
    *buf = b;
    *len = n;
    return 0;
error:
    close(fd);
    s_wipe_free(b, S_MAX_KEY_FILE + 1);
    return KP_EIO;
}

/* HS256 secret file: base64 text (whitespace ignored) of at least S_HS_MIN_BYTES bytes. */
static int s_load_hs_secret(const char *path, unsigned char **key, size_t *len)
{
    unsigned char *text;
    size_t tl;
    if (s_read_file(path, &text, &tl)) return KP_EIO;
    size_t w = 0;
    for (size_t i = 0; i < tl; i++)
        if (text[i] != ' ' && text[i] != '\n' && text[i] != '\r' && text[i] != '\t')
            text[w++] = text[i];
    *key = s_b64_decode((const char *)text, w, false, len);
    s_wipe_free(text, tl);
    if (!*key || *len < S_HS_MIN_BYTES) {
        kp_error("auth", "key file %s must hold base64 of at least %d random bytes", path,
                 S_HS_MIN_BYTES);
        if (*key) s_wipe_free(*key, *len);
        *key = NULL;
        return KP_ECONFIG;
    }
    return 0;
}

/* Parses PEM text as an RSA key (private or public) of at least 2048 bits. */
static EVP_PKEY *s_pem_rsa(const unsigned char *pem, size_t len, bool private_key, const char *path)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio) abort();
    EVP_PKEY *pk = private_key ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)
                               : PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (!pk) {
        kp_error("auth", "%s is not a PEM %s key", path, private_key ? "private" : "public");
        return NULL;
    }
    if (EVP_PKEY_get_base_id(pk) != EVP_PKEY_RSA || EVP_PKEY_get_bits(pk) < 2048) {
        kp_error("auth", "%s is not an RSA key of 2048 bits or more", path);
        EVP_PKEY_free(pk);
        return NULL;
    }
    return pk;
}

/* RS256 public key file: PEM SubjectPublicKeyInfo (what libjwt's PEM_read_bio_PUBKEY reads). */
static int s_load_rs_public(const char *path, unsigned char **pem, size_t *len, EVP_PKEY **out)
{
    if (s_read_file(path, pem, len)) return KP_EIO;
    EVP_PKEY *pk = s_pem_rsa(*pem, *len, false, path);
    if (!pk) {
        s_wipe_free(*pem, *len);
        *pem = NULL;
        return KP_ECONFIG;
    }
    if (out)
        *out = pk;
    else
        EVP_PKEY_free(pk);
    return 0;
}

static bool s_kid_valid(const char *kid, size_t len)
{
    if (len == 0 || len > S_KID_MAX) return false;
    for (size_t i = 0; i < len; i++) {
        char c = kid[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static const struct s_key *s_find_key(const kp_jwt_t *jwt, const char *kid)
{
    for (size_t i = 0; i < jwt->n_keys; i++)
        if (!strcmp(jwt->keys[i].kid, kid)) return &jwt->keys[i];
    return NULL;
}

/* Adds a verification key kid -> the file at path. */
static int s_add_key(kp_jwt_t *jwt, const char *kid, size_t kidlen, const char *path)
{
    if (!s_kid_valid(kid, kidlen)) {
        kp_error("auth", "JWT key id '%.*s' must be 1-64 of A-Z a-z 0-9 . _ -", (int)kidlen, kid);
        return KP_ECONFIG;
    }
    struct s_key k = {0};
    memcpy(k.kid, kid, kidlen);
    if (s_find_key(jwt, k.kid)) {
        kp_error("auth", "JWT key id '%s' appears twice in the keyring", k.kid);
        return KP_ECONFIG;
    }
    int rc = jwt->alg == JWT_ALG_HS256 ? s_load_hs_secret(path, &k.bytes, &k.len)
                                       : s_load_rs_public(path, &k.bytes, &k.len, NULL);
    if (rc) return rc;
    jwt->keys = realloc(jwt->keys, (jwt->n_keys + 1) * sizeof *jwt->keys);
    if (!jwt->keys) abort();
    jwt->keys[jwt->n_keys++] = k;
    return 0;
}

/* auth.jwt_previous_keys: "kid=path, kid=path". */
static int s_add_previous(kp_jwt_t *jwt, const char *list)
{
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        if (a < b) {
            const char *eq = memchr(a, '=', (size_t)(b - a));
            if (!eq || eq == a || eq + 1 == b || (size_t)(b - eq - 1) >= PATH_MAX) {
                kp_error("auth", "auth.jwt_previous_keys: '%.*s' is not kid=path", (int)(b - a), a);
                return KP_ECONFIG;
            }
            const char *ke = eq;
            while (ke > a && (ke[-1] == ' ' || ke[-1] == '\t'))
                ke--;
            const char *ps = eq + 1;
            while (ps < b && (*ps == ' ' || *ps == '\t'))
                ps++;
            char path[PATH_MAX];
            snprintf(path, sizeof path, "%.*s", (int)(b - ps), ps);
            int rc = s_add_key(jwt, a, (size_t)(ke - a), path);
            if (rc) return rc;
        }
        p = *end ? end + 1 : end;
    }
    return 0;
}

kp_jwt_t *kp_jwt_new(const kp_config_t *cfg)
{
    kp_jwt_t *jwt = calloc(1, sizeof *jwt);
    if (!jwt) abort();
    EVP_PKEY *priv = NULL, *pub = NULL;
    if (!strcmp(cfg->auth_jwt_alg, "HS256")) {
        jwt->alg = JWT_ALG_HS256;
        jwt->alg_name = "HS256";
    } else if (!strcmp(cfg->auth_jwt_alg, "RS256")) {
        jwt->alg = JWT_ALG_RS256;
        jwt->alg_name = "RS256";
    } else {
        kp_error("auth", "auth.jwt_alg must be HS256 or RS256");
        goto error;
    }
    jwt->issuer = strdup(cfg->auth_jwt_issuer);
    jwt->audience = strdup(cfg->auth_jwt_audience);
    if (!jwt->issuer || !jwt->audience) abort();
    jwt->ttl = cfg->auth_access_ttl;
    jwt->leeway = cfg->auth_jwt_leeway;
    const char *kid = cfg->auth_jwt_kid;
    if (jwt->alg == JWT_ALG_HS256) {
        if (s_add_key(jwt, kid, strlen(kid), cfg->auth_jwt_key_file)) goto error;
        jwt->sign_len = jwt->keys[0].len;
        jwt->sign_key = malloc(jwt->sign_len);
        if (!jwt->sign_key) abort();
        memcpy(jwt->sign_key, jwt->keys[0].bytes, jwt->sign_len);
    } else {
        if (s_read_file(cfg->auth_jwt_key_file, &jwt->sign_key, &jwt->sign_len)) goto error;
        priv = s_pem_rsa(jwt->sign_key, jwt->sign_len, true, cfg->auth_jwt_key_file);
        if (!priv) goto error;
        if (s_add_key(jwt, kid, strlen(kid), cfg->auth_jwt_public_key_file)) goto error;
        BIO *bio = BIO_new_mem_buf(jwt->keys[0].bytes, (int)jwt->keys[0].len);
        if (!bio) abort();
        pub = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
        BIO_free(bio);
        if (!pub || EVP_PKEY_eq(priv, pub) != 1) {
            kp_error("auth", "%s is not the public key of %s", cfg->auth_jwt_public_key_file,
                     cfg->auth_jwt_key_file);
            goto error;
        }
    }
    if (s_add_previous(jwt, cfg->auth_jwt_previous_keys)) goto error;
    EVP_PKEY_free(priv);
    EVP_PKEY_free(pub);
    return jwt;
error:
    EVP_PKEY_free(priv);
    EVP_PKEY_free(pub);
    kp_jwt_destroy(&jwt);
    return NULL;
}

void kp_jwt_destroy(kp_jwt_t **jwtp)
{
    if (!jwtp || !*jwtp) return;
    kp_jwt_t *jwt = *jwtp;
    s_wipe_free(jwt->sign_key, jwt->sign_len);
    for (size_t i = 0; i < jwt->n_keys; i++)
        s_wipe_free(jwt->keys[i].bytes, jwt->keys[i].len);
    free(jwt->keys);
    free(jwt->issuer);
    free(jwt->audience);
    free(jwt);
    *jwtp = NULL;
}

/* ---------------------------------------------------------------- issue */

static json_t *s_string_array(const char *const *v, size_t n)
{
    json_t *a = json_array();
    if (!a) abort();
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_string(v[i]);
        if (!s) { /* not UTF-8 */
            json_decref(a);
            return NULL;
        }
        json_array_append_new(a, s);
    }
    return a;
}

int kp_jwt_issue(const kp_jwt_t *jwt, const char *sub, const char *const *roles, size_t n_roles,
                 const char *const *sites, size_t n_sites, time_t now, const char *jti,
                 char **token, char **jti_out)
{
    *token = NULL;
    if (jti_out) *jti_out = NULL;
    if (!sub || !*sub || (jti && (!*jti || strlen(jti) > 128))) return KP_EINVAL;
    int rc = KP_EINTERNAL;
    jwt_t *j = NULL;
    char *claims_text = NULL;
    char *id = jti ? strdup(jti) : kp_random_token(16);
    json_t *claims = json_object(), *r = s_string_array(roles, n_roles),
           *s = s_string_array(sites, n_sites), *subj = json_string(sub);
    if (!claims) abort();
    if (!id) goto error;
    if (!r || !s || !subj) {
        rc = KP_EINVAL;
        goto error;
    }
    json_object_set_new(claims, "sub", subj);
    subj = NULL;
    json_object_set_new(claims, "roles", r);
    json_object_set_new(claims, "sites", s);
    r = s = NULL;
    json_object_set_new(claims, "iss", json_string(jwt->issuer));
    json_object_set_new(claims, "aud", json_string(jwt->audience));
    json_t *jid = json_string(id);
    if (!jid) {
        rc = KP_EINVAL;
        goto error;
    }
    json_object_set_new(claims, "jti", jid);
    json_object_set_new(claims, "iat", json_integer((json_int_t)now));
    json_object_set_new(claims, "nbf", json_integer((json_int_t)now));
    json_object_set_new(claims, "exp", json_integer((json_int_t)now + jwt->ttl));
    claims_text = json_dumps(claims, JSON_COMPACT);
    if (!claims_text) abort();
    if (jwt_new(&j) || jwt_set_alg(j, jwt->alg, jwt->sign_key, (int)jwt->sign_len) ||
        jwt_add_header(j, "kid", jwt->keys[0].kid) || jwt_add_grants_json(j, claims_text)) {
        kp_error("auth", "libjwt could not build a token");
        goto error;
    }
    *token = jwt_encode_str(j);
    if (!*token) {
        kp_error("auth", "libjwt could not sign a token: %s", strerror(errno));
        goto error;
    }
    if (jti_out) {
        *jti_out = id;
        id = NULL;
    }
    rc = 0;
error:
    jwt_free(j);
    free(claims_text);
    free(id);
    json_decref(claims);
    json_decref(r);
    json_decref(s);
    json_decref(subj);
    return rc;
}

/* ---------------------------------------------------------------- verify */

const char *kp_jwt_reason_str(kp_jwt_reason_t reason)
{
    switch (reason) {
    case KP_JWT_OK:
        return "ok";
    case KP_JWT_MALFORMED:
        return "malformed";
    case KP_JWT_BAD_ALG:
        return "bad_alg";
    case KP_JWT_UNKNOWN_KID:
        return "unknown_kid";
    case KP_JWT_BAD_SIGNATURE:
        return "bad_signature";
    case KP_JWT_EXPIRED:
        return "expired";
    case KP_JWT_NOT_YET_VALID:
        return "not_yet_valid";
    case KP_JWT_BAD_ISSUER:
        return "bad_issuer";
    case KP_JWT_BAD_AUDIENCE:
        return "bad_audience";
    case KP_JWT_MISSING_CLAIM:
        return "missing_claim";
    }
    return "unknown";
}

void kp_jwt_claims_clear(kp_jwt_claims_t *c)
{
    if (!c) return;
    free(c->sub);
    free(c->jti);
    for (size_t i = 0; i < c->n_roles; i++)
        free(c->roles[i]);
    free(c->roles);
    for (size_t i = 0; i < c->n_sites; i++)
        free(c->sites[i]);
    free(c->sites);
    memset(c, 0, sizeof *c);
}

static bool s_is_b64url(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s_b64_value(s[i], true) < 0) return false;
    return len > 0;
}

/* Copies an optional array of strings; false when present but not an array of strings. */
static bool s_copy_strings(json_t *a, char ***out, size_t *n)
{
    if (!a) return true;
    if (!json_is_array(a)) return false;
    size_t len = json_array_size(a);
    for (size_t i = 0; i < len; i++)
        if (!json_is_string(json_array_get(a, i))) return false;
    *out = calloc(len ? len : 1, sizeof **out);
    if (!*out) abort();
    for (size_t i = 0; i < len; i++) {
        (*out)[i] = strdup(json_string_value(json_array_get(a, i)));
        if (!(*out)[i]) abort();
    }
    *n = len;
    return true;
}

static const char *s_nonempty_string(json_t *obj, const char *key)
{
    const char *v = json_string_value(json_object_get(obj, key));
    return v && *v ? v : NULL;
}

static bool s_audience_ok(json_t *aud, const char *want)
{
    if (json_is_string(aud)) return !strcmp(json_string_value(aud), want);
    if (!json_is_array(aud)) return false;
    for (size_t i = 0; i < json_array_size(aud); i++) {
        const char *v = json_string_value(json_array_get(aud, i));
        if (v && !strcmp(v, want)) return true;
    }
    return false;
}

int kp_jwt_verify(const kp_jwt_t *jwt, const char *token, time_t now, kp_jwt_claims_t *claims,
                  kp_jwt_reason_t *reason)
{
    kp_jwt_reason_t why = KP_JWT_MALFORMED;
    json_t *head = NULL, *body = NULL;
    jwt_t *j = NULL;
    if (claims) memset(claims, 0, sizeof *claims);
    if (!jwt || !token || !claims) {
        if (reason) *reason = KP_JWT_MALFORMED;
        return KP_EINVAL;
    }
    /* Shape: three base64url parts, the signature never empty. */
    size_t len = strnlen(token, KP_JWT_MAX_LEN + 1);
    if (len == 0 || len > KP_JWT_MAX_LEN) goto error;
    const char *d1 = strchr(token, '.');
    const char *d2 = d1 ? strchr(d1 + 1, '.') : NULL;
    if (!d2 || strchr(d2 + 1, '.')) goto error;
    size_t hl = (size_t)(d1 - token), pl = (size_t)(d2 - d1 - 1),
           sl = len - (size_t)(d2 + 1 - token);
    if (!s_is_b64url(token, hl) || !s_is_b64url(d1 + 1, pl) || !s_is_b64url(d2 + 1, sl)) goto error;
    /* Header: our alg exactly, typ JWT if present, no crit, a known kid. */
    head = s_segment_json(token, hl);
    if (!head) goto error;
    const char *alg = json_string_value(json_object_get(head, "alg"));
    if (!alg || strcmp(alg, jwt->alg_name)) {
        why = KP_JWT_BAD_ALG;
        goto error;
    }
    json_t *typ = json_object_get(head, "typ");
    if (json_object_get(head, "crit") ||
        (typ && (!json_is_string(typ) || strcasecmp(json_string_value(typ), "JWT"))))
        goto error;
    const char *kid = json_string_value(json_object_get(head, "kid"));
    const struct s_key *key = kid ? s_find_key(jwt, kid) : NULL;
    if (!key) {
        why = KP_JWT_UNKNOWN_KID;
        goto error;
    }
    /* Signature, by libjwt, with the key of that kid; then make sure it used our alg. */
    if (jwt_decode(&j, token, key->bytes, (int)key->len) || !j) {
        why = KP_JWT_BAD_SIGNATURE;
        goto error;
    }
    if (jwt_get_alg(j) != jwt->alg) {
        why = KP_JWT_BAD_ALG;
        goto error;
    }
    /* Claims, from the signed payload. */
    body = s_segment_json(d1 + 1, pl);
    if (!body) goto error;
    json_t *exp = json_object_get(body, "exp"), *nbf = json_object_get(body, "nbf"),
           *iat = json_object_get(body, "iat");
    if (!json_is_integer(exp) || (nbf && !json_is_integer(nbf)) || (iat && !json_is_integer(iat)))
        goto error;
    int64_t t = (int64_t)now, lw = jwt->leeway;
    if (t >= (int64_t)json_integer_value(exp) + lw) {
        why = KP_JWT_EXPIRED;
        goto error;
    }
    if ((nbf && t + lw < (int64_t)json_integer_value(nbf)) ||
        (iat && t + lw < (int64_t)json_integer_value(iat))) {
        why = KP_JWT_NOT_YET_VALID;
        goto error;
    }
    const char *iss = json_string_value(json_object_get(body, "iss"));
    if (!iss || strcmp(iss, jwt->issuer)) {
        why = KP_JWT_BAD_ISSUER;
        goto error;
    }
    if (!s_audience_ok(json_object_get(body, "aud"), jwt->audience)) {
        why = KP_JWT_BAD_AUDIENCE;
        goto error;
    }
    const char *sub = s_nonempty_string(body, "sub"), *jti = s_nonempty_string(body, "jti");
    if (!sub || !jti) {
        why = KP_JWT_MISSING_CLAIM;
        goto error;
    }
    if (!s_copy_strings(json_object_get(body, "roles"), &claims->roles, &claims->n_roles) ||
        !s_copy_strings(json_object_get(body, "sites"), &claims->sites, &claims->n_sites))
        goto error;
    claims->sub = strdup(sub);
    claims->jti = strdup(jti);
    if (!claims->sub || !claims->jti) abort();
    claims->exp = (int64_t)json_integer_value(exp);
    claims->iat = iat ? (int64_t)json_integer_value(iat) : 0;
    json_decref(head);
    json_decref(body);
    jwt_free(j);
    if (reason) *reason = KP_JWT_OK;
    return 0;
error:
    kp_jwt_claims_clear(claims);
    json_decref(head);
    json_decref(body);
    jwt_free(j);
    if (reason) *reason = why;
    kp_debug("auth", "access token refused: %s", kp_jwt_reason_str(why));
    return KP_EUNAUTH;
}

/* ---------------------------------------------------------------- keygen */

static int s_mkdir_parents(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return KP_EINVAL;
    char *slash = strrchr(buf, '/');
    if (!slash || slash == buf) return 0;
    *slash = 0;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0700) && errno != EEXIST) return KP_EIO;
        *p = '/';
    }
    if (mkdir(buf, 0700) && errno != EEXIST) return KP_EIO;
    return 0;
}

/* Creates path exclusively with mode and returns it as a stdio stream, or NULL (logged). */
static FILE *s_create(const char *path, mode_t mode)
{
    if (s_mkdir_parents(path)) {
        kp_error("auth", "cannot create the directory of %s: %s", path, strerror(errno));
        return NULL;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        kp_error("auth", "cannot create %s: %s", path, strerror(errno));
        if (fd >= 0) close(fd);
    }
    return f;
}

static int s_close(FILE *f, const char *path, bool ok)
{
    if (fflush(f) || fsync(fileno(f))) ok = false;
    if (fclose(f)) ok = false;
    if (!ok) {
        kp_error("auth", "cannot write %s", path);
        unlink(path);
        return KP_EIO;
    }
    kp_info("auth", "created JWT key file %s", path);
    return 0;
}

int kp_jwt_keygen(const kp_config_t *cfg)
{
    const char *key = cfg->auth_jwt_key_file, *pubf = cfg->auth_jwt_public_key_file;
    bool rsa = !strcmp(cfg->auth_jwt_alg, "RS256");
    EVP_PKEY *pk = NULL;
    int rc = 0;
    if (access(key, F_OK)) {
        FILE *f = s_create(key, 0600);
        if (!f) return KP_EIO;
        bool ok;
        if (!rsa) {
            unsigned char raw[32], b64[48];
            ok = RAND_bytes(raw, sizeof raw) == 1;
            EVP_EncodeBlock(b64, raw, sizeof raw);
            ok = ok && fprintf(f, "%s\n", b64) > 0;
            OPENSSL_cleanse(raw, sizeof raw);
            OPENSSL_cleanse(b64, sizeof b64);
        } else {
            pk = EVP_RSA_gen(2048);
            ok = pk && PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL) == 1;
        }
        rc = s_close(f, key, ok);
        if (rc) goto done;
    }
    if (rsa && access(pubf, F_OK)) {
        if (!pk) {
            unsigned char *pem;
            size_t len;
            if (s_read_file(key, &pem, &len)) return KP_EIO;
            pk = s_pem_rsa(pem, len, true, key);
            s_wipe_free(pem, len);
            if (!pk) return KP_EIO;
        }
        FILE *f = s_create(pubf, 0644);
        if (!f) {
            rc = KP_EIO;
            goto done;
        }
        rc = s_close(f, pubf, PEM_write_PUBKEY(f, pk) == 1);
    }
done:
    EVP_PKEY_free(pk);
    return rc;
}
