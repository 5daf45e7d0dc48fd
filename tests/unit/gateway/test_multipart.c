/* Unit tests of kp_multipart: Content-Type parameters and the streaming multipart/related
 * parser. Every well-formed body is fed whole, in 1-byte chunks and in random chunk sizes,
 * and each way must produce byte-identical parts (binary bodies hold CR, LF, "--", NULs and
 * partial delimiters, so the look-behind across chunk boundaries is exercised). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kp_errors.h"
#include "kp_multipart.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define B    "Kp-bNd_0123"
#define MAXP 8

/* What the callbacks saw. */
typedef struct {
    int nbegin, nend;
    char ctype[MAXP][256];
    unsigned char *body[MAXP];
    size_t len[MAXP], cap[MAXP];
    bool open;                              /* between part_begin and part_end */
    int abort_begin, abort_data, abort_end; /* return this from the callback when nonzero */
} s_rec_t;

static int s_begin(void *u, const char *ctype)
{
    s_rec_t *r = u;
    assert_false(r->open);
    assert_true(r->nbegin < MAXP);
    assert_true(strlen(ctype) < sizeof r->ctype[0]);
    strcpy(r->ctype[r->nbegin++], ctype);
    r->open = true;
    return r->abort_begin;
}

static int s_data(void *u, const unsigned char *p, size_t n)
{
    s_rec_t *r = u;
    assert_true(r->open);
    assert_true(n > 0);
    int i = r->nbegin - 1;
    if (r->len[i] + n > r->cap[i]) { /* doubling: ASan's realloc always copies */
        r->cap[i] = 2 * (r->len[i] + n);
        r->body[i] = realloc(r->body[i], r->cap[i]);
        assert_non_null(r->body[i]);
    }
    memcpy(r->body[i] + r->len[i], p, n);
    r->len[i] += n;
    return r->abort_data;
}

static int s_end(void *u)
{
    s_rec_t *r = u;
    assert_true(r->open);
    r->open = false;
    r->nend++;
    return r->abort_end;
}

static void s_rec_free(s_rec_t *r)
{
    for (int i = 0; i < MAXP; i++)
        free(r->body[i]);
    memset(r, 0, sizeof *r);
}

static uint32_t s_rand(uint32_t *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    return *seed >> 8;
}

/* Feeds buf[0..len) in chunks: chunk == 0 whole, chunk > 0 that many bytes, chunk < 0 random
 * sizes (1..-chunk) from seed. Returns the first nonzero feed result, else finish(). */
static int s_parse(const char *boundary, const void *buf, size_t len, long chunk, uint32_t seed,
                   size_t hmax, s_rec_t *r, int *nparts)
{
    kp_multipart_cb_t cb = {s_begin, s_data, s_end, r};
    kp_multipart_t *m = kp_multipart_new(boundary, &cb, hmax);
    assert_non_null(m);
    const unsigned char *p = buf;
    size_t off = 0;
    int rc = 0;
    while (off < len && rc == 0) {
        size_t n = chunk == 0  ? len - off
                   : chunk > 0 ? (size_t)chunk
                               : 1 + s_rand(&seed) % (size_t)(-chunk);
        if (n > len - off) n = len - off;
        rc = kp_multipart_feed(m, p + off, n);
        off += n;
    }
    if (rc == 0) rc = kp_multipart_finish(m);
    *nparts = kp_multipart_nparts(m);
    kp_multipart_destroy(&m);
    assert_null(m);
    kp_multipart_destroy(&m); /* idempotent */
    return rc;
}

/* Parses buf every way; each must return want and give the same parts as the whole feed. */
static void s_parse_all_ways(const char *boundary, const void *buf, size_t len, int want,
                             s_rec_t *out)
{
    int np;
    memset(out, 0, sizeof *out);
    assert_int_equal(s_parse(boundary, buf, len, 0, 0, 0, out, &np), want);
    assert_int_equal(np, out->nend);
    long chunks[] = {1, 2, 3, 7, 16, -3, -20, -100, -100, -100, -5000};
    for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
        s_rec_t r;
        memset(&r, 0, sizeof r);
        assert_int_equal(
            s_parse(boundary, buf, len, chunks[c], (uint32_t)c * 7919u + 1, 0, &r, &np), want);
        assert_int_equal(r.nbegin, out->nbegin);
        assert_int_equal(r.nend, out->nend);
        for (int i = 0; i < r.nbegin; i++) {
            assert_string_equal(r.ctype[i], out->ctype[i]);
            assert_int_equal(r.len[i], out->len[i]);
            if (r.len[i]) assert_memory_equal(r.body[i], out->body[i], r.len[i]);
        }
        s_rec_free(&r);
    }
}

