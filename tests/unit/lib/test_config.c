/* Unit tests of kp_config: defaults, validation, file and environment, example drift. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_config.h"
#include "kp_errors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_defaults(void **state)
{
    (void)state;
    kp_config_t *c = kp_config_new();
    assert_non_null(c);
    assert_string_equal(c->dicom_ae_title, "KLINIKA");
    assert_int_equal(c->dicom_port, 11112);
    assert_true(c->storage_fsync);
    assert_string_equal(c->storage_duplicate_policy, "replace");
    kp_config_destroy(&c);
    assert_null(c);
    kp_config_destroy(&c); /* idempotent */
}

static void test_set_validates(void **state)
{
    (void)state;
    char err[256];
    kp_config_t *c = kp_config_new();
    assert_int_equal(kp_config_set(c, "dicom.port", "104", err, sizeof err), 0);
    assert_int_equal(c->dicom_port, 104);
    assert_int_equal(kp_config_set(c, "dicom.port", "70000", err, sizeof err), KP_ECONFIG);
    assert_non_null(strstr(err, "outside"));
    assert_int_equal(kp_config_set(c, "dicom.port", "12ab", err, sizeof err), KP_ECONFIG);
    assert_int_equal(kp_config_set(c, "dicom.port", "", err, sizeof err), KP_ECONFIG);
    assert_int_equal(c->dicom_port, 104);
    assert_int_equal(kp_config_set(c, "storage.fsync", "off", err, sizeof err), 0);
    assert_false(c->storage_fsync);
    assert_int_equal(kp_config_set(c, "storage.fsync", "maybe", err, sizeof err), KP_ECONFIG);
    assert_int_equal(kp_config_set(c, "storage.duplicate_policy", "keep", err, sizeof err), 0);
    assert_int_equal(kp_config_set(c, "storage.duplicate_policy", "merge", err, sizeof err),
                     KP_ECONFIG);
    assert_int_equal(kp_config_set(c, "nosuch.key", "1", err, sizeof err), KP_ECONFIG);
    assert_int_equal(kp_config_set(c, "nodot", "1", err, sizeof err), KP_ECONFIG);
    kp_config_destroy(&c);
}

static void test_file_and_env(void **state)
{
    (void)state;
    char path[] = "/tmp/kp-test-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "# comment\n[dicom]\nae_title = TESTAE\nport = 2000\n[log]\nlevel = warn\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    setenv("KP_DICOM_PORT", "3000", 1);
    char err[256] = "";
    kp_config_t *c = kp_config_new();
    assert_int_equal(kp_config_load(c, path, err, sizeof err), 0);
    assert_string_equal(c->dicom_ae_title, "TESTAE");
    assert_int_equal(c->dicom_port, 3000); /* environment wins over the file */
    kp_config_destroy(&c);

    setenv("KP_DICOM_PORT", "0", 1);
    c = kp_config_new();
    assert_int_equal(kp_config_load(c, path, err, sizeof err), KP_ECONFIG);
    assert_non_null(strstr(err, "KP_DICOM_PORT"));
    kp_config_destroy(&c);
    unsetenv("KP_DICOM_PORT");

    FILE *f = fopen(path, "w");
    fputs("[dicom]\nae_titel = TYPO\n", f);
    fclose(f);
    c = kp_config_new();
    assert_int_equal(kp_config_load(c, path, err, sizeof err), KP_ECONFIG);
    assert_non_null(strstr(err, "ae_titel"));
    kp_config_destroy(&c);

    c = kp_config_new();
    assert_int_equal(kp_config_load(c, "/nonexistent/pacs.conf", err, sizeof err), KP_ECONFIG);
    kp_config_destroy(&c);
    unlink(path);
}

static void test_example_documents_every_key(void **state)
{
    (void)state;
    char err[512] = "";
    int rc = kp_config_check_example("config/pacs.conf.example", err, sizeof err);
    if (rc) fprintf(stderr, "config/pacs.conf.example drifted: %s\n", err);
    assert_int_equal(rc, 0);

    /* The checker itself must notice drift. */
    char path[] = "/tmp/kp-test-example-XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fdopen(fd, "w");
    kp_config_write_example(f);
    fputs("[dicom]\n#no_such_key = 1\n", f);
    fclose(f);
    assert_int_equal(kp_config_check_example(path, err, sizeof err), KP_ECONFIG);
    f = fopen(path, "w");
    fputs("[dicom]\n#port = 104\n", f);
    fclose(f);
    assert_int_equal(kp_config_check_example(path, err, sizeof err), KP_ECONFIG);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_set_validates),
        cmocka_unit_test(test_file_and_env),
        cmocka_unit_test(test_example_documents_every_key),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
