/* Unit tests of lib/dicom/kp_image.h: single-frame decoding, transcoding and rendering.
 *
 * Test data: pydicom's test files (python3-pydicom); a case whose file is absent is skipped with
 * a message. Reference pixel bytes are read from uncompressed files through kp_dicom.h
 * (kp_dicom_pixel_location) and compared with what kp_image returns. Every test runs under an
 * alarm() timeout. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <png.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_image.h"
#include "kp_log.h"

#define TEST_FILES     "/usr/lib/python3/dist-packages/pydicom/data/test_files"
#define TEST_TIMEOUT_S 60

#define TS_EXPLICIT_LE "1.2.840.10008.1.2.1"
#define TS_IMPLICIT_LE "1.2.840.10008.1.2"
#define TS_JPEG_LS     "1.2.840.10008.1.2.4.80"
#define TS_JPEG_SV1    "1.2.840.10008.1.2.4.70"
#define TS_RLE         "1.2.840.10008.1.2.5"

static char s_tmp[256]; /* per-run scratch directory */

/* ---- helpers ---- */

/* 1 when the pydicom test file exists; otherwise prints why the case is skipped. */
static int s_have(const char *name)
{
    char p[512];
    snprintf(p, sizeof p, TEST_FILES "/%s", name);
    if (access(p, R_OK) == 0) return 1;
    printf("  skipped: %s is absent (python3-pydicom test files)\n", p);
    return 0;
}

#define NEED(name)                                                                                 \
    do {                                                                                           \
        if (!s_have(name)) skip();                                                                 \
    } while (0)

static const char *s_path(const char *name)
{
    static __thread char p[512];
    snprintf(p, sizeof p, TEST_FILES "/%s", name);
    return p;
}

/* The PixelData value bytes (native syntaxes only) of the file at path; *len gets the size. */
static unsigned char *s_native_pixels(const char *path, size_t *len)
{
    int err = 0;
    kp_dicom_file_t *f = kp_dicom_open(path, &err);
    assert_non_null(f);
    int64_t off = 0, n = 0;
    assert_int_equal(kp_dicom_pixel_location(f, &off, &n), 0);
    assert_true(n > 0);
    kp_dicom_close(&f);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    unsigned char *buf = malloc((size_t)n);
    assert_non_null(buf);
    assert_int_equal(pread(fd, buf, (size_t)n, off), n);
    close(fd);
    *len = (size_t)n;
    return buf;
}

/* Writes b to a file in the scratch directory; returns its path (static, per name). */
static const char *s_save(const kp_buf_t *b, const char *name)
{
    static __thread char p[512];
    snprintf(p, sizeof p, "%s/%s", s_tmp, name);
    FILE *fp = fopen(p, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(b->data, 1, b->len, fp), b->len);
    assert_int_equal(fclose(fp), 0);
    return p;
}

/* Transfer syntax UID stored in the meta header of a Part 10 file (malloc'd). */
static char *s_ts_of(const char *path)
{
    int err = 0;
    kp_dicom_file_t *f = kp_dicom_open(path, &err);
    assert_non_null(f);
    char *ts = strdup(kp_dicom_transfer_syntax(f));
    kp_dicom_close(&f);
    return ts;
}

/* Transcodes path to Explicit VR LE and returns its PixelData bytes. */
static unsigned char *s_decoded_pixels(const char *path, const char *tmpname, size_t *len)
{
    kp_buf_t b = {0};
    assert_int_equal(kp_image_transcode(path, TS_EXPLICIT_LE, &b), 0);
    const char *p = s_save(&b, tmpname);
    kp_buf_free(&b);
    return s_native_pixels(p, len);
}

static uint32_t s_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void s_check_preamble(const kp_buf_t *b)
{
    assert_true(b->len > 132);
    for (int i = 0; i < 128; i++)
        assert_int_equal(b->data[i], 0);
    assert_memory_equal(b->data + 128, "DICM", 4);
}

/* ---- kp_image_frame ---- */

/* Compressed (JPEG-LS lossless, RLE) and other native encodings of MR_small decode to the
 * PixelData bytes of the Explicit VR LE original. */
