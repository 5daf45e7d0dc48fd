/* Unit tests of kp_storage: path derivation, path validation, durable writes, walking. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_storage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char s_root[64];

static int s_setup(void **state)
{
    (void)state;
    snprintf(s_root, sizeof s_root, "/tmp/kp-test-storage-XXXXXX");
    return mkdtemp(s_root) ? 0 : -1;
}

static int s_teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", s_root);
    return system(cmd);
}

static void test_relpath(void **state)
{
    (void)state;
    char a[KP_STORAGE_RELPATH_MAX], b[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath("1.2.3.4", a);
    kp_storage_relpath("1.2.3.4", b);
    assert_string_equal(a, b);
    assert_int_equal(strlen(a), 74);
    assert_true(kp_storage_relpath_valid(a));
    /* echo -n 1.2.3.4 | sha256sum */
    assert_string_equal(
        a, "66/94/6694f83c9f476da31f5df6bcc520034e7e57d421d247b9d34f49edbfc84a764c.dcm");
    kp_storage_relpath("1.2.3.5", b);
    assert_string_not_equal(a, b);
    /* user-supplied text with traversal never yields anything but the hash shape */
    kp_storage_relpath("../../etc/passwd", b);
    assert_true(kp_storage_relpath_valid(b));
    assert_null(strstr(b, ".."));
}

static void test_relpath_valid_rejects(void **state)
{
    (void)state;
    char a[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath("1.2.840.1", a);
    char bad[KP_STORAGE_RELPATH_MAX + 8];
    assert_false(kp_storage_relpath_valid(NULL));
    assert_false(kp_storage_relpath_valid(""));
    assert_false(kp_storage_relpath_valid("../etc/passwd"));
    snprintf(bad, sizeof bad, "%s", a);
    bad[0] = bad[0] == 'a' ? 'b' : 'a'; /* directory no longer matches the name */
    assert_false(kp_storage_relpath_valid(bad));
    snprintf(bad, sizeof bad, "%s", a);
    bad[10] = '/';
    assert_false(kp_storage_relpath_valid(bad));
    snprintf(bad, sizeof bad, "%s", a);
    bad[20] = 'A'; /* upper case is not what we write */
    assert_false(kp_storage_relpath_valid(bad));
    snprintf(bad, sizeof bad, "%s.x", a);
    assert_false(kp_storage_relpath_valid(bad));
}

static void test_write_and_read_back(void **state)
{
    (void)state;
    kp_storage_t *st = kp_storage_new(s_root, true);
    assert_non_null(st);
    char rel[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath("1.2.3", rel);
    assert_int_equal(kp_storage_write(st, rel, "abc", 3), 0);
    char *abs = kp_storage_abspath(st, rel);
    char hex[65];
    int64_t size = 0;
    assert_int_equal(kp_storage_sha256_file(abs, hex, &size), 0);
    assert_int_equal(size, 3);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    /* overwrite is atomic replace */
    assert_int_equal(kp_storage_write(st, rel, "abcd", 4), 0);
    assert_int_equal(kp_storage_sha256_file(abs, hex, &size), 0);
    assert_int_equal(size, 4);
    free(abs);
    assert_int_equal(kp_storage_write(st, "../evil", "x", 1), KP_EINVAL);
    /* nothing left in the temp dir */
    assert_int_equal(kp_storage_clean_tmp(st, 0), 0);
    kp_storage_destroy(&st);
    assert_null(st);
}

static int s_count(void *user, const char *rel)
{
    (void)rel;
    (*(int *)user)++;
    return 0;
}

static void test_commit_walk_clean(void **state)
{
    (void)state;
    kp_storage_t *st = kp_storage_new(s_root, false);
    assert_non_null(st);
    for (int i = 0; i < 10; i++) {
        char *tmp = NULL;
        int fd = kp_storage_tmpfile(st, &tmp);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, "x", 1), 1);
        close(fd);
        char uid[32], rel[KP_STORAGE_RELPATH_MAX];
        snprintf(uid, sizeof uid, "1.2.9.%d", i);
        kp_storage_relpath(uid, rel);
        assert_int_equal(kp_storage_commit(st, tmp, rel, true), 0);
        assert_int_equal(kp_storage_sync_dir(st, rel), 0);
        free(tmp);
    }
    int n = 0;
    assert_int_equal(kp_storage_walk(st, s_count, &n), 0);
    assert_true(n >= 10);
    /* a stray file of another shape is not walked */
    char stray[128];
    snprintf(stray, sizeof stray, "%s/ab/notes.txt", s_root);
    mkdir(s_root, 0700);
    char d[128];
    snprintf(d, sizeof d, "%s/ab", s_root);
    mkdir(d, 0700);
    FILE *f = fopen(stray, "w");
    fputs("x", f);
    fclose(f);
    int m = 0;
    kp_storage_walk(st, s_count, &m);
    assert_int_equal(m, n);
    /* stale temp files are removed */
    char *tmp = NULL;
    int fd = kp_storage_tmpfile(st, &tmp);
    close(fd);
    free(tmp);
    assert_int_equal(kp_storage_clean_tmp(st, 3600), 0);
    assert_int_equal(kp_storage_clean_tmp(st, 0), 1);
    kp_storage_destroy(&st);
}

