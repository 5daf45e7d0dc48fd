/* Unit tests of bus/kp_msg: the envelope codec must round-trip every payload type and turn any
 * malformed, truncated, hostile or random input into an error code, never a crash or a leak
 * (run under ASan to check the latter). Hand-made msgpack comes from msgpack-c's packer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <msgpack.h>

#include "kp_errors.h"
#include "kp_msg.h"

/* ---- helpers ----------------------------------------------------------------------------- */

static void s_str(msgpack_packer *pk, const char *s)
{
    assert_int_equal(msgpack_pack_str(pk, strlen(s)), 0);
    assert_int_equal(msgpack_pack_str_body(pk, s, strlen(s)), 0);
}

/* Which envelope keys to write and how; used to build broken messages by hand. */
enum { F_V = 1, F_TYPE = 2, F_ID = 4, F_ATTEMPT = 8, F_PAYLOAD = 16, F_ALL = 31 };
typedef struct {
    int fields; /* F_* present */
    int bad;    /* F_* written with a wrong type */
    int64_t v;
    const char *type;
    int extra; /* number of unknown keys to add */
} s_shape_t;

static void s_build(const s_shape_t *sh, msgpack_sbuffer *sb)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    int n = 0;
    for (int f = 1; f <= F_PAYLOAD; f <<= 1)
        n += (sh->fields & f) != 0;
    assert_int_equal(msgpack_pack_map(&pk, (size_t)(n + sh->extra)), 0);
    for (int i = 0; i < sh->extra; i++) {
        /* unknown keys with values of every kind, including ones JSON cannot hold */
        char k[16];
        snprintf(k, sizeof k, "x-%d", i);
        s_str(&pk, k);
        switch (i % 4) {
        case 0:
            assert_int_equal(msgpack_pack_bin(&pk, 3), 0);
            msgpack_pack_bin_body(&pk, "\0\1\2", 3);
            break;
        case 1:
            assert_int_equal(msgpack_pack_uint64(&pk, UINT64_MAX), 0);
            break;
        case 2:
            msgpack_pack_array(&pk, 1);
            msgpack_pack_map(&pk, 1);
            msgpack_pack_nil(&pk);
            msgpack_pack_nil(&pk);
            break;
        default:
            assert_int_equal(msgpack_pack_double(&pk, 1.0 / 0.0), 0);
            break;
        }
    }
    if (sh->fields & F_V) {
        s_str(&pk, "v");
        if (sh->bad & F_V)
            s_str(&pk, "1");
        else
            msgpack_pack_int64(&pk, sh->v);
    }
    if (sh->fields & F_TYPE) {
        s_str(&pk, "type");
        if (sh->bad & F_TYPE)
            msgpack_pack_int(&pk, 7);
        else
            s_str(&pk, sh->type ? sh->type : "index");
    }
    if (sh->fields & F_ID) {
        s_str(&pk, "id");
        if (sh->bad & F_ID)
            s_str(&pk, "12");
        else
            msgpack_pack_int64(&pk, 12);
    }
    if (sh->fields & F_ATTEMPT) {
        s_str(&pk, "attempt");
        if (sh->bad & F_ATTEMPT)
            msgpack_pack_double(&pk, 1.5);
        else
            msgpack_pack_int(&pk, 2);
    }
    if (sh->fields & F_PAYLOAD) {
        s_str(&pk, "payload");
        if (sh->bad & F_PAYLOAD)
            msgpack_pack_array(&pk, 0);
        else {
            msgpack_pack_map(&pk, 1);
            s_str(&pk, "path");
            s_str(&pk, "aa/bb/x.dcm");
        }
    }
}

