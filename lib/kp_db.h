/* kp_db: the PostgreSQL connection every process uses (libpq).
 *
 * A kp_db_t wraps one PGconn. Statements are always parameterised (text parameters); results
 * are checked here and the caller gets either a PGresult it must PQclear() or an error code.
 * A broken connection is detected on each call and re-established on the next one (with the
 * error returned for the call that saw it, so the caller retries its transaction). At connect
 * time the schema version is compared with KP_SCHEMA_VERSION: a process refuses to run against
 * a database that is behind (run `pacsctl migrate`) or ahead (newer software) of it. */
#ifndef KP_DB_H
#define KP_DB_H

#include <libpq-fe.h>
#include <stdbool.h>

/* The schema version this build expects: the number of the newest file in schema/. */
#define KP_SCHEMA_VERSION 10

typedef struct kp_db kp_db_t;

/* Connects (retrying for up to timeout_s seconds while the server is starting). check_schema:
 * fail with KP_ESCHEMA unless the database is at KP_SCHEMA_VERSION. NULL on failure, with the
 * reason logged and the error code in *err when err is non-NULL. Owned by the caller. */
kp_db_t *kp_db_connect(const char *conninfo, int timeout_s, bool check_schema, int *err);
/* Closes and clears *db; idempotent. */
void kp_db_destroy(kp_db_t **db);
/* The raw connection (borrowed), for pipeline mode or COPY. */
PGconn *kp_db_conn(kp_db_t *db);
/* Drops the connection (after a protocol state it cannot leave, say); the next call reconnects. */
void kp_db_disconnect(kp_db_t *db);
/* Re-establishes the connection when it is broken; 0 when usable. */
int kp_db_ensure(kp_db_t *db);

/* Runs a parameterised statement. On success returns 0 and, when res is non-NULL, the result
 * (the caller PQclear()s it); on failure logs the server's message and returns KP_EDB
 * (KP_EAGAIN for serialization failures and deadlocks, which the caller should retry).
 * params may contain NULLs (SQL NULL). */
int kp_db_exec(kp_db_t *db, PGresult **res, const char *sql, int nparams,
               const char *const *params);
/* Convenience for statements without a result set of interest. */
#define kp_db_run(db, sql, n, params) kp_db_exec((db), NULL, (sql), (n), (params))
/* BEGIN / COMMIT / ROLLBACK. Rollback never fails loudly (it is used on error paths). */
int kp_db_begin(kp_db_t *db);
int kp_db_commit(kp_db_t *db);
void kp_db_rollback(kp_db_t *db);
/* The schema version recorded in the database (0 for an empty database), or a negative code. */
int kp_db_schema_version(kp_db_t *db);
/* Applies every migration in dir newer than the database's version, each in its own
 * transaction, recording it in schema_migrations. Returns the number applied or a negative code. */
int kp_db_migrate(kp_db_t *db, const char *dir);

#endif
