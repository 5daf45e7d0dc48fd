/* pacsctl: the compression part of `pacsctl stats` (pacs-compressor's decisions, see
 * schema/0007_compression.sql). Only decisions about the files the index points to now count:
 * an instance stored again since it was compressed is a candidate again, not a saving. */
#include "kp_errors.h"
#include "pacsctl.h"

#include <stdio.h>
#include <stdlib.h>

int pacsctl_stats_compression(kp_db_t *db)
{
    PGresult *r = NULL;
    int rc = kp_db_exec(
        db, &r,
        "SELECT count(*) FILTER (WHERE c.outcome = 'compressed' AND c.after_sha256 = "
        "i.file_sha256), coalesce(sum(c.before_size) FILTER (WHERE c.outcome = 'compressed' AND "
        "c.after_sha256 = i.file_sha256), 0), coalesce(sum(i.file_size) FILTER (WHERE c.outcome "
        "= 'compressed' AND c.after_sha256 = i.file_sha256), 0), count(*) FILTER (WHERE "
        "c.outcome = 'skipped' AND c.before_sha256 = i.file_sha256), count(*) FILTER (WHERE "
        "c.sop_uid IS NULL OR i.file_sha256 NOT IN (c.before_sha256, coalesce(c.after_sha256, "
        "''))), coalesce(sum(i.file_size), 0) FROM instances i LEFT JOIN compression c ON "
        "c.sop_uid = i.sop_uid",
        0, NULL);
    if (rc) return 1;
    long long n = atoll(PQgetvalue(r, 0, 0)), before = atoll(PQgetvalue(r, 0, 1)),
              after = atoll(PQgetvalue(r, 0, 2)), skipped = atoll(PQgetvalue(r, 0, 3)),
              open = atoll(PQgetvalue(r, 0, 4)), stored = atoll(PQgetvalue(r, 0, 5));
    PQclear(r);
    r = NULL;
    long long uncompressed = stored - after + before; /* what the archive would hold without */
    printf("\ncompression\n");
    printf("  compressed             %lld instances: %lld bytes before, %lld bytes after", n,
           before, after);
    if (after > 0)
        printf(" (ratio %.2f:1, %.1f%% saved)\n", (double)before / (double)after,
               100.0 * (double)(before - after) / (double)before);
    else
        printf("\n");
    printf("  stored                 %lld bytes (%lld bytes without compression)\n", stored,
           uncompressed);
    printf("  skipped                %lld instances\n", skipped);
    rc = kp_db_exec(db, &r,
                    "SELECT c.reason, count(*) FROM compression c JOIN instances i ON i.sop_uid "
                    "= c.sop_uid AND i.file_sha256 = c.before_sha256 WHERE c.outcome = "
                    "'skipped' GROUP BY c.reason ORDER BY count(*) DESC, c.reason",
                    0, NULL);
    if (rc) return 1;
    for (int i = 0; i < PQntuples(r); i++)
        printf("    %-20s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1));
    PQclear(r);
    printf("  not decided yet        %lld instances\n", open);
    return 0;
}