/* A growable byte string for building bodies. */
typedef struct {
    unsigned char *p;
    size_t n, cap;
} s_buf_t;

static void s_put(s_buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = 2 * (b->n + n);
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void s_puts(s_buf_t *b, const char *s)
{
    s_put(b, s, strlen(s));
}

/* A nasty binary body of about len bytes: delimiter prefixes, CR/LF runs, NULs, the boundary
 * without its CRLF or with a bare LF, and random bytes. */
static void s_binary(s_buf_t *b, size_t len, uint32_t seed)
{
    static const char *const bits[] = {
        "\r\n--",
        "\r\n--Kp",
        "\r\n--Kp-bNd_012",
        "\r\r\n--Kp-bNd_01",
        "x\n--" B "\r\n",
        "y--" B "--",
        "\r",
        "\r\n",
        "\r\n\r\n",
        "-",
        "--",
        "\r\n-",
        "\r\n--K\r\n--Kp-",
        "x--" B,
        "\r\n--Kp-bNd_0124",
    };
    while (b->n < len) {
        uint32_t r = s_rand(&seed);
        if (r % 3 == 0) {
            const char *s = bits[r / 3 % (sizeof bits / sizeof bits[0])];
            s_puts(b, s);
        } else if (r % 3 == 1) {
            unsigned char z[5] = {0, 0, 0xFF, 0, '\r'};
            s_put(b, z, 1 + r / 3 % 5);
        } else {
            unsigned char c = (unsigned char)(r >> 4);
            s_put(b, &c, 1);
        }
    }
    /* random bytes may complete a delimiter after a prefix: break any such occurrence */
    const char delim[] = "\r\n--" B;
    for (unsigned char *q = b->p;
         (q = memmem(q, b->n - (size_t)(q - b->p), delim, sizeof delim - 1)) != NULL;)
        q[sizeof delim - 2] = '4';
}

static void test_content_type(void **state)
{
    (void)state;
    char b[KP_MULTIPART_BOUNDARY_MAX + 1], t[64];
    assert_int_equal(kp_multipart_content_type("multipart/related; type=\"application/dicom\"; "
                                               "boundary=XYZ",
                                               b, sizeof b, t, sizeof t),
                     0);
    assert_string_equal(b, "XYZ");
    assert_string_equal(t, "application/dicom");
    /* order, case, spaces, token values, other parameters */
    assert_int_equal(kp_multipart_content_type("  Multipart/RELATED ;BOUNDARY = abc.d:e=f ; "
                                               "start=\"<1@x>\";TYPE=Application/DICOM;"
                                               "charset=utf-8;",
                                               b, sizeof b, t, sizeof t),
                     0);
    assert_string_equal(b, "abc.d:e=f");
    assert_string_equal(t, "application/dicom");
    /* quoted boundary with spaces inside the quotes, type missing */
    assert_int_equal(kp_multipart_content_type("multipart/related;boundary=\"a b  c\"", b, sizeof b,
                                               t, sizeof t),
                     0);
    assert_string_equal(b, "a b  c");
    assert_string_equal(t, "");
    assert_int_equal(kp_multipart_content_type("multipart/related; boundary=\"q\\\"x\"", b,
                                               sizeof b, t, sizeof t),
                     KP_EINVAL); /* '"' is no bchar */
    /* 70 characters is the limit */
    char v[200];
    snprintf(v, sizeof v, "multipart/related; boundary=%070d", 7);
    assert_int_equal(kp_multipart_content_type(v, b, sizeof b, t, sizeof t), 0);
    assert_int_equal(strlen(b), 70);
    snprintf(v, sizeof v, "multipart/related; boundary=%071d", 7);
    assert_int_equal(kp_multipart_content_type(v, b, sizeof b, t, sizeof t), KP_EINVAL);
    assert_string_equal(b, "");
    /* not multipart/related: 415 */
    const char *unsupported[] = {NULL,
                                 "",
                                 "application/dicom",
                                 "multipart/mixed; boundary=x",
                                 "multipart/relatedx; boundary=x",
                                 "multipart",
                                 "related/multipart",
                                 "text/plain; boundary=x"};
    for (size_t i = 0; i < sizeof unsupported / sizeof unsupported[0]; i++)
        assert_int_equal(kp_multipart_content_type(unsupported[i], b, sizeof b, t, sizeof t),
                         KP_EUNSUPPORTED);
    /* boundary missing or invalid, malformed parameters: 400 */
    const char *invalid[] = {"multipart/related",
                             "multipart/related; type=\"application/dicom\"",
                             "multipart/related; boundary=",
                             "multipart/related; boundary=\"\"",
                             "multipart/related; boundary=\"ends with space \"",
                             "multipart/related; boundary=a; boundary=b",
                             "multipart/related; boundary=a{b",
                             "multipart/related; boundary=\"unterminated",
                             "multipart/related; boundary=a b",
                             "multipart/related boundary=a",
                             "multipart/related; =a; boundary=b",
                             "multipart/related; boundary=a; type",
                             "multipart/related; boundary=a; type=\"x\"; type=y"};
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
        assert_int_equal(kp_multipart_content_type(invalid[i], b, sizeof b, t, sizeof t),
                         KP_EINVAL);
    /* outputs too small */
    assert_int_equal(
        kp_multipart_content_type("multipart/related; boundary=abcdef", b, 4, t, sizeof t),
        KP_EINVAL);
    assert_int_equal(kp_multipart_content_type("multipart/related; boundary=a; "
                                               "type=application/dicom",
                                               b, sizeof b, t, 8),
                     KP_EINVAL);
}

static void test_new_invalid_boundary(void **state)
{
    (void)state;
    char longb[80];
    memset(longb, 'a', 71);
    longb[71] = 0;
    const char *bad[] = {NULL, "", "trailing ", "cr\r", "brace{", longb};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_null(kp_multipart_new(bad[i], NULL, 0));
    longb[70] = 0;
    kp_multipart_t *m = kp_multipart_new(longb, NULL, 0);
    assert_non_null(m);
    kp_multipart_destroy(&m);
}

static void test_one_part(void **state)
{
    (void)state;
    s_buf_t body = {0}, msg = {0};
    s_binary(&body, 3000, 42);
    s_puts(&msg, "--" B "\r\nContent-Type: application/dicom\r\n\r\n");
    s_put(&msg, body.p, body.n);
    s_puts(&msg, "\r\n--" B "--\r\n");
    s_rec_t r;
    s_parse_all_ways(B, msg.p, msg.n, 0, &r);
    assert_int_equal(r.nbegin, 1);
    assert_int_equal(r.nend, 1);
    assert_string_equal(r.ctype[0], "application/dicom");
    assert_int_equal(r.len[0], body.n);
    assert_memory_equal(r.body[0], body.p, body.n);
    s_rec_free(&r);
    free(body.p);
    free(msg.p);
}

static void test_three_parts(void **state)
{
    (void)state;
    s_buf_t body[3] = {{0}}, msg = {0};
    s_binary(&body[0], 5000, 1);
    s_binary(&body[1], 1, 2);
    s_binary(&body[2], 20000, 3);
    /* body 1 ends in CR and body 2 in a delimiter prefix: the look-behind meets the real one */
    s_puts(&body[1], "\r");
    s_puts(&body[2], "\r\n--Kp-bNd");
    s_puts(&msg, "--" B "\r\n"
                 "Content-Type: application/dicom\r\n"
                 "Content-Location: http://x/1\r\n"
                 "Content-Length: 5000\r\n\r\n");
    s_put(&msg, body[0].p, body[0].n);
    s_puts(&msg, "\r\n--" B "\r\n"
                 "content-type:application/dicom;\r\n"
                 "\ttransfer-syntax=1.2.840.10008.1.2.1  \r\n"
                 "Content-Transfer-Encoding: binary\r\n\r\n");
    s_put(&msg, body[1].p, body[1].n);
    s_puts(&msg, "\r\n--" B "\n"
                 "X-Other: 1\n\n"); /* bare LF line ends in headers, no Content-Type */
    s_put(&msg, body[2].p, body[2].n);
    s_puts(&msg, "\r\n--" B "--");
    s_rec_t r;
    s_parse_all_ways(B, msg.p, msg.n, 0, &r);
    assert_int_equal(r.nbegin, 3);
    assert_int_equal(r.nend, 3);
    assert_string_equal(r.ctype[0], "application/dicom");
    assert_string_equal(r.ctype[1], "application/dicom; transfer-syntax=1.2.840.10008.1.2.1");
    assert_string_equal(r.ctype[2], "");
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r.len[i], body[i].n);
        assert_memory_equal(r.body[i], body[i].p, body[i].n);
        free(body[i].p);
    }
    s_rec_free(&r);
    free(msg.p);
}

