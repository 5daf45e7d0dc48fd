/* kp_config: the one configuration struct of all processes.
 *
 * Settings are declared in kp_config.def. A process calls kp_config_from_args() which handles
 * `--config FILE` and `--check-config`, loads the file (INI, `[section]` + `key = value`), then
 * applies KP_<SECTION>_<NAME> environment overrides, validates every value and sets the log
 * level. Values are read as plain struct fields: cfg->dicom_port, cfg->storage_root. */
#ifndef KP_CONFIG_H
#define KP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define KP_CONF_T_INT  long
#define KP_CONF_T_BOOL bool
#define KP_CONF_T_STR  char *

typedef struct kp_config {
#define KP_CONF(sec, name, type, def, min, max, choices, reload, help)                             \
    KP_CONF_T_##type sec##_##name;
#include "kp_config.def"
#undef KP_CONF
    char *path; /* file it was loaded from, or NULL */
} kp_config_t;

/* A config holding the defaults; NULL only on out-of-memory. Owned by the caller. */
kp_config_t *kp_config_new(void);
/* Frees the config and clears *cfg; idempotent. */
void kp_config_destroy(kp_config_t **cfg);
/* Loads FILE (may be NULL: defaults only) and then the environment overrides. On error returns
 * KP_ECONFIG and writes a one-line reason into err. */
int kp_config_load(kp_config_t *cfg, const char *path, char *err, size_t errlen);
/* Sets one key ("section.name") from text, validating it. KP_ECONFIG with a reason on error. */
int kp_config_set(kp_config_t *cfg, const char *key, const char *value, char *err, size_t errlen);
/* Writes the current value of "section.name" as text into out. 0 or KP_ECONFIG (unknown key). */
int kp_config_get(const kp_config_t *cfg, const char *key, char *out, size_t outlen);
/* Common start-up: parses --config FILE / --check-config / --help from argv (other arguments
 * are left for the caller, their indices marked in `rest` when non-NULL as argv positions with
 * rest[i]=1). Returns the loaded config, or NULL after printing the error; sets *exit_now when
 * the process should exit with status 0 (check passed, help printed). */
kp_config_t *kp_config_from_args(int argc, char **argv, const char *process, bool *exit_now,
                                 int *rest);
/* Writes the documented example file for every key (the format of config/pacs.conf.example). */
void kp_config_write_example(FILE *out);
/* Checks that an example file documents exactly the declared keys with their defaults.
 * Returns 0, or KP_ECONFIG with the first difference in err. */
int kp_config_check_example(const char *path, char *err, size_t errlen);
/* Resolves a path setting relative to the current directory into an absolute path (malloc'd). */
char *kp_config_abspath(const char *path);

#endif