static void test_frame_matches_native(void **state)
{
    (void)state;
    NEED("MR_small.dcm");
    size_t ref_len = 0;
    unsigned char *ref = s_native_pixels(s_path("MR_small.dcm"), &ref_len);
    assert_int_equal(ref_len, 64 * 64 * 2);
    const char *same[] = {"MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                          "MR_small_implicit.dcm", "MR_small_bigendian.dcm"};
    for (size_t i = 0; i < sizeof same / sizeof *same; i++) {
        if (!s_have(same[i])) continue;
        kp_buf_t b = {0};
        int rc = kp_image_frame(s_path(same[i]), 1, &b);
        printf("  %-32s rc %d, %zu bytes\n", same[i], rc, b.len);
        assert_int_equal(rc, 0);
        assert_int_equal(b.len, ref_len);
        assert_memory_equal(b.data, ref, ref_len);
        kp_buf_free(&b);
        assert_null(b.data);
    }
    free(ref);
}

/* Frame 2 of a 2-frame RLE file equals frame 2 of the whole object decoded by transcoding. */
static void test_frame_multiframe_rle(void **state)
{
    (void)state;
    const char *files[] = {"SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm",
                           "SC_rgb_rle_32bit_2frame.dcm"};
    int tested = 0;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        if (!s_have(files[i])) continue;
        const char *p = s_path(files[i]);
        size_t all_len = 0;
        unsigned char *all = s_decoded_pixels(p, "rle2.dcm", &all_len);
        kp_buf_t f1 = {0}, f2 = {0}, f3 = {0};
        assert_int_equal(kp_image_frame(p, 1, &f1), 0);
        assert_int_equal(kp_image_frame(p, 2, &f2), 0);
        assert_int_equal(f1.len, f2.len);
        assert_int_equal(all_len, 2 * f1.len);
        assert_memory_equal(f1.data, all, f1.len);
        assert_memory_equal(f2.data, all + f1.len, f2.len);
        assert_true(memcmp(f1.data, f2.data, f1.len) != 0); /* the frames differ */
        assert_int_equal(kp_image_frame(p, 3, &f3), KP_ENOTFOUND);
        assert_null(f3.data);
        assert_int_equal(f3.len, 0);
        assert_int_equal(kp_image_frame(p, 0, &f3), KP_ENOTFOUND);
        assert_int_equal(kp_image_frame(p, -1, &f3), KP_ENOTFOUND);
        printf("  %-32s 2 frames of %zu bytes ok\n", files[i], f1.len);
        kp_buf_free(&f1);
        kp_buf_free(&f2);
        free(all);
        tested++;
    }
    if (!tested) skip();
}

/* JPEG baseline: the decoded frame has rows*cols*3 bytes and equals DCMTK's full decode; its
 * colour model is reported. */
static void test_frame_jpeg_baseline(void **state)
{
    (void)state;
    int tested = 0;
    if (s_have("SC_rgb_jpeg_dcmtk.dcm")) {
        const char *p = s_path("SC_rgb_jpeg_dcmtk.dcm");
        kp_buf_t b = {0};
        char pi[32];
        assert_int_equal(kp_image_frame_ex(p, 1, &b, pi, sizeof pi), 0);
        assert_int_equal(b.len, 100 * 100 * 3);
        printf("  SC_rgb_jpeg_dcmtk.dcm: %zu bytes, %s\n", b.len, pi);
        assert_string_equal(pi, "RGB");
        size_t all_len = 0;
        unsigned char *all = s_decoded_pixels(p, "jpeg.dcm", &all_len);
        assert_int_equal(all_len, b.len);
        assert_memory_equal(all, b.data, b.len);
        free(all);
        kp_buf_free(&b);
        tested++;
    }
    if (s_have("JPEG-lossy.dcm")) { /* 12-bit extended JPEG, 256 x 1024, 16 bits allocated */
        kp_buf_t b = {0};
        assert_int_equal(kp_image_frame(s_path("JPEG-lossy.dcm"), 1, &b), 0);
        assert_int_equal(b.len, 1024 * 256 * 2);
        kp_buf_free(&b);
        tested++;
    }
    if (!tested) skip();
}

/* Random access to frame 2 of a JPEG file with several fragments per frame and an empty Basic
 * Offset Table (made with DCMTK's dcmcjpeg +fs 1 -ot): DCMTK alone cannot locate the frame; the
 * shim finds it by its SOI marker. */