static int s_decode_shape(const s_shape_t *sh, kp_msg_t *m)
{
    msgpack_sbuffer sb;
    s_build(sh, &sb);
    int rc = kp_msg_decode(sb.data, sb.size, m);
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

/* A payload with every JSON type. */
static json_t *s_full_payload(void)
{
    json_t *p = json_pack(
        "{s:s,s:s,s:s,s:I,s:I,s:I,s:i,s:f,s:f,s:b,s:b,s:n,"
        "s:[i,s,[],{},n,f],s:{s:{s:[{s:i}]}}}",
        "path", "aa/bb/1.2.840.10008.dcm", "utf8", "\xc5\xbelu\xc5\xa5ou\xc4\x8dk\xc3\xbd", "empty",
        "", "max", (json_int_t)INT64_MAX, "min", (json_int_t)INT64_MIN, "size",
        (json_int_t)1234567890123LL, "neg", -5, "real", 3.25, "tiny", -1e-300, "t", 1, "f", 0,
        "null", "arr", 1, "a", 2.5, "obj", "deep", "deeper", "x", 1);
    assert_non_null(p);
    /* a string with an embedded NUL survives too */
    assert_int_equal(json_object_set_new(p, "nul", json_stringn("a\0b", 3)), 0);
    return p;
}

/* Builds a payload nested `depth` levels (the payload itself is level 1). */
static json_t *s_nested(int depth)
{
    json_t *inner = json_pack("{s:i}", "leaf", 1);
    for (int d = 1; d < depth; d++)
        inner = json_pack("{s:o}", "k", inner);
    return inner;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void test_roundtrip_all_types(void **state)
{
    (void)state;
    kp_msg_t m, out;
    assert_int_equal(kp_msg_init(&m, "index", 987654321012LL, s_full_payload()), 0);
    m.attempt = 3;
    char *buf;
    size_t len;
    assert_int_equal(kp_msg_encode(&m, &buf, &len), 0);
    assert_int_equal(kp_msg_decode(buf, len, &out), 0);
    assert_int_equal(out.v, KP_MSG_VERSION);
    assert_string_equal(out.type, "index");
    assert_int_equal(out.id, 987654321012LL);
    assert_int_equal(out.attempt, 3);
    assert_true(json_equal(m.payload, out.payload));
    json_t *nul = json_object_get(out.payload, "nul");
    assert_int_equal(json_string_length(nul), 3);
    assert_memory_equal(json_string_value(nul), "a\0b", 3);
    assert_true(json_is_real(json_object_get(out.payload, "real")));
    assert_true(json_is_integer(json_object_get(out.payload, "max")));
    /* re-encoding the decoded message gives the same bytes */
    char *buf2;
    size_t len2;
    assert_int_equal(kp_msg_encode(&out, &buf2, &len2), 0);
    assert_int_equal(len, len2);
    assert_memory_equal(buf, buf2, len);
    free(buf);
    free(buf2);
    kp_msg_clear(&m);
    kp_msg_clear(&out);
    assert_null(out.payload);
    kp_msg_clear(&out); /* idempotent */
}

static void test_event_and_empty_payload(void **state)
{
    (void)state;
    kp_msg_t m, out;
    assert_int_equal(kp_msg_init(&m, "study.changed", 0, NULL), 0);
    char *buf;
    size_t len;
    assert_int_equal(kp_msg_encode(&m, &buf, &len), 0);
    assert_int_equal(kp_msg_decode(buf, len, &out), 0);
    assert_string_equal(out.type, "study.changed");
    assert_int_equal(out.id, 0);
    assert_true(json_is_object(out.payload));
    assert_int_equal(json_object_size(out.payload), 0);
    free(buf);
    kp_msg_clear(&out);
    kp_msg_clear(&m);
}

static void test_init_and_encode_reject_bad_input(void **state)
{
    (void)state;
    kp_msg_t m;
    char *buf = NULL;
    size_t len = 0;
    assert_int_equal(kp_msg_init(&m, "", 1, NULL), KP_EINVAL);
    assert_int_equal(kp_msg_init(&m, "has space", 1, NULL), KP_EINVAL);
    assert_int_equal(kp_msg_init(&m, "index", -1, NULL), KP_EINVAL);
    assert_int_equal(kp_msg_init(&m, "index", 1, json_array()), KP_EINVAL); /* reference taken */
    char longtype[80];
    memset(longtype, 'a', sizeof longtype);
    longtype[64] = 0;
    assert_int_equal(kp_msg_init(&m, longtype, 1, NULL), KP_EINVAL);
    longtype[63] = 0;
    assert_int_equal(kp_msg_init(&m, longtype, 1, NULL), 0);
    m.attempt = -1;
    assert_int_equal(kp_msg_encode(&m, &buf, &len), KP_EINVAL);
    assert_null(buf);
    m.attempt = 0;
    /* too deep */
    m.payload = s_nested(KP_MSG_MAX_DEPTH + 1);
    assert_int_equal(kp_msg_encode(&m, &buf, &len), KP_EINVAL);
    json_decref(m.payload);
    /* exactly at the bound */
    m.payload = s_nested(KP_MSG_MAX_DEPTH);
    assert_int_equal(kp_msg_encode(&m, &buf, &len), 0);
    kp_msg_t out;
    assert_int_equal(kp_msg_decode(buf, len, &out), 0);
    assert_true(json_equal(out.payload, m.payload));
    kp_msg_clear(&out);
    free(buf);
    buf = NULL;
    json_decref(m.payload);
    /* too big */
    char *big = malloc(KP_MSG_MAX_SIZE);
    memset(big, 'x', KP_MSG_MAX_SIZE);
    m.payload = json_object();
    json_object_set_new(m.payload, "big", json_stringn(big, KP_MSG_MAX_SIZE));
    assert_int_equal(kp_msg_encode(&m, &buf, &len), KP_ETOOBIG);
    assert_null(buf);
    free(big);
    kp_msg_clear(&m);
}

static void test_unknown_keys_ignored(void **state)
{
    (void)state;
    s_shape_t sh = {.fields = F_ALL, .v = 1, .extra = 8};
    kp_msg_t m;
    assert_int_equal(s_decode_shape(&sh, &m), 0);
    assert_string_equal(m.type, "index");
    assert_int_equal(m.id, 12);
    assert_int_equal(m.attempt, 2);
    assert_string_equal(json_string_value(json_object_get(m.payload, "path")), "aa/bb/x.dcm");
    kp_msg_clear(&m);
}

static void test_version(void **state)
{
    (void)state;
    kp_msg_t m;
    s_shape_t sh = {.fields = F_ALL, .v = 2};
    assert_int_equal(s_decode_shape(&sh, &m), KP_EVERSION);
    assert_null(m.payload);
    sh.v = 0;
    assert_int_equal(s_decode_shape(&sh, &m), KP_EVERSION);
    sh.v = -1;
    assert_int_equal(s_decode_shape(&sh, &m), KP_EVERSION);
    /* the version is checked before the rest: a v2 message of another shape is still v2 */
    sh = (s_shape_t){.fields = F_V, .v = 2};
    assert_int_equal(s_decode_shape(&sh, &m), KP_EVERSION);
    /* a version that is not an integer is malformed */
    sh = (s_shape_t){.fields = F_ALL, .bad = F_V, .v = 1};
    assert_int_equal(s_decode_shape(&sh, &m), KP_EMSG);
    /* encoding with v = 2 is possible (for tests and future builds) and is refused */
    kp_msg_t e;
    char *buf;
    size_t len;
    assert_int_equal(kp_msg_init(&e, "index", 1, NULL), 0);
    e.v = 2;
    assert_int_equal(kp_msg_encode(&e, &buf, &len), 0);
    assert_int_equal(kp_msg_decode(buf, len, &m), KP_EVERSION);
    free(buf);
}

static void test_missing_and_wrong_keys(void **state)
{
    (void)state;
    kp_msg_t m;
    for (int f = 1; f <= F_PAYLOAD; f <<= 1) {
        s_shape_t sh = {.fields = F_ALL & ~f, .v = 1, .extra = 1};
        assert_int_equal(s_decode_shape(&sh, &m), KP_EMSG);
        assert_null(m.payload);
        sh = (s_shape_t){.fields = F_ALL, .bad = f, .v = 1};
        assert_int_equal(s_decode_shape(&sh, &m), KP_EMSG);
        assert_null(m.payload);
    }
    /* bad type strings */
    const char *types[] = {"", "with space", "tab\there", "\xc3\xa9t\xc3\xa9",
                           "0123456789012345678901234567890123456789012345678901234567890123"};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        s_shape_t sh = {.fields = F_ALL, .v = 1, .type = types[i]};
        assert_int_equal(s_decode_shape(&sh, &m), KP_EMSG);
    }
    s_shape_t sh = {.fields = F_ALL,
                    .v = 1,
                    .type = "012345678901234567890123456789012345678901234567890123456789012"};
    assert_int_equal(s_decode_shape(&sh, &m), 0); /* 63 bytes: the longest allowed */
    assert_int_equal(strlen(m.type), 63);
    kp_msg_clear(&m);
}

/* Builds a valid envelope around a payload written by fn, to test payload decoding. */
static int s_decode_payload(void (*fn)(msgpack_packer *))
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    s_str(&pk, "v");
    msgpack_pack_int(&pk, 1);
    s_str(&pk, "type");
    s_str(&pk, "index");
    s_str(&pk, "id");
    msgpack_pack_int(&pk, 1);
    s_str(&pk, "attempt");
    msgpack_pack_int(&pk, 0);
    s_str(&pk, "payload");
    fn(&pk);
    kp_msg_t m;
    int rc = kp_msg_decode(sb.data, sb.size, &m);
    if (rc == 0) kp_msg_clear(&m);
    assert_null(m.payload);
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

static void s_p_bin(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "b");
    msgpack_pack_bin(pk, 1);
    msgpack_pack_bin_body(pk, "x", 1);
}
static void s_p_ext(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "e");
    msgpack_pack_ext(pk, 1, 5);
    msgpack_pack_ext_body(pk, "x", 1);
}
static void s_p_u64(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "u");
    msgpack_pack_uint64(pk, (uint64_t)INT64_MAX + 1);
}
static void s_p_nan(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "n");
    msgpack_pack_double(pk, 0.0 / 0.0);
}
static void s_p_inf32(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "n");
    msgpack_pack_float(pk, 1.0f / 0.0f);
}
static void s_p_badutf8(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "s");
    s_str(pk, "\xff\xfe");
}
static void s_p_badkeyutf8(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "\xc3");
    msgpack_pack_nil(pk);
}
static void s_p_intkey(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    msgpack_pack_int(pk, 1);
    msgpack_pack_nil(pk);
}
static void s_p_nulkey(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    msgpack_pack_str(pk, 3);
    msgpack_pack_str_body(pk, "a\0b", 3);
    msgpack_pack_nil(pk);
}
static void s_p_f32(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 2);
    s_str(pk, "f");
    msgpack_pack_float(pk, 0.5f);
    s_str(pk, "");
    msgpack_pack_int8(pk, -3);
}
static void s_p_deep_array(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "a");
    for (int i = 0; i < KP_MSG_MAX_DEPTH; i++)
        msgpack_pack_array(pk, 1); /* levels 2..9 */
    msgpack_pack_nil(pk);
}
static void s_p_ok_array(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 1);
    s_str(pk, "a");
    for (int i = 0; i < KP_MSG_MAX_DEPTH - 1; i++)
        msgpack_pack_array(pk, 1); /* levels 2..8 */
    msgpack_pack_nil(pk);
}

