/* kp_password: password hashing, the password policy and random token helpers.
 *
 * Passwords are stored as Argon2id PHC strings ($argon2id$v=19$m=..,t=..,p=..$salt$hash, 16-byte
 * random salt, 32-byte hash). New hashes use the auth.argon2_* settings; a stored hash is
 * verified with the parameters written in it, so the settings can be raised later: verify then
 * reports "needs rehash" and the caller stores a fresh hash of the password it just checked.
 * One hash at the default settings costs about 0.2 s and 64 MiB: never call hash or verify on
 * an event loop. The policy (kp_password_policy_t) holds the common-password list, loaded once
 * and read-only afterwards, so one policy may be shared by threads.
 * Design note: verification goes through libargon2's own argon2id_verify (it recomputes the
 * hash and compares in constant time); this module parses the string first only to bound the
 * parameters (a tampered string cannot make us allocate gigabytes) and to compare them with
 * the configuration. */
#ifndef KP_PASSWORD_H
#define KP_PASSWORD_H

#include "kp_config.h"

#include <stdbool.h>
#include <stddef.h>

/* Longest password accepted, in characters (UTF-8 code points). */
#define KP_PASSWORD_MAX_LEN 256
/* Salt and hash sizes of new hashes, in bytes. */
#define KP_PASSWORD_SALT_LEN 16
#define KP_PASSWORD_HASH_LEN 32

typedef struct kp_password_policy kp_password_policy_t;

/* Hashes password with the auth.argon2_* settings of cfg into a PHC string (*out, malloc'd,
 * the caller frees). 0; KP_EINVAL when the password is longer than the policy allows;
 * KP_ENOMEM when Argon2 cannot get its memory; KP_EINTERNAL when the random source fails. */
int kp_password_hash(const kp_config_t *cfg, const char *password, char **out);

/* Checks password against a stored PHC string. 0 on a match, with *needs_rehash (may be NULL)
 * true when the stored parameters, salt or hash length differ from what kp_password_hash would
 * write now; KP_EUNAUTH on a wrong password; KP_EINVAL when stored is not an Argon2id v19
 * string this module accepts (logged). stored NULL (unknown user): spends the time of one hash
 * at the configured parameters and returns KP_EUNAUTH, so a login does not reveal which user
 * names exist. */
int kp_password_verify(const kp_config_t *cfg, const char *stored, const char *password,
                       bool *needs_rehash);

/* Loads the policy: auth.password_min_length and the auth.common_passwords list (one per line,
 * compared in lower case, # lines and blank lines ignored). A missing or unreadable list is a
 * logged warning and the common-password check is skipped. NULL only on out-of-memory (which
 * aborts), so in practice never. Owned by the caller. */
kp_password_policy_t *kp_password_policy_new(const kp_config_t *cfg);
/* Frees and clears *pol; idempotent. */
void kp_password_policy_destroy(kp_password_policy_t **pol);
/* Number of entries of the loaded common-password list (0 when it was missing). */
size_t kp_password_policy_list_size(const kp_password_policy_t *pol);
/* Checks a new password for user name username (may be NULL or empty). 0 when acceptable;
 * otherwise KP_EINVAL and *reason (may be NULL) points to a static sentence fit to show the
 * user. Rules: valid UTF-8; at least auth.password_min_length and at most KP_PASSWORD_MAX_LEN
 * characters; not equal to the user name ignoring case, and not containing it ignoring case
 * when the user name has 3 characters or more; not in the common-password list. */
int kp_password_policy_check(const kp_password_policy_t *pol, const char *username,
                             const char *password, const char **reason);

/* nbytes random bytes (OpenSSL RAND_bytes) as unpadded base64url text (malloc'd, the caller
 * frees; 16 bytes give 22 characters). NULL when nbytes is 0 or above 4096, or when the random
 * source fails (logged). For refresh tokens, JWT ids and the like. */
char *kp_random_token(size_t nbytes);
/* Lower-case hex SHA-256 of a NUL-terminated string: how refresh tokens and recovery codes are
 * stored (they are random and long, so a fast hash is enough). */
void kp_sha256_hex(const char *str, char out[65]);
/* Constant-time comparison of two NUL-terminated strings of the same length (false when the
 * lengths differ; the length is not secret). */
bool kp_secret_equal(const char *a, const char *b);

#endif
