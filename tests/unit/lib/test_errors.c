/* Unit tests of the error catalogue: every code maps to a message, slug, HTTP and DIMSE status. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"

#include <string.h>

static const int s_codes[] = {
#define KP_ERR(name, code, slug, http, dimse, msg) KP_E##name,
#include "kp_errors.def"
#undef KP_ERR
};
#define N (sizeof s_codes / sizeof s_codes[0])

static void test_mappings(void **state)
{
    (void)state;
    assert_int_equal(kp_error_http(KP_OK), 200);
    assert_int_equal(kp_error_dimse(KP_OK), 0);
    assert_int_equal(kp_error_http(KP_ENOTFOUND), 404);
    assert_int_equal(kp_error_http(KP_EINVAL), 400);
    assert_int_equal(kp_error_http(KP_ETOOBIG), 413);
    assert_int_equal(kp_error_http(KP_EUNSUPPORTED), 415);
    assert_int_equal(kp_error_http(KP_EPERM), 403);
    assert_int_equal(kp_error_dimse(KP_EIO), 0xA700);
    assert_int_equal(kp_error_dimse(KP_EMISMATCH), 0xA900);
    assert_int_equal(kp_error_dimse(KP_EDICOM), 0xC000);
}

static void test_every_code_is_complete_and_unique(void **state)
{
    (void)state;
    for (size_t i = 0; i < N; i++) {
        assert_true(s_codes[i] < 0);
        assert_true(strlen(kp_strerror(s_codes[i])) > 3);
        int http = kp_error_http(s_codes[i]);
        assert_true(http >= 400 && http <= 599);
        unsigned d = kp_error_dimse(s_codes[i]);
        assert_true(d != 0); /* an error never maps to DIMSE success */
        for (size_t j = i + 1; j < N; j++) {
            assert_int_not_equal(s_codes[i], s_codes[j]);
            assert_string_not_equal(kp_error_slug(s_codes[i]), kp_error_slug(s_codes[j]));
        }
    }
}

static void test_unknown_code(void **state)
{
    (void)state;
    assert_string_equal(kp_error_slug(-9999), kp_error_slug(KP_EINTERNAL));
    assert_int_equal(kp_error_http(-9999), 500);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mappings),
        cmocka_unit_test(test_every_code_is_complete_and_unique),
        cmocka_unit_test(test_unknown_code),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
