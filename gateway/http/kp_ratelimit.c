/* kp_ratelimit: token buckets (see kp_ratelimit.h). */
#include "kp_ratelimit.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_SLOTS 8192

typedef struct {
    char key[96];
    double tokens, at;
} s_bucket_t;

struct kp_ratelimit {
    pthread_mutex_t mu;
    double rate, burst;
    s_bucket_t *b;
};

kp_ratelimit_t *kp_ratelimit_new(double rate, double burst)
{
    if (!(rate > 0) || !(burst >= 1)) return NULL;
    kp_ratelimit_t *rl = calloc(1, sizeof *rl);
    if (!rl) abort();
    rl->b = calloc(S_SLOTS, sizeof *rl->b);
    if (!rl->b) abort();
    rl->rate = rate;
    rl->burst = burst;
    pthread_mutex_init(&rl->mu, NULL);
    return rl;
}

void kp_ratelimit_destroy(kp_ratelimit_t **prl)
{
    kp_ratelimit_t *rl = prl ? *prl : NULL;
    if (!rl) return;
    pthread_mutex_destroy(&rl->mu);
    free(rl->b);
    free(rl);
    *prl = NULL;
}

static size_t s_hash(const char *s)
{
    size_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h % S_SLOTS;
}

bool kp_ratelimit_take(kp_ratelimit_t *rl, const char *key, double now, int *retry_after)
{
    char k[96];
    snprintf(k, sizeof k, "%s", key ? key : "");
    pthread_mutex_lock(&rl->mu);
    s_bucket_t *b = &rl->b[s_hash(k)];
    if (strcmp(b->key, k)) { /* a new key (or a collision): a full bucket */
        memcpy(b->key, k, sizeof b->key);
        b->tokens = rl->burst;
        b->at = now;
    }
    double t = b->tokens + (now - b->at) * rl->rate;
    if (t > rl->burst) t = rl->burst;
    b->at = now;
    bool ok = t >= 1.0;
    b->tokens = ok ? t - 1.0 : t;
    pthread_mutex_unlock(&rl->mu);
    if (!ok && retry_after) {
        int s = (int)ceil((1.0 - t) / rl->rate);
        *retry_after = s < 1 ? 1 : s;
    }
    return ok;
}
