/* pacsctl: the administrator's command line.
 *
 *   pacsctl [--config FILE] migrate            apply database migrations (schema/)
 *   pacsctl [--config FILE] stats              counts per level, storage, job queues, compression
 *   pacsctl [--config FILE] reindex [--wipe]   rebuild the index from the files in storage
 *   pacsctl [--config FILE] jobs [--state S] [--limit N]   list outbox jobs
 *   pacsctl [--config FILE] jobs retry ID|--failed          make jobs pending again
 *   pacsctl [--config FILE] ae list|add|remove|echo ...      the modality registry
 *   pacsctl [--config FILE] route list|add|remove|deliveries|retry ...   routing rules
 *   pacsctl [--config FILE] audit verify|list ...            the audit trail
 *   pacsctl [--config FILE] workers [--kind K] [--json]     live workers, their counters
 *   pacsctl bus keygen FILE                    write a new CurveZMQ key pair
 *   pacsctl config-get SECTION.KEY             print one setting's effective value
 *   pacsctl config-example                     print the documented example configuration
 *
 * Every sub-command reads the same configuration as the daemons (file + KP_* environment). */
#include "kp_bus.h"
#include "kp_config.h"
#include "kp_curve.h"
#include "kp_db.h"
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_index.h"
#include "kp_log.h"
#include "kp_storage.h"
#include "pacsctl.h"

#include <errno.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void s_usage(void)
{
    fprintf(
        stderr,
        "usage: pacsctl [--config FILE] COMMAND\n"
        "  migrate [--schema DIR]   apply database migrations\n"
        "  stats                    patients/studies/series/instances, storage, job queues,\n"
        "                           compression (bytes before/after, skips by reason)\n"
        "  reindex [--wipe]         rebuild the index from the files in storage\n"
        "  jobs [--state pending|done|failed] [--limit N]   list outbox jobs\n"
        "  jobs retry ID|--failed   make a job (or every failed job) pending again\n"
        "  ae list | add AE --host H --port P [--description D] [--site S] [--no-store]\n"
        "     [--no-find] [--no-retrieve] [--tls] [--move-associations N] | remove AE |\n"
        "     echo AE\n"
        "                           the modality registry; echo sends a C-ECHO to the AE\n"
        "  route list | add --json FILE | remove ID | deliveries [--state S] [--rule ID]\n"
        "     [--limit N] | retry ID|--dead   routing rules and their deliveries\n"
        "  user list | add NAME --role R [--role R2] [--site S] [--display-name D] [--email E]\n"
        "     [--language L] [--password-file F | --password-env VAR] [--temporary]\n"
        "     [--if-missing] | passwd NAME [...] | disable|enable|unlock|reset-mfa|\n"
        "     sessions-revoke NAME    accounts; without a password option one is generated,\n"
        "                           printed once, and must be changed at first login\n"
        "  audit verify [--textfile F]   recompute the audit trail's hash chain (exit 1 if "
        "broken);\n"
        "                           F: the outcome as Prometheus metrics\n"
        "  audit list [--user U] [--action A] [--limit N]   newest audit records first\n"
        "  backup keygen FILE | backup DIR | backup verify DIR/snapshots/ID | backup prune DIR\n"
        "     --keep N | backup schedule DIR [--at HH:MM] | restore\n"
        "     DIR/snapshots/ID [--key F]   encrypted incremental backups (docs/operations.md)\n"
        "  status                   database, schema, bus, storage, dicom, https, workers\n"
        "                           by kind and job queues (exit 0 when all healthy)\n"
        "  health db|bus|dicom|worker KIND   one health check (exit 0 healthy, 1 not)\n"
        "  workers [--kind K] [--json]   live workers by kind and host: jobs done/failed, the\n"
        "                           job in hand, last heartbeat (from the broker)\n"
        "  bus keygen FILE          write a new CurveZMQ key pair (mode 0600)\n"
        "  config-get SECTION.KEY   print one setting's effective value\n"
        "  config-example           print the documented example configuration\n");
}

static char *s_schema_dir(const char *given)
{
    if (given) return strdup(given);
    const char *env = getenv("KP_SCHEMA_DIR");
    if (env) return strdup(env);
    struct stat sb;
    if (stat("schema/0001_initial.sql", &sb) == 0) return strdup("schema");
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *dir = dirname(exe); /* build/bin */
        char path[PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/../../schema", dir);
        if (stat(path, &sb) == 0) return strdup(path);
        snprintf(path, sizeof path, "%s/../share/klinika/schema", dir);
        if (stat(path, &sb) == 0) return strdup(path);
    }
    return strdup("schema");
}