static void test_empty_parts_and_boundary_chars(void **state)
{
    (void)state;
    /* an empty body, and a body that is just CRLF; a boundary with spaces and bchars */
    const char msg[] = "--a b'()+_,-./:=?z\r\n\r\n"
                       "\r\n--a b'()+_,-./:=?z\r\nContent-Type: x/y\r\n\r\n\r\n"
                       "\r\n--a b'()+_,-./:=?z--";
    s_rec_t r;
    s_parse_all_ways("a b'()+_,-./:=?z", msg, sizeof msg - 1, 0, &r);
    assert_int_equal(r.nend, 2);
    assert_int_equal(r.len[0], 0);
    assert_string_equal(r.ctype[0], "");
    assert_int_equal(r.len[1], 2);
    assert_memory_equal(r.body[1], "\r\n", 2);
    s_rec_free(&r);
}

static void test_preamble_epilogue(void **state)
{
    (void)state;
    const char msg[] = "This is a preamble.\r\n"
                       "--Kp-bNd_012\r\n"   /* a boundary prefix */
                       " --" B "\r\n"       /* not at a line start */
                       "--" B "x\r\n"       /* garbage after it: still preamble */
                       "--" B " y\n"        /* padding then garbage */
                       "\r\n--" B " \t\r\n" /* the first delimiter */
                       "Content-Type: a/b\r\n\r\n"
                       "one"
                       "\r\n--" B "--  \r\n" /* close */
                       "epilogue\r\n--" B "\r\nContent-Type: c/d\r\n\r\nignored\r\n--" B "--";
    s_rec_t r;
    s_parse_all_ways(B, msg, sizeof msg - 1, 0, &r);
    assert_int_equal(r.nend, 1);
    assert_string_equal(r.ctype[0], "a/b");
    assert_int_equal(r.len[0], 3);
    assert_memory_equal(r.body[0], "one", 3);
    s_rec_free(&r);
    /* bare LFs in the preamble (an empty line, a prefix cut by LF), epilogue of binary junk */
    const char msg2[] = "pre\n--Kp\n--" B "-\n--" B "\r\n\r\nx\r\n--" B "--\xff\x00\r\n--";
    s_parse_all_ways(B, msg2, sizeof msg2 - 1, 0, &r);
    assert_int_equal(r.nend, 1);
    assert_int_equal(r.len[0], 1);
    s_rec_free(&r);
    const char msg3[] = "\n--" B "\r\n\r\ny\r\n--" B "--"; /* an empty first line */
    s_parse_all_ways(B, msg3, sizeof msg3 - 1, 0, &r);
    assert_int_equal(r.nend, 1);
    assert_memory_equal(r.body[0], "y", 1);
    s_rec_free(&r);
}

