/* kp_jwt: short-lived access tokens (JWT, libjwt 1.10) and the keyring that signs and checks them.
 *
 * A kp_jwt_t holds the configured algorithm (auth.jwt_alg: HS256 or RS256), the current key with
 * its kid (auth.jwt_kid) used to sign, and retired keys that still verify tokens until those
 * expire (auth.jwt_previous_keys). Key rotation: generate a new key file, set jwt_kid to a new
 * id, move the old "kid=path" into jwt_previous_keys, restart; remove it after auth.access_ttl.
 *   auth.jwt_previous_keys = k1=var/auth/jwt-k1.pub, k0=var/auth/jwt-k0.pub
 * (comma-separated kid=path, spaces around items ignored; kid is 1-64 of [A-Za-z0-9._-]; for
 * HS256 the path is the old secret file, for RS256 the old public key PEM).
 * Key files: HS256 a base64 text of at least 32 random bytes; RS256 a PEM RSA private key of
 * 2048 bits or more (auth.jwt_key_file) and its PEM public key (auth.jwt_public_key_file).
 *
 * Design note: libjwt 1.10's jwt_decode trusts the token's own header: it accepts alg "none"
 * (no key given), verifies an HS256 token with whatever key bytes it is handed (so an RSA
 * public key PEM becomes an HMAC secret) and never looks at exp or nbf. So kp_jwt_verify parses
 * the header itself first, refuses any alg but the configured one, picks the key by kid, then
 * lets libjwt check the signature, confirms libjwt saw the same alg, and checks every claim
 * itself from the signed payload. Tokens longer than KP_JWT_MAX_LEN are refused unparsed.
 * A kp_jwt_t is read-only after kp_jwt_new, so threads may share one. */
#ifndef KP_JWT_H
#define KP_JWT_H

#include "kp_config.h"

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Longest token accepted by kp_jwt_verify, in bytes. */
#define KP_JWT_MAX_LEN 8192

typedef struct kp_jwt kp_jwt_t;

/* Why a token was refused (KP_JWT_OK when it was not). */
typedef enum {
    KP_JWT_OK = 0,
    KP_JWT_MALFORMED,     /* not 3 base64url parts of JSON objects; exp missing; bad types; long */
    KP_JWT_BAD_ALG,       /* header alg is not exactly the configured one (none, HS/RS confusion) */
    KP_JWT_UNKNOWN_KID,   /* no kid, or a kid not in the keyring */
    KP_JWT_BAD_SIGNATURE, /* libjwt refused the signature */
    KP_JWT_EXPIRED,       /* now >= exp + leeway */
    KP_JWT_NOT_YET_VALID, /* now + leeway < nbf (or iat) */
    KP_JWT_BAD_ISSUER,    /* iss missing or not auth.jwt_issuer */
    KP_JWT_BAD_AUDIENCE,  /* aud missing or not containing auth.jwt_audience */
    KP_JWT_MISSING_CLAIM, /* sub or jti missing or empty */
} kp_jwt_reason_t;

/* The claims of a verified token (strings and arrays malloc'd; kp_jwt_claims_clear frees). */
typedef struct {
    char *sub;
    char *jti;
    char **roles;
    size_t n_roles;
    char **sites;
    size_t n_sites;
    int64_t exp;
    int64_t iat;
} kp_jwt_claims_t;

/* Loads the keyring and the token settings from cfg (auth.jwt_*, auth.access_ttl). NULL when a
 * key file is missing, unreadable or of the wrong kind, or jwt_previous_keys is malformed (the
 * reason is logged). Owned by the caller. */
kp_jwt_t *kp_jwt_new(const kp_config_t *cfg);
/* Frees (wiping key bytes) and clears *jwt; idempotent. */
void kp_jwt_destroy(kp_jwt_t **jwt);

/* Issues an access token for sub with the given roles and sites (arrays of n strings; NULL
 * allowed when n is 0), valid from now for auth.access_ttl seconds: claims sub, roles, sites,
 * iat, nbf, exp, iss, aud, jti and header kid. jti is the caller's id for the token (1-128
 * bytes, e.g. tying it to a session), or NULL for a random one (128 bits, base64url). *token
 * (and *jti_out when jti_out is not NULL: the jti used) are malloc'd, the caller frees.
 * 0, KP_EINVAL (empty sub, bad jti, strings not UTF-8), KP_EINTERNAL (libjwt, random source). */
int kp_jwt_issue(const kp_jwt_t *jwt, const char *sub, const char *const *roles, size_t n_roles,
                 const char *const *sites, size_t n_sites, time_t now, const char *jti,
                 char **token, char **jti_out);

/* Verifies a token at time now. 0 with *claims filled (the caller then calls
 * kp_jwt_claims_clear); otherwise KP_EUNAUTH (KP_EINVAL for NULL arguments) with *reason (may be
 * NULL) saying why and *claims zeroed. */
int kp_jwt_verify(const kp_jwt_t *jwt, const char *token, time_t now, kp_jwt_claims_t *claims,
                  kp_jwt_reason_t *reason);
/* Frees what a claims struct holds and zeroes it; idempotent. */
void kp_jwt_claims_clear(kp_jwt_claims_t *claims);
/* A short stable word for a reason ("expired", "bad_signature", ...) for logs and audit. */
const char *kp_jwt_reason_str(kp_jwt_reason_t reason);

/* Creates the signing key files of cfg when missing (for make run and first start): HS256 32
 * random bytes base64 in auth.jwt_key_file; RS256 a 2048-bit RSA private key (PKCS#8 PEM) and,
 * when missing, its public key in auth.jwt_public_key_file (derived from the private key when
 * that exists). Parent directories are created 0700, secret files 0600. Existing files are
 * never touched. 0 (created or present) or KP_EIO (logged). */
int kp_jwt_keygen(const kp_config_t *cfg);

#endif
