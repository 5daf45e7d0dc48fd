/* Unit tests of kp_audit's chain link: the canonical serialisation and hash agree with the
 * definition in schema/0004_audit.sql (reference values computed with Python's json.dumps(x,
 * separators=(",", ":"), sort_keys=True, ensure_ascii=False) and hashlib.sha256), every field
 * changes the hash, and kp_audit_emit refuses events without action or with another outcome. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_audit.h"
#include "kp_errors.h"

#include <stdlib.h>
#include <string.h>

static json_t *s_detail(void)
{
    return json_loads("{\"reason\":\"wrong password\",\"b\":1,"
                      "\"a\":[true,null,\"x\\\"\\\\\\n\\u0001\xc3\xa9\"]}",
                      0, NULL);
}

static kp_audit_record_t s_record(const json_t *detail)
{
    return (kp_audit_record_t){.seq = 1,
                               .event_id = "42",
                               .at = "2026-11-28T00:06:54.123456Z",
                               .actor = "alice",
                               .action = "auth.login_failed",
                               .outcome = "failure",
                               .client = "127.0.0.1",
                               .detail = detail,
                               .prev_hash = KP_AUDIT_GENESIS};
}

static void test_canonical_and_hash(void **state)
{
    (void)state;
    json_t *d = s_detail();
    assert_non_null(d);
    kp_audit_record_t rec = s_record(d);
    char *c = kp_audit_canonical(&rec);
    assert_string_equal(c, "[1,\"42\",\"2026-11-28T00:06:54.123456Z\",\"alice\","
                           "\"auth.login_failed\",\"failure\",\"127.0.0.1\",null,null,"
                           "{\"a\":[true,null,\"x\\\"\\\\\\n\\u0001\xc3\xa9\"],\"b\":1,"
                           "\"reason\":\"wrong password\"},\"" KP_AUDIT_GENESIS "\"]");
    free(c);
    char h[65];
    assert_int_equal(kp_audit_hash(&rec, h), 0);
    assert_string_equal(h, "728011071a98c48b8c592e5dad259d8088f472dc9e30e4044128d78cb6bf9005");
    json_decref(d);
}

static void test_every_field_counts(void **state)
{
    (void)state;
    json_t *d = s_detail();
    kp_audit_record_t base = s_record(d);
    char h0[65], h[65];
    assert_int_equal(kp_audit_hash(&base, h0), 0);
    for (int i = 0; i < 11; i++) {
        kp_audit_record_t r = base;
        switch (i) {
        case 0: r.seq = 2; break;
        case 1: r.event_id = "43"; break;
        case 2: r.at = "2026-11-28T00:06:54.123457Z"; break;
        case 3: r.actor = NULL; break;
        case 4: r.action = "auth.login"; break;
        case 5: r.outcome = "success"; break;
        case 6: r.client = ""; break; /* empty string and NULL differ */
        case 7: r.patient_id = "P1"; break;
        case 8: r.study_uid = "1.2.3"; break;
        case 9: r.detail = NULL; break;
        case 10: r.prev_hash = "1111111111111111111111111111111111111111111111111111111111111111"; break;
        }
        assert_int_equal(kp_audit_hash(&r, h), 0);
        assert_string_not_equal(h, h0);
    }
    /* a field boundary cannot move: "ab","c" differs from "a","bc" */
    kp_audit_record_t a = base, b = base;
    a.actor = "ab", a.client = "c";
    b.actor = "a", b.client = "bc";
    char ha[65], hb[65];
    kp_audit_hash(&a, ha);
    kp_audit_hash(&b, hb);
    assert_string_not_equal(ha, hb);
    /* invalid UTF-8 cannot be hashed */
    a.actor = "\xff";
    assert_int_equal(kp_audit_hash(&a, ha), KP_EINVAL);
    json_decref(d);
}

static void test_emit_validates(void **state)
{
    (void)state;
    kp_audit_event_t ev = {.action = "auth.login", .outcome = "maybe"};
    assert_int_equal(kp_audit_emit(NULL, NULL, &ev), KP_EINVAL);
    ev.outcome = "success";
    ev.action = "";
    assert_int_equal(kp_audit_emit(NULL, NULL, &ev), KP_EINVAL);
    ev.action = "auth.login";
    json_t *arr = json_array();
    ev.detail = arr;
    assert_int_equal(kp_audit_emit(NULL, NULL, &ev), KP_EINVAL);
    json_decref(arr);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical_and_hash),
        cmocka_unit_test(test_every_field_counts),
        cmocka_unit_test(test_emit_validates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
