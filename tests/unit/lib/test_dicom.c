/* Unit tests of lib/dicom (kp_dicom.h): reading, DICOM JSON against DCMTK's own dcm2json,
 * pixel data location, and the Storage SCP driven by DCMTK's storescu / echoscu.
 *
 * Test data: pydicom's test files (python3-pydicom) and the DCMTK command line tools (dcmtk);
 * the tests skip when either is missing. Every test runs under an alarm() timeout. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"

#define PYDICOM        "/usr/lib/python3/dist-packages/pydicom/data"
#define TEST_FILES     PYDICOM "/test_files"
#define CHARSET_FILES  PYDICOM "/charset_files"
#define TEST_TIMEOUT_S 60

static char s_tmp[256]; /* per-run scratch directory */

/* ---- helpers ---- */

static int s_have_data(void)
{
    return access(TEST_FILES "/CT_small.dcm", R_OK) == 0 &&
           system("command -v dcm2json >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1") ==
               0;
}

/* Runs cmd through the shell, returns its whole stdout (malloc'd) and exit status. */
static char *s_run(const char *cmd, int *status, size_t *len_out)
{
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 4096) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    buf[len] = '\0';
    int st = pclose(p);
    if (status) *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (len_out) *len_out = len;
    return buf;
}

static char *s_read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    buf[n] = '\0';
    if (len) *len = (size_t)n;
    return buf;
}

static void s_write_file(const char *path, const void *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    fclose(fp);
}

/* Lists *.dcm in dir (sorted), returns count; names are malloc'd full paths. */
static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int s_list_dcm(const char *dir, char ***out)
{
    DIR *d = opendir(dir);
    int n = 0, cap = 16;
    char **v = malloc(sizeof *v * (size_t)cap);
    assert_non_null(v);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 5 || strcmp(e->d_name + l - 4, ".dcm") != 0) continue;
        if (n == cap) v = realloc(v, sizeof *v * (size_t)(cap *= 2));
        v[n] = malloc(strlen(dir) + l + 2);
        sprintf(v[n], "%s/%s", dir, e->d_name);
        n++;
    }
    if (d) closedir(d);
    qsort(v, (size_t)n, sizeof *v, s_cmp_str);
    *out = v;
    return n;
}

