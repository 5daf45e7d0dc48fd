/* kp_msg: envelope codec (see kp_msg.h).
 *
 * Design: msgpack-c's one-shot unpacker allocates an array of n objects as soon as it reads a
 * container header claiming n elements, so five hostile bytes could ask it for gigabytes. Every
 * buffer is therefore first walked by s_scan(), which allocates nothing and checks each length
 * and element count against the bytes actually left, the nesting depth and that exactly one
 * object fills the buffer. Only then does msgpack_unpack_next() build the object tree (whose
 * strings point into the caller's buffer, not NUL-terminated), and s_to_json() copies it into
 * jansson values, rejecting what JSON cannot hold (binary, ext, integers above INT64_MAX,
 * non-finite reals, invalid UTF-8, keys that are not strings or contain NUL). */
#include "kp_msg.h"

#include "kp_errors.h"

#include <limits.h>
#include <math.h>
#include <msgpack.h>
#include <stdbool.h>
#include <string.h>

/* ---- validation walk --------------------------------------------------------------------- */

static uint64_t s_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Walks one object at p[*off..len). Containers may nest `levels` deep (a top-level map counts
 * as one). 0 when well-formed, -1 otherwise; *off is advanced past the object. */
static int s_scan(const uint8_t *p, size_t len, size_t *off, int levels)
{
    if (*off >= len) return -1;
    uint8_t b = p[(*off)++];
    int lenbytes = 0;   /* size of a following length field */
    uint64_t n = 0;     /* bytes to skip, or element count of a container */
    uint64_t extra = 0; /* fixed bytes after the length field (ext type) */
    int container = 0;  /* 1 array, 2 map */

    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) return 0;
    if (b >= 0x80 && b <= 0x8f) {
        container = 2;
        n = b & 0x0f;
    } else if (b >= 0x90 && b <= 0x9f) {
        container = 1;
        n = b & 0x0f;
    } else if (b >= 0xa0 && b <= 0xbf) {
        n = b & 0x1f;
    } else {
        /* clang-format off */
        switch (b) {
        case 0xc4: case 0xd9: lenbytes = 1; break;               /* bin8, str8 */
        case 0xc5: case 0xda: lenbytes = 2; break;               /* bin16, str16 */
        case 0xc6: case 0xdb: lenbytes = 4; break;               /* bin32, str32 */
        case 0xc7: lenbytes = 1; extra = 1; break;               /* ext8 (+ type byte) */
        case 0xc8: lenbytes = 2; extra = 1; break;               /* ext16 */
        case 0xc9: lenbytes = 4; extra = 1; break;               /* ext32 */
        case 0xca: n = 4; break;                                 /* float32 */
        case 0xcb: n = 8; break;                                 /* float64 */
        case 0xcc: case 0xd0: n = 1; break;                      /* uint8, int8 */
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: n = 4; break;
        case 0xcf: case 0xd3: n = 8; break;
        case 0xd4: n = 2; break;                                 /* fixext 1..16 + type */
        case 0xd5: n = 3; break;
        case 0xd6: n = 5; break;
        case 0xd7: n = 9; break;
        case 0xd8: n = 17; break;
        case 0xdc: container = 1; lenbytes = 2; break;           /* array16 */
        case 0xdd: container = 1; lenbytes = 4; break;           /* array32 */
        case 0xde: container = 2; lenbytes = 2; break;           /* map16 */
        case 0xdf: container = 2; lenbytes = 4; break;           /* map32 */
        default: return -1;                                      /* 0xc1: never used */
        }
        /* clang-format on */
    }
    if (lenbytes) {
        if ((size_t)lenbytes > len - *off) return -1;
        n = s_be(p + *off, lenbytes) + extra;
        *off += (size_t)lenbytes;
    }
    if (!container) {
        if (n > len - *off) return -1;
        *off += (size_t)n;
        return 0;
    }
    if (levels < 1) return -1;
    /* Every element takes at least one byte: a count larger than what is left is a lie. */
    uint64_t elements = container == 2 ? 2 * n : n;
    if (elements > len - *off) return -1;
    for (uint64_t i = 0; i < elements; i++)
        if (s_scan(p, len, off, levels - 1)) return -1;
    return 0;
}

