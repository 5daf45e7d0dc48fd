/* kp_index: writes stored DICOM files into the index (patients / studies / series / instances).
 *
 * Used by pacs-indexer for its jobs and by `pacsctl reindex` for a rebuild from storage. A batch
 * is parsed first (outside any transaction; only the header is read, never the pixel data),
 * then written in ONE transaction in a fixed lock order (patient, study, series, instance
 * sorted by key) together with marking the batch's jobs done, so a re-delivered job is a no-op
 * and several indexers can run at once without deadlocks or duplicate rows. Aggregates
 * (series/study counts, ModalitiesInStudy, SOPClassesInStudy) are recomputed once per touched
 * series and study at the end of the transaction, after the rows they depend on are locked. */
#ifndef KP_INDEX_H
#define KP_INDEX_H

#include "kp_db.h"
#include "kp_storage.h"

#include <stdint.h>

typedef struct {
    int64_t job_id;         /* outbox row to mark done, 0 for none (reindex) */
    const char *rel;        /* storage-relative path (validated) */
    const char *sha256;     /* hex digest of the file, or NULL to compute it */
    int64_t size;           /* file size, or -1 to compute it */
    const char *calling_ae; /* who sent it; NULL: the file's SourceApplicationEntityTitle */
    const char *called_ae;  /* the AE title it was sent to (C-STORE), or NULL (kept as it was) */
    /* out: 0 indexed, KP_EDICOM unparsable (job marked failed), 1 skipped (job already done),
     * other negative codes: not written (transaction failed; retry the batch) */
    int result;
    char study_uid[68]; /* out: the study the instance belongs to (when result is 0) */
} kp_index_item_t;

/* Called between items of a batch (e.g. to send bus heartbeats during a long batch). */
typedef void (*kp_index_tick_fn)(void *user);

/* Indexes n items in one transaction (retrying on deadlock/serialization failure a few times).
 * Returns 0 when the transaction committed (see each item's result), or a negative code when
 * nothing was written (database down: the jobs stay pending and come back via the sweep).
 * tick (may be NULL) is called with tick_user after each parsed and each written item.
 * The transaction's commit does not wait for the WAL flush (synchronous_commit off): should the
 * database lose it in a crash, it loses the jobs' "done" mark with it and the outbox sweep
 * redoes the work, so nothing acknowledged depends on it. */
int kp_index_batch(kp_db_t *db, kp_storage_t *st, kp_index_item_t *items, size_t n,
                   kp_index_tick_fn tick, void *tick_user);

/* The site rules (config sites.map, see lib/kp_config.def) used for studies indexed from now
 * on; NULL or "" for none. Call before indexing (not thread-safe with kp_index_batch). A
 * malformed rule is logged and skipped. */
void kp_index_set_site_map(const char *map);
/* The site name the rules give for a study first seen with this calling AE and institution
 * name (either may be NULL), or NULL for the default site. For tests. */
const char *kp_index_site_for(const char *calling_ae, const char *institution);

/* Bulk-data threshold: binary values longer than this go into the metadata as BulkDataURI. */
#define KP_INDEX_BULK_THRESHOLD 1024

#endif