static void s_free_list(char **v, int n)
{
    for (int i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static int s_setup(void **state)
{
    (void)state;
    alarm(TEST_TIMEOUT_S); /* SIGALRM's default action ends a hung test run */
    return 0;
}

static int s_teardown(void **state)
{
    (void)state;
    alarm(0);
    return 0;
}

/* ---- JSON against dcm2json ---- */

/* Compares dcm2json's value a with ours b at path (the tagpath of our BulkDataURI scheme).
 * Allowed: ours has BulkDataURI where dcm2json has InlineBinary; when dcm2json aborted at
 * encapsulated PixelData (aborted != 0), top-level keys from 7FE00010 on missing on its side. */
static int s_json_diff(json_t *a, json_t *b, const char *path, const char *prefix, int aborted,
                       int top, char *why, size_t whylen)
{
    if (json_is_object(a) && json_is_object(b)) {
        json_t *ours_uri = json_object_get(b, "BulkDataURI");
        if (ours_uri && json_object_get(b, "vr")) {
            if (!json_object_get(a, "InlineBinary") && !json_object_get(a, "BulkDataURI")) {
                snprintf(why, whylen, "%s: BulkDataURI where dcm2json has neither", path);
                return 1;
            }
            if (!json_equal(json_object_get(a, "vr"), json_object_get(b, "vr"))) {
                snprintf(why, whylen, "%s: vr differs", path);
                return 1;
            }
            char want[512];
            snprintf(want, sizeof want, "%s/bulkdata/%s", prefix, path);
            if (strcmp(json_string_value(ours_uri), want) != 0) {
                snprintf(why, whylen, "%s: BulkDataURI %s, want %s", path,
                         json_string_value(ours_uri), want);
                return 1;
            }
            return 0;
        }
        const char *k;
        json_t *v;
        json_object_foreach(a, k, v)
        {
            if (!json_object_get(b, k)) {
                snprintf(why, whylen, "%s/%s: missing in ours", path, k);
                return 1;
            }
        }
        json_object_foreach(b, k, v)
        {
            json_t *av = json_object_get(a, k);
            char sub[512];
            if (top)
                snprintf(sub, sizeof sub, "%s", k);
            else if (strlen(k) == 8)
                snprintf(sub, sizeof sub, "%s/%s", path, k);
            else
                snprintf(sub, sizeof sub, "%s", path); /* "vr", "Value": same element */
            if (!av) {
                if (top && aborted && strcmp(k, "7FE00010") >= 0) continue;
                snprintf(why, whylen, "%s/%s: extra in ours", path, k);
                return 1;
            }
            if (s_json_diff(av, v, sub, prefix, aborted, 0, why, whylen)) return 1;
        }
        return 0;
    }
    if (json_is_array(a) && json_is_array(b)) {
        if (json_array_size(a) != json_array_size(b)) {
            snprintf(why, whylen, "%s: array sizes differ", path);
            return 1;
        }
        for (size_t i = 0; i < json_array_size(a); i++) {
            char sub[512];
            /* items of a sequence: path/index; other arrays (values) keep the path */
            if (json_is_object(json_array_get(b, i)) &&
                !json_object_get(json_array_get(b, i), "Alphabetic") &&
                !json_object_get(json_array_get(b, i), "Ideographic") &&
                !json_object_get(json_array_get(b, i), "Phonetic"))
                snprintf(sub, sizeof sub, "%s/%zu", path, i);
            else
                snprintf(sub, sizeof sub, "%s", path);
            if (s_json_diff(json_array_get(a, i), json_array_get(b, i), sub, prefix, aborted, 0,
                            why, whylen))
                return 1;
        }
        return 0;
    }
    if (!json_equal(a, b)) {
        snprintf(why, whylen, "%s: values differ", path);
        return 1;
    }
    return 0;
}

static void test_json_matches_dcm2json(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    const char *prefix = "http://kp.test/studies/1";
    const size_t threshold = 64;
    int compared = 0, skipped = 0, bulk_seen = 0, inline_seen = 0;
    const char *dirs[] = {TEST_FILES, CHARSET_FILES};
    for (int d = 0; d < 2; d++) {
        /* dcm2json for every file, several at a time (its start-up dominates) */
        char out_dir[512], cmd[2048];
        snprintf(out_dir, sizeof out_dir, "%s/dcm2json%d", s_tmp, d);
        assert_int_equal(mkdir(out_dir, 0700), 0);
        snprintf(cmd, sizeof cmd,
                 "cd '%s' && ls | grep '\\.dcm$' | xargs -P 8 -I{} sh -c "
                 "'dcm2json -fc \"$1\" > \"%s/$1.json\" 2>/dev/null; echo $? > \"%s/$1.rc\"' "
                 "sh {}",
                 dirs[d], out_dir, out_dir);
        assert_int_equal(system(cmd), 0);
        char **files;
        int n = s_list_dcm(dirs[d], &files);
        for (int i = 0; i < n; i++) {
            char path[1024];
            const char *base = strrchr(files[i], '/') + 1;
            snprintf(path, sizeof path, "%s/%s.rc", out_dir, base);
            char *rc = s_read_file(path, NULL);
            assert_non_null(rc);
            int st = atoi(rc);
            free(rc);
            snprintf(path, sizeof path, "%s/%s.json", out_dir, base);
            size_t len;
            char *theirs = s_read_file(path, &len);
            assert_non_null(theirs);
            /* dcm2json aborts at encapsulated PixelData ("InlineBinary encoding not supported
             * for compressed pixel data", exit 81) after writing every earlier attribute and
             * the comma: close the object and compare what precedes PixelData. */
            int aborted = 0;
            if (st == 81 && len >= 2 && strcmp(theirs + len - 2, ",}") == 0) {
                theirs[len - 2] = '}';
                theirs[len - 1] = '\0';
                aborted = 1;
            }
            json_error_t jerr;
            json_t *a = (st == 0 || aborted) ? json_loads(theirs, 0, &jerr) : NULL;
            free(theirs);
            if (!a) {
                /* dcm2json cannot read the file (truncated, ISO 2022 IR 87, ...) or printed
                 * invalid UTF-8 (chrSQEncoding: an item's own charset left unconverted) */
                printf("  skip %s (dcm2json exit %d)\n", strrchr(files[i], '/') + 1, st);
                skipped++;
                continue;
            }
            int err = 0;
            kp_dicom_file_t *f = kp_dicom_open(files[i], &err);
            if (!f) fail_msg("dcm2json reads %s but kp_dicom_open fails (%d)", files[i], err);
            char *ours = kp_dicom_json(f, prefix, threshold);
            assert_non_null(ours);
            if (strstr(ours, "\"BulkDataURI\"")) bulk_seen++;
            if (strstr(ours, "\"InlineBinary\"")) inline_seen++;
            json_t *b = json_loads(ours, 0, &jerr);
            if (!b) fail_msg("%s: our JSON does not parse: %s", files[i], jerr.text);
            /* PixelData is always a BulkDataURI */
            json_t *px = json_object_get(b, "7FE00010");
            if (px && !json_object_get(px, "BulkDataURI"))
                fail_msg("%s: PixelData is not a BulkDataURI", files[i]);
            if (aborted && !px) fail_msg("%s: encapsulated PixelData missing", files[i]);
            char why[1024] = "";
            if (s_json_diff(a, b, "", prefix, aborted, 1, why, sizeof why))
                fail_msg("%s differs from dcm2json: %s", files[i], why);
            compared++;
            json_decref(a);
            json_decref(b);
            free(ours);
            kp_dicom_close(&f);
            assert_null(f);
        }
        s_free_list(files, n);
    }
    printf("  JSON compared with dcm2json: %d files (%d skipped); BulkDataURI in %d, "
           "InlineBinary in %d\n",
           compared, skipped, bulk_seen, inline_seen);
    assert_true(compared >= 20);
    assert_true(bulk_seen >= 20);
    assert_true(inline_seen >= 1);
}

/* Nested BulkDataURI paths and the size threshold. */
static void test_json_bulk_paths(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    kp_dicom_file_t *f = kp_dicom_open(TEST_FILES "/waveform_ecg.dcm", NULL);
    assert_non_null(f);
    char *j = kp_dicom_json(f, "/x", 0);
    assert_non_null(j);
    assert_non_null(strstr(
        j, "\"54001010\":{\"vr\":\"OW\",\"BulkDataURI\":\"/x/bulkdata/54000100/0/54001010\"}"));
    assert_non_null(strstr(j, "\"BulkDataURI\":\"/x/bulkdata/54000100/1/54001010\""));
    free(j);
    j = kp_dicom_json(f, NULL, (size_t)-1); /* nothing over the threshold: all inline */
    assert_non_null(j);
    assert_null(strstr(j, "BulkDataURI"));
    assert_non_null(strstr(j, "\"54001010\":{\"vr\":\"OW\",\"InlineBinary\":\""));
    free(j);
    kp_dicom_close(&f);
}

/* Invalid numbers (DS "nan", "abc", IS "1x") still give valid JSON, the same as dcm2json's. */
static void test_json_invalid_numbers(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    char path[512], cmd[1400];
    snprintf(path, sizeof path, "%s/badnum.dcm", s_tmp);
    snprintf(cmd, sizeof cmd,
             "cp '%s/CT_small.dcm' '%s' && dcmodify -q -nb -m '(0018,0050)=nan' "
             "-m '(0018,0088)=abc' -m '(0020,0013)=1x' '%s'",
             TEST_FILES, path, path);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "dcm2json -fc '%s'", path);
    int st;
    char *theirs = s_run(cmd, &st, NULL);
    assert_int_equal(st, 0);
    json_t *a = json_loads(theirs, 0, NULL);
    assert_non_null(a);
    kp_dicom_file_t *f = kp_dicom_open(path, NULL);
    assert_non_null(f);
    assert_string_equal(kp_dicom_get(f, 0x00180050), "nan");
    char *ours = kp_dicom_json(f, "", 64);
    json_t *b = json_loads(ours, 0, NULL);
    assert_non_null(b);
    const char *tags[] = {"00180050", "00180088", "00200013"};
    for (int i = 0; i < 3; i++) {
        assert_non_null(json_object_get(b, tags[i]));
        assert_true(json_equal(json_object_get(a, tags[i]), json_object_get(b, tags[i])));
    }
    json_decref(a);
    json_decref(b);
    free(theirs);
    free(ours);
    kp_dicom_close(&f);
}

/* The JSON must not read PixelData: it still works once the value is cut off the file. */
static void test_json_does_not_read_pixels(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    size_t len;
    char *data = s_read_file(TEST_FILES "/CT_small.dcm", &len);
    assert_non_null(data);
    char path[512];
    snprintf(path, sizeof path, "%s/cut.dcm", s_tmp);
    s_write_file(path, data, len);
    kp_dicom_file_t *f = kp_dicom_open(path, NULL);
    assert_non_null(f);
    int64_t off, plen;
    assert_int_equal(kp_dicom_pixel_location(f, &off, &plen), 0);
    assert_int_equal(truncate(path, (off_t)off), 0); /* the pixel value is gone from disk */
    char *j = kp_dicom_json(f, "", (size_t)-1);
    assert_non_null(j);
    assert_non_null(
        strstr(j, "\"7FE00010\":{\"vr\":\"OW\",\"BulkDataURI\":\"/bulkdata/7FE00010\"}"));
    assert_non_null(strstr(j, "CompressedSamples^CT1"));
    free(j);
    kp_dicom_close(&f);
    free(data);
}

/* ---- values ---- */

static void test_get_values(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    assert_int_equal(kp_dicom_init(), 0);
    assert_int_equal(kp_dicom_init(), 0); /* idempotent */
    int err = 1;
    kp_dicom_file_t *f = kp_dicom_open(TEST_FILES "/CT_small.dcm", &err);
    assert_non_null(f);
    assert_int_equal(err, 0);
    assert_string_equal(kp_dicom_get(f, 0x00100010), "CompressedSamples^CT1");
    assert_string_equal(kp_dicom_get(f, 0x0020000D), "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322");
    assert_string_equal(kp_dicom_get(f, 0x00080060), "CT");
    assert_string_equal(kp_dicom_get(f, 0x00280010), "128");                /* US */
    assert_string_equal(kp_dicom_get(f, 0x00280030), "0.661468\\0.661468"); /* DS, VM 2 */
    assert_string_equal(kp_dicom_get(f, 0x00280120), "-2000");              /* SS */
    const char *p1 = kp_dicom_get(f, 0x00100010);
    assert_ptr_equal(p1, kp_dicom_get(f, 0x00100010)); /* borrowed, stable */
    assert_null(kp_dicom_get(f, 0x00100011));          /* absent */
    assert_null(kp_dicom_get(f, 0x7FE00010));          /* binary: not text */
    assert_string_equal(kp_dicom_transfer_syntax(f), "1.2.840.10008.1.2.1");
    assert_int_equal(kp_dicom_charset_fallback(f), 0);
    kp_dicom_close(&f);
    assert_null(f);
    kp_dicom_close(&f); /* idempotent */
    kp_dicom_close(NULL);

    f = kp_dicom_open(TEST_FILES "/JPEG2000.dcm", NULL);
    assert_non_null(f);
    assert_string_equal(kp_dicom_get(f, 0x00080050), ""); /* present, empty */
    assert_string_equal(kp_dicom_get_in_seq(f, 0x00082112, 0x00081150),
                        "1.2.840.10008.5.1.4.1.1.7");
    assert_string_equal(kp_dicom_get_in_seq(f, 0x00089215, 0x00080104), "Lossy Compression");
    assert_null(kp_dicom_get_in_seq(f, 0x00082112, 0x00100010));
    assert_null(kp_dicom_get_in_seq(f, 0x00081140, 0x00081150));
    assert_null(kp_dicom_get(f, 0x00082112)); /* SQ: not text */
    assert_string_equal(kp_dicom_transfer_syntax(f), "1.2.840.10008.1.2.4.91");
    kp_dicom_close(&f);
}

/* "[value]" from a dcmdump +P line */
static char *s_dcmdump_value(const char *cmd)
{
    int st;
    char *out = s_run(cmd, &st, NULL);
    assert_int_equal(st, 0);
    char *l = strchr(out, '['), *r = l ? strrchr(l, ']') : NULL;
    assert_non_null(r);
    *r = '\0';
    char *v = strdup(l + 1);
    free(out);
    return v;
}

static void test_charset(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "dcmconv +U8 '%s/chrRuss.dcm' '%s/russ8.dcm' && dcmdump +P PatientName '%s/russ8.dcm'",
             CHARSET_FILES, s_tmp, s_tmp);
    char *want = s_dcmdump_value(cmd);
    kp_dicom_file_t *f = kp_dicom_open(CHARSET_FILES "/chrRuss.dcm", NULL);
    assert_non_null(f);
    assert_string_equal(kp_dicom_get(f, 0x00100010), want);
    assert_string_equal(kp_dicom_get(f, 0x00100010), "\xD0\x9B\xD1\x8E\xD0\xBA"
                                                     "ce\xD0\xBC\xD0\xB1ypг");
    assert_string_equal(kp_dicom_get(f, 0x00080005), "ISO_IR 192");
    assert_int_equal(kp_dicom_charset_fallback(f), 0);
    kp_dicom_close(&f);
    free(want);

    f = kp_dicom_open(CHARSET_FILES "/chrGerm.dcm", NULL);
    assert_non_null(f);
    snprintf(cmd, sizeof cmd,
             "dcmconv +U8 '%s/chrGerm.dcm' '%s/germ8.dcm' && dcmdump +P PatientName '%s/germ8.dcm'",
             CHARSET_FILES, s_tmp, s_tmp);
    want = s_dcmdump_value(cmd);
    assert_string_equal(kp_dicom_get(f, 0x00100010), want);
    assert_non_null(strstr(want, "R\xC3\xBC"
                                 "diger")); /* u-umlaut in UTF-8 */
    free(want);
    kp_dicom_close(&f);

    /* ISO 2022 IR 87 cannot be converted: raw values kept, open succeeds */
    f = kp_dicom_open(CHARSET_FILES "/chrH31.dcm", NULL);
    assert_non_null(f);
    assert_int_equal(kp_dicom_charset_fallback(f), 1);
    const char *name = kp_dicom_get(f, 0x00100010);
    assert_non_null(name);
    assert_true(strncmp(name, "Yamada^Tarou=\x1b$B", 16) == 0);
    char *j = kp_dicom_json(f, "", 1024);
    assert_non_null(j);
    json_t *o = json_loads(j, 0, NULL); /* still valid UTF-8 / JSON */
    assert_non_null(o);
    json_decref(o);
    free(j);
    kp_dicom_close(&f);

    /* an item with its own unconvertible charset: output stays valid UTF-8 */
    f = kp_dicom_open(CHARSET_FILES "/chrSQEncoding.dcm", NULL);
    assert_non_null(f);
    j = kp_dicom_json(f, "", 1024);
    assert_non_null(j);
    o = json_loads(j, 0, NULL);
    assert_non_null(o);
    json_decref(o);
    free(j);
    kp_dicom_close(&f);
}

