/* Unit tests of kp_jwt: HS256 and RS256 round trips, key generation, key rotation, and the
 * attacks a verifier must refuse (alg none, HS256 MACed with the RSA public key, expired, not yet
 * valid, wrong iss/aud, tampered payload, unknown kid, garbage, oversized tokens). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_config.h"
#include "kp_errors.h"
#include "kp_jwt.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char s_dir[64];
static const time_t s_now = 1800000000;

static int s_setup(void **state)
{
    (void)state;
    snprintf(s_dir, sizeof s_dir, "/tmp/kp-test-jwt-XXXXXX");
    return mkdtemp(s_dir) ? 0 : -1;
}

static int s_teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", s_dir);
    return system(cmd);
}

/* ---------------------------------------------------------------- helpers */

static void s_path(char *out, size_t len, const char *name)
{
    snprintf(out, len, "%s/%s", s_dir, name);
}

/* A config for alg with the key files <name>.key / <name>.pub in the test directory. */
static kp_config_t *s_cfg(const char *alg, const char *name, const char *kid, const char *prev)
{
    char err[256], p[256];
    kp_config_t *c = kp_config_new();
    assert_non_null(c);
    assert_int_equal(kp_config_set(c, "auth.jwt_alg", alg, err, sizeof err), 0);
    snprintf(p, sizeof p, "%s/%s.key", s_dir, name);
    assert_int_equal(kp_config_set(c, "auth.jwt_key_file", p, err, sizeof err), 0);
    snprintf(p, sizeof p, "%s/%s.pub", s_dir, name);
    assert_int_equal(kp_config_set(c, "auth.jwt_public_key_file", p, err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "auth.jwt_kid", kid, err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "auth.jwt_previous_keys", prev ? prev : "", err, sizeof err),
                     0);
    return c;
}

/* Generates the key files of (alg, name) and opens a keyring for them. */
static kp_jwt_t *s_keyring(const char *alg, const char *name, const char *kid, const char *prev)
{
    kp_config_t *c = s_cfg(alg, name, kid, prev);
    assert_int_equal(kp_jwt_keygen(c), 0);
    kp_jwt_t *j = kp_jwt_new(c);
    kp_config_destroy(&c);
    return j;
}

static char *s_b64url(const void *data, size_t len)
{
    char *out = malloc(4 * ((len + 2) / 3) + 1);
    int n = EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    while (n > 0 && out[n - 1] == '=')
        n--;
    out[n] = 0;
    for (char *p = out; *p; p++)
        *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
    return out;
}

static char *s_b64url_decode(const char *s, size_t len)
{
    char buf[8192];
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        buf[n++] = s[i] == '-' ? '+' : s[i] == '_' ? '/' : s[i];
    while (n % 4)
        buf[n++] = '=';
    buf[n] = 0;
    unsigned char *out = calloc(1, n + 1);
    int m = EVP_DecodeBlock(out, (unsigned char *)buf, (int)n);
    assert_true(m >= 0);
    return (char *)out;
}

/* The secret bytes of an HS256 key file. */
static size_t s_hs_secret(const char *name, unsigned char *out)
{
    char p[256], text[256];
    snprintf(p, sizeof p, "%s/%s.key", s_dir, name);
    FILE *f = fopen(p, "r");
    assert_non_null(f);
    assert_non_null(fgets(text, sizeof text, f));
    fclose(f);
    text[strcspn(text, "\n")] = 0;
    int n = EVP_DecodeBlock(out, (unsigned char *)text, (int)strlen(text));
    assert_int_equal(n, 33); /* 44 characters with one '=' decode to 33 bytes, the last a pad */
    return 32;
}

static unsigned char *s_file(const char *name, size_t *len)
{
    char p[256];
    snprintf(p, sizeof p, "%s/%s", s_dir, name);
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    unsigned char *buf = calloc(1, 65536);
    *len = fread(buf, 1, 65535, f);
    fclose(f);
    return buf;
}

