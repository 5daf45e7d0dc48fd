/* Unit tests of kp_pdf: name and date formatting, and rendering (a PDF comes out, long text
 * makes more pages, over-long words and every language render, the output is deterministic,
 * a missing font is an error, a bad logo is not). With KP_TEST_PDF_OUT=DIR the rendered files
 * are kept there for a look. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_pdf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define FONT_DIR "/usr/share/fonts/truetype/dejavu"

static void s_need_fonts(void)
{
    if (access(FONT_DIR "/DejaVuSans.ttf", R_OK)) skip(); /* fonts-dejavu-core not installed */
}

static void s_keep(const char *name, const unsigned char *pdf, size_t len)
{
    const char *dir = getenv("KP_TEST_PDF_OUT");
    if (!dir) return;
    char path[512];
    snprintf(path, sizeof path, "%s/%s.pdf", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(pdf, 1, len, f);
    fclose(f);
}

/* Page objects in the file ("/Type /Page" not followed by "s"). */
static int s_count_pages(const unsigned char *pdf, size_t len)
{
    int n = 0;
    const char *key = "/Type /Page";
    size_t kl = strlen(key);
    for (size_t i = 0; i + kl < len; i++)
        if (!memcmp(pdf + i, key, kl) && pdf[i + kl] != 's') n++;
    return n;
}

static kp_pdf_report_t s_report(void)
{
    kp_pdf_report_t r = {
        .language = "en",
        .font_dir = FONT_DIR,
        .clinic_name = "Klinika Test Hospital",
        .clinic_address = "1 Main Street | 12345 Springfield | +1 555 0100",
        .patient_name = "Doe^John",
        .patient_id = "PID-1",
        .birth_date = "19700102",
        .sex = "M",
        .study_date = "20261127",
        .study_time = "101500",
        .accession = "ACC-1",
        .study_description = "CT chest",
        .modalities = "CT",
        .referring_physician = "House^Gregory",
        .version = 1,
        .signed_name = "Dr. Jane Smith",
        .signed_at = 1795000000,
    };
    r.sections[KP_PDF_CLINICAL] = "Cough for three weeks.";
    r.sections[KP_PDF_FINDINGS] =
        "No **focal** consolidation. *Normal* heart size.\n\n- item one\n- "
        "item two";
    r.sections[KP_PDF_IMPRESSION] = "Normal chest CT.";
    return r;
}

static void test_format_name(void **state)
{
    (void)state;
    char out[128];
    kp_pdf_format_name("Doe^John", out, sizeof out);
    assert_string_equal(out, "Doe, John");
    kp_pdf_format_name("Doe^John^Paul^Dr.^Jr.", out, sizeof out);
    assert_string_equal(out, "Doe, Dr. John Paul, Jr.");
    kp_pdf_format_name("Doe", out, sizeof out);
    assert_string_equal(out, "Doe");
    kp_pdf_format_name("^John", out, sizeof out);
    assert_string_equal(out, "John");
    kp_pdf_format_name("Иванов^Иван^Иванович", out, sizeof out);
    assert_string_equal(out, "Иванов, Иван Иванович");
    kp_pdf_format_name("=山田^太郎", out, sizeof out);
    assert_string_equal(out, "山田, 太郎");
    kp_pdf_format_name("", out, sizeof out);
    assert_string_equal(out, "");
    kp_pdf_format_name(NULL, out, sizeof out);
    assert_string_equal(out, "");
    /* truncation never splits a character */
    char small[8];
    kp_pdf_format_name("Щщщщщ", small, sizeof small);
    assert_string_equal(small, "Щщщ");
}

static void test_format_date(void **state)
{
    (void)state;
    char out[32];
    kp_pdf_format_date("en", "20261127", out, sizeof out);
    assert_string_equal(out, "2026-11-27");
    kp_pdf_format_date("ru", "20261127", out, sizeof out);
    assert_string_equal(out, "27.11.2026");
    kp_pdf_format_date("de", "2026-11-27", out, sizeof out);
    assert_string_equal(out, "27.11.2026");
    kp_pdf_format_date("fr", "20261127", out, sizeof out);
    assert_string_equal(out, "27/11/2026");
    kp_pdf_format_date("es", "2026.11.27", out, sizeof out);
    assert_string_equal(out, "27/11/2026");
    kp_pdf_format_date("xx", "20261127", out, sizeof out);
    assert_string_equal(out, "2026-11-27");
    kp_pdf_format_date("ru", "2026", out, sizeof out); /* not a full date: as it is */
    assert_string_equal(out, "2026");
    kp_pdf_format_date("ru", "", out, sizeof out);
    assert_string_equal(out, "");
    assert_string_equal(kp_pdf_section_key(KP_PDF_RECOMMENDATIONS), "recommendations");
}

static void test_render_short(void **state)
{
    (void)state;
    s_need_fonts();
    kp_pdf_report_t r = s_report();
    unsigned char *pdf = NULL;
    size_t len = 0;
    int pages = 0;
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, &pages), 0);
    assert_true(len > 1000);
    assert_memory_equal(pdf, "%PDF-", 5);
    assert_non_null(memmem(pdf + len - 16, 16, "%%EOF", 5));
    assert_int_equal(pages, 1);
    assert_int_equal(s_count_pages(pdf, len), 1);
    /* the same input gives the same bytes (redelivered jobs store identical instances) */
    unsigned char *again = NULL;
    size_t len2 = 0;
    assert_int_equal(kp_pdf_render(&r, &again, &len2, NULL), 0);
    assert_int_equal(len, len2);
    assert_memory_equal(pdf, again, len);
    s_keep("short", pdf, len);
    free(pdf);
    free(again);
}

