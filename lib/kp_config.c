/* kp_config: loading, validation and documentation of settings (see kp_config.h).
 *
 * Design: kp_config.def is expanded twice, once into the struct (header) and once into the
 * descriptor table below (offset, type, bounds), so adding a setting is one line. */
#include "kp_config.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

enum s_type { S_INT, S_BOOL, S_STR };
#define S_TYPE_INT  S_INT
#define S_TYPE_BOOL S_BOOL
#define S_TYPE_STR  S_STR

struct s_desc {
    const char *section, *name, *def, *choices, *help;
    enum s_type type;
    long min, max;
    int reloadable;
    size_t offset;
};

static const struct s_desc s_table[] = {
#define KP_CONF(sec, nm, type, d, mn, mx, ch, rl, hp)                                              \
    {#sec, #nm, d, ch, hp, S_TYPE_##type, mn, mx, rl, offsetof(kp_config_t, sec##_##nm)},
#include "kp_config.def"
#undef KP_CONF
};
#define S_COUNT (sizeof s_table / sizeof s_table[0])

static int s_parse_bool(const char *v, bool *out)
{
    if (!strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcasecmp(v, "on") || !strcmp(v, "1"))
        *out = true;
    else if (!strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off") ||
             !strcmp(v, "0"))
        *out = false;
    else
        return -1;
    return 0;
}

static bool s_in_choices(const char *choices, const char *v)
{
    size_t vl = strlen(v);
    const char *p = choices;
    while (*p) {
        const char *bar = strchr(p, '|');
        size_t l = bar ? (size_t)(bar - p) : strlen(p);
        if (l == vl && strncasecmp(p, v, l) == 0) return true;
        if (!bar) break;
        p = bar + 1;
    }
    return false;
}

static int s_apply(kp_config_t *cfg, const struct s_desc *d, const char *value, char *err,
                   size_t errlen)
{
    char *field = (char *)cfg + d->offset;
    switch (d->type) {
    case S_INT: {
        char *end;
        errno = 0;
        long v = strtol(value, &end, 10);
        while (end && isspace((unsigned char)*end))
            end++;
        if (errno || end == value || *end) {
            snprintf(err, errlen, "%s.%s: '%s' is not a whole number", d->section, d->name, value);
            return KP_ECONFIG;
        }
        if (v < d->min || v > d->max) {
            snprintf(err, errlen, "%s.%s: %ld is outside %ld..%ld", d->section, d->name, v, d->min,
                     d->max);
            return KP_ECONFIG;
        }
        *(long *)field = v;
        return 0;
    }
    case S_BOOL: {
        bool b;
        if (s_parse_bool(value, &b)) {
            snprintf(err, errlen, "%s.%s: '%s' is not true or false", d->section, d->name, value);
            return KP_ECONFIG;
        }
        *(bool *)field = b;
        return 0;
    }
    case S_STR: {
        if (d->choices && !s_in_choices(d->choices, value)) {
            snprintf(err, errlen, "%s.%s: '%s' is not one of %s", d->section, d->name, value,
                     d->choices);
            return KP_ECONFIG;
        }
        char *copy = strdup(value);
        if (!copy) abort();
        free(*(char **)field);
        *(char **)field = copy;
        return 0;
    }
    }
    return KP_ECONFIG;
}

static const struct s_desc *s_lookup(const char *section, const char *name)
{
    for (size_t i = 0; i < S_COUNT; i++)
        if (!strcasecmp(s_table[i].section, section) && !strcasecmp(s_table[i].name, name))
            return &s_table[i];
    return NULL;
}

kp_config_t *kp_config_new(void)
{
    kp_config_t *cfg = calloc(1, sizeof *cfg);
    if (!cfg) return NULL;
    char err[256];
    for (size_t i = 0; i < S_COUNT; i++) {
        if (s_apply(cfg, &s_table[i], s_table[i].def, err, sizeof err)) {
            /* A bad default is a programming error caught by the unit tests. */
            fprintf(stderr, "config: bad default: %s\n", err);
            abort();
        }
    }
    return cfg;
}

void kp_config_destroy(kp_config_t **cfgp)
{
    if (!cfgp || !*cfgp) return;
    kp_config_t *cfg = *cfgp;
    for (size_t i = 0; i < S_COUNT; i++)
        if (s_table[i].type == S_STR) free(*(char **)((char *)cfg + s_table[i].offset));
    free(cfg->path);
    free(cfg);
    *cfgp = NULL;
}

int kp_config_set(kp_config_t *cfg, const char *key, const char *value, char *err, size_t errlen)
{
    const char *dot = strchr(key, '.');
    if (!dot || dot - key >= 64) {
        snprintf(err, errlen, "'%s' is not a section.name key", key);
        return KP_ECONFIG;
    }
    char section[64];
    memcpy(section, key, (size_t)(dot - key));
    section[dot - key] = 0;
    const struct s_desc *d = s_lookup(section, dot + 1);
    if (!d) {
        snprintf(err, errlen, "unknown setting '%s'", key);
        return KP_ECONFIG;
    }
    return s_apply(cfg, d, value, err, errlen);
}

int kp_config_get(const kp_config_t *cfg, const char *key, char *out, size_t outlen)
{
    const char *dot = strchr(key, '.');
    if (!dot || dot - key >= 64) return KP_ECONFIG;
    char section[64];
    memcpy(section, key, (size_t)(dot - key));
    section[dot - key] = 0;
    const struct s_desc *d = s_lookup(section, dot + 1);
    if (!d) return KP_ECONFIG;
    const char *field = (const char *)cfg + d->offset;
    switch (d->type) {
    case S_INT:
        snprintf(out, outlen, "%ld", *(const long *)field);
        break;
    case S_BOOL:
        snprintf(out, outlen, "%s", *(const bool *)field ? "true" : "false");
        break;
    case S_STR:
        snprintf(out, outlen, "%s", *(char *const *)field);
        break;
    }
    return 0;
}

struct s_ini_ctx {
    kp_config_t *cfg;
    char *err;
    size_t errlen;
    int rc;
};

static int s_ini_handler(void *user, const char *section, const char *name, const char *value)
{
    struct s_ini_ctx *ctx = user;
    if (ctx->rc) return 0;
    const struct s_desc *d = s_lookup(section, name);
    if (!d) {
        snprintf(ctx->err, ctx->errlen, "unknown setting '%s' in [%s]", name, section);
        ctx->rc = KP_ECONFIG;
        return 0;
    }
    char sub[256];
    if (s_apply(ctx->cfg, d, value, sub, sizeof sub)) {
        snprintf(ctx->err, ctx->errlen, "%s", sub);
        ctx->rc = KP_ECONFIG;
        return 0;
    }
    return 1;
}

int kp_config_load(kp_config_t *cfg, const char *path, char *err, size_t errlen)
{
    if (path) {
        struct s_ini_ctx ctx = {cfg, err, errlen, 0};
        int r = ini_parse(path, s_ini_handler, &ctx);
        if (r == -1) {
            snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
            return KP_ECONFIG;
        }
        if (ctx.rc) return ctx.rc;
        if (r > 0) {
            snprintf(err, errlen, "%s: line %d: syntax error", path, r);
            return KP_ECONFIG;
        }
        free(cfg->path);
        cfg->path = strdup(path);
    }
    for (size_t i = 0; i < S_COUNT; i++) {
        char env[128];
        int n = snprintf(env, sizeof env, "KP_%s_%s", s_table[i].section, s_table[i].name);
        for (int j = 0; j < n; j++)
            env[j] = (char)toupper((unsigned char)env[j]);
        const char *v = getenv(env);
        if (!v) continue;
        char sub[256];
        if (s_apply(cfg, &s_table[i], v, sub, sizeof sub)) {
            snprintf(err, errlen, "environment %s: %s", env, sub);
            return KP_ECONFIG;
        }
    }
    if (kp_log_set_level(cfg->log_level)) {
        snprintf(err, errlen, "log.level: unknown level '%s'", cfg->log_level);
        return KP_ECONFIG;
    }
    if (kp_log_set_format(cfg->log_format)) {
        snprintf(err, errlen, "log.format: unknown format '%s'", cfg->log_format);
        return KP_ECONFIG;
    }
    return 0;
}

kp_config_t *kp_config_from_args(int argc, char **argv, const char *process, bool *exit_now,
                                 int *rest)
{
    const char *path = NULL;
    bool check = false;
    *exit_now = false;
    kp_log_init(process);
    for (int i = 1; i < argc; i++) {
        if (rest) rest[i] = 0;
        if (!strcmp(argv[i], "--config") && i + 1 < argc) {
            path = argv[++i];
            if (rest) rest[i] = 0;
        } else if (!strncmp(argv[i], "--config=", 9)) {
            path = argv[i] + 9;
        } else if (!strcmp(argv[i], "--check-config")) {
            check = true;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: %s [--config FILE] [--check-config]\n"
                   "Settings come from FILE (see config/pacs.conf.example) and KP_<SECTION>_<KEY>"
                   " environment variables.\n",
                   process);
            *exit_now = true;
            return NULL;
        } else if (rest) {
            rest[i] = 1;
        }
    }
    if (!path) path = getenv("KP_CONFIG");
    kp_config_t *cfg = kp_config_new();
    if (!cfg) abort();
    char err[512];
    if (kp_config_load(cfg, path, err, sizeof err)) {
        fprintf(stderr, "%s: configuration error: %s\n", process, err);
        kp_config_destroy(&cfg);
        return NULL;
    }
    if (check) {
        printf("%s: configuration OK%s%s\n", process, path ? " (" : "", path ? path : "");
        if (path) printf(")\n");
        *exit_now = true;
    }
    return cfg;
}

