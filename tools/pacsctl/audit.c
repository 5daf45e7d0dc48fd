/* pacsctl audit: the audit trail from the command line (schema/0004_audit.sql).
 *
 *   pacsctl audit verify [--textfile FILE]
 *       Walks audit_log in seq order, recomputing every hash with kp_audit_hash() (the same
 *       code as pacs-auditor). Prints "audit chain intact: N records" and the head (seq, hash:
 *       worth copying elsewhere, since removing the newest rows leaves a shorter chain that is
 *       still intact) and exits 0, or names the first broken record - a gap in seq, a
 *       prev_hash that is not the previous hash, or a hash that does not match the record - and
 *       exits 1. --textfile also writes the outcome as Prometheus metrics into FILE (for
 *       node_exporter's textfile collector; the alert rules in config/monitoring/ use it).
 *   pacsctl audit list [--user U] [--action A] [--limit N]
 *       The newest records first (default 50). */
#include "kp_audit.h"
#include "kp_errors.h"
#include "pacsctl.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define S_PAGE "2000"

static const char *s_val(PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

static int s_verify(kp_db_t *db, long long *records)
{
    char after[24] = "0", prev[65] = KP_AUDIT_GENESIS, head[65] = "";
    long long expect = 1, count = 0;
    for (;;) {
        const char *p[] = {after};
        PGresult *r = NULL;
        if (kp_db_exec(
                db, &r,
                "SELECT seq, event_id, " KP_AUDIT_AT_SQL(
                    "at") ", actor, action, outcome, "
                          "client, patient_id, study_uid, detail::text, prev_hash, hash FROM "
                          "audit_log WHERE seq > $1::bigint ORDER BY seq LIMIT " S_PAGE,
                1, p)) {
            fprintf(stderr, "pacsctl: cannot read audit_log\n");
            return 1;
        }
        int n = PQntuples(r);
        for (int i = 0; i < n; i++) {
            long long seq = atoll(PQgetvalue(r, i, 0));
            const char *stored_prev = PQgetvalue(r, i, 10), *stored = PQgetvalue(r, i, 11);
            if (seq != expect) {
                printf("audit chain BROKEN at seq %lld: gap in seq (expected %lld after %lld "
                       "intact records; records %lld..%lld are missing)\n",
                       seq, expect, count, expect, seq - 1);
                PQclear(r);
                return 1;
            }
            if (strcmp(stored_prev, prev)) {
                printf("audit chain BROKEN at seq %lld: prev_hash mismatch (stored %s, previous "
                       "record's hash %s)\n",
                       seq, stored_prev, prev);
                PQclear(r);
                return 1;
            }
            json_t *detail = NULL;
            if (!PQgetisnull(r, i, 9)) {
                detail = json_loads(PQgetvalue(r, i, 9), JSON_DECODE_ANY, NULL);
                if (!detail) {
                    printf("audit chain BROKEN at seq %lld: detail is not readable JSON\n", seq);
                    PQclear(r);
                    return 1;
                }
            }
            kp_audit_record_t rec = {
                .seq = seq,
                .event_id = s_val(r, i, 1),
                .at = s_val(r, i, 2),
                .actor = s_val(r, i, 3),
                .action = s_val(r, i, 4),
                .outcome = s_val(r, i, 5),
                .client = s_val(r, i, 6),
                .patient_id = s_val(r, i, 7),
                .study_uid = s_val(r, i, 8),
                .detail = detail,
                .prev_hash = stored_prev,
            };
            char hash[65];
            int hr = kp_audit_hash(&rec, hash);
            json_decref(detail);
            if (hr || strcmp(hash, stored)) {
                printf("audit chain BROKEN at seq %lld: hash mismatch (stored %s, recomputed "
                       "%s): the record was changed\n",
                       seq, stored, hr ? "(not computable)" : hash);
                PQclear(r);
                return 1;
            }
            memcpy(prev, stored, sizeof prev);
            memcpy(head, stored, sizeof head);
            expect = seq + 1;
            count++;
            *records = count;
        }
        if (n) snprintf(after, sizeof after, "%s", PQgetvalue(r, n - 1, 0));
        PQclear(r);
        if (n == 0) break;
    }
    *records = count;
    printf("audit chain intact: %lld records\n", count);
    if (count) printf("head: seq %lld hash %s\n", expect - 1, head);
    return 0;
}

static int s_list(kp_db_t *db, int argc, char **argv)
{
    const char *user = NULL, *action = NULL, *limit = "50";
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--user") && i + 1 < argc)
            user = argv[++i];
        else if (!strcmp(argv[i], "--action") && i + 1 < argc)
            action = argv[++i];
        else if (!strcmp(argv[i], "--limit") && i + 1 < argc)
            limit = argv[++i];
        else {
            fprintf(stderr, "pacsctl: audit list: unknown or incomplete option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (atol(limit) < 1) {
        fprintf(stderr, "pacsctl: audit list: --limit must be a positive number\n");
        return 2;
    }
    const char *p[] = {user, action, limit};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r,
                   "SELECT seq, to_char(at, 'YYYY-MM-DD HH24:MI:SS'), coalesce(actor, '-'), "
                   "action, outcome, coalesce(client, '-'), concat_ws(' ', 'patient=' || "
                   "patient_id, 'study=' || study_uid, detail::text) FROM audit_log WHERE "
                   "($1::text IS NULL OR lower(actor) = lower($1)) AND ($2::text IS NULL OR "
                   "action = $2) ORDER BY seq DESC LIMIT $3::int",
                   3, p))
        return 1;
    printf("%-8s %-19s %-16s %-20s %-8s %-16s %s\n", "seq", "at", "actor", "action", "outcome",
           "client", "detail");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-8s %-19s %-16s %-20s %-8s %-16s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
               PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4), PQgetvalue(r, i, 5),
               PQgetvalue(r, i, 6));
    if (!PQntuples(r)) printf("(no record)\n");
    PQclear(r);
    return 0;
}

