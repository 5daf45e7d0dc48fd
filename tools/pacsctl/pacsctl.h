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

/* `pacsctl user ...`: accounts. Returns the exit status. */
int pacsctl_user(const kp_config_t *cfg, int argc, char **argv);

/* `pacsctl audit verify|list ...`: the audit trail. Returns the exit status. */
int pacsctl_audit(const kp_config_t *cfg, int argc, char **argv);

#endif
