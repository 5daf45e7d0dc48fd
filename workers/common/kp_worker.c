/* kp_worker: see kp_worker.h. */
#include "kp_worker.h"

#include <stddef.h>

static volatile sig_atomic_t *s_stop;

static void s_on_signal(int sig)
{
    (void)sig;
    if (s_stop) *s_stop = 1;
}

kp_config_t *kp_worker_start(int argc, char **argv, const char *process,
                             volatile sig_atomic_t *stop, int *rest, int *rc)
{
    bool exit_now = false;
    kp_config_t *cfg = kp_config_from_args(argc, argv, process, &exit_now, rest);
    *rc = exit_now ? 0 : 1;
    if (cfg && exit_now) kp_config_destroy(&cfg);
    if (!cfg) return NULL;
    s_stop = stop;
    struct sigaction sa = {.sa_handler = s_on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    return cfg;
}
