/* kp_www: the pages of our own web application under /app (today: the sign-in page), read once
 * from http.www_dir at start and served from memory by a database worker (they are small). The
 * full web application (issue "reports and web application") will be served the same way. */
#include "kp_api.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct {
    const char *path, *file, *ctype;
    char *data;
    size_t len;
} s_files[] = {
    {"/app/login", "login.html", "text/html; charset=utf-8", NULL, 0},
    {"/app/login.js", "login.js", "application/javascript", NULL, 0},
};
#define S_NFILES (sizeof s_files / sizeof s_files[0])

int kp_www_init(const char *dir)
{
    int missing = 0;
    for (size_t i = 0; i < S_NFILES; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, s_files[i].file);
        FILE *f = fopen(path, "rb");
        if (!f) {
            kp_warn("www", "%s is missing: %s answers 404 (set http.www_dir)", path,
                    s_files[i].path);
            missing++;
            continue;
        }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        free(s_files[i].data);
        s_files[i].data = malloc(n > 0 ? (size_t)n : 1);
        if (!s_files[i].data) abort();
        s_files[i].len = n > 0 ? fread(s_files[i].data, 1, (size_t)n, f) : 0;
        fclose(f);
    }
    return missing ? KP_ENOTFOUND : 0;
}

int kp_api_www(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)env;
    for (size_t i = 0; i < S_NFILES; i++) {
        if (strcmp(req->path, s_files[i].path)) continue;
        if (!s_files[i].data) break;
        resp->body = malloc(s_files[i].len + 1);
        if (!resp->body) abort();
        memcpy(resp->body, s_files[i].data, s_files[i].len);
        resp->len = s_files[i].len;
        resp->status = 200;
        resp->content_type = s_files[i].ctype;
        resp->compressible = true;
        return 0;
    }
    kp_http_error(resp, KP_ENOTFOUND, 0, "no such page", NULL);
    return 0;
}
