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

/* kp_www.c: the login page (/app/login) and its script, from http.www_dir */
int kp_www_init(const char *dir);
int kp_api_www(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp);

#endif
