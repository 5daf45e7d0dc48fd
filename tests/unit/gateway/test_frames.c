/* Unit tests of kp_frames: frame lists, native and encapsulated frame location (on synthetic
 * files, including malformed ones), media types and Accept negotiation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_frames.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A temp file holding buf; returns an fd positioned anywhere (pread is used). */
static int s_file(const unsigned char *buf, size_t len)
{
    char path[] = "/tmp/kp-test-frames-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    assert_int_equal(write(fd, buf, len), (ssize_t)len);
    return fd;
}

static size_t s_item(unsigned char *p, uint32_t tag_elem, const void *data, uint32_t len)
{
    p[0] = 0xFE, p[1] = 0xFF, p[2] = tag_elem & 0xFF, p[3] = tag_elem >> 8;
    p[4] = len & 0xFF, p[5] = (len >> 8) & 0xFF, p[6] = (len >> 16) & 0xFF, p[7] = len >> 24;
    if (data && len) memcpy(p + 8, data, len);
    return 8 + len;
}

static void test_parse_list(void **state)
{
    (void)state;
    long f[8];
    assert_int_equal(kp_frames_parse_list("1", f, 8), 1);
    assert_int_equal(kp_frames_parse_list("3,1,10", f, 8), 3);
    assert_int_equal(f[0], 3);
    assert_int_equal(f[2], 10);
    const char *bad[] = {"", "0", "1,,2", "1,", ",1", "a", "1;2", "-1", "1 2", "99999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(kp_frames_parse_list(bad[i], f, 8), -1);
    assert_int_equal(kp_frames_parse_list("1,2,3,4,5,6,7,8,9", f, 8), -1); /* too many */
}

static void test_native(void **state)
{
    (void)state;
    unsigned char buf[100] = {0};
    int fd = s_file(buf, sizeof buf);
    kp_range_t r[4];
    size_t n;
    assert_int_equal(kp_frames_locate(fd, 20, 80, 4, 20, 2, r, 4, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(r[0].off, 40);
    assert_int_equal(r[0].len, 20);
    assert_int_equal(kp_frames_locate(fd, 20, 80, 4, 20, 5, r, 4, &n), KP_ENOTFOUND);
    assert_int_equal(kp_frames_locate(fd, 20, 80, 4, 20, 0, r, 4, &n), KP_ENOTFOUND);
    /* the declared frames do not fit in the value: the last one is missing */
    assert_int_equal(kp_frames_locate(fd, 20, 70, 4, 20, 4, r, 4, &n), KP_ENOTFOUND);
    assert_int_equal(kp_frames_locate(fd, 20, 80, 4, 0, 1, r, 4, &n), KP_EDICOM);
    close(fd);
}

static void test_encapsulated_single_frame_many_fragments(void **state)
{
    (void)state;
    unsigned char buf[256];
    size_t p = 10; /* pixel data value starts at 10 */
    memset(buf, 0xAA, p);
    p += s_item(buf + p, 0xE000, NULL, 0); /* empty offset table */
    p += s_item(buf + p, 0xE000, "abcd", 4);
    p += s_item(buf + p, 0xE000, "efgh", 4);
    p += s_item(buf + p, 0xE0DD, NULL, 0);
    int fd = s_file(buf, p);
    kp_range_t r[4];
    size_t n;
    assert_int_equal(kp_frames_locate(fd, 10, -1, 1, 0, 1, r, 4, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(r[0].off, 10 + 8 + 8);
    assert_int_equal(r[1].off, 10 + 8 + 12 + 8);
    assert_int_equal(kp_frames_locate(fd, 10, -1, 1, 0, 2, r, 4, &n), KP_ENOTFOUND);
    /* more fragments than the caller has room for */
    assert_int_equal(kp_frames_locate(fd, 10, -1, 1, 0, 1, r, 1, &n), KP_EUNSUPPORTED);
    close(fd);
}

static void test_encapsulated_offset_table(void **state)
{
    (void)state;
    unsigned char buf[256];
    /* 2 frames: frame 1 = fragments A, B (12 + 12 bytes of items), frame 2 = fragment C */
    uint32_t bot[2] = {0, 24};
    size_t p = 0;
    p += s_item(buf + p, 0xE000, bot, 8);
    p += s_item(buf + p, 0xE000, "AAAA", 4);
    p += s_item(buf + p, 0xE000, "BBBB", 4);
    p += s_item(buf + p, 0xE000, "CCCC", 4);
    p += s_item(buf + p, 0xE0DD, NULL, 0);
    int fd = s_file(buf, p);
    kp_range_t r[4];
    size_t n;
    assert_int_equal(kp_frames_locate(fd, 0, -1, 2, 0, 1, r, 4, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(kp_frames_locate(fd, 0, -1, 2, 0, 2, r, 4, &n), 0);
    assert_int_equal(n, 1);
    char got[5] = {0};
    assert_int_equal(pread(fd, got, 4, r[0].off), 4);
    assert_string_equal(got, "CCCC");
    /* a table whose size does not match the frame count is malformed */
    assert_int_equal(kp_frames_locate(fd, 0, -1, 3, 0, 1, r, 4, &n), KP_EDICOM);
    close(fd);
}

static void test_encapsulated_no_table(void **state)
{
    (void)state;
    unsigned char buf[256];
    size_t p = 0;
    p += s_item(buf + p, 0xE000, NULL, 0);
    p += s_item(buf + p, 0xE000, "11", 2);
    p += s_item(buf + p, 0xE000, "22", 2);
    p += s_item(buf + p, 0xE0DD, NULL, 0);
    int fd = s_file(buf, p);
    kp_range_t r[4];
    size_t n;
    assert_int_equal(kp_frames_locate(fd, 0, -1, 2, 0, 2, r, 4, &n), 0);
    char got[3] = {0};
    assert_int_equal(pread(fd, got, 2, r[0].off), 2);
    assert_string_equal(got, "22");
    /* 3 frames but 2 fragments and no table: cannot be split without decoding */
    assert_int_equal(kp_frames_locate(fd, 0, -1, 3, 0, 1, r, 4, &n), KP_EUNSUPPORTED);
    close(fd);
}

static void test_encapsulated_malformed(void **state)
{
    (void)state;
    unsigned char buf[64];
    size_t p = 0;
    p += s_item(buf + p, 0xE000, NULL, 0);
    p += s_item(buf + p, 0xE000, "xy", 2);
    buf[p] = 0x12; /* not an item tag where the next item should be */
    memset(buf + p + 1, 0, 7);
    int fd = s_file(buf, p + 8);
    kp_range_t r[4];
    size_t n;
    assert_int_equal(kp_frames_locate(fd, 0, -1, 1, 0, 1, r, 4, &n), KP_EDICOM);
    close(fd);
    /* truncated: the file ends inside an item header */
    p = s_item(buf, 0xE000, NULL, 0);
    p += s_item(buf + p, 0xE000, "xy", 2);
    fd = s_file(buf, p + 3);
    assert_int_equal(kp_frames_locate(fd, 0, -1, 1, 0, 1, r, 4, &n), KP_EDICOM);
    close(fd);
    /* an item claiming an absurd length runs past the end */
    p = s_item(buf, 0xE000, NULL, 0);
    p += s_item(buf + p, 0xE000, NULL, 0);
    buf[p - 1] = 0x7F;
    fd = s_file(buf, p);
    assert_int_not_equal(kp_frames_locate(fd, 0, -1, 1, 0, 1, r, 4, &n), 0);
    close(fd);
}

static void test_media_and_accept(void **state)
{
    (void)state;
    const char *jpeg = "1.2.840.10008.1.2.4.50", *ele = "1.2.840.10008.1.2.1",
               *ile = "1.2.840.10008.1.2", *be = "1.2.840.10008.1.2.2";
    assert_string_equal(kp_frames_media_type(jpeg), "image/jpeg");
    assert_string_equal(kp_frames_media_type("1.2.840.10008.1.2.4.80"), "image/jls");
    assert_string_equal(kp_frames_media_type("1.2.840.10008.1.2.5"), "image/x-dicom-rle");
    assert_string_equal(kp_frames_media_type(ele), "application/octet-stream");
    const char *ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*";
    const char *quoted = "multipart/related; type=\"application/octet-stream\"; transfer-syntax=\"*\"";
    const char *plain = "multipart/related; type=\"application/octet-stream\"";
    assert_true(kp_frames_acceptable(NULL, jpeg, "frames"));
    assert_true(kp_frames_acceptable(ohif, jpeg, "frames"));
    assert_true(kp_frames_acceptable(quoted, jpeg, "frames"));
    assert_false(kp_frames_acceptable(plain, jpeg, "frames"));
    assert_true(kp_frames_acceptable(plain, ele, "frames"));
    assert_true(kp_frames_acceptable(plain, ile, "frames"));
    assert_false(kp_frames_acceptable(plain, be, "frames"));
    assert_true(kp_frames_acceptable("multipart/related; type=\"image/jpeg\"", jpeg, "frames"));
    assert_false(kp_frames_acceptable("multipart/related; type=\"image/jls\"", jpeg, "frames"));
    assert_true(kp_frames_acceptable("*/*", jpeg, "frames"));
    assert_true(kp_frames_acceptable("image/jls, */*", jpeg, "frames"));
    const char *dcm = "multipart/related; type=\"application/dicom\"";
    assert_true(kp_frames_acceptable(dcm, jpeg, "dicom"));
    assert_false(kp_frames_acceptable("multipart/related; type=\"application/dicom\"; "
                                      "transfer-syntax=1.2.840.10008.1.2.1",
                                      jpeg, "dicom"));
    assert_false(kp_frames_acceptable("application/json", ele, "dicom"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_list),
        cmocka_unit_test(test_native),
        cmocka_unit_test(test_encapsulated_single_frame_many_fragments),
        cmocka_unit_test(test_encapsulated_offset_table),
        cmocka_unit_test(test_encapsulated_no_table),
        cmocka_unit_test(test_encapsulated_malformed),
        cmocka_unit_test(test_media_and_accept),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
