/* kp_qido: QIDO-RS query parameters (PS3.18 10.6) turned into one parameterised SQL statement.
 *
 * Pure code, no database and no HTTP: the gateway's QIDO routes call kp_qido_build() with the
 * level, the UIDs from the path and the raw query string, then run the statement it returns.
 * The SQL text is assembled only from fixed fragments of this file (column names, operators);
 * every value from the request travels as a $n parameter. The statement returns one row with
 * one text column: the DICOM JSON array (PS3.18 Annex F) of the matches. */
#ifndef KP_QIDO_H
#define KP_QIDO_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { KP_QIDO_STUDY = 0, KP_QIDO_SERIES = 1, KP_QIDO_INSTANCE = 2 } kp_qido_level_t;

#define KP_QIDO_MAX_PARAMS 64

typedef struct kp_qido {
    kp_qido_level_t level;
    char *sql;                        /* the statement (owned) */
    char *params[KP_QIDO_MAX_PARAMS]; /* its $1..$n values (owned) */
    int nparams;
    long limit, offset;
    bool fuzzy;
    char *
        warning; /* text for a `Warning: 299` header (ignored parameters, clamped limit), or NULL */
} kp_qido_t;

/* Parses `query` (the raw text after '?', may be NULL) for a query at `level` constrained by the
 * UIDs of the path (study_uid / series_uid, NULL when absent) and builds the statement.
 * default_limit / max_limit: a missing limit means default_limit; a larger one is clamped to
 * max_limit with a warning. Returns 0 and a new query in *out (caller destroys it), or KP_EINVAL
 * with a one-line reason in err (the request is bad: HTTP 400). */
int kp_qido_build(kp_qido_level_t level, const char *study_uid, const char *series_uid,
                  const char *query, long default_limit, long max_limit, kp_qido_t **out, char *err,
                  size_t errlen);
/* The same, restricted to the studies of the sites in `sites` (a PostgreSQL text[] literal such as
 * {"north","south"}, passed as a parameter); NULL: no restriction. */
int kp_qido_build_sites(kp_qido_level_t level, const char *study_uid, const char *series_uid,
                        const char *query, long default_limit, long max_limit, const char *sites,
                        kp_qido_t **out, char *err, size_t errlen);
/* Frees the query and clears *q; idempotent. */
void kp_qido_destroy(kp_qido_t **q);

/* Helpers, exposed for the unit tests. */
/* A DICOM UID: 1..64 characters, digits and dots, no empty component. */
bool kp_qido_valid_uid(const char *s, size_t len);
/* DICOM wildcard value (* and ?) to a LIKE pattern with \ escapes; malloc'd. */
char *kp_qido_like_pattern(const char *value);
/* Decodes %XX and '+' in place; returns false on a malformed escape or an embedded NUL. */
bool kp_qido_url_decode(char *s);
/* The same for a path segment, where '+' is itself. */
bool kp_path_url_decode(char *s);

#endif
