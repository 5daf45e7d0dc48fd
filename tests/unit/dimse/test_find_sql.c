/* Unit tests of kp_find_sql: C-FIND and C-MOVE / C-GET identifiers -> SQL text and parameters
 * (no database).
 * The module belongs to pacs-dicomd, not libkp: the Makefile links its object into this test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kp_errors.h"
#include "kp_find_sql.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define K(t, v, s)                                                                                 \
    {                                                                                              \
        .tag = (t), .vr = v, .value = (s)                                                          \
    }

static kp_find_sql_opts_t s_opts = {.fold_names = true, .limit = 100};

/* Builds, checks success and returns the query (caller clears). */
static kp_find_sql_t s_build(int model, const char *level, const kp_dicom_find_key_t *keys,
                             size_t n, bool combined)
{
    kp_dicom_find_req_t req = {.calling_ae = "T",
                               .called_ae = "K",
                               .peer_host = "h",
                               .model = model,
                               .level = level,
                               .keys = keys,
                               .nkeys = n,
                               .combined_datetime = combined};
    kp_find_sql_t q;
    char err[160];
    int rc = kp_find_sql_build(&req, &s_opts, &q, err, sizeof err);
    if (rc) fail_msg("build failed: %s", err);
    return q;
}

static int s_build_err(int model, const char *level, const kp_dicom_find_key_t *keys, size_t n,
                       char *err, size_t errlen)
{
    kp_dicom_find_req_t req = {.model = model, .level = level, .keys = keys, .nkeys = n};
    kp_find_sql_t q;
    int rc = kp_find_sql_build(&req, &s_opts, &q, err, errlen);
    kp_find_sql_clear(&q);
    return rc;
}

static void s_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle)) fail_msg("'%s' not in:\n%s", needle, hay);
}

static void s_lacks(const char *hay, const char *needle)
{
    if (strstr(hay, needle)) fail_msg("'%s' unexpectedly in:\n%s", needle, hay);
}

static int s_col_of(const kp_find_sql_t *q, uint32_t tag)
{
    for (int i = 0; i < q->ncols; i++)
        if (q->col_tags[i] == tag) return i;
    return -1;
}

static void test_like_escaping(void **state)
{
    (void)state;
    char *p = kp_find_sql_like("a*b?c%d_e\\f");
    assert_string_equal(p, "a%b_c\\%d\\_e\\\\f");
    free(p);
    p = kp_find_sql_like("");
    assert_string_equal(p, "");
    free(p);
}

static void test_universal_and_return_keys(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x00100010, "PN", ""), K(0x00080020, "DA", ""),
                                  K(0x0020000D, "UI", ""), K(0x00080050, "SH", "*"),
                                  K(0x00080061, "CS", ""), K(0x00201208, "IS", ""),
                                  K(0x00091001, "LO", "")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 7, false);
    s_lacks(q.sql, "WHERE"); /* every key is universal */
    s_contains(q.sql, "FROM studies st JOIN patients p");
    s_contains(q.sql, "array_to_string(st.modalities, '\\')");
    s_contains(q.sql, "(st.num_instances)::text");
    assert_true(s_col_of(&q, 0x0020000D) >= 0);
    assert_true(s_col_of(&q, 0x00100010) >= 0);
    assert_int_equal(s_col_of(&q, 0x00091001), -1); /* unknown key: returned empty by the shim */
    assert_int_equal(q.nparams, 1);                 /* the LIMIT */
    assert_string_equal(q.params[0], "101");
    assert_string_equal(q.level, "STUDY");
    kp_find_sql_clear(&q);
    kp_find_sql_clear(&q); /* idempotent */
}