kp_db_t *pacsctl_db(const kp_config_t *cfg, bool check)
{
    int err = 0;
    kp_db_t *db = kp_db_connect(cfg->db_conninfo, (int)cfg->db_connect_timeout, check, &err);
    if (!db) fprintf(stderr, "pacsctl: %s\n", kp_strerror(err ? err : KP_EDB));
    return db;
}

/* The services' own role (db.app_role): every privilege on the index except altering the audit
 * trail and the migration history, so that even a compromised service cannot rewrite audit
 * records (the append-only triggers and the hash chain stay as further layers). Run by
 * `pacsctl migrate` as the schema's owner, after the migrations; granted on ALL tables, so
 * tables of later migrations are covered by the next migrate. 0, or 1 with the reason. */
int pacsctl_app_role(const kp_config_t *cfg, kp_db_t *db)
{
    const char *role = cfg->db_app_role;
    if (!*role) return 0;
    size_t n = strlen(role);
    bool ok = n <= 63 && (role[0] == '_' || (role[0] >= 'a' && role[0] <= 'z'));
    for (size_t i = 0; ok && i < n; i++)
        ok = role[i] == '_' || (role[i] >= 'a' && role[i] <= 'z') ||
             (role[i] >= '0' && role[i] <= '9');
    if (!ok) {
        fprintf(stderr,
                "pacsctl: db.app_role '%s' must be a lower-case SQL name ([a-z_][a-z0-9_]*)\n",
                role);
        return 1;
    }
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, "SELECT current_user = $1", 1, (const char *[]){role})) return 1;
    bool self = !strcmp(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    if (self) {
        fprintf(stderr,
                "pacsctl: migrate must run as the schema's owner, not as db.app_role %s "
                "(use the owner's connection string for migrate and restore)\n",
                role);
        return 1;
    }
    /* one statement each (parameterised execution takes one at a time); the role name was
     * checked above, so it can be spliced in */
    const char *fmt[] = {
        "DO $kp$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '%s') THEN "
        "CREATE ROLE %s LOGIN; END IF; END $kp$",
        "DO $kp$ BEGIN EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %%I TO %s', "
        "current_database()); END $kp$",
        "GRANT USAGE ON SCHEMA public TO %s",
        "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN "
        "SCHEMA public TO %s",
        "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO %s",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO %s",
        "REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_log FROM %s",
        "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON schema_migrations FROM %s",
    };
    if (kp_db_run(db, "BEGIN", 0, NULL)) return 1;
    for (size_t i = 0; i < sizeof fmt / sizeof fmt[0]; i++) {
        char sql[512];
        if (i == 0)
            snprintf(sql, sizeof sql, fmt[i], role, role);
        else
            snprintf(sql, sizeof sql, fmt[i], role);
        if (kp_db_run(db, sql, 0, NULL)) {
            fprintf(stderr,
                    "pacsctl: could not set up db.app_role %s (the migrating user needs "
                    "CREATEROLE, or create the role yourself, and must own the tables): %s"
                    "hint: set db.app_role empty to connect every service as the owner\n",
                    role, PQerrorMessage(kp_db_conn(db)));
            (void)kp_db_run(db, "ROLLBACK", 0, NULL);
            return 1;
        }
    }
    if (kp_db_run(db, "COMMIT", 0, NULL)) return 1;
    if (cfg->db_app_password_file[0]) {
        char pw[512];
        FILE *f = fopen(cfg->db_app_password_file, "r");
        size_t len = f ? fread(pw, 1, sizeof pw - 1, f) : 0;
        if (f) fclose(f);
        while (len && (pw[len - 1] == '\n' || pw[len - 1] == '\r'))
            len--;
        pw[len] = 0;
        if (!f || len < 12) {
            fprintf(stderr, "pacsctl: db.app_password_file %s: %s\n", cfg->db_app_password_file,
                    f ? "the password must have at least 12 characters" : strerror(errno));
            return 1;
        }
        PGconn *c = kp_db_conn(db);
        char *lit = PQescapeLiteral(c, pw, len);
        memset(pw, 0, sizeof pw);
        if (!lit) return 1;
        char *q = malloc(strlen(lit) + 128);
        if (!q) abort();
        sprintf(q, "ALTER ROLE %s PASSWORD %s", role, lit);
        PQfreemem(lit);
        int rc = kp_db_run(db, q, 0, NULL);
        memset(q, 0, strlen(q));
        free(q);
        if (rc) return 1;
    }
    printf("services' role %s: every privilege but UPDATE, DELETE and TRUNCATE on audit_log "
           "(connect them with user=%s)\n",
           role, role);
    return 0;
}

