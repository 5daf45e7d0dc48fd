/* pacs-router internals shared by its files: main.c (the worker loop), scan.c (rules, the
 * instance scan that creates deliveries, the stable-study check) and send.c (claiming due
 * deliveries, C-STORE and STOW-RS, recording the outcome). The design is in workers/README. */
#ifndef ROUTER_H
#define ROUTER_H

#include "kp_bus.h"
#include "kp_config.h"
#include "kp_db.h"
#include "kp_route.h"
#include "kp_storage.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* The advisory lock one scanning router holds at a time. */
#define ROUTER_SCAN_LOCK "7150008"
/* Instances indexed this recently are evaluated again by the next scans (a transaction that
 * committed a lower pk after a higher one was seen is still found). */
#define ROUTER_SCAN_LAG_S 60

typedef struct {
    int64_t id;
    char name[136];
    bool study;     /* trigger 'study' */
    time_t created; /* instances indexed before the rule existed are not routed by it */
    kp_route_t *match;
    json_t *destinations;
    char **keys; /* each destination's key ("dicom:AE", "stow:URL") */
    size_t nkeys;
} router_rule_t;

typedef struct {
    const kp_config_t *cfg; /* borrowed */
    kp_db_t *db;            /* borrowed */
    kp_storage_t *st;       /* borrowed */
    kp_bus_t *bus;          /* borrowed; may be NULL */
    router_rule_t *rules;
    size_t nrules;
    int64_t cursor; /* last instance pk evaluated by this process (-1: start from the watermark) */
    long delivered, retried, dead; /* counters for logs */
} router_t;

/* (Re)loads the enabled rules; a rule that does not compile is skipped with a log line. 0 or a
 * negative code. */
int router_rules_load(router_t *r);
void router_rules_clear(router_t *r);

/* Evaluates the instances indexed since the last scan (from the persisted watermark when
 * from_watermark) against the rules: instance rules get deliveries, study rules a watch on the
 * study. Returns the number of instances evaluated, 0 when another router is scanning, or a
 * negative code. */
int router_scan(router_t *r, bool from_watermark);

/* Turns watched studies that became stable into deliveries. Returns how many, or a code. */
int router_stable(router_t *r);

/* Claims up to router.batch due deliveries, sends them and records each outcome. Returns the
 * number handled, or a negative code. */
int router_send(router_t *r);

/* Seconds to wait before attempt `attempts + 1` after `attempts` failed ones. */
long router_backoff(const kp_config_t *cfg, int attempts);

#endif
