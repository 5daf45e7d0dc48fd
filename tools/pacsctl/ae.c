/* pacsctl ae: the modality registry (schema/0002_modalities.sql).
 *
 *   pacsctl ae list
 *   pacsctl ae add AE --host H --port P [--description D] [--site S]
 *                     [--no-store] [--no-find] [--no-retrieve] [--tls]
 *                     [--move-associations N]                            (adds, or updates)
 *                           N (1..16, default 1): associations a C-MOVE to this AE may use
 *                           at once (schema/0010_move_associations.sql)
 *   pacsctl ae remove AE
 *   pacsctl ae echo AE      C-ECHO from our AE title to the registered peer (over DICOM TLS
 *                           when it is registered with --tls: our certificate dicom.tls_cert /
 *                           tls_key, the peer's verified against dicom.tls_ca)
 *
 * Values are checked here with clear messages, and again by the table's constraints. */
#include "kp_dicom.h"
#include "kp_errors.h"
#include "pacsctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* PS3.5 VR AE: 1..16 characters of the default repertoire, no backslash or control character,
 * not only spaces; we also refuse leading/trailing spaces (they are not significant). */
static const char *s_check_ae(const char *ae)
{
    size_t n = strlen(ae);
    if (n < 1 || n > 16) return "an AE title has 1 to 16 characters";
    for (size_t i = 0; i < n; i++)
        if (ae[i] < 0x20 || ae[i] > 0x7e || ae[i] == '\\')
            return "an AE title may not hold a backslash, control or non-ASCII characters";
    if (ae[0] == ' ' || ae[n - 1] == ' ') return "an AE title may not start or end with a space";
    return NULL;
}

static int s_list(kp_db_t *db)
{
    PGresult *r = NULL;
    if (kp_db_exec(
            db, &r,
            "SELECT ae_title, host, port, CASE WHEN allow_store THEN 'store ' ELSE '' END || "
            "CASE WHEN allow_find THEN 'find ' ELSE '' END || CASE WHEN allow_retrieve "
            "THEN 'retrieve' ELSE '' END, CASE WHEN tls THEN 'yes' ELSE 'no' END, "
            "move_associations, site, description FROM modalities ORDER BY ae_title",
            0, NULL))
        return 1;
    printf("%-16s %-24s %-6s %-22s %-4s %-5s %-12s %s\n", "AE title", "host", "port", "allowed",
           "tls", "moves", "site", "description");
    for (int i = 0; i < PQntuples(r); i++)
        printf("%-16s %-24s %-6s %-22s %-4s %-5s %-12s %s\n", PQgetvalue(r, i, 0),
               PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
               PQgetvalue(r, i, 5), PQgetvalue(r, i, 6), PQgetvalue(r, i, 7));
    if (!PQntuples(r)) printf("(no modality registered: pacsctl ae add AE --host H --port P)\n");
    PQclear(r);
    return 0;
}

static int s_add(kp_db_t *db, int argc, char **argv)
{
    const char *ae = argv[0], *host = NULL, *port = NULL, *desc = "", *site = "";
    const char *store = "true", *find = "true", *retrieve = "true", *tls = "false";
    const char *nassoc = "1";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc)
            host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port = argv[++i];
        else if (!strcmp(argv[i], "--description") && i + 1 < argc)
            desc = argv[++i];
        else if (!strcmp(argv[i], "--site") && i + 1 < argc)
            site = argv[++i];
        else if (!strcmp(argv[i], "--no-store"))
            store = "false";
        else if (!strcmp(argv[i], "--no-find"))
            find = "false";
        else if (!strcmp(argv[i], "--no-retrieve"))
            retrieve = "false";
        else if (!strcmp(argv[i], "--tls"))
            tls = "true";
        else if (!strcmp(argv[i], "--move-associations") && i + 1 < argc)
            nassoc = argv[++i];
        else {
            fprintf(stderr, "pacsctl: ae add: unknown or incomplete option '%s'\n", argv[i]);
            return 2;
        }
    }
    const char *why = s_check_ae(ae);
    char *end = NULL;
    long p = port ? strtol(port, &end, 10) : 0;
    if (!why && (!host || !*host || strlen(host) > 253))
        why = "--host is required (name or address)";
    if (!why && (!port || *end || p < 1 || p > 65535)) why = "--port must be 1 to 65535";
    long na = strtol(nassoc, &end, 10);
    if (!why && (!*nassoc || *end || na < 1 || na > 16))
        why = "--move-associations must be 1 to 16";
    if (why) {
        fprintf(stderr, "pacsctl: ae add: %s\n", why);
        return 2;
    }
    const char *params[] = {ae, host, port, desc, site, store, find, retrieve, tls, nassoc};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r,
                   "INSERT INTO modalities (ae_title, host, port, description, site, allow_store, "
                   "allow_find, allow_retrieve, tls, move_associations) VALUES ($1, $2, $3::int, "
                   "$4, $5, $6::boolean, $7::boolean, $8::boolean, $9::boolean, $10::smallint) ON "
                   "CONFLICT (ae_title) DO UPDATE SET "
                   "host = EXCLUDED.host, port = EXCLUDED.port, description = "
                   "EXCLUDED.description, site = EXCLUDED.site, allow_store = "
                   "EXCLUDED.allow_store, allow_find = EXCLUDED.allow_find, allow_retrieve = "
                   "EXCLUDED.allow_retrieve, tls = EXCLUDED.tls, move_associations = "
                   "EXCLUDED.move_associations, updated_at = now() RETURNING (xmax = 0)",
                   10, params))
        return 1;
    printf("%s %s (%s:%s)\n", PQgetvalue(r, 0, 0)[0] == 't' ? "added" : "updated", ae, host, port);
    PQclear(r);
    return 0;
}

