/* kp_route: see kp_route.h. Conditions are compiled once (regex, tag) per rule; matching an
 * instance reads the indexed columns or its DICOM JSON metadata and never touches the file. */
#include "kp_route.h"

#include "kp_dicom.h"

#include <ctype.h>
#include <fnmatch.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { S_MODALITY = 1, S_CALLING, S_CALLED, S_SOPCLASS, S_TAG } s_attr_t;
typedef enum { S_EQUALS = 1, S_WILDCARD, S_REGEX, S_PRESENT, S_ABSENT } s_op_t;

typedef struct {
    s_attr_t attr;
    uint32_t tag; /* S_TAG, and the metadata tag of the named columns */
    s_op_t op;
    char *value;
    regex_t re;
    bool has_re;
} s_cond_t;

struct kp_route {
    s_cond_t *conds;
    size_t n;
    bool window;
    int from, to;  /* minutes since midnight */
    unsigned days; /* bit d (1 Monday .. 7 Sunday); 0 = every day */
};

void kp_route_destroy(kp_route_t **r)
{
    if (!r || !*r) return;
    for (size_t i = 0; i < (*r)->n; i++) {
        free((*r)->conds[i].value);
        if ((*r)->conds[i].has_re) regfree(&(*r)->conds[i].re);
    }
    free((*r)->conds);
    free(*r);
    *r = NULL;
}

bool kp_route_ae_valid(const char *s)
{
    if (!s) return false;
    size_t n = strlen(s);
    if (n < 1 || n > 16 || s[0] == ' ' || s[n - 1] == ' ') return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '\\') return false;
    return true;
}

int kp_route_parse_hhmm(const char *s)
{
    if (!s || strlen(s) != 5 || !isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1]) ||
        s[2] != ':' || !isdigit((unsigned char)s[3]) || !isdigit((unsigned char)s[4]))
        return -1;
    int h = (s[0] - '0') * 10 + (s[1] - '0'), m = (s[3] - '0') * 10 + (s[4] - '0');
    if (m > 59 || h > 24 || (h == 24 && m)) return -1;
    return h * 60 + m;
}

/* "(gggg,eeee)" or "ggggeeee" -> tag; false when s is neither. */
static bool s_parse_tag(const char *s, uint32_t *tag)
{
    char hex[9];
    size_t n = strlen(s);
    if (n == 8 && strspn(s, "0123456789abcdefABCDEF") == 8) {
        memcpy(hex, s, 8);
    } else if (n == 11 && s[0] == '(' && s[5] == ',' && s[10] == ')' &&
               strspn(s + 1, "0123456789abcdefABCDEF") == 4 &&
               strspn(s + 6, "0123456789abcdefABCDEF") == 4) {
        memcpy(hex, s + 1, 4);
        memcpy(hex + 4, s + 6, 4);
    } else {
        return false;
    }
    hex[8] = 0;
    *tag = (uint32_t)strtoul(hex, NULL, 16);
    return true;
}

