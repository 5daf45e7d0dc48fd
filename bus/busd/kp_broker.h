/* kp_broker: the job side of pacs-busd — queues, workers, credit, in-flight jobs.
 *
 * The broker owns no socket: it reads and writes the ROUTER it is given, from the single
 * thread of the busd main loop. Jobs wait in one FIFO queue per type; a worker that announced
 * READY for that type and still has credit receives the oldest one (the least loaded such
 * worker, ties broken round-robin). A dispatched job stays in the in-flight table until the
 * worker sends DONE; it is queued again (attempt + 1) when bus.job_timeout passes or when its
 * worker is lost (silent for heartbeat_liveness x heartbeat_ms, or unroutable), at most
 * jobs.max_attempts deliveries in all. A job id that is already queued or in flight is ignored
 * when submitted again. */
#ifndef KP_BROKER_H
#define KP_BROKER_H

#include "kp_config.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kp_broker kp_broker_t;

/* A broker serving the given (bound) ROUTER socket; the socket stays the caller's. Settings are
 * copied from cfg. Owned by the caller. */
kp_broker_t *kp_broker_new(void *router, const kp_config_t *cfg);
/* Frees every queued job and worker record and clears *b; idempotent. */
void kp_broker_destroy(kp_broker_t **b);
/* Reads and handles the messages waiting on the ROUTER (without blocking). */
void kp_broker_read(kp_broker_t *b);
/* Queues an encoded job from inside busd (the outbox sweep); `from` names it in logs.
 * 0 queued; 1 when that id is already queued or in flight (ignored); a negative code when
 * dropped (malformed, broker full). *id: the job id, or 0 when the message did not decode. */
int kp_broker_submit(kp_broker_t *b, const void *body, size_t len, const char *from, int64_t *id);
/* Heartbeats, lost workers, job timeouts and dispatch. Returns the milliseconds after which it
 * wants to run again (the poll timeout of the main loop). */
int kp_broker_tick(kp_broker_t *b);

#endif
