/* kp_mdcache: metadata response cache (see kp_mdcache.h). A small chained hash table keyed by
 * path, with entries on an LRU list; per-study generations live in a second small table. */
#include "kp_mdcache.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_BUCKETS 4096
#define S_GEN_BUCKETS 1024

typedef struct s_entry {
    char *key, *study, *body;
    size_t len;
    char etag[72], last_modified[40];
    time_t expires;
    struct s_entry *hnext;       /* hash chain */
    struct s_entry *prev, *next; /* LRU list: head = most recent */
} s_entry_t;

typedef struct s_gen {
    char *study;
    uint64_t gen;
    struct s_gen *next;
} s_gen_t;

struct kp_mdcache {
    pthread_mutex_t mu;
    s_entry_t *buckets[S_BUCKETS];
    s_entry_t *head, *tail;
    s_gen_t *gens[S_GEN_BUCKETS];
    size_t ngens;
    uint64_t next_gen;
    size_t bytes, max_bytes, entries;
    int ttl;
    uint64_t hits, misses;
};

static uint64_t s_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static size_t s_cost(const s_entry_t *e)
{
    return e->len + strlen(e->key) + strlen(e->study) + sizeof *e;
}

static void s_unlink_lru(kp_mdcache_t *c, s_entry_t *e)
{
    if (e->prev) e->prev->next = e->next;
    else c->head = e->next;
    if (e->next) e->next->prev = e->prev;
    else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void s_push_lru(kp_mdcache_t *c, s_entry_t *e)
{
    e->prev = NULL;
    e->next = c->head;
    if (c->head) c->head->prev = e;
    c->head = e;
    if (!c->tail) c->tail = e;
}

static void s_remove(kp_mdcache_t *c, s_entry_t *e)
{
    s_entry_t **pp = &c->buckets[s_hash(e->key) % S_BUCKETS];
    while (*pp && *pp != e) pp = &(*pp)->hnext;
    if (*pp) *pp = e->hnext;
    s_unlink_lru(c, e);
    c->bytes -= s_cost(e);
    c->entries--;
    free(e->key);
    free(e->study);
    free(e->body);
    free(e);
}

static s_entry_t *s_find(kp_mdcache_t *c, const char *key)
{
    for (s_entry_t *e = c->buckets[s_hash(key) % S_BUCKETS]; e; e = e->hnext)
        if (!strcmp(e->key, key)) return e;
    return NULL;
}

static s_gen_t *s_gen(kp_mdcache_t *c, const char *study, bool create)
{
    s_gen_t **b = &c->gens[s_hash(study) % S_GEN_BUCKETS];
    for (s_gen_t *g = *b; g; g = g->next)
        if (!strcmp(g->study, study)) return g;
    if (!create) return NULL;
    s_gen_t *g = calloc(1, sizeof *g);
    if (!g || !(g->study = strdup(study))) abort();
    g->next = *b;
    *b = g;
    c->ngens++;
    return g;
}

kp_mdcache_t *kp_mdcache_new(size_t max_bytes, int ttl_s)
{
    kp_mdcache_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    pthread_mutex_init(&c->mu, NULL);
    c->max_bytes = max_bytes;
    c->ttl = ttl_s;
    c->next_gen = 1;
    return c;
}

void kp_mdcache_destroy(kp_mdcache_t **pc)
{
    kp_mdcache_t *c = pc ? *pc : NULL;
    if (!c) return;
    while (c->head) s_remove(c, c->head);
    for (size_t i = 0; i < S_GEN_BUCKETS; i++)
        for (s_gen_t *g = c->gens[i], *n; g; g = n) {
            n = g->next;
            free(g->study);
            free(g);
        }
    pthread_mutex_destroy(&c->mu);
    free(c);
    *pc = NULL;
}

uint64_t kp_mdcache_generation(kp_mdcache_t *c, const char *study)
{
    pthread_mutex_lock(&c->mu);
    s_gen_t *g = s_gen(c, study, false);
    uint64_t v = g ? g->gen : 0;
    pthread_mutex_unlock(&c->mu);
    return v;
}

bool kp_mdcache_get(kp_mdcache_t *c, const char *key, char **body, size_t *len, char etag[72],
                    char last_modified[40])
{
    pthread_mutex_lock(&c->mu);
    s_entry_t *e = s_find(c, key);
    if (e && e->expires <= time(NULL)) {
        s_remove(c, e);
        e = NULL;
    }
    if (!e) {
        c->misses++;
        pthread_mutex_unlock(&c->mu);
        return false;
    }
    c->hits++;
    s_unlink_lru(c, e);
    s_push_lru(c, e);
    if (body) {
        *body = malloc(e->len + 1);
        if (!*body) abort();
        memcpy(*body, e->body, e->len);
        (*body)[e->len] = 0;
    }
    *len = e->len;
    memcpy(etag, e->etag, 72);
    memcpy(last_modified, e->last_modified, 40);
    pthread_mutex_unlock(&c->mu);
    return true;
}

void kp_mdcache_put(kp_mdcache_t *c, const char *key, const char *study, uint64_t gen,
                    const char *body, size_t len, const char *etag, const char *last_modified)
{
    if (!c->max_bytes || len > c->max_bytes / 4) return; /* one entry never takes it all */
    s_entry_t *e = calloc(1, sizeof *e);
    if (!e) return;
    e->key = strdup(key);
    e->study = strdup(study);
    e->body = malloc(len + 1);
    if (!e->key || !e->study || !e->body) {
        free(e->key);
        free(e->study);
        free(e->body);
        free(e);
        return;
    }
    memcpy(e->body, body, len);
    e->body[len] = 0;
    e->len = len;
    snprintf(e->etag, sizeof e->etag, "%s", etag ? etag : "");
    snprintf(e->last_modified, sizeof e->last_modified, "%s", last_modified ? last_modified : "");
    pthread_mutex_lock(&c->mu);
    s_gen_t *g = s_gen(c, study, false);
    if ((g ? g->gen : 0) != gen) { /* invalidated while the value was computed */
        pthread_mutex_unlock(&c->mu);
        free(e->key);
        free(e->study);
        free(e->body);
        free(e);
        return;
    }
    s_entry_t *old = s_find(c, key);
    if (old) s_remove(c, old);
    e->expires = time(NULL) + c->ttl;
    size_t b = s_hash(key) % S_BUCKETS;
    e->hnext = c->buckets[b];
    c->buckets[b] = e;
    s_push_lru(c, e);
    c->bytes += s_cost(e);
    c->entries++;
    while (c->bytes > c->max_bytes && c->tail && c->tail != e) s_remove(c, c->tail);
    pthread_mutex_unlock(&c->mu);
}

void kp_mdcache_invalidate(kp_mdcache_t *c, const char *study)
{
    pthread_mutex_lock(&c->mu);
    /* Generations only matter while a query may be running; a study seen once keeps its small
     * record (bounded below by dropping the table when it grows large: every in-flight put then
     * sees generation 0 != its value only if it had one, which is the safe direction). */
    if (c->ngens > 100000) {
        for (size_t i = 0; i < S_GEN_BUCKETS; i++) {
            for (s_gen_t *g = c->gens[i], *n; g; g = n) {
                n = g->next;
                free(g->study);
                free(g);
            }
            c->gens[i] = NULL;
        }
        c->ngens = 0;
    }
    s_gen_t *g = s_gen(c, study, true);
    g->gen = c->next_gen++;
    for (s_entry_t *e = c->head, *n; e; e = n) {
        n = e->next;
        if (!strcmp(e->study, study)) s_remove(c, e);
    }
    pthread_mutex_unlock(&c->mu);
}

void kp_mdcache_stats(kp_mdcache_t *c, size_t *entries, size_t *bytes, uint64_t *hits,
                      uint64_t *misses)
{
    pthread_mutex_lock(&c->mu);
    if (entries) *entries = c->entries;
    if (bytes) *bytes = c->bytes;
    if (hits) *hits = c->hits;
    if (misses) *misses = c->misses;
    pthread_mutex_unlock(&c->mu);
}
