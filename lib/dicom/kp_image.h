/* kp_image: pixel data for WADO-RS over DCMTK: one decoded frame, a whole instance transcoded
 * to another transfer syntax, and a frame rendered to JPEG or PNG.
 *
 * Part of the lib/dicom/ C API (see kp_dicom.h); the implementation (kp_image.cc) is C++ behind
 * extern "C" functions that return 0 or a negative KP_E* code (kp_errors.h) and never let an
 * exception through. Codecs (JPEG, JPEG-LS, RLE) must already be registered by kp_dicom_init().
 *
 * Threads: every function works on its own copy of the file and keeps no state between calls,
 * so they may be called concurrently from several threads (on the same or different files). */
#ifndef KP_IMAGE_H
#define KP_IMAGE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A byte buffer handed to the caller: data comes from malloc (NULL when len is 0 after an
 * error); release it with kp_buf_free(). */
typedef struct kp_buf {
    unsigned char *data;
    size_t len;
} kp_buf_t;

/* Frees b->data and sets it to NULL / 0. NULL or an empty buffer is fine. */
void kp_buf_free(kp_buf_t *b);

/* Frames larger than this (decoded) are refused with KP_ETOOBIG. */
#define KP_IMAGE_MAX_FRAME_BYTES ((size_t)1 << 30)

/* Frame `frame` (1-based) of the instance in the Part 10 file at path, as native pixel bytes
 * exactly as the frame would appear in an uncompressed Explicit VR Little Endian PixelData:
 * rows * columns * samples * BitsAllocated / 8 bytes, little endian, in the planar
 * configuration DCMTK's decoder gives (that of a full decompression of the file). For colour
 * JPEG the decoded colour model may differ from the stored one (YBR_FULL_422 -> RGB); see
 * kp_image_frame_ex(). Only that frame is decoded (and only its fragments read) for
 * encapsulated data; native pixel data is read straight from the file (Explicit VR Big Endian
 * swapped to little endian, as DCMTK does when transcoding).
 * On success *out owns the bytes (caller frees with kp_buf_free()); on error *out is empty.
 * Returns 0, KP_ENOTFOUND (no pixel data, frame < 1 or > NumberOfFrames), KP_EUNSUPPORTED (no
 * decoder for the transfer syntax: JPEG 2000, MPEG, HEVC ...), KP_EDICOM (not DICOM, missing
 * image attributes, truncated or undecodable pixel data), KP_ETOOBIG (frame over
 * KP_IMAGE_MAX_FRAME_BYTES), KP_EIO (file missing or unreadable), KP_EINVAL. */
int kp_image_frame(const char *path, long frame, kp_buf_t *out);

/* Same as kp_image_frame(), and also copies the photometric interpretation of the returned
 * bytes (e.g. "RGB" for a decoded YBR_FULL_422 JPEG frame) into photometric (photometric may be
 * NULL; "" when unknown; truncated to len - 1 characters). */
int kp_image_frame_ex(const char *path, long frame, kp_buf_t *out, char *photometric, size_t len);

/* The whole instance as a Part 10 file (128-byte preamble, "DICM", meta header with
 * TransferSyntaxUID set to ts_uid and group length recalculated) in transfer syntax ts_uid, built
 * in memory. Any syntax DCMTK can produce from the stored one with the registered codecs:
 * Implicit VR LE (1.2.840.10008.1.2), Explicit VR LE (.1.2.1) and BE (.1.2.2), Deflated
 * (.1.2.1.99), JPEG lossless SV1 (.1.2.4.70) and process 14 (.1.2.4.57), JPEG baseline
 * (.1.2.4.50, quality 90) and extended (.1.2.4.51), JPEG-LS lossless (.1.2.4.80) and near-lossless
 * (.1.2.4.81, NEAR 2), RLE (.1.2.5). Lossy targets get a new SOP Instance UID (DCMTK default).
 * On success *out owns the file bytes (caller frees with kp_buf_free()).
 * The preamble is written as zeros (a source's dual-personality preamble, e.g. TIFF, would no
 * longer be right). Returns 0, KP_EUNSUPPORTED (unknown ts_uid, no decoder for the stored syntax
 * e.g. JPEG 2000, no encoder for the target, or the encoder refuses this image, e.g. JPEG-LS
 * near-lossless of signed pixels), KP_EDICOM (not DICOM, or the stored pixel data cannot be
 * decoded), KP_EIO (file missing or unreadable), KP_EINVAL (NULL arguments). */
int kp_image_transcode(const char *path, const char *ts_uid, kp_buf_t *out);

typedef enum { KP_IMAGE_JPEG = 1, KP_IMAGE_PNG = 2 } kp_image_fmt_t;

/* Largest width or height kp_image_render() accepts for a viewport or produces. */
#define KP_IMAGE_MAX_RENDER_DIM 8192

typedef struct kp_render_opts {
    long frame;         /* 1-based; 0 means 1 */
    kp_image_fmt_t fmt; /* KP_IMAGE_JPEG or KP_IMAGE_PNG */
    int quality;        /* JPEG 1..100, 0 = 90; ignored for PNG */
    int width, height;  /* viewport: 0,0 = native size; otherwise the image is scaled (up or down)
                           to fit inside width x height keeping its aspect ratio (one of them
                           may be 0 = derived from the other); each 0..KP_IMAGE_MAX_RENDER_DIM */
    int has_window;     /* non-zero: use center / width_w as the VOI window (width_w >= 1) */
    double center, width_w; /* without a window: the first WindowCenter/WindowWidth of the
                               file, else a min/max window over the frame */
} kp_render_opts_t;

/* Renders one frame of the image at path to an 8-bit image and encodes it: MONOCHROME1/2 to
 * grey (Modality LUT / rescale, then the VOI window; MONOCHROME1 shown inverted as it should
 * be), colour (RGB, YBR, palette) to RGB; JPEG (libjpeg-turbo) or PNG (libpng). Only that frame
 * is decoded (DicomImage with partial access to the pixel data; when DCMTK cannot locate the
 * frame's fragments, the frame is decoded as kp_image_frame() does and a one-frame copy of the
 * data set is rendered). *w and *h (either may be NULL)
 * get the output size. On success *out owns the encoded image (caller frees with kp_buf_free()).
 * Returns 0, KP_ENOTFOUND (no pixel data, no such frame), KP_EUNSUPPORTED (no decoder for the
 * transfer syntax, or an image DCMTK cannot render), KP_EDICOM (not an image DCMTK can read),
 * KP_EINVAL (bad opts), KP_EIO (file missing or unreadable), KP_EINTERNAL (encoder failure). */
int kp_image_render(const char *path, const kp_render_opts_t *opts, kp_buf_t *out, int *w, int *h);

#ifdef __cplusplus
}
#endif

#endif