static void test_render_long_pages(void **state)
{
    (void)state;
    s_need_fonts();
    kp_pdf_report_t r = s_report();
    size_t cap = 300 * 200, n = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    for (int i = 0; i < 300 && n + 200 < cap; i++)
        n += (size_t)snprintf(text + n, cap - n,
                              "%sParagraph %d: the lungs are clear and the pleural spaces are free "
                              "of effusion, sentence number %d ends here.",
                              i ? "\n\n" : "", i, i);
    r.sections[KP_PDF_FINDINGS] = text;
    unsigned char *pdf = NULL;
    size_t len = 0;
    int pages = 0;
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, &pages), 0);
    assert_true(pages > 5);
    assert_int_equal(s_count_pages(pdf, len), pages);
    s_keep("long", pdf, len);
    free(pdf);
    free(text);
}

static void test_render_overlong_word_and_draft(void **state)
{
    (void)state;
    s_need_fonts();
    kp_pdf_report_t r = s_report();
    size_t n = 20000;
    char *word = malloc(n * 2 + 1);
    assert_non_null(word);
    for (size_t i = 0; i < n; i++)
        memcpy(word + 2 * i, "Щ", 2); /* one word, no spaces */
    word[2 * n] = 0;
    r.sections[KP_PDF_FINDINGS] = word;
    r.signed_name = NULL; /* a draft */
    r.author_name = "Dr. Jane Smith";
    r.language = "ru";
    unsigned char *pdf = NULL;
    size_t len = 0;
    int pages = 0;
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, &pages), 0);
    /* 20000 wide letters are ~ 7 letters per cm: several pages, and the renderer ended */
    assert_true(pages >= 3);
    s_keep("overlong", pdf, len);
    free(pdf);
    free(word);
}

static void test_render_languages_and_markup(void **state)
{
    (void)state;
    s_need_fonts();
    const char *langs[] = {"en", "ru", "es", "fr", "de"};
    const char *texts[] = {"Café ü", "Щука съела «ёж»", "Niño señor", "Cœur à l'œil", "Straße Öl"};
    for (int i = 0; i < 5; i++) {
        kp_pdf_report_t r = s_report();
        r.language = langs[i];
        r.sections[KP_PDF_TECHNIQUE] = texts[i];
        /* odd markup: unclosed markers, markers around spaces, nested, empty items */
        r.sections[KP_PDF_RECOMMENDATIONS] = "**unclosed *also 2 * 3 * 4 ***both***\n-\n- \n\t-x";
        r.amends_version = 1;
        r.version = 2;
        r.logo_path = "/nonexistent/logo.png"; /* left out with a warning */
        unsigned char *pdf = NULL;
        size_t len = 0;
        assert_int_equal(kp_pdf_render(&r, &pdf, &len, NULL), 0);
        assert_memory_equal(pdf, "%PDF-", 5);
        char name[16];
        snprintf(name, sizeof name, "lang-%s", langs[i]);
        s_keep(name, pdf, len);
        free(pdf);
    }
}

