/* kp_find: the C-FIND service of pacs-dicomd (Patient Root and Study Root, FIND).
 *
 * kp_find_handle() is the kp_dicom_find_fn the shim calls on an association thread: it checks
 * that the calling AE may query (dicom.find_require_registered), translates the identifier
 * into one parameterised query (kp_find_sql), runs it on a database connection taken from a
 * kp_dbpool (one connection per concurrently running C-FIND, never the committer's),
 * and hands each row to the shim as a Pending response. */
#ifndef KP_FIND_H
#define KP_FIND_H

#include "kp_config.h"
#include "kp_dicom.h"

typedef struct kp_find kp_find_t;

/* A service reading its settings from cfg (borrowed: must outlive the service). Connections
 * are opened on demand, at most max_conns kept idle. NULL on out-of-memory. */
kp_find_t *kp_find_new(const kp_config_t *cfg, int max_conns);
/* Closes every pooled connection and frees f; call after the SCP stopped. Idempotent. */
void kp_find_destroy(kp_find_t **f);
/* kp_dicom_find_fn: user is the kp_find_t. Returns the final DIMSE status (see kp_dicom.h). */
unsigned kp_find_handle(void *user, const kp_dicom_find_req_t *req, kp_dicom_find_results_t *out);

#endif
