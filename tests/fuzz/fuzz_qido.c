/* libFuzzer driver for the QIDO-RS query-string parser (gateway/http/kp_qido.c): any query
 * string, at any level, with or without path UIDs, must end in a statement or a 400 reason —
 * never a crash, a leak, a NUL inside a parameter, or more parameters than the SQL names.
 * The first input byte picks the level and the path UIDs; the rest is the query string.
 * Seeds: tests/fuzz/corpus/qido/ (OHIF's requests and the matching forms). Run:
 *   mkdir -p /tmp/qido-corpus && build/fuzz/bin/fuzz_qido /tmp/qido-corpus tests/fuzz/corpus/qido */
#include "kp_errors.h"
#include "kp_qido.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    kp_qido_level_t level = (kp_qido_level_t)(data[0] % 3);
    const char *study = (data[0] & 4) ? "1.2.840.113619.2.55" : NULL;
    const char *series = (data[0] & 8) && level == KP_QIDO_INSTANCE ? "1.2.3.4.5" : NULL;
    char *q = malloc(size);
    if (!q) abort();
    memcpy(q, data + 1, size - 1);
    q[size - 1] = 0;
    kp_qido_t *out = NULL;
    char err[256];
    int rc = kp_qido_build(level, study, series, q, 100, 1000, &out, err, sizeof err);
    if (rc == 0) {
        if (!out || !out->sql || out->nparams < 0 || out->nparams > KP_QIDO_MAX_PARAMS) abort();
        for (int i = 0; i < out->nparams; i++) {
            char name[16];
            snprintf(name, sizeof name, "$%d", i + 1);
            if (!strstr(out->sql, name)) abort(); /* every parameter is used by the SQL */
        }
        if (out->limit < 0 || out->limit > 1000 || out->offset < 0) abort();
        kp_qido_destroy(&out);
    } else if (rc != KP_EINVAL || out) {
        abort();
    }
    /* the helpers on their own */
    char *pat = kp_qido_like_pattern(q);
    free(pat);
    (void)kp_qido_valid_uid(q, strlen(q));
    kp_qido_url_decode(q);
    free(q);
    return 0;
}