static void test_single_wildcard_and_list(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x00080050, "SH", "ACC1"), K(0x00081030, "LO", "Br?in*"),
                                  K(0x00080061, "CS", "CT\\MR"), K(0x0020000D, "UI", "1.2\\1.3")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 4, false);
    s_contains(q.sql, "WHERE (st.accession_number = $1) AND (st.study_description LIKE $2)");
    assert_string_equal(q.params[0], "ACC1");
    assert_string_equal(q.params[1], "Br_in%");
    s_contains(q.sql, "($3 = ANY(st.modalities) OR $4 = ANY(st.modalities))");
    assert_string_equal(q.params[2], "CT");
    assert_string_equal(q.params[3], "MR");
    s_contains(q.sql, "st.study_uid = ANY(string_to_array($5::text, '\\'))");
    assert_string_equal(q.params[4], "1.2\\1.3");
    /* client text never reaches the SQL */
    s_lacks(q.sql, "ACC1");
    s_lacks(q.sql, "Br");
    kp_find_sql_clear(&q);
}

static void test_injection_stays_in_parameters(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x00100020, "LO", "x' OR '1'='1"),
                                  K(0x00100010, "PN", "O'Brien*; DROP TABLE studies")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 2, false);
    s_lacks(q.sql, "'1'");
    s_lacks(q.sql, "DROP");
    s_lacks(q.sql, "Brien");
    assert_string_equal(q.params[0], "x' OR '1'='1");
    kp_find_sql_clear(&q);
}

static void test_person_names(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x00100010, "PN", "müller*"), K(0x00080090, "PN", "Doe")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 2, false);
    s_contains(q.sql, "st.patient_name_fold LIKE kp_fold($1)");
    s_contains(q.sql, "kp_fold(st.referring_physician) = kp_fold($2)");
    kp_find_sql_clear(&q);
    q = s_build(KP_DICOM_FIND_PATIENT_ROOT, "PATIENT", keys, 1, false);
    s_contains(q.sql, "FROM patients p WHERE (kp_fold(p.patient_name) LIKE kp_fold($1))");
    assert_true(s_col_of(&q, 0x00100020) >= 0); /* PatientID always returned */
    kp_find_sql_clear(&q);
    s_opts.fold_names = false;
    q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 1, false);
    s_contains(q.sql, "(st.patient_name LIKE $1)");
    s_lacks(q.sql, "kp_fold");
    s_opts.fold_names = true;
    kp_find_sql_clear(&q);
}

static void test_date_time_ranges_study(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x00080020, "DA", "20200101-20201231"),
                                  K(0x00080030, "TM", "0800-1200"),
                                  K(0x00100030, "DA", "-19800101")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 3, false);
    s_contains(q.sql, "(st.study_date <> '' AND st.study_date >= $1::text AND st.study_date <= "
                      "$2::text)");
    assert_string_equal(q.params[0], "20200101");
    assert_string_equal(q.params[1], "20201231");
    s_contains(q.sql, "(st.study_time <> '' AND st.study_time >= $3::text AND "
                      "left(st.study_time, length($4::text)) <= $4::text)");
    s_contains(q.sql, "(st.patient_birth_date <> '' AND st.patient_birth_date <= $5::text)");
    assert_string_equal(q.params[4], "19800101");
    kp_find_sql_clear(&q);

    /* combined date-time when negotiated: one condition over date||time */
    q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 2, true);
    s_contains(q.sql, "st.study_date || coalesce(st.study_time, '') >= $1::text");
    s_contains(q.sql, "left(st.study_date || coalesce(st.study_time, ''), length($2::text)) <= "
                      "$2::text");
    assert_string_equal(q.params[0], "202001010800");
    assert_string_equal(q.params[1], "202012311200");
    s_lacks(q.sql, "st.study_time >=");
    kp_find_sql_clear(&q);

    kp_dicom_find_key_t single[] = {K(0x00080020, "DA", "20200315")};
    q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", single, 1, false);
    s_contains(q.sql, "WHERE st.study_date = $1 ");
    kp_find_sql_clear(&q);
}

