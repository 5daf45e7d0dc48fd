/* kp_ingest: the one durable path by which an instance enters the archive, shared by pacs-dicomd
 * (C-STORE) and pacs-gateway (STOW-RS), so both follow the same durability rule
 * (ARCHITECTURE section 3) and produce the same outbox row and `index` job.
 *
 *   caller thread                             committer thread (one per kp_ingest_t)
 *   -------------                             ---------------------------------------
 *   header check (UIDs present, SOP UID as
 *   expected, study as expected), duplicate
 *   policy, fsync the file, rename into
 *   place                                 ->  queue
 *   wait                                      take everything queued (a group), fsync each
 *                                             distinct directory once while PostgreSQL commits
 *                                             the group's outbox rows in ONE statement
 *   return the result                     <-  wake the group; publish `index` jobs on the bus
 *
 * Many concurrent stores thus share one transaction and one journal flush, while each file's own
 * fsync runs in parallel on its caller's thread. If the database is down a store fails with
 * KP_EDB (DIMSE A700 / HTTP 503) and the sender retries; a lost bus message is found again by
 * the outbox sweep in pacs-busd. Thread-safe: kp_ingest_store() may be called from any number of
 * threads at once. */
#ifndef KP_INGEST_H
#define KP_INGEST_H

#include "kp_config.h"
#include "kp_storage.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kp_ingest kp_ingest_t;

/* Connects to PostgreSQL and the bus (as process kind bus_kind) and starts the committer thread.
 * st is borrowed and must outlive the result; cfg is read during the call and by
 * kp_ingest_store() (jobs.lease, storage.duplicate_policy, dicom.commit_batch), so it must
 * outlive it too. NULL on failure (logged). */
kp_ingest_t *kp_ingest_new(const kp_config_t *cfg, kp_storage_t *st, const char *bus_kind);
/* Lets the committer finish what is queued, stops it, disconnects; idempotent. */
void kp_ingest_destroy(kp_ingest_t **ing);

typedef struct kp_ingest_req {
    const char *tmp_path;     /* a complete file in kp_storage_tmpdir(); always consumed */
    const char *expected_sop; /* the SOP Instance UID the sender announced, or NULL */
    const char *expected_study; /* STOW-RS .../studies/{study}: the part must belong to it */
    const char *source;       /* calling AE title, or e.g. "STOW-RS" (recorded with the job) */
    const char *called_ae;    /* C-STORE: the AE title the sender called (index job "called",
                               * instances.called_ae, matched by routing rules), or NULL */
    const char *request_id;   /* the gateway's request id, carried in the index job as "rid"
                               * (so the indexer's log lines name it), or NULL */
} kp_ingest_req_t;

typedef struct kp_ingest_result {
    char sop_uid[72], sop_class[72], study_uid[72], series_uid[72]; /* "" when unreadable */
    const char *reason; /* static text on failure (for logs and STOW FailureReason), or NULL */
    bool identical;     /* the same bytes were stored already: nothing written, still indexed */
} kp_ingest_result_t;

/* Makes the instance in req->tmp_path durable and records it in the outbox; returns only when
 * that is done (0) or has failed: KP_EINVAL (SOP Instance UID missing or not a UID), KP_EDICOM
 * (not a readable data set, Study/Series UID missing), KP_EMISMATCH (SOP UID differs from
 * expected_sop, or the study from expected_study), KP_EDUPLICATE (a different instance with this
 * SOP UID exists and storage.duplicate_policy is reject), KP_EIO, KP_EDB, KP_EAGAIN (stopping).
 * The temp file is gone afterwards in every case. "Exists" and "identical" refer to the instance
 * as it was received, also after pacs-compressor replaced its file by a compressed copy (the
 * original's note, kp_storage.h): such a copy sent again is identical, and when nothing is
 * written for it (identical, or policy keep) no outbox row is needed either - it is indexed at
 * its compressed copy already - so it is acknowledged without a commit. */
int kp_ingest_store(kp_ingest_t *ing, const kp_ingest_req_t *req, kp_ingest_result_t *res);

/* The same in two steps, so that a caller with several instances (a STOW-RS request) gets them
 * all into one commit: kp_ingest_prepare() does the checks and makes the file durable (0 and
 * *pending set, or an error as above, *pending NULL); kp_ingest_commit() records the n prepared
 * instances in the outbox and waits: rcs[i] (if rcs is not NULL) gets each one's result, and the
 * first error (or 0) is returned. Every pending handle is consumed. */
typedef struct kp_ingest_pending kp_ingest_pending_t;
int kp_ingest_prepare(kp_ingest_t *ing, const kp_ingest_req_t *req, kp_ingest_result_t *res,
                      kp_ingest_pending_t **pending);
int kp_ingest_commit(kp_ingest_t *ing, kp_ingest_pending_t **pending, size_t n, int *rcs);

/* Instances stored / failed since start (for logs). */
void kp_ingest_counts(kp_ingest_t *ing, long *stored, long *failed);

#endif