static void test_transport_padding(void **state)
{
    (void)state;
    const char msg[] = "--" B "   \t \r\n\r\nA"
                       "\r\n--" B "\t\n\r\nB"
                       "\r\n--" B "--\t \r\n";
    s_rec_t r;
    s_parse_all_ways(B, msg, sizeof msg - 1, 0, &r);
    assert_int_equal(r.nend, 2);
    assert_memory_equal(r.body[0], "A", 1);
    assert_memory_equal(r.body[1], "B", 1);
    s_rec_free(&r);
}

static void test_truncated(void **state)
{
    (void)state;
    const char *cases[] = {
        "",                                             /* nothing */
        "just a preamble\r\n",                          /* no delimiter */
        "--" B "--\r\n",                                /* closed without any part */
        "--" B,                                         /* in the first delimiter */
        "--" B "\r\nContent-Ty",                        /* mid-header */
        "--" B "\r\nContent-Type: a/b\r\n",             /* before the blank line */
        "--" B "\r\n\r\nbody bytes",                    /* mid-body */
        "--" B "\r\n\r\nbody bytes\r\n--Kp-b",          /* in the delimiter */
        "--" B "\r\n\r\nbody\r\n--" B,                  /* delimiter without its line end */
        "--" B "\r\n\r\nbody\r\n--" B "-",              /* half a close */
        "--" B "\r\n\r\nbody\r\n--" B "\r\n\r\nsecond", /* missing close delimiter */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s_rec_t r;
        s_parse_all_ways(B, cases[i], strlen(cases[i]), KP_EINVAL, &r);
        assert_false(r.nbegin > r.nend + 1);
        s_rec_free(&r);
    }
    /* the part in progress is left open: begun, some data, never ended */
    s_rec_t r;
    const char *cut = "--" B "\r\n\r\nbody\r\n--" B "\r\n\r\nsecond";
    s_parse_all_ways(B, cut, strlen(cut), KP_EINVAL, &r);
    assert_int_equal(r.nbegin, 2);
    assert_int_equal(r.nend, 1);
    assert_true(r.open);
    assert_int_equal(r.len[1], 6);
    s_rec_free(&r);
}