static void test_frame_fragmented_jpeg(void **state)
{
    (void)state;
    NEED("SC_rgb_rle_16bit_2frame.dcm");
    if (system("command -v dcmdrle >/dev/null 2>&1 && command -v dcmcjpeg >/dev/null 2>&1") != 0) {
        printf("  skipped: dcmdrle / dcmcjpeg (dcmtk) absent\n");
        skip();
    }
    char nat[512], jpg[512], cmd[2560];
    snprintf(nat, sizeof nat, "%s/frag_native.dcm", s_tmp);
    snprintf(jpg, sizeof jpg, "%s/frag_jpeg.dcm", s_tmp);
    snprintf(cmd, sizeof cmd, "(dcmdrle '%s' '%s' && dcmcjpeg +el +fs 1 -ot '%s' '%s') 2>/dev/null",
             s_path("SC_rgb_rle_16bit_2frame.dcm"), nat, nat, jpg);
    assert_int_equal(system(cmd), 0);
    for (long fr = 2; fr >= 1; fr--) { /* frame 2 first: no sequential decoding to lean on */
        kp_buf_t a = {0}, b = {0};
        assert_int_equal(kp_image_frame(nat, fr, &a), 0);
        assert_int_equal(kp_image_frame(jpg, fr, &b), 0);
        assert_int_equal(a.len, b.len);
        assert_memory_equal(a.data, b.data, a.len);
        kp_buf_free(&a);
        kp_buf_free(&b);
    }
    /* rendering it (DicomImage cannot locate the frame either: the shim decodes it first)
     * gives the same picture as rendering the uncompressed copy */
    for (long fr = 1; fr <= 2; fr++) {
        kp_render_opts_t o = {.fmt = KP_IMAGE_PNG, .frame = fr};
        kp_buf_t a = {0}, b = {0};
        int w = 0, h = 0;
        assert_int_equal(kp_image_render(nat, &o, &a, &w, &h), 0);
        assert_int_equal(kp_image_render(jpg, &o, &b, &w, &h), 0);
        assert_int_equal(w, 100);
        assert_int_equal(h, 100);
        assert_int_equal(a.len, b.len);
        assert_memory_equal(a.data, b.data, a.len);
        kp_buf_free(&a);
        kp_buf_free(&b);
    }
}

static void test_frame_errors(void **state)
{
    (void)state;
    kp_buf_t b = {0};
    if (s_have("JPEG2000.dcm")) {
        assert_int_equal(kp_image_frame(s_path("JPEG2000.dcm"), 1, &b), KP_EUNSUPPORTED);
        assert_null(b.data);
    }
    if (s_have("MR_small.dcm")) {
        assert_int_equal(kp_image_frame(s_path("MR_small.dcm"), 2, &b), KP_ENOTFOUND);
        assert_int_equal(kp_image_frame(s_path("MR_small.dcm"), 1, NULL), KP_EINVAL);
    }
    assert_int_equal(kp_image_frame("/nonexistent/x.dcm", 1, &b), KP_EIO);
    assert_int_equal(kp_image_frame(NULL, 1, &b), KP_EINVAL);
    assert_int_equal(kp_image_frame("/tmp", 1, &b), KP_EIO); /* a directory */
    /* not DICOM */
    char junk[512];
    snprintf(junk, sizeof junk, "%s/junk.dcm", s_tmp);
    FILE *fp = fopen(junk, "wb");
    assert_non_null(fp);
    fputs("this is not a DICOM file at all, just some text\n", fp);
    fclose(fp);
    assert_int_equal(kp_image_frame(junk, 1, &b), KP_EDICOM);
    /* DICOM without pixel data */
    if (s_have("rtplan.dcm"))
        assert_int_equal(kp_image_frame(s_path("rtplan.dcm"), 1, &b), KP_ENOTFOUND);
    assert_null(b.data);
    kp_buf_free(&b); /* harmless on an empty buffer */
    kp_buf_free(NULL);
}

/* ---- kp_image_transcode ---- */

/* CT_small round trips through JPEG-LS lossless (and JPEG lossless, RLE, Implicit VR LE) back to
 * Explicit VR LE with identical PixelData; outputs are Part 10 files in the asked syntax. */