static int s_migrate(const kp_config_t *cfg, int argc, char **argv)
{
    const char *dir = NULL;
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--schema") && i + 1 < argc) dir = argv[++i];
    char *d = s_schema_dir(dir);
    kp_db_t *db = pacsctl_db(cfg, false);
    if (!db) {
        free(d);
        return 1;
    }
    int n = kp_db_migrate(db, d);
    int v = kp_db_schema_version(db);
    free(d);
    if (n < 0) {
        kp_db_destroy(&db);
        fprintf(stderr, "pacsctl: migration failed: %s\n", kp_strerror(n));
        return 1;
    }
    printf("schema at version %d (%d migration%s applied)\n", v, n, n == 1 ? "" : "s");
    int rc = pacsctl_app_role(cfg, db);
    kp_db_destroy(&db);
    return rc;
}

static void s_print_query(kp_db_t *db, const char *title, const char *sql)
{
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, sql, 0, NULL)) return;
    printf("%s\n", title);
    int nf = PQnfields(r);
    for (int i = 0; i < PQntuples(r); i++) {
        printf(" ");
        for (int j = 0; j < nf; j++)
            printf(" %-*s", j == 0 ? 22 : 10, PQgetvalue(r, i, j));
        printf("\n");
    }
    if (PQntuples(r) == 0) printf("  (none)\n");
    PQclear(r);
}

/* The index part of `stats`: counts and the outbox. 0, or 1 when the database failed. */
static int s_stats_index(const kp_config_t *cfg)
{
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    PGresult *r = NULL;
    int rc = kp_db_exec(db, &r,
                        "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies), "
                        "(SELECT count(*) FROM series), (SELECT count(*) FROM instances), "
                        "(SELECT coalesce(sum(file_size), 0) FROM instances)",
                        0, NULL);
    if (rc) {
        kp_db_destroy(&db);
        return 1;
    }
    double bytes = atof(PQgetvalue(r, 0, 4));
    printf("patients   %s\nstudies    %s\nseries     %s\ninstances  %s\nstored     %.2f MiB\n",
           PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 3),
           bytes / 1048576.0);
    PQclear(r);
    s_print_query(db, "\njobs (outbox)            state      count      oldest pending (s)",
                  "SELECT type, state, count(*), coalesce(extract(epoch FROM now() - min("
                  "created_at) FILTER (WHERE state = 'pending')), 0)::int FROM jobs GROUP BY "
                  "type, state ORDER BY type, state");
    rc = pacsctl_stats_compression(db);
    kp_db_destroy(&db);
    return rc;
}

/* `stats`: the index, then the broker's queues and workers (each shown even when the other
 * part is unreachable). */
static int s_stats(const kp_config_t *cfg)
{
    int rc = s_stats_index(cfg);
    fflush(stdout);

    kp_bus_t *bus = kp_bus_new(cfg, "pacsctl");
    json_t *js = NULL;
    if (bus && kp_bus_stats(bus, &js, 1500) == 0 && js) {
        printf("\nbroker queues            queued     in flight\n");
        const char *type;
        json_t *q;
        size_t nq = 0;
        json_object_foreach(json_object_get(js, "queues"), type, q)
        {
            printf("  %-22s %-10lld %lld\n", type,
                   (long long)json_integer_value(json_object_get(q, "queued")),
                   (long long)json_integer_value(json_object_get(q, "inflight")));
            nq++;
        }
        if (!nq) printf("  (none)\n");
        printf("workers                                  types      credit   in flight  seen (ms "
               "ago)\n");
        size_t i;
        json_t *w;
        json_array_foreach(json_object_get(js, "workers"), i, w)
        {
            char *types = json_dumps(json_object_get(w, "types"), JSON_COMPACT | JSON_ENCODE_ANY);
            printf("  %-38s %-10s %-8lld %-10lld %lld\n",
                   json_string_value(json_object_get(w, "name")), types ? types : "",
                   (long long)json_integer_value(json_object_get(w, "credit")),
                   (long long)json_integer_value(json_object_get(w, "inflight")),
                   (long long)json_integer_value(json_object_get(w, "last_seen_ms")));
            free(types);
        }
        if (!json_array_size(json_object_get(js, "workers"))) printf("  (none)\n");
        json_decref(js);
    } else {
        printf("\nbroker: not reachable at %s\n", cfg->bus_jobs_endpoint);
    }
    kp_bus_destroy(&bus);
    return rc;
}

