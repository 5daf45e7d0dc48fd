/* kp_db: libpq wrapper with reconnect, parameterised execution and migrations (see kp_db.h). */
#include "kp_db.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct kp_db {
    PGconn *conn;
    char *conninfo;
};

static void s_notice(void *arg, const char *msg)
{
    (void)arg;
    char buf[512];
    snprintf(buf, sizeof buf, "%s", msg);
    buf[strcspn(buf, "\n")] = 0;
    kp_debug("db", "notice: %s", buf);
}

static PGconn *s_open(const char *conninfo)
{
    PGconn *c = PQconnectdb(conninfo);
    if (!c) abort();
    if (PQstatus(c) != CONNECTION_OK) {
        char buf[512];
        snprintf(buf, sizeof buf, "%s", PQerrorMessage(c));
        buf[strcspn(buf, "\n")] = 0;
        kp_debug("db", "connect failed: %s", buf);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, s_notice, NULL);
    return c;
}

kp_db_t *kp_db_connect(const char *conninfo, int timeout_s, bool check_schema, int *err)
{
    int rc = KP_EDB;
    kp_db_t *db = calloc(1, sizeof *db);
    if (!db) abort();
    db->conninfo = strdup(conninfo ? conninfo : "");
    if (!db->conninfo) abort();
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        db->conn = s_open(db->conninfo);
        if (db->conn) break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= timeout_s) {
            PGconn *c = PQconnectdb(db->conninfo);
            char buf[512];
            snprintf(buf, sizeof buf, "%s", c ? PQerrorMessage(c) : "out of memory");
            buf[strcspn(buf, "\n")] = 0;
            PQfinish(c);
            kp_error("db", "cannot connect to the database: %s (hint: check db.conninfo)", buf);
            goto error;
        }
        usleep(200 * 1000);
    }
    if (check_schema) {
        int v = kp_db_schema_version(db);
        if (v < 0) goto error;
        if (v != KP_SCHEMA_VERSION) {
            kp_error("db", "database schema is at version %d, this build needs %d (hint: %s)", v,
                     KP_SCHEMA_VERSION,
                     v < KP_SCHEMA_VERSION ? "run `pacsctl migrate`"
                                           : "the database was migrated by newer software");
            rc = KP_ESCHEMA;
            goto error;
        }
    }
    if (err) *err = 0;
    return db;
error:
    if (err) *err = rc;
    kp_db_destroy(&db);
    return NULL;
}

void kp_db_destroy(kp_db_t **dbp)
{
    if (!dbp || !*dbp) return;
    kp_db_t *db = *dbp;
    if (db->conn) PQfinish(db->conn);
    free(db->conninfo);
    free(db);
    *dbp = NULL;
}

PGconn *kp_db_conn(kp_db_t *db)
{
    return db->conn;
}

void kp_db_disconnect(kp_db_t *db)
{
    if (db->conn) PQfinish(db->conn);
    db->conn = NULL;
}

int kp_db_ensure(kp_db_t *db)
{
    if (db->conn && PQstatus(db->conn) == CONNECTION_OK) return 0;
    if (db->conn) {
        PQreset(db->conn);
        if (PQstatus(db->conn) == CONNECTION_OK) {
            kp_info("db", "reconnected to the database");
            return 0;
        }
        PQfinish(db->conn);
        db->conn = NULL;
    }
    db->conn = s_open(db->conninfo);
    if (!db->conn) return KP_EDB;
    kp_info("db", "connected to the database");
    return 0;
}

int kp_db_exec(kp_db_t *db, PGresult **res, const char *sql, int nparams, const char *const *params)
{
    if (res) *res = NULL;
    if (kp_db_ensure(db)) return KP_EDB;
    PGresult *r = PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (res)
            *res = r;
        else
            PQclear(r);
        return 0;
    }
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    int rc = KP_EDB;
    if (state && (!strcmp(state, "40001") || !strcmp(state, "40P01"))) rc = KP_EAGAIN;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", r ? PQresultErrorMessage(r) : PQerrorMessage(db->conn));
    msg[strcspn(msg, "\n")] = 0;
    if (rc == KP_EAGAIN)
        kp_warn("db", "transaction must be retried: %s", msg);
    else
        kp_error("db", "statement failed (%s): %s", state ? state : "no state", msg);
    PQclear(r);
    return rc;
}