static void test_transcode_roundtrip(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    size_t ref_len = 0;
    unsigned char *ref = s_native_pixels(s_path("CT_small.dcm"), &ref_len);
    const char *targets[] = {TS_JPEG_LS, TS_JPEG_SV1, TS_RLE, TS_IMPLICIT_LE, TS_EXPLICIT_LE};
    for (size_t i = 0; i < sizeof targets / sizeof *targets; i++) {
        kp_buf_t b = {0};
        assert_int_equal(kp_image_transcode(s_path("CT_small.dcm"), targets[i], &b), 0);
        s_check_preamble(&b);
        const char *p = s_save(&b, "tc1.dcm");
        char *ts = s_ts_of(p);
        assert_string_equal(ts, targets[i]);
        free(ts);
        kp_buf_t back = {0};
        assert_int_equal(kp_image_transcode(p, TS_EXPLICIT_LE, &back), 0);
        s_check_preamble(&back);
        const char *p2 = s_save(&back, "tc2.dcm");
        ts = s_ts_of(p2);
        assert_string_equal(ts, TS_EXPLICIT_LE);
        free(ts);
        size_t len = 0;
        unsigned char *px = s_native_pixels(p2, &len);
        assert_int_equal(len, ref_len);
        assert_memory_equal(px, ref, ref_len);
        /* and frame 1 of the compressed file is the same bytes */
        kp_buf_t fr = {0};
        assert_int_equal(kp_image_frame(p, 1, &fr), 0);
        assert_int_equal(fr.len, ref_len);
        assert_memory_equal(fr.data, ref, ref_len);
        printf("  CT_small -> %-24s %7zu bytes, back to Explicit VR LE: identical\n", targets[i],
               b.len);
        kp_buf_free(&fr);
        free(px);
        kp_buf_free(&b);
        kp_buf_free(&back);
    }
    free(ref);
}

static void test_transcode_errors(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    kp_buf_t b = {0};
    int rc = kp_image_transcode(s_path("CT_small.dcm"), "1.2.3.4.5", &b);
    assert_true(rc == KP_EUNSUPPORTED || rc == KP_EINVAL);
    assert_null(b.data);
    assert_int_equal(kp_image_transcode(s_path("CT_small.dcm"), NULL, &b), KP_EINVAL);
    assert_int_equal(kp_image_transcode("/nonexistent.dcm", TS_EXPLICIT_LE, &b), KP_EIO);
    if (s_have("JPEG2000.dcm"))
        assert_int_equal(kp_image_transcode(s_path("JPEG2000.dcm"), TS_EXPLICIT_LE, &b),
                         KP_EUNSUPPORTED);
    /* JPEG 2000 as a target: no encoder */
    assert_int_equal(kp_image_transcode(s_path("CT_small.dcm"), "1.2.840.10008.1.2.4.90", &b),
                     KP_EUNSUPPORTED);
    assert_null(b.data);
}

/* A multi-frame RLE file transcoded to JPEG-LS lossless keeps every frame, each decodable. */
static void test_transcode_multiframe(void **state)
{
    (void)state;
    NEED("SC_rgb_rle_2frame.dcm");
    const char *src = s_path("SC_rgb_rle_2frame.dcm");
    kp_buf_t b = {0};
    assert_int_equal(kp_image_transcode(src, TS_JPEG_LS, &b), 0);
    const char *p = s_save(&b, "mf.dcm");
    kp_buf_free(&b);
    for (long fr = 1; fr <= 2; fr++) {
        kp_buf_t x = {0}, y = {0};
        assert_int_equal(kp_image_frame(src, fr, &x), 0);
        assert_int_equal(kp_image_frame(p, fr, &y), 0);
        assert_int_equal(x.len, y.len);
        assert_memory_equal(x.data, y.data, x.len);
        kp_buf_free(&x);
        kp_buf_free(&y);
    }
}

/* ---- kp_image_render ---- */

static void s_png_size(const kp_buf_t *b, uint32_t *w, uint32_t *h)
{
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    assert_true(b->len > 33);
    assert_memory_equal(b->data, sig, 8);
    assert_memory_equal(b->data + 12, "IHDR", 4);
    *w = s_be32(b->data + 16);
    *h = s_be32(b->data + 20);
}

