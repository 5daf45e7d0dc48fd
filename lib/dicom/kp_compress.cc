/* kp_compress: the C++ side of kp_compress.h (inspection and the lossless round-trip check).
 *
 * Design notes
 *  - Files are loaded with a 4 KiB maxReadLength, like kp_image.cc: inspection never reads the
 *    pixel data; the check reads it once per file.
 *  - The check decodes each file's PixelData to Explicit VR Little Endian in memory
 *    (chooseRepresentation; a native value is used as loaded, which DCMTK keeps in host byte
 *    order whatever the file's syntax) and compares the bytes of every frame. A trailing pad
 *    byte of an odd-length value is ignored; anything else that differs (a planar
 *    configuration the encoder changed, garbage after the last frame that the codec drops) is a
 *    mismatch, and the caller keeps the original.
 *  - Every other top-level element must be present in both data sets with the same value
 *    (DcmElement::compare(): tag, VR and normalised value, sequences item by item), except
 *    DerivationDescription, which DCMTK's JPEG encoders fill in (s_may_differ). */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dccodec.h>
#include <dcmtk/dcmdata/dcpixel.h>
#include <dcmtk/dcmdata/dctk.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

extern "C" {
#include "kp_compress.h"
#include "kp_errors.h"
#include "kp_log.h"
}

#define CAT "compress"

static const Uint32 s_max_read_length = 4096;

static void s_copy(char *dst, size_t len, const char *src)
{
    if (!dst || !len) return;
    snprintf(dst, len, "%s", src ? src : "");
}

static int s_load(DcmFileFormat &ff, const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        kp_warn(CAT, "cannot read %s: %s", path, errno ? strerror(errno) : "not a regular file");
        return KP_EIO;
    }
    OFCondition c = ff.loadFile(path, EXS_Unknown, EGL_noChange, s_max_read_length, ERM_autoDetect);
    if (c.bad()) {
        kp_info(CAT, "cannot parse %s as DICOM: %s", path, c.text());
        return KP_EDICOM;
    }
    if (!ff.getDataset() || ff.getDataset()->card() == 0) return KP_EDICOM;
    return 0;
}

/* The top-level PixelData of ds when it has a value, else NULL. */
static DcmElement *s_pixel_element(DcmDataset *ds)
{
    DcmElement *el = nullptr;
    if (ds->findAndGetElement(DCM_PixelData, el, OFFalse).bad() || !el) return nullptr;
    if (el->getLengthField() == 0) return nullptr;
    return el;
}

static int s_inspect(const char *path, kp_compress_info_t *info)
{
    DcmFileFormat ff;
    int rc = s_load(ff, path);
    if (rc) return rc;
    DcmDataset *ds = ff.getDataset();
    const E_TransferSyntax x = ds->getOriginalXfer();
    const DcmXfer xfer(x);
    OFString ts;
    DcmMetaInfo *meta = ff.getMetaInfo();
    if (!meta || meta->findAndGetOFString(DCM_TransferSyntaxUID, ts).bad() || ts.empty())
        ts = x != EXS_Unknown ? xfer.getXferID() : "";
    s_copy(info->ts, sizeof info->ts, ts.c_str());
    s_copy(info->ts_name, sizeof info->ts_name, x != EXS_Unknown ? xfer.getXferName() : ts.c_str());
    info->has_pixels = s_pixel_element(ds) != nullptr;
    info->float_pixels = ds->tagExistsWithValue(DCM_FloatPixelData) ||
                         ds->tagExistsWithValue(DCM_DoubleFloatPixelData);
    info->encapsulated = xfer.isEncapsulated();
    info->decodable =
        !info->encapsulated || DcmCodecList::canChangeCoding(x, EXS_LittleEndianExplicit);
    Uint16 v = 0;
    info->bits_allocated = ds->findAndGetUint16(DCM_BitsAllocated, v).good() ? v : 0;
    v = 0;
    info->samples_per_pixel = ds->findAndGetUint16(DCM_SamplesPerPixel, v).good() ? v : 0;
    Sint32 n = 1;
    info->frames = ds->findAndGetSint32(DCM_NumberOfFrames, n).good() && n > 0 ? n : 1;
    OFString pi;
    if (ds->findAndGetOFString(DCM_PhotometricInterpretation, pi).bad()) pi = "";
    s_copy(info->photometric, sizeof info->photometric, pi.c_str());
    return 0;
}

extern "C" int kp_compress_inspect(const char *path, kp_compress_info_t *info)
{
    if (!path || !info) return KP_EINVAL;
    memset(info, 0, sizeof *info);
    try {
        return s_inspect(path, info);
    } catch (const std::bad_alloc &) {
        kp_error(CAT, "inspect %s: out of memory", path);
        return KP_ENOMEM;
    } catch (...) {
        kp_error(CAT, "inspect %s: unexpected exception", path);
        return KP_EINTERNAL;
    }
}

/* ---- the round-trip check ----------------------------------------------------------------- */

/* The decoded pixel bytes of a loaded file (owned by ff), and the frame bytes they must hold. */
struct s_pixels {
    const Uint8 *data = nullptr;
    unsigned long len = 0;
    unsigned long long expected = 0;
};