static void test_payload_values(void **state)
{
    (void)state;
    assert_int_equal(s_decode_payload(s_p_bin), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_ext), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_u64), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_nan), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_inf32), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_badutf8), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_badkeyutf8), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_intkey), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_nulkey), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_f32), 0);
    assert_int_equal(s_decode_payload(s_p_deep_array), KP_EMSG);
    assert_int_equal(s_decode_payload(s_p_ok_array), 0);
}

static void s_valid(char **buf, size_t *len)
{
    kp_msg_t m;
    assert_int_equal(kp_msg_init(&m, "index", 42, s_full_payload()), 0);
    m.attempt = 1;
    assert_int_equal(kp_msg_encode(&m, buf, len), 0);
    kp_msg_clear(&m);
}

static void test_every_truncation(void **state)
{
    (void)state;
    char *buf;
    size_t len;
    s_valid(&buf, &len);
    for (size_t n = 0; n < len; n++) {
        /* a fresh heap copy of exactly n bytes, so ASan sees any read past the end */
        char *copy = malloc(n ? n : 1);
        memcpy(copy, buf, n);
        kp_msg_t m;
        assert_int_equal(kp_msg_decode(copy, n, &m), KP_EMSG);
        assert_null(m.payload);
        free(copy);
    }
    /* trailing bytes are malformed too */
    char *longer = malloc(len + 1);
    memcpy(longer, buf, len);
    longer[len] = 0;
    kp_msg_t m;
    assert_int_equal(kp_msg_decode(longer, len + 1, &m), KP_EMSG);
    assert_int_equal(kp_msg_decode(NULL, 0, &m), KP_EMSG);
    free(longer);
    free(buf);
}

