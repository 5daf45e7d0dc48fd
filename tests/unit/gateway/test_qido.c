/* Unit tests of kp_qido: QIDO-RS query strings -> SQL text + parameters, without a database.
 * The central property: no request value ever appears in the SQL text, only as a parameter. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_qido.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static kp_qido_t *s_ok(kp_qido_level_t level, const char *study, const char *series,
                       const char *query)
{
    kp_qido_t *q = NULL;
    char err[256] = "";
    int rc = kp_qido_build(level, study, series, query, 100, 1000, &q, err, sizeof err);
    if (rc) fail_msg("'%s' rejected: %s", query ? query : "(null)", err);
    assert_non_null(q);
    assert_non_null(q->sql);
    return q;
}

static void s_bad(kp_qido_level_t level, const char *query, const char *err_part)
{
    kp_qido_t *q = NULL;
    char err[256] = "";
    int rc = kp_qido_build(level, NULL, NULL, query, 100, 1000, &q, err, sizeof err);
    if (rc != KP_EINVAL) fail_msg("'%s' accepted", query);
    assert_null(q);
    if (err_part && !strstr(err, err_part))
        fail_msg("'%s': error '%s' lacks '%s'", query, err, err_part);
}

static bool s_has_param(const kp_qido_t *q, const char *v)
{
    for (int i = 0; i < q->nparams; i++)
        if (!strcmp(q->params[i], v)) return true;
    return false;
}

static void test_defaults(void **state)
{
    (void)state;
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, NULL);
    assert_int_equal(q->limit, 100);
    assert_int_equal(q->offset, 0);
    assert_false(q->fuzzy);
    assert_null(q->warning);
    assert_non_null(strstr(q->sql, "'0020000D'"));
    assert_non_null(strstr(q->sql, "'00100010'"));
    assert_null(strstr(q->sql, "'0020000E'")); /* no series attributes at study level */
    assert_null(strstr(q->sql, "LATERAL"));    /* metadata only when needed */
    assert_int_equal(q->nparams, 2);           /* limit, offset */
    assert_string_equal(q->params[0], "100");
    kp_qido_destroy(&q);
    assert_null(q);
    kp_qido_destroy(&q); /* idempotent */
}

static void test_values_only_as_parameters(void **state)
{
    (void)state;
    const char *evil = "x'; DROP TABLE studies; --";
    char query[512];
    snprintf(query, sizeof query,
             "PatientID=x%%27%%3B%%20DROP%%20TABLE%%20studies%%3B%%20--&PatientName=%%27or1*"
             "&StudyDescription=%%27%%22&fuzzymatching=true");
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, query);
    assert_null(strstr(q->sql, "DROP"));
    assert_null(strstr(q->sql, "or1"));
    assert_true(s_has_param(q, evil));
    assert_true(s_has_param(q, "'or1%"));
    assert_true(q->fuzzy);
    assert_non_null(strstr(q->sql, "st.patient_name_fold LIKE kp_fold($"));
    kp_qido_destroy(&q);
}

static void test_wildcards(void **state)
{
    (void)state;
    char *p = kp_qido_like_pattern("a*b?c%d_e\\f");
    assert_string_equal(p, "a%b_c\\%d\\_e\\\\f");
    free(p);
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, "AccessionNumber=ACC_00*");
    assert_true(s_has_param(q, "ACC\\_00%"));
    assert_non_null(strstr(q->sql, "st.accession_number LIKE $1"));
    kp_qido_destroy(&q);
    /* no wildcard: equality, value untouched */
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "AccessionNumber=ACC_003%25");
    assert_true(s_has_param(q, "ACC_003%"));
    assert_non_null(strstr(q->sql, "st.accession_number = $1"));
    kp_qido_destroy(&q);
    /* PN without fuzzy matching: case-insensitive */
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "PatientName=doe*");
    assert_non_null(strstr(q->sql, "lower(st.patient_name) LIKE lower($1)"));
    kp_qido_destroy(&q);
    /* "*" alone and an empty value are universal: no condition, attribute returned */
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "PatientName=*&IssuerOfPatientID=");
    assert_int_equal(q->nparams, 2);
    assert_non_null(strstr(q->sql, "'00100021'"));
    kp_qido_destroy(&q);
}