static void test_integers(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x0020000D, "UI", "1.2.3"), K(0x0020000E, "UI", "1.2.3.4"),
                                  K(0x00200013, "IS", "007\\x\\+3"), K(0x00280010, "US", "")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "IMAGE", keys, 4, false);
    s_contains(q.sql, "FROM instances i JOIN series se");
    s_contains(q.sql, "i.instance_number = ANY(string_to_array($3::text, '\\')::int[])");
    assert_string_equal(q.params[2], "7\\3");
    s_contains(q.sql, "(i.rows)::text");
    assert_true(s_col_of(&q, 0x00080018) >= 0); /* SOP Instance UID always returned */
    kp_find_sql_clear(&q);
    kp_dicom_find_key_t bad[] = {K(0x0020000D, "UI", "1.2.3"), K(0x0020000E, "UI", "1.2.3.4"),
                                 K(0x00200013, "IS", "abc")};
    q = s_build(KP_DICOM_FIND_STUDY_ROOT, "IMAGE", bad, 3, false);
    s_contains(q.sql, "FALSE");
    kp_find_sql_clear(&q);
}

static void test_image_metadata_keys(void **state)
{
    (void)state;
    kp_dicom_find_key_t keys[] = {K(0x0020000D, "UI", "1.2.3"), K(0x0020000E, "UI", "1.2.3.4"),
                                  K(0x00180050, "DS", ""), K(0x00400275, "SQ", "")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "IMAGE", keys, 4, false);
    int col = s_col_of(&q, 0x00180050);
    assert_true(col >= 0);
    s_contains(q.sql, "i.metadata->$");
    assert_string_equal(q.params[2], "00180050");
    assert_int_equal(s_col_of(&q, 0x00400275), -1); /* sequences are not returned */
    kp_find_sql_clear(&q);
}

static void test_hierarchy_errors(void **state)
{
    (void)state;
    char err[160];
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, NULL, NULL, 0, err, sizeof err),
                     KP_EMISMATCH);
    assert_string_equal(err, "QueryRetrieveLevel missing");
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, "PATIENT", NULL, 0, err, sizeof err),
                     KP_EMISMATCH);
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, "FOO", NULL, 0, err, sizeof err),
                     KP_EMISMATCH);
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, "SERIES", NULL, 0, err, sizeof err),
                     KP_EMISMATCH);
    s_contains(err, "StudyInstanceUID");
    kp_dicom_find_key_t wild[] = {K(0x0020000D, "UI", "1.2*")};
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, "SERIES", wild, 1, err, sizeof err),
                     KP_EMISMATCH);
    kp_dicom_find_key_t pr[] = {K(0x0020000D, "UI", "1.2")};
    assert_int_equal(s_build_err(KP_DICOM_FIND_PATIENT_ROOT, "SERIES", pr, 1, err, sizeof err),
                     KP_EMISMATCH);
    s_contains(err, "PatientID");
    kp_dicom_find_key_t ok[] = {K(0x00100020, "LO", "P1"), K(0x0020000D, "UI", "1.2")};
    assert_int_equal(s_build_err(KP_DICOM_FIND_PATIENT_ROOT, "SERIES", ok, 2, err, sizeof err), 0);
    assert_int_equal(s_build_err(0, "STUDY", NULL, 0, err, sizeof err), KP_EMISMATCH);
}

static void test_too_many_values(void **state)
{
    (void)state;
    size_t n = 5000;
    char *v = malloc(n * 2 + 1);
    for (size_t i = 0; i < n; i++) {
        v[2 * i] = 'A';
        v[2 * i + 1] = '\\';
    }
    v[2 * n - 1] = 0;
    kp_dicom_find_key_t keys[] = {K(0x00080050, "SH", v)};
    char err[160];
    assert_int_equal(s_build_err(KP_DICOM_FIND_STUDY_ROOT, "STUDY", keys, 1, err, sizeof err),
                     KP_EINVAL);
    free(v);
}

/* Site scope: a condition on the study's site (its parameter is $1), patients having a study
 * there with their counts over it; a scope naming no site matches nothing. */
