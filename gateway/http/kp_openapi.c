/* kp_openapi: the HTTP API as an OpenAPI 3.0 document, built from the route table itself (so
 * it can never list a route that does not exist or miss one), with a summary per route from
 * the table below (tests/integration/test_docs.py fails when a route has none). Served at
 * GET /api/openapi.json and printed by `pacs-gateway --openapi`. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kp_api.h"
#include "kp_auth.h"
#include "kp_errors.h"
#include "kp_routes.h"

static const struct {
    const char *method, *pattern, *summary;
} s_summary[] = {
    {"GET", "/dicom-web/studies", "QIDO-RS: search studies"},
    {"POST", "/dicom-web/studies", "STOW-RS: store instances (multipart/related)"},
    {"GET", "/dicom-web/series", "QIDO-RS: search series"},
    {"GET", "/dicom-web/instances", "QIDO-RS: search instances"},
    {"GET", "/dicom-web/studies/{study}", "WADO-RS: retrieve a study"},
    {"POST", "/dicom-web/studies/{study}", "STOW-RS: store instances into this study"},
    {"GET", "/dicom-web/studies/{study}/series", "QIDO-RS: the series of a study"},
    {"GET", "/dicom-web/studies/{study}/instances", "QIDO-RS: the instances of a study"},
    {"GET", "/dicom-web/studies/{study}/metadata", "WADO-RS: study metadata (DICOM JSON)"},
    {"GET", "/dicom-web/studies/{study}/rendered", "WADO-RS: rendered study (JPEG/PNG)"},
    {"GET", "/dicom-web/studies/{study}/thumbnail", "WADO-RS: study thumbnail"},
    {"GET", "/dicom-web/studies/{study}/series/{series}", "WADO-RS: retrieve a series"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances",
     "QIDO-RS: the instances of a series"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/metadata", "WADO-RS: series metadata"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/rendered", "WADO-RS: rendered series"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/thumbnail", "WADO-RS: series thumbnail"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}",
     "WADO-RS: retrieve an instance"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata",
     "WADO-RS: instance metadata"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/rendered",
     "WADO-RS: rendered instance"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/thumbnail",
     "WADO-RS: instance thumbnail"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
     "WADO-RS: frames (as stored, or transcoded per Accept)"},
    {"GET",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
     "WADO-RS: rendered frames"},
    {"GET",
     "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/thumbnail",
     "WADO-RS: frame thumbnail"},
    {"GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tagpath...}",
     "WADO-RS: bulk data of an attribute (BulkDataURI)"},
    {"GET", "/wado", "WADO-URI: an instance as DICOM, JPEG or PNG"},
    {"POST", "/api/auth/login", "Sign in (password, then TOTP code when enrolled)"},
    {"POST", "/api/auth/refresh", "New access token from the refresh token (rotated)"},
    {"POST", "/api/auth/logout", "Sign out: the session and its refresh tokens are revoked"},
    {"GET", "/api/auth/me", "The signed-in user, roles, sites and permissions"},
    {"PUT", "/api/auth/me", "Change one's own settings: {\"language\"}"},
    {"POST", "/api/auth/password", "Change one's own password"},
    {"POST", "/api/auth/mfa/setup", "Start TOTP enrolment (otpauth URI and QR code)"},
    {"POST", "/api/auth/mfa/confirm", "Confirm TOTP enrolment with a code; recovery codes"},
    {"POST", "/api/auth/mfa/disable", "Turn TOTP off (password and code required)"},
    {"GET", "/api/users", "List users"},
    {"POST", "/api/users", "Create a user"},
    {"GET", "/api/users/{name}", "One user"},
    {"PUT", "/api/users/{name}", "Change a user (roles, sites, disabled, ...)"},
    {"DELETE", "/api/users/{name}", "Delete a user"},
    {"POST", "/api/users/{name}/password", "Set a temporary password (changed at next sign-in)"},
    {"POST", "/api/users/{name}/unlock", "Unlock a locked account"},
    {"POST", "/api/users/{name}/reset-mfa", "Remove a user's TOTP enrolment"},
    {"GET", "/api/roles", "List roles"},
    {"POST", "/api/roles", "Create a custom role"},
    {"GET", "/api/roles/{name}", "One role with its permissions"},
    {"PUT", "/api/roles/{name}", "Change a role"},
    {"DELETE", "/api/roles/{name}", "Delete a custom role"},
    {"GET", "/api/permissions", "Every permission"},
    {"GET", "/api/sites", "List sites"},
    {"POST", "/api/sites", "Create a site"},
    {"GET", "/api/sites/{name}", "One site"},
    {"PUT", "/api/sites/{name}", "Change a site"},
    {"DELETE", "/api/sites/{name}", "Delete a site"},
    {"GET", "/api/modalities", "List the registered DICOM peers (modality registry)"},
    {"POST", "/api/modalities", "Register a DICOM peer"},
    {"GET", "/api/modalities/{ae}", "One registered peer"},
    {"PUT", "/api/modalities/{ae}", "Change a registered peer"},
    {"DELETE", "/api/modalities/{ae}", "Remove a registered peer"},
    {"POST", "/api/modalities/{ae}/echo", "C-ECHO to a registered peer"},
    {"GET", "/api/routes", "List the routing rules (secrets left out)"},
    {"POST", "/api/routes", "Create a routing rule"},
    {"GET", "/api/routes/{id}", "One routing rule"},
    {"PUT", "/api/routes/{id}", "Change a routing rule (members sent; secrets kept when left out)"},
    {"DELETE", "/api/routes/{id}", "Remove a routing rule and its deliveries"},
    {"GET", "/api/routes/deliveries", "List deliveries (filters: state, rule, study)"},
    {"POST", "/api/routes/deliveries/{id}/retry", "Retry a pending or dead delivery now"},
    {"POST", "/api/routes/deliveries/retry", "Retry every dead delivery (state=dead)"},
    {"GET", "/api/audit", "The audit trail, newest first, with filters"},
    {"GET", "/api/worklist", "Studies with their report status: filters, paging (site-scoped)"},
    {"GET", "/api/system/status", "Broker queues and workers, outbox jobs per type and state"},
    {"GET", "/api/studies/{study}/reports", "The reports of a study"},
    {"POST", "/api/studies/{study}/reports", "Start a report (a draft)"},
    {"GET", "/api/reports", "Reports by study or status (worklist)"},
    {"GET", "/api/reports/{id}", "A report with its current version and history"},
    {"PUT", "/api/reports/{id}", "Save the draft (lock_version; 409 on conflict)"},
    {"DELETE", "/api/reports/{id}", "Delete a report that is only a draft"},
    {"POST", "/api/reports/{id}/sign", "Sign the draft: it becomes final"},
    {"POST", "/api/reports/{id}/amend", "Amend a signed report: a new draft version"},
    {"GET", "/api/reports/{id}/versions/{n}", "One version of a report"},
    {"POST", "/api/reports/{id}/pdf", "Render a signed version to PDF (202, a job)"},
    {"GET", "/api/reports/{id}/pdf", "Download the PDF (202 while rendering)"},
    {"GET", "/api/report-pdfs/{pdf_id}", "State of a PDF rendering job"},
    {"GET", "/api/report-templates", "List report templates"},
    {"POST", "/api/report-templates", "Create a report template"},
    {"GET", "/api/report-templates/{id}", "One report template"},
    {"PUT", "/api/report-templates/{id}", "Change a report template"},
    {"DELETE", "/api/report-templates/{id}", "Delete a report template"},
    {"GET", "/api/openapi.json", "This document"},
    {"GET", "/healthz", "The gateway answers"},
    {"GET", "/readyz", "Database, schema, bus and storage usable (503 otherwise)"},
    {"GET", "/metrics", "Prometheus metrics (http.metrics_allow addresses only)"},
    {"GET", "/app/login", "The sign-in page"},
    {"GET", "/app/login.js", "The sign-in page's script"},
    {"GET", "/app", "The web application (worklist, reports, administration, account)"},
    {"GET", "/app/{file...}", "A file of the web application, or index.html for its routes"},
};

const char *kp_openapi_summary(const char *method, const char *pattern)
{
    for (size_t i = 0; i < sizeof s_summary / sizeof s_summary[0]; i++)
        if (!strcmp(s_summary[i].method, method) && !strcmp(s_summary[i].pattern, pattern))
            return s_summary[i].summary;
    return NULL;
}

/* "/a/{b}/c/{tagpath...}" -> "/a/{b}/c/{tagpath}" and the parameter names */
static char *s_path(const char *pattern, json_t *params)
{
    size_t n = strlen(pattern);
    char *out = malloc(n + 1);
    if (!out) abort();
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (pattern[i] == '{') {
            size_t e = i + 1;
            while (e < n && pattern[e] != '}')
                e++;
            size_t len = e - i - 1;
            if (len >= 3 && !strncmp(pattern + e - 3, "...", 3)) len -= 3;
            json_t *p = json_pack("{s:s%,s:s,s:b,s:{s:s}}", "name", pattern + i + 1, len, "in",
                                  "path", "required", 1, "schema", "type", "string");
            json_array_append_new(params, p);
            out[k++] = '{';
            memcpy(out + k, pattern + i + 1, len);
            k += len;
            out[k++] = '}';
            i = e;
        } else {
            out[k++] = pattern[i];
        }
    }
    out[k] = 0;
    return out;
}

