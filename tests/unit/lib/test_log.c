/* Unit tests of kp_log's line formats: text lines cannot be forged by control characters, and
 * json lines are valid JSON (jansson parses them back) whatever the message holds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kp_log.h"

/* Runs fn with stderr redirected to a temporary file; returns what was written (malloc'd). */
static char *s_capture(void (*fn)(void))
{
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    int saved = dup(STDERR_FILENO);
    dup2(fileno(tmp), STDERR_FILENO);
    fn();
    dup2(saved, STDERR_FILENO);
    close(saved);
    long n = (long)lseek(fileno(tmp), 0, SEEK_END);
    char *buf = calloc(1, (size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(pread(fileno(tmp), buf, (size_t)n, 0), n);
    fclose(tmp);
    return buf;
}

static void s_lines(void)
{
    kp_log_write(KP_LOG_WARN, "store", "1.2.3", "name \"%s\"\nforged line\\ %s", "Иванов^Пётр",
                 "\xff\xfe bad utf-8 \x01");
    kp_log_write(KP_LOG_INFO, NULL, NULL, "plain");
}

static void test_text(void **state)
{
    (void)state;
    kp_log_init("test-log");
    assert_int_equal(kp_log_set_format("text"), 0);
    char *out = s_capture(s_lines);
    char *nl = strchr(out, '\n');
    assert_non_null(nl);
    assert_non_null(strstr(out, "test-log["));
    assert_non_null(strstr(out, " WARN store: name \"Иванов^Пётр\" forged line\\ "));
    assert_non_null(strstr(out, " [1.2.3]\n"));
    assert_non_null(strstr(nl + 1, " INFO -: plain\n")); /* exactly two lines */
    assert_null(strchr(strchr(nl + 1, '\n') + 1, '\n'));
    free(out);
}

static void test_json(void **state)
{
    (void)state;
    kp_log_init("test-log");
    assert_int_equal(kp_log_set_format("JSON"), 0);
    char *out = s_capture(s_lines);
    kp_log_set_format("text");
    char *second = strchr(out, '\n');
    assert_non_null(second);
    *second++ = 0;
    json_error_t err;
    json_t *a = json_loads(out, 0, &err);
    assert_non_null(a);
    assert_string_equal(json_string_value(json_object_get(a, "process")), "test-log");
    assert_string_equal(json_string_value(json_object_get(a, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(a, "cat")), "store");
    assert_string_equal(json_string_value(json_object_get(a, "ctx")), "1.2.3");
    const char *msg = json_string_value(json_object_get(a, "msg"));
    assert_non_null(msg);
    assert_non_null(
        strstr(msg, "name \"Иванов^Пётр\"\nforged line\\ \xef\xbf\xbd\xef\xbf\xbd bad"));
    assert_non_null(strstr(msg, "utf-8 \x01"));
    assert_true(json_integer_value(json_object_get(a, "pid")) > 0);
    assert_int_equal(strlen(json_string_value(json_object_get(a, "ts"))), 24);
    json_decref(a);
    json_t *b = json_loads(second, JSON_DISABLE_EOF_CHECK, &err);
    assert_non_null(b);
    assert_string_equal(json_string_value(json_object_get(b, "msg")), "plain");
    assert_null(json_object_get(b, "ctx"));
    json_decref(b);
    free(out);
    assert_int_equal(kp_log_set_format("xml"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_text), cmocka_unit_test(test_json)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
