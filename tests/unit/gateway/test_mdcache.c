/* Unit tests of the metadata cache: hits, study invalidation, the generation check that keeps a
 * result computed before an invalidation out, LRU eviction by size, expiry, threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_mdcache.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool s_get(kp_mdcache_t *c, const char *key, char **body)
{
    size_t len;
    char etag[72], lm[40];
    return kp_mdcache_get(c, key, body, &len, etag, lm);
}

static void test_hit_and_invalidate(void **state)
{
    (void)state;
    kp_mdcache_t *c = kp_mdcache_new(1 << 20, 300);
    char *b = NULL;
    assert_false(s_get(c, "/s/1.2/metadata", &b));
    uint64_t g = kp_mdcache_generation(c, "1.2");
    kp_mdcache_put(c, "/s/1.2/metadata", "1.2", g, "[1]", 3, "\"e1\"", "Fri, 27 Nov 2026 10:00:00 GMT");
    kp_mdcache_put(c, "/s/1.2/se/3/metadata", "1.2", g, "[2]", 3, "\"e2\"", "");
    kp_mdcache_put(c, "/s/9.9/metadata", "9.9", 0, "[9]", 3, "\"e9\"", "");
    size_t len;
    char etag[72], lm[40];
    assert_true(kp_mdcache_get(c, "/s/1.2/metadata", &b, &len, etag, lm));
    assert_int_equal(len, 3);
    assert_string_equal(b, "[1]");
    assert_string_equal(etag, "\"e1\"");
    assert_string_equal(lm, "Fri, 27 Nov 2026 10:00:00 GMT");
    free(b);
    kp_mdcache_invalidate(c, "1.2");
    assert_false(s_get(c, "/s/1.2/metadata", NULL));
    assert_false(s_get(c, "/s/1.2/se/3/metadata", NULL));
    assert_true(s_get(c, "/s/9.9/metadata", NULL)); /* other studies stay */
    /* a value computed before that invalidation (old generation) is not stored */
    kp_mdcache_put(c, "/s/1.2/metadata", "1.2", g, "[old]", 5, "\"e0\"", "");
    assert_false(s_get(c, "/s/1.2/metadata", NULL));
    g = kp_mdcache_generation(c, "1.2");
    kp_mdcache_put(c, "/s/1.2/metadata", "1.2", g, "[new]", 5, "\"e3\"", "");
    assert_true(s_get(c, "/s/1.2/metadata", &b));
    assert_string_equal(b, "[new]");
    free(b);
    uint64_t hits, misses;
    kp_mdcache_stats(c, NULL, NULL, &hits, &misses);
    assert_true(hits >= 3 && misses >= 3);
    kp_mdcache_destroy(&c);
    assert_null(c);
}

static void test_lru_and_expiry(void **state)
{
    (void)state;
    kp_mdcache_t *c = kp_mdcache_new(64 * 1024, 1);
    char body[4000];
    memset(body, 'x', sizeof body);
    char key[64];
    for (int i = 0; i < 100; i++) {
        snprintf(key, sizeof key, "/k/%d", i);
        kp_mdcache_put(c, key, "1.2", 0, body, sizeof body, "\"e\"", "");
        if (i == 0 || i % 5 == 0) assert_true(s_get(c, "/k/0", NULL)); /* keep /k/0 recent */
    }
    size_t entries, bytes;
    kp_mdcache_stats(c, &entries, &bytes, NULL, NULL);
    assert_true(bytes <= 64 * 1024);
    assert_true(entries >= 10 && entries < 20);
    assert_true(s_get(c, "/k/0", NULL));   /* recently used: kept */
    assert_false(s_get(c, "/k/1", NULL));  /* least recently used: evicted */
    assert_true(s_get(c, "/k/99", NULL));
    /* a body larger than a quarter of the cache is never stored */
    char *big = calloc(1, 20000);
    kp_mdcache_put(c, "/big", "1.2", 0, big, 20000, "\"e\"", "");
    free(big);
    assert_false(s_get(c, "/big", NULL));
    sleep(2); /* ttl 1 s */
    assert_false(s_get(c, "/k/99", NULL));
    kp_mdcache_destroy(&c);
}

static kp_mdcache_t *s_shared;

static void *s_worker(void *arg)
{
    long id = (long)arg;
    char key[64], study[16];
    for (int i = 0; i < 20000; i++) {
        snprintf(study, sizeof study, "1.%d", i % 7);
        snprintf(key, sizeof key, "/s/%s/%ld/%d", study, id, i % 50);
        uint64_t g = kp_mdcache_generation(s_shared, study);
        if (i % 3 == 0) kp_mdcache_put(s_shared, key, study, g, "[]", 2, "\"e\"", "");
        else if (i % 97 == 0) kp_mdcache_invalidate(s_shared, study);
        else {
            char *b = NULL;
            if (s_get(s_shared, key, &b)) {
                if (strcmp(b, "[]")) abort();
                free(b);
            }
        }
    }
    return NULL;
}

static void test_threads(void **state)
{
    (void)state;
    s_shared = kp_mdcache_new(256 * 1024, 300);
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, s_worker, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    size_t bytes;
    kp_mdcache_stats(s_shared, NULL, &bytes, NULL, NULL);
    assert_true(bytes <= 256 * 1024);
    kp_mdcache_destroy(&s_shared);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hit_and_invalidate),
        cmocka_unit_test(test_lru_and_expiry),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
