/* kp_www: our own web application under /app (gateway/www: the sign-in page and the single-page
 * application of worklist, report editor, admin screens and account page).
 *
 * Every file of http.www_dir (and its sub-directories: i18n/, ...) is read once at start and
 * served from memory by a database worker (the application is small: plain ES modules, no build
 * step). /app/login is login.html; /app and any /app/<path> that names no file and has no
 * extension is index.html (the application's router reads location.pathname), so /app/worklist
 * or /app/reports/12 can be bookmarked and reloaded; an unknown file with an extension is 404. */
#include "kp_api.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define S_MAX_FILES 256
#define S_MAX_BYTES (4 << 20) /* per file */
#define S_MAX_DEPTH 3

typedef struct {
    char *rel; /* path below www_dir, e.g. "i18n/en.json" */
    const char *ctype;
    char *data;
    size_t len;
} s_file_t;

static struct {
    s_file_t f[S_MAX_FILES];
    size_t n;
} s_www;

static const struct {
    const char *ext, *ctype;
} s_types[] = {
    {"html", "text/html; charset=utf-8"},
    {"js", "application/javascript; charset=utf-8"},
    {"mjs", "application/javascript; charset=utf-8"},
    {"css", "text/css; charset=utf-8"},
    {"json", "application/json"},
    {"svg", "image/svg+xml"},
    {"png", "image/png"},
    {"ico", "image/x-icon"},
    {"txt", "text/plain; charset=utf-8"},
};

/* The content type of a file name, or NULL for a type we do not serve. */
static const char *s_ctype(const char *name)
{
    const char *dot = strrchr(name, '.');
    if (!dot) return NULL;
    for (size_t i = 0; i < sizeof s_types / sizeof s_types[0]; i++)
        if (!strcmp(dot + 1, s_types[i].ext)) return s_types[i].ctype;
    return NULL;
}

static void s_clear(void)
{
    for (size_t i = 0; i < s_www.n; i++) {
        free(s_www.f[i].rel);
        free(s_www.f[i].data);
    }
    s_www.n = 0;
}

static int s_load_file(const char *path, const char *rel, const char *ctype)
{
    FILE *f = fopen(path, "rb");
    if (!f) return KP_EIO;
    int rc = 0;
    if (fseek(f, 0, SEEK_END)) {
        rc = KP_EIO;
        goto done;
    }
    long n = ftell(f);
    if (n < 0 || n > S_MAX_BYTES || fseek(f, 0, SEEK_SET)) {
        rc = n > S_MAX_BYTES ? KP_ETOOBIG : KP_EIO;
        goto done;
    }
    if (s_www.n >= S_MAX_FILES) {
        rc = KP_ETOOBIG;
        goto done;
    }
    s_file_t *e = &s_www.f[s_www.n];
    e->data = malloc(n > 0 ? (size_t)n : 1);
    e->rel = strdup(rel);
    if (!e->data || !e->rel) abort();
    e->len = n > 0 ? fread(e->data, 1, (size_t)n, f) : 0;
    e->ctype = ctype;
    s_www.n++;
done:
    fclose(f);
    return rc;
}

/* Loads the files of dir/rel (rel "" for the top), depth-first. */
static void s_load_dir(const char *dir, const char *rel, int depth)
{
    char path[4096];
    snprintf(path, sizeof path, "%s%s%s", dir, *rel ? "/" : "", rel);
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue; /* ., .., and hidden files */
        char r[1024], full[4096];
        snprintf(r, sizeof r, "%s%s%s", rel, *rel ? "/" : "", de->d_name);
        snprintf(full, sizeof full, "%s/%s", dir, r);
        struct stat sb;
        if (stat(full, &sb)) continue;
        if (S_ISDIR(sb.st_mode)) {
            if (depth < S_MAX_DEPTH) s_load_dir(dir, r, depth + 1);
            continue;
        }
        const char *ct = s_ctype(de->d_name);
        if (!S_ISREG(sb.st_mode) || !ct) continue;
        int rc = s_load_file(full, r, ct);
        if (rc) kp_warn("www", "%s not served: %s", full, kp_strerror(rc));
    }
    closedir(d);
}

static const s_file_t *s_find(const char *rel)
{
    for (size_t i = 0; i < s_www.n; i++)
        if (!strcmp(s_www.f[i].rel, rel)) return &s_www.f[i];
    return NULL;
}

int kp_www_init(const char *dir)
{
    s_clear();
    s_load_dir(dir, "", 0);
    int missing = 0;
    static const char *const needed[] = {"login.html", "login.js", "index.html"};
    for (size_t i = 0; i < sizeof needed / sizeof needed[0]; i++)
        if (!s_find(needed[i])) {
            kp_warn("www", "%s/%s is missing (set http.www_dir)", dir, needed[i]);
            missing++;
        }
    kp_info("www", "%zu files of the web application from %s", s_www.n, dir);
    return missing ? KP_ENOTFOUND : 0;
}

int kp_api_www(kp_http_env_t *env, const kp_http_req_t *req, kp_http_resp_t *resp)
{
    (void)env;
    const s_file_t *f = NULL;
    if (!strcmp(req->path, "/app/login")) {
        f = s_find("login.html");
    } else if (!strcmp(req->path, "/app") || !strcmp(req->path, "/app/")) {
        f = s_find("index.html");
    } else if (!strncmp(req->path, "/app/", 5)) {
        f = s_find(req->path + 5);
        const char *last = strrchr(req->path, '/');
        if (!f && !strchr(last, '.')) f = s_find("index.html"); /* a route of the application */
    }
    if (!f) {
        kp_http_error(resp, KP_ENOTFOUND, 0, "no such page", NULL);
        return 0;
    }
    resp->body = malloc(f->len + 1);
    if (!resp->body) abort();
    memcpy(resp->body, f->data, f->len);
    resp->len = f->len;
    resp->status = 200;
    resp->content_type = f->ctype;
    resp->compressible = strncmp(f->ctype, "image/png", 9) != 0;
    return 0;
}
