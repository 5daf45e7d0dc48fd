/* kp_api: handlers of the REST API under /api (database worker threads; see kp_http.h). */
#ifndef KP_API_H
#define KP_API_H

#include "kp_http.h"

/* kp_api_auth.c: login, refresh, logout, me, password */
int kp_api_login(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_refresh(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_logout(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_me(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_password(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_setup(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_confirm(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);
int kp_api_mfa_disable(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

/* kp_api_audit.c: GET /api/audit (the audit trail, newest first, with filters) */
int kp_api_audit_list(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

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

/* kp_www.c: the login page (/app/login) and its script, from http.www_dir */
int kp_www_init(const char *dir);
int kp_api_www(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

#endif
