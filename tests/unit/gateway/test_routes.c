/* Unit tests of the route table: matching, {uid} validation, 404 versus 405, JSON errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_http.h"
#include "kp_routes.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

static kp_route_result_t s_match(const char *method, const char *path, kp_http_req_t *req,
                                 char *allow)
{
    memset(req, 0, sizeof *req);
    return kp_routes_match(method, path, strlen(path), req, allow, 64);
}

static void test_matching(void **state)
{
    (void)state;
    kp_http_req_t r;
    char allow[64];
    assert_int_equal(s_match("GET", "/dicom-web/studies", &r, allow), KP_ROUTE_OK);
    assert_int_equal(r.nparams, 0);
    assert_string_equal(r.route->permission, "study.read");
    assert_int_equal(
        s_match("GET", "/dicom-web/studies/1.2.3/series/4.5/instances/6.7/metadata", &r, allow),
        KP_ROUTE_OK);
    assert_int_equal(r.nparams, 3);
    assert_string_equal(r.params[0], "1.2.3");
    assert_string_equal(r.params[1], "4.5");
    assert_string_equal(r.params[2], "6.7");
    assert_int_equal(s_match("GET", "/dicom-web/studies/1.2.3/series", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->pattern, "/dicom-web/studies/{study}/series");
    assert_int_equal(s_match("POST", "/dicom-web/studies/1.2.3", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->permission, "study.upload");
    assert_int_equal(s_match("GET", "/dicom-web/studies/1.2.3", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->permission, "study.download");
    assert_int_equal(
        s_match("GET",
                "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulkdata/00540016/0/00181072",
                &r, allow),
        KP_ROUTE_OK);
    assert_int_equal(r.nparams, 3);
    assert_string_equal(r.rest, "00540016/0/00181072");
    assert_int_equal(
        s_match("GET", "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulkdata/7fe00010", &r,
                allow),
        KP_ROUTE_OK);
    assert_string_equal(r.rest, "7fe00010");
    assert_int_equal(
        s_match("GET", "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/2/rendered", &r,
                allow),
        KP_ROUTE_OK);
    assert_string_equal(r.params[3], "2");
    assert_int_equal(s_match("GET", "/wado", &r, allow), KP_ROUTE_OK);
}

static void test_not_found_bad_method_bad_uid(void **state)
{
    (void)state;
    kp_http_req_t r;
    char allow[64];
    assert_int_equal(s_match("GET", "/", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/dicom-web/studies/", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/dicom-web/studiesX", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/dicom-web/studies/1.2//series", &r, allow),
                     KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/dicom-web/studies/1.2/series/extra/more/x", &r, allow),
                     KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("DELETE", "/dicom-web/studies", &r, allow), KP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET, POST");
    assert_int_equal(s_match("PUT", "/dicom-web/studies/1.2/series/3.4/metadata", &r, allow),
                     KP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET");
    /* bulk data paths: tags (8 hex digits) with item numbers between them, ending on a tag */
    const char *bad_bulk[] = {"7FE0001", "7FE00010/", "00540016/0", "00540016/x/00181072",
                              "00540016/0/0018107Z", "00540016//00181072", "../../etc"};
    for (size_t i = 0; i < sizeof bad_bulk / sizeof bad_bulk[0]; i++) {
        char p[256];
        snprintf(p, sizeof p, "/dicom-web/studies/1.2/series/3.4/instances/5.6/bulkdata/%s",
                 bad_bulk[i]);
        assert_int_equal(s_match("GET", p, &r, allow), KP_ROUTE_NOT_FOUND);
    }
    assert_int_equal(s_match("GET", "/dicom-web/studies/1.2.x/series", &r, allow),
                     KP_ROUTE_BAD_UID);
    assert_int_equal(s_match("GET", "/dicom-web/studies/../metadata", &r, allow), KP_ROUTE_BAD_UID);
    char longp[128] = "/dicom-web/studies/";
    memset(longp + strlen(longp), '1', 65);
    strcat(longp, "/metadata");
    assert_int_equal(s_match("GET", longp, &r, allow), KP_ROUTE_BAD_UID);
}