static int s_cond(s_cond_t *c, const json_t *j, size_t i, char *err, size_t errlen)
{
    if (!json_is_object(j)) {
        snprintf(err, errlen, "conditions[%zu]: must be an object {attribute, op, value}", i);
        return -1;
    }
    const char *attr = json_string_value(json_object_get(j, "attribute"));
    const char *op = json_string_value(json_object_get(j, "op"));
    const json_t *jv = json_object_get(j, "value");
    if (!attr || !*attr || strlen(attr) > 64) {
        snprintf(err, errlen, "conditions[%zu].attribute: required (a keyword or a tag)", i);
        return -1;
    }
    if (!strcmp(attr, "Modality")) {
        c->attr = S_MODALITY;
        c->tag = 0x00080060;
    } else if (!strcmp(attr, "CallingAE")) {
        c->attr = S_CALLING;
    } else if (!strcmp(attr, "CalledAE")) {
        c->attr = S_CALLED;
    } else if (!strcmp(attr, "SOPClassUID")) {
        c->attr = S_SOPCLASS;
        c->tag = 0x00080016;
    } else if (s_parse_tag(attr, &c->tag) || kp_dicom_tag_by_keyword(attr, &c->tag) == 0) {
        c->attr = S_TAG;
    } else {
        snprintf(err, errlen,
                 "conditions[%zu].attribute: unknown attribute '%s' (Modality, CallingAE, "
                 "CalledAE, SOPClassUID, a DICOM keyword, or a tag as (gggg,eeee))",
                 i, attr);
        return -1;
    }
    if (!op) {
        snprintf(err, errlen,
                 "conditions[%zu].op: required (equals, wildcard, regex, present, "
                 "absent)",
                 i);
        return -1;
    }
    c->op = !strcmp(op, "equals")     ? S_EQUALS
            : !strcmp(op, "wildcard") ? S_WILDCARD
            : !strcmp(op, "regex")    ? S_REGEX
            : !strcmp(op, "present")  ? S_PRESENT
            : !strcmp(op, "absent")   ? S_ABSENT
                                      : 0;
    if (!c->op) {
        snprintf(err, errlen,
                 "conditions[%zu].op: unknown op '%.40s' (equals, wildcard, regex, present, "
                 "absent)",
                 i, op);
        return -1;
    }
    if (c->op == S_PRESENT || c->op == S_ABSENT) {
        if (jv && !json_is_null(jv) && !(json_is_string(jv) && !*json_string_value(jv))) {
            snprintf(err, errlen, "conditions[%zu].value: %s takes no value", i, op);
            return -1;
        }
        return 0;
    }
    const char *v = json_string_value(jv);
    if (!v || strlen(v) > KP_ROUTE_MAX_VALUE) {
        snprintf(err, errlen, "conditions[%zu].value: a string of at most %d bytes is required", i,
                 KP_ROUTE_MAX_VALUE);
        return -1;
    }
    c->value = strdup(v);
    if (!c->value) abort();
    if (c->op == S_REGEX) {
        int rc = regcomp(&c->re, v, REG_EXTENDED | REG_NOSUB);
        if (rc) {
            char why[160];
            regerror(rc, &c->re, why, sizeof why);
            snprintf(err, errlen, "conditions[%zu].value: bad regex: %s", i, why);
            return -1;
        }
        c->has_re = true;
    }
    return 0;
}

static int s_window(kp_route_t *r, const json_t *w, char *err, size_t errlen)
{
    if (!w || json_is_null(w)) return 0;
    if (!json_is_object(w)) {
        snprintf(err, errlen,
                 "time_window: must be null or {\"from\":\"HH:MM\",\"to\":\"HH:MM\","
                 "\"days\":[1..7]}");
        return -1;
    }
    r->from = kp_route_parse_hhmm(json_string_value(json_object_get(w, "from")));
    r->to = kp_route_parse_hhmm(json_string_value(json_object_get(w, "to")));
    if (r->from < 0 || r->from >= 24 * 60) {
        snprintf(err, errlen, "time_window.from: HH:MM from 00:00 to 23:59 is required");
        return -1;
    }
    if (r->to < 0) {
        snprintf(err, errlen, "time_window.to: HH:MM from 00:00 to 24:00 is required");
        return -1;
    }
    const json_t *days = json_object_get(w, "days");
    if (days && !json_is_null(days)) {
        if (!json_is_array(days) || json_array_size(days) > 7) {
            snprintf(err, errlen, "time_window.days: an array of day numbers 1 (Monday) to 7");
            return -1;
        }
        size_t k;
        const json_t *d;
        json_array_foreach(days, k, d)
        {
            if (!json_is_integer(d) || json_integer_value(d) < 1 || json_integer_value(d) > 7) {
                snprintf(err, errlen, "time_window.days[%zu]: a day number 1 (Monday) to 7", k);
                return -1;
            }
            r->days |= 1u << json_integer_value(d);
        }
    }
    r->window = true;
    return 0;
}