static void test_oversize_header(void **state)
{
    (void)state;
    const char hdr[] = "Content-Type: abcdefghijklm\r\n\r\n"; /* the whole header block */
    const char msg[] = "--" B "\r\nContent-Type: abcdefghijklm\r\n\r\nX\r\n--" B "--";
    s_rec_t r;
    int np;
    assert_int_equal(sizeof hdr - 1, 31);
    for (long chunk = 0; chunk <= 1; chunk++) {
        memset(&r, 0, sizeof r);
        assert_int_equal(s_parse(B, msg, sizeof msg - 1, chunk, 0, 31, &r, &np), 0);
        assert_int_equal(np, 1);
        s_rec_free(&r);
        assert_int_equal(s_parse(B, msg, sizeof msg - 1, chunk, 0, 30, &r, &np), KP_EINVAL);
        assert_int_equal(r.nbegin, 0);
        s_rec_free(&r);
    }
    /* an endless header line is refused without buffering it */
    kp_multipart_t *m = kp_multipart_new(B, NULL, 8192);
    assert_int_equal(kp_multipart_feed(m, (const unsigned char *)"--" B "\r\n", 15), 0);
    unsigned char junk[1000];
    memset(junk, 'h', sizeof junk);
    int rc = 0;
    for (int i = 0; i < 20 && rc == 0; i++)
        rc = kp_multipart_feed(m, junk, sizeof junk);
    assert_int_equal(rc, KP_EINVAL);
    assert_int_equal(kp_multipart_feed(m, junk, 1), KP_EINVAL); /* sticky */
    assert_int_equal(kp_multipart_finish(m), KP_EINVAL);
    kp_multipart_destroy(&m);
}

static void test_malformed(void **state)
{
    (void)state;
#define C(s)                                                                                       \
    {                                                                                              \
        s, sizeof s - 1                                                                            \
    }
    const struct {
        const char *p;
        size_t n;
    } cases[] = {
        C("--" B "\r\nno colon here\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\n: empty name\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\nBad Name: x\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\n folded first\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\nX: a\rb\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\nX: nul\0\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\nContent-Type: a/b\r\ncontent-type: c/d\r\n\r\nx\r\n--" B "--"),
        C("--" B "\r\n\r\nx\r\n--" B "garbage\r\n\r\ny\r\n--" B "--"),
        C("--" B "\r\n\r\nx\r\n--" B "-x"),
        C("--" B "\r\n\r\nx\r\n--" B " \r\r\n"),
        C("--" B "\r\n\r\nx\r\n--" B "\r\n--" B "--"), /* header line "--B--" */
    };
#undef C
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s_rec_t r;
        s_parse_all_ways(B, cases[i].p, cases[i].n, KP_EINVAL, &r);
        s_rec_free(&r);
    }
}