/* xorshift64*: reproducible garbage */
static uint64_t s_rng = 0x9E3779B97F4A7C15ull;
static uint64_t s_rand(void)
{
    s_rng ^= s_rng >> 12;
    s_rng ^= s_rng << 25;
    s_rng ^= s_rng >> 27;
    return s_rng * 2685821657736338717ull;
}

static void s_try(const uint8_t *p, size_t n, int *accepted)
{
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, p, n);
    kp_msg_t m;
    int rc = kp_msg_decode(copy, n, &m);
    assert_true(rc == 0 || rc == KP_EMSG || rc == KP_EVERSION);
    if (rc == 0) {
        /* whatever decodes must encode again and decode to the same thing */
        char *buf;
        size_t len;
        kp_msg_t again;
        assert_int_equal(kp_msg_encode(&m, &buf, &len), 0);
        assert_int_equal(kp_msg_decode(buf, len, &again), 0);
        assert_true(json_equal(m.payload, again.payload));
        kp_msg_clear(&again);
        free(buf);
        (*accepted)++;
    } else {
        assert_null(m.payload);
    }
    kp_msg_clear(&m);
    json_t *j;
    if (kp_msg_decode_map(copy, n, &j) == 0) json_decref(j);
    free(copy);
}

static void test_random_garbage(void **state)
{
    (void)state;
    uint8_t b[512];
    int accepted = 0;
    for (int i = 0; i < 4000; i++) {
        size_t n = s_rand() % sizeof b;
        for (size_t k = 0; k < n; k++)
            b[k] = (uint8_t)s_rand();
        /* half of them start like a map, to get past the first check */
        if (n && (i & 1)) b[0] = (uint8_t)(0x80 | (s_rand() & 0x0f));
        s_try(b, n, &accepted);
    }
    /* mutations of a valid message: flip, insert and delete bytes */
    char *valid;
    size_t vlen;
    s_valid(&valid, &vlen);
    assert_true(vlen < sizeof b - 8);
    for (int i = 0; i < 4000; i++) {
        memcpy(b, valid, vlen);
        size_t n = vlen;
        int edits = 1 + (int)(s_rand() % 4);
        for (int e = 0; e < edits; e++) {
            size_t at = s_rand() % n;
            switch (s_rand() % 3) {
            case 0:
                b[at] = (uint8_t)s_rand();
                break;
            case 1:
                b[at] ^= (uint8_t)(1u << (s_rand() % 8));
                break;
            default:
                memmove(b + at, b + at + 1, n - at - 1);
                n--;
                break;
            }
        }
        s_try(b, n, &accepted);
    }
    free(valid);
    /* some mutations (inside strings) stay valid */
    assert_true(accepted > 0);
}

