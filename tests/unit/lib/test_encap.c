/* Unit tests of kp_encap: name-derived UIDs, and Encapsulated PDF instances built from index
 * values or copied from a stored instance of the study (read back with kp_dicom). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_dicom.h"
#include "kp_encap.h"
#include "kp_errors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const unsigned char s_pdf_odd[] = "%PDF-1.3\n% odd length!\n%%EOF\n"; /* 29 bytes + NUL */

static char *s_write_tmp(const kp_buf_t *b)
{
    char *path = strdup("/tmp/kp-test-encap-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, b->data, b->len), (ssize_t)b->len);
    close(fd);
    return path;
}

static kp_encap_pdf_t s_input(const unsigned char *pdf, size_t len)
{
    return (kp_encap_pdf_t){
        .pdf = pdf,
        .pdf_len = len,
        .study_uid = "1.2.826.0.1.3680043.10.1411.96.1",
        .patient_name = "Иванов^Иван",
        .patient_id = "P-1",
        .birth_date = "19700102",
        .sex = "M",
        .study_date = "20261127",
        .study_time = "101500",
        .accession = "A-1",
        .study_description = "КТ",
        .series_uid = "1.2.826.0.1.3680043.10.1411.96.1.9",
        .sop_uid = "1.2.826.0.1.3680043.10.1411.96.1.9.1",
        .series_number = 9,
        .instance_number = 2,
        .series_description = "Протокол исследования",
        .document_title = "Протокол исследования, версия 2",
        .content_date = "20261127",
        .content_time = "140500",
        .manufacturer = "Klinika PACS",
    };
}

static void test_uid_from_name(void **state)
{
    (void)state;
    char a[65], b[65], c[65];
    assert_int_equal(kp_encap_uid_from_name("report pdf|1", a), 0);
    assert_int_equal(kp_encap_uid_from_name("report pdf|1", b), 0);
    assert_int_equal(kp_encap_uid_from_name("report pdf|2", c), 0);
    assert_string_equal(a, b);
    assert_string_not_equal(a, c);
    assert_memory_equal(a, "2.25.", 5);
    assert_true(strlen(a) <= 64 && strlen(a) > 20);
    assert_int_equal(strspn(a + 5, "0123456789"), strlen(a) - 5);
    assert_true(a[5] != '0'); /* no leading zero in a UID component */
    assert_int_equal(kp_encap_uid_from_name(NULL, a), KP_EINVAL);
}

static void test_build_from_values(void **state)
{
    (void)state;
    size_t len = sizeof s_pdf_odd - 1;
    assert_true(len % 2 == 1);
    kp_encap_pdf_t in = s_input(s_pdf_odd, len);
    kp_buf_t out = {0};
    assert_int_equal(kp_encap_pdf_build(&in, &out), 0);
    assert_memory_equal(out.data + 128, "DICM", 4);
    char *path = s_write_tmp(&out);
    int err = 0;
    kp_dicom_file_t *f = kp_dicom_open(path, &err);
    assert_non_null(f);
    assert_string_equal(kp_dicom_get(f, 0x00080016), KP_ENCAP_PDF_SOP_CLASS);
    assert_string_equal(kp_dicom_get(f, 0x00080018), in.sop_uid);
    assert_string_equal(kp_dicom_get(f, 0x00080005), "ISO_IR 192");
    assert_string_equal(kp_dicom_get(f, 0x00080060), "DOC");
    assert_string_equal(kp_dicom_get(f, 0x00100010), "Иванов^Иван");
    assert_string_equal(kp_dicom_get(f, 0x0020000D), in.study_uid);
    assert_string_equal(kp_dicom_get(f, 0x0020000E), in.series_uid);
    assert_string_equal(kp_dicom_get(f, 0x00200011), "9");
    assert_string_equal(kp_dicom_get(f, 0x00200013), "2");
    assert_string_equal(kp_dicom_get(f, 0x00420010), in.document_title);
    assert_string_equal(kp_dicom_get(f, 0x00420012), "application/pdf");
    assert_string_equal(kp_dicom_get(f, 0x00280301), "YES");
    assert_string_equal(kp_dicom_get(f, 0x00420015), "29");
    assert_string_equal(kp_dicom_get_in_seq(f, 0x0040A043, 0x00080100), "18748-4");
    assert_string_equal(kp_dicom_get_in_seq(f, 0x0040A043, 0x00080102), "LN");
    assert_string_equal(kp_dicom_transfer_syntax(f), "1.2.840.10008.1.2.1");
    /* the document, padded with one 00H to an even length */
    int64_t off = 0, vlen = 0;
    unsigned char *mem = NULL;
    assert_int_equal(kp_dicom_bulk(f, "00420011", &off, &vlen, &mem), 0);
    assert_int_equal(vlen, (int64_t)len + 1);
    const unsigned char *doc = mem ? mem : out.data + off;
    assert_memory_equal(doc, s_pdf_odd, len);
    assert_int_equal(doc[len], 0);
    free(mem);
    kp_dicom_close(&f);
    /* the same input gives the same bytes */
    kp_buf_t again = {0};
    assert_int_equal(kp_encap_pdf_build(&in, &again), 0);
    assert_int_equal(again.len, out.len);
    assert_memory_equal(again.data, out.data, out.len);
    kp_buf_free(&again);
    kp_buf_free(&out);
    unlink(path);
    free(path);
}

static void test_build_from_source(void **state)
{
    (void)state;
    /* a "stored instance" of the study, then a report built from it with wrong fallbacks */
    kp_encap_pdf_t src = s_input(s_pdf_odd, 30);
    src.sop_uid = "1.2.826.0.1.3680043.10.1411.96.1.8.1";
    src.series_uid = "1.2.826.0.1.3680043.10.1411.96.1.8";
    kp_buf_t sb = {0};
    assert_int_equal(kp_encap_pdf_build(&src, &sb), 0);
    char *spath = s_write_tmp(&sb);
    kp_buf_free(&sb);

    kp_encap_pdf_t in = s_input(s_pdf_odd, 30);
    in.source_path = spath;
    in.patient_name = "Wrong^Name";
    in.accession = "WRONG";
    kp_buf_t out = {0};
    assert_int_equal(kp_encap_pdf_build(&in, &out), 0);
    assert_null(memmem(out.data, out.len, "WRONG", 5));
    assert_non_null(memmem(out.data, out.len, "A-1", 3));
    char *path = s_write_tmp(&out);
    kp_dicom_file_t *f = kp_dicom_open(path, NULL);
    assert_non_null(f);
    assert_string_equal(kp_dicom_get(f, 0x00100010), "Иванов^Иван");
    assert_string_equal(kp_dicom_get(f, 0x00420015), "30");
    kp_dicom_close(&f);
    kp_buf_free(&out);

    /* a source of another study is refused */
    in.study_uid = "1.2.826.0.1.3680043.10.1411.96.2";
    assert_int_equal(kp_encap_pdf_build(&in, &out), KP_EMISMATCH);
    assert_null(out.data);
    /* an unreadable source falls back to the values given */
    in.study_uid = "1.2.826.0.1.3680043.10.1411.96.1";
    in.source_path = "/nonexistent.dcm";
    assert_int_equal(kp_encap_pdf_build(&in, &out), 0);
    assert_non_null(memmem(out.data, out.len, "WRONG", 5));
    kp_buf_free(&out);
    unlink(spath);
    unlink(path);
    free(spath);
    free(path);
}

static void test_build_invalid(void **state)
{
    (void)state;
    kp_buf_t out = {0};
    kp_encap_pdf_t in = s_input(s_pdf_odd, 0);
    assert_int_equal(kp_encap_pdf_build(&in, &out), KP_EINVAL); /* empty document */
    in = s_input(s_pdf_odd, 10);
    in.sop_uid = "not a uid";
    assert_int_equal(kp_encap_pdf_build(&in, &out), KP_EINVAL);
    assert_int_equal(kp_encap_pdf_build(NULL, &out), KP_EINVAL);
}

static int s_setup(void **state)
{
    (void)state;
    return kp_dicom_init();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uid_from_name),
        cmocka_unit_test(test_build_from_values),
        cmocka_unit_test(test_build_from_source),
        cmocka_unit_test(test_build_invalid),
    };
    return cmocka_run_group_tests(tests, s_setup, NULL);
}
