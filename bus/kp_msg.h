/* kp_msg: the envelope codec of every message on the bus (msgpack <-> C).
 *
 * A message is one msgpack map with the keys `v` (schema version), `type`, `id` (outbox job id,
 * 0 for events), `attempt` and `payload` (a map). In C the payload is a jansson object, so
 * producers and workers never see msgpack: only bus/ does. Decoding is defensive: the input
 * is bounded in size and nesting depth and checked byte by byte before msgpack-c unpacks it,
 * so truncated or hostile buffers give KP_EMSG, never a crash, a leak or a huge allocation.
 * Unknown keys are ignored; a version other than KP_MSG_VERSION gives KP_EVERSION.
 * The wire format is documented in schema/messages.md. */
#ifndef KP_MSG_H
#define KP_MSG_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* The envelope version this build speaks. */
#define KP_MSG_VERSION 1
/* Largest encoded message accepted or produced, in bytes. Payloads carry references (paths,
 * UIDs), never bulk data. */
#define KP_MSG_MAX_SIZE (256 * 1024)
/* Deepest nesting of a payload: the payload object itself is level 1. */
#define KP_MSG_MAX_DEPTH 8
/* Longest message type, in bytes (printable ASCII, no spaces). */
#define KP_MSG_TYPE_MAX 63

typedef struct {
    int v;                          /* schema version; 0 means KP_MSG_VERSION when encoding */
    char type[KP_MSG_TYPE_MAX + 1]; /* "index", "study.changed", ... NUL-terminated */
    int64_t id;                     /* outbox job id (jobs.id); 0 for events */
    int attempt;                    /* 0 on first delivery, incremented on each re-dispatch */
    json_t *payload;                /* a JSON object owned by the message; NULL = empty map */
} kp_msg_t;

/* Fills m: version KP_MSG_VERSION, attempt 0, the given type, id and payload. Steals the
 * reference to payload (which may be NULL), also on error. KP_EINVAL for a bad type, a
 * negative id or a payload that is not an object. */
int kp_msg_init(kp_msg_t *m, const char *type, int64_t id, json_t *payload);
/* Encodes m. On success *buf is a malloc'd buffer (the caller frees it) of *len bytes.
 * KP_EINVAL for a bad type, id, attempt or payload (not an object, too deep, a non-finite
 * real), KP_ETOOBIG beyond KP_MSG_MAX_SIZE. */
int kp_msg_encode(const kp_msg_t *m, char **buf, size_t *len);
/* Decodes one message that must fill the whole buffer. 0, KP_EMSG (malformed, truncated, too
 * big or too deep, wrong-typed or missing key) or KP_EVERSION. On success out->payload is a
 * new reference the caller owns (release with kp_msg_clear); on error *out is cleared. */
int kp_msg_decode(const void *buf, size_t len, kp_msg_t *out);
/* Releases the payload and zeroes m; safe on a zeroed or already cleared message. */
void kp_msg_clear(kp_msg_t *m);

/* Plain map codec for command bodies (READY, DONE, STATS; see schema/messages.md): a JSON
 * object <-> one msgpack map, with the same types, bounds and checks as payloads.
 * kp_msg_encode_map: *buf malloc'd, caller frees; KP_EINVAL / KP_ETOOBIG as above.
 * kp_msg_decode_map: *out a new object the caller owns; KP_EMSG when malformed. */
int kp_msg_encode_map(const json_t *obj, char **buf, size_t *len);
int kp_msg_decode_map(const void *buf, size_t len, json_t **out);

#endif