/* Builds header.payload.HMAC-SHA256(key) from JSON texts (key NULL: signature `sig` as given). */
static char *s_token(const char *header, const char *payload, const unsigned char *key,
                     size_t keylen, const char *sig)
{
    char *h = s_b64url(header, strlen(header)), *p = s_b64url(payload, strlen(payload));
    char *signing = malloc(strlen(h) + strlen(p) + 2), *s;
    sprintf(signing, "%s.%s", h, p);
    if (key) {
        unsigned char mac[32];
        unsigned int maclen = 0;
        HMAC(EVP_sha256(), key, (int)keylen, (unsigned char *)signing, strlen(signing), mac,
             &maclen);
        s = s_b64url(mac, maclen);
    } else {
        s = strdup(sig);
    }
    char *tok = malloc(strlen(signing) + strlen(s) + 2);
    sprintf(tok, "%s.%s", signing, s);
    free(h);
    free(p);
    free(s);
    free(signing);
    return tok;
}

/* Valid claims at s_now, with one member replaced or removed through `extra` edits. */
static void s_claims(char *out, size_t len, const char *sub_part, const char *exp_part,
                     const char *rest)
{
    snprintf(out, len,
             "{%s,\"roles\":[\"doctor\"],\"sites\":[\"north\"],%s,\"iat\":%lld,\"nbf\":%lld,"
             "\"iss\":\"klinika-pacs\",\"aud\":\"klinika-pacs\"%s}",
             sub_part, exp_part, (long long)s_now, (long long)s_now, rest);
}

static kp_jwt_reason_t s_verify(const kp_jwt_t *j, const char *tok, time_t now)
{
    kp_jwt_claims_t c;
    kp_jwt_reason_t r = KP_JWT_OK;
    int rc = kp_jwt_verify(j, tok, now, &c, &r);
    if (rc == 0) {
        assert_int_equal(r, KP_JWT_OK);
        kp_jwt_claims_clear(&c);
    } else {
        assert_int_equal(rc, KP_EUNAUTH);
        assert_int_not_equal(r, KP_JWT_OK);
        assert_null(c.sub);
        assert_null(c.roles);
    }
    return r;
}

static const char *s_roles[] = {"doctor", "operator"};
static const char *s_sites[] = {"north", "south"};

/* noinline: GCC 12 otherwise mistakes the returned heap pointer for one to the local `tok`
 * (-Wdangling-pointer false positive). */
__attribute__((noinline)) static char *s_issue(const kp_jwt_t *j, time_t now)
{
    char *tok = NULL;
    int rc = kp_jwt_issue(j, "42", s_roles, 2, s_sites, 2, now, NULL, &tok, NULL);
    assert_int_equal(rc, 0);
    return tok;
}

/* ---------------------------------------------------------------- tests */

static void s_round_trip(const char *alg, const char *name)
{
    kp_jwt_t *j = s_keyring(alg, name, "k1", NULL);
    assert_non_null(j);
    char *tok = NULL, *jti = NULL;
    assert_int_equal(kp_jwt_issue(j, "42", s_roles, 2, s_sites, 2, s_now, NULL, &tok, &jti), 0);
    assert_non_null(tok);
    assert_true(strlen(jti) >= 22);
    /* header: our alg and kid */
    char *head = s_b64url_decode(tok, strchr(tok, '.') - tok);
    char want[64];
    snprintf(want, sizeof want, "\"alg\":\"%s\"", alg);
    assert_non_null(strstr(head, want));
    assert_non_null(strstr(head, "\"kid\":\"k1\""));
    free(head);

    kp_jwt_claims_t c;
    kp_jwt_reason_t r = KP_JWT_MALFORMED;
    assert_int_equal(kp_jwt_verify(j, tok, s_now, &c, &r), 0);
    assert_int_equal(r, KP_JWT_OK);
    assert_string_equal(c.sub, "42");
    assert_string_equal(c.jti, jti);
    assert_int_equal(c.n_roles, 2);
    assert_string_equal(c.roles[0], "doctor");
    assert_string_equal(c.roles[1], "operator");
    assert_int_equal(c.n_sites, 2);
    assert_string_equal(c.sites[1], "south");
    assert_int_equal(c.exp, s_now + 900);
    assert_int_equal(c.iat, s_now);
    kp_jwt_claims_clear(&c);
    kp_jwt_claims_clear(&c); /* idempotent */
    /* valid up to exp + leeway (30 s), not after */
    assert_int_equal(s_verify(j, tok, s_now + 929), KP_JWT_OK);
    assert_int_equal(s_verify(j, tok, s_now + 930), KP_JWT_EXPIRED);
    /* no roles, no sites: empty arrays */
    char *tok2 = NULL;
    assert_int_equal(kp_jwt_issue(j, "7", NULL, 0, NULL, 0, s_now, NULL, &tok2, NULL), 0);
    assert_int_equal(kp_jwt_verify(j, tok2, s_now, &c, &r), 0);
    assert_int_equal(c.n_roles, 0);
    assert_int_equal(c.n_sites, 0);
    kp_jwt_claims_clear(&c);
    /* a caller-chosen jti (e.g. bound to a session) comes back as is */
    char *tok3 = NULL, *tok4 = NULL, *jti4 = NULL;
    assert_int_equal(kp_jwt_issue(j, "7", NULL, 0, NULL, 0, s_now, "sess-1.abc", &tok4, &jti4), 0);
    assert_string_equal(jti4, "sess-1.abc");
    assert_int_equal(kp_jwt_verify(j, tok4, s_now, &c, &r), 0);
    assert_string_equal(c.jti, "sess-1.abc");
    kp_jwt_claims_clear(&c);
    assert_int_equal(kp_jwt_issue(j, "7", NULL, 0, NULL, 0, s_now, "", &tok3, NULL), KP_EINVAL);
    free(tok4);
    free(jti4);
    /* empty subject refused at issue */
    assert_int_equal(kp_jwt_issue(j, "", NULL, 0, NULL, 0, s_now, NULL, &tok3, NULL), KP_EINVAL);
    assert_null(tok3);
    free(tok);
    free(tok2);
    free(jti);
    kp_jwt_destroy(&j);
    assert_null(j);
    kp_jwt_destroy(&j);
}