/* Validates buf as exactly one map nested at most `levels` deep, then unpacks it into up. */
static int s_unpack(const void *buf, size_t len, int levels, msgpack_unpacked *up)
{
    if (!buf || len == 0 || len > KP_MSG_MAX_SIZE) return KP_EMSG;
    const uint8_t *p = buf;
    size_t off = 0;
    if ((p[0] & 0xf0) != 0x80 && p[0] != 0xde && p[0] != 0xdf) return KP_EMSG; /* not a map */
    if (s_scan(p, len, &off, levels) || off != len) return KP_EMSG;
    off = 0;
    msgpack_unpack_return r = msgpack_unpack_next(up, buf, len, &off);
    if (r != MSGPACK_UNPACK_SUCCESS || off != len || up->data.type != MSGPACK_OBJECT_MAP)
        return KP_EMSG;
    return 0;
}

/* ---- msgpack object -> jansson ----------------------------------------------------------- */

static int s_to_json(const msgpack_object *o, int depth, json_t **out);

static int s_map_to_json(const msgpack_object *o, int depth, json_t **out)
{
    int rc = KP_EMSG;
    json_t *obj = NULL;
    if (o->type != MSGPACK_OBJECT_MAP || depth > KP_MSG_MAX_DEPTH) goto error;
    obj = json_object();
    if (!obj) goto error;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object_kv *kv = &o->via.map.ptr[i];
        if (kv->key.type != MSGPACK_OBJECT_STR) goto error;
        const char *k = kv->key.via.str.ptr;
        size_t kl = kv->key.via.str.size;
        if (kl && memchr(k, 0, kl)) goto error;
        json_t *val = NULL;
        if (s_to_json(&kv->val, depth + 1, &val)) goto error;
        /* setn_new takes the value even on failure (invalid UTF-8 in the key). */
        if (json_object_setn_new(obj, kl ? k : "", kl, val)) goto error;
    }
    *out = obj;
    return 0;
error:
    json_decref(obj);
    return rc;
}

static int s_to_json(const msgpack_object *o, int depth, json_t **out)
{
    json_t *j = NULL;
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        j = json_null();
        break;
    case MSGPACK_OBJECT_BOOLEAN:
        j = json_boolean(o->via.boolean);
        break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        if (o->via.u64 > (uint64_t)INT64_MAX) return KP_EMSG;
        j = json_integer((json_int_t)o->via.u64);
        break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        j = json_integer((json_int_t)o->via.i64);
        break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        if (!isfinite(o->via.f64)) return KP_EMSG;
        j = json_real(o->via.f64);
        break;
    case MSGPACK_OBJECT_STR:
        /* json_stringn copies and checks UTF-8; NULL for invalid text. */
        j = json_stringn(o->via.str.size ? o->via.str.ptr : "", o->via.str.size);
        break;
    case MSGPACK_OBJECT_ARRAY: {
        if (depth > KP_MSG_MAX_DEPTH) return KP_EMSG;
        j = json_array();
        if (!j) return KP_EMSG;
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            json_t *e = NULL;
            if (s_to_json(&o->via.array.ptr[i], depth + 1, &e) || json_array_append_new(j, e)) {
                json_decref(j);
                return KP_EMSG;
            }
        }
        break;
    }
    case MSGPACK_OBJECT_MAP:
        return s_map_to_json(o, depth, out);
    default:
        return KP_EMSG; /* binary and ext have no JSON form */
    }
    if (!j) return KP_EMSG;
    *out = j;
    return 0;
}

/* ---- jansson -> msgpack ------------------------------------------------------------------ */

static int s_pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    if (n > UINT32_MAX) return KP_EINVAL;
    if (msgpack_pack_str(pk, n) || (n && msgpack_pack_str_body(pk, s, n))) return KP_ENOMEM;
    return 0;
}