static void test_hostile_sizes_and_depth(void **state)
{
    (void)state;
    kp_msg_t m;
    /* containers claiming 4 billion elements must not allocate anything big */
    const uint8_t map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, 'v', 0x01};
    assert_int_equal(kp_msg_decode(map32, sizeof map32, &m), KP_EMSG);
    const uint8_t arr32[] = {0x81, 0xa1, 'x', 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0};
    assert_int_equal(kp_msg_decode(arr32, sizeof arr32, &m), KP_EMSG);
    const uint8_t str32[] = {0x81, 0xa1, 'x', 0xdb, 0xff, 0xff, 0xff, 0xff, 'a'};
    assert_int_equal(kp_msg_decode(str32, sizeof str32, &m), KP_EMSG);
    /* 100 000 nested arrays: no stack overflow */
    size_t n = 100000;
    uint8_t *deep = malloc(n + 3);
    deep[0] = 0x81;
    deep[1] = 0xa1;
    deep[2] = 'x';
    memset(deep + 3, 0x91, n - 1);
    deep[n + 2] = 0xc0;
    assert_int_equal(kp_msg_decode(deep, n + 3, &m), KP_EMSG);
    json_t *j;
    assert_int_equal(kp_msg_decode_map(deep, n + 3, &j), KP_EMSG);
    free(deep);
    /* the top level must be a map */
    const uint8_t arr[] = {0x90};
    assert_int_equal(kp_msg_decode(arr, sizeof arr, &m), KP_EMSG);
    const uint8_t unused[] = {0x81, 0xa1, 'x', 0xc1};
    assert_int_equal(kp_msg_decode(unused, sizeof unused, &m), KP_EMSG);
    /* above the size bound */
    uint8_t *big = calloc(1, KP_MSG_MAX_SIZE + 1);
    big[0] = 0x80;
    assert_int_equal(kp_msg_decode(big, KP_MSG_MAX_SIZE + 1, &m), KP_EMSG);
    free(big);
    /* duplicate known key */
    const uint8_t dup[] = {0x82, 0xa1, 'v', 0x01, 0xa1, 'v', 0x01};
    assert_int_equal(kp_msg_decode(dup, sizeof dup, &m), KP_EMSG);
}