static void test_hs256_round_trip(void **state)
{
    (void)state;
    s_round_trip("HS256", "hs");
    /* the generated secret file is private */
    char p[256];
    struct stat st;
    s_path(p, sizeof p, "hs.key");
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
}

static void test_rs256_round_trip(void **state)
{
    (void)state;
    s_round_trip("RS256", "rs");
    char p[256];
    struct stat st;
    s_path(p, sizeof p, "rs.key");
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    size_t len;
    unsigned char *pub = s_file("rs.pub", &len);
    assert_non_null(strstr((char *)pub, "-----BEGIN PUBLIC KEY-----"));
    free(pub);
}

static void test_keygen_keeps_existing(void **state)
{
    (void)state;
    kp_config_t *c = s_cfg("HS256", "keep", "k1", NULL);
    assert_int_equal(kp_jwt_keygen(c), 0);
    size_t l1, l2;
    unsigned char *a = s_file("keep.key", &l1);
    assert_int_equal(kp_jwt_keygen(c), 0);
    unsigned char *b = s_file("keep.key", &l2);
    assert_int_equal(l1, l2);
    assert_memory_equal(a, b, l1);
    free(a);
    free(b);
    /* RS256: a missing public key is derived from the existing private key */
    kp_config_destroy(&c);
    c = s_cfg("RS256", "rs", "k1", NULL);
    assert_int_equal(kp_jwt_keygen(c), 0);
    a = s_file("rs.pub", &l1);
    char p[256];
    s_path(p, sizeof p, "rs.pub");
    assert_int_equal(unlink(p), 0);
    assert_int_equal(kp_jwt_keygen(c), 0);
    b = s_file("rs.pub", &l2);
    assert_int_equal(l1, l2);
    assert_memory_equal(a, b, l1);
    free(a);
    free(b);
    kp_config_destroy(&c);
}