static void test_bad_input(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    char path[512];
    int err = 0;

    assert_null(kp_dicom_open(NULL, &err));
    assert_int_equal(err, KP_EINVAL);
    assert_null(kp_dicom_open("/nonexistent/x.dcm", &err));
    assert_int_equal(err, KP_EIO);
    assert_null(kp_dicom_open(s_tmp, &err)); /* a directory */
    assert_int_equal(err, KP_EIO);

    unsigned char garbage[3000];
    uint32_t x = 2463534242u;
    for (size_t i = 0; i < sizeof garbage; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        garbage[i] = (unsigned char)x;
    }
    snprintf(path, sizeof path, "%s/garbage.bin", s_tmp);
    s_write_file(path, garbage, sizeof garbage);
    err = 0;
    assert_null(kp_dicom_open(path, &err));
    assert_int_equal(err, KP_EDICOM);

    snprintf(path, sizeof path, "%s/text.txt", s_tmp);
    s_write_file(path, "hello, this is not DICOM at all\n", 32);
    assert_null(kp_dicom_open(path, &err));
    assert_int_equal(err, KP_EDICOM);

    snprintf(path, sizeof path, "%s/empty.dcm", s_tmp);
    s_write_file(path, "", 0);
    assert_null(kp_dicom_open(path, &err));
    assert_int_equal(err, KP_EDICOM);

    size_t len;
    char *data = s_read_file(TEST_FILES "/CT_small.dcm", &len);
    assert_non_null(data);
    const size_t cuts[] = {20000, 1000, 140, 131};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        snprintf(path, sizeof path, "%s/trunc%zu.dcm", s_tmp, cuts[i]);
        s_write_file(path, data, cuts[i]);
        err = 0;
        assert_null(kp_dicom_open(path, &err));
        assert_int_equal(err, KP_EDICOM);
    }
    free(data);

    assert_null(kp_dicom_open(TEST_FILES "/rtplan_truncated.dcm", &err));
    assert_int_equal(err, KP_EDICOM);
    assert_null(kp_dicom_get(NULL, 0x00100010));
    assert_null(kp_dicom_json(NULL, "", 0));
    assert_string_equal(kp_dicom_transfer_syntax(NULL), "");
}