void kp_config_write_example(FILE *out)
{
    fprintf(out, "# Klinika PACS configuration. Every setting is shown with its default, commented"
                 " out.\n# Each can also be set in the environment as KP_<SECTION>_<NAME>, e.g."
                 " KP_DICOM_PORT=11112.\n");
    const char *section = "";
    for (size_t i = 0; i < S_COUNT; i++) {
        const struct s_desc *d = &s_table[i];
        if (strcmp(section, d->section)) {
            fprintf(out, "\n[%s]\n", d->section);
            section = d->section;
        }
        fprintf(out, "# %s", d->help);
        if (d->type == S_INT) fprintf(out, " (%ld..%ld)", d->min, d->max);
        if (d->choices) fprintf(out, " (%s)", d->choices);
        if (d->reloadable) fprintf(out, " [reloadable]");
        fprintf(out, "\n#%s = %s\n", d->name, d->def);
    }
}

int kp_config_check_example(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open %s", path);
        return KP_ECONFIG;
    }
    char line[1024], section[64] = "";
    bool seen[S_COUNT];
    memset(seen, 0, sizeof seen);
    int rc = 0, lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == '[') {
            snprintf(section, sizeof section, "%.*s", (int)strcspn(line + 1, "]"), line + 1);
            continue;
        }
        /* A documented key is "#name = default" (or an active "name = value"). */
        const char *p = line[0] == '#' ? line + 1 : line;
        if (line[0] == '#' && line[1] == ' ') continue;
        char *eq = strstr(p, " = ");
        if (!eq || !*p) continue;
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)(eq - p), p);
        const struct s_desc *d = s_lookup(section, name);
        if (!d) {
            snprintf(err, errlen, "line %d: [%s] %s is not a declared setting", lineno, section,
                     name);
            rc = KP_ECONFIG;
            break;
        }
        if (line[0] == '#' && strcmp(eq + 3, d->def)) {
            snprintf(err, errlen, "line %d: %s.%s default is '%s', example says '%s'", lineno,
                     section, name, d->def, eq + 3);
            rc = KP_ECONFIG;
            break;
        }
        seen[d - s_table] = true;
    }
    fclose(f);
    for (size_t i = 0; !rc && i < S_COUNT; i++) {
        if (!seen[i]) {
            snprintf(err, errlen, "%s.%s is not documented in %s", s_table[i].section,
                     s_table[i].name, path);
            rc = KP_ECONFIG;
        }
    }
    return rc;
}

char *kp_config_abspath(const char *path)
{
    if (!path) return NULL;
    if (path[0] == '/') {
        char *r = strdup(path);
        if (!r) abort();
        return r;
    }
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) return NULL;
    size_t n = strlen(cwd) + strlen(path) + 2;
    char *r = malloc(n);
    if (!r) abort();
    snprintf(r, n, "%s/%s", cwd, path);
    return r;
}
