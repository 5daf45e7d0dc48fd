/* kp_metrics: the gateway's own counters for GET /metrics (Prometheus text format 0.0.4).
 *
 * HTTP requests are counted per route pattern (the route table's, so the label set is bounded:
 * "/dicom-web/studies/{study}/metadata", plus "static" for the viewer's files and "unrouted"
 * for requests refused before routing), method and status, with a latency histogram per route.
 * Everything here is thread-safe (one mutex; an observation is a few additions). The handler
 * that serves /metrics (kp_api_metrics.c) adds what it reads from PostgreSQL, the broker and the
 * storage file system. */
#ifndef KP_METRICS_H
#define KP_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>
#include <stdio.h>

typedef enum {
    KP_MET_LOGIN_FAILURES, /* POST /api/auth/login refused (bad password, locked, unknown) */
    KP_MET_LOGINS,         /* successful logins */
    KP_MET_RATE_LIMITED,   /* requests answered 429 */
    KP_MET_STOW_INSTANCES, /* instances stored through STOW-RS */
    KP_MET_DB_BUSY,        /* gauge: database workers running a request now */
    KP_MET_DB_QUEUED,      /* gauge: requests waiting for a database worker */
    KP_MET_DB_WORKERS,     /* gauge: database workers configured */
    KP_MET_N
} kp_metric_t;

/* Records one answered request: route pattern (NULL = "unrouted"), method, status, seconds.
 * route must be a string with static storage, the same pointer for the same route (the route
 * table's pattern, or one literal per kind): series are found by pointer, not by comparing
 * text, to keep the per-request cost small. */
void kp_metrics_http(const char *route, const char *method, int status, double seconds);
/* Adds delta to a counter or gauge. */
void kp_metrics_add(kp_metric_t m, long delta);
/* Sets a gauge. */
void kp_metrics_set(kp_metric_t m, long value);

/* Writes v as a label value of the text format (backslash, quote and newline escaped). */
void kp_metrics_label(FILE *out, const char *v);

/* Writes every metric of this module in the text format. */
void kp_metrics_write(FILE *out);
/* Keeps the counters of one pacs-dicomd process from a metrics.dicomd event payload
 * ({process, associations_accepted, ...}; schema/messages.md). Thread-safe. */
void kp_metrics_dicomd(const json_t *payload);
/* Writes the klinika_dicom_* counters of the dicomd processes heard from in the last minute. */
void kp_metrics_write_dicomd(FILE *out);

/* True when the client address addr (numeric, IPv4 or IPv6) is in allow: a comma-separated list
 * of addresses and CIDR blocks ("127.0.0.1, ::1, 10.0.0.0/8"), or "*" for any. Pure. */
bool kp_metrics_addr_allowed(const char *allow, const char *addr);

#endif