/* ---- pixel data location ---- */

static void test_pixel_location(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    kp_dicom_file_t *f = kp_dicom_open(TEST_FILES "/CT_small.dcm", NULL);
    assert_non_null(f);
    int64_t off = 0, len = 0;
    assert_int_equal(kp_dicom_pixel_location(f, &off, &len), 0);
    assert_int_equal(len, 128 * 128 * 2);
    size_t flen;
    unsigned char *data = (unsigned char *)s_read_file(TEST_FILES "/CT_small.dcm", &flen);
    assert_true(off >= 12 && (size_t)(off + len) <= flen);
    /* explicit VR LE header: tag, "OW", 2 reserved bytes, 4-byte length */
    const unsigned char hdr[12] = {0xE0, 0x7F, 0x10, 0x00, 'O', 'W', 0, 0, 0x00, 0x80, 0x00, 0x00};
    assert_memory_equal(data + off - 12, hdr, 12);
    /* the same bytes DCMTK extracts as raw pixel data */
    char cmd[1024], raw[600];
    snprintf(cmd, sizeof cmd, "cd '%s' && dcmdump +W . '%s' >/dev/null", s_tmp,
             TEST_FILES "/CT_small.dcm");
    assert_int_equal(system(cmd), 0);
    snprintf(raw, sizeof raw, "%s/CT_small.dcm.0.raw", s_tmp);
    size_t rlen;
    char *pix = s_read_file(raw, &rlen);
    assert_non_null(pix);
    assert_int_equal(rlen, (size_t)len);
    assert_memory_equal(data + off, pix, rlen);
    free(pix);
    free(data);
    kp_dicom_close(&f);

    /* encapsulated: undefined length, the value starts with the first item tag */
    f = kp_dicom_open(TEST_FILES "/JPEG2000.dcm", NULL);
    assert_non_null(f);
    assert_int_equal(kp_dicom_pixel_location(f, &off, &len), 0);
    assert_int_equal(len, -1);
    data = (unsigned char *)s_read_file(TEST_FILES "/JPEG2000.dcm", &flen);
    const unsigned char item[4] = {0xFE, 0xFF, 0x00, 0xE0};
    assert_memory_equal(data + off, item, 4);
    const unsigned char ehdr[12] = {0xE0, 0x7F, 0x10, 0x00, 'O', 'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF};
    assert_memory_equal(data + off - 12, ehdr, 12);
    free(data);
    kp_dicom_close(&f);

    /* no pixel data; deflated (no offset in the file) */
    f = kp_dicom_open(TEST_FILES "/rtplan.dcm", NULL);
    assert_non_null(f);
    assert_int_equal(kp_dicom_pixel_location(f, &off, &len), KP_ENOTFOUND);
    kp_dicom_close(&f);
    f = kp_dicom_open(TEST_FILES "/image_dfl.dcm", NULL);
    assert_non_null(f);
    assert_int_equal(kp_dicom_pixel_location(f, &off, &len), KP_ENOTFOUND);
    kp_dicom_close(&f);

    /* every test file: the bytes before the offset are the (7FE0,0010) header in the file's
     * byte order, with the length we report (covers both DCMTK's recorded offset and our walk
     * for small / encapsulated values, implicit and big endian syntaxes) */
    const char *dirs[] = {TEST_FILES, CHARSET_FILES};
    int checked = 0;
    for (int d = 0; d < 2; d++) {
        char **files;
        int n = s_list_dcm(dirs[d], &files);
        for (int i = 0; i < n; i++) {
            f = kp_dicom_open(files[i], NULL);
            if (!f) continue;
            if (kp_dicom_pixel_location(f, &off, &len) == 0) {
                data = (unsigned char *)s_read_file(files[i], &flen);
                assert_true(off >= 8);
                const unsigned char *h8 = data + off - 8, *h12 = data + off - 12;
                uint32_t l32;
                if (h8[0] == 0xE0 && h8[1] == 0x7F && h8[2] == 0x10 && h8[3] == 0x00)
                    l32 = (uint32_t)h8[4] | (uint32_t)h8[5] << 8 | (uint32_t)h8[6] << 16 |
                          (uint32_t)h8[7] << 24;
                else if (h12[0] == 0xE0 && h12[1] == 0x7F && h12[2] == 0x10 && h12[3] == 0x00)
                    l32 = (uint32_t)h12[8] | (uint32_t)h12[9] << 8 | (uint32_t)h12[10] << 16 |
                          (uint32_t)h12[11] << 24;
                else if (h12[0] == 0x7F && h12[1] == 0xE0 && h12[2] == 0x00 && h12[3] == 0x10)
                    l32 = (uint32_t)h12[8] << 24 | (uint32_t)h12[9] << 16 | (uint32_t)h12[10] << 8 |
                          (uint32_t)h12[11];
                else
                    fail_msg("%s: no (7FE0,0010) header before offset %lld", files[i],
                             (long long)off);
                if (len < 0)
                    assert_int_equal(l32, 0xFFFFFFFFu);
                else
                    assert_int_equal(l32, (uint32_t)len);
                if (len >= 0) assert_true((size_t)(off + len) <= flen);
                free(data);
                checked++;
            }
            kp_dicom_close(&f);
        }
        s_free_list(files, n);
    }
    printf("  pixel data located and checked in %d files\n", checked);
    assert_true(checked >= 40);
}

/* ---- Storage SCP ---- */

typedef struct {
    pthread_mutex_t mu;
    char store_dir[512];
    unsigned status; /* what on_store returns */
    int calls;
    char uids[16][80];
    char xfers[16][80];
    char calling[32];
    int assoc_calls;
} scp_ctx_t;

static unsigned s_on_store(void *user, const kp_dicom_store_req_t *req)
{
    scp_ctx_t *c = user;
    pthread_mutex_lock(&c->mu);
    int i = c->calls++;
    if (i < 16) {
        snprintf(c->uids[i], sizeof c->uids[i], "%s", req->sop_instance_uid);
        snprintf(c->xfers[i], sizeof c->xfers[i], "%s", req->transfer_syntax_uid);
    }
    snprintf(c->calling, sizeof c->calling, "%s", req->calling_ae);
    unsigned st = c->status;
    pthread_mutex_unlock(&c->mu);
    if (st != 0) {
        unlink(req->tmp_path);
        return st;
    }
    char dst[1024];
    snprintf(dst, sizeof dst, "%s/%s.dcm", c->store_dir, req->sop_instance_uid);
    return rename(req->tmp_path, dst) == 0 ? 0x0000 : 0xA700;
}

static int s_on_assoc(void *user, const char *calling, const char *called, const char *peer)
{
    scp_ctx_t *c = user;
    pthread_mutex_lock(&c->mu);
    c->assoc_calls++;
    pthread_mutex_unlock(&c->mu);
    if (strcmp(peer, "127.0.0.1") != 0) return 1;
    if (strcmp(calling, "BADGUY") == 0) return 1;
    if (strcmp(called, "KLINIKA") != 0) return 2;
    return 0;
}

static int s_calls(scp_ctx_t *c)
{
    pthread_mutex_lock(&c->mu);
    int n = c->calls;
    pthread_mutex_unlock(&c->mu);
    return n;
}

static int s_assoc_calls(scp_ctx_t *c)
{
    pthread_mutex_lock(&c->mu);
    int n = c->assoc_calls;
    pthread_mutex_unlock(&c->mu);
    return n;
}

typedef struct {
    kp_dicom_scp_config_t cfg;
    volatile int stop;
    int rc;
    pthread_t th;
} scp_run_t;

static void *s_scp_thread(void *arg)
{
    scp_run_t *r = arg;
    r->rc = kp_dicom_scp_run(&r->cfg);
    return NULL;
}

/* dcmdump of the data set, normalised for what storescu changes when it sends a file: it
 * re-encodes sequences and items with explicit lengths and drops the trailing padding
 * (FFFC,FFFC). So: no group 0002, no group lengths, no comments (lengths), no delimiters. */
static char *s_dataset_dump(const char *path)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd,
             "dcmdump -q +L '%s' | grep -v '^#' | grep -v '^(0002,' | grep -v '^ *$' | "
             "grep -v '^ *([0-9a-f]\\{4\\},0000)' | grep -v '^(fffc,fffc)' | "
             "grep -v '(fffe,e00d)\\|(fffe,e0dd)' | "
             "sed -e 's/ *#[^#]*$//' -e 's/with [a-z]* length #=/#=/'",
             path);
    int st;
    char *out = s_run(cmd, &st, NULL);
    assert_true(strlen(out) > 100);
    return out;
}

