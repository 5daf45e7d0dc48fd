/* kp_frames: WADO-RS frame retrieval without decoding (PS3.18 10.4.1.1.3).
 *
 * Frames come straight from the stored file: for native (uncompressed) pixel data, frame n is
 * the byte range offset + (n-1) * frame_size; for encapsulated pixel data the items after the
 * Basic Offset Table are walked (never the pixel bytes themselves), and frame n is the
 * fragments the table assigns to it (or fragment n when the table is empty and there are as
 * many fragments as frames, or all fragments for a single frame). Only the requested frame's
 * bytes are read. Pure file arithmetic plus the Accept header and media-type rules. */
#ifndef KP_FRAMES_H
#define KP_FRAMES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KP_FRAMES_MAX_LIST 64      /* frame numbers in one request */
#define KP_FRAMES_MAX_FRAGMENTS 4096 /* fragments one frame may span */

typedef struct {
    int64_t off, len;
} kp_range_t;

/* Parses "1" or "1,3,5" (1-based frame numbers). Returns how many, or -1 when malformed. */
int kp_frames_parse_list(const char *s, long *out, int max);

/* The byte ranges of frame `frame` (1-based) of pixel data whose value starts at pix_off with
 * length pix_len (-1: encapsulated) in the open file fd. frame_size: bytes per native frame
 * (rows * columns * samples * bits allocated / 8). Fills up to max ranges and *n.
 * 0; KP_ENOTFOUND when the frame does not exist; KP_EUNSUPPORTED for an encapsulation we
 * cannot split without decoding (no offset table, fewer fragments than frames); KP_EDICOM for
 * malformed items; KP_EIO on read errors. */
int kp_frames_locate(int fd, int64_t pix_off, int64_t pix_len, long nframes, int64_t frame_size,
                     long frame, kp_range_t *ranges, size_t max, size_t *n);

/* The media type a frame of this stored transfer syntax is sent as: "image/jpeg",
 * "image/jls", "image/jp2", "image/x-dicom-rle", or "application/octet-stream" for native. */
const char *kp_frames_media_type(const char *ts);
/* True for the native (uncompressed) transfer syntaxes. */
bool kp_frames_native(const char *ts);

/* Decides from an Accept header (may be NULL) whether the stored syntax `ts` may be sent as is.
 * media: "frames" (bulk pixel data) or "dicom" (whole instances). Returns true when the client
 * accepts it (no Accept, * / *, multipart/related without a type, transfer-syntax=*, or the
 * stored syntax itself; for native frames any native syntax request is satisfied, since the
 * pixel bytes are the same in every little-endian syntax). */
bool kp_frames_acceptable(const char *accept, const char *ts, const char *media);

/* The transfer syntax to send: ts itself when kp_frames_acceptable() says the stored syntax may go
 * as is; otherwise the first syntax of `producible` (NULL-terminated: what the caller can decode
 * or transcode to) that an Accept entry of the right media type asks for (an entry without a
 * transfer-syntax parameter asks for the default, Explicit VR Little Endian). NULL: nothing
 * acceptable can be produced (406). The result points to ts or into producible. */
const char *kp_frames_choose(const char *accept, const char *ts, const char *media,
                             const char *const *producible);

#endif