kp_route_t *kp_route_new(const json_t *conditions, const json_t *time_window, char *err,
                         size_t errlen)
{
    kp_route_t *r = calloc(1, sizeof *r);
    if (!r) abort();
    err[0] = 0;
    if (conditions && !json_is_null(conditions)) {
        if (!json_is_array(conditions) || json_array_size(conditions) > KP_ROUTE_MAX_CONDITIONS) {
            snprintf(err, errlen, "conditions: an array of at most %d conditions",
                     KP_ROUTE_MAX_CONDITIONS);
            goto error;
        }
        size_t n = json_array_size(conditions);
        r->conds = calloc(n ? n : 1, sizeof *r->conds);
        if (!r->conds) abort();
        for (size_t i = 0; i < n; i++) {
            r->n = i + 1; /* so destroy frees what this one allocated */
            if (s_cond(&r->conds[i], json_array_get(conditions, i), i, err, errlen)) goto error;
        }
    }
    if (s_window(r, time_window, err, errlen)) goto error;
    return r;
error:
    kp_route_destroy(&r);
    return NULL;
}

/* ---- matching ------------------------------------------------------------------------------ */

/* One value of a DICOM JSON element as text into out (numbers as JSON writes them, a person
 * name's Alphabetic group). */
static void s_value_text(const json_t *v, char *out, size_t outlen)
{
    out[0] = 0;
    if (json_is_string(v)) {
        snprintf(out, outlen, "%s", json_string_value(v));
    } else if (json_is_integer(v)) {
        snprintf(out, outlen, "%lld", (long long)json_integer_value(v));
    } else if (json_is_real(v)) {
        snprintf(out, outlen, "%.17g", json_real_value(v));
    } else if (json_is_object(v)) {
        const char *a = json_string_value(json_object_get(v, "Alphabetic"));
        snprintf(out, outlen, "%s", a ? a : "");
    }
}

static bool s_test_one(const s_cond_t *c, const char *s)
{
    switch (c->op) {
    case S_EQUALS:
        return !strcmp(s, c->value);
    case S_WILDCARD:
        return fnmatch(c->value, s, 0) == 0;
    case S_REGEX:
        return regexec(&c->re, s, 0, NULL, 0) == 0;
    default:
        return false;
    }
}

/* The test on an element given as its DICOM JSON object (NULL: absent). */
static bool s_test_element(const s_cond_t *c, const json_t *el)
{
    if (c->op == S_PRESENT) return el != NULL;
    if (c->op == S_ABSENT) return el == NULL;
    if (!el) return false;
    const json_t *vals = json_object_get(el, "Value");
    size_t n = json_array_size(vals);
    char joined[4096] = "", one[1024];
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        s_value_text(json_array_get(vals, i), one, sizeof one);
        if (s_test_one(c, one)) return true;
        int w = snprintf(joined + len, sizeof joined - len, "%s%s", i ? "\\" : "", one);
        if (w > 0) len = len + (size_t)w < sizeof joined ? len + (size_t)w : sizeof joined - 1;
    }
    if (n == 0) return s_test_one(c, "");
    return n > 1 && s_test_one(c, joined);
}

/* The test on a column value (NULL or "": absent). */
static bool s_test_text(const s_cond_t *c, const char *s)
{
    bool present = s && *s;
    if (c->op == S_PRESENT) return present;
    if (c->op == S_ABSENT) return !present;
    if (!present) return false;
    return s_test_one(c, s);
}

static const json_t *s_element(const json_t *md, uint32_t tag)
{
    char key[9];
    snprintf(key, sizeof key, "%08X", tag);
    return md ? json_object_get(md, key) : NULL;
}

static bool s_in_window(const kp_route_t *r, time_t when)
{
    if (!r->window) return true;
    struct tm tm;
    if (!localtime_r(&when, &tm)) return false;
    int min = tm.tm_hour * 60 + tm.tm_min;
    int day = tm.tm_wday == 0 ? 7 : tm.tm_wday; /* 1 Monday .. 7 Sunday */
    if (r->from <= r->to) {
        if (min < r->from || min >= r->to) return false;
    } else { /* across midnight: the day is the one the window opened on */
        if (min >= r->to && min < r->from) return false;
        if (min < r->to) day = day == 1 ? 7 : day - 1;
    }
    return !r->days || (r->days & (1u << day));
}