static void test_alg_none(void **state)
{
    (void)state;
    kp_jwt_t *hs = s_keyring("HS256", "hs", "k1", NULL);
    kp_jwt_t *rs = s_keyring("RS256", "rs", "k1", NULL);
    char claims[512];
    s_claims(claims, sizeof claims, "\"sub\":\"1\"", "\"exp\":1800000900", ",\"jti\":\"x\"");
    const char *heads[] = {
        "{\"alg\":\"none\",\"typ\":\"JWT\",\"kid\":\"k1\"}",
        "{\"alg\":\"None\",\"typ\":\"JWT\",\"kid\":\"k1\"}",
        "{\"alg\":\"NONE\",\"kid\":\"k1\"}",
        "{\"typ\":\"JWT\",\"kid\":\"k1\"}",
        "{\"alg\":\"HS256 \",\"kid\":\"k1\"}",
        "{\"alg\":\"HS512\",\"kid\":\"k1\"}",
        "{\"alg\":256,\"kid\":\"k1\"}",
    };
    for (size_t i = 0; i < sizeof heads / sizeof *heads; i++) {
        /* with an empty signature (the usual form) and with some bytes in it */
        char *t1 = s_token(heads[i], claims, NULL, 0, "");
        char *t2 = s_token(heads[i], claims, NULL, 0, "AAAA");
        assert_int_not_equal(s_verify(hs, t1, s_now), KP_JWT_OK);
        assert_int_not_equal(s_verify(rs, t1, s_now), KP_JWT_OK);
        assert_int_equal(s_verify(hs, t2, s_now), KP_JWT_BAD_ALG);
        assert_int_equal(s_verify(rs, t2, s_now), KP_JWT_BAD_ALG);
        free(t1);
        free(t2);
    }
    kp_jwt_destroy(&hs);
    kp_jwt_destroy(&rs);
}

static void test_hs256_with_rsa_public_key(void **state)
{
    (void)state;
    kp_jwt_t *rs = s_keyring("RS256", "rs", "k1", NULL);
    size_t publen;
    unsigned char *pub = s_file("rs.pub", &publen);
    char claims[512];
    s_claims(claims, sizeof claims, "\"sub\":\"1\"", "\"exp\":1800000900", ",\"jti\":\"x\"");
    /* the classic confusion: HS256 MACed with the public key PEM as the secret */
    char *t =
        s_token("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}", claims, pub, publen, NULL);
    assert_int_equal(s_verify(rs, t, s_now), KP_JWT_BAD_ALG);
    free(t);
    /* the same MAC under an RS256 header: not an RSA signature */
    t = s_token("{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}", claims, pub, publen, NULL);
    assert_int_equal(s_verify(rs, t, s_now), KP_JWT_BAD_SIGNATURE);
    free(t);
    /* and an HS256 verifier never accepts an RS256 token */
    kp_jwt_t *hs = s_keyring("HS256", "hs", "k1", NULL);
    char *rtok = s_issue(rs, s_now);
    assert_int_equal(s_verify(rs, rtok, s_now), KP_JWT_OK);
    assert_int_equal(s_verify(hs, rtok, s_now), KP_JWT_BAD_ALG);
    char *htok = s_issue(hs, s_now);
    assert_int_equal(s_verify(rs, htok, s_now), KP_JWT_BAD_ALG);
    free(rtok);
    free(htok);
    free(pub);
    kp_jwt_destroy(&rs);
    kp_jwt_destroy(&hs);
}

static void test_times(void **state)
{
    (void)state;
    kp_jwt_t *j = s_keyring("HS256", "hs", "k1", NULL);
    /* expired: issued 2000 s ago with a 900 s lifetime */
    char *t = s_issue(j, s_now - 2000);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_EXPIRED);
    free(t);
    /* not yet valid: nbf two minutes ahead; within the 30 s leeway it is fine */
    t = s_issue(j, s_now + 120);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_NOT_YET_VALID);
    assert_int_equal(s_verify(j, t, s_now + 89), KP_JWT_NOT_YET_VALID);
    assert_int_equal(s_verify(j, t, s_now + 90), KP_JWT_OK);
    free(t);
    /* hand-built: nbf in the future but iat now, no nbf at all, exp missing or not a number */
    unsigned char key[64];
    size_t kl = s_hs_secret("hs", key);
    const char *h = "{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}";
    char claims[512];
    snprintf(claims, sizeof claims,
             "{\"sub\":\"1\",\"jti\":\"x\",\"exp\":%lld,\"nbf\":%lld,\"iss\":\"klinika-pacs\","
             "\"aud\":\"klinika-pacs\"}",
             (long long)s_now + 900, (long long)s_now + 3600);
    t = s_token(h, claims, key, kl, NULL);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_NOT_YET_VALID);
    free(t);
    snprintf(claims, sizeof claims,
             "{\"sub\":\"1\",\"jti\":\"x\",\"exp\":%lld,\"iss\":\"klinika-pacs\","
             "\"aud\":\"klinika-pacs\"}",
             (long long)s_now + 900);
    t = s_token(h, claims, key, kl, NULL);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_OK);
    free(t);
    /* issued in the future (no nbf) */
    snprintf(claims, sizeof claims,
             "{\"sub\":\"1\",\"jti\":\"x\",\"exp\":%lld,\"iat\":%lld,\"iss\":\"klinika-pacs\","
             "\"aud\":\"klinika-pacs\"}",
             (long long)s_now + 900, (long long)s_now + 600);
    t = s_token(h, claims, key, kl, NULL);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_NOT_YET_VALID);
    free(t);
    t = s_token(h,
                "{\"sub\":\"1\",\"jti\":\"x\",\"iss\":\"klinika-pacs\",\"aud\":\"klinika-pacs\"}",
                key, kl, NULL);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_MALFORMED);
    free(t);
    s_claims(claims, sizeof claims, "\"sub\":\"1\"", "\"exp\":\"1800000900\"", ",\"jti\":\"x\"");
    t = s_token(h, claims, key, kl, NULL);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_MALFORMED);
    free(t);
    kp_jwt_destroy(&j);
}

