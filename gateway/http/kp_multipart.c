/* kp_multipart: streaming multipart/related parser and Content-Type parameters (see
 * kp_multipart.h for the design note). */
#include "kp_multipart.h"

#include "kp_errors.h"

#include <assert.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- Content-Type ---------------------------------------------------------------------- */

static bool s_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* RFC 2046 bchars: DIGIT / ALPHA / "'()+_,-./:=?" / space. */
static bool s_bchar(unsigned char c)
{
    return s_alnum(c) || (c && strchr("'()+_,-./:=? ", c));
}

static bool s_boundary_ok(const char *b, size_t n)
{
    if (n < 1 || n > KP_MULTIPART_BOUNDARY_MAX || b[n - 1] == ' ') return false;
    for (size_t i = 0; i < n; i++)
        if (!s_bchar((unsigned char)b[i])) return false;
    return true;
}

/* RFC 9110 tchar. */
static bool s_tchar(unsigned char c)
{
    return s_alnum(c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static const char *s_ows(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

static const char *s_token(const char *s)
{
    while (s_tchar((unsigned char)*s))
        s++;
    return s;
}

/* Parses a parameter value at *s: a quoted-string (backslash escapes) or, leniently, a run of
 * visible characters other than ';', '"' and '\\' (so type=application/dicom works unquoted).
 * Copies the unescaped value into out (when out != NULL and it fits, NUL-terminated) and
 * stores its length in *len. Returns false when malformed. */
static bool s_value(const char **s, char *out, size_t outlen, size_t *len)
{
    const char *p = *s;
    size_t n = 0;
    if (*p == '"') {
        for (p++;; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == '"') break;
            if (c == '\\') c = (unsigned char)*++p;
            if (c == 0 || ((c < 0x20 && c != '\t') || c == 0x7f)) return false;
            if (out && n + 1 < outlen) out[n] = (char)c;
            n++;
        }
        p++;
    } else {
        for (; *p > 0x20 && *p < 0x7f && *p != ';' && *p != '"' && *p != '\\'; p++) {
            if (out && n + 1 < outlen) out[n] = *p;
            n++;
        }
        if (n == 0) return false;
    }
    if (out && outlen) out[n < outlen ? n : outlen - 1] = 0;
    *len = n;
    *s = p;
    return true;
}

int kp_multipart_content_type(const char *value, char *boundary, size_t blen, char *type,
                              size_t tlen)
{
    int rc = KP_EUNSUPPORTED;
    bool have_boundary = false, have_type = false;
    const char *s, *t;
    if (blen) boundary[0] = 0;
    if (tlen) type[0] = 0;
    if (!value) goto error;
    s = s_ows(value);
    t = s_token(s);
    if (t - s != 9 || strncasecmp(s, "multipart", 9) || *t != '/') goto error;
    s = t + 1;
    t = s_token(s);
    if (t - s != 7 || strncasecmp(s, "related", 7)) goto error;
    rc = KP_EINVAL;
    for (s = s_ows(t); *s; s = s_ows(s)) {
        if (*s++ != ';') goto error;
        s = s_ows(s);
        if (*s == ';' || *s == 0) continue; /* empty parameter, trailing ';' */
        const char *name = s;
        s = s_token(s);
        size_t nlen = (size_t)(s - name), vlen;
        s = s_ows(s);
        if (nlen == 0 || *s++ != '=') goto error;
        s = s_ows(s);
        if (nlen == 8 && !strncasecmp(name, "boundary", 8)) {
            if (have_boundary || !s_value(&s, boundary, blen, &vlen)) goto error;
            if (vlen >= blen || !s_boundary_ok(boundary, vlen)) goto error;
            have_boundary = true;
        } else if (nlen == 4 && !strncasecmp(name, "type", 4)) {
            if (have_type || !s_value(&s, type, tlen, &vlen) || vlen >= tlen) goto error;
            for (char *c = type; *c; c++)
                if (*c >= 'A' && *c <= 'Z') *c = (char)(*c - 'A' + 'a');
            have_type = true;
        } else if (!s_value(&s, NULL, 0, &vlen)) {
            goto error;
        }
    }
    if (have_boundary) return 0;
error: /* no half-filled outputs */
    if (blen) boundary[0] = 0;
    if (tlen) type[0] = 0;
    return rc;
}

/* ---- the streaming parser -------------------------------------------------------------- */

typedef enum {
    S_PREAMBLE, /* before the first delimiter */
    S_DELIM,    /* after "--boundary": "--", or padding and a line end */
    S_HEADERS,  /* a part's header block */
    S_BODY,     /* a part's body: searching for CRLF "--" boundary */
    S_EPILOGUE, /* after the close delimiter: ignored */
    S_ERROR
} s_state_t;

typedef enum { D_START, D_DASH, D_PAD, D_CR } s_delim_t;

struct kp_multipart {
    kp_multipart_cb_t cb;
    char delim[4 + KP_MULTIPART_BOUNDARY_MAX + 1]; /* "\r\n--" boundary */
    size_t dlen;
    s_state_t state;
    int err;        /* the sticky error in S_ERROR */
    size_t k;       /* S_BODY: delimiter bytes matched (held back); S_PREAMBLE: see below */
    bool skip_line; /* S_PREAMBLE: not at a line start, skipping to LF */
    s_delim_t dstate;
    bool in_part; /* part_begin called, part_end not yet */
    bool closed;  /* close delimiter seen */
    int nparts;
    /* S_HEADERS: hbuf[0..ctlen) is the Content-Type value so far, hbuf[ctlen..hlen) the
     * current line (without its LF); htotal counts every header byte of this part. */
    char *hbuf;
    size_t hmax, hlen, ctlen, htotal;
    bool ct_seen, last_was_ct, any_field;
};

kp_multipart_t *kp_multipart_new(const char *boundary, const kp_multipart_cb_t *cb,
                                 size_t max_header_bytes)
{
    size_t blen = boundary ? strlen(boundary) : 0;
    if (!s_boundary_ok(boundary ? boundary : "", blen)) return NULL;
    kp_multipart_t *m = calloc(1, sizeof *m);
    if (!m) abort();
    if (cb) m->cb = *cb;
    memcpy(m->delim, "\r\n--", 4);
    memcpy(m->delim + 4, boundary, blen);
    m->dlen = 4 + blen;
    m->hmax = max_header_bytes ? max_header_bytes : KP_MULTIPART_HEADER_DEFAULT;
    m->hbuf = malloc(m->hmax + 1);
    if (!m->hbuf) abort();
    m->state = S_PREAMBLE;
    return m;
}

void kp_multipart_destroy(kp_multipart_t **m)
{
    if (!m || !*m) return;
    free((*m)->hbuf);
    free(*m);
    *m = NULL;
}

int kp_multipart_nparts(const kp_multipart_t *m)
{
    return m ? m->nparts : 0;
}

static int s_fail(kp_multipart_t *m, int rc)
{
    m->state = S_ERROR;
    m->err = rc;
    return rc;
}

/* A callback's return value as this module's result. */
static int s_cbrc(int rc)
{
    return rc < 0 ? rc : rc > 0 ? KP_EINTERNAL : 0;
}

static int s_data(kp_multipart_t *m, const unsigned char *p, size_t n)
{
    if (n == 0 || !m->cb.part_data) return 0;
    return s_cbrc(m->cb.part_data(m->cb.user, p, n));
}

static int s_end_part(kp_multipart_t *m)
{
    if (!m->in_part) return 0;
    m->in_part = false;
    m->nparts++;
    return m->cb.part_end ? s_cbrc(m->cb.part_end(m->cb.user)) : 0;
}

static void s_start_headers(kp_multipart_t *m)
{
    m->state = S_HEADERS;
    m->hlen = m->ctlen = m->htotal = 0;
    m->ct_seen = m->last_was_ct = m->any_field = false;
}

/* Appends the trimmed text [a, b) of the Content-Type to hbuf[0..ctlen) (a lies at or after
 * ctlen, so memmove never overwrites unread bytes). */
static void s_ct_append(kp_multipart_t *m, const char *a, const char *b)
{
    while (a < b && (*a == ' ' || *a == '\t'))
        a++;
    while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
        b--;
    if (a == b) return;
    if (m->ctlen) m->hbuf[m->ctlen++] = ' ';
    memmove(m->hbuf + m->ctlen, a, (size_t)(b - a));
    m->ctlen += (size_t)(b - a);
}

/* A complete header line is hbuf[ctlen..hlen) (LF excluded). Returns 1 at the blank line
 * ending the block, 0 for a header line, KP_EINVAL when malformed. */
static int s_header_line(kp_multipart_t *m)
{
    char *a = m->hbuf + m->ctlen, *b = m->hbuf + m->hlen;
    if (b > a && b[-1] == '\r') b--;
    if (a == b) return 1;
    for (const char *c = a; c < b; c++)
        if (((unsigned char)*c < 0x20 && *c != '\t') || *c == 0x7f) return KP_EINVAL;
    if (*a == ' ' || *a == '\t') { /* folded continuation of the previous field */
        if (!m->any_field) return KP_EINVAL;
        if (m->last_was_ct) s_ct_append(m, a, b);
    } else {
        char *colon = a;
        while (colon < b && *colon != ':' && (unsigned char)*colon > 0x20 &&
               (unsigned char)*colon < 0x7f)
            colon++;
        if (colon == a || colon == b || *colon != ':') return KP_EINVAL;
        m->any_field = true;
        m->last_was_ct = colon - a == 12 && !strncasecmp(a, "content-type", 12);
        if (m->last_was_ct) {
            if (m->ct_seen) return KP_EINVAL; /* two Content-Types: ambiguous */
            m->ct_seen = true;
            s_ct_append(m, colon + 1, b);
        }
    }
    m->hlen = m->ctlen;
    return 0;
}

/* Header bytes from p[*i]; on the blank line calls part_begin and moves to S_BODY. */
static int s_headers(kp_multipart_t *m, const unsigned char *p, size_t n, size_t *i)
{
    while (*i < n) {
        unsigned char c = p[(*i)++];
        if (++m->htotal > m->hmax) return KP_EINVAL;
        if (c != '\n') {
            m->hbuf[m->hlen++] = (char)c;
            continue;
        }
        int rc = s_header_line(m);
        if (rc < 0) return rc;
        if (rc == 1) {
            m->hbuf[m->ctlen] = 0;
            m->state = S_BODY;
            m->k = 0;
            m->in_part = true;
            return m->cb.part_begin ? s_cbrc(m->cb.part_begin(m->cb.user, m->hbuf)) : 0;
        }
    }
    return 0;
}

/* Body bytes from p[*i] until a delimiter (then S_DELIM) or the end of the chunk. The k held
 * bytes are delim[0..k); `carry` of them came from earlier chunks and the rest lie just before
 * p[*i], so the confirmed data of this chunk is p[run .. i - (k - carry)). */
static int s_body(kp_multipart_t *m, const unsigned char *p, size_t n, size_t *pi)
{
    size_t i = *pi, run = i, k = m->k, carry = k;
    int rc = 0;
    while (i < n) {
        if (k == 0) {
            const unsigned char *cr = memchr(p + i, '\r', n - i);
            if (!cr) {
                i = n;
                break;
            }
            i = (size_t)(cr - p) + 1;
            k = 1;
            continue;
        }
        if (p[i] == (unsigned char)m->delim[k]) {
            i++;
            if (++k == m->dlen) { /* delimiter: emit the data before it, drop it */
                rc = s_data(m, p + run, i - (k - carry) - run);
                m->k = 0;
                m->state = S_DELIM;
                m->dstate = D_START;
                *pi = i;
                return rc;
            }
            continue;
        }
        /* mismatch: all k held bytes are data; p[i] is looked at again with k == 0 */
        if (carry) {
            rc = s_data(m, (const unsigned char *)m->delim, carry);
            if (rc) return rc;
            carry = 0;
        }
        k = 0;
    }
    rc = s_data(m, p + run, i - (k - carry) - run);
    m->k = k;
    *pi = i;
    return rc;
}

/* The rest of a delimiter line from p[*i]. */
static int s_delim(kp_multipart_t *m, const unsigned char *p, size_t n, size_t *i)
{
    while (*i < n) {
        unsigned char c = p[(*i)++];
        switch (m->dstate) {
        case D_START:
            if (c == '-') {
                m->dstate = D_DASH;
                continue;
            }
            /* fall through */
        case D_PAD:
            if (c == ' ' || c == '\t') {
                m->dstate = D_PAD;
                continue;
            }
            if (c == '\r') {
                m->dstate = D_CR;
                continue;
            }
            /* fall through */
        case D_CR:
            if (c == '\n') {
                int rc = s_end_part(m);
                s_start_headers(m);
                return rc;
            }
            break;
        case D_DASH:
            if (c == '-') {
                m->closed = true;
                m->state = S_EPILOGUE;
                return s_end_part(m);
            }
            break;
        }
        /* garbage after the boundary: malformed inside the body, plain preamble before it */
        if (m->in_part || m->nparts) return KP_EINVAL;
        m->state = S_PREAMBLE;
        m->skip_line = c != '\n';
        m->k = 0;
        return 0;
    }
    return 0;
}

/* Preamble from p[*i]: looks for "--boundary" at the start of a line (delim + 2). */
static void s_preamble(kp_multipart_t *m, const unsigned char *p, size_t n, size_t *i)
{
    while (*i < n) {
        if (m->skip_line) {
            const unsigned char *lf = memchr(p + *i, '\n', n - *i);
            if (!lf) {
                *i = n;
                return;
            }
            *i = (size_t)(lf - p) + 1;
            m->skip_line = false;
            m->k = 0;
            continue;
        }
        unsigned char c = p[(*i)++];
        if (c == (unsigned char)m->delim[2 + m->k]) {
            if (2 + ++m->k == m->dlen) {
                m->state = S_DELIM;
                m->dstate = D_START;
                m->k = 0;
                return;
            }
        } else {
            m->k = 0;
            m->skip_line = c != '\n';
        }
    }
}

int kp_multipart_feed(kp_multipart_t *m, const unsigned char *p, size_t n)
{
    assert(m && (p || n == 0));
    size_t i = 0;
    int rc = 0;
    while (i < n && rc == 0) {
        switch (m->state) {
        case S_PREAMBLE:
            s_preamble(m, p, n, &i);
            break;
        case S_DELIM:
            rc = s_delim(m, p, n, &i);
            break;
        case S_HEADERS:
            rc = s_headers(m, p, n, &i);
            break;
        case S_BODY:
            rc = s_body(m, p, n, &i);
            break;
        case S_EPILOGUE:
            return 0;
        case S_ERROR:
            return m->err;
        }
    }
    if (m->state == S_ERROR) return m->err;
    return rc ? s_fail(m, rc) : 0;
}

int kp_multipart_finish(kp_multipart_t *m)
{
    assert(m);
    if (m->state == S_ERROR) return m->err;
    if (m->closed && m->nparts > 0) return 0;
    return KP_EINVAL;
}