static void test_site_scope(void **state)
{
    (void)state;
    kp_find_sql_opts_t saved = s_opts;
    s_opts.site_id = 7;
    kp_dicom_find_key_t ks[] = {K(0x0020000D, "UI", ""), K(0x00100010, "PN", "DOE*")};
    kp_find_sql_t q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", ks, 2, false);
    s_contains(q.sql, "st.site_id = $1::int");
    assert_string_equal(q.params[0], "7");
    s_contains(q.sql, "kp_fold($2)");
    kp_find_sql_clear(&q);

    kp_dicom_find_key_t kp[] = {K(0x00100020, "LO", ""), K(0x00201200, "IS", ""),
                                K(0x00201204, "IS", "")};
    q = s_build(KP_DICOM_FIND_PATIENT_ROOT, "PATIENT", kp, 3, false);
    s_contains(q.sql, "EXISTS (SELECT 1 FROM studies x WHERE x.patient_pk = p.pk AND "
                      "x.site_id = $1::int)");
    s_contains(q.sql, "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk AND "
                      "x.site_id = $1::int)");
    s_contains(q.sql, "sum(x.num_instances)");
    s_lacks(q.sql, "p.num_studies");
    kp_find_sql_clear(&q);

    s_opts.site_id = -1;
    q = s_build(KP_DICOM_FIND_STUDY_ROOT, "STUDY", ks, 2, false);
    s_contains(q.sql, "WHERE FALSE");
    kp_find_sql_clear(&q);
    s_opts = saved;

    kp_dicom_retrieve_req_t req = {.op = KP_DICOM_GET,
                                   .model = KP_DICOM_FIND_STUDY_ROOT,
                                   .level = "STUDY",
                                   .keys = (kp_dicom_find_key_t[]){K(0x0020000D, "UI", "1.2.3")},
                                   .nkeys = 1};
    char err[160];
    assert_int_equal(kp_find_sql_retrieve_scoped(&req, 10, 3, &q, err, sizeof err), 0);
    s_contains(q.sql, "st.study_uid = ANY(string_to_array($1, '\\')) AND st.site_id = $2::int");
    assert_string_equal(q.params[1], "3");
    s_contains(q.sql, "LIMIT $3::bigint");
    kp_find_sql_clear(&q);
    assert_int_equal(kp_find_sql_retrieve_scoped(&req, 10, -1, &q, err, sizeof err), 0);
    s_contains(q.sql, "AND FALSE");
    kp_find_sql_clear(&q);
}

/* ---- C-MOVE / C-GET (kp_find_sql_retrieve) ---------------------------------------------- */

static int s_retrieve(int model, const char *level, const kp_dicom_find_key_t *keys, size_t n,
                      kp_find_sql_t *q)
{
    kp_dicom_retrieve_req_t req = {.calling_ae = "T",
                                   .op = KP_DICOM_MOVE,
                                   .model = model,
                                   .level = level,
                                   .move_destination = "D",
                                   .keys = keys,
                                   .nkeys = n};
    char err[160];
    return kp_find_sql_retrieve(&req, 65535, q, err, sizeof err);
}