static void test_same_content(void **state)
{
    (void)state;
    char a[128], b[128], c[128];
    snprintf(a, sizeof a, "%s/a", s_root);
    snprintf(b, sizeof b, "%s/b", s_root);
    snprintf(c, sizeof c, "%s/c", s_root);
    FILE *f = fopen(a, "w");
    for (int i = 0; i < 100000; i++)
        fputc(i & 0xff, f);
    fclose(f);
    f = fopen(b, "w");
    for (int i = 0; i < 100000; i++)
        fputc(i & 0xff, f);
    fclose(f);
    f = fopen(c, "w");
    for (int i = 0; i < 100000; i++)
        fputc(i == 99999 ? 7 : i & 0xff, f);
    fclose(f);
    assert_int_equal(kp_storage_same_content(a, b), 1);
    assert_int_equal(kp_storage_same_content(a, c), 0);
    f = fopen(c, "w");
    fputs("short", f);
    fclose(f);
    assert_int_equal(kp_storage_same_content(a, c), 0);
    assert_int_equal(kp_storage_same_content(c, a), 0);
    assert_int_equal(kp_storage_same_content(a, "/nonexistent"), KP_EIO);
}

/* The original's note: written next to the instance's file, read back, never walked as an
 * instance, refused when it is not a note, removed (twice is fine). */
static void test_original_note(void **state)
{
    (void)state;
    kp_storage_t *st = kp_storage_new(s_root, true);
    assert_non_null(st);
    const char *uid = "1.2.9.77";
    char rel[KP_STORAGE_RELPATH_MAX], note[KP_STORAGE_RELPATH_MAX];
    kp_storage_relpath(uid, rel);
    kp_storage_original_relpath(uid, note);
    assert_int_equal(strlen(note), 75);
    assert_memory_equal(note, rel, 70);
    assert_string_equal(note + 70, ".orig");
    assert_false(kp_storage_relpath_valid(note));

    int64_t size = 0;
    char sha[65];
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), 0); /* none yet */
    const char *data = "original bytes";
    assert_int_equal(kp_storage_write(st, rel, data, strlen(data)), 0);
    char abs[256], digest[65];
    snprintf(abs, sizeof abs, "%s/%s", s_root, rel);
    int64_t n = 0;
    assert_int_equal(kp_storage_sha256_file(abs, digest, &n), 0);
    assert_int_equal(kp_storage_original_write(st, uid, n, digest), 0);
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), 1);
    assert_int_equal(size, (int64_t)strlen(data));
    assert_string_equal(sha, digest);
    assert_int_equal(kp_storage_file_is(abs, size, sha), 1);
    assert_int_equal(kp_storage_file_is(abs, size + 1, sha), 0);
    char other[65];
    memcpy(other, sha, 65);
    other[0] = other[0] == '0' ? '1' : '0';
    assert_int_equal(kp_storage_file_is(abs, size, other), 0);
    assert_int_equal(kp_storage_file_is("/nonexistent", size, sha), KP_EIO);
    assert_int_equal(kp_storage_original_write(st, uid, 1, "not a digest"), KP_EINVAL);

    /* reindex walks instances only */
    int count = 0;
    assert_int_equal(kp_storage_walk(st, s_count, &count), 0);
    unlink(abs);
    int count2 = 0;
    assert_int_equal(kp_storage_walk(st, s_count, &count2), 0);
    assert_int_equal(count2, count - 1); /* the note stayed and was not counted */
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), 1);

    /* anything else at that name is not believed */
    char path[256];
    snprintf(path, sizeof path, "%s/%s", s_root, note);
    FILE *f = fopen(path, "w");
    fputs("klinika-original 1 12 xyz\n", f);
    fclose(f);
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), KP_EIO);
    f = fopen(path, "w");
    fclose(f);
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), KP_EIO);

    assert_int_equal(kp_storage_original_remove(st, uid), 0);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(kp_storage_original_remove(st, uid), 0);
    assert_int_equal(kp_storage_original_read(st, uid, &size, sha), 0);
    kp_storage_destroy(&st);
}

static void test_unwritable_root(void **state)
{
    (void)state;
    /* A root below a regular file cannot be created, whoever we are. */
    char file[128], root[160];
    snprintf(file, sizeof file, "%s/plainfile", s_root);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    snprintf(root, sizeof root, "%s/store", file);
    assert_null(kp_storage_new(root, true));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_relpath),
        cmocka_unit_test(test_relpath_valid_rejects),
        cmocka_unit_test(test_write_and_read_back),
        cmocka_unit_test(test_commit_walk_clean),
        cmocka_unit_test(test_same_content),
        cmocka_unit_test(test_original_note),
        cmocka_unit_test(test_unwritable_root),
    };
    return cmocka_run_group_tests(tests, s_setup, s_teardown);
}
