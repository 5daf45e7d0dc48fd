/* Unit tests of the gateway's metrics: the /metrics address allow-list and the text written
 * for requests (counters per route/method/status, cumulative histogram buckets). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kp_metrics.h"

static void test_allow_list(void **state)
{
    (void)state;
    const char *def = "127.0.0.1, ::1";
    assert_true(kp_metrics_addr_allowed(def, "127.0.0.1"));
    assert_true(kp_metrics_addr_allowed(def, "::1"));
    assert_true(kp_metrics_addr_allowed(def, "::ffff:127.0.0.1")); /* mapped IPv4 */
    assert_false(kp_metrics_addr_allowed(def, "127.0.0.2"));
    assert_false(kp_metrics_addr_allowed(def, "10.1.2.3"));
    assert_true(kp_metrics_addr_allowed("10.0.0.0/8", "10.200.3.4"));
    assert_false(kp_metrics_addr_allowed("10.0.0.0/8", "11.0.0.1"));
    assert_true(kp_metrics_addr_allowed("192.168.4.0/22", "192.168.7.255"));
    assert_false(kp_metrics_addr_allowed("192.168.4.0/22", "192.168.8.0"));
    assert_true(kp_metrics_addr_allowed("fd00::/8", "fd12:3456::1"));
    assert_false(kp_metrics_addr_allowed("fd00::/8", "fe80::1"));
    assert_true(kp_metrics_addr_allowed("0.0.0.0/0", "8.8.8.8"));
    assert_true(kp_metrics_addr_allowed("*", "2001:db8::7"));
    /* garbage never allows, and never crashes */
    assert_false(kp_metrics_addr_allowed("", "127.0.0.1"));
    assert_false(kp_metrics_addr_allowed("10.0.0.0/33, 1.2.3", "10.0.0.1"));
    assert_false(kp_metrics_addr_allowed("localhost", "127.0.0.1"));
    assert_false(kp_metrics_addr_allowed(def, "not-an-address"));
    assert_false(kp_metrics_addr_allowed(def, ""));
    assert_false(kp_metrics_addr_allowed(NULL, "127.0.0.1"));
    assert_false(kp_metrics_addr_allowed(def, NULL));
}

static char *s_text(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    kp_metrics_write(f);
    fclose(f);
    return buf;
}

static void test_http_series_and_histogram(void **state)
{
    (void)state;
    const char *route = "/dicom-web/studies/{study}/metadata";
    kp_metrics_http(route, "GET", 200, 0.0004);
    kp_metrics_http(route, "GET", 200, 0.03);
    kp_metrics_http(route, "GET", 404, 7.0);
    kp_metrics_http(route, "GET", 200, 60.0); /* beyond the last bucket: +Inf only */
    kp_metrics_http(NULL, "BREW", 405, 0.001);
    kp_metrics_add(KP_MET_LOGIN_FAILURES, 3);
    kp_metrics_set(KP_MET_DB_WORKERS, 4);
    char *t = s_text();
    assert_non_null(strstr(t, "klinika_http_requests_total{route=\"/dicom-web/studies/{study}/"
                              "metadata\",method=\"GET\",status=\"200\"} 3\n"));
    assert_non_null(strstr(t, "klinika_http_requests_total{route=\"/dicom-web/studies/{study}/"
                              "metadata\",method=\"GET\",status=\"404\"} 1\n"));
    assert_non_null(strstr(
        t, "klinika_http_requests_total{route=\"unrouted\",method=\"BREW\",status=\"405\"}"));
    /* cumulative: 1 at 1 ms, 2 at 50 ms, 3 at 10 s, 4 at +Inf */
    const char *p = "klinika_http_request_duration_seconds_bucket{route=\"/dicom-web/studies/"
                    "{study}/metadata\",le=";
    char want[256];
    snprintf(want, sizeof want, "%s\"0.001\"} 1\n", p);
    assert_non_null(strstr(t, want));
    snprintf(want, sizeof want, "%s\"0.05\"} 2\n", p);
    assert_non_null(strstr(t, want));
    snprintf(want, sizeof want, "%s\"10\"} 3\n", p);
    assert_non_null(strstr(t, want));
    snprintf(want, sizeof want, "%s\"+Inf\"} 4\n", p);
    assert_non_null(strstr(t, want));
    assert_non_null(strstr(t, "klinika_http_request_duration_seconds_count{route=\"/dicom-web/"
                              "studies/{study}/metadata\"} 4\n"));
    assert_non_null(strstr(t, "# TYPE klinika_auth_login_failures_total counter\n"
                              "klinika_auth_login_failures_total 3\n"));
    assert_non_null(strstr(t, "klinika_http_db_workers 4\n"));
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_allow_list),
                                       cmocka_unit_test(test_http_series_and_histogram)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
