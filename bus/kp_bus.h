/* kp_bus: the client side of the message bus (ZeroMQ), used by producers, workers and event
 * subscribers. The broker is pacs-busd; the protocol is written down in schema/messages.md.
 *
 * Jobs: a kp_bus_t holds one DEALER connected to bus.jobs_endpoint. A producer calls
 * kp_bus_submit(), which never blocks: when the broker is unreachable the job simply stays in
 * the outbox (jobs table) and the broker's sweep publishes it later. A worker announces the job
 * types it serves and a credit (how many jobs it may hold at once) with kp_bus_worker_ready(),
 * then loops on kp_bus_next_job() / kp_bus_job_done(); heartbeats, broker-loss detection and
 * reconnection happen inside kp_bus_next_job(). Delivery is at least once: a job can arrive
 * again (attempt > 0) after a timeout or a lost worker, so every job handler is idempotent.
 *
 * Events: kp_bus_publish() sends on a PUB socket connected to bus.events_in (fire and forget,
 * dropped when nobody listens); a kp_bus_sub_t receives the events whose type starts with a
 * prefix from bus.events_out.
 *
 * Threads: a kp_bus_t or kp_bus_sub_t is NOT thread-safe. Use each from one thread at a time
 * (one per thread, or one shared behind a mutex: kp_bus_submit() never blocks, so holding a
 * mutex around it is cheap). Never use one across fork().
 *
 * Security: CurveZMQ keys will come from kp_config_t (bus.curve_* settings) and be applied
 * inside kp_bus_new() / kp_bus_subscribe() and the broker, so this API will not change. */
#ifndef KP_BUS_H
#define KP_BUS_H

#include "kp_config.h"
#include "kp_msg.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct kp_bus kp_bus_t;
typedef struct kp_bus_sub kp_bus_sub_t;

/* Command frames of the jobs protocol (first frame of every message, see schema/messages.md). */
#define KP_BUS_SUBMIT "SUBMIT"
#define KP_BUS_READY  "READY"
#define KP_BUS_JOB    "JOB"
#define KP_BUS_DONE   "DONE"
#define KP_BUS_HB     "HB"
#define KP_BUS_STATS  "STATS"
/* Most job types one worker may serve, and the largest credit it may announce. */
#define KP_BUS_MAX_TYPES  32
#define KP_BUS_MAX_CREDIT 100000

/* Connects to the broker (jobs DEALER) and to the event input (PUB). Connecting is
 * asynchronous, so this succeeds while the broker is down. kind is a short word naming the
 * process ("dicomd", "indexer"); the peer name shown by the broker is "host:pid:kind". cfg is
 * only read during the call. NULL on a bad endpoint (logged). Owned by the caller. */
kp_bus_t *kp_bus_new(const kp_config_t *cfg, const char *kind);
/* Closes the sockets (pending messages are dropped) and clears *bus; idempotent. */
void kp_bus_destroy(kp_bus_t **bus);
/* The name announced to the broker ("host:pid:kind"; borrowed). */
const char *kp_bus_name(const kp_bus_t *bus);

/* Waits up to timeout_ms for the connection to the broker to be up: 0, or KP_ETIMEOUT.
 * Optional (kp_bus_submit() fails fast while it is down); useful at start-up and in tests. */
int kp_bus_wait_connected(kp_bus_t *bus, int timeout_ms);

/* --- producers ------------------------------------------------------------------------------ */

/* Hands a job (job->id = its outbox row id, > 0) to the broker without blocking. 0 when queued
 * for sending; KP_EBUS when the broker is not connected or the send queue is full (the outbox
 * sweep will publish it later, so callers just log at debug level and carry on); KP_EINVAL /
 * KP_ETOOBIG for a job that cannot be encoded. */
int kp_bus_submit(kp_bus_t *bus, const kp_msg_t *job);

/* --- workers -------------------------------------------------------------------------------- */