static int s_pack_json(msgpack_packer *pk, const json_t *j, int depth)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        if (depth > KP_MSG_MAX_DEPTH) return KP_EINVAL;
        if (msgpack_pack_map(pk, json_object_size(j))) return KP_ENOMEM;
        const char *key;
        size_t klen;
        json_t *val;
        json_object_keylen_foreach((json_t *)j, key, klen, val)
        {
            int rc = s_pack_str(pk, key, klen);
            if (!rc) rc = s_pack_json(pk, val, depth + 1);
            if (rc) return rc;
        }
        return 0;
    }
    case JSON_ARRAY: {
        if (depth > KP_MSG_MAX_DEPTH) return KP_EINVAL;
        if (msgpack_pack_array(pk, json_array_size(j))) return KP_ENOMEM;
        for (size_t i = 0; i < json_array_size(j); i++) {
            int rc = s_pack_json(pk, json_array_get(j, i), depth + 1);
            if (rc) return rc;
        }
        return 0;
    }
    case JSON_STRING:
        return s_pack_str(pk, json_string_value(j), json_string_length(j));
    case JSON_INTEGER:
        return msgpack_pack_int64(pk, json_integer_value(j)) ? KP_ENOMEM : 0;
    case JSON_REAL:
        if (!isfinite(json_real_value(j))) return KP_EINVAL;
        return msgpack_pack_double(pk, json_real_value(j)) ? KP_ENOMEM : 0;
    case JSON_TRUE:
        return msgpack_pack_true(pk) ? KP_ENOMEM : 0;
    case JSON_FALSE:
        return msgpack_pack_false(pk) ? KP_ENOMEM : 0;
    case JSON_NULL:
        return msgpack_pack_nil(pk) ? KP_ENOMEM : 0;
    }
    return KP_EINVAL;
}

static int s_pack_key_int(msgpack_packer *pk, const char *key, int64_t v)
{
    int rc = s_pack_str(pk, key, strlen(key));
    if (!rc && msgpack_pack_int64(pk, v)) rc = KP_ENOMEM;
    return rc;
}

/* Hands the packed buffer to the caller after the size check. */
static int s_finish(msgpack_sbuffer *sb, char **buf, size_t *len)
{
    if (sb->size > KP_MSG_MAX_SIZE) return KP_ETOOBIG;
    *len = sb->size;
    *buf = msgpack_sbuffer_release(sb);
    return 0;
}

/* ---- public API -------------------------------------------------------------------------- */

static bool s_type_ok(const char *s, size_t n)
{
    if (n == 0 || n > KP_MSG_TYPE_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f) return false;
    return true;
}

int kp_msg_init(kp_msg_t *m, const char *type, int64_t id, json_t *payload)
{
    memset(m, 0, sizeof *m);
    if (!type || !s_type_ok(type, strlen(type)) || id < 0 ||
        (payload && !json_is_object(payload))) {
        json_decref(payload);
        return KP_EINVAL;
    }
    m->v = KP_MSG_VERSION;
    memcpy(m->type, type, strlen(type) + 1);
    m->id = id;
    m->payload = payload;
    return 0;
}

void kp_msg_clear(kp_msg_t *m)
{
    if (!m) return;
    json_decref(m->payload);
    memset(m, 0, sizeof *m);
}