/* Width and height from the first SOFn marker of a JPEG stream. */
static void s_jpeg_size(const kp_buf_t *b, int *w, int *h)
{
    assert_true(b->len > 4);
    assert_int_equal(b->data[0], 0xFF);
    assert_int_equal(b->data[1], 0xD8);
    size_t i = 2;
    while (i + 9 < b->len) {
        assert_int_equal(b->data[i], 0xFF);
        unsigned m = b->data[i + 1];
        size_t seglen = (size_t)b->data[i + 2] << 8 | b->data[i + 3];
        if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            *h = b->data[i + 5] << 8 | b->data[i + 6];
            *w = b->data[i + 7] << 8 | b->data[i + 8];
            return;
        }
        i += 2 + seglen;
    }
    fail_msg("no SOF marker");
}

static void test_render_ct(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    const char *p = s_path("CT_small.dcm");
    kp_render_opts_t o = {.fmt = KP_IMAGE_JPEG};
    kp_buf_t b = {0};
    int w = 0, h = 0;
    assert_int_equal(kp_image_render(p, &o, &b, &w, &h), 0);
    assert_int_equal(w, 128);
    assert_int_equal(h, 128);
    int jw = 0, jh = 0;
    s_jpeg_size(&b, &jw, &jh);
    assert_int_equal(jw, 128);
    assert_int_equal(jh, 128);
    assert_int_equal(b.data[b.len - 2], 0xFF);
    assert_int_equal(b.data[b.len - 1], 0xD9);
    printf("  CT_small JPEG 128x128: %zu bytes\n", b.len);
    kp_buf_free(&b);

    o.fmt = KP_IMAGE_PNG;
    o.width = 64;
    o.height = 64;
    assert_int_equal(kp_image_render(p, &o, &b, &w, &h), 0);
    uint32_t pw = 0, ph = 0;
    s_png_size(&b, &pw, &ph);
    assert_int_equal(pw, 64);
    assert_int_equal(ph, 64);
    assert_int_equal(w, 64);
    assert_int_equal(h, 64);
    assert_int_equal(b.data[16 + 8], 8); /* bit depth */
    assert_int_equal(b.data[16 + 9], 0); /* colour type: grey */
    kp_buf_t png_default = b;

    /* an explicit window gives a different picture than the file's window */
    o.has_window = 1;
    o.center = 40;
    o.width_w = 400;
    assert_int_equal(kp_image_render(p, &o, &b, &w, &h), 0);
    assert_true(b.len != png_default.len || memcmp(b.data, png_default.data, b.len) != 0);
    kp_buf_free(&b);
    kp_buf_free(&png_default);
    o.has_window = 0;

    /* non-square viewports keep the aspect ratio (CT_small is square) */
    o.width = 64;
    o.height = 32;
    assert_int_equal(kp_image_render(p, &o, &b, &w, &h), 0);
    s_png_size(&b, &pw, &ph);
    assert_int_equal(pw, 32);
    assert_int_equal(ph, 32);
    kp_buf_free(&b);
    o.width = 0;
    o.height = 256; /* width derived; scaled up */
    assert_int_equal(kp_image_render(p, &o, &b, &w, &h), 0);
    s_png_size(&b, &pw, &ph);
    assert_int_equal(pw, 256);
    assert_int_equal(ph, 256);
    kp_buf_free(&b);
}

/* Decodes a PNG produced by kp_image_render into 8-bit grey pixels (malloc'd). */
static unsigned char *s_png_grey(const kp_buf_t *b, uint32_t *w, uint32_t *h)
{
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    assert_true(png_image_begin_read_from_memory(&img, b->data, b->len));
    img.format = PNG_FORMAT_GRAY;
    unsigned char *px = malloc(PNG_IMAGE_SIZE(img));
    assert_non_null(px);
    assert_true(png_image_finish_read(&img, NULL, px, 0, NULL));
    *w = img.width;
    *h = img.height;
    return px;
}

/* The VOI window of CT_small applied by hand (PS3.3 C.11.2.1.2, linear) to its stored values
 * with the file's rescale gives what kp_image_render shows, within 1 grey level; a copy
 * relabelled MONOCHROME1 (dcmodify) renders inverted (within 1 grey level). */