static void test_map_codec(void **state)
{
    (void)state;
    json_t *in = json_pack("{s:[s,s],s:i,s:s}", "types", "index", "compress", "credit", 128, "name",
                           "host:1:indexer"),
           *out = NULL;
    char *buf;
    size_t len;
    assert_int_equal(kp_msg_encode_map(in, &buf, &len), 0);
    assert_int_equal(kp_msg_decode_map(buf, len, &out), 0);
    assert_true(json_equal(in, out));
    json_decref(out);
    for (size_t k = 0; k < len; k++) {
        assert_int_equal(kp_msg_decode_map(buf, k, &out), KP_EMSG);
        assert_null(out);
    }
    free(buf);
    json_t *arr = json_array();
    assert_int_equal(kp_msg_encode_map(arr, &buf, &len), KP_EINVAL);
    json_decref(arr);
    json_decref(in);
    const uint8_t notmap[] = {0xa1, 'x'};
    assert_int_equal(kp_msg_decode_map(notmap, sizeof notmap, &out), KP_EMSG);
}

int main(void)
{
    alarm(120); /* the whole binary, including under ASan */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_all_types),
        cmocka_unit_test(test_event_and_empty_payload),
        cmocka_unit_test(test_init_and_encode_reject_bad_input),
        cmocka_unit_test(test_unknown_keys_ignored),
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_missing_and_wrong_keys),
        cmocka_unit_test(test_payload_values),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_random_garbage),
        cmocka_unit_test(test_hostile_sizes_and_depth),
        cmocka_unit_test(test_map_codec),
    };
    return cmocka_run_group_tests_name("bus/kp_msg", tests, NULL, NULL);
}
