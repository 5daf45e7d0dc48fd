/* kp_image: the C++ side of kp_image.h (frames, transcoding and rendering over DCMTK 3.6.7).
 *
 * Design notes
 *  - Each call loads its own DcmFileFormat with a 4 KiB maxReadLength, so large values (the
 *    pixel data, or each compressed fragment) stay on disk and are read only when used; nothing
 *    is shared between calls and no DCMTK global is touched, so WADO-RS worker threads may call
 *    these functions concurrently. Codecs are registered once by kp_dicom_init().
 *  - Frames: DcmPixelData::getUncompressedFrame() decodes one frame (only that frame's fragments
 *    are read) or, for native data, copies its byte range from the file with a DcmFileCache,
 *    swapping big endian values to little endian. When DCMTK cannot find where a frame starts
 *    (several fragments per frame and an empty Basic Offset Table) we find it for the JPEG
 *    family by counting fragments that start with an SOI marker, and try again.
 *  - Transcoding: chooseRepresentation() -> canWriteXfer() -> DcmFileFormat::write() into a
 *    DcmOutputBufferStream, whose buffer is drained every time DCMTK reports it full.
 *  - Rendering: DicomImage with CIF_UsePartialAccessToPixelData on one frame, optionally scaled
 *    with createScaledImage(), 8-bit output, then libjpeg / libpng into memory. The encoders
 *    report errors with longjmp: they run in small functions holding no C++ objects. */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dccodec.h>
#include <dcmtk/dcmdata/dcfcache.h>
#include <dcmtk/dcmdata/dcostrmb.h>
#include <dcmtk/dcmdata/dcpixel.h>
#include <dcmtk/dcmdata/dcpixseq.h>
#include <dcmtk/dcmdata/dcpxitem.h>
#include <dcmtk/dcmdata/dcrlerp.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmdata/dcwcache.h>
#include <dcmtk/dcmimage/diregist.h> /* colour support for DicomImage (registers once, statically) */
#include <dcmtk/dcmimgle/dcmimage.h>
#include <dcmtk/dcmjpeg/djrploss.h>
#include <dcmtk/dcmjpeg/djrplol.h>
#include <dcmtk/dcmjpls/djrparam.h>

#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <png.h>

extern "C" {
#include "kp_errors.h"
#include "kp_image.h"
#include "kp_log.h"
}

#define CAT "image"

/* Values above this length are left on disk when a file is loaded. */
static const Uint32 s_max_read_length = 4096;

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                      */
/* ------------------------------------------------------------------------------------------ */

extern "C" void kp_buf_free(kp_buf_t *b)
{
    if (!b) return;
    free(b->data);
    b->data = nullptr;
    b->len = 0;
}

/* 0 when path is a readable regular file, else KP_EIO (logged). */
static int s_check_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        kp_warn(CAT, "cannot open %s: %s", path, strerror(errno));
        return KP_EIO;
    }
    struct stat st;
    int rc = fstat(fd, &st);
    close(fd);
    if (rc != 0 || !S_ISREG(st.st_mode)) {
        kp_warn(CAT, "cannot read %s: not a regular file", path);
        return KP_EIO;
    }
    return 0;
}

/* Loads path into ff (large values left on disk). 0, KP_EIO or KP_EDICOM. */
static int s_load(DcmFileFormat &ff, const char *path)
{
    int rc = s_check_file(path);
    if (rc) return rc;
    OFCondition c = ff.loadFile(path, EXS_Unknown, EGL_noChange, s_max_read_length, ERM_autoDetect);
    if (c.bad()) {
        kp_warn(CAT, "cannot parse %s as DICOM: %s", path, c.text());
        return KP_EDICOM;
    }
    DcmDataset *ds = ff.getDataset();
    if (!ds || ds->card() == 0) {
        kp_warn(CAT, "cannot parse %s as DICOM: empty data set", path);
        return KP_EDICOM;
    }
    return 0;
}