static void test_uid_lists_and_tags(void **state)
{
    (void)state;
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyInstanceUID=1.2.3%5C1.2.4");
    assert_true(s_has_param(q, "{\"1.2.3\",\"1.2.4\"}"));
    assert_non_null(strstr(q->sql, "st.study_uid = ANY ($1::text[])"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "0020000d=1.2.3&00100020=P1");
    assert_non_null(strstr(q->sql, "st.study_uid = $1"));
    assert_non_null(strstr(q->sql, "st.patient_id = $2"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "ModalitiesInStudy=CT%2CMR");
    assert_true(s_has_param(q, "{\"CT\",\"MR\"}"));
    assert_non_null(strstr(q->sql, "st.modalities && ($1::text[])"));
    kp_qido_destroy(&q);
}

static void test_ranges(void **state)
{
    (void)state;
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyDate=20200101-20201231");
    assert_string_equal(q->params[0], "20200101");
    assert_string_equal(q->params[1], "20201231");
    assert_non_null(strstr(q->sql, "st.study_date >= $1 AND st.study_date <= $2"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyDate=20200101-");
    assert_non_null(strstr(q->sql, "st.study_date >= $1"));
    assert_null(strstr(q->sql, "st.study_date <="));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyDate=-20200101");
    assert_non_null(strstr(q->sql, "st.study_date <= $1"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyTime=-1200");
    assert_string_equal(q->params[0], "1200~"); /* 1200 covers 120059.99 */
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "StudyTime=101500.123-");
    kp_qido_destroy(&q);
}

static void test_bad_values(void **state)
{
    (void)state;
    s_bad(KP_QIDO_STUDY, "StudyDate=2020", "StudyDate");
    s_bad(KP_QIDO_STUDY, "StudyDate=-", NULL);
    s_bad(KP_QIDO_STUDY, "StudyDate=20200101-2021", NULL);
    s_bad(KP_QIDO_STUDY, "StudyTime=1", NULL);
    s_bad(KP_QIDO_STUDY, "StudyTime=12345", NULL);
    s_bad(KP_QIDO_STUDY, "StudyInstanceUID=1.2.x", "StudyInstanceUID");
    s_bad(KP_QIDO_STUDY, "StudyInstanceUID=1..2", NULL);
    s_bad(KP_QIDO_STUDY, "StudyInstanceUID=1.2%5C", NULL);
    s_bad(KP_QIDO_STUDY, "ModalitiesInStudy=ct", NULL);
    s_bad(KP_QIDO_STUDY, "limit=-1", "limit");
    s_bad(KP_QIDO_STUDY, "limit=abc", NULL);
    s_bad(KP_QIDO_STUDY, "limit=99999999999999999999", NULL);
    s_bad(KP_QIDO_STUDY, "offset=1x", NULL);
    s_bad(KP_QIDO_STUDY, "fuzzymatching=yes", NULL);
    s_bad(KP_QIDO_STUDY, "PatientID=a&PatientID=b", "twice");
    s_bad(KP_QIDO_STUDY, "PatientID=%zz", "percent");
    s_bad(KP_QIDO_STUDY, "PatientID=a%00b", NULL);
    s_bad(KP_QIDO_SERIES, "SeriesNumber=one", NULL);
    kp_qido_t *q = NULL;
    char err[128];
    assert_int_equal(
        kp_qido_build(KP_QIDO_SERIES, "1.2.x", NULL, "", 100, 1000, &q, err, sizeof err),
        KP_EINVAL);
    assert_null(q);
}

static void test_limit_and_warnings(void **state)
{
    (void)state;
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL, "limit=5000&offset=20");
    assert_int_equal(q->limit, 1000);
    assert_int_equal(q->offset, 20);
    assert_non_null(q->warning);
    assert_non_null(strstr(q->warning, "1000"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "limit=7&orderby=PatientName&Modality=CT&x%22y=1");
    assert_int_equal(q->limit, 7);
    assert_non_null(strstr(q->warning, "orderby"));
    assert_non_null(strstr(q->warning, "Modality")); /* series key at study level: ignored */
    assert_null(strchr(q->warning, '"'));            /* safe inside a quoted header value */
    kp_qido_destroy(&q);
}

static void test_includefield(void **state)
{
    (void)state;
    kp_qido_t *q = s_ok(KP_QIDO_STUDY, NULL, NULL,
                        "includefield=00081030%2C00080060,00080090&includefield=00100030");
    assert_non_null(strstr(q->sql, "LATERAL")); /* 00080060 comes from the stored metadata */
    assert_true(s_has_param(q, "00080060"));
    assert_false(s_has_param(q, "00081030")); /* a column */
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_STUDY, NULL, NULL, "includefield=all");
    assert_non_null(strstr(q->sql, "'00080062'"));
    assert_null(strstr(q->sql, "LATERAL"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_INSTANCE, NULL, NULL, "includefield=00280101&includefield=Bogus");
    assert_non_null(strstr(q->sql, "i.metadata ? $"));
    assert_non_null(strstr(q->warning, "Bogus"));
    kp_qido_destroy(&q);
}

static void test_levels(void **state)
{
    (void)state;
    /* series under a study: series defaults + StudyInstanceUID, not the study's other defaults */
    kp_qido_t *q = s_ok(KP_QIDO_SERIES, "1.2.3", NULL, "");
    assert_non_null(strstr(q->sql, "'0020000E'"));
    assert_non_null(strstr(q->sql, "'0020000D'"));
    assert_null(strstr(q->sql, "'00100010'"));
    assert_non_null(strstr(q->sql, "st.study_uid = $1"));
    assert_string_equal(q->params[0], "1.2.3");
    kp_qido_destroy(&q);
    /* all series: the study attributes too */
    q = s_ok(KP_QIDO_SERIES, NULL, NULL, "PatientName=x*");
    assert_non_null(strstr(q->sql, "'00100010'"));
    kp_qido_destroy(&q);
    q = s_ok(KP_QIDO_INSTANCE, "1.2.3", "1.2.3.4", "InstanceNumber=3");
    assert_non_null(strstr(q->sql, "se.series_uid = $2"));
    assert_non_null(strstr(q->sql, "i.instance_number = $3::int"));
    assert_non_null(strstr(q->sql, "'00080018'"));
    kp_qido_destroy(&q);
}

static void test_uid_check(void **state)
{
    (void)state;
    assert_true(kp_qido_valid_uid("1.2.840.10008.1.2", 17));
    assert_false(kp_qido_valid_uid("", 0));
    assert_false(kp_qido_valid_uid(".1", 2));
    assert_false(kp_qido_valid_uid("1.", 2));
    assert_false(kp_qido_valid_uid("1..2", 4));
    assert_false(kp_qido_valid_uid("1.2a", 4));
    char long_uid[70];
    memset(long_uid, '1', sizeof long_uid);
    assert_true(kp_qido_valid_uid(long_uid, 64));
    assert_false(kp_qido_valid_uid(long_uid, 65));
    char s[] = "a%2Fb+c%41";
    assert_true(kp_qido_url_decode(s));
    assert_string_equal(s, "a/b cA");
    char t[] = "bad%4";
    assert_false(kp_qido_url_decode(t));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_values_only_as_parameters),
        cmocka_unit_test(test_wildcards),
        cmocka_unit_test(test_uid_lists_and_tags),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_limit_and_warnings),
        cmocka_unit_test(test_includefield),
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_uid_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