/* --textfile: the outcome for Prometheus (node_exporter's textfile collector), written to a
 * temporary file and renamed so the collector never reads half of it. */
static int s_textfile(const char *path, bool ok, long long records)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        perror(tmp);
        return 1;
    }
    fprintf(f,
            "# HELP klinika_audit_chain_ok 1 when the last pacsctl audit verify found the audit "
            "trail intact, 0 when broken\n# TYPE klinika_audit_chain_ok gauge\n"
            "klinika_audit_chain_ok %d\n"
            "# HELP klinika_audit_chain_records Records verified (up to the first broken one)\n"
            "# TYPE klinika_audit_chain_records gauge\nklinika_audit_chain_records %lld\n"
            "# HELP klinika_audit_chain_verified_timestamp_seconds When the verification ran\n"
            "# TYPE klinika_audit_chain_verified_timestamp_seconds gauge\n"
            "klinika_audit_chain_verified_timestamp_seconds %lld\n",
            ok ? 1 : 0, records, (long long)time(NULL));
    if (fclose(f) || rename(tmp, path)) {
        perror(path);
        unlink(tmp);
        return 1;
    }
    return 0;
}

int pacsctl_audit(const kp_config_t *cfg, int argc, char **argv)
{
    const char *textfile = NULL;
    if (argc == 3 && !strcmp(argv[0], "verify") && !strcmp(argv[1], "--textfile"))
        textfile = argv[2];
    else if (argc < 1 || (strcmp(argv[0], "list") && (strcmp(argv[0], "verify") || argc != 1))) {
        fprintf(stderr, "usage: pacsctl audit verify [--textfile FILE] | list [--user U] "
                        "[--action A] [--limit N]\n");
        return 2;
    }
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    int rc;
    if (!strcmp(argv[0], "verify")) {
        long long records = 0;
        rc = s_verify(db, &records);
        if (textfile && s_textfile(textfile, rc == 0, records) && rc == 0) rc = 1;
    } else {
        rc = s_list(db, argc - 1, argv + 1);
    }
    kp_db_destroy(&db);
    return rc;
}
