/* kp_mdcache: the gateway's in-memory cache of WADO-RS metadata responses.
 *
 * Key: the request path (study, series or instance metadata); value: the JSON body, its ETag and
 * Last-Modified. Entries live at most ttl seconds and the cache holds at most max_bytes (least
 * recently used entries go first). `study.changed` events from the bus (published by the
 * indexer after each commit) drop every entry of that study at once, so a newly arrived
 * instance shows up on the next request; since events are hints (a subscriber may miss one),
 * the TTL bounds how stale an entry can ever be. A result computed from the database while an
 * invalidation for its study happened is not stored (generation check), so a slow query cannot
 * put back what an event just removed. Thread-safe (one mutex). */
#ifndef KP_MDCACHE_H
#define KP_MDCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kp_mdcache kp_mdcache_t;

kp_mdcache_t *kp_mdcache_new(size_t max_bytes, int ttl_s);
void kp_mdcache_destroy(kp_mdcache_t **c);

/* The current generation of study (pass it to kp_mdcache_put after computing a value). */
uint64_t kp_mdcache_generation(kp_mdcache_t *c, const char *study);

/* Looks key up. On a hit: true, *body a malloc'd copy (caller frees) unless body is NULL, *len,
 * etag and last_modified copied (sizes 72 and 40). */
bool kp_mdcache_get(kp_mdcache_t *c, const char *key, char **body, size_t *len, char etag[72],
                    char last_modified[40]);

/* Stores a copy of body under key for study, unless the study's generation moved past gen. */
void kp_mdcache_put(kp_mdcache_t *c, const char *key, const char *study, uint64_t gen,
                    const char *body, size_t len, const char *etag, const char *last_modified);

/* Drops every entry of study (a study.changed event). */
void kp_mdcache_invalidate(kp_mdcache_t *c, const char *study);

/* Entries, bytes, hits, misses (for logs and tests). */
void kp_mdcache_stats(kp_mdcache_t *c, size_t *entries, size_t *bytes, uint64_t *hits,
                      uint64_t *misses);

#endif