/* {name}: user, role and site names of the admin API */
static void test_name_placeholder(void **state)
{
    (void)state;
    kp_http_req_t r;
    char allow[64];
    const char *good[] = {"admin", "Dr.House", "jane.doe@example.org", "a", "x_y-z.1",
                          "0abc", "default"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, "/api/users/%s", good[i]);
        assert_int_equal(s_match("GET", p, &r, allow), KP_ROUTE_OK);
        assert_int_equal(r.nparams, 1);
        assert_string_equal(r.params[0], good[i]);
        assert_string_equal(r.route->permission, "user.manage");
        snprintf(p, sizeof p, "/api/users/%s/password", good[i]);
        assert_int_equal(s_match("POST", p, &r, allow), KP_ROUTE_OK);
        assert_string_equal(r.params[0], good[i]);
        assert_string_equal(r.route->pattern, "/api/users/{name}/password");
    }
    char max[80] = "/api/roles/";
    memset(max + strlen(max), 'r', 64);
    assert_int_equal(s_match("DELETE", max, &r, allow), KP_ROUTE_OK);
    assert_int_equal(strlen(r.params[0]), 64);
    assert_string_equal(r.route->permission, "role.manage");
    strcat(max, "r"); /* 65 characters */
    assert_int_equal(s_match("DELETE", max, &r, allow), KP_ROUTE_NOT_FOUND);
    /* not names: no match at all (404), never a handler with a bad parameter */
    const char *bad[] = {"..", ".", ".hidden", "-rf", "_x", "@x", "a b", "a%2Fb", "a\\b",
                         "a\"b", "a'b", "caf\xc3\xa9", "a;b", "a*", "%2e%2e", "a\x01"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, "/api/sites/%s", bad[i]);
        assert_int_equal(s_match("GET", p, &r, allow), KP_ROUTE_NOT_FOUND);
        snprintf(p, sizeof p, "/api/users/%s/unlock", bad[i]);
        assert_int_equal(s_match("POST", p, &r, allow), KP_ROUTE_NOT_FOUND);
    }
    assert_int_equal(s_match("GET", "/api/users/../roles", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/api/users/a/../../etc", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/api/users/", &r, allow), KP_ROUTE_NOT_FOUND);
    assert_int_equal(s_match("GET", "/api/users//password", &r, allow), KP_ROUTE_NOT_FOUND);
    /* methods: 405 with the allowed ones; the collections */
    assert_int_equal(s_match("PATCH", "/api/users/bob", &r, allow), KP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET, PUT, DELETE");
    assert_int_equal(s_match("GET", "/api/users/bob/reset-mfa", &r, allow), KP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "POST");
    assert_int_equal(s_match("POST", "/api/sites", &r, allow), KP_ROUTE_OK);
    assert_int_equal(r.nparams, 0);
    assert_string_equal(r.route->permission, "site.manage");
    assert_int_equal(s_match("GET", "/api/permissions", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->permission, "role.manage");
    /* a UID placeholder still refuses names */
    assert_int_equal(s_match("GET", "/dicom-web/studies/admin/metadata", &r, allow),
                     KP_ROUTE_BAD_UID);
}

/* {id}, {n}, {pdf_id}: row ids and version numbers of the reports API */
static void test_number_placeholder(void **state)
{
    (void)state;
    kp_http_req_t r;
    char allow[64];
    assert_int_equal(s_match("GET", "/api/reports/42", &r, allow), KP_ROUTE_OK);
    assert_int_equal(r.nparams, 1);
    assert_string_equal(r.params[0], "42");
    assert_string_equal(r.route->permission, "report.read");
    assert_int_equal(s_match("GET", "/api/reports/7/versions/12", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.params[0], "7");
    assert_string_equal(r.params[1], "12");
    assert_int_equal(s_match("POST", "/api/reports/7/sign", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->permission, "report.sign");
    assert_int_equal(s_match("GET", "/api/report-pdfs/123456789012345678", &r, allow), KP_ROUTE_OK);
    assert_int_equal(s_match("GET", "/api/studies/1.2.3/reports", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.params[0], "1.2.3");
    assert_int_equal(s_match("PUT", "/api/report-templates/3", &r, allow), KP_ROUTE_OK);
    assert_string_equal(r.route->permission, "system.configure");
    const char *bad[] = {"0", "012", "-1", "1.5", "abc", "1a", "1234567890123456789", "..", "%31"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, "/api/reports/%s", bad[i]);
        assert_int_equal(s_match("GET", p, &r, allow), KP_ROUTE_NOT_FOUND);
        snprintf(p, sizeof p, "/api/reports/1/versions/%s", bad[i]);
        assert_int_equal(s_match("GET", p, &r, allow), KP_ROUTE_NOT_FOUND);
    }
    assert_int_equal(s_match("PATCH", "/api/reports/1", &r, allow), KP_ROUTE_BAD_METHOD);
    assert_string_equal(allow, "GET, PUT, DELETE");
}

static void test_error_body(void **state)
{
    (void)state;
    kp_http_resp_t resp = {0};
    kp_http_error(&resp, KP_ENOTFOUND, 0, "no such study", "1.2.3 \"quoted\"");
    assert_int_equal(resp.status, 404);
    assert_string_equal(resp.content_type, "application/json");
    json_error_t je;
    json_t *j = json_loadb(resp.body, resp.len, 0, &je);
    assert_non_null(j);
    json_t *e = json_object_get(j, "error");
    assert_string_equal(json_string_value(json_object_get(e, "code")), "not_found");
    assert_string_equal(json_string_value(json_object_get(e, "message")), "no such study");
    assert_string_equal(json_string_value(json_object_get(e, "detail")), "1.2.3 \"quoted\"");
    json_decref(j);
    kp_http_error(&resp, KP_EMETHOD, 0, NULL, "\xff\xfe"); /* status from the catalogue */
    assert_int_equal(resp.status, 405);
    assert_non_null(strstr(resp.body, "\"method_not_allowed\""));
    assert_non_null(strstr(resp.body, "not valid UTF-8"));
    kp_http_error(&resp, KP_EHEADERS, 0, NULL, NULL);
    assert_int_equal(resp.status, 431);
    assert_non_null(strstr(resp.body, "\"headers_too_large\""));
    kp_http_resp_clear(&resp);
    assert_null(resp.body);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matching),
        cmocka_unit_test(test_not_found_bad_method_bad_uid),
        cmocka_unit_test(test_name_placeholder),
        cmocka_unit_test(test_number_placeholder),
        cmocka_unit_test(test_error_body),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
