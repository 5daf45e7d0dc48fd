/* Unit tests of lib/kp_route.h: compiling conditions and time windows from rule JSON (with
 * errors naming the field), matching instances (indexed columns, DICOM JSON metadata by
 * keyword or tag, each op), destinations (checks, keys, secrets kept out and kept on change). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kp_dicom.h"
#include "kp_route.h"

static kp_route_t *s_compile(const char *conds, const char *window, char *err, size_t errlen)
{
    json_t *c = conds ? json_loads(conds, 0, NULL) : NULL;
    json_t *w = window ? json_loads(window, JSON_DECODE_ANY, NULL) : NULL;
    kp_route_t *r = kp_route_new(c, w, err, errlen);
    json_decref(c);
    json_decref(w);
    return r;
}

static bool s_match(const char *conds, const kp_route_instance_t *in)
{
    char err[256];
    kp_route_t *r = s_compile(conds, NULL, err, sizeof err);
    if (!r) fail_msg("%s: %s", conds, err);
    bool m = kp_route_match(r, in);
    kp_route_destroy(&r);
    assert_null(r);
    return m;
}

static const char s_md[] =
    "{\"00080060\":{\"vr\":\"CS\",\"Value\":[\"CT\"]},"
    "\"00081030\":{\"vr\":\"LO\",\"Value\":[\"HEAD WITH CONTRAST\"]},"
    "\"00080050\":{\"vr\":\"SH\"},"
    "\"00100010\":{\"vr\":\"PN\",\"Value\":[{\"Alphabetic\":\"DOE^JANE\"}]},"
    "\"00280030\":{\"vr\":\"DS\",\"Value\":[0.5,0.25]},"
    "\"00080008\":{\"vr\":\"CS\",\"Value\":[\"ORIGINAL\",\"PRIMARY\",\"AXIAL\"]}}";

static void test_match_columns_and_metadata(void **state)
{
    (void)state;
    json_t *md = json_loads(s_md, 0, NULL);
    assert_non_null(md);
    kp_route_instance_t in = {.modality = "CT",
                              .calling_ae = "CT_X",
                              .called_ae = "KLINIKA",
                              .sop_class = "1.2.840.10008.5.1.4.1.1.2",
                              .metadata = md,
                              .when = time(NULL)};
    assert_true(s_match("[]", &in));
    assert_true(s_match("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":\"CT\"}]", &in));
    assert_false(s_match("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":\"MR\"}]", &in));
    assert_true(s_match("[{\"attribute\":\"CallingAE\",\"op\":\"equals\",\"value\":\"CT_X\"},"
                        "{\"attribute\":\"CalledAE\",\"op\":\"wildcard\",\"value\":\"KLIN?KA\"}]",
                        &in));
    assert_false(
        s_match("[{\"attribute\":\"CallingAE\",\"op\":\"equals\",\"value\":\"CT\"}]", &in));
    assert_true(s_match("[{\"attribute\":\"SOPClassUID\",\"op\":\"wildcard\",\"value\":"
                        "\"1.2.840.10008.5.1.4.1.1.*\"}]",
                        &in));
    /* keyword, (gggg,eeee) and ggggeeee forms */
    assert_true(s_match("[{\"attribute\":\"StudyDescription\",\"op\":\"regex\",\"value\":"
                        "\"^HEAD.*CONTRAST$\"}]",
                        &in));
    assert_false(
        s_match("[{\"attribute\":\"(0008,1030)\",\"op\":\"regex\",\"value\":\"^CONTRAST\"}]", &in));
    assert_true(s_match("[{\"attribute\":\"00081030\",\"op\":\"equals\",\"value\":"
                        "\"HEAD WITH CONTRAST\"}]",
                        &in));
    /* a person name's Alphabetic group; numbers; one of several values, or all of them */
    assert_true(
        s_match("[{\"attribute\":\"PatientName\",\"op\":\"wildcard\",\"value\":\"DOE^*\"}]", &in));
    assert_true(
        s_match("[{\"attribute\":\"PixelSpacing\",\"op\":\"equals\",\"value\":\"0.25\"}]", &in));
    assert_true(
        s_match("[{\"attribute\":\"ImageType\",\"op\":\"equals\",\"value\":\"AXIAL\"}]", &in));
    assert_true(s_match("[{\"attribute\":\"ImageType\",\"op\":\"equals\",\"value\":"
                        "\"ORIGINAL\\\\PRIMARY\\\\AXIAL\"}]",
                        &in));
    /* present / absent: an empty element is present */
    assert_true(s_match("[{\"attribute\":\"AccessionNumber\",\"op\":\"present\"}]", &in));
    assert_false(s_match("[{\"attribute\":\"AccessionNumber\",\"op\":\"absent\"}]", &in));
    assert_true(s_match("[{\"attribute\":\"PatientID\",\"op\":\"absent\"}]", &in));
    assert_false(s_match("[{\"attribute\":\"PatientID\",\"op\":\"equals\",\"value\":\"\"}]", &in));
    /* every condition must hold */
    assert_false(s_match("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":\"CT\"},"
                         "{\"attribute\":\"PatientID\",\"op\":\"present\"}]",
                         &in));
    /* no metadata at all: only the columns */
    kp_route_instance_t bare = {.modality = "MR", .when = time(NULL)};
    assert_true(
        s_match("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":\"MR\"}]", &bare));
    assert_true(s_match("[{\"attribute\":\"CallingAE\",\"op\":\"absent\"}]", &bare));
    assert_false(
        s_match("[{\"attribute\":\"StudyDescription\",\"op\":\"regex\",\"value\":\".\"}]", &bare));
    json_decref(md);
}