static void test_retrieve_levels(void **state)
{
    (void)state;
    kp_find_sql_t q;
    /* Study Root, STUDY level, a list of studies; other keys are ignored */
    kp_dicom_find_key_t k1[] = {K(0x0020000D, "UI", "1.2.3\\1.2.4"),
                                K(0x00100010, "PN", "IGNORED*")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "STUDY", k1, 2, &q), 0);
    s_contains(q.sql, "st.study_uid = ANY(string_to_array($1, '\\'))");
    s_lacks(q.sql, "patient_name");
    s_contains(q.sql, "LIMIT $2::bigint");
    assert_int_equal(q.nparams, 2);
    assert_string_equal(q.params[0], "1.2.3\\1.2.4");
    assert_string_equal(q.params[1], "65536");
    assert_int_equal(q.ncols, 5);
    assert_string_equal(q.level, "STUDY");
    kp_find_sql_clear(&q);

    /* Patient Root, PATIENT level */
    kp_dicom_find_key_t k2[] = {K(0x00100020, "LO", "PID-1")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_PATIENT_ROOT, "PATIENT", k2, 1, &q), 0);
    s_contains(q.sql, "st.patient_id = $1");
    kp_find_sql_clear(&q);

    /* Patient Root, IMAGE level: every level's unique key, a list of SOP instances */
    kp_dicom_find_key_t k3[] = {K(0x00080018, "UI", "1.9.1\\1.9.2"), K(0x00100020, "LO", "P"),
                                K(0x0020000D, "UI", "1.2"), K(0x0020000E, "UI", "1.2.1")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_PATIENT_ROOT, "IMAGE", k3, 4, &q), 0);
    s_contains(q.sql, "st.patient_id = $1");
    s_contains(q.sql, "st.study_uid = $2");
    s_contains(q.sql, "se.series_uid = $3");
    s_contains(q.sql, "i.sop_uid = ANY(string_to_array($4, '\\'))");
    s_contains(q.sql, "ORDER BY st.pk, se.pk, i.instance_number");
    kp_find_sql_clear(&q);

    /* values travel as parameters only */
    kp_dicom_find_key_t k4[] = {K(0x0020000D, "UI", "1'; DROP TABLE instances; --")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "STUDY", k4, 1, &q), 0);
    s_lacks(q.sql, "DROP");
    kp_find_sql_clear(&q);
}

static void test_retrieve_errors(void **state)
{
    (void)state;
    kp_find_sql_t q;
    kp_dicom_find_key_t study[] = {K(0x0020000D, "UI", "1.2.3")};
    /* level missing, or PATIENT in Study Root */
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, NULL, study, 1, &q), KP_EMISMATCH);
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "PATIENT", study, 1, &q), KP_EMISMATCH);
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "FOO", study, 1, &q), KP_EMISMATCH);
    /* unique key of the retrieve level missing */
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "SERIES", study, 1, &q), KP_EMISMATCH);
    /* Patient Root without PatientID */
    assert_int_equal(s_retrieve(KP_DICOM_FIND_PATIENT_ROOT, "STUDY", study, 1, &q), KP_EMISMATCH);
    /* empty, wildcard, a list above the retrieve level, an empty list element */
    kp_dicom_find_key_t e1[] = {K(0x0020000D, "UI", "")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "STUDY", e1, 1, &q), KP_EMISMATCH);
    kp_dicom_find_key_t e2[] = {K(0x0020000D, "UI", "1.2.*")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "STUDY", e2, 1, &q), KP_EMISMATCH);
    kp_dicom_find_key_t e3[] = {K(0x0020000D, "UI", "1.2\\1.3"), K(0x0020000E, "UI", "1.2.1")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "SERIES", e3, 2, &q), KP_EMISMATCH);
    kp_dicom_find_key_t e4[] = {K(0x0020000D, "UI", "1.2\\\\1.3")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_STUDY_ROOT, "STUDY", e4, 1, &q), KP_EMISMATCH);
    kp_dicom_find_key_t e5[] = {K(0x00100020, "LO", "A\\B")};
    assert_int_equal(s_retrieve(KP_DICOM_FIND_PATIENT_ROOT, "PATIENT", e5, 1, &q), KP_EMISMATCH);
    assert_null(q.sql);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_like_escaping),
        cmocka_unit_test(test_universal_and_return_keys),
        cmocka_unit_test(test_single_wildcard_and_list),
        cmocka_unit_test(test_injection_stays_in_parameters),
        cmocka_unit_test(test_person_names),
        cmocka_unit_test(test_date_time_ranges_study),
        cmocka_unit_test(test_integers),
        cmocka_unit_test(test_image_metadata_keys),
        cmocka_unit_test(test_hierarchy_errors),
        cmocka_unit_test(test_too_many_values),
        cmocka_unit_test(test_retrieve_levels),
        cmocka_unit_test(test_retrieve_errors),
        cmocka_unit_test(test_site_scope),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