/* The top-level PixelData of ds when it has a value, else NULL. */
static DcmPixelData *s_pixel_data(DcmDataset *ds)
{
    DcmElement *el = nullptr;
    if (ds->findAndGetElement(DCM_PixelData, el, OFFalse /* top level */).bad() || !el)
        return nullptr;
    if (el->ident() != EVR_PixelData) return nullptr;
    DcmPixelData *pix = static_cast<DcmPixelData *>(el);
    if (pix->getLengthField() == 0) return nullptr; /* empty; encapsulated is 0xFFFFFFFF */
    return pix;
}

static long s_number_of_frames(DcmDataset *ds)
{
    Sint32 n = 1;
    if (ds->findAndGetSint32(DCM_NumberOfFrames, n).bad() || n < 1) n = 1;
    return static_cast<long>(n);
}

/* rows * cols * samples * BitsAllocated / 8 computed in 64 bits; 0 when attributes are
 * missing or zero. */
static uint64_t s_frame_bytes(DcmDataset *ds)
{
    Uint16 rows = 0, cols = 0, spp = 0, bits = 0;
    if (ds->findAndGetUint16(DCM_Rows, rows).bad() ||
        ds->findAndGetUint16(DCM_Columns, cols).bad() ||
        ds->findAndGetUint16(DCM_SamplesPerPixel, spp).bad() ||
        ds->findAndGetUint16(DCM_BitsAllocated, bits).bad())
        return 0;
    uint64_t bitsTotal = uint64_t(rows) * cols * spp * bits;
    return (bitsTotal + 7) / 8;
}

/* True for the transfer syntaxes whose frames start with a JPEG SOI marker (FF D8). */
static bool s_is_jpeg_family(E_TransferSyntax x)
{
    switch (x) {
    case EXS_JPEGProcess1:
    case EXS_JPEGProcess2_4:
    case EXS_JPEGProcess14:
    case EXS_JPEGProcess14SV1:
    case EXS_JPEGLSLossless:
    case EXS_JPEGLSLossy:
        return true;
    default:
        return false;
    }
}

/* Fragment index (1-based item index in the pixel sequence, item 0 being the offset table)
 * where frame frame0 (0-based) starts, found by counting fragments that begin with FF D8.
 * Reads two bytes per fragment, never a whole fragment. false when not found. */
static bool s_find_start_by_soi(DcmPixelData *pix, E_TransferSyntax xfer, Uint32 frame0,
                                Uint32 &start)
{
    DcmPixelSequence *seq = nullptr;
    if (pix->getEncapsulatedRepresentation(xfer, nullptr, seq).bad() || !seq) return false;
    DcmFileCache cache;
    Uint32 seen = 0;
    const unsigned long n = seq->card();
    for (unsigned long i = 1; i < n; i++) {
        DcmPixelItem *item = nullptr;
        if (seq->getItem(item, i).bad() || !item || item->getLengthField() < 2) continue;
        unsigned char b[2] = {0, 0};
        if (item->getPartialValue(b, 0, 2, &cache).bad()) return false;
        if (b[0] == 0xFF && b[1] == 0xD8) {
            if (seen == frame0) {
                start = static_cast<Uint32>(i);
                return true;
            }
            seen++;
        }
    }
    return false;
}

/* ------------------------------------------------------------------------------------------ */
/* Frames                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Decodes frame `frame` (1-based, already checked against NumberOfFrames) of pix in ds, whose
 * transfer syntax has a decoder, into *out; *photometric gets the decoded colour model. */