static json_t *s_error_response(const char *what)
{
    return json_pack("{s:s,s:{s:{s:{s:s}}}}", "description", what, "content", "application/json",
                     "schema", "$ref", "#/components/schemas/Error");
}

static char *s_build(void)
{
    size_t n;
    const kp_route_t *r = kp_routes_table(&n);
    json_t *paths = json_object();
    for (size_t i = 0; i < n; i++) {
        json_t *params = json_array();
        char *path = s_path(r[i].pattern, params);
        json_t *item = json_object_get(paths, path);
        if (!item) {
            item = json_object();
            json_object_set_new(paths, path, item);
        }
        char method[16];
        size_t ml = strlen(r[i].method);
        for (size_t j = 0; j < ml && j < sizeof method - 1; j++)
            method[j] = (char)(r[i].method[j] | 0x20);
        method[ml < sizeof method - 1 ? ml : sizeof method - 1] = 0;
        const char *summary = kp_openapi_summary(r[i].method, r[i].pattern);
        bool pub = !strcmp(r[i].permission, KP_PERM_PUBLIC);
        json_t *responses =
            json_pack("{s:{s:s},s:o,s:o,s:o}", "200", "description", "success", "400",
                      s_error_response("bad request"), "404", s_error_response("not found"), "503",
                      s_error_response("database, storage or bus unavailable"));
        if (!pub) {
            json_object_set_new(responses, "401", s_error_response("not signed in"));
            json_object_set_new(responses, "403",
                                s_error_response("signed in without the permission"));
        }
        json_t *op = json_pack("{s:s,s:s,s:s,s:o,s:o}", "summary", summary ? summary : "",
                               "operationId", path, /* made unique below */ "x-permission",
                               r[i].permission, "parameters", params, "responses", responses);
        char opid[512];
        snprintf(opid, sizeof opid, "%s%s", method, path);
        for (char *c = opid; *c; c++)
            if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9')))
                *c = '_';
        json_object_set_new(op, "operationId", json_string(opid));
        json_object_set_new(op, "security",
                            pub ? json_array() : json_pack("[{s:[]},{s:[]}]", "bearer", "cookie"));
        json_object_set_new(item, method, op);
        free(path);
    }
    json_t *doc = json_pack(
        "{s:s,s:{s:s,s:s,s:s},s:[{s:s}],s:o,s:{s:{s:{s:s,s:s,s:s},s:{s:s,s:s,s:s}},s:{s:{s:s,s:{"
        "s:{s:s,s:{s:{s:s},s:{s:s},s:{s:s}}}}}}}}",
        "openapi", "3.0.3", "info", "title", "Klinika PACS HTTP API", "version", "1", "description",
        "DICOMweb (QIDO-RS, WADO-RS, STOW-RS, WADO-URI) and the REST API. Every route checks "
        "the permission in x-permission (public: none; authenticated: any signed-in user). "
        "Errors are JSON: {\"error\": {\"code\", \"message\", \"detail\"}}. See docs/dicomweb.md, "
        "docs/security.md and docs/reports.md.",
        "servers", "url", "/", "paths", paths, "components", "securitySchemes", "bearer", "type",
        "http", "scheme", "bearer", "bearerFormat", "JWT", "cookie", "type", "apiKey", "in",
        "cookie", "name", "__Host-kp_access", "schemas", "Error", "type", "object", "properties",
        "error", "type", "object", "properties", "code", "type", "string", "message", "type",
        "string", "detail", "type", "string");
    if (!doc) abort();
    char *s = json_dumps(doc, JSON_INDENT(1) | JSON_SORT_KEYS);
    json_decref(doc);
    if (!s) abort();
    return s;
}

static pthread_once_t s_once = PTHREAD_ONCE_INIT;
static char *s_doc;

static void s_init(void)
{
    s_doc = s_build();
}

const char *kp_openapi_json(void)
{
    pthread_once(&s_once, s_init);
    return s_doc;
}

void kp_openapi_free(void)
{
    free(s_doc);
    s_doc = NULL;
}

int kp_api_openapi(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)env;
    (void)req;
    const char *d = kp_openapi_json();
    resp->status = 200;
    resp->content_type = "application/json";
    resp->compressible = true;
    kp_http_seg_str(resp, d);
    return 0;
}