bool kp_route_match(const kp_route_t *r, const kp_route_instance_t *in)
{
    if (!r || !in) return false;
    for (size_t i = 0; i < r->n; i++) {
        const s_cond_t *c = &r->conds[i];
        bool ok;
        switch (c->attr) {
        case S_MODALITY:
            ok = in->modality ? s_test_text(c, in->modality)
                              : s_test_element(c, s_element(in->metadata, c->tag));
            break;
        case S_CALLING:
            ok = s_test_text(c, in->calling_ae);
            break;
        case S_CALLED:
            ok = s_test_text(c, in->called_ae);
            break;
        case S_SOPCLASS:
            ok = in->sop_class ? s_test_text(c, in->sop_class)
                               : s_test_element(c, s_element(in->metadata, c->tag));
            break;
        default:
            ok = s_test_element(c, s_element(in->metadata, c->tag));
        }
        if (!ok) return false;
    }
    return s_in_window(r, in->when);
}

/* ---- destinations -------------------------------------------------------------------------- */

static bool s_url_ok(const char *u)
{
    size_t n = strlen(u);
    if (n < 8 || n > KP_ROUTE_MAX_URL) return false;
    const char *host;
    if (!strncmp(u, "http://", 7))
        host = u + 7;
    else if (!strncmp(u, "https://", 8))
        host = u + 8;
    else
        return false;
    if (!*host || *host == '/' || *host == ':' || *host == '?' || *host == '#') return false;
    for (const char *p = u; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f) return false;
    return true;
}

static bool s_secret_ok(const json_t *v)
{
    const char *s = json_string_value(v);
    if (!s || !*s || strlen(s) > 4096) return false;
    for (const char *p = s; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f) return false;
    return true;
}

int kp_route_destination_key(const json_t *d, char *out, size_t outlen)
{
    const char *type = json_string_value(json_object_get(d, "type"));
    if (!type) return -1;
    if (!strcmp(type, "dicom")) {
        const char *ae = json_string_value(json_object_get(d, "ae"));
        if (!kp_route_ae_valid(ae)) return -1;
        snprintf(out, outlen, "dicom:%s", ae);
        return 0;
    }
    if (!strcmp(type, "stow")) {
        const char *url = json_string_value(json_object_get(d, "url"));
        if (!url || !s_url_ok(url)) return -1;
        if ((size_t)snprintf(out, outlen, "stow:%s", url) >= outlen) return -1;
        return 0;
    }
    return -1;
}

