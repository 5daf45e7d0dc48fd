/* kp_audit: the audit trail's producer side and its hash chain (docs/security.md, "Audit
 * trail"; schema/0004_audit.sql).
 *
 * Design note. Audit is not logging: an event is a durable `audit` job in the jobs outbox
 * (ARCHITECTURE section 3), written by kp_audit_emit() with the event time taken by the
 * producer. pacs-auditor (workers/auditor) turns each job into one row of audit_log, in the
 * transaction that marks the job done, as a link of a SHA-256 hash chain; `pacsctl audit verify`
 * recomputes the chain. Both use kp_audit_hash(), so the serialisation exists once.
 *
 * Durability of an emit: when kp_audit_emit() returns 0 the outbox row is committed (or, inside
 * the caller's open transaction, commits or rolls back with the caller's work). The bus message
 * is only a notification: without one the outbox sweep of pacs-busd publishes the job within
 * jobs.sweep_interval (the row is written with an expired lease when it is not published at
 * once, with the normal lease when it is). */
#ifndef KP_AUDIT_H
#define KP_AUDIT_H

#include "kp_bus.h"
#include "kp_db.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* The job type on the bus and in jobs.type. */
#define KP_AUDIT_JOB "audit"
/* prev_hash of the first record. */
#define KP_AUDIT_GENESIS "0000000000000000000000000000000000000000000000000000000000000000"
/* Key of the transaction-level advisory lock that serialises appends to the chain. */
#define KP_AUDIT_CHAIN_LOCK "461446935908" /* 0x6b70617564, "kpaud" */
/* SQL expression giving a timestamptz column in the hashed form (UTC, microseconds). */
#define KP_AUDIT_AT_SQL(col) "to_char((" col ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* One event, as a producer describes it. Strings are borrowed; NULL means "not applicable". */
typedef struct kp_audit_event {
    const char *action;     /* required: "auth.login", "study.view", ... (1..64 chars) */
    const char *outcome;    /* required: "success" or "failure" */
    const char *actor;      /* user name or calling AE title */
    const char *client;     /* client address (IP) */
    const char *patient_id; /* Patient ID concerned, if any */
    const char *study_uid;  /* Study Instance UID concerned, if any */
    json_t *detail;         /* borrowed JSON object (strings, integers, booleans), or NULL */
    const char *at;         /* event time as YYYY-MM-DDTHH:MM:SS.ffffffZ, or NULL for now */
} kp_audit_event_t;

/* Records ev durably in the outbox (one INSERT into jobs, type 'audit'). When the connection is
 * inside a transaction (PQtransactionStatus INTRANS) the row joins it and nothing is published
 * (a worker must not see the job before the commit): the sweep publishes it. Otherwise the row
 * commits at once and the job is submitted on bus, or, when bus is NULL, on the process-wide
 * bus given to kp_audit_set_bus() if any, or left to the sweep. A failed publish is only
 * logged (debug). 0, KP_EINVAL (action/outcome missing or invalid, detail not an object), or
 * KP_EDB. bus, when given, must not be in use by another thread during the call. */
int kp_audit_emit(kp_db_t *db, kp_bus_t *bus, const kp_audit_event_t *ev);

/* Makes bus (borrowed; NULL to unset, e.g. before destroying it) the process-wide publisher
 * for kp_audit_emit(db, NULL, ...). Thread-safe: every use of it happens under one mutex,
 * which is cheap since kp_bus_submit() never blocks. A bus given here must not be used by
 * anything else. */
void kp_audit_set_bus(kp_bus_t *bus);

/* One link of the chain, as stored (strings borrowed; NULL for SQL NULL). */
typedef struct kp_audit_record {
    int64_t seq;
    const char *event_id;
    const char *at; /* KP_AUDIT_AT_SQL form */
    const char *actor, *action, *outcome, *client, *patient_id, *study_uid;
    const json_t *detail; /* NULL for SQL NULL */
    const char *prev_hash;
} kp_audit_record_t;

/* The canonical serialisation of rec (see schema/0004_audit.sql): a malloc'd string the caller
 * frees, or NULL when a string is not valid UTF-8. */
char *kp_audit_canonical(const kp_audit_record_t *rec);
/* out = lower-case hex SHA-256 of kp_audit_canonical(rec). 0 or KP_EINVAL. */
int kp_audit_hash(const kp_audit_record_t *rec, char out[65]);

#endif