static int s_decode(DcmFileFormat &ff, const char *path, s_pixels &px, std::string &why)
{
    DcmDataset *ds = ff.getDataset();
    const E_TransferSyntax x = ds->getOriginalXfer();
    const DcmXfer xfer(x);
    if (!s_pixel_element(ds)) {
        why = std::string(path) + ": no pixel data";
        return KP_EDICOM;
    }
    if (xfer.isEncapsulated()) {
        if (!DcmCodecList::canChangeCoding(x, EXS_LittleEndianExplicit)) {
            why = std::string("no decoder for ") + xfer.getXferName();
            return KP_EUNSUPPORTED;
        }
        OFCondition c = ds->chooseRepresentation(EXS_LittleEndianExplicit, nullptr);
        if (c.bad() || !ds->canWriteXfer(EXS_LittleEndianExplicit, x)) {
            why = std::string("cannot decode ") + path + ": " +
                  (c.bad() ? c.text() : "no native form");
            return KP_EDICOM;
        }
    }
    DcmElement *el = s_pixel_element(ds);
    Uint8 *p = nullptr;
    if (!el || el->getUint8Array(p).bad() || !p) {
        why = std::string("cannot read the pixel data of ") + path;
        return KP_EDICOM;
    }
    px.data = p;
    px.len = el->getLength();
    Uint16 rows = 0, cols = 0, spp = 0, bits = 0;
    Sint32 frames = 1;
    ds->findAndGetUint16(DCM_Rows, rows);
    ds->findAndGetUint16(DCM_Columns, cols);
    ds->findAndGetUint16(DCM_SamplesPerPixel, spp);
    ds->findAndGetUint16(DCM_BitsAllocated, bits);
    if (ds->findAndGetSint32(DCM_NumberOfFrames, frames).bad() || frames < 1) frames = 1;
    px.expected =
        ((unsigned long long)rows * cols * spp * (unsigned long long)frames * bits + 7) / 8;
    if (!px.expected) {
        why = std::string(path) + ": Rows, Columns, SamplesPerPixel or BitsAllocated missing";
        return KP_EDICOM;
    }
    return 0;
}

/* The elements a lossless transcode may change: the pixel data itself, and DerivationDescription,
 * which DCMTK's JPEG encoders set to say how the pixels were compressed. */
static bool s_may_differ(const DcmTagKey &tag)
{
    return tag == DCM_PixelData || tag == DCM_DerivationDescription;
}

/* Compares the other top-level elements; true when equal, else why names the first one. */
static bool s_same_attributes(DcmDataset *a, DcmDataset *b, std::string &why)
{
    char tag[32];
    for (unsigned long i = 0; i < a->card(); i++) {
        DcmElement *ea = a->getElement(i);
        if (!ea || s_may_differ(ea->getTag())) continue;
        DcmElement *eb = nullptr;
        snprintf(tag, sizeof tag, "(%04X,%04X)", ea->getGTag(), ea->getETag());
        if (b->findAndGetElement(ea->getTag(), eb, OFFalse).bad() || !eb) {
            why = std::string("attribute ") + tag + " is missing from the compressed copy";
            return false;
        }
        if (ea->compare(*eb) != 0) {
            why = std::string("attribute ") + tag + " differs in the compressed copy";
            return false;
        }
    }
    for (unsigned long i = 0; i < b->card(); i++) {
        DcmElement *eb = b->getElement(i);
        if (!eb || s_may_differ(eb->getTag())) continue;
        if (!a->tagExists(eb->getTag(), OFFalse)) {
            snprintf(tag, sizeof tag, "(%04X,%04X)", eb->getGTag(), eb->getETag());
            why = std::string("attribute ") + tag + " was added in the compressed copy";
            return false;
        }
    }
    return true;
}

static int s_verify(const char *original, const char *candidate, std::string &why)
{
    DcmFileFormat fa, fb;
    int rc = s_load(fa, original);
    if (!rc) rc = s_load(fb, candidate);
    if (rc) {
        why = "cannot load both files";
        return rc;
    }
    /* Attributes first: decoding may rewrite some (PhotometricInterpretation, PlanarConfiguration)
     * in memory, and the stored values are what must agree. */
    if (!s_same_attributes(fa.getDataset(), fb.getDataset(), why)) return KP_EMISMATCH;
    s_pixels a, b;
    if ((rc = s_decode(fa, original, a, why)) || (rc = s_decode(fb, candidate, b, why))) return rc;
    unsigned long long n = a.expected;
    if (b.expected != n) {
        why = "the frame geometry differs";
        return KP_EMISMATCH;
    }
    if (a.len < n || b.len < n) {
        why = "the pixel data is shorter than its frames";
        return KP_EMISMATCH;
    }
    /* beyond the frames only the pad byte of an odd length may be */
    unsigned long long pad = (n & 1) ? n + 1 : n;
    if (a.len > pad || b.len > pad) {
        why = "the original pixel data holds bytes after its last frame";
        return KP_EMISMATCH;
    }
    for (unsigned long long i = 0; i < n; i++) {
        if (a.data[i] != b.data[i]) {
            char buf[96];
            snprintf(buf, sizeof buf, "decoded pixel data differs at byte %llu of %llu", i, n);
            why = buf;
            return KP_EMISMATCH;
        }
    }
    return 0;
}

extern "C" int kp_compress_verify(const char *original, const char *candidate, char *why,
                                  size_t len)
{
    if (why && len) why[0] = 0;
    if (!original || !candidate) return KP_EINVAL;
    std::string w;
    int rc;
    try {
        rc = s_verify(original, candidate, w);
    } catch (const std::bad_alloc &) {
        w = "out of memory";
        rc = KP_ENOMEM;
    } catch (...) {
        w = "unexpected exception";
        rc = KP_EINTERNAL;
    }
    s_copy(why, len, w.c_str());
    return rc;
}