struct s_reindex {
    kp_db_t *db;
    kp_storage_t *st;
    kp_index_item_t items[64];
    char rel[64][KP_STORAGE_RELPATH_MAX];
    size_t n;
    long done, failed, total;
    bool tty;
    struct timespec started;
};

static void s_progress(struct s_reindex *ri, bool final)
{
    if (!ri->tty) return;
    long t = ri->total > 0 ? ri->total : 1;
    int width = 40, filled = (int)(width * (ri->done + ri->failed) / t);
    if (filled > width) filled = width;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double el = (double)(now.tv_sec - ri->started.tv_sec) +
                (double)(now.tv_nsec - ri->started.tv_nsec) / 1e9;
    fprintf(stderr, "\r[%.*s%*s] %ld/%ld  %.0f/s  %ld failed", filled,
            "########################################", width - filled, "", ri->done + ri->failed,
            ri->total, el > 0 ? (ri->done + ri->failed) / el : 0.0, ri->failed);
    if (final) fprintf(stderr, "\n");
}

static int s_reindex_flush(struct s_reindex *ri)
{
    if (!ri->n) return 0;
    int rc = kp_index_batch(ri->db, ri->st, ri->items, ri->n, NULL, NULL);
    if (rc) return rc;
    for (size_t i = 0; i < ri->n; i++) {
        if (ri->items[i].result == 0)
            ri->done++;
        else {
            ri->failed++;
            if (!ri->tty)
                fprintf(stderr, "pacsctl: %s: %s\n", ri->items[i].rel,
                        kp_strerror(ri->items[i].result));
        }
    }
    ri->n = 0;
    s_progress(ri, false);
    return 0;
}

static int s_reindex_file(void *user, const char *rel)
{
    struct s_reindex *ri = user;
    snprintf(ri->rel[ri->n], KP_STORAGE_RELPATH_MAX, "%s", rel);
    ri->items[ri->n] = (kp_index_item_t){.rel = ri->rel[ri->n], .size = -1};
    ri->n++;
    return ri->n == 64 ? s_reindex_flush(ri) : 0;
}

static int s_count_file(void *user, const char *rel)
{
    (void)rel;
    ((struct s_reindex *)user)->total++;
    return 0;
}

static int s_reindex(const kp_config_t *cfg, int argc, char **argv)
{
    bool wipe = false;
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--wipe")) wipe = true;
    struct s_reindex ri = {.tty = isatty(STDERR_FILENO)};
    clock_gettime(CLOCK_MONOTONIC, &ri.started);
    int rc = 1;
    if (kp_dicom_init()) return 1;
    ri.db = pacsctl_db(cfg, true);
    kp_index_set_site_map(cfg->sites_map);
    ri.st = kp_storage_new(cfg->storage_root, cfg->storage_fsync);
    if (!ri.db || !ri.st) goto done;
    if (wipe && (kp_db_run(ri.db, "TRUNCATE instances, series, studies, patients", 0, NULL) ||
                 /* numbering from 1 again (RESTART IDENTITY would need to own the sequences; the
                  * services' role may only use them) */
                 kp_db_run(ri.db,
                           "SELECT setval(pg_get_serial_sequence(t, 'pk'), 1, false) FROM unnest("
                           "ARRAY['instances', 'series', 'studies', 'patients']) t",
                           0, NULL)))
        goto done;
    kp_storage_walk(ri.st, s_count_file, &ri);
    int wr = kp_storage_walk(ri.st, s_reindex_file, &ri);
    if (!wr) wr = s_reindex_flush(&ri);
    s_progress(&ri, true);
    if (wr) {
        fprintf(stderr, "pacsctl: reindex stopped: %s\n", kp_strerror(wr));
        goto done;
    }
    printf("reindexed %ld files (%ld could not be indexed)\n", ri.done, ri.failed);
    rc = 0;
done:
    kp_db_destroy(&ri.db);
    kp_storage_destroy(&ri.st);
    kp_dicom_shutdown();
    return rc;
}