/* The pixel data value as stored in the file (for an encapsulated value: every item up to
 * and including the sequence delimiter), which a bit-preserving SCP must keep byte for byte. */
static unsigned char *s_pixel_bytes(const char *path, size_t *n)
{
    kp_dicom_file_t *f = kp_dicom_open(path, NULL);
    assert_non_null(f);
    int64_t off, len;
    assert_int_equal(kp_dicom_pixel_location(f, &off, &len), 0);
    kp_dicom_close(&f);
    size_t flen;
    unsigned char *data = (unsigned char *)s_read_file(path, &flen);
    assert_non_null(data);
    if (len < 0) { /* items: (FFFE,E000) len value ... (FFFE,E0DD) 0 */
        size_t p = (size_t)off;
        for (;;) {
            assert_true(p + 8 <= flen);
            uint32_t l = (uint32_t)data[p + 4] | (uint32_t)data[p + 5] << 8 |
                         (uint32_t)data[p + 6] << 16 | (uint32_t)data[p + 7] << 24;
            int delim = data[p + 2] == 0xDD && data[p + 3] == 0xE0;
            p += 8 + (delim ? 0 : l);
            if (delim) break;
        }
        len = (int64_t)(p - (size_t)off);
    }
    assert_true((size_t)(off + len) <= flen);
    memmove(data, data + off, (size_t)len);
    *n = (size_t)len;
    return data;
}

