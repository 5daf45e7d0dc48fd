/* kp_auth: who is asking, and may they (the gateway's side of authentication and permissions).
 *
 * Every request but the public ones (login, refresh, the login page, the viewer's static files)
 * carries an access token: `Authorization: Bearer <jwt>` (API clients) or the `__Host-kp_access`
 * cookie (browsers). The event loop verifies it (kp_jwt: algorithm, signature, exp/nbf, iss, aud
 * — CPU only, no I/O) and checks the route's permission against the roles in the token, using a
 * snapshot of the role -> permissions table that a background thread reloads (so a role change
 * applies within http.auth_reload seconds, and to new tokens at once). Whether the token's session
 * is still alive (not logged out, not revoked for refresh-token reuse) needs the database: a
 * database worker asks kp_auth_session_alive() before the handler runs, which caches live
 * sessions for a few seconds and revoked ones for good.
 *
 * The token's jti is "<session id>.<random>", so a session's tokens can be revoked together.
 * Thread-safe: one kp_auth_t is shared by the loop threads and the workers. */
#ifndef KP_AUTH_H
#define KP_AUTH_H

#include "kp_config.h"
#include "kp_db.h"
#include "kp_jwt.h"
#include "kp_password.h"

#include <stdbool.h>
#include <stddef.h>

#define KP_AUTH_ACCESS_COOKIE "__Host-kp_access"
#define KP_AUTH_REFRESH_COOKIE "__Host-kp_refresh"
#define KP_AUTH_CSRF_COOKIE "__Host-kp_csrf"
#define KP_AUTH_CSRF_HEADER "x-csrf-token"

/* Pseudo-permissions of the route table. */
#define KP_PERM_PUBLIC "public"               /* no token needed */
#define KP_PERM_AUTHENTICATED "authenticated" /* any valid token (me, logout, password) */

typedef struct kp_auth kp_auth_t;

/* The identity of a verified request (copied into the job: plain arrays, no pointers). */
#define KP_AUTH_MAX_ROLES 16
#define KP_AUTH_MAX_SITES 32
typedef struct kp_identity {
    bool authenticated;
    bool via_cookie;
    char user[72];
    char sid[48];
    char roles[KP_AUTH_MAX_ROLES][64];
    int nroles;
    char sites[KP_AUTH_MAX_SITES][64];
    int nsites;
    bool site_all; /* holds site.all: no site filter */
} kp_identity_t;

/* Loads the JWT keyring (creating key files when missing and auth.jwt_generate is on) and the
 * password policy. NULL on failure (logged). */
kp_auth_t *kp_auth_new(const kp_config_t *cfg);
void kp_auth_destroy(kp_auth_t **a);

const kp_jwt_t *kp_auth_jwt(const kp_auth_t *a);
const kp_password_policy_t *kp_auth_policy(const kp_auth_t *a);

/* Reloads the role -> permissions snapshot from the database. 0 or a negative code. */
int kp_auth_reload(kp_auth_t *a, kp_db_t *db);
/* True once a snapshot was loaded. */
bool kp_auth_ready(const kp_auth_t *a);

/* Verifies token (now = time(NULL)) and fills *id (roles, sites, site_all from the snapshot).
 * 0, or KP_EUNAUTH with *why a short reason. */
int kp_auth_verify(kp_auth_t *a, const char *token, kp_identity_t *id, const char **why);
/* True when one of id's roles holds perm (KP_PERM_AUTHENTICATED: any authenticated id). */
bool kp_auth_allows(kp_auth_t *a, const kp_identity_t *id, const char *perm);
/* Every permission of the roles (sorted, distinct) as a JSON array text (malloc'd). */
char *kp_auth_permissions_json(kp_auth_t *a, const char *const *roles, int nroles);

/* Is session sid alive (exists, not revoked, not expired)? Cached: alive for 5 s, dead for good.
 * 1 alive, 0 dead, negative on a database error. */
int kp_auth_session_alive(kp_auth_t *a, kp_db_t *db, const char *sid);
/* Forget a session at once (logout, reuse detected) on this gateway. */
void kp_auth_session_dead(kp_auth_t *a, const char *sid);

/* The value of cookie `name` in a Cookie header (len bytes, not NUL-terminated) into out. */
bool kp_auth_cookie(const char *header, size_t len, const char *name, char *out, size_t outlen);

#endif
