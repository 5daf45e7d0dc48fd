/* kp_sweep: the outbox sweep of pacs-busd (ARCHITECTURE section 3).
 *
 * PostgreSQL is the source of truth: every job is a row of `jobs`, and the bus only carries
 * notifications. The sweep runs in its own thread so that a slow or absent database never
 * stalls the broker loop: at start-up and every jobs.sweep_interval seconds it claims the
 * pending jobs whose lease expired (one UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING), and
 * hands them to the main loop as ordinary encoded SUBMIT messages over an inproc PAIR socket;
 * the broker de-duplicates them against what it already holds, and the jobs it already held
 * get their attempt back (KP_SWEEP_HELD below). Jobs that used up
 * jobs.max_attempts become 'failed'; finished rows older than jobs.retention are deleted.
 * When the database is down the sweep logs it and tries again next interval. */
#ifndef KP_SWEEP_H
#define KP_SWEEP_H

#include "kp_config.h"

#include <stdbool.h>

/* Feedback from the main loop: [KP_SWEEP_HELD][int64_t ids, native byte order] lists jobs the
 * sweep published that the broker already held (queued or in flight: not lost, just slow or
 * waiting for a worker). The sweep gives their attempt back, so that jobs.max_attempts counts
 * real re-deliveries, not the time a job waited in a queue. At most KP_SWEEP_HELD_MAX ids. */
#define KP_SWEEP_HELD     "HELD"
#define KP_SWEEP_HELD_MAX 2000

typedef struct kp_sweep kp_sweep_t;

/* Starts the sweep thread in ZeroMQ context ctx. *pipe receives the main loop's end of the
 * PAIR socket (owned by the sweep: poll it, read [SUBMIT][body] messages from it, do not close
 * it). cfg must outlive the sweep. NULL on failure (logged). */
kp_sweep_t *kp_sweep_start(void *ctx, const kp_config_t *cfg, void **pipe);
/* Stops the thread, waiting up to timeout_ms for it to finish a database call. true when the
 * thread has ended and everything is freed (then *s is cleared); false when it is still busy
 * in libpq: the caller should exit the process without zmq_ctx_term(). */
bool kp_sweep_stop(kp_sweep_t **s, int timeout_ms);

#endif