static int s_storescu(const char *aet, const char *aec, int port, const char *opts,
                      const char *files)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "TCP_NODELAY=1 storescu -q %s -aet %s -aec %s 127.0.0.1 %d %s >/dev/null 2>&1", opts,
             aet, aec, port, files);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int s_echoscu(int port)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "TCP_NODELAY=1 echoscu -q -aet TEST -aec KLINIKA 127.0.0.1 %d >/dev/null 2>&1", port);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int s_count_files(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    if (d) closedir(d);
    return n;
}

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_scp(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    assert_int_equal(kp_dicom_init(), 0);
    static scp_ctx_t ctx;
    memset(&ctx, 0, sizeof ctx);
    pthread_mutex_init(&ctx.mu, NULL);
    char tmp_dir[512];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/incoming", s_tmp);
    snprintf(ctx.store_dir, sizeof ctx.store_dir, "%s/store", s_tmp);
    assert_int_equal(mkdir(tmp_dir, 0700), 0);
    assert_int_equal(mkdir(ctx.store_dir, 0700), 0);

    static scp_run_t run;
    memset(&run, 0, sizeof run);
    const int port = 21000 + (int)(getpid() % 1000);
    run.cfg = (kp_dicom_scp_config_t){.ae_title = "KLINIKA",
                                      .port = port,
                                      .max_pdu = 65536,
                                      .max_associations = 4,
                                      .acse_timeout = 5,
                                      .dimse_timeout = 10,
                                      .tmp_dir = tmp_dir,
                                      .on_store = s_on_store,
                                      .on_assoc = s_on_assoc,
                                      .user = &ctx,
                                      .stop = &run.stop};
    assert_int_equal(pthread_create(&run.th, NULL, s_scp_thread, &run), 0);

    /* C-ECHO (also waits until the SCP listens) */
    int rc = -1;
    for (int i = 0; i < 50 && rc != 0; i++) {
        rc = s_echoscu(port);
        if (rc != 0) usleep(100 * 1000);
    }
    assert_int_equal(rc, 0);

    /* C-STORE, one association per file: storescu proposes a compressed syntax only when
     * told to (-xy, -xw, ...), next to the uncompressed ones */
    const struct {
        const char *name, *opt, *xfer;
    } sends[] = {
        {"CT_small.dcm", "", "1.2.840.10008.1.2.1"},
        {"MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"},
        {"MR_small_bigendian.dcm", "-xb", "1.2.840.10008.1.2.2"},
        {"SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"},
        {"JPGExtended.dcm", "-xx", "1.2.840.10008.1.2.4.51"},
        {"SC_rgb_jpeg_gdcm.dcm", "-xs", "1.2.840.10008.1.2.4.70"},
        {"MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"},
        {"JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"},
        {"MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"},
    };
    for (size_t i = 0; i < sizeof sends / sizeof sends[0]; i++) {
        char src[512];
        snprintf(src, sizeof src, "%s/%s", TEST_FILES, sends[i].name);
        ctx.calls = 0;
        if (s_storescu("TEST", "KLINIKA", port, sends[i].opt, src) != 0)
            fail_msg("storescu %s %s failed", sends[i].opt, sends[i].name);
        assert_int_equal(s_calls(&ctx), 1);
        assert_string_equal(ctx.calling, "TEST");
        kp_dicom_file_t *f = kp_dicom_open(src, NULL);
        assert_non_null(f);
        const char *uid = kp_dicom_get(f, 0x00080018);
        assert_string_equal(ctx.uids[0], uid);
        assert_string_equal(ctx.xfers[0], sends[i].xfer); /* received as sent, not transcoded */
        char dst[1024];
        snprintf(dst, sizeof dst, "%s/%s.dcm", ctx.store_dir, uid);
        kp_dicom_close(&f);
        /* a proper Part 10 file (+fo requires the meta header) holding the same data set */
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "dcmdump -q +fo '%s' >/dev/null", dst);
        assert_int_equal(system(cmd), 0);
        kp_dicom_file_t *g = kp_dicom_open(dst, NULL);
        assert_non_null(g);
        assert_string_equal(kp_dicom_transfer_syntax(g), sends[i].xfer);
        kp_dicom_close(&g);
        char *a = s_dataset_dump(src), *b = s_dataset_dump(dst);
        assert_string_equal(a, b);
        free(a);
        free(b);
        size_t na, nb;
        unsigned char *pa = s_pixel_bytes(src, &na), *pb = s_pixel_bytes(dst, &nb);
        assert_int_equal(na, nb);
        assert_memory_equal(pa, pb, na);
        free(pa);
        free(pb);
    }
    assert_int_equal(s_count_files(tmp_dir, ""), 2); /* only . and ..: temp files consumed */

    /* several associations at once */
    ctx.calls = 0;
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "for i in 1 2 3; do TCP_NODELAY=1 storescu -q -aet TEST -aec KLINIKA 127.0.0.1 %d "
             "%s/MR_small.dcm %s/rtdose.dcm & done; wait",
             port, TEST_FILES, TEST_FILES);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(s_calls(&ctx), 6);

    /* association rejected: calling AE, called AE */
    ctx.calls = 0;
    assert_int_not_equal(s_storescu("BADGUY", "KLINIKA", port, "", TEST_FILES "/CT_small.dcm"), 0);
    assert_int_not_equal(s_storescu("TEST", "WRONG", port, "", TEST_FILES "/CT_small.dcm"), 0);
    assert_int_equal(s_calls(&ctx), 0);

    /* callback refuses: storescu reports the failure status */
    ctx.status = 0xA700;
    assert_int_not_equal(s_storescu("TEST", "KLINIKA", port, "", TEST_FILES "/CT_small.dcm"), 0);
    assert_int_equal(s_calls(&ctx), 1);
    ctx.status = 0;
    assert_int_equal(s_count_files(tmp_dir, ""), 2);

    /* a transfer cut off half way: the temporary file goes, the callback is not called */
    char big[600], bigbin[600];
    snprintf(big, sizeof big, "%s/big.dcm", s_tmp);
    snprintf(bigbin, sizeof bigbin, "%s/big.bin", s_tmp);
    snprintf(cmd, sizeof cmd,
             "head -c 48000000 /dev/zero > '%s' && cp '%s/CT_small.dcm' '%s' && "
             "dcmodify -q -nb -if '(0042,0011)=%s' '%s'",
             bigbin, TEST_FILES, big, bigbin, big);
    assert_int_equal(system(cmd), 0);
    ctx.calls = 0;
    snprintf(
        cmd, sizeof cmd,
        "TCP_NODELAY=1 exec storescu -q -aet TEST -aec KLINIKA 127.0.0.1 %d '%s' >/dev/null 2>&1",
        port, big);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int seen = 0;
    for (int i = 0; i < 2000 && !seen; i++) { /* until the SCP writes the temporary file */
        if (s_count_files(tmp_dir, "kp-store-") > 0)
            seen = 1;
        else
            usleep(1000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    assert_true(seen);
    int gone = 0;
    for (int i = 0; i < 200 && !gone; i++) {
        if (s_count_files(tmp_dir, "kp-store-") == 0)
            gone = 1;
        else
            usleep(10 * 1000);
    }
    assert_true(gone);
    assert_int_equal(s_calls(&ctx), 0);
    assert_int_equal(s_echoscu(port), 0); /* still serving */

    /* stop: returns promptly and cleanly */
    double t0 = s_now();
    run.stop = 1;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 3;
    assert_int_equal(pthread_timedjoin_np(run.th, NULL, &until), 0);
    double dt = s_now() - t0;
    printf("  SCP stopped in %.2f s\n", dt);
    assert_true(dt < 2.5);
    assert_int_equal(run.rc, 0);
    assert_int_not_equal(s_echoscu(port), 0); /* nobody listens any more */

    /* a port that cannot be bound */
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {
        .sin_family = AF_INET, .sin_port = htons(0), .sin_addr.s_addr = htonl(INADDR_ANY)};
    assert_int_equal(bind(ls, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(ls, 1), 0);
    socklen_t sl = sizeof sa;
    assert_int_equal(getsockname(ls, (struct sockaddr *)&sa, &sl), 0);
    scp_run_t busy;
    memset(&busy, 0, sizeof busy);
    busy.cfg = run.cfg;
    busy.cfg.port = ntohs(sa.sin_port);
    busy.cfg.stop = &busy.stop;
    assert_int_equal(kp_dicom_scp_run(&busy.cfg), KP_EIO);
    close(ls);

    /* bad configuration */
    busy.cfg.on_store = NULL;
    assert_int_equal(kp_dicom_scp_run(&busy.cfg), KP_EINVAL);
    pthread_mutex_destroy(&ctx.mu);
}

/* the stop also ends an association that is open but idle */
static void test_scp_stop_with_idle_association(void **state)
{
    (void)state;
    if (!s_have_data()) skip();
    static scp_ctx_t ctx;
    memset(&ctx, 0, sizeof ctx);
    pthread_mutex_init(&ctx.mu, NULL);
    char tmp_dir[512];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/incoming2", s_tmp);
    snprintf(ctx.store_dir, sizeof ctx.store_dir, "%s", tmp_dir);
    assert_int_equal(mkdir(tmp_dir, 0700), 0);
    static scp_run_t run;
    memset(&run, 0, sizeof run);
    const int port = 22000 + (int)(getpid() % 1000);
    run.cfg = (kp_dicom_scp_config_t){.ae_title = "KLINIKA",
                                      .port = port,
                                      .max_associations = 1,
                                      .acse_timeout = 5,
                                      .dimse_timeout = 30,
                                      .tmp_dir = tmp_dir,
                                      .on_store = s_on_store,
                                      .on_assoc = s_on_assoc,
                                      .user = &ctx,
                                      .stop = &run.stop};
    assert_int_equal(pthread_create(&run.th, NULL, s_scp_thread, &run), 0);
    int rc = -1;
    for (int i = 0; i < 50 && rc != 0; i++) {
        rc = s_echoscu(port);
        if (rc != 0) usleep(100 * 1000);
    }
    assert_int_equal(rc, 0);
    /* echoscu --repeat keeps one association busy; stopping the SCU process (SIGSTOP) then
     * leaves it open with a silent peer */
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "TCP_NODELAY=1 exec echoscu -q -aet TEST -aec KLINIKA --repeat 100000000 127.0.0.1 %d "
             ">/dev/null 2>&1",
             port);
    const int assoc_before = s_assoc_calls(&ctx);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    usleep(300 * 1000);
    kill(pid, SIGSTOP);
    usleep(200 * 1000);
    assert_int_equal(s_assoc_calls(&ctx), assoc_before + 1); /* the association is open */
    assert_int_not_equal(s_echoscu(port), 0);                /* max_associations = 1: rejected */
    assert_int_equal(s_assoc_calls(&ctx), assoc_before + 1);
    double t0 = s_now();
    run.stop = 1;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 4;
    int jr = pthread_timedjoin_np(run.th, NULL, &until);
    double dt = s_now() - t0;
    /* the SCU wakes up to a closed association and ends (with 1e8 echoes left to send) */
    kill(pid, SIGCONT);
    int st = 0, waited = 0;
    while (waitpid(pid, &st, WNOHANG) == 0 && waited++ < 40)
        usleep(50 * 1000);
    if (waited > 40) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
    }
    assert_int_equal(jr, 0);
    printf("  SCP with an idle association stopped in %.2f s\n", dt);
    assert_true(dt < 2.5);
    assert_int_equal(run.rc, 0);
    assert_true(waited <= 40);
    pthread_mutex_destroy(&ctx.mu);
}

