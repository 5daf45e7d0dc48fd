/* pacs-compressor internals shared by its files: main.c (the worker loop), job.c (one instance:
 * transcode, verify, switch the index to the new file) and scan.c (finding candidates, queueing
 * `compress` jobs, removing replaced files). The design is written down in workers/README. */
#ifndef COMPRESSOR_H
#define COMPRESSOR_H

#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_storage.h"

#include <stdbool.h>
#include <stdint.h>

/* The job type, and the advisory lock key one scanning compressor holds at a time. */
#define COMPRESSOR_JOB       "compress"
#define COMPRESSOR_SCAN_LOCK "7150007"
/* How long a compressed file being written stays registered before a cleanup may remove it
 * when the switch never happened (a crash, a job given up). The switch checks the registration
 * is still there, so this bounds only how long such a file lingers. */
#define COMPRESSOR_WRITE_LEASE_S 600

typedef struct {
    const kp_config_t *cfg; /* borrowed */
    kp_db_t *db;            /* borrowed */
    kp_storage_t *st;       /* borrowed */
    kp_bus_t *bus;          /* borrowed; NULL in tools */
    const char *target;     /* transfer syntax UID compress.target names */
    /* the policy filters as PostgreSQL text[] literals ("{}" = any), and split for C checks */
    char *modalities, *sop_classes, *syntaxes;
    long compressed, skipped, failed; /* counters for logs */
    bool notes_done;                  /* compressor_backfill_notes() has nothing left to do */
    int64_t bytes_before, bytes_after;
} compressor_t;

/* Fills the policy fields of c from c->cfg. 0, or KP_ECONFIG (logged) for a bad list. */
int compressor_policy(compressor_t *c);
/* Frees what compressor_policy() allocated. */
void compressor_policy_clear(compressor_t *c);

/* Runs one `compress` job for the instance sop (job_id: its outbox row). Returns 0 when the
 * job is finished (compressed, skipped with a recorded reason, or nothing to do; the outbox
 * row is marked done in the transaction that recorded it), or a negative code when it must be
 * retried later (database down, a file changed under it; last_error is recorded). */
int compressor_job(compressor_t *c, int64_t job_id, const char *sop);

/* Queues `compress` jobs for instances the policy selects that have no decision for their
 * current file and no job yet: all of them (studies NULL; skipped when another compressor is
 * scanning) or those of the given studies (a text[] literal; waits for a scanning compressor).
 * Submits the new jobs to the bus. Returns how many were queued, or a negative code. */
int compressor_scan(compressor_t *c, const char *studies);

/* Removes the registered files that are due (see storage_orphans in
 * schema/0007_compression.sql): each only when no index row points to it and, for a replaced
 * original, when its path still holds that very file. only_path limits it to that one file;
 * without it, compressed copies no index row points to any more (an instance stored again
 * after it was compressed) are registered first. Returns how many files were removed, or a
 * negative code. */
int compressor_cleanup(compressor_t *c, const char *only_path);

/* Writes the original's note (kp_storage.h) of every instance compressed before notes were
 * written (an archive compressed by an earlier version), from the decisions in the index, so
 * the ingest recognises those originals too. Runs once per storage: when it is complete it
 * leaves storage.root/.original-notes and later calls return at once. Safe alongside the
 * ingest and other compressors: a note is only written where there is none, and one that a
 * new copy stored meanwhile makes stale is seen to be so by the ingest. Returns how many notes
 * were written, or a negative code (tried again at the next pass). */
int compressor_backfill_notes(compressor_t *c);

/* A new relative path for a compressed copy of instance sop in syntax ts: an ordinary storage
 * path, aa/bb/<sha256 of "sop#ts#<random>">.dcm, different at each call, so a path is written
 * once and a file an index row may point to is never overwritten. */
void compressor_path(const char *sop, const char *ts, char out[KP_STORAGE_RELPATH_MAX]);

#endif
