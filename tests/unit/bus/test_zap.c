/* kp_zap_parse: the broker's CurveZMQ client list (bus.curve_clients_file). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_zap.h"

#include <string.h>
#include <zmq.h>

static unsigned char s_keys[8][32];

static void test_accepts_key_lines_and_comments(void **state)
{
    (void)state;
    char a[41], b[41], sa[41], sb[41];
    zmq_curve_keypair(a, sa);
    zmq_curve_keypair(b, sb);
    char text[512];
    snprintf(text, sizeof text,
             "# bus clients of site B\n\n  public = %s   # indexer host 1\r\n%s\npublic=%s\n", a,
             b, a);
    int bad = -1;
    assert_int_equal(kp_zap_parse(text, s_keys, 8, &bad), 3);
    assert_int_equal(bad, 0);
    unsigned char bin[32];
    zmq_z85_decode(bin, a);
    assert_memory_equal(s_keys[0], bin, 32);
    assert_memory_equal(s_keys[2], bin, 32);
    zmq_z85_decode(bin, b);
    assert_memory_equal(s_keys[1], bin, 32);
    assert_int_equal(kp_zap_parse("", s_keys, 8, &bad), 0);
}

static void test_refuses_bad_lines(void **state)
{
    (void)state;
    char pub[41], sec[41];
    zmq_curve_keypair(pub, sec);
    char text[512];
    int bad = 0;
    /* a pasted key file: the secret line is refused (the broker must not hold it) */
    snprintf(text, sizeof text, "public = %s\nsecret = %s\n", pub, sec);
    assert_int_equal(kp_zap_parse(text, s_keys, 8, &bad), -1);
    assert_int_equal(bad, 2);
    snprintf(text, sizeof text, "%s\npublic = %.39s\n", pub, pub); /* short */
    assert_int_equal(kp_zap_parse(text, s_keys, 8, &bad), -1);
    assert_int_equal(bad, 2);
    snprintf(text, sizeof text, "%sX\n", pub); /* long */
    assert_int_equal(kp_zap_parse(text, s_keys, 8, &bad), -1);
    snprintf(text, sizeof text, "%s trailing words\n", pub);
    assert_int_equal(kp_zap_parse(text, s_keys, 8, &bad), -1);
    assert_int_equal(kp_zap_parse("public : 0123456789012345678901234567890123456789\n", s_keys,
                                  8, &bad),
                     -1);
    /* not Z85 ('~' is outside the alphabet) */
    assert_int_equal(kp_zap_parse("~123456789012345678901234567890123456789\n", s_keys, 8, &bad),
                     -1);
    /* more keys than room */
    snprintf(text, sizeof text, "%s\n%s\n", pub, pub);
    assert_int_equal(kp_zap_parse(text, s_keys, 1, &bad), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_key_lines_and_comments),
        cmocka_unit_test(test_refuses_bad_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