int kp_db_begin(kp_db_t *db)
{
    return kp_db_run(db, "BEGIN", 0, NULL);
}
int kp_db_commit(kp_db_t *db)
{
    return kp_db_run(db, "COMMIT", 0, NULL);
}

void kp_db_rollback(kp_db_t *db)
{
    if (!db->conn || PQstatus(db->conn) != CONNECTION_OK) return;
    if (PQtransactionStatus(db->conn) == PQTRANS_IDLE) return;
    PGresult *r = PQexec(db->conn, "ROLLBACK");
    PQclear(r);
}

int kp_db_schema_version(kp_db_t *db)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r, "SELECT to_regclass('schema_migrations') IS NOT NULL", 0, NULL);
    if (rc) return rc;
    bool exists = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (!exists) return 0;
    rc = kp_db_exec(db, &r, "SELECT coalesce(max(version), 0) FROM schema_migrations", 0, NULL);
    if (rc) return rc;
    int v = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static int s_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *s_read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END)) goto fail;
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET)) goto fail;
    char *buf = malloc((size_t)n + 1);
    if (!buf) abort();
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        goto fail;
    }
    buf[n] = 0;
    fclose(f);
    return buf;
fail:
    fclose(f);
    return NULL;
}

int kp_db_migrate(kp_db_t *db, const char *dir)
{
    int rc = 0, applied = 0;
    char **names = NULL;
    size_t n = 0;
    DIR *d = opendir(dir);
    if (!d) {
        kp_error("db", "cannot open migrations directory %s: %s", dir, strerror(errno));
        return KP_EIO;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 9 || strcmp(e->d_name + l - 4, ".sql") || e->d_name[4] != '_') continue;
        names = realloc(names, (n + 1) * sizeof *names);
        if (!names) abort();
        names[n] = strdup(e->d_name);
        if (!names[n]) abort();
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof *names, s_cmp);

    rc = kp_db_run(db,
                   "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                   "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                   0, NULL);
    if (rc) goto done;
    int current = kp_db_schema_version(db);
    if (current < 0) {
        rc = current;
        goto done;
    }
    int newest = n ? atoi(names[n - 1]) : 0;
    if (current > newest) {
        kp_error("db", "database schema version %d is newer than the newest migration %d", current,
                 newest);
        rc = KP_ESCHEMA;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        int v = atoi(names[i]);
        if (v <= current) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        char *sql = s_read_file(path);
        if (!sql) {
            kp_error("db", "cannot read %s", path);
            rc = KP_EIO;
            goto done;
        }
        if ((rc = kp_db_begin(db))) {
            free(sql);
            goto done;
        }
        /* A migration file holds several statements: run it as a simple query. Serialise
         * concurrent migrators with an advisory lock held for the transaction. */
        PGresult *r = PQexec(kp_db_conn(db), "SELECT pg_advisory_xact_lock(7150001)");
        PQclear(r);
        r = PQexec(kp_db_conn(db), sql);
        free(sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
            msg[strcspn(msg, "\n")] = 0;
            kp_error("db", "migration %s failed: %s", names[i], msg);
            PQclear(r);
            kp_db_rollback(db);
            rc = KP_EDB;
            goto done;
        }
        PQclear(r);
        char vbuf[16];
        snprintf(vbuf, sizeof vbuf, "%d", v);
        const char *params[] = {vbuf, names[i]};
        rc = kp_db_run(db,
                       "INSERT INTO schema_migrations (version, name) VALUES ($1::int, $2) "
                       "ON CONFLICT (version) DO NOTHING",
                       2, params);
        if (rc || (rc = kp_db_commit(db))) {
            kp_db_rollback(db);
            goto done;
        }
        kp_info("db", "applied migration %s", names[i]);
        applied++;
    }
done:
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc ? rc : applied;
}