static int s_decode_frame(const char *path, DcmDataset *ds, DcmPixelData *pix, long frame,
                          kp_buf_t *out, std::string *photometric)
{
    const E_TransferSyntax xfer = ds->getOriginalXfer();
    const DcmXfer dx(xfer);
    const uint64_t want = s_frame_bytes(ds);
    Uint32 size = 0;
    OFCondition c = pix->getUncompressedFrameSize(ds, size);
    if (c.bad() || size == 0 || want == 0) {
        kp_warn(CAT, "%s: cannot size a frame: %s", path, c.bad() ? c.text() : "empty image");
        return KP_EDICOM;
    }
    if (want > KP_IMAGE_MAX_FRAME_BYTES || size != want) {
        if (want > KP_IMAGE_MAX_FRAME_BYTES) {
            kp_warn(CAT, "%s: frame of %llu bytes is too large", path,
                    static_cast<unsigned long long>(want));
            return KP_ETOOBIG;
        }
        kp_warn(CAT, "%s: unexpected frame size %lu (expected %llu)", path,
                static_cast<unsigned long>(size), static_cast<unsigned long long>(want));
        return KP_EDICOM;
    }
    const Uint32 bufsize = size + (size & 1); /* DCMTK wants an even buffer */
    unsigned char *buf = static_cast<unsigned char *>(malloc(bufsize));
    if (!buf) return KP_ENOMEM;
    Uint32 start = 0;
    OFString model;
    DcmFileCache cache;
    const Uint32 frame0 = static_cast<Uint32>(frame - 1);
    c = pix->getUncompressedFrame(ds, frame0, start, buf, bufsize, model, &cache);
    if (c.bad() && dx.isEncapsulated() && frame0 > 0 && s_is_jpeg_family(xfer) &&
        s_find_start_by_soi(pix, xfer, frame0, start)) {
        kp_debug(CAT, "%s: frame %ld found at fragment %lu by its SOI marker", path, frame,
                 static_cast<unsigned long>(start));
        model.clear();
        c = pix->getUncompressedFrame(ds, frame0, start, buf, bufsize, model, &cache);
    }
    if (c.bad()) {
        free(buf);
        kp_warn(CAT, "%s: cannot decode frame %ld (%s): %s", path, frame, dx.getXferName(),
                c.text());
        return c == EC_CannotChangeRepresentation ? KP_EUNSUPPORTED : KP_EDICOM;
    }
    out->data = buf;
    out->len = size;
    if (photometric) *photometric = model.c_str();
    return 0;
}

static int s_frame(const char *path, long frame, kp_buf_t *out, std::string *photometric)
{
    DcmFileFormat ff;
    int rc = s_load(ff, path);
    if (rc) return rc;
    DcmDataset *ds = ff.getDataset();
    DcmPixelData *pix = s_pixel_data(ds);
    if (!pix) {
        kp_debug(CAT, "%s: no pixel data", path);
        return KP_ENOTFOUND;
    }
    const long nframes = s_number_of_frames(ds);
    if (frame < 1 || frame > nframes) {
        kp_debug(CAT, "%s: no frame %ld (%ld frames)", path, frame, nframes);
        return KP_ENOTFOUND;
    }
    const E_TransferSyntax xfer = ds->getOriginalXfer();
    const DcmXfer dx(xfer);
    if (dx.isEncapsulated() && !DcmCodecList::canChangeCoding(xfer, EXS_LittleEndianExplicit)) {
        kp_info(CAT, "%s: no decoder for transfer syntax %s", path, dx.getXferName());
        return KP_EUNSUPPORTED;
    }
    return s_decode_frame(path, ds, pix, frame, out, photometric);
}

extern "C" int kp_image_frame_ex(const char *path, long frame, kp_buf_t *out, char *photometric,
                                 size_t len)
{
    if (out) *out = kp_buf_t{nullptr, 0};
    if (photometric && len) photometric[0] = '\0';
    if (!path || !*path || !out) return KP_EINVAL;
    try {
        std::string model;
        int rc = s_frame(path, frame, out, &model);
        if (rc == 0 && photometric && len) snprintf(photometric, len, "%s", model.c_str());
        return rc;
    } catch (const std::bad_alloc &) {
        kp_buf_free(out);
        kp_error(CAT, "%s: out of memory decoding frame %ld", path, frame);
        return KP_ENOMEM;
    } catch (...) {
        kp_buf_free(out);
        kp_error(CAT, "%s: unexpected exception decoding frame %ld", path, frame);
        return KP_EINTERNAL;
    }
}