static int s_remove(kp_db_t *db, const char *ae)
{
    const char *params[] = {ae};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, "DELETE FROM modalities WHERE ae_title = $1 RETURNING pk", 1, params))
        return 1;
    int n = PQntuples(r);
    PQclear(r);
    if (!n) {
        fprintf(stderr, "pacsctl: ae remove: %s is not registered\n", ae);
        return 1;
    }
    printf("removed %s\n", ae);
    return 0;
}

static int s_echo(const kp_config_t *cfg, kp_db_t *db, const char *ae)
{
    const char *params[] = {ae};
    PGresult *r = NULL;
    if (kp_db_exec(db, &r, "SELECT host, port, tls FROM modalities WHERE ae_title = $1", 1, params))
        return 1;
    if (PQntuples(r) != 1) {
        PQclear(r);
        fprintf(stderr, "pacsctl: ae echo: %s is not registered (pacsctl ae list)\n", ae);
        return 1;
    }
    char host[256], err[512];
    snprintf(host, sizeof host, "%s", PQgetvalue(r, 0, 0));
    int port = atoi(PQgetvalue(r, 0, 1));
    bool tls = !strcmp(PQgetvalue(r, 0, 2), "t");
    PQclear(r);
    if (tls && !*cfg->dicom_tls_ca) {
        fprintf(
            stderr,
            "pacsctl: ae echo: %s is registered with TLS: set dicom.tls_ca (and dicom.tls_cert, "
            "dicom.tls_key for a client certificate)\n",
            ae);
        return 1;
    }
    if (kp_dicom_init()) return 1;
    kp_dicom_tls_t t = {.cert_file = cfg->dicom_tls_cert,
                        .key_file = cfg->dicom_tls_key,
                        .ca_file = cfg->dicom_tls_ca};
    int rc = kp_dicom_echo_tls(host, port, cfg->dicom_ae_title, ae, (int)cfg->dicom_acse_timeout,
                               tls ? &t : NULL, err, sizeof err);
    kp_dicom_shutdown();
    const char *how = tls ? " (TLS)" : "";
    if (rc) {
        printf("C-ECHO %s -> %s at %s:%d%s failed: %s\n", cfg->dicom_ae_title, ae, host, port, how,
               err);
        return 1;
    }
    printf("C-ECHO %s -> %s at %s:%d%s: success\n", cfg->dicom_ae_title, ae, host, port, how);
    return 0;
}

int pacsctl_ae(const kp_config_t *cfg, int argc, char **argv)
{
    const char *cmd = argc ? argv[0] : "list";
    if (strcmp(cmd, "list") && argc < 2) {
        fprintf(stderr, "pacsctl: ae %s needs an AE title\n", cmd);
        return 2;
    }
    kp_db_t *db = pacsctl_db(cfg, true);
    if (!db) return 1;
    int rc = 2;
    if (!strcmp(cmd, "list"))
        rc = s_list(db);
    else if (!strcmp(cmd, "add"))
        rc = s_add(db, argc - 1, argv + 1);
    else if (!strcmp(cmd, "remove"))
        rc = s_remove(db, argv[1]);
    else if (!strcmp(cmd, "echo"))
        rc = s_echo(cfg, db, argv[1]);
    else
        fprintf(stderr, "pacsctl: unknown ae command '%s' (list, add, remove, echo)\n", cmd);
    kp_db_destroy(&db);
    return rc;
}