static void test_render_window_values(void **state)
{
    (void)state;
    NEED("CT_small.dcm");
    const char *p = s_path("CT_small.dcm");
    int err = 0;
    kp_dicom_file_t *f = kp_dicom_open(p, &err);
    assert_non_null(f);
    double slope = atof(kp_dicom_get(f, 0x00281053) ? kp_dicom_get(f, 0x00281053) : "1");
    double icpt = atof(kp_dicom_get(f, 0x00281052) ? kp_dicom_get(f, 0x00281052) : "0");
    assert_string_equal(kp_dicom_get(f, 0x00280103), "1"); /* signed */
    kp_dicom_close(&f);
    size_t n = 0;
    unsigned char *raw = s_native_pixels(p, &n);
    assert_int_equal(n, 128 * 128 * 2);

    const double c = 40, wdt = 400;
    kp_render_opts_t o = {.fmt = KP_IMAGE_PNG, .has_window = 1, .center = c, .width_w = wdt};
    kp_buf_t b = {0};
    assert_int_equal(kp_image_render(p, &o, &b, NULL, NULL), 0);
    uint32_t w = 0, h = 0;
    unsigned char *g = s_png_grey(&b, &w, &h);
    kp_buf_free(&b);
    assert_int_equal(w, 128);
    assert_int_equal(h, 128);
    int maxdiff = 0;
    for (size_t i = 0; i < 128 * 128; i++) {
        int16_t sv = (int16_t)(raw[2 * i] | raw[2 * i + 1] << 8);
        double x = sv * slope + icpt, y;
        if (x <= c - 0.5 - (wdt - 1) / 2)
            y = 0;
        else if (x > c - 0.5 + (wdt - 1) / 2)
            y = 255;
        else
            y = ((x - (c - 0.5)) / (wdt - 1) + 0.5) * 255;
        int d = abs((int)lround(y) - g[i]);
        if (d > maxdiff) maxdiff = d;
    }
    printf("  CT_small window %g/%g: max difference %d grey level(s)\n", c, wdt, maxdiff);
    assert_true(maxdiff <= 1);
    free(raw);

    if (system("command -v dcmodify >/dev/null 2>&1") != 0) {
        printf("  skipped MONOCHROME1: dcmodify (dcmtk) absent\n");
        free(g);
        return;
    }
    char m1[512], cmd[2048];
    snprintf(m1, sizeof m1, "%s/mono1.dcm", s_tmp);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s' && dcmodify -nb -m '(0028,0004)=MONOCHROME1' '%s'", p,
             m1, m1);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(kp_image_render(m1, &o, &b, NULL, NULL), 0);
    uint32_t w1 = 0, h1 = 0;
    unsigned char *g1 = s_png_grey(&b, &w1, &h1);
    kp_buf_free(&b);
    assert_int_equal(w1, 128);
    for (size_t i = 0; i < 128 * 128; i++) /* inverted, up to DCMTK's rounding */
        assert_true(abs((int)g1[i] - (255 - (int)g[i])) <= 1);
    free(g1);
    free(g);
}

static void test_render_aspect_nonsquare(void **state)
{
    (void)state;
    NEED("JPEG-lossy.dcm"); /* 256 columns x 1024 rows */
    kp_render_opts_t o = {.fmt = KP_IMAGE_PNG, .width = 200, .height = 200};
    kp_buf_t b = {0};
    int w = 0, h = 0;
    assert_int_equal(kp_image_render(s_path("JPEG-lossy.dcm"), &o, &b, &w, &h), 0);
    uint32_t pw = 0, ph = 0;
    s_png_size(&b, &pw, &ph);
    printf("  JPEG-lossy.dcm in 200x200: %ux%u\n", pw, ph);
    assert_int_equal(pw, 50);
    assert_int_equal(ph, 200);
    assert_int_equal(w, 50);
    assert_int_equal(h, 200);
    kp_buf_free(&b);
}