static void s_refused(const char *conds, const char *window, const char *field)
{
    char err[256] = "";
    kp_route_t *r = s_compile(conds, window, err, sizeof err);
    if (r) fail_msg("accepted: %s %s", conds ? conds : "", window ? window : "");
    if (!strstr(err, field)) fail_msg("'%s' does not name %s", err, field);
}

static void test_refusals_name_the_field(void **state)
{
    (void)state;
    s_refused("[{\"attribute\":\"Modality\",\"op\":\"regex\",\"value\":\"([\"}]", NULL,
              "conditions[0].value: bad regex");
    s_refused("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":\"CT\"},"
              "{\"attribute\":\"Modality\",\"op\":\"like\",\"value\":\"CT\"}]",
              NULL, "conditions[1].op");
    s_refused("[{\"attribute\":\"NotAKeyword\",\"op\":\"present\"}]", NULL, "attribute");
    s_refused("[{\"attribute\":\"(0008,10ZZ)\",\"op\":\"present\"}]", NULL, "attribute");
    s_refused("[{\"attribute\":\"Modality\",\"op\":\"equals\"}]", NULL, "value");
    s_refused("[{\"attribute\":\"Modality\",\"op\":\"equals\",\"value\":5}]", NULL, "value");
    s_refused("[{\"attribute\":\"Modality\",\"op\":\"absent\",\"value\":\"CT\"}]", NULL, "value");
    s_refused("[\"Modality\"]", NULL, "conditions[0]");
    s_refused("{}", NULL, "conditions");
    s_refused(NULL, "{\"from\":\"8:00\",\"to\":\"18:00\"}", "time_window.from");
    s_refused(NULL, "{\"from\":\"08:00\",\"to\":\"24:01\"}", "time_window.to");
    s_refused(NULL, "{\"from\":\"08:00\",\"to\":\"18:00\",\"days\":[0]}", "time_window.days");
    s_refused(NULL, "\"always\"", "time_window");
}

static time_t s_at(int wday_monday1, int h, int m)
{
    /* 2024-01-01 was a Monday */
    struct tm tm = {.tm_year = 124,
                    .tm_mon = 0,
                    .tm_mday = wday_monday1,
                    .tm_hour = h,
                    .tm_min = m,
                    .tm_isdst = -1};
    return mktime(&tm);
}