int kp_msg_encode(const kp_msg_t *m, char **buf, size_t *len)
{
    int rc = KP_EINVAL;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    *buf = NULL;
    *len = 0;
    size_t tl = strnlen(m->type, sizeof m->type);
    if (m->v < 0 || !s_type_ok(m->type, tl) || m->id < 0 || m->attempt < 0) goto error;
    if (m->payload && !json_is_object(m->payload)) goto error;
    rc = KP_ENOMEM;
    if (msgpack_pack_map(&pk, 5)) goto error;
    if ((rc = s_pack_key_int(&pk, "v", m->v ? m->v : KP_MSG_VERSION))) goto error;
    if ((rc = s_pack_str(&pk, "type", 4)) || (rc = s_pack_str(&pk, m->type, tl))) goto error;
    if ((rc = s_pack_key_int(&pk, "id", m->id))) goto error;
    if ((rc = s_pack_key_int(&pk, "attempt", m->attempt))) goto error;
    if ((rc = s_pack_str(&pk, "payload", 7))) goto error;
    if (m->payload)
        rc = s_pack_json(&pk, m->payload, 1);
    else
        rc = msgpack_pack_map(&pk, 0) ? KP_ENOMEM : 0;
    if (rc) goto error;
    if ((rc = s_finish(&sb, buf, len))) goto error;
    return 0;
error:
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

static bool s_key_is(const msgpack_object *k, const char *name)
{
    size_t n = strlen(name);
    return k->via.str.size == n && memcmp(k->via.str.ptr, name, n) == 0;
}

static bool s_as_int64(const msgpack_object *o, int64_t *v)
{
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= (uint64_t)INT64_MAX) {
        *v = (int64_t)o->via.u64;
        return true;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *v = o->via.i64;
        return true;
    }
    return false;
}

int kp_msg_decode(const void *buf, size_t len, kp_msg_t *out)
{
    int rc = KP_EMSG;
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    memset(out, 0, sizeof *out);
    if (s_unpack(buf, len, KP_MSG_MAX_DEPTH + 1, &up)) goto error;

    /* Required keys, each at most once; anything else is ignored. */
    const msgpack_object *v = NULL, *type = NULL, *id = NULL, *attempt = NULL, *payload = NULL;
    const msgpack_object_map *root = &up.data.via.map;
    for (uint32_t i = 0; i < root->size; i++) {
        const msgpack_object *k = &root->ptr[i].key, *val = &root->ptr[i].val;
        const msgpack_object **slot = NULL;
        if (k->type != MSGPACK_OBJECT_STR) continue;
        if (s_key_is(k, "v"))
            slot = &v;
        else if (s_key_is(k, "type"))
            slot = &type;
        else if (s_key_is(k, "id"))
            slot = &id;
        else if (s_key_is(k, "attempt"))
            slot = &attempt;
        else if (s_key_is(k, "payload"))
            slot = &payload;
        if (!slot) continue;
        if (*slot) goto error; /* duplicate key: ambiguous */
        *slot = val;
    }
    /* The version decides how to read the rest, so it is checked first. */
    int64_t iv;
    if (!v || !s_as_int64(v, &iv)) goto error;
    if (iv != KP_MSG_VERSION) {
        rc = KP_EVERSION;
        goto error;
    }
    out->v = (int)iv;
    if (!type || type->type != MSGPACK_OBJECT_STR ||
        !s_type_ok(type->via.str.ptr, type->via.str.size))
        goto error;
    memcpy(out->type, type->via.str.ptr, type->via.str.size);
    out->type[type->via.str.size] = 0;
    if (!id || !s_as_int64(id, &out->id) || out->id < 0) goto error;
    if (!attempt || !s_as_int64(attempt, &iv) || iv < 0 || iv > INT_MAX) goto error;
    out->attempt = (int)iv;
    if (!payload || payload->type != MSGPACK_OBJECT_MAP) goto error;
    if (s_map_to_json(payload, 1, &out->payload)) goto error;
    msgpack_unpacked_destroy(&up);
    return 0;
error:
    msgpack_unpacked_destroy(&up);
    kp_msg_clear(out);
    return rc;
}

int kp_msg_encode_map(const json_t *obj, char **buf, size_t *len)
{
    int rc = KP_EINVAL;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    *buf = NULL;
    *len = 0;
    if (!json_is_object(obj)) goto error;
    if ((rc = s_pack_json(&pk, obj, 1))) goto error;
    if ((rc = s_finish(&sb, buf, len))) goto error;
    return 0;
error:
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

int kp_msg_decode_map(const void *buf, size_t len, json_t **out)
{
    int rc = KP_EMSG;
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    *out = NULL;
    if (s_unpack(buf, len, KP_MSG_MAX_DEPTH, &up)) goto error;
    if (s_map_to_json(&up.data, 1, out)) goto error;
    rc = 0;
error:
    msgpack_unpacked_destroy(&up);
    return rc;
}
