/* kp_api: handlers of the REST API under /api (database worker threads; see kp_http.h). */
#ifndef KP_API_H
#define KP_API_H

#include "kp_http.h"

/* kp_api_auth.c: login, refresh, logout, me, password */
int kp_api_login(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_refresh(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_logout(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_me(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
/* PUT /api/auth/me {"language"}: the signed-in user's own settings; answers like GET. */
int kp_api_me_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_password(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_setup(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_confirm(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_disable(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* kp_api_audit.c: GET /api/audit (the audit trail, newest first, with filters) */
int kp_api_audit_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* kp_api_worklist.c: GET /api/worklist (study.read, site-scoped like QIDO; report fields with
 * report.read) and GET /api/system/status (system.configure: broker queues and workers, outbox
 * jobs per type and state). */
int kp_api_worklist(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_system_status(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
void kp_api_worklist_shutdown(void);

/* kp_api_admin.c: users (user.manage), roles and permissions (role.manage), sites (site.manage);
 * {name} is req->params[0] */
int kp_api_users_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_users_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_password(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_unlock(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_user_reset_mfa(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_roles_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_roles_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_role_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_role_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_role_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_permissions_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_sites_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_sites_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_site_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_site_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_site_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
/* kp_api_modalities.c: the modality registry (system.configure), the table `pacsctl ae` manages;
 * {name} (an AE title) is req->params[0]. Echo answers 200 {"ok", "detail"} (C-ECHO result). */
int kp_api_modalities_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_modalities_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_modality_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_modality_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_modality_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_modality_echo(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
/* kp_api_routes.c: routing rules and deliveries (route.manage; docs/routing.md); {id} is
 * req->params[0]. Secrets of STOW-RS destinations are never returned. */
int kp_api_routes_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_routes_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_deliveries(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_delivery_retry(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_route_deliveries_retry(kp_http_env_t *env, const kp_http_req_t *req,
                                  kp_http_resp_t *resp);
/* Helpers of the handlers (defined in kp_api_admin.c, shared with kp_api_reports.c). */
/* The JSON body, or {} when the request has none; NULL when resp is answered (400). The
 * returned object is the caller's to json_decref. */
struct json_t *kp_api_body_optional(const kp_http_req_t *req, kp_http_resp_t *resp);
/* Answers status with the JSON text (copied). */
void kp_api_text_resp(kp_http_resp_t *resp, int status, const char *text);
/* Whether s is a language of the user interface and the reports: en, ru, es, fr, de. */
bool kp_api_language_ok(const char *s);
/* The percent-decoded value of key in a raw query string ("key" alone is ""), into out: 1 found,
 * 0 absent, -1 malformed or longer than outlen - 1 bytes. */
int kp_api_query(const char *query, const char *key, char *out, size_t outlen);
/* A whole number query parameter in [min, max]: 0 (*out the value, or dflt when absent) or -1
 * (malformed or out of range). */
int kp_api_query_long(const kp_http_req_t *req, const char *key, long dflt, long min, long max,
                      long *out);

/* kp_api_admin.c, shared with the other admin handlers (modalities):
 * kp_api_opt_str: an optional string member of b of at most max bytes: 0 absent or null (*out
 * NULL), 1 present, -1 invalid (answered 400). kp_api_list: a list endpoint whose one statement
 * yields the whole JSON answer as text. kp_api_admin_begin: BEGIN plus the admin lock that
 * serialises every change of users, roles, sites and modalities. */
int kp_api_opt_str(struct json_t *b, const char *key, size_t max, const char **out,
                   kp_http_resp_t *resp);
int kp_api_list(kp_http_env_t *env, kp_http_resp_t *resp, const char *sql);
int kp_api_admin_begin(kp_http_env_t *env);

/* kp_api_health.c: GET /healthz (process up) and GET /readyz (database at our schema version,
 * pacs-busd answering, storage writable; 503 + Retry-After otherwise). Public, no patient data. */
void kp_api_health_init(void);
void kp_api_health_shutdown(void);
int kp_api_healthz(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_readyz(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
/* GET /metrics: Prometheus text, to the client addresses of http.metrics_allow only. */
int kp_api_metrics(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* kp_api_reports.c: doctors' reports, their versions, PDFs and templates (docs/reports.md);
 * {study} is req->params[0] of the study routes, {id} / {n} / {pdf_id} the numeric params */
int kp_api_study_reports(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_reports_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_sign(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_amend(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_version(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_pdf_request(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_pdf_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_report_pdf_state(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_templates_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_template_create(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_template_get(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_template_update(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_template_delete(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
/* Closes the bus connection the PDF requests publish on (at gateway shutdown). */
void kp_api_reports_shutdown(void);

/* kp_openapi.c: the API as OpenAPI 3.0, built from the route table (GET /api/openapi.json,
 * `pacs-gateway --openapi`); kp_openapi_summary is NULL for a route without a summary. */
int kp_api_openapi(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
const char *kp_openapi_json(void);
const char *kp_openapi_summary(const char *method, const char *pattern);
void kp_openapi_free(void);

/* kp_www.c: the web application (/app: sign-in page, index.html and its modules), from
 * http.www_dir; unknown extension-less paths under /app answer index.html */
int kp_www_init(const char *dir);
int kp_api_www(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

#endif
