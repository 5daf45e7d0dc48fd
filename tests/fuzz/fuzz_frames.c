/* libFuzzer driver for the encapsulated pixel data walker (gateway/http/kp_frames.c) and the
 * Accept parser: arbitrary item streams must end in ranges inside the file or an error code.
 * The first 2 bytes choose the frame count and the frame; the rest is the pixel data value.
 * Run: mkdir -p /tmp/fr-corpus && build/fuzz/bin/fuzz_frames /tmp/fr-corpus tests/fuzz/corpus/frames */
#include "kp_errors.h"
#include "kp_frames.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    if (fd < 0) {
        char path[] = "/tmp/kp-fuzz-frames-XXXXXX";
        fd = mkstemp(path);
        if (fd < 0) abort();
        unlink(path);
    }
    if (size < 2) return 0;
    long nframes = data[0] % 8 + 1, frame = data[1] % 9 + 1;
    if (ftruncate(fd, 0) || pwrite(fd, data + 2, size - 2, 0) != (ssize_t)(size - 2)) abort();
    kp_range_t r[16];
    size_t n = 0;
    int rc = kp_frames_locate(fd, 0, -1, nframes, 0, frame, r, 16, &n);
    if (rc == 0) {
        if (n == 0 || n > 16) abort();
        for (size_t i = 0; i < n; i++)
            if (r[i].off < 0 || r[i].len < 0 || r[i].off + r[i].len > (int64_t)(size - 2))
                abort(); /* every range lies inside the value */
    } else if (rc != KP_ENOTFOUND && rc != KP_EUNSUPPORTED && rc != KP_EDICOM && rc != KP_EIO) {
        abort();
    }
    char *accept = malloc(size);
    if (!accept) abort();
    memcpy(accept, data + 1, size - 1);
    accept[size - 1] = 0;
    (void)kp_frames_acceptable(accept, "1.2.840.10008.1.2.4.50", "frames");
    (void)kp_frames_acceptable(accept, "1.2.840.10008.1.2.1", "dicom");
    free(accept);
    return 0;
}
