/* libFuzzer driver for bus/kp_msg: any input must decode to a message or an error code, never
 * crash, leak or allocate without bound; whatever decodes must encode again and decode to the
 * same message. The same bytes are also fed to the plain map codec (command bodies).
 * Seeds: tests/fuzz/corpus/msg/. libFuzzer writes new inputs into its FIRST directory, so run
 *   mkdir -p /tmp/msg-corpus && build/fuzz/bin/fuzz_msg /tmp/msg-corpus tests/fuzz/corpus/msg */
#include "kp_errors.h"
#include "kp_msg.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kp_msg_t m, again;
    int rc = kp_msg_decode(data, size, &m);
    if (rc != 0 && rc != KP_EMSG && rc != KP_EVERSION) abort();
    if (rc == 0) {
        char *buf = NULL;
        size_t len = 0;
        if (kp_msg_encode(&m, &buf, &len)) abort();
        if (kp_msg_decode(buf, len, &again)) abort();
        if (strcmp(m.type, again.type) || m.id != again.id || m.attempt != again.attempt ||
            !json_equal(m.payload, again.payload))
            abort();
        kp_msg_clear(&again);
        free(buf);
    } else if (m.payload) {
        abort(); /* an error must leave nothing behind */
    }
    kp_msg_clear(&m);

    json_t *j = NULL;
    rc = kp_msg_decode_map(data, size, &j);
    if (rc == 0) {
        char *buf = NULL;
        size_t len = 0;
        json_t *j2 = NULL;
        if (kp_msg_encode_map(j, &buf, &len) || kp_msg_decode_map(buf, len, &j2) ||
            !json_equal(j, j2))
            abort();
        json_decref(j2);
        free(buf);
        json_decref(j);
    } else if (rc != KP_EMSG || j) {
        abort();
    }
    return 0;
}
