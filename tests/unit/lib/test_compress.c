/* Unit tests of lib/dicom/kp_compress.h: inspecting stored files, and the lossless round-trip
 * check pacs-compressor relies on (a JPEG-LS copy made by kp_image_transcode() passes; a copy
 * with one pixel or one attribute changed, or a colour-by-plane image the encoder rewrote, does
 * not).
 *
 * Test data: pydicom's test files (python3-pydicom); a case whose file is absent is skipped. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kp_compress.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_image.h"
#include "kp_log.h"

#define TEST_FILES  "/usr/lib/python3/dist-packages/pydicom/data/test_files"
#define TS_JPEG_LS  "1.2.840.10008.1.2.4.80"
#define TS_JPEG_SV1 "1.2.840.10008.1.2.4.70"

static char s_tmp[256];

static const char *s_path(const char *name)
{
    static char p[512];
    snprintf(p, sizeof p, TEST_FILES "/%s", name);
    return p;
}

static int s_have(const char *name)
{
    if (access(s_path(name), R_OK) == 0) return 1;
    printf("  skipped: %s is absent (python3-pydicom test files)\n", s_path(name));
    return 0;
}

#define NEED(name)                                                                                 \
    do {                                                                                           \
        if (!s_have(name)) skip();                                                                 \
    } while (0)

/* Transcodes name to ts into s_tmp/out.dcm; returns that path. */
static const char *s_transcode(const char *name, const char *ts)
{
    static char out[300];
    kp_buf_t b = {0};
    assert_int_equal(kp_image_transcode(s_path(name), ts, &b), 0);
    snprintf(out, sizeof out, "%s/out.dcm", s_tmp);
    FILE *f = fopen(out, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b.data, 1, b.len, f), b.len);
    fclose(f);
    kp_buf_free(&b);
    return out;
}

/* Flips one byte of the file at offset from its end. */
static void s_flip(const char *path, long from_end)
{
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    assert_int_equal(fseek(f, -from_end, SEEK_END), 0);
    int c = fgetc(f);
    assert_int_equal(fseek(f, -from_end, SEEK_END), 0);
    fputc(c ^ 0x01, f);
    fclose(f);
}

static void test_inspect(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    kp_compress_info_t i;
    assert_int_equal(kp_compress_inspect(s_path("CT_small.dcm"), &i), 0);
    assert_string_equal(i.ts, "1.2.840.10008.1.2.1");
    assert_true(i.has_pixels && !i.encapsulated && i.decodable && !i.float_pixels);
    assert_int_equal(i.bits_allocated, 16);
    assert_int_equal(i.samples_per_pixel, 1);
    assert_int_equal(i.frames, 1);
    assert_string_equal(i.photometric, "MONOCHROME2");
    if (s_have("JPEG2000.dcm")) {
        assert_int_equal(kp_compress_inspect(s_path("JPEG2000.dcm"), &i), 0);
        assert_true(i.has_pixels && i.encapsulated && !i.decodable);
    }
    if (s_have("rtplan.dcm")) {
        assert_int_equal(kp_compress_inspect(s_path("rtplan.dcm"), &i), 0);
        assert_false(i.has_pixels);
    }
    assert_int_equal(kp_compress_inspect("/nonexistent/x.dcm", &i), KP_EIO);
    assert_int_equal(kp_compress_inspect(NULL, &i), KP_EINVAL);
}

static void test_verify_roundtrip(void **state)
{
    (void)state;
    const char *names[] = {"CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm"};
    const char *targets[] = {TS_JPEG_LS, TS_JPEG_SV1};
    char why[200];
    for (size_t t = 0; t < 2; t++) {
        for (size_t n = 0; n < 3; n++) {
            if (!s_have(names[n])) continue;
            const char *out = s_transcode(names[n], targets[t]);
            int rc = kp_compress_verify(s_path(names[n]), out, why, sizeof why);
            if (rc) printf("  %s -> %s: %s\n", names[n], targets[t], why);
            assert_int_equal(rc, 0);
            assert_string_equal(why, "");
            /* the original checks against itself as well */
            assert_int_equal(kp_compress_verify(s_path(names[n]), s_path(names[n]), NULL, 0), 0);
        }
    }
}

static void test_verify_detects_a_changed_pixel(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    char copy[300], why[200];
    snprintf(copy, sizeof copy, "%s/copy.dcm", s_tmp);
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "cp %s %s", s_path("CT_small.dcm"), copy);
    assert_int_equal(system(cmd), 0);
    s_flip(copy, 1000); /* inside the native pixel data (126 bytes of trailing padding follow) */
    assert_int_equal(kp_compress_verify(s_path("CT_small.dcm"), copy, why, sizeof why),
                     KP_EMISMATCH);
    assert_non_null(strstr(why, "pixel data differs"));
}

static void test_verify_detects_a_changed_attribute(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    char copy[300], why[200], cmd[1400];
    snprintf(copy, sizeof copy, "%s/attr.dcm", s_tmp);
    snprintf(cmd, sizeof cmd, "cp %s %s && dcmodify -nb -q -m \"(0010,0010)=Other^Name\" %s",
             s_path("CT_small.dcm"), copy, copy);
    if (system(cmd) != 0) skip(); /* dcmodify (package dcmtk) is missing */
    assert_int_equal(kp_compress_verify(s_path("CT_small.dcm"), copy, why, sizeof why),
                     KP_EMISMATCH);
    assert_non_null(strstr(why, "(0010,0010)"));
}

static void test_verify_refuses_planar_rewrite(void **state)
{
    (void)state;
    NEED("ExplVR_BigEnd.dcm"); /* RGB, PlanarConfiguration 1: JPEG-LS makes it 0 */
    const char *out = s_transcode("ExplVR_BigEnd.dcm", TS_JPEG_LS);
    char why[200];
    assert_int_equal(kp_compress_verify(s_path("ExplVR_BigEnd.dcm"), out, why, sizeof why),
                     KP_EMISMATCH);
    assert_true(why[0] != 0);
    assert_int_equal(kp_compress_verify(NULL, out, why, sizeof why), KP_EINVAL);
}

static int s_setup(void **state)
{
    (void)state;
    snprintf(s_tmp, sizeof s_tmp, "/tmp/kp-test-compress-XXXXXX");
    return mkdtemp(s_tmp) ? 0 : -1;
}

static int s_teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", s_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    kp_log_set_level("error");
    if (kp_dicom_init()) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_inspect, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_verify_roundtrip, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_verify_detects_a_changed_pixel, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_verify_detects_a_changed_attribute, s_setup,
                                        s_teardown),
        cmocka_unit_test_setup_teardown(test_verify_refuses_planar_rewrite, s_setup, s_teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    kp_dicom_shutdown();
    return rc;
}