static int s_group_setup(void **state)
{
    (void)state;
    kp_log_init("test_dicom");
    kp_log_set_level(getenv("KP_TEST_VERBOSE") ? "debug" : "error");
    snprintf(s_tmp, sizeof s_tmp, "/tmp/kp_test_dicom.XXXXXX");
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

/* ---- C-FIND through the shim: the C callback sees the identifier in UTF-8, its results go
 * back as Pending responses, its final status and Error Comment as the last response. */
typedef struct {
    pthread_mutex_t mu;
    int calls, model, nkeys, combined;
    char level[16], name[64], calling[20];
    unsigned status; /* what the callback returns */
    int nresults;
} find_ctx_t;

static unsigned s_on_find(void *user, const kp_dicom_find_req_t *req, kp_dicom_find_results_t *out)
{
    find_ctx_t *c = user;
    pthread_mutex_lock(&c->mu);
    c->calls++;
    c->model = req->model;
    c->combined = req->combined_datetime;
    c->nkeys = (int)req->nkeys;
    snprintf(c->level, sizeof c->level, "%s", req->level ? req->level : "(null)");
    snprintf(c->calling, sizeof c->calling, "%s", req->calling_ae);
    c->name[0] = 0;
    for (size_t i = 0; i < req->nkeys; i++)
        if (req->keys[i].tag == 0x00100010)
            snprintf(c->name, sizeof c->name, "%s", req->keys[i].value);
    for (int i = 0; i < c->nresults; i++) {
        char uid[64];
        snprintf(uid, sizeof uid, "1.2.3.%d", i + 1);
        assert_int_equal(kp_dicom_find_add_result(out), 0);
        assert_int_equal(kp_dicom_find_set(out, 0x0020000D, uid), 0);
        assert_int_equal(kp_dicom_find_set(out, 0x00100010, "Мюллер^Jürgen"), 0);
        assert_int_equal(kp_dicom_find_set(out, 0x00201208, "12"), 0); /* not requested: added */
        assert_int_equal(kp_dicom_find_set(out, 0x00080061, "CT\\MR"), 0);
    }
    assert_int_equal(kp_dicom_find_set(out, 0x7777FF01, "x"), KP_EINVAL); /* unknown tag */
    kp_dicom_find_set_comment(out, c->status ? "test comment" : NULL);
    unsigned st = c->status;
    pthread_mutex_unlock(&c->mu);
    return st;
}

static unsigned s_on_store_none(void *user, const kp_dicom_store_req_t *req)
{
    (void)user;
    unlink(req->tmp_path);
    return 0;
}

/* Runs findscu -X into dir; returns its output (malloc'd). */
static char *s_findscu(int port, const char *dir, const char *args)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "rm -f '%s'/rsp*; TCP_NODELAY=1 findscu -d -aet FINDER -aec KLINIKA -X -od '%s' %s "
             "127.0.0.1 %d 2>&1",
             dir, dir, args, port);
    return s_run(cmd, NULL, NULL);
}