static void test_issuer_audience(void **state)
{
    (void)state;
    char err[256];
    kp_jwt_t *j = s_keyring("HS256", "hs", "k1", NULL);
    /* same key, other iss */
    kp_config_t *c = s_cfg("HS256", "hs", "k1", NULL);
    assert_int_equal(kp_config_set(c, "auth.jwt_issuer", "someone-else", err, sizeof err), 0);
    kp_jwt_t *other = kp_jwt_new(c);
    assert_non_null(other);
    char *t = s_issue(other, s_now);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_BAD_ISSUER);
    free(t);
    kp_jwt_destroy(&other);
    /* same key, other aud */
    assert_int_equal(kp_config_set(c, "auth.jwt_issuer", "klinika-pacs", err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "auth.jwt_audience", "billing", err, sizeof err), 0);
    other = kp_jwt_new(c);
    t = s_issue(other, s_now);
    assert_int_equal(s_verify(j, t, s_now), KP_JWT_BAD_AUDIENCE);
    assert_int_equal(s_verify(other, t, s_now), KP_JWT_OK);
    free(t);
    kp_jwt_destroy(&other);
    kp_config_destroy(&c);
    /* aud as an array containing ours is fine; missing iss/aud/sub/jti are refused */
    unsigned char key[64];
    size_t kl = s_hs_secret("hs", key);
    const char *h = "{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}";
    static const struct {
        const char *claims;
        kp_jwt_reason_t want;
    } cases[] = {
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":[\"x\",\"klinika-pacs\"]}",
         KP_JWT_OK},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":[\"x\"]}",
         KP_JWT_BAD_AUDIENCE},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\"}",
         KP_JWT_BAD_AUDIENCE},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"aud\":\"klinika-pacs\"}",
         KP_JWT_BAD_ISSUER},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":[\"klinika-pacs\"],"
         "\"aud\":\"klinika-pacs\"}",
         KP_JWT_BAD_ISSUER},
        {"{\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\",\"aud\":\"klinika-pacs\"}",
         KP_JWT_MISSING_CLAIM},
        {"{\"sub\":\"\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":\"klinika-pacs\"}",
         KP_JWT_MISSING_CLAIM},
        {"{\"sub\":\"1\",\"exp\":1800000900,\"iss\":\"klinika-pacs\",\"aud\":\"klinika-pacs\"}",
         KP_JWT_MISSING_CLAIM},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":\"klinika-pacs\",\"roles\":\"admin\"}",
         KP_JWT_MALFORMED},
        {"{\"sub\":\"1\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":\"klinika-pacs\",\"sites\":[1]}",
         KP_JWT_MALFORMED},
        {"{\"sub\":\"1\",\"sub\":\"2\",\"jti\":\"x\",\"exp\":1800000900,\"iss\":\"klinika-pacs\","
         "\"aud\":\"klinika-pacs\"}",
         KP_JWT_MALFORMED},
        {"[1,2,3]", KP_JWT_MALFORMED},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        t = s_token(h, cases[i].claims, key, kl, NULL);
        assert_int_equal(s_verify(j, t, s_now), cases[i].want);
        free(t);
    }
    kp_jwt_destroy(&j);
}

