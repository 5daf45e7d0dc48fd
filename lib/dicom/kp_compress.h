/* kp_compress: what pacs-compressor asks of DCMTK besides transcoding (kp_image_transcode()):
 * a look at a stored file to decide whether it can be compressed, and the lossless round-trip
 * check of a transcoded copy against its original.
 *
 * Part of the lib/dicom/ C API (see kp_dicom.h): C++ behind extern "C" functions that return 0
 * or a negative KP_E* code and never let an exception through. Codecs must be registered by
 * kp_dicom_init(). Every call loads its own copies of the files, so calls may run concurrently. */
#ifndef KP_COMPRESS_H
#define KP_COMPRESS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What a stored file holds, as far as compressing it is concerned. */
typedef struct kp_compress_info {
    char ts[72];           /* transfer syntax UID as stored ("" if unknown) */
    char ts_name[64];      /* its name for messages ("JPEG 2000 (Lossless only)") */
    int has_pixels;        /* a top-level PixelData (7FE0,0010) with a value */
    int float_pixels;      /* Float or Double Float Pixel Data instead */
    int encapsulated;      /* PixelData is stored compressed */
    int decodable;         /* a registered decoder makes it native (always for native data) */
    int bits_allocated;    /* 0 when absent */
    int samples_per_pixel; /* 0 when absent */
    long frames;           /* NumberOfFrames, 1 when absent */
    char photometric[20];  /* PhotometricInterpretation, "" when absent */
} kp_compress_info_t;

/* Fills *info from the file at path (large values are not read). 0, KP_EIO (missing or
 * unreadable), KP_EDICOM (not DICOM), KP_EINVAL (NULL arguments). */
int kp_compress_inspect(const char *path, kp_compress_info_t *info);

/* The lossless round-trip check: decodes the pixel data of both Part 10 files to native little
 * endian and compares every byte of every frame (rows x columns x samples x bits allocated x
 * frames; only a single pad byte after an odd-length value may differ), and compares every
 * other top-level attribute of the data sets (group 0002 aside) by value, except
 * DerivationDescription (0008,2111), which the JPEG encoders set. Returns 0 when
 * identical; KP_EMISMATCH when not, with the first difference in why (NUL-terminated,
 * truncated to len - 1); KP_EUNSUPPORTED (no decoder for one of them), KP_EDICOM (unreadable or
 * undecodable data, no pixel data), KP_EIO, KP_EINVAL. why may be NULL. */
int kp_compress_verify(const char *original, const char *candidate, char *why, size_t len);

#ifdef __cplusplus
}
#endif

#endif