static void test_scp_find(void **state)
{
    (void)state;
    if (!s_have_data() || system("command -v findscu >/dev/null 2>&1") != 0) skip();
    static find_ctx_t fc;
    memset(&fc, 0, sizeof fc);
    pthread_mutex_init(&fc.mu, NULL);
    char tmp_dir[512], out_dir[512];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/find-incoming", s_tmp);
    snprintf(out_dir, sizeof out_dir, "%s/find-rsp", s_tmp);
    assert_int_equal(mkdir(tmp_dir, 0700), 0);
    assert_int_equal(mkdir(out_dir, 0700), 0);
    static scp_run_t run;
    memset(&run, 0, sizeof run);
    const int port = 23000 + (int)(getpid() % 1000);
    run.cfg = (kp_dicom_scp_config_t){.ae_title = "KLINIKA",
                                      .port = port,
                                      .max_associations = 2,
                                      .acse_timeout = 5,
                                      .dimse_timeout = 10,
                                      .tmp_dir = tmp_dir,
                                      .on_store = s_on_store_none,
                                      .on_find = s_on_find,
                                      .user = &fc,
                                      .stop = &run.stop};
    assert_int_equal(pthread_create(&run.th, NULL, s_scp_thread, &run), 0);
    int rc = -1;
    for (int i = 0; i < 50 && rc != 0; i++) {
        rc = s_echoscu(port);
        if (rc != 0) usleep(100 * 1000);
    }
    assert_int_equal(rc, 0);

    /* Latin-1 identifier: converted to UTF-8 before the callback sees it */
    fc.nresults = 3;
    fc.status = 0;
    char *out =
        s_findscu(port, out_dir,
                  "-S -k QueryRetrieveLevel=STUDY -k 'SpecificCharacterSet=ISO_IR 100' "
                  "-k \"PatientName=$(printf 'M\\374ller*')\" -k StudyInstanceUID -k StudyDate");
    assert_int_equal(fc.calls, 1);
    assert_int_equal(fc.model, KP_DICOM_FIND_STUDY_ROOT);
    assert_string_equal(fc.level, "STUDY");
    assert_string_equal(fc.calling, "FINDER");
    assert_string_equal(fc.name, "M\xc3\xbcller*");
    assert_int_equal(fc.nkeys, 3); /* PatientName, StudyInstanceUID, StudyDate */
    assert_int_equal(fc.combined, 0);
    if (!strstr(out, "DIMSE Status                  : 0x0000")) fail_msg("%s", out);
    free(out);
    assert_int_equal(s_count_files(out_dir, "rsp"), 3);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "dcmdump -q '%s/rsp0002.dcm'", out_dir);
    out = s_run(cmd, NULL, NULL);
    if (!strstr(out, "(0008,0005) CS [ISO_IR 192]") || !strstr(out, "[1.2.3.2]") ||
        !strstr(out, "(0008,0052) CS [STUDY]") || !strstr(out, "(0008,0054) AE [KLINIKA]") ||
        !strstr(out, "\xd0\x9c\xd1\x8e\xd0\xbb\xd0\xbb\xd0\xb5\xd1\x80^J\xc3\xbcrgen") ||
        !strstr(out, "(0020,1208) IS [12]") || !strstr(out, "[CT\\MR]") ||
        !strstr(out, "(0008,0020) DA (no value available)"))
        fail_msg("unexpected response:\n%s", out);
    free(out);

    /* a failure after some matches: those are sent as Pending, then the failure + comment */
    fc.nresults = 2;
    fc.status = 0xA700;
    out = s_findscu(port, out_dir, "-P -k QueryRetrieveLevel=PATIENT -k PatientID");
    assert_int_equal(fc.model, KP_DICOM_FIND_PATIENT_ROOT);
    assert_string_equal(fc.level, "PATIENT");
    if (!strstr(out, "0xa700") || !strstr(out, "[test comment]")) fail_msg("%s", out);
    free(out);
    assert_int_equal(s_count_files(out_dir, "rsp"), 2);

    /* no QueryRetrieveLevel: the callback decides (level NULL) */
    fc.nresults = 0;
    fc.status = 0xA900;
    out = s_findscu(port, out_dir, "-S -k PatientName=X");
    assert_string_equal(fc.level, "(null)");
    if (!strstr(out, "0xa900")) fail_msg("%s", out);
    free(out);
    assert_int_equal(s_echoscu(port), 0);

    run.stop = 1;
    pthread_join(run.th, NULL);
    assert_int_equal(run.rc, 0);
    pthread_mutex_destroy(&fc.mu);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_get_values, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_charset, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bad_input, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_pixel_location, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_json_matches_dcm2json, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_json_bulk_paths, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_json_invalid_numbers, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_json_does_not_read_pixels, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_scp, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_scp_stop_with_idle_association, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_scp_find, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