/* Writes a small RGB PNG (stripes) to path. */
static void s_write_png(const char *path)
{
    enum { W = 40, H = 16 };
    unsigned char raw[H * (1 + 3 * W)];
    for (int y = 0; y < H; y++) {
        raw[y * (1 + 3 * W)] = 0; /* filter: none */
        for (int x = 0; x < 3 * W; x++)
            raw[y * (1 + 3 * W) + 1 + x] = (y / 4) % 2 ? 220 : 40;
    }
    unsigned char z[4096];
    uLongf zl = sizeof z;
    assert_int_equal(compress(z, &zl, raw, sizeof raw), Z_OK);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite("\x89PNG\r\n\x1a\n", 1, 8, f);
    unsigned char ihdr[13] = {0, 0, 0, W, 0, 0, 0, H, 8, 2, 0, 0, 0};
    const struct {
        const char *type;
        const unsigned char *data;
        size_t len;
    } chunks[] = {{"IHDR", ihdr, 13}, {"IDAT", z, zl}, {"IEND", NULL, 0}};
    for (size_t i = 0; i < 3; i++) {
        unsigned char be[4] = {(unsigned char)(chunks[i].len >> 24),
                               (unsigned char)(chunks[i].len >> 16),
                               (unsigned char)(chunks[i].len >> 8), (unsigned char)chunks[i].len};
        fwrite(be, 1, 4, f);
        fwrite(chunks[i].type, 1, 4, f);
        if (chunks[i].len) fwrite(chunks[i].data, 1, chunks[i].len, f);
        uLong crc = crc32(0, (const Bytef *)chunks[i].type, 4);
        if (chunks[i].len) crc = crc32(crc, chunks[i].data, (uInt)chunks[i].len);
        unsigned char c[4] = {(unsigned char)(crc >> 24), (unsigned char)(crc >> 16),
                              (unsigned char)(crc >> 8), (unsigned char)crc};
        fwrite(c, 1, 4, f);
    }
    fclose(f);
}

static void test_render_logo(void **state)
{
    (void)state;
    s_need_fonts();
    char path[] = "/tmp/kp-test-logo-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    s_write_png(path);
    kp_pdf_report_t r = s_report();
    r.logo_path = path;
    unsigned char *pdf = NULL;
    size_t len = 0;
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, NULL), 0);
    assert_non_null(memmem(pdf, len, "/Subtype /Image", 15)); /* the logo is in */
    s_keep("logo", pdf, len);
    free(pdf);
    /* a file that is not an image is left out, the report still renders */
    FILE *f = fopen(path, "wb");
    fputs("not an image", f);
    fclose(f);
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, NULL), 0);
    assert_null(memmem(pdf, len, "/Subtype /Image", 15));
    free(pdf);
    unlink(path);
}

static void test_render_errors(void **state)
{
    (void)state;
    kp_pdf_report_t r = s_report();
    unsigned char *pdf = (unsigned char *)"x";
    size_t len = 1;
    assert_int_equal(kp_pdf_render(NULL, &pdf, &len, NULL), KP_EINVAL);
    r.font_dir = "/nonexistent/fonts";
    assert_int_equal(kp_pdf_render(&r, &pdf, &len, NULL), KP_EIO);
    assert_null(pdf);
    assert_int_equal(len, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format_name),
        cmocka_unit_test(test_format_date),
        cmocka_unit_test(test_render_short),
        cmocka_unit_test(test_render_long_pages),
        cmocka_unit_test(test_render_overlong_word_and_draft),
        cmocka_unit_test(test_render_languages_and_markup),
        cmocka_unit_test(test_render_logo),
        cmocka_unit_test(test_render_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