static int s_jobs(const kp_config_t *cfg, int argc, char **argv)
{
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    int rc = 0;
    if (argc >= 1 && !strcmp(argv[0], "retry")) {
        PGresult *r = NULL;
        if (argc >= 2 && !strcmp(argv[1], "--failed")) {
            rc = kp_db_exec(db, &r,
                            "UPDATE jobs SET state = 'pending', attempts = 0, lease_until = now(), "
                            "updated_at = now() WHERE state = 'failed' RETURNING id",
                            0, NULL);
        } else if (argc >= 2) {
            const char *p[] = {argv[1]};
            rc = kp_db_exec(db, &r,
                            "UPDATE jobs SET state = 'pending', attempts = 0, lease_until = now(), "
                            "updated_at = now() WHERE id = $1::bigint AND state <> 'pending' "
                            "RETURNING id",
                            1, p);
        } else {
            s_usage();
            rc = 2;
        }
        if (r) {
            printf("%d job(s) made pending again; the next sweep publishes them\n", PQntuples(r));
            PQclear(r);
        }
    } else {
        const char *state = NULL, *limit = "50";
        for (int i = 0; i < argc; i++) {
            if (!strcmp(argv[i], "--state") && i + 1 < argc)
                state = argv[++i];
            else if (!strcmp(argv[i], "--limit") && i + 1 < argc)
                limit = argv[++i];
        }
        const char *p[] = {state, limit};
        PGresult *r = NULL;
        rc = kp_db_exec(db, &r,
                        "SELECT id, type, state, attempts, to_char(created_at, 'YYYY-MM-DD "
                        "HH24:MI:SS'), coalesce(last_error, ''), payload->>'sop' FROM jobs WHERE "
                        "($1::text IS NULL OR state = $1) ORDER BY id DESC LIMIT $2::int",
                        2, p);
        if (!rc) {
            printf("%-10s %-8s %-8s %-4s %-20s %s\n", "id", "type", "state", "try", "created",
                   "detail");
            for (int i = 0; i < PQntuples(r); i++)
                printf("%-10s %-8s %-8s %-4s %-20s %s %s\n", PQgetvalue(r, i, 0),
                       PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3),
                       PQgetvalue(r, i, 4), PQgetvalue(r, i, 6), PQgetvalue(r, i, 5));
            PQclear(r);
        }
    }
    kp_db_destroy(&db);
    return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    int rest[argc + 1];
    memset(rest, 0, sizeof rest);
    bool exit_now = false;
    kp_log_threshold = KP_LOG_WARN;
    kp_config_t *cfg = kp_config_from_args(argc, argv, "pacsctl", &exit_now, rest);
    if (!cfg) return exit_now ? 0 : 1;
    if (exit_now) {
        kp_config_destroy(&cfg);
        return 0;
    }
    if (kp_log_threshold == KP_LOG_INFO && !getenv("KP_LOG_LEVEL")) kp_log_threshold = KP_LOG_WARN;
    char *args[argc + 1];
    int n = 0;
    for (int i = 1; i < argc; i++)
        if (rest[i]) args[n++] = argv[i];
    args[n] = NULL;
    int rc = 2;
    if (n == 0)
        s_usage();
    else if (!strcmp(args[0], "migrate"))
        rc = s_migrate(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "stats"))
        rc = s_stats(cfg);
    else if (!strcmp(args[0], "reindex"))
        rc = s_reindex(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "jobs"))
        rc = s_jobs(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "ae"))
        rc = pacsctl_ae(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "route"))
        rc = pacsctl_route(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "user"))
        rc = pacsctl_user(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "audit"))
        rc = pacsctl_audit(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "health"))
        rc = pacsctl_health(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "workers"))
        rc = pacsctl_workers(cfg, n - 1, args + 1);
    else if (!strcmp(args[0], "status") && n == 1)
        rc = pacsctl_status(cfg);
    else if (!strcmp(args[0], "backup"))
        rc = pacsctl_backup(cfg, n - 1, args + 1, false);
    else if (!strcmp(args[0], "restore"))
        rc = pacsctl_backup(cfg, n - 1, args + 1, true);
    else if (!strcmp(args[0], "bus") && n == 3 && !strcmp(args[1], "keygen")) {
        char pub[KP_CURVE_KEY_LEN + 1];
        rc = kp_curve_keygen(args[2], pub) ? 1 : 0;
        if (!rc)
            printf("key pair written to %s\npublic key: %s\n(set bus.curve_server_public to it "
                   "when this is the broker's key)\n",
                   args[2], pub);
    } else if (!strcmp(args[0], "config-get") && n == 2) {
        char val[1024];
        rc = kp_config_get(cfg, args[1], val, sizeof val) ? 1 : 0;
        if (rc)
            fprintf(stderr, "pacsctl: unknown setting '%s'\n", args[1]);
        else
            printf("%s\n", val);
    } else if (!strcmp(args[0], "config-example")) {
        kp_config_write_example(stdout);
        rc = 0;
    } else {
        fprintf(stderr, "pacsctl: unknown command '%s'\n", args[0]);
        s_usage();
    }
    kp_config_destroy(&cfg);
    return rc;
}