/* Makes this bus a worker for the given job types (1..KP_BUS_MAX_TYPES, copied) with a credit
 * of jobs it may hold at once (1..KP_BUS_MAX_CREDIT) and sends READY (now, or as soon as the
 * broker is reachable). Call once, before kp_bus_next_job(). 0 or KP_EINVAL. */
int kp_bus_worker_ready(kp_bus_t *bus, const char *const *types, int ntypes, int credit);
/* Waits up to timeout_ms for a job. 0: *out holds it (the caller owns it: kp_msg_clear() it,
 * and call kp_bus_job_done() with its id once it is finished). KP_ETIMEOUT: none arrived, or a
 * signal interrupted the wait (check your flags and call again). Sends heartbeats, answers the
 * broker's, and when the broker has been silent for heartbeat_liveness x heartbeat_ms replaces
 * the socket and sends READY again (with the credit minus the jobs still held). Call it at
 * least every heartbeat_ms while working, or call kp_bus_heartbeat() during long jobs, or the
 * broker declares the worker lost and hands its jobs to another one. Malformed JOB messages
 * are logged and dropped. KP_EINVAL when not a worker. */
int kp_bus_next_job(kp_bus_t *bus, kp_msg_t *out, int timeout_ms);
/* Reports a job finished and returns its credit. ok=false: the handler failed and recorded why
 * in the jobs row; the broker forgets the job and the outbox sweep retries it after the lease.
 * (Marking the row done/failed in PostgreSQL is the worker's job, in the transaction that did
 * the work.) 0, or KP_EBUS when the broker is not connected (the credit is still accounted). */
int kp_bus_job_done(kp_bus_t *bus, int64_t id, bool ok);
/* Sends a heartbeat when one is due; never blocks. For workers in the middle of a long job. */
void kp_bus_heartbeat(kp_bus_t *bus);

/* --- admin ---------------------------------------------------------------------------------- */

/* Asks the broker for its queue statistics (for pacsctl; not on a worker bus: KP_EINVAL).
 * 0 and *out = {queues:{type:{queued,inflight}}, workers:[{name,types,credit,inflight,
 * last_seen_ms}]} (caller owns it), KP_ETIMEOUT, or KP_EMSG for a malformed answer. */
int kp_bus_stats(kp_bus_t *bus, json_t **out, int timeout_ms);

/* --- events --------------------------------------------------------------------------------- */

/* Publishes an event (ev->id is normally 0). Fire and forget: 0 even when nobody listens or
 * the broker is down (the event is then dropped); KP_EINVAL / KP_ETOOBIG when it cannot be
 * encoded. A PUB socket only delivers once connected and subscribed: events published in the
 * first moments after kp_bus_new() may be lost, so events are hints and PostgreSQL is the
 * truth. */
int kp_bus_publish(kp_bus_t *bus, const kp_msg_t *ev);

/* Subscribes to events whose type starts with type_prefix ("" for all; "study." for
 * study.changed, ...). cfg is only read during the call. NULL on a bad endpoint. Owned by the
 * caller; reconnects by itself when the broker restarts. */
kp_bus_sub_t *kp_bus_subscribe(const kp_config_t *cfg, const char *type_prefix);
/* Closes and clears *sub; idempotent. */
void kp_bus_sub_destroy(kp_bus_sub_t **sub);
/* Waits up to timeout_ms (0: just check) for an event. 0: *out holds it (caller owns it,
 * kp_msg_clear() it); KP_ETIMEOUT: none, or a signal interrupted the wait. Malformed events
 * are logged and dropped. */
int kp_bus_sub_recv(kp_bus_sub_t *sub, kp_msg_t *out, int timeout_ms);
/* A file descriptor for an event loop (ZMQ_FD; borrowed). It is EDGE-triggered and signals
 * "ZeroMQ state changed", not "a message is there": when it becomes readable, call
 * kp_bus_sub_recv(sub, &m, 0) until it returns KP_ETIMEOUT (which re-checks ZMQ_EVENTS)
 * before waiting on the fd again. -1 on error. */
int kp_bus_sub_fd(kp_bus_sub_t *sub);

#endif