int kp_route_destinations_check(const json_t *dests, char *err, size_t errlen)
{
    if (!json_is_array(dests) || json_array_size(dests) == 0 ||
        json_array_size(dests) > KP_ROUTE_MAX_DESTINATIONS) {
        snprintf(err, errlen, "destinations: 1 to %d destinations are required",
                 KP_ROUTE_MAX_DESTINATIONS);
        return -1;
    }
    size_t i;
    const json_t *d;
    json_array_foreach(dests, i, d)
    {
        const char *type = json_string_value(json_object_get(d, "type"));
        if (!json_is_object(d) || !type || (strcmp(type, "dicom") && strcmp(type, "stow"))) {
            snprintf(err, errlen, "destinations[%zu].type: \"dicom\" or \"stow\" is required", i);
            return -1;
        }
        if (!strcmp(type, "dicom")) {
            if (!kp_route_ae_valid(json_string_value(json_object_get(d, "ae")))) {
                snprintf(err, errlen,
                         "destinations[%zu].ae: an AE title (1 to 16 characters, no backslash) "
                         "is required",
                         i);
                return -1;
            }
        } else {
            const char *url = json_string_value(json_object_get(d, "url"));
            if (!url || !s_url_ok(url)) {
                snprintf(err, errlen,
                         "destinations[%zu].url: an http:// or https:// URL (the STOW-RS studies "
                         "endpoint, no spaces) is required",
                         i);
                return -1;
            }
            const json_t *a = json_object_get(d, "auth");
            if (a && !json_is_null(a)) {
                const char *at = json_string_value(json_object_get(a, "type"));
                if (!json_is_object(a) || !at ||
                    (strcmp(at, "none") && strcmp(at, "bearer") && strcmp(at, "basic"))) {
                    snprintf(err, errlen,
                             "destinations[%zu].auth.type: none, bearer or basic is required", i);
                    return -1;
                }
                if (!strcmp(at, "bearer") && !s_secret_ok(json_object_get(a, "token"))) {
                    snprintf(err, errlen, "destinations[%zu].auth.token: required for bearer", i);
                    return -1;
                }
                if (!strcmp(at, "basic")) {
                    const char *u = json_string_value(json_object_get(a, "username"));
                    if (!s_secret_ok(json_object_get(a, "username")) || strchr(u, ':')) {
                        snprintf(err, errlen,
                                 "destinations[%zu].auth.username: required for basic (no ':')", i);
                        return -1;
                    }
                    if (!s_secret_ok(json_object_get(a, "password"))) {
                        snprintf(err, errlen, "destinations[%zu].auth.password: required for basic",
                                 i);
                        return -1;
                    }
                }
            }
        }
        char key[KP_ROUTE_MAX_URL + 8], other[KP_ROUTE_MAX_URL + 8];
        kp_route_destination_key(d, key, sizeof key);
        for (size_t k = 0; k < i; k++) {
            if (!kp_route_destination_key(json_array_get(dests, k), other, sizeof other) &&
                !strcmp(key, other)) {
                snprintf(err, errlen, "destinations[%zu]: the same as destinations[%zu]", i, k);
                return -1;
            }
        }
    }
    return 0;
}

json_t *kp_route_destinations_public(const json_t *dests)
{
    json_t *out = json_array();
    if (!out) abort();
    size_t i;
    const json_t *d;
    json_array_foreach(dests, i, d)
    {
        json_t *c = json_deep_copy(d);
        if (!c) abort();
        json_t *a = json_object_get(c, "auth");
        if (json_is_object(a)) {
            const char *at = json_string_value(json_object_get(a, "type"));
            bool set = json_object_get(a, "token") || json_object_get(a, "password");
            json_t *pub = json_pack("{s:s, s:b}", "type", at ? at : "none", "set", set);
            if (!pub) abort();
            if (at && !strcmp(at, "basic") && json_is_string(json_object_get(a, "username")))
                json_object_set(pub, "username", json_object_get(a, "username"));
            json_object_set_new(c, "auth", pub);
        } else if (json_string_value(json_object_get(c, "type")) &&
                   !strcmp(json_string_value(json_object_get(c, "type")), "stow")) {
            json_object_set_new(c, "auth", json_pack("{s:s, s:b}", "type", "none", "set", 0));
        }
        json_array_append_new(out, c);
    }
    return out;
}

void kp_route_destinations_keep_secrets(json_t *dests, const json_t *old)
{
    size_t i, k;
    json_t *d;
    const json_t *o;
    json_array_foreach(dests, i, d)
    {
        json_t *a = json_object_get(d, "auth");
        const char *url = json_string_value(json_object_get(d, "url"));
        const char *at = json_string_value(json_object_get(a, "type"));
        if (!url || !at) continue;
        const char *secret = !strcmp(at, "bearer")  ? "token"
                             : !strcmp(at, "basic") ? "password"
                                                    : NULL;
        if (!secret || json_object_get(a, secret)) continue;
        json_array_foreach(old, k, o)
        {
            const json_t *oa = json_object_get(o, "auth");
            const char *ou = json_string_value(json_object_get(o, "url"));
            const char *ot = json_string_value(json_object_get(oa, "type"));
            if (ou && ot && !strcmp(ou, url) && !strcmp(ot, at) && json_object_get(oa, secret)) {
                json_object_set(a, secret, json_object_get(oa, secret));
                if (!strcmp(at, "basic") && !json_object_get(a, "username"))
                    json_object_set(a, "username", json_object_get(oa, "username"));
                break;
            }
        }
        json_object_del(a, "set");
    }
}