static void test_time_window(void **state)
{
    (void)state;
    char err[256];
    kp_route_t *day = s_compile("[]", "{\"from\":\"08:00\",\"to\":\"18:00\",\"days\":[1,2,3,4,5]}",
                                err, sizeof err);
    assert_non_null(day);
    kp_route_instance_t in = {.when = s_at(1, 8, 0)};
    assert_true(kp_route_match(day, &in));
    in.when = s_at(1, 17, 59);
    assert_true(kp_route_match(day, &in));
    in.when = s_at(1, 18, 0);
    assert_false(kp_route_match(day, &in));
    in.when = s_at(6, 12, 0); /* Saturday */
    assert_false(kp_route_match(day, &in));
    kp_route_destroy(&day);
    /* across midnight: Friday 22:00 to Saturday 06:00 belongs to Friday */
    kp_route_t *night =
        s_compile("[]", "{\"from\":\"22:00\",\"to\":\"06:00\",\"days\":[5]}", err, sizeof err);
    assert_non_null(night);
    in.when = s_at(5, 23, 0);
    assert_true(kp_route_match(night, &in));
    in.when = s_at(6, 5, 59);
    assert_true(kp_route_match(night, &in));
    in.when = s_at(5, 5, 0); /* Friday early morning: Thursday's night */
    assert_false(kp_route_match(night, &in));
    in.when = s_at(5, 12, 0);
    assert_false(kp_route_match(night, &in));
    kp_route_destroy(&night);
    kp_route_destroy(&night); /* idempotent */
}

static int s_dests(const char *text, char *err, size_t errlen)
{
    json_t *d = json_loads(text, 0, NULL);
    int rc = kp_route_destinations_check(d, err, errlen);
    json_decref(d);
    return rc;
}

static void test_destinations(void **state)
{
    (void)state;
    char err[256];
    assert_int_equal(s_dests("[{\"type\":\"dicom\",\"ae\":\"CARDIO_PACS\"},{\"type\":\"stow\","
                             "\"url\":\"https://peer/dicom-web/studies\",\"auth\":{\"type\":"
                             "\"bearer\",\"token\":\"t\"}}]",
                             err, sizeof err),
                     0);
    const struct {
        const char *json, *field;
    } bad[] = {
        {"[]", "destinations"},
        {"[{\"type\":\"dicom\",\"ae\":\"\"}]", "destinations[0].ae"},
        {"[{\"type\":\"dicom\",\"ae\":\"A\\\\B\"}]", "destinations[0].ae"},
        {"[{\"type\":\"ftp\"}]", "destinations[0].type"},
        {"[{\"type\":\"stow\",\"url\":\"file:///etc/passwd\"}]", "destinations[0].url"},
        {"[{\"type\":\"stow\",\"url\":\"https://a b/\"}]", "destinations[0].url"},
        {"[{\"type\":\"stow\",\"url\":\"https://h/\",\"auth\":{\"type\":\"basic\","
         "\"username\":\"u\"}}]",
         "password"},
        {"[{\"type\":\"stow\",\"url\":\"https://h/\",\"auth\":{\"type\":\"digest\"}}]",
         "auth.type"},
        {"[{\"type\":\"dicom\",\"ae\":\"X\"},{\"type\":\"dicom\",\"ae\":\"X\"}]",
         "destinations[1]"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        assert_int_equal(s_dests(bad[i].json, err, sizeof err), -1);
        if (!strstr(err, bad[i].field))
            fail_msg("%s: '%s' lacks %s", bad[i].json, err, bad[i].field);
    }
    json_t *d = json_loads("[{\"type\":\"stow\",\"url\":\"https://h/s\",\"auth\":{\"type\":"
                           "\"basic\",\"username\":\"u\",\"password\":\"SECRET\"}},"
                           "{\"type\":\"dicom\",\"ae\":\"AE1\"}]",
                           0, NULL);
    char key[64];
    assert_int_equal(kp_route_destination_key(json_array_get(d, 0), key, sizeof key), 0);
    assert_string_equal(key, "stow:https://h/s");
    assert_int_equal(kp_route_destination_key(json_array_get(d, 1), key, sizeof key), 0);
    assert_string_equal(key, "dicom:AE1");
    json_t *pub = kp_route_destinations_public(d);
    char *text = json_dumps(pub, JSON_COMPACT);
    assert_null(strstr(text, "SECRET"));
    assert_non_null(strstr(text, "\"set\":true"));
    /* sent back as shown: the secret of the same URL and type is kept */
    kp_route_destinations_keep_secrets(pub, d);
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_array_get(pub, 0), "auth"), "password")),
                        "SECRET");
    assert_int_equal(kp_route_destinations_check(pub, err, sizeof err), 0);
    free(text);
    json_decref(pub);
    json_decref(d);
}

int main(void)
{
    if (kp_dicom_init()) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_match_columns_and_metadata),
        cmocka_unit_test(test_refusals_name_the_field),
        cmocka_unit_test(test_time_window),
        cmocka_unit_test(test_destinations),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    kp_dicom_shutdown();
    return rc;
}
