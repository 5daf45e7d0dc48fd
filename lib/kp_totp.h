/* kp_totp: the TOTP second factor (RFC 6238 over liboath) and single-use recovery codes.
 *
 * A user enrols with a random 20-byte secret shown as base32 and as an otpauth:// URI (the QR
 * code content); codes are 6 digits, HMAC-SHA1, 30-second steps. A code is accepted for the
 * current step and one step either side; the step that matched is returned and the caller
 * stores it, passing it back next time so the same code (or an older one) is never accepted
 * twice (liboath has no replay guard). The secret must be stored retrievable (not hashed).
 * Recovery codes are 16 characters of Crockford's base32 alphabet (no i, l, o, u) shown as
 * xxxx-xxxx-xxxx-xxxx: 80 random bits each. They are stored as SHA-256 hex: with 80 bits of
 * entropy an offline search of a leaked table is out of reach (2^79 hashes on average), so a
 * slow hash adds nothing, while Argon2id would make every recovery attempt cost ten hashes
 * (2 s and 64 MiB each time), a cheap denial of service. Typing is forgiving: case, dashes and
 * spaces are ignored, and o/i/l are read as 0/1/1. */
#ifndef KP_TOTP_H
#define KP_TOTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define KP_TOTP_SECRET_LEN 20
#define KP_TOTP_PERIOD     30
#define KP_TOTP_DIGITS     6
/* base32 of 20 bytes: 32 characters + NUL */
#define KP_TOTP_SECRET_B32_MAX 33
#define KP_TOTP_RECOVERY_COUNT 10
/* "xxxx-xxxx-xxxx-xxxx" + NUL */
#define KP_TOTP_RECOVERY_CODE_MAX 20

/* Initialises liboath once per process (thread-safe, idempotent; every function below calls it).
 * 0 or KP_EINTERNAL. */
int kp_totp_init(void);

/* Fills secret with KP_TOTP_SECRET_LEN random bytes. 0 or KP_EINTERNAL (random source). */
int kp_totp_secret_new(uint8_t secret[KP_TOTP_SECRET_LEN]);
/* The base32 text (RFC 4648, upper case, no padding) of a secret of len bytes (1..64), written
 * to out. 0 or KP_EINVAL. */
int kp_totp_secret_base32(const uint8_t *secret, size_t len, char *out, size_t outlen);
/* Decodes base32 text (case, spaces and padding tolerated) into secret (up to cap bytes),
 * setting *len. 0 or KP_EINVAL. */
int kp_totp_secret_decode(const char *b32, uint8_t *secret, size_t cap, size_t *len);
/* The enrolment URI otpauth://totp/ISSUER:USER?secret=..&issuer=..&algorithm=SHA1&digits=6&
 * period=30 with issuer and user percent-encoded (malloc'd, the caller frees). */
char *kp_totp_uri(const char *issuer, const char *user, const char *secret_b32);

/* The code of time t (digits 6..8) into out (at least digits + 1 bytes). 0 or KP_EINVAL. */
int kp_totp_code(const uint8_t *secret, size_t len, time_t t, unsigned digits, char *out);
/* The time step of t (t / 30). */
int64_t kp_totp_step(time_t t);
/* Checks a 6-digit code at time now against steps now-1, now, now+1 (all three are computed and
 * compared in constant time). last_step is the step accepted last for this user (0 for none).
 * 0 on success with *step (may be NULL) the matched step, which the caller stores as the new
 * last_step; KP_ECONFLICT when the code matches only steps <= last_step (a replay);
 * KP_EUNAUTH when it matches nothing (including text that is not 6 digits). */
int kp_totp_verify(const uint8_t *secret, size_t len, const char *code, time_t now,
                   int64_t last_step, int64_t *step);

/* Ten new recovery codes: codes[i] to show the user once, hashes[i] (SHA-256 hex of the
 * normalised code) to store. The ten are distinct. 0 or KP_EINTERNAL (random source). */
int kp_totp_recovery_new(char codes[KP_TOTP_RECOVERY_COUNT][KP_TOTP_RECOVERY_CODE_MAX],
                         char hashes[KP_TOTP_RECOVERY_COUNT][65]);
/* Checks a typed code against the n stored hashes (NULL or "" entries are used-up slots and
 * never match). Every slot is compared, in constant time. Returns the index that matched (the
 * caller then marks it used), or KP_EUNAUTH. */
int kp_totp_recovery_verify(const char *code, const char *const *hashes, size_t n);

/* The QR code of text (an otpauth:// URI) as a standalone SVG image (libqrencode, error
 * correction M, 4-module quiet zone, module_px pixels per module), malloc'd; NULL on failure. */
char *kp_totp_qr_svg(const char *text, int module_px);

#endif