static void test_render_colour(void **state)
{
    (void)state;
    int tested = 0;
    const char *files[] = {"SC_rgb_jpeg_dcmtk.dcm",
                           "SC_rgb_rle_2frame.dcm",
                           "SC_ybr_full_422_uncompressed.dcm",
                           "SC_rgb_dcmtk_+eb+cy+s2.dcm",
                           "SC_rgb_small_odd_jpeg.dcm",
                           "GDCMJ2K_TextGBR.dcm" /* JPEG 2000: unsupported */};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        if (!s_have(files[i])) continue;
        kp_render_opts_t o = {.fmt = KP_IMAGE_PNG};
        kp_buf_t b = {0};
        int w = 0, h = 0;
        int rc = kp_image_render(s_path(files[i]), &o, &b, &w, &h);
        printf("  %-24s rc %d %dx%d\n", files[i], rc, w, h);
        if (strstr(files[i], "J2K")) { /* no JPEG 2000 decoder */
            assert_int_equal(rc, KP_EUNSUPPORTED);
            continue;
        }
        assert_int_equal(rc, 0);
        uint32_t pw = 0, ph = 0;
        s_png_size(&b, &pw, &ph);
        assert_int_equal(pw, (uint32_t)w);
        assert_int_equal(ph, (uint32_t)h);
        assert_int_equal(b.data[16 + 9], 2); /* colour type: RGB */
        kp_buf_free(&b);
        o.fmt = KP_IMAGE_JPEG;
        o.quality = 75;
        assert_int_equal(kp_image_render(s_path(files[i]), &o, &b, &w, &h), 0);
        int jw = 0, jh = 0;
        s_jpeg_size(&b, &jw, &jh);
        assert_int_equal(jw, w);
        assert_int_equal(jh, h);
        kp_buf_free(&b);
        tested++;
    }
    if (!tested) skip();
}

static void test_render_frames_and_errors(void **state)
{
    (void)state;
    kp_render_opts_t o = {.fmt = KP_IMAGE_PNG};
    kp_buf_t b = {0};
    int w = -1, h = -1;
    assert_int_not_equal(kp_image_render("/nonexistent/x.dcm", &o, &b, &w, &h), 0);
    assert_null(b.data);
    assert_int_equal(w, 0);
    assert_int_equal(h, 0);
    assert_int_equal(kp_image_render(NULL, &o, &b, &w, &h), KP_EINVAL);
    assert_int_equal(kp_image_render("/nonexistent/x.dcm", NULL, &b, &w, &h), KP_EINVAL);
    if (s_have("SC_rgb_rle_2frame.dcm")) {
        const char *p = s_path("SC_rgb_rle_2frame.dcm");
        kp_buf_t b1 = {0}, b2 = {0};
        o.frame = 1;
        assert_int_equal(kp_image_render(p, &o, &b1, &w, &h), 0);
        o.frame = 2;
        assert_int_equal(kp_image_render(p, &o, &b2, &w, &h), 0);
        assert_true(b1.len != b2.len || memcmp(b1.data, b2.data, b1.len) != 0);
        kp_buf_free(&b1);
        kp_buf_free(&b2);
        o.frame = 3;
        assert_int_equal(kp_image_render(p, &o, &b, &w, &h), KP_ENOTFOUND);
        o.frame = 1;
    }
    if (s_have("JPEG2000.dcm"))
        assert_int_equal(kp_image_render(s_path("JPEG2000.dcm"), &o, &b, &w, &h), KP_EUNSUPPORTED);
    if (s_have("rtplan.dcm"))
        assert_int_equal(kp_image_render(s_path("rtplan.dcm"), &o, &b, &w, &h), KP_ENOTFOUND);
    if (s_have("CT_small.dcm")) {
        const char *p = s_path("CT_small.dcm");
        kp_render_opts_t bad[] = {
            {.fmt = 0},
            {.fmt = KP_IMAGE_JPEG, .quality = 101},
            {.fmt = KP_IMAGE_JPEG, .quality = -1},
            {.fmt = KP_IMAGE_PNG, .width = -5},
            {.fmt = KP_IMAGE_PNG, .width = 100000},
            {.fmt = KP_IMAGE_PNG, .frame = -1},
            {.fmt = KP_IMAGE_PNG, .has_window = 1, .center = 0, .width_w = 0},
        };
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
            assert_int_equal(kp_image_render(p, &bad[i], &b, &w, &h), KP_EINVAL);
        /* a 12-bit MONOCHROME image with the quality at its limits */
        kp_render_opts_t q = {.fmt = KP_IMAGE_JPEG, .quality = 1};
        assert_int_equal(kp_image_render(p, &q, &b, NULL, NULL), 0);
        kp_buf_free(&b);
        q.quality = 100;
        assert_int_equal(kp_image_render(p, &q, &b, NULL, NULL), 0);
        kp_buf_free(&b);
    }
    assert_null(b.data);
}

