/* libFuzzer driver for the STOW-RS multipart/related parser and the Content-Type parameter
 * parser (gateway/http/kp_multipart.c). The first byte picks a split point; the rest is a body
 * with the fixed boundary "fz-b" (its first line, a preamble to the parser, also goes to
 * kp_multipart_content_type). The body is parsed whole, in two chunks at the split point and,
 * when small, byte by byte: all must return the same code and the same parts, byte for byte.
 * Run: mkdir -p /tmp/mp-corpus && build/fuzz/bin/fuzz_multipart /tmp/mp-corpus
 * tests/fuzz/corpus/multipart */
#include "kp_errors.h"
#include "kp_multipart.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define BOUNDARY "fz-b"

/* A digest of the callbacks: FNV-1a over part starts, content types, body bytes and ends. */
typedef struct {
    uint64_t h;
    size_t bytes;
    int begun, ended, open;
} s_sum_t;

static void s_mix(s_sum_t *s, const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        s->h = (s->h ^ c[i]) * 1099511628211u;
}

static int s_begin(void *u, const char *ctype)
{
    s_sum_t *s = u;
    if (s->open) abort(); /* part_begin inside a part */
    s->open = 1;
    s->begun++;
    s_mix(s, "B", 1);
    s_mix(s, ctype, strlen(ctype) + 1);
    return 0;
}

static int s_data(void *u, const unsigned char *p, size_t n)
{
    s_sum_t *s = u;
    if (!s->open || n == 0) abort(); /* data outside a part, or empty */
    s->bytes += n;
    s_mix(s, p, n);
    return 0;
}

static int s_end(void *u)
{
    s_sum_t *s = u;
    if (!s->open) abort();
    s->open = 0;
    s->ended++;
    s_mix(s, "E", 1);
    return 0;
}

/* Parses p[0..n) in pieces of `step` bytes after a first piece of `first` bytes. */
static int s_run(const uint8_t *p, size_t n, size_t first, size_t step, s_sum_t *s)
{
    *s = (s_sum_t){.h = 14695981039346656037u};
    kp_multipart_cb_t cb = {s_begin, s_data, s_end, s};
    kp_multipart_t *m = kp_multipart_new(BOUNDARY, &cb, 256);
    if (!m) abort();
    int rc = kp_multipart_feed(m, p, first);
    for (size_t off = first; rc == 0 && off < n; off += step)
        rc = kp_multipart_feed(m, p + off, n - off < step ? n - off : step);
    if (rc == 0) rc = kp_multipart_finish(m);
    if (rc != 0 && rc != KP_EINVAL) abort();
    if (kp_multipart_nparts(m) != s->ended || s->bytes > n) abort();
    if (rc == 0 && (s->open || s->ended < 1)) abort();
    kp_multipart_destroy(&m);
    if (m) abort();
    return rc;
}

static void s_same(int rc1, const s_sum_t *a, int rc2, const s_sum_t *b)
{
    /* chunking may change how data is split between calls, never what is seen */
    if (rc1 != rc2) abort();
    if ((a->h != b->h || a->bytes != b->bytes || a->begun != b->begun || a->ended != b->ended))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const uint8_t *body = data + 1;
    size_t n = size - 1, split = n ? (size_t)data[0] * n / 255 : 0;

    s_sum_t whole, two, bytes;
    int rc = s_run(body, n, n, 1, &whole);
    s_same(rc, &whole, s_run(body, n, split, n ? n : 1, &two), &two);
    if (n <= 4096) s_same(rc, &whole, s_run(body, n, 0, 1, &bytes), &bytes);

    const uint8_t *lf = memchr(body, '\n', n);
    size_t clen = lf ? (size_t)(lf - body) : n;
    char *ct = malloc(clen + 1);
    if (!ct) abort();
    memcpy(ct, body, clen);
    ct[clen] = 0;
    char b[KP_MULTIPART_BOUNDARY_MAX + 1], t[64];
    int crc = kp_multipart_content_type(ct, b, sizeof b, t, sizeof t);
    if (crc == 0) {
        size_t bl = strlen(b);
        if (bl < 1 || bl > KP_MULTIPART_BOUNDARY_MAX || strlen(t) >= sizeof t) abort();
        kp_multipart_t *m = kp_multipart_new(b, NULL, 0); /* a parsed boundary is usable */
        if (!m) abort();
        kp_multipart_destroy(&m);
    } else if (crc != KP_EINVAL && crc != KP_EUNSUPPORTED) {
        abort();
    }
    free(ct);
    return 0;
}
