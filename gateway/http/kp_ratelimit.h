/* kp_ratelimit: token buckets keyed by a string (client address, account), for the gateway's
 * rate limits (login attempts, the REST API). Each key has a bucket of `burst` tokens refilled
 * at `rate` tokens per second; a request takes one token or is refused with the seconds until
 * one is back (the Retry-After). A fixed table of slots (a key that collides with another takes
 * its slot over, which can only make a limit more lenient, never lock someone out wrongly).
 * Thread-safe (one mutex; the work under it is a few comparisons). */
#ifndef KP_RATELIMIT_H
#define KP_RATELIMIT_H

#include <stdbool.h>

typedef struct kp_ratelimit kp_ratelimit_t;

/* rate: tokens per second (> 0); burst: bucket size (>= 1). */
kp_ratelimit_t *kp_ratelimit_new(double rate, double burst);
void kp_ratelimit_destroy(kp_ratelimit_t **rl);

/* Takes a token for key at time now (seconds, monotonic). true: allowed; false: refused and
 * *retry_after (may be NULL) = whole seconds until a token is available (at least 1). */
bool kp_ratelimit_take(kp_ratelimit_t *rl, const char *key, double now, int *retry_after);

#endif