static void test_callback_abort(void **state)
{
    (void)state;
    const char msg[] = "--" B "\r\n\r\nfirst\r\n--" B "\r\n\r\nsecond\r\n--" B "--";
    int np;
    for (long chunk = 0; chunk <= 1; chunk++) {
        s_rec_t r = {.abort_begin = KP_EPERM};
        assert_int_equal(s_parse(B, msg, sizeof msg - 1, chunk, 0, 0, &r, &np), KP_EPERM);
        assert_int_equal(r.nbegin, 1);
        assert_int_equal(r.len[0], 0);
        s_rec_free(&r);
        r = (s_rec_t){.abort_data = KP_EIO};
        assert_int_equal(s_parse(B, msg, sizeof msg - 1, chunk, 0, 0, &r, &np), KP_EIO);
        assert_int_equal(r.nbegin, 1);
        assert_true(r.len[0] >= 1 && r.len[0] <= 5); /* stopped after the first data call */
        assert_int_equal(r.nend, 0);
        s_rec_free(&r);
        r = (s_rec_t){.abort_end = 1}; /* positive: KP_EINTERNAL */
        assert_int_equal(s_parse(B, msg, sizeof msg - 1, chunk, 0, 0, &r, &np), KP_EINTERNAL);
        assert_int_equal(r.nbegin, 1);
        assert_int_equal(r.nend, 1);
        s_rec_free(&r);
    }
    /* after an abort nothing more is called and finish() reports it */
    s_rec_t r = {.abort_begin = KP_ETOOBIG};
    kp_multipart_cb_t cb = {s_begin, s_data, s_end, &r};
    kp_multipart_t *m = kp_multipart_new(B, &cb, 0);
    assert_int_equal(kp_multipart_feed(m, (const unsigned char *)msg, sizeof msg - 1), KP_ETOOBIG);
    assert_int_equal(kp_multipart_feed(m, (const unsigned char *)msg, sizeof msg - 1), KP_ETOOBIG);
    assert_int_equal(kp_multipart_feed(m, NULL, 0), KP_ETOOBIG);
    assert_int_equal(kp_multipart_finish(m), KP_ETOOBIG);
    assert_int_equal(r.nbegin, 1);
    kp_multipart_destroy(&m);
    s_rec_free(&r);
}

static void test_no_callbacks(void **state)
{
    (void)state;
    const char msg[] = "--" B "\r\n\r\nfirst\r\n--" B "\r\n\r\nsecond\r\n--" B "--";
    kp_multipart_t *m = kp_multipart_new(B, NULL, 0);
    assert_int_equal(kp_multipart_feed(m, (const unsigned char *)msg, sizeof msg - 1), 0);
    assert_int_equal(kp_multipart_finish(m), 0);
    assert_int_equal(kp_multipart_nparts(m), 2);
    kp_multipart_destroy(&m);
    assert_int_equal(kp_multipart_nparts(NULL), 0);
}

/* 4 MB of CR-dense data in random chunks: exact, and fast enough to show no rescanning. */
static void test_large_body(void **state)
{
    (void)state;
    s_buf_t body = {0}, msg = {0};
    s_binary(&body, 4u << 20, 99);
    s_puts(&msg, "--" B "\r\nContent-Type: application/dicom\r\n\r\n");
    s_put(&msg, body.p, body.n);
    s_puts(&msg, "\r\n--" B "--\r\n");
    s_rec_t r;
    int np;
    for (long chunk = -1; chunk >= -70000; chunk = chunk * 37 - 1) {
        memset(&r, 0, sizeof r);
        assert_int_equal(s_parse(B, msg.p, msg.n, chunk, (uint32_t)-chunk, 0, &r, &np), 0);
        assert_int_equal(np, 1);
        assert_int_equal(r.len[0], body.n);
        assert_memory_equal(r.body[0], body.p, body.n);
        s_rec_free(&r);
    }
    free(body.p);
    free(msg.p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_content_type),
        cmocka_unit_test(test_new_invalid_boundary),
        cmocka_unit_test(test_one_part),
        cmocka_unit_test(test_three_parts),
        cmocka_unit_test(test_empty_parts_and_boundary_chars),
        cmocka_unit_test(test_preamble_epilogue),
        cmocka_unit_test(test_transport_padding),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_oversize_header),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_callback_abort),
        cmocka_unit_test(test_no_callbacks),
        cmocka_unit_test(test_large_body),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
