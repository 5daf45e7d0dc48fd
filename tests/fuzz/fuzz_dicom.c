/* libFuzzer driver for the DICOM reading path of lib/dicom: the bytes a modality could send
 * (written to a file, as pacs-dicomd receives them) go through everything the daemon and the
 * indexer do with a file: open (header parse, character set conversion), attribute reads,
 * our own walk of the element headers to locate the pixel data, and DICOM JSON. Any input must
 * end in a handle or an error code, never a crash or a leak.
 * Seeds: tests/fuzz/corpus/dicom/ (small real files). Run:
 *   mkdir -p /tmp/dcm-corpus && build/fuzz/bin/fuzz_dicom /tmp/dcm-corpus tests/fuzz/corpus/dicom
 */
#include "kp_dicom.h"
#include "kp_errors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    static char path[64];
    if (!ready) {
        if (kp_dicom_init()) abort();
        snprintf(path, sizeof path, "/tmp/kp-fuzz-dicom-%d.dcm", (int)getpid());
        ready = 1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    int err = 0;
    kp_dicom_file_t *d = kp_dicom_open(path, &err);
    if (!d) {
        if (err >= 0) abort(); /* a failed open always says why */
        return 0;
    }
    static const uint32_t tags[] = {0x00100010, 0x0020000D, 0x0020000E, 0x00080018,
                                    0x00080060, 0x00200013, 0x00280010, 0x00020016};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        const char *v = kp_dicom_get(d, tags[i]);
        if (v) (void)strlen(v);
    }
    (void)kp_dicom_get_in_seq(d, 0x00400275, 0x00400009);
    (void)kp_dicom_transfer_syntax(d);
    int64_t off = 0, len = 0;
    if (kp_dicom_pixel_location(d, &off, &len) == 0 && (off < 0 || (size_t)off > size)) abort();
    char *json = kp_dicom_json(d, "/x", 64);
    free(json);
    kp_dicom_close(&d);
    return 0;
}
