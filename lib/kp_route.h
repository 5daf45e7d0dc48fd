/* kp_route: routing rules as data - parsing and validating a rule's conditions, time window and
 * destinations (untrusted JSON from /api/routes and pacsctl), and matching an instance against
 * them. Shared by pacs-gateway (validation, secrets kept out of responses), pacs-router (the
 * matching) and pacsctl; docs/routing.md describes the rule language.
 *
 * A condition is {"attribute", "op", "value"}: attribute is Modality, CallingAE, CalledAE,
 * SOPClassUID (the indexed columns), or any data dictionary keyword, or a tag "(gggg,eeee)" /
 * "ggggeeee" (read from the instance's stored DICOM JSON metadata, top level); op is equals
 * (the whole value, or one of its values, exactly), wildcard (* and ?, case-sensitive, on the
 * whole value or one value), regex (POSIX extended, unanchored unless the pattern anchors it),
 * present or absent (the element is / is not in the data set). Every condition must hold. */
#ifndef KP_ROUTE_H
#define KP_ROUTE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#define KP_ROUTE_MAX_CONDITIONS   64
#define KP_ROUTE_MAX_DESTINATIONS 16
#define KP_ROUTE_MAX_VALUE        1024
#define KP_ROUTE_MAX_URL          2048

typedef struct kp_route kp_route_t; /* opaque: compiled conditions and time window */

/* Compiles conditions (a JSON array, NULL = none) and time_window (an object, or NULL / JSON
 * null for always). Returns a new handle (kp_route_destroy) or NULL with a message naming the
 * offending field in err (e.g. "conditions[1].value: bad regex: ..."). */
kp_route_t *kp_route_new(const json_t *conditions, const json_t *time_window, char *err,
                         size_t errlen);
/* Frees r; idempotent, clears *r. */
void kp_route_destroy(kp_route_t **r);

/* What the matcher looks at for one instance (all borrowed; any may be NULL). */
typedef struct {
    const char *modality, *calling_ae, *called_ae, *sop_class;
    const json_t *metadata; /* DICOM JSON object of the instance (PS3.18 F) */
    time_t when;            /* arrival time, for the time window (local time of the process) */
} kp_route_instance_t;

/* True when every condition holds and `when` falls in the time window. */
bool kp_route_match(const kp_route_t *r, const kp_route_instance_t *in);

/* Checks the shape of a destinations array: 1 to KP_ROUTE_MAX_DESTINATIONS objects, each
 * {"type":"dicom","ae":AE} or {"type":"stow","url":"http(s)://...","auth":{"type":"none" |
 * "bearer","token" | "basic","username","password"}} (auth optional: none), no two alike.
 * 0, or -1 with the reason (naming the field) in err. */
int kp_route_destinations_check(const json_t *dests, char *err, size_t errlen);

/* The destination's key as deliveries record it: "dicom:AE" or "stow:URL" (into out). 0, or -1
 * when dest is not a valid destination object. */
int kp_route_destination_key(const json_t *dest, char *out, size_t outlen);

/* A copy of a destinations array without secrets: each auth becomes {"type", "set": true|false,
 * "username" (basic)}. The caller json_decrefs it. */
json_t *kp_route_destinations_public(const json_t *dests);

/* For a changed rule whose STOW-RS destinations left a secret out (the admin screens send back
 * what they were given: {"type":"bearer","set":true}): copies the token / password of the old
 * destination with the same URL and auth type into dests (modified in place). */
void kp_route_destinations_keep_secrets(json_t *dests, const json_t *old);

/* Whether s is a valid AE title (PS3.5 VR AE: 1 to 16 characters of the default repertoire, no
 * backslash or control character, no leading or trailing space). */
bool kp_route_ae_valid(const char *s);

/* Parses "HH:MM" (00:00 to 23:59, or 24:00) into minutes since midnight; -1 when malformed. */
int kp_route_parse_hhmm(const char *s);

#endif
