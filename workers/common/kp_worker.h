/* kp_worker: the start every worker process shares (pacs-indexer, -auditor, -compressor,
 * -reporter). */
#ifndef KP_WORKER_H
#define KP_WORKER_H

#include "kp_config.h"

#include <signal.h>

/* Reads the configuration from the command line (as kp_config_from_args; rest may be NULL) and
 * makes SIGINT and SIGTERM set *stop, so the main loop finishes the job in hand and exits.
 * NULL when the process has nothing more to do: *rc is then its exit status (0 after --help or
 * --check-config, 1 on a bad configuration). */
kp_config_t *kp_worker_start(int argc, char **argv, const char *process,
                             volatile sig_atomic_t *stop, int *rest, int *rc);

#endif
