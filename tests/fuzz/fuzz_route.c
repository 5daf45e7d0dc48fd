/* libFuzzer driver for lib/kp_route (routing rules are untrusted JSON from /api/routes and
 * pacsctl route add): any input, read as a rule object, must be compiled or refused with a
 * message - never crash, leak or read out of bounds - and a compiled rule must match a fixed
 * instance without trouble; destinations are checked, redacted (no token or password member
 * left) and have their secrets restored (valid again).
 * Seeds: tests/fuzz/corpus/route/. */
#include "kp_dicom.h"
#include "kp_route.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char s_md[] = "{\"00080060\":{\"vr\":\"CS\",\"Value\":[\"CT\"]},"
                           "\"00100010\":{\"vr\":\"PN\",\"Value\":[{\"Alphabetic\":\"A^B\"}]},"
                           "\"00280030\":{\"vr\":\"DS\",\"Value\":[0.5,1]},"
                           "\"00080050\":{\"vr\":\"SH\"}}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static json_t *md;
    if (!md) {
        kp_dicom_init();
        md = json_loads(s_md, 0, NULL);
    }
    json_t *rule = json_loadb((const char *)data, size, JSON_DECODE_ANY, NULL);
    if (!rule) return 0;
    char err[300];
    kp_route_t *r = kp_route_new(json_object_get(rule, "conditions"),
                                 json_object_get(rule, "time_window"), err, sizeof err);
    if (r) {
        kp_route_instance_t in = {.modality = "CT",
                                  .calling_ae = "X",
                                  .called_ae = NULL,
                                  .sop_class = "1.2",
                                  .metadata = md,
                                  .when = (time_t)size * 7919};
        (void)kp_route_match(r, &in);
        kp_route_destroy(&r);
    } else if (!err[0]) {
        abort(); /* a refusal always says why */
    }
    json_t *dests = json_object_get(rule, "destinations");
    if (kp_route_destinations_check(dests, err, sizeof err) == 0) {
        json_t *pub = kp_route_destinations_public(dests);
        size_t i;
        json_t *d;
        char *text = json_dumps(pub, JSON_COMPACT);
        json_array_foreach(pub, i, d)
        {
            /* the redacted form holds no secret member, and says whether one is set */
            json_t *a = json_object_get(d, "auth");
            if (json_object_get(a, "token") || json_object_get(a, "password")) abort();
            if (a && !json_is_boolean(json_object_get(a, "set"))) abort();
        }
        (void)text;
        free(text);
        kp_route_destinations_keep_secrets(pub, dests);
        if (kp_route_destinations_check(pub, err, sizeof err)) abort(); /* restored = valid */
        json_decref(pub);
    }
    json_decref(rule);
    return 0;
}
