/* kp_find_sql: C-FIND (and C-MOVE / C-GET) identifier -> one parameterised SQL query against
 * the index.
 *
 * Pure translation (no database, no DCMTK), so that the matching rules of PS3.4 C.2.2.2 can be
 * unit-tested on their own. The SQL text is assembled only from fixed fragments of this module
 * (column expressions of a static key table, operators, $n placeholders); every value that
 * comes from the identifier travels as a parameter. */
#ifndef KP_FIND_SQL_H
#define KP_FIND_SQL_H

#include "kp_dicom.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    bool fold_names; /* person names matched case- and accent-insensitively (kp_fold) */
    long limit;      /* most results wanted; the query asks for limit + 1 to detect more */
    int site_id;     /* site scope of the calling AE (kp_access): 0 every site, > 0 only the
                      * studies of that site (patients: those with a study there, and their
                      * study / series / instance counts over that site only), < 0 nothing */
} kp_find_sql_opts_t;

typedef struct {
    char *sql;          /* the statement (owned) */
    int nparams;        /* number of $n parameters */
    char **params;      /* their text values (owned) */
    int ncols;          /* result columns, all text */
    uint32_t *col_tags; /* attribute tag of each result column (owned) */
    char level[8];      /* PATIENT, STUDY, SERIES or IMAGE */
} kp_find_sql_t;

/* Builds the query for req into *q (zeroed first). Returns 0, or KP_EMISMATCH when the
 * identifier does not fit the information model (QueryRetrieveLevel missing or unknown, a
 * unique key of a level above missing or not a single value: PS3.4 C.4.1.2.1), or KP_EINVAL
 * for an identifier too large to translate; err (may be NULL) gets a short reason suitable
 * for an Error Comment. On error *q holds nothing to free. */
int kp_find_sql_build(const kp_dicom_find_req_t *req, const kp_find_sql_opts_t *opts,
                      kp_find_sql_t *q, char *err, size_t errlen);
/* Builds the query of a C-MOVE / C-GET identifier (hierarchical retrieve, PS3.4 C.4.2.2.1)
 * into *q: columns path (relative to storage.root), sop_uid, sop_class_uid, transfer syntax
 * ("" when unknown) and study_uid of every instance to send, at most limit + 1 rows (col_tags is
 * NULL). Returns 0, or KP_EMISMATCH when the level is missing or invalid for the model or a
 * unique key is missing, empty, wildcarded or a list above the retrieve level; err (may be NULL)
 * gets a short reason. On error *q holds nothing to free. */
int kp_find_sql_retrieve(const kp_dicom_retrieve_req_t *req, long limit, kp_find_sql_t *q,
                         char *err, size_t errlen);
/* The same limited to a site scope (site_id as in kp_find_sql_opts_t): instances of studies
 * outside it are not selected. kp_find_sql_retrieve() is this with site_id 0. */
int kp_find_sql_retrieve_scoped(const kp_dicom_retrieve_req_t *req, long limit, int site_id,
                                kp_find_sql_t *q, char *err, size_t errlen);
/* Frees everything in *q and zeroes it; idempotent. */
void kp_find_sql_clear(kp_find_sql_t *q);

/* A DICOM wildcard value (* and ?) as a LIKE pattern with '\\' escaping %, _ and '\\'.
 * Returns a malloc'd string. Exposed for the unit tests. */
char *kp_find_sql_like(const char *value);

#endif