static void test_tampered_payload(void **state)
{
    (void)state;
    kp_jwt_t *hs = s_keyring("HS256", "hs", "k1", NULL);
    kp_jwt_t *rs = s_keyring("RS256", "rs", "k1", NULL);
    kp_jwt_t *rings[] = {hs, rs};
    for (int r = 0; r < 2; r++) {
        char *t = s_issue(rings[r], s_now);
        const char *d1 = strchr(t, '.'), *d2 = strchr(d1 + 1, '.');
        char *payload = s_b64url_decode(d1 + 1, (size_t)(d2 - d1 - 1));
        /* become admin */
        char *p = strstr(payload, "\"doctor\"");
        assert_non_null(p);
        char forged[1024];
        snprintf(forged, sizeof forged, "%.*s\"admin\",%s", (int)(p - payload), payload, p);
        char *fp = s_b64url(forged, strlen(forged));
        char tok[4096];
        snprintf(tok, sizeof tok, "%.*s.%s%s", (int)(d1 - t), t, fp, d2);
        assert_int_equal(s_verify(rings[r], tok, s_now), KP_JWT_BAD_SIGNATURE);
        /* one bit of the signature flipped */
        snprintf(tok, sizeof tok, "%s", t);
        char *last = tok + strlen(tok) - 3;
        *last = *last == 'A' ? 'B' : 'A';
        assert_int_equal(s_verify(rings[r], tok, s_now), KP_JWT_BAD_SIGNATURE);
        /* signature removed, or of another token */
        snprintf(tok, sizeof tok, "%.*s", (int)(d2 - t + 1), t);
        assert_int_not_equal(s_verify(rings[r], tok, s_now), KP_JWT_OK);
        char *other = s_issue(rings[r], s_now + 1);
        snprintf(tok, sizeof tok, "%.*s%s", (int)(d2 - t), t, strrchr(other, '.'));
        assert_int_equal(s_verify(rings[r], tok, s_now), KP_JWT_BAD_SIGNATURE);
        free(other);
        free(fp);
        free(payload);
        free(t);
    }
    kp_jwt_destroy(&hs);
    kp_jwt_destroy(&rs);
}

