/* kp_access: what a calling AE may do with pacs-dicomd, from its row of the modality registry
 * (schema/0002_modalities.sql): the allow_store / allow_find / allow_retrieve flags and the
 * site scope (modalities.site names a row of sites; its studies are the only ones the AE
 * finds and retrieves; an empty site means every site).
 *
 * One parameterised lookup on a connection the caller already holds (C-FIND and C-MOVE /
 * C-GET take one from their pool for the request anyway; C-STORE only when
 * dicom.store_require_registered is on). Thread-safe (no state). */
#ifndef KP_ACCESS_H
#define KP_ACCESS_H

#include "kp_db.h"

#include <stdbool.h>

typedef enum { KP_ACCESS_STORE, KP_ACCESS_FIND, KP_ACCESS_RETRIEVE } kp_access_op_t;

typedef struct {
    bool registered; /* the AE title is in the registry */
    bool allowed;    /* its allow_<op> flag (false when not registered) */
    int site_id;     /* 0: every site; > 0: only the studies of that site; -1: the row names a
                      * site that does not exist, so nothing matches (fail closed) */
    char site[72];   /* the site name of the row ("" for every site) */
} kp_access_t;

/* Fills *out for the calling AE title ae and operation op. Returns 0, or KP_EDB when the
 * registry cannot be read (then *out says not registered, not allowed, no site). */
int kp_access_lookup(kp_db_t *db, const char *ae, kp_access_op_t op, kp_access_t *out);

#endif