extern "C" int kp_image_frame(const char *path, long frame, kp_buf_t *out)
{
    return kp_image_frame_ex(path, frame, out, nullptr, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Transcoding                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Representation parameters for an encapsulated target (NULL: native, or codec default). */
static DcmRepresentationParameter *s_rep_param(E_TransferSyntax x)
{
    switch (x) {
    case EXS_JPEGProcess14SV1:
    case EXS_JPEGProcess14:
        return new DJ_RPLossless(1, 0);
    case EXS_JPEGProcess1:
    case EXS_JPEGProcess2_4:
        return new DJ_RPLossy(90);
    case EXS_JPEGLSLossless:
        return new DJLSRepresentationParameter(0, OFTrue);
    case EXS_JPEGLSLossy:
        return new DJLSRepresentationParameter(2, OFFalse);
    case EXS_RLELossless:
        return new DcmRLERepresentationParameter();
    default:
        return nullptr;
    }
}

/* Appends n bytes to the malloc'd buffer out (capacity *cap). */
static void s_append(kp_buf_t *out, size_t *cap, const void *p, size_t n)
{
    if (n == 0) return;
    if (out->len + n > *cap) {
        size_t ncap = *cap ? *cap : 65536;
        while (ncap < out->len + n)
            ncap *= 2;
        unsigned char *d = static_cast<unsigned char *>(realloc(out->data, ncap));
        if (!d) throw std::bad_alloc();
        out->data = d;
        *cap = ncap;
    }
    memcpy(out->data + out->len, p, n);
    out->len += n;
}

static int s_transcode(const char *path, const char *ts_uid, kp_buf_t *out)
{
    const DcmXfer to(ts_uid);
    if (to.getXfer() == EXS_Unknown) {
        kp_info(CAT, "transcode %s: unknown transfer syntax '%s'", path, ts_uid);
        return KP_EUNSUPPORTED;
    }
    const E_TransferSyntax xfer = to.getXfer();
    DcmFileFormat ff;
    int rc = s_load(ff, path);
    if (rc) return rc;
    DcmDataset *ds = ff.getDataset();
    const E_TransferSyntax from = ds->getOriginalXfer();
    const DcmXfer fx(from);
    OFCondition c;
    if (fx.isEncapsulated() && from != xfer) {
        /* decode first (DCMTK would anyway): a decoder that fails means bad data, not a
         * conversion we cannot do */
        if (!DcmCodecList::canChangeCoding(from, EXS_LittleEndianExplicit)) {
            kp_info(CAT, "transcode %s: no decoder for %s", path, fx.getXferName());
            return KP_EUNSUPPORTED;
        }
        c = ds->chooseRepresentation(EXS_LittleEndianExplicit, nullptr);
        if (c.bad() || !ds->canWriteXfer(EXS_LittleEndianExplicit, from)) {
            kp_warn(CAT, "transcode %s: cannot decode %s: %s", path, fx.getXferName(),
                    c.bad() ? c.text() : "no uncompressed representation");
            return KP_EDICOM;
        }
    }
    std::unique_ptr<DcmRepresentationParameter> param(s_rep_param(xfer));
    c = ds->chooseRepresentation(xfer, param.get());
    if (c.bad() || !ds->canWriteXfer(xfer, from)) {
        kp_info(CAT, "transcode %s: cannot convert %s to %s%s%s", path, fx.getXferName(),
                to.getXferName(), c.bad() ? ": " : "", c.bad() ? c.text() : "");
        return KP_EUNSUPPORTED;
    }

    const offile_off_t chunk = 1 << 20;
    std::unique_ptr<unsigned char[]> tmp(new unsigned char[chunk]);
    DcmOutputBufferStream os(tmp.get(), chunk);
    DcmWriteCache wcache;
    size_t cap = 0;
    void *p = nullptr;
    offile_off_t n = 0;
    ff.transferInit();
    for (;;) {
        c = ff.write(os, xfer, EET_ExplicitLength, &wcache, EGL_recalcGL, EPD_noChange, 0, 0, 0,
                     EWM_updateMeta);
        if (c != EC_StreamNotifyClient) break;
        os.flushBuffer(p, n);
        s_append(out, &cap, p, static_cast<size_t>(n));
    }
    ff.transferEnd();
    if (c.good()) {
        do {
            os.flush();
            os.flushBuffer(p, n);
            s_append(out, &cap, p, static_cast<size_t>(n));
        } while (!os.isFlushed());
    }
    if (c.bad() || out->len < 132 || memcmp(out->data + 128, "DICM", 4) != 0) {
        kp_buf_free(out);
        kp_warn(CAT, "transcode %s to %s: writing failed: %s", path, to.getXferName(),
                c.bad() ? c.text() : "no meta header written");
        return KP_EDICOM;
    }
    /* DCMTK keeps the source preamble; a dual-personality one (e.g. a TIFF header) would point
     * at offsets that are no longer right: an unused, zero preamble instead (PS3.10 7.1) */
    memset(out->data, 0, 128);
    return 0;
}

extern "C" int kp_image_transcode(const char *path, const char *ts_uid, kp_buf_t *out)
{
    if (out) *out = kp_buf_t{nullptr, 0};
    if (!path || !*path || !ts_uid || !out) return KP_EINVAL;
    try {
        return s_transcode(path, ts_uid, out);
    } catch (const std::bad_alloc &) {
        kp_buf_free(out);
        kp_error(CAT, "transcode %s: out of memory", path);
        return KP_ENOMEM;
    } catch (...) {
        kp_buf_free(out);
        kp_error(CAT, "transcode %s: unexpected exception", path);
        return KP_EINTERNAL;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Encoders (C libraries reporting errors with longjmp: no C++ objects live in these frames)    */
/* ------------------------------------------------------------------------------------------ */

struct s_jpeg_err {
    struct jpeg_error_mgr mgr;
    jmp_buf jmp;
    char msg[JMSG_LENGTH_MAX];
};

static void s_jpeg_error_exit(j_common_ptr cinfo)
{
    s_jpeg_err *e = reinterpret_cast<s_jpeg_err *>(cinfo->err);
    (*cinfo->err->format_message)(cinfo, e->msg);
    longjmp(e->jmp, 1);
}

static void s_jpeg_output_message(j_common_ptr cinfo)
{
    char msg[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, msg);
    kp_debug(CAT, "libjpeg: %s", msg);
}

/* State of one JPEG encoding, on the heap: it is written by libjpeg between setjmp() and a
 * longjmp(), which only objects outside the setjmp() frame survive reliably. */
struct s_jpeg_ctx {
    struct jpeg_compress_struct cinfo;
    s_jpeg_err err;
    unsigned char *mem; /* jpeg_mem_dest() output, malloc'd by libjpeg */
    unsigned long memsize;
};

/* Encodes 8-bit grey (comps 1) or RGB (comps 3) pixels. 0, KP_ENOMEM or KP_EINTERNAL. */
static int s_encode_jpeg(const unsigned char *px, int w, int h, int comps, int quality,
                         kp_buf_t *out)
{
    s_jpeg_ctx *const ctx = static_cast<s_jpeg_ctx *>(calloc(1, sizeof(s_jpeg_ctx)));
    if (!ctx) return KP_ENOMEM;
    ctx->cinfo.err = jpeg_std_error(&ctx->err.mgr);
    ctx->err.mgr.error_exit = s_jpeg_error_exit;
    ctx->err.mgr.output_message = s_jpeg_output_message;
    if (setjmp(ctx->err.jmp)) {
        jpeg_destroy_compress(&ctx->cinfo);
        free(ctx->mem);
        kp_error(CAT, "JPEG encoding failed: %s", ctx->err.msg);
        free(ctx);
        return KP_EINTERNAL;
    }
    jpeg_create_compress(&ctx->cinfo);
    jpeg_mem_dest(&ctx->cinfo, &ctx->mem, &ctx->memsize);
    ctx->cinfo.image_width = static_cast<JDIMENSION>(w);
    ctx->cinfo.image_height = static_cast<JDIMENSION>(h);
    ctx->cinfo.input_components = comps;
    ctx->cinfo.in_color_space = comps == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_set_defaults(&ctx->cinfo);
    jpeg_set_quality(&ctx->cinfo, quality, TRUE);
    jpeg_start_compress(&ctx->cinfo, TRUE);
    const size_t stride = static_cast<size_t>(w) * static_cast<size_t>(comps);
    while (ctx->cinfo.next_scanline < ctx->cinfo.image_height) {
        JSAMPROW row =
            const_cast<JSAMPROW>(px + static_cast<size_t>(ctx->cinfo.next_scanline) * stride);
        jpeg_write_scanlines(&ctx->cinfo, &row, 1);
    }
    jpeg_finish_compress(&ctx->cinfo);
    jpeg_destroy_compress(&ctx->cinfo);
    out->data = ctx->mem;
    out->len = ctx->memsize;
    free(ctx);
    return 0;
}

struct s_png_sink {
    kp_buf_t *out;
    size_t cap;
    int oom;
};

static void s_png_write(png_structp png, png_bytep data, png_size_t n)
{
    s_png_sink *s = static_cast<s_png_sink *>(png_get_io_ptr(png));
    if (s->out->len + n > s->cap) {
        size_t ncap = s->cap ? s->cap : 65536;
        while (ncap < s->out->len + n)
            ncap *= 2;
        unsigned char *d = static_cast<unsigned char *>(realloc(s->out->data, ncap));
        if (!d) {
            s->oom = 1;
            png_error(png, "out of memory");
        }
        s->out->data = d;
        s->cap = ncap;
    }
    memcpy(s->out->data + s->out->len, data, n);
    s->out->len += n;
}

static void s_png_flush(png_structp png)
{
    (void)png;
}

static void s_png_error(png_structp png, png_const_charp msg)
{
    kp_error(CAT, "PNG encoding failed: %s", msg);
    png_longjmp(png, 1);
}

static void s_png_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    kp_debug(CAT, "libpng: %s", msg);
}

/* Encodes 8-bit grey (comps 1) or RGB (comps 3) pixels. 0, KP_ENOMEM or KP_EINTERNAL. */
static int s_encode_png(const unsigned char *px, int w, int h, int comps, kp_buf_t *out)
{
    /* on the heap for the same reason as s_jpeg_ctx */
    s_png_sink *const sink = static_cast<s_png_sink *>(calloc(1, sizeof(s_png_sink)));
    if (!sink) return KP_ENOMEM;
    sink->out = out;
    png_structp png =
        png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, s_png_error, s_png_warning);
    if (!png) {
        free(sink);
        return KP_ENOMEM;
    }
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_write_struct(&png, nullptr);
        free(sink);
        return KP_ENOMEM;
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        kp_buf_free(out);
        int rc = sink->oom ? KP_ENOMEM : KP_EINTERNAL;
        free(sink);
        return rc;
    }
    png_set_write_fn(png, sink, s_png_write, s_png_flush);
    png_set_IHDR(png, info, static_cast<png_uint_32>(w), static_cast<png_uint_32>(h), 8,
                 comps == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_set_compression_level(png, 6);
    png_write_info(png, info);
    const size_t stride = static_cast<size_t>(w) * static_cast<size_t>(comps);
    for (int y = 0; y < h; y++)
        png_write_row(png, const_cast<png_bytep>(px + static_cast<size_t>(y) * stride));
    png_write_end(png, info);
    png_destroy_write_struct(&png, &info);
    free(sink);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Rendering                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static int s_image_status_error(EI_Status st)
{
    switch (st) {
    case EIS_NotSupportedValue:
        return KP_EUNSUPPORTED;
    case EIS_MemoryFailure:
        return KP_ENOMEM;
    default:
        return KP_EDICOM;
    }
}

/* Output size fitting cols x rows inside the viewport vw x vh (0 = unconstrained). */
static void s_fit(unsigned long cols, unsigned long rows, int vw, int vh, unsigned long *ow,
                  unsigned long *oh)
{
    *ow = cols;
    *oh = rows;
    if (vw <= 0 && vh <= 0) return;
    double sx = vw > 0 ? double(vw) / double(cols) : 0, sy = vh > 0 ? double(vh) / double(rows) : 0;
    double s = vw <= 0 ? sy : vh <= 0 ? sx : (sx < sy ? sx : sy);
    double fw = std::floor(double(cols) * s + 0.5), fh = std::floor(double(rows) * s + 0.5);
    if (vw > 0 && fw > vw) fw = vw;
    if (vh > 0 && fh > vh) fh = vh;
    if (fw < 1) fw = 1;
    if (fh < 1) fh = 1;
    if (fw > KP_IMAGE_MAX_RENDER_DIM) fw = KP_IMAGE_MAX_RENDER_DIM;
    if (fh > KP_IMAGE_MAX_RENDER_DIM) fh = KP_IMAGE_MAX_RENDER_DIM;
    *ow = static_cast<unsigned long>(fw);
    *oh = static_cast<unsigned long>(fh);
}

/* Fills out with every top-level element of ds except PixelData (cloned; large values stay on
 * disk) and NumberOfFrames, plus px as native PixelData and model as the photometric
 * interpretation: a one-frame image DicomImage can render. 0 or KP_EDICOM. */
static int s_single_frame_dataset(DcmDataset *ds, const kp_buf_t &px, const std::string &model,
                                  DcmDataset &out)
{
    for (unsigned long i = 0; i < ds->card(); i++) {
        DcmElement *el = ds->getElement(i);
        if (!el || el->getTag() == DCM_PixelData || el->getTag() == DCM_NumberOfFrames) continue;
        DcmObject *copy = el->clone();
        if (!copy || out.insert(static_cast<DcmElement *>(copy), OFTrue).bad()) {
            delete copy;
            return KP_EDICOM;
        }
    }
    if (!model.empty() &&
        out.putAndInsertString(DCM_PhotometricInterpretation, model.c_str()).bad())
        return KP_EDICOM;
    Uint16 bits = 0;
    (void)ds->findAndGetUint16(DCM_BitsAllocated, bits);
    OFCondition c;
    if (bits > 8) /* little endian bytes on a little endian host are the native words */
        c = out.putAndInsertUint16Array(DCM_PixelData, reinterpret_cast<const Uint16 *>(px.data),
                                        static_cast<unsigned long>(px.len / 2));
    else
        c = out.putAndInsertUint8Array(DCM_PixelData, px.data, static_cast<unsigned long>(px.len));
    return c.good() ? 0 : KP_EDICOM;
}

static int s_render(const char *path, const kp_render_opts_t *o, kp_buf_t *out, int *w, int *h)
{
    const long frame = o->frame == 0 ? 1 : o->frame;
    const int quality = o->quality == 0 ? 90 : o->quality;
    DcmFileFormat ff;
    int rc = s_load(ff, path);
    if (rc) return rc;
    DcmDataset *ds = ff.getDataset();
    if (!s_pixel_data(ds)) {
        kp_debug(CAT, "%s: no pixel data to render", path);
        return KP_ENOTFOUND;
    }
    const long nframes = s_number_of_frames(ds);
    if (frame > nframes) {
        kp_debug(CAT, "%s: no frame %ld to render (%ld frames)", path, frame, nframes);
        return KP_ENOTFOUND;
    }
    const E_TransferSyntax xfer = ds->getOriginalXfer();
    const DcmXfer dx(xfer);
    if (dx.isEncapsulated() && !DcmCodecList::canChangeCoding(xfer, EXS_LittleEndianExplicit)) {
        kp_info(CAT, "%s: no decoder for transfer syntax %s", path, dx.getXferName());
        return KP_EUNSUPPORTED;
    }
    /* the VOI window stored first in the file (read before DicomImage may change anything) */
    Float64 fc = 0, fw = 0;
    const bool file_window = ds->findAndGetFloat64(DCM_WindowCenter, fc, 0).good() &&
                             ds->findAndGetFloat64(DCM_WindowWidth, fw, 0).good() && fw >= 1;

    std::unique_ptr<DicomImage> img(new DicomImage(ds, xfer, CIF_UsePartialAccessToPixelData,
                                                   static_cast<unsigned long>(frame - 1), 1));
    DcmDataset single; /* the fallback's one-frame copy; must outlive the images */
    if (img->getStatus() != EIS_Normal && dx.isEncapsulated() && nframes > 1) {
        /* DicomImage cannot locate the frame's fragments (several fragments per frame and
         * no offset table): decode the frame ourselves and render a one-frame copy */
        kp_debug(CAT, "%s: DicomImage cannot read frame %ld (%s); decoding it first", path, frame,
                 DicomImage::getString(img->getStatus()));
        img.reset();
        kp_buf_t px = {nullptr, 0};
        std::string model;
        rc = s_decode_frame(path, ds, s_pixel_data(ds), frame, &px, &model);
        if (rc) return rc;
        rc = s_single_frame_dataset(ds, px, model, single);
        kp_buf_free(&px);
        if (rc) return rc;
        img.reset(new DicomImage(&single, EXS_LittleEndianExplicit, 0UL, 0UL, 1UL));
    }
    if (img->getStatus() != EIS_Normal) {
        kp_warn(CAT, "%s: cannot render frame %ld: %s", path, frame,
                DicomImage::getString(img->getStatus()));
        return s_image_status_error(img->getStatus());
    }
    const bool mono = img->isMonochrome() != 0;
    double vmin = 0, vmax = 0;
    const bool have_minmax = mono && img->getMinMaxValues(vmin, vmax, 0) != 0;

    unsigned long ow = 0, oh = 0;
    s_fit(img->getWidth(), img->getHeight(), o->width, o->height, &ow, &oh);
    std::unique_ptr<DicomImage> scaled;
    DicomImage *fin = img.get();
    if (ow != img->getWidth() || oh != img->getHeight()) {
        scaled.reset(img->createScaledImage(ow, oh, 1 /* interpolate */, 0 /* no aspect */));
        if (!scaled || scaled->getStatus() != EIS_Normal) {
            kp_warn(CAT, "%s: cannot scale frame %ld to %lux%lu", path, frame, ow, oh);
            return KP_EINTERNAL;
        }
        fin = scaled.get();
    }
    if (mono) {
        int ok;
        if (o->has_window)
            ok = fin->setWindow(o->center, o->width_w);
        else if (file_window)
            ok = fin->setWindow(fc, fw);
        else if (have_minmax)
            ok = fin->setWindow((vmin + vmax + 1) / 2, vmax - vmin + 1 < 1 ? 1 : vmax - vmin + 1);
        else
            ok = fin->setMinMaxWindow(0);
        if (!ok) kp_debug(CAT, "%s: cannot set the VOI window; rendering without", path);
    }
    const int comps = mono ? 1 : 3;
    const unsigned long fw_px = fin->getWidth(), fh_px = fin->getHeight();
    const void *px = fin->getOutputData(8, 0, 0);
    if (!px || fin->getOutputDataSize(8) < fw_px * fh_px * static_cast<unsigned long>(comps)) {
        kp_warn(CAT, "%s: cannot render frame %ld: %s", path, frame,
                DicomImage::getString(fin->getStatus()));
        return fin->getStatus() == EIS_Normal ? KP_EUNSUPPORTED
                                              : s_image_status_error(fin->getStatus());
    }
    const unsigned char *bytes = static_cast<const unsigned char *>(px);
    rc = o->fmt == KP_IMAGE_JPEG ? s_encode_jpeg(bytes, int(fw_px), int(fh_px), comps, quality, out)
                                 : s_encode_png(bytes, int(fw_px), int(fh_px), comps, out);
    if (rc) return rc;
    if (w) *w = int(fw_px);
    if (h) *h = int(fh_px);
    return 0;
}

extern "C" int kp_image_render(const char *path, const kp_render_opts_t *opts, kp_buf_t *out,
                               int *w, int *h)
{
    if (out) *out = kp_buf_t{nullptr, 0};
    if (w) *w = 0;
    if (h) *h = 0;
    if (!path || !*path || !opts || !out) return KP_EINVAL;
    if (opts->frame < 0 || (opts->fmt != KP_IMAGE_JPEG && opts->fmt != KP_IMAGE_PNG) ||
        opts->quality < 0 || opts->quality > 100 || opts->width < 0 || opts->height < 0 ||
        opts->width > KP_IMAGE_MAX_RENDER_DIM || opts->height > KP_IMAGE_MAX_RENDER_DIM ||
        (opts->has_window &&
         !(opts->width_w >= 1 && std::isfinite(opts->center) && std::isfinite(opts->width_w)))) {
        kp_debug(CAT, "render %s: invalid options", path);
        return KP_EINVAL;
    }
    try {
        return s_render(path, opts, out, w, h);
    } catch (const std::bad_alloc &) {
        kp_buf_free(out);
        kp_error(CAT, "render %s: out of memory", path);
        return KP_ENOMEM;
    } catch (...) {
        kp_buf_free(out);
        kp_error(CAT, "render %s: unexpected exception", path);
        return KP_EINTERNAL;
    }
}