/* MONOCHROME1 renders (inverted by DCMTK) and 8/16-bit and other odd files do not crash. */
static void test_render_assorted(void **state)
{
    (void)state;
    const char *files[] = {"MR_small.dcm",         "MR_small_bigendian.dcm",
                           "MR_small_RLE.dcm",     "emri_small.dcm",
                           "OBXXXX1A.dcm",         "liver.dcm",
                           "SC_rgb_small_odd.dcm", "SC_ybr_full_uncompressed.dcm",
                           "rtdose_rle.dcm",       "MR2_J2KI.dcm"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        if (access(s_path(files[i]), R_OK) != 0) continue;
        kp_render_opts_t o = {.fmt = KP_IMAGE_JPEG, .width = 50, .height = 40};
        kp_buf_t b = {0};
        int w = 0, h = 0;
        int rc = kp_image_render(s_path(files[i]), &o, &b, &w, &h);
        printf("  %-30s rc %d %dx%d %zu bytes\n", files[i], rc, w, h, b.len);
        if (rc == 0) {
            assert_true(w >= 1 && w <= 50 && h >= 1 && h <= 40);
            assert_true(w == 50 || h == 40);
        }
        kp_buf_free(&b);
    }
}

/* ---- concurrency: worker threads decode and render different files at the same time ---- */

typedef struct {
    const char *file;
    int render;
    kp_buf_t ref;
    int bad;
} job_t;

static void *s_worker(void *arg)
{
    job_t *j = arg;
    for (int k = 0; k < 8; k++) {
        kp_buf_t b = {0};
        int rc;
        if (j->render) {
            kp_render_opts_t o = {.fmt = KP_IMAGE_PNG, .width = 48, .height = 48};
            rc = kp_image_render(s_path(j->file), &o, &b, NULL, NULL);
        } else {
            rc = kp_image_frame(s_path(j->file), 1, &b);
        }
        if (rc != 0 || b.len != j->ref.len || memcmp(b.data, j->ref.data, b.len) != 0) j->bad++;
        kp_buf_free(&b);
    }
    return NULL;
}

static void test_concurrent(void **state)
{
    (void)state;
    const char *files[] = {"MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                           "SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm"};
    job_t jobs[8];
    size_t n = 0;
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        if (access(s_path(files[i]), R_OK) != 0) continue;
        for (int r = 0; r < 2; r++) {
            job_t *j = &jobs[n++];
            memset(j, 0, sizeof *j);
            j->file = files[i];
            j->render = r;
            if (r) {
                kp_render_opts_t o = {.fmt = KP_IMAGE_PNG, .width = 48, .height = 48};
                assert_int_equal(kp_image_render(s_path(j->file), &o, &j->ref, NULL, NULL), 0);
            } else {
                assert_int_equal(kp_image_frame(s_path(j->file), 1, &j->ref), 0);
            }
        }
    }
    if (n == 0) skip();
    pthread_t th[8];
    for (size_t i = 0; i < n; i++)
        assert_int_equal(pthread_create(&th[i], NULL, s_worker, &jobs[i]), 0);
    for (size_t i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(jobs[i].bad, 0);
        kp_buf_free(&jobs[i].ref);
    }
}

/* ---- fixture ---- */

static int s_setup(void **state)
{
    (void)state;
    alarm(TEST_TIMEOUT_S);
    return 0;
}

static int s_teardown(void **state)
{
    (void)state;
    alarm(0);
    return 0;
}

static int s_group_setup(void **state)
{
    (void)state;
    kp_log_init("test_image");
    kp_log_set_level(getenv("KP_TEST_VERBOSE") ? "debug" : "error");
    snprintf(s_tmp, sizeof s_tmp, "/tmp/kp_test_image.XXXXXX");
    if (!mkdtemp(s_tmp)) return -1;
    return kp_dicom_init() == 0 ? 0 : -1;
}

static int s_group_teardown(void **state)
{
    (void)state;
    kp_dicom_shutdown();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", s_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_frame_matches_native, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_frame_multiframe_rle, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_frame_jpeg_baseline, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_frame_fragmented_jpeg, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_frame_errors, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_transcode_roundtrip, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_transcode_errors, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_transcode_multiframe, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_ct, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_window_values, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_aspect_nonsquare, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_colour, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_frames_and_errors, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_render_assorted, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_concurrent, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
