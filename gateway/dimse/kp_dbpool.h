/* kp_dbpool: a small locked pool of database connections for the DIMSE services of
 * pacs-dicomd (C-FIND, C-MOVE / C-GET), which run on many association threads at once.
 *
 * A connection is taken for one request and given back; at most `cap` idle ones are kept,
 * others are closed. Connections are opened on demand (kp_db_connect with a schema check);
 * a broken one is re-established by kp_db itself on its next use. Thread-safe. */
#ifndef KP_DBPOOL_H
#define KP_DBPOOL_H

#include "kp_db.h"

typedef struct kp_dbpool kp_dbpool_t;

/* A pool for conninfo (copied) keeping at most cap idle connections (<= 0: 1). NULL on
 * out-of-memory. Owned by the caller. */
kp_dbpool_t *kp_dbpool_new(const char *conninfo, int cap);
/* Closes every idle connection and frees the pool; idempotent. Call once nothing is borrowed. */
void kp_dbpool_destroy(kp_dbpool_t **p);
/* An idle connection, or a new one (waiting up to 5 s for the server); NULL when the database
 * cannot be reached (logged). Give it back with kp_dbpool_release(). */
kp_db_t *kp_dbpool_acquire(kp_dbpool_t *p);
/* Gives a connection back (NULL is fine); it is closed when the pool is full. */
void kp_dbpool_release(kp_dbpool_t *p, kp_db_t *db);

#endif
