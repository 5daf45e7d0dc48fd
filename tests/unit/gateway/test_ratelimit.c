/* Unit tests of the token buckets behind the gateway's rate limits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_ratelimit.h"

static void test_burst_refill_and_retry_after(void **state)
{
    (void)state;
    kp_ratelimit_t *rl = kp_ratelimit_new(10.0 / 60.0, 10); /* 10 a minute, burst 10 */
    int ra = 0;
    for (int i = 0; i < 10; i++) assert_true(kp_ratelimit_take(rl, "10.0.0.1", 100.0, &ra));
    assert_false(kp_ratelimit_take(rl, "10.0.0.1", 100.0, &ra));
    assert_int_equal(ra, 6); /* one token every 6 s */
    assert_true(kp_ratelimit_take(rl, "10.0.0.2", 100.0, &ra)); /* another key: its own bucket */
    assert_false(kp_ratelimit_take(rl, "10.0.0.1", 103.0, &ra));
    assert_int_equal(ra, 3);
    assert_true(kp_ratelimit_take(rl, "10.0.0.1", 106.5, &ra)); /* refilled one */
    assert_false(kp_ratelimit_take(rl, "10.0.0.1", 106.5, &ra));
    assert_true(kp_ratelimit_take(rl, "10.0.0.1", 1000.0, &ra)); /* long idle: full again */
    for (int i = 0; i < 9; i++) assert_true(kp_ratelimit_take(rl, "10.0.0.1", 1000.0, NULL));
    assert_false(kp_ratelimit_take(rl, "10.0.0.1", 1000.0, NULL));
    kp_ratelimit_destroy(&rl);
    assert_null(rl);
    assert_null(kp_ratelimit_new(0, 1));
    assert_null(kp_ratelimit_new(1, 0.5));
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_burst_refill_and_retry_after)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
