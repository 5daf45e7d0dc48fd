/* kp_retrieve: the C-MOVE and C-GET service of pacs-dicomd (Patient Root and Study Root).
 *
 * kp_retrieve_handle() is the kp_dicom_retrieve_fn the shim calls on an association thread:
 * it checks that the calling AE may retrieve (dicom.retrieve_require_registered), looks the
 * Move Destination up in the modality registry, translates the identifier into one
 * parameterised query (kp_find_sql_retrieve) and hands every instance found (its file under
 * storage.root, SOP class, stored transfer syntax) to the shim, which performs the C-STORE
 * sub-operations. kp_retrieve_done() publishes an `audit.dicom` event per C-MOVE / C-GET.
 * Database connections come from a kp_dbpool (one per concurrently running retrieve). */
#ifndef KP_RETRIEVE_H
#define KP_RETRIEVE_H

#include <jansson.h>

#include "kp_config.h"
#include "kp_dicom.h"

typedef struct kp_retrieve kp_retrieve_t;

/* A service reading its settings from cfg (borrowed: must outlive the service); files are
 * under storage_root (copied). Keeps at most max_conns idle database connections; opens its
 * own bus connection for the audit events. NULL on failure (logged). */
kp_retrieve_t *kp_retrieve_new(const kp_config_t *cfg, const char *storage_root, int max_conns);
/* Closes the connections and frees r; call after the SCP stopped. Idempotent. */
void kp_retrieve_destroy(kp_retrieve_t **r);
/* kp_dicom_retrieve_fn: user is the kp_retrieve_t. Returns 0 or the refusal status. */
unsigned kp_retrieve_handle(void *user, const kp_dicom_retrieve_req_t *req,
                            kp_dicom_retrieve_plan_t *plan);
/* kp_dicom_retrieve_done_fn: publishes the audit.dicom event (see docs/conformance.md). */
void kp_retrieve_done(void *user, const kp_dicom_retrieve_req_t *req,
                      const kp_dicom_retrieve_result_t *res);

/* Records an audit event (kp_audit_emit on a connection of the retrieve pool; the job reaches
 * pacs-auditor through the outbox sweep): the actor is the calling AE title; the patient is
 * looked up from study when given. detail (borrowed) may be NULL. Logged, never fatal. */
void kp_retrieve_audit(kp_retrieve_t *r, const char *action, const char *outcome, const char *actor,
                       const char *client, const char *study, json_t *detail);

#endif
