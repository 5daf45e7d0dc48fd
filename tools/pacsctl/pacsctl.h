/* pacsctl internals shared between its command files. */
#ifndef PACSCTL_H
#define PACSCTL_H

#include "kp_config.h"
#include "kp_db.h"

#include <stdbool.h>

/* Connects to the index (check: refuse an unknown schema); prints the reason and returns NULL
 * on failure. Owned by the caller. */
kp_db_t *pacsctl_db(const kp_config_t *cfg, bool check);
/* `pacsctl ae ...`: the modality registry. Returns the exit status. */
int pacsctl_ae(const kp_config_t *cfg, int argc, char **argv);
/* `pacsctl route ...`: routing rules and deliveries. Returns the exit status. */
int pacsctl_route(const kp_config_t *cfg, int argc, char **argv);

/* `pacsctl user ...`: accounts. Returns the exit status. */
int pacsctl_user(const kp_config_t *cfg, int argc, char **argv);

/* `pacsctl audit verify|list ...`: the audit trail. Returns the exit status. */
int pacsctl_audit(const kp_config_t *cfg, int argc, char **argv);

/* `pacsctl health db|bus|dicom|worker KIND`: one check for health probes. Exit status. */
int pacsctl_health(const kp_config_t *cfg, int argc, char **argv);
/* `pacsctl backup ...` (restore false) and `pacsctl restore ...` (true). Exit status. */
int pacsctl_backup(const kp_config_t *cfg, int argc, char **argv, bool restore);
/* `pacsctl status`: every check at once, workers per kind, the job queues. Exit status. */
int pacsctl_status(const kp_config_t *cfg);

/* Creates db.app_role when missing and grants it every privilege but changing audit records
 * (after migrate and restore; connected as the schema's owner). 0, or 1 with the reason. */
int pacsctl_app_role(const kp_config_t *cfg, kp_db_t *db);
/* `pacsctl workers [--kind K] [--json]`: live workers from the broker. Exit status. */
int pacsctl_workers(const kp_config_t *cfg, int argc, char **argv);

/* The compression section of `pacsctl stats` (bytes before/after, skips by reason). 0, or 1
 * when the database failed. */
int pacsctl_stats_compression(kp_db_t *db);

#endif