static void test_unknown_kid(void **state)
{
    (void)state;
    kp_jwt_t *a = s_keyring("HS256", "hs", "k1", NULL);
    kp_jwt_t *b = s_keyring("HS256", "hs", "k2", NULL); /* same key, other id */
    char *t = s_issue(a, s_now);
    assert_int_equal(s_verify(b, t, s_now), KP_JWT_UNKNOWN_KID);
    free(t);
    /* no kid at all, correctly MACed */
    unsigned char key[64];
    size_t kl = s_hs_secret("hs", key);
    char claims[512];
    s_claims(claims, sizeof claims, "\"sub\":\"1\"", "\"exp\":1800000900", ",\"jti\":\"x\"");
    t = s_token("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_UNKNOWN_KID);
    free(t);
    t = s_token("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":1}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_UNKNOWN_KID);
    free(t);
    /* the same token with kid k1 is accepted: the MAC above is right */
    t = s_token("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_OK);
    free(t);
    /* header extensions we do not understand */
    t = s_token("{\"alg\":\"HS256\",\"kid\":\"k1\",\"crit\":[\"exp\"]}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_MALFORMED);
    free(t);
    t = s_token("{\"alg\":\"HS256\",\"kid\":\"k1\",\"typ\":\"JWE\"}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_MALFORMED);
    free(t);
    t = s_token("{\"alg\":\"HS256\",\"alg\":\"HS256\",\"kid\":\"k1\"}", claims, key, kl, NULL);
    assert_int_equal(s_verify(a, t, s_now), KP_JWT_MALFORMED);
    free(t);
    kp_jwt_destroy(&a);
    kp_jwt_destroy(&b);
}

static void s_rotation(const char *alg, const char *old_name, const char *new_name,
                       const char *old_verify_file)
{
    kp_jwt_t *old = s_keyring(alg, old_name, "k1", NULL);
    assert_non_null(old);
    char *t_old = s_issue(old, s_now);
    /* k2 current, k1 kept for verification */
    char prev[300];
    snprintf(prev, sizeof prev, " k1 = %s/%s ", s_dir, old_verify_file);
    kp_jwt_t *rot = s_keyring(alg, new_name, "k2", prev);
    assert_non_null(rot);
    assert_int_equal(s_verify(rot, t_old, s_now), KP_JWT_OK);
    char *t_new = s_issue(rot, s_now);
    char *head = s_b64url_decode(t_new, (size_t)(strchr(t_new, '.') - t_new));
    assert_non_null(strstr(head, "\"kid\":\"k2\""));
    free(head);
    assert_int_equal(s_verify(rot, t_new, s_now), KP_JWT_OK);
    /* the old keyring does not know k2 */
    assert_int_equal(s_verify(old, t_new, s_now), KP_JWT_UNKNOWN_KID);
    /* k1 removed: old tokens fail, new ones still pass */
    kp_jwt_t *after = s_keyring(alg, new_name, "k2", NULL);
    assert_int_equal(s_verify(after, t_old, s_now), KP_JWT_UNKNOWN_KID);
    assert_int_equal(s_verify(after, t_new, s_now), KP_JWT_OK);
    /* k1 pointing at another key: a bad signature, not an acceptance */
    char third_name[32];
    snprintf(third_name, sizeof third_name, "third-%s", alg);
    kp_jwt_t *third = s_keyring(alg, third_name, "k3", NULL); /* generates its key files */
    kp_jwt_destroy(&third);
    snprintf(prev, sizeof prev, "k1=%s/%s.%s", s_dir, third_name,
             strcmp(alg, "HS256") ? "pub" : "key");
    kp_jwt_t *wrong = s_keyring(alg, new_name, "k2", prev);
    assert_non_null(wrong);
    assert_int_equal(s_verify(wrong, t_old, s_now), KP_JWT_BAD_SIGNATURE);
    kp_jwt_destroy(&wrong);
    kp_jwt_destroy(&after);
    kp_jwt_destroy(&rot);
    kp_jwt_destroy(&old);
    free(t_old);
    free(t_new);
}

static void test_rotation(void **state)
{
    (void)state;
    s_rotation("HS256", "hs-old", "hs-new", "hs-old.key");
    s_rotation("RS256", "rs-old", "rs-new", "rs-old.pub");
}

static void test_garbage(void **state)
{
    (void)state;
    kp_jwt_t *j = s_keyring("HS256", "hs", "k1", NULL);
    kp_jwt_t *rs = s_keyring("RS256", "rs", "k1", NULL);
    char *good = s_issue(j, s_now);
    const char *d1 = strchr(good, '.');
    char buf[1024];
    const char *junk[] = {
        "",
        ".",
        "..",
        "...",
        "a",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "!!!.@@@.###",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9..",
        "e30.e30.e30",                                   /* {} */
        "W10.W10.AAAA",                                  /* [] */
        "bnVsbA.bnVsbA.AAAA",                            /* null */
        "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.AA.AAAA",   /* payload one NUL byte */
        "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0=.e30.AAAA", /* padding */
        "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.e30.AAAA",  /* {} payload, bad signature */
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.AAAA",
    };
    for (size_t i = 0; i < sizeof junk / sizeof *junk; i++) {
        assert_int_not_equal(s_verify(j, junk[i], s_now), KP_JWT_OK);
        assert_int_not_equal(s_verify(rs, junk[i], s_now), KP_JWT_OK);
    }
    assert_int_equal(s_verify(j, "", s_now), KP_JWT_MALFORMED);
    assert_int_equal(s_verify(j, "a.b.c", s_now), KP_JWT_MALFORMED);
    /* header of a valid token with a non-JSON payload */
    snprintf(buf, sizeof buf, "%.*s.bm90IGpzb24.AAAA", (int)(d1 - good), good);
    assert_int_not_equal(s_verify(j, buf, s_now), KP_JWT_OK);
    /* a trailing newline or space is not the same token */
    snprintf(buf, sizeof buf, "%s\n", good);
    assert_int_equal(s_verify(j, buf, s_now), KP_JWT_MALFORMED);
    snprintf(buf, sizeof buf, " %s", good);
    assert_int_equal(s_verify(j, buf, s_now), KP_JWT_MALFORMED);
    assert_int_equal(s_verify(j, good, s_now), KP_JWT_OK);
    /* 100 KB: a valid token with a huge signature, and a huge payload */
    size_t big = 100 * 1024;
    char *huge = malloc(big + 1);
    snprintf(huge, big + 1, "%s", good);
    size_t l = strlen(huge);
    memset(huge + l, 'A', big - l);
    huge[big] = 0;
    assert_int_equal(s_verify(j, huge, s_now), KP_JWT_MALFORMED);
    assert_int_equal(s_verify(rs, huge, s_now), KP_JWT_MALFORMED);
    snprintf(huge, big + 1, "%.*s.", (int)(d1 - good), good);
    l = strlen(huge);
    memset(huge + l, 'e', big - l - 5);
    memcpy(huge + big - 5, ".AAAA", 6);
    assert_int_equal(s_verify(j, huge, s_now), KP_JWT_MALFORMED);
    free(huge);
    /* NULL arguments */
    kp_jwt_claims_t c;
    kp_jwt_reason_t r;
    assert_int_equal(kp_jwt_verify(j, NULL, s_now, &c, &r), KP_EINVAL);
    assert_int_equal(kp_jwt_verify(NULL, good, s_now, &c, &r), KP_EINVAL);
    assert_string_equal(kp_jwt_reason_str(KP_JWT_EXPIRED), "expired");
    assert_string_equal(kp_jwt_reason_str(KP_JWT_BAD_ALG), "bad_alg");
    free(good);
    kp_jwt_destroy(&j);
    kp_jwt_destroy(&rs);
}

static void test_bad_keyrings(void **state)
{
    (void)state;
    char err[256], p[256];
    /* missing key file */
    kp_config_t *c = s_cfg("HS256", "missing", "k1", NULL);
    assert_null(kp_jwt_new(c));
    kp_config_destroy(&c);
    /* malformed previous keys */
    const char *bad_prev[] = {
        "k0", "=x", "k0=", "bad kid=/tmp/x", "k1=/nonexistent", "k0=/nonexistent/file"};
    for (size_t i = 0; i < sizeof bad_prev / sizeof *bad_prev; i++) {
        c = s_cfg("HS256", "hs", "k1", bad_prev[i]);
        assert_int_equal(kp_jwt_keygen(c), 0);
        assert_null(kp_jwt_new(c));
        kp_config_destroy(&c);
    }
    /* a duplicate kid */
    snprintf(p, sizeof p, "k1=%s/hs.key", s_dir);
    c = s_cfg("HS256", "hs", "k1", p);
    assert_null(kp_jwt_new(c));
    kp_config_destroy(&c);
    /* an HS256 secret that is too short */
    s_path(p, sizeof p, "short.key");
    FILE *f = fopen(p, "w");
    fputs("c2hvcnQ=\n", f);
    fclose(f);
    c = s_cfg("HS256", "short", "k1", NULL);
    assert_null(kp_jwt_new(c));
    kp_config_destroy(&c);
    /* RS256: the public key of another key pair, and an HS secret as the private key */
    c = s_cfg("RS256", "rs", "k1", NULL);
    assert_int_equal(kp_jwt_keygen(c), 0);
    kp_config_destroy(&c);
    c = s_cfg("RS256", "rs-other", "k1", NULL);
    assert_int_equal(kp_jwt_keygen(c), 0);
    snprintf(p, sizeof p, "%s/rs.pub", s_dir);
    assert_int_equal(kp_config_set(c, "auth.jwt_public_key_file", p, err, sizeof err), 0);
    assert_null(kp_jwt_new(c));
    snprintf(p, sizeof p, "%s/hs.key", s_dir);
    assert_int_equal(kp_config_set(c, "auth.jwt_key_file", p, err, sizeof err), 0);
    assert_null(kp_jwt_new(c));
    kp_config_destroy(&c);
    /* the good ones still open */
    c = s_cfg("RS256", "rs", "k1", NULL);
    kp_jwt_t *j = kp_jwt_new(c);
    assert_non_null(j);
    kp_jwt_destroy(&j);
    kp_config_destroy(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hs256_round_trip),
        cmocka_unit_test(test_rs256_round_trip),
        cmocka_unit_test(test_keygen_keeps_existing),
        cmocka_unit_test(test_alg_none),
        cmocka_unit_test(test_hs256_with_rsa_public_key),
        cmocka_unit_test(test_times),
        cmocka_unit_test(test_issuer_audience),
        cmocka_unit_test(test_tampered_payload),
        cmocka_unit_test(test_unknown_kid),
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_bad_keyrings),
    };
    return cmocka_run_group_tests(tests, s_setup, s_teardown);
}
