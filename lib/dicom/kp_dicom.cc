/* kp_dicom: the C++ shim over DCMTK 3.6.7 behind kp_dicom.h (the only C++ in Klinika).
 *
 * Design notes
 *  - Every extern "C" entry point catches every exception and returns an error code.
 *  - Files are loaded with a 4 KiB maxReadLength: larger values (PixelData first of all) stay
 *    on disk and DCMTK keeps, per element, a factory that knows the value's file offset. We use
 *    that offset for kp_dicom_pixel_location() and fall back to walking the element headers
 *    of the file ourselves (s_walk_*) when the value happened to be small enough to be loaded.
 *  - JSON: DCMTK's own writeJson() is used element by element so that every value is encoded
 *    exactly as dcm2json encodes it, but the walk over items and sequences is ours: that is
 *    what lets us know, for each binary element, its nesting path and length, and write a
 *    BulkDataURI without ever touching (or loading) the value.
 *  - SCP: our own accept loop (not DcmSCPPool, whose workers delete themselves and whose
 *    listening socket is out of reach) hands each association to a DcmThreadSCP subclass on
 *    its own std::thread. C-STORE is received with receiveSTORERequest(..., filename), i.e.
 *    straight into a Part 10 file, then the C callback decides the status we send back.
 *  - C-FIND: the identifier is converted to UTF-8 and handed to the C callback as a flat key
 *    list; the callback fills result data sets (copies of the request with its values
 *    cleared) through kp_dicom_find_add_result/_set; we then send them as Pending responses,
 *    checking for a C-CANCEL (DcmSCP::checkForCANCEL, non-blocking) before each one.
 *  - DCMTK's oflog output is routed into kp_log (category "dcmtk"): DCMTK errors become our
 *    warnings, DCMTK warnings our debug lines (real-world files trigger many of them). */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcfcache.h>
#include <dcmtk/dcmdata/dcistrmf.h>
#include <dcmtk/dcmdata/dcjson.h>
#include <dcmtk/dcmdata/dcrledrg.h>
#include <dcmtk/dcmdata/dcrleerg.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmjpeg/djdecode.h>
#include <dcmtk/dcmjpeg/djencode.h>
#include <dcmtk/dcmjpls/djdecode.h>
#include <dcmtk/dcmjpls/djencode.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/scpthrd.h>
#include <dcmtk/dcmnet/scu.h>
#include <dcmtk/oflog/appender.h>
#include <dcmtk/oflog/oflog.h>
#include <dcmtk/oflog/spi/logevent.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

extern "C" {
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_log.h"
}

#define CAT "dicom"

/* Values above this length are left on disk when a file is opened. */
static const Uint32 s_max_read_length = 4096;

/* ------------------------------------------------------------------------------------------ */
/* Logging: DCMTK's oflog -> kp_log                                                             */
/* ------------------------------------------------------------------------------------------ */

namespace
{

class KpLogAppender : public dcmtk::log4cplus::Appender
{
  public:
    KpLogAppender() = default;
    ~KpLogAppender() override
    {
        destructorImpl();
    }
    void close() override
    {
        closed = true;
    }

  protected:
    void append(const dcmtk::log4cplus::spi::InternalLoggingEvent &ev) override
    {
        const dcmtk::log4cplus::LogLevel ll = ev.getLogLevel();
        kp_log_level_t level = KP_LOG_DEBUG;
        if (ll >= dcmtk::log4cplus::ERROR_LOG_LEVEL) level = KP_LOG_WARN;
        kp_logc(level, "dcmtk", NULL, "%s", ev.getMessage().c_str());
    }
};

std::mutex s_init_mutex;
bool s_initialized = false;

} // namespace

static void s_route_dcmtk_log(void)
{
    dcmtk::log4cplus::Logger root = dcmtk::log4cplus::Logger::getRoot();
    root.removeAllAppenders();
    root.addAppender(dcmtk::log4cplus::SharedAppenderPtr(new KpLogAppender()));
    /* DCMTK formats a message before any appender sees it: keep its own threshold high. */
    root.setLogLevel(kp_log_threshold <= KP_LOG_DEBUG ? dcmtk::log4cplus::WARN_LOG_LEVEL
                                                      : dcmtk::log4cplus::ERROR_LOG_LEVEL);
}

extern "C" int kp_dicom_init(void)
{
    try {
        std::lock_guard<std::mutex> lock(s_init_mutex);
        if (s_initialized) return KP_OK;
        s_route_dcmtk_log();
        if (!dcmDataDict.isDictionaryLoaded()) {
            kp_error(CAT,
                     "DICOM data dictionary not loaded: expected %s (or set %s to the path of "
                     "dicom.dic; Debian package libdcmtk17)",
                     DCM_DICT_DEFAULT_PATH, DCM_DICT_ENVIRONMENT_VARIABLE);
            return KP_EINTERNAL;
        }
        DJDecoderRegistration::registerCodecs();
        DJEncoderRegistration::registerCodecs();
        DJLSDecoderRegistration::registerCodecs();
        DJLSEncoderRegistration::registerCodecs();
        DcmRLEDecoderRegistration::registerCodecs();
        DcmRLEEncoderRegistration::registerCodecs();
        /* DCMTK reads TCP_NODELAY from the environment for each socket; without it Nagle's
         * algorithm slows a C-STORE stream about tenfold. Set here, before any thread. */
        setenv("TCP_NODELAY", "1", 1);
        s_initialized = true;
        return KP_OK;
    } catch (...) {
        kp_error(CAT, "kp_dicom_init: unexpected exception");
        return KP_EINTERNAL;
    }
}

extern "C" void kp_dicom_shutdown(void)
{
    try {
        std::lock_guard<std::mutex> lock(s_init_mutex);
        if (!s_initialized) return;
        DJDecoderRegistration::cleanup();
        DJEncoderRegistration::cleanup();
        DJLSDecoderRegistration::cleanup();
        DJLSEncoderRegistration::cleanup();
        DcmRLEDecoderRegistration::cleanup();
        DcmRLEEncoderRegistration::cleanup();
        /* the log appender stays: DCMTK may still log while static objects are destroyed */
        s_initialized = false;
    } catch (...) {
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Appends s to out as valid UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
 * U+10FFFF): a byte that does not start a valid sequence is taken as ISO 8859-1 (the most
 * common undeclared character set in the field), so no byte is lost; the stored file keeps the
 * original bytes in any case. */
static void s_utf8_sanitize_append(std::string &out, const char *s, size_t n)
{
    const unsigned char *p = reinterpret_cast<const unsigned char *>(s);
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        size_t len = 0;
        unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        if (c < 0x80)
            len = 1;
        else if (c >= 0xC2 && c <= 0xDF)
            len = 2;
        else if (c == 0xE0)
            len = 3, lo = 0xA0;
        else if (c >= 0xE1 && c <= 0xEC)
            len = 3;
        else if (c == 0xED)
            len = 3, hi = 0x9F;
        else if (c >= 0xEE && c <= 0xEF)
            len = 3;
        else if (c == 0xF0)
            len = 4, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            len = 4;
        else if (c == 0xF4)
            len = 4, hi = 0x8F;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            unsigned char b = p[i + k];
            if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) ok = false;
        }
        if (ok) {
            out.append(s + i, len);
            i += len;
        } else {
            out.push_back(static_cast<char>(0xC0 | (c >> 6)));
            out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
            i += 1;
        }
    }
}

static std::string s_utf8_sanitize(const std::string &in)
{
    std::string out;
    out.reserve(in.size());
    s_utf8_sanitize_append(out, in.data(), in.size());
    return out;
}

static void s_tag_hex(char buf[9], const DcmTagKey &key)
{
    snprintf(buf, 9, "%04X%04X", key.getGroup() & 0xFFFFu, key.getElement() & 0xFFFFu);
}

static bool s_is_binary_vr(const char *vr)
{
    static const char *const bin[] = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"};
    for (const char *b : bin)
        if (strcmp(vr, b) == 0) return true;
    return false;
}

static bool s_is_pixel_tag(const DcmTagKey &key)
{
    return key == DCM_PixelData || key == DCM_FloatPixelData || key == DCM_DoubleFloatPixelData;
}

/* ------------------------------------------------------------------------------------------ */
/* Files                                                                                        */
/* ------------------------------------------------------------------------------------------ */

struct kp_dicom_file {
    DcmFileFormat ff;
    std::string path;
    std::string ts;
    int fallback = 0;
    /* (seq_tag, tag) -> text; seq_tag 0 for top level. std::map nodes never move, so the
     * c_str() handed out stays valid until close. */
    std::map<std::pair<uint32_t, uint32_t>, std::string> cache;
};

static OFCondition s_load(kp_dicom_file_t *f)
{
    return f->ff.loadFile(f->path.c_str(), EXS_Unknown, EGL_noChange, s_max_read_length,
                          ERM_autoDetect);
}

extern "C" kp_dicom_file_t *kp_dicom_open(const char *path, int *err)
{
    int e = KP_EINTERNAL;
    kp_dicom_file_t *f = nullptr;
    try {
        if (!path || !*path) {
            e = KP_EINVAL;
            goto error;
        }
        {
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                kp_warn(CAT, "cannot open %s: %s", path, strerror(errno));
                e = KP_EIO;
                goto error;
            }
            struct stat st;
            int rc = fstat(fd, &st);
            close(fd);
            if (rc != 0 || !S_ISREG(st.st_mode)) {
                kp_warn(CAT, "cannot read %s: not a regular file", path);
                e = KP_EIO;
                goto error;
            }
        }
        f = new kp_dicom_file();
        f->path = path;
        {
            OFCondition c = s_load(f);
            if (c.bad()) {
                kp_warn(CAT, "cannot parse %s as DICOM: %s", path, c.text());
                e = KP_EDICOM;
                goto error;
            }
        }
        {
            DcmDataset *ds = f->ff.getDataset();
            if (!ds || ds->card() == 0) {
                kp_warn(CAT, "cannot parse %s as DICOM: empty data set", path);
                e = KP_EDICOM;
                goto error;
            }
            /* Same rule as dcm2json: convert unless the declared set is already UTF-8 or
             * ASCII. A failed conversion may leave the data set half converted: reload it. */
            OFString cs;
            if (ds->findAndGetOFStringArray(DCM_SpecificCharacterSet, cs).good() &&
                cs != "ISO_IR 192" && cs != "ISO_IR 6") {
                OFCondition c = ds->convertToUTF8();
                if (c.bad()) {
                    kp_warn(CAT,
                            "%s: cannot convert character set '%s' to UTF-8 (%s): keeping "
                            "raw values",
                            path, cs.c_str(), c.text());
                    f->ff.clear();
                    c = s_load(f);
                    if (c.bad()) {
                        e = KP_EDICOM;
                        goto error;
                    }
                    f->fallback = 1;
                }
            }
        }
        {
            OFString ts;
            DcmMetaInfo *meta = f->ff.getMetaInfo();
            if (meta && meta->findAndGetOFString(DCM_TransferSyntaxUID, ts).good() && !ts.empty())
                f->ts = ts.c_str();
            else {
                DcmXfer x(f->ff.getDataset()->getOriginalXfer());
                if (x.getXfer() != EXS_Unknown && x.getXferID()) f->ts = x.getXferID();
            }
        }
        if (err) *err = KP_OK;
        return f;
    } catch (const std::bad_alloc &) {
        e = KP_ENOMEM;
    } catch (...) {
        e = KP_EINTERNAL;
    }
error:
    delete f;
    if (err) *err = e;
    return nullptr;
}

extern "C" void kp_dicom_close(kp_dicom_file_t **f)
{
    if (!f || !*f) return;
    try {
        delete *f;
    } catch (...) {
    }
    *f = nullptr;
}

extern "C" int kp_dicom_charset_fallback(const kp_dicom_file_t *f)
{
    return f ? f->fallback : 0;
}

/* Text of one element, cached under key; NULL for SQ / binary VRs. */
static const char *s_element_text(kp_dicom_file_t *f, std::pair<uint32_t, uint32_t> key,
                                  DcmElement *el)
{
    auto it = f->cache.find(key);
    if (it != f->cache.end()) return it->second.c_str();
    if (el->ident() == EVR_SQ || el->ident() == EVR_pixelSQ) return nullptr;
    const char *vr = DcmVR(el->getVR()).getValidVRName();
    if (s_is_binary_vr(vr) || s_is_pixel_tag(el->getTag())) return nullptr;
    OFString value;
    if (el->getLengthField() > 0 && el->getOFStringArray(value, OFTrue).bad()) return nullptr;
    std::string text(value.c_str(), value.length());
    while (!text.empty() && (text.back() == ' ' || text.back() == '\0'))
        text.pop_back();
    auto ins = f->cache.emplace(key, s_utf8_sanitize(text));
    return ins.first->second.c_str();
}

static DcmTagKey s_key(uint32_t tag)
{
    return DcmTagKey(static_cast<Uint16>(tag >> 16), static_cast<Uint16>(tag & 0xFFFFu));
}

extern "C" const char *kp_dicom_get(kp_dicom_file_t *f, uint32_t tag)
{
    if (!f) return nullptr;
    try {
        DcmElement *el = nullptr;
        /* Group 0002 lives in the File Meta Information, everything else in the data set. */
        DcmItem *where = (tag >> 16) == 0x0002u ? static_cast<DcmItem *>(f->ff.getMetaInfo())
                                                : static_cast<DcmItem *>(f->ff.getDataset());
        if (!where || where->findAndGetElement(s_key(tag), el, OFFalse).bad() || !el)
            return nullptr;
        return s_element_text(f, std::make_pair(0u, tag), el);
    } catch (...) {
        return nullptr;
    }
}

extern "C" const char *kp_dicom_get_in_seq(kp_dicom_file_t *f, uint32_t seq_tag, uint32_t item_tag)
{
    if (!f || seq_tag == 0) return nullptr;
    try {
        DcmItem *item = nullptr;
        if (f->ff.getDataset()->findAndGetSequenceItem(s_key(seq_tag), item, 0).bad() || !item)
            return nullptr;
        DcmElement *el = nullptr;
        if (item->findAndGetElement(s_key(item_tag), el, OFFalse).bad() || !el) return nullptr;
        return s_element_text(f, std::make_pair(seq_tag, item_tag), el);
    } catch (...) {
        return nullptr;
    }
}

extern "C" const char *kp_dicom_transfer_syntax(kp_dicom_file_t *f)
{
    return f ? f->ts.c_str() : "";
}

/* ------------------------------------------------------------------------------------------ */
/* Pixel data location: walking element headers in the file                                     */
/* ------------------------------------------------------------------------------------------ */

namespace
{

struct Walker {
    FILE *fp;
    int depth = 0;

    bool read(void *buf, size_t n)
    {
        return fread(buf, 1, n, fp) == n;
    }
    bool skip(uint64_t n)
    {
        return fseeko(fp, static_cast<off_t>(n), SEEK_CUR) == 0;
    }
    uint16_t u16(const unsigned char *b, bool be) const
    {
        return be ? static_cast<uint16_t>(b[0] << 8 | b[1])
                  : static_cast<uint16_t>(b[1] << 8 | b[0]);
    }
    uint32_t u32(const unsigned char *b, bool be) const
    {
        return be ? (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3]
                  : (uint32_t)b[3] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[1] << 8 | b[0];
    }

    /* Reads one element header. Item tags (FFFE,xxxx) never carry a VR. */
    bool header(bool explicit_vr, bool be, uint16_t &g, uint16_t &e, char vr[3], uint32_t &len)
    {
        unsigned char b[8];
        if (!read(b, 8)) return false;
        g = u16(b, be);
        e = u16(b + 2, be);
        vr[0] = vr[1] = vr[2] = 0;
        if (g == 0xFFFE || !explicit_vr) {
            len = u32(b + 4, be);
            return true;
        }
        vr[0] = static_cast<char>(b[4]);
        vr[1] = static_cast<char>(b[5]);
        static const char *const long_vrs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                               "SV", "UC", "UN", "UR", "UT", "UV"};
        bool long_form = false;
        for (const char *l : long_vrs)
            if (vr[0] == l[0] && vr[1] == l[1]) long_form = true;
        if (long_form) {
            unsigned char l4[4];
            if (!read(l4, 4)) return false;
            len = u32(l4, be);
        } else {
            len = u16(b + 6, be);
        }
        return true;
    }

    /* Skips the items of an undefined-length sequence up to its delimiter. */
    bool skip_items(bool explicit_vr, bool be)
    {
        if (++depth > 64) return false;
        for (;;) {
            uint16_t g, e;
            char vr[3];
            uint32_t len;
            if (!header(explicit_vr, be, g, e, vr, len) || g != 0xFFFE) return false;
            if (e == 0xE0DD) break;
            if (e != 0xE000) return false;
            if (len == 0xFFFFFFFFu) {
                if (!skip_elements(explicit_vr, be)) return false;
            } else if (!skip(len)) {
                return false;
            }
        }
        --depth;
        return true;
    }

    /* Skips the elements of an undefined-length item up to its delimiter. */
    bool skip_elements(bool explicit_vr, bool be)
    {
        for (;;) {
            uint16_t g, e;
            char vr[3];
            uint32_t len;
            if (!header(explicit_vr, be, g, e, vr, len)) return false;
            if (g == 0xFFFE && e == 0xE00D) return true;
            if (len == 0xFFFFFFFFu) {
                /* UN of undefined length is encoded in implicit VR little endian (PS3.5 6.2.2) */
                bool un = explicit_vr && vr[0] == 'U' && vr[1] == 'N';
                if (!skip_items(un ? false : explicit_vr, un ? false : be)) return false;
            } else if (!skip(len)) {
                return false;
            }
        }
    }
};

} // namespace

/* Offset of the value of the top-level (7FE0,0010), found by walking the file. */
static int s_walk_pixel_offset(const char *path, const DcmXfer &xfer, int64_t *offset)
{
    FILE *fp = fopen(path, "rbe");
    if (!fp) return KP_EIO;
    int rc = KP_ENOTFOUND;
    Walker w{fp};
    const bool explicit_vr = xfer.isExplicitVR();
    const bool be = xfer.isBigEndian();
    unsigned char pre[132];
    off_t start = 0;
    if (fread(pre, 1, sizeof pre, fp) == sizeof pre && memcmp(pre + 128, "DICM", 4) == 0)
        start = 132;
    if (fseeko(fp, start, SEEK_SET) != 0) goto done;
    /* the meta header, always explicit VR little endian */
    for (;;) {
        off_t pos = ftello(fp);
        unsigned char b[2];
        if (fread(b, 1, 2, fp) != 2) goto done;
        if (fseeko(fp, pos, SEEK_SET) != 0) goto done;
        if (w.u16(b, false) != 0x0002) break;
        uint16_t g, e;
        char vr[3];
        uint32_t len;
        if (!w.header(true, false, g, e, vr, len) || len == 0xFFFFFFFFu || !w.skip(len)) goto done;
    }
    for (;;) {
        uint16_t g, e;
        char vr[3];
        uint32_t len;
        if (!w.header(explicit_vr, be, g, e, vr, len)) goto done;
        if (g == 0x7FE0 && e == 0x0010) {
            *offset = static_cast<int64_t>(ftello(fp));
            rc = KP_OK;
            goto done;
        }
        if (g > 0x7FE0) goto done;
        if (len == 0xFFFFFFFFu) {
            bool un = explicit_vr && vr[0] == 'U' && vr[1] == 'N';
            if (!w.skip_items(un ? false : explicit_vr, un ? false : be)) goto done;
        } else if (!w.skip(len)) {
            goto done;
        }
    }
done:
    fclose(fp);
    return rc;
}

extern "C" int kp_dicom_pixel_location(kp_dicom_file_t *f, int64_t *offset, int64_t *length)
{
    if (!f || !offset || !length) return KP_EINVAL;
    try {
        DcmDataset *ds = f->ff.getDataset();
        DcmElement *px = nullptr;
        if (ds->findAndGetElement(DCM_PixelData, px, OFFalse).bad() || !px) return KP_ENOTFOUND;
        DcmXfer xfer(ds->getOriginalXfer());
        if (xfer.getStreamCompression() != ESC_none) return KP_ENOTFOUND;
        const Uint32 lf = px->getLengthField();
        const int64_t len = lf == DCM_UndefinedLength ? -1 : static_cast<int64_t>(lf);
        const DcmInputStreamFactory *fac = px->getInputStream();
        if (len >= 0 && fac && fac->ident() == DFT_DcmInputFileStreamFactory) {
            *offset = static_cast<int64_t>(
                static_cast<const DcmInputFileStreamFactory *>(fac)->getOffset());
            *length = len;
            return KP_OK;
        }
        int64_t off = 0;
        int rc = s_walk_pixel_offset(f->path.c_str(), xfer, &off);
        if (rc != KP_OK) return rc;
        *offset = off;
        *length = len;
        return KP_OK;
    } catch (...) {
        return KP_EINTERNAL;
    }
}

extern "C" int kp_dicom_bulk(kp_dicom_file_t *f, const char *tagpath, int64_t *offset,
                             int64_t *length, unsigned char **mem)
{
    if (!f || !tagpath || !offset || !length || !mem) return KP_EINVAL;
    *mem = nullptr;
    try {
        DcmItem *item = f->ff.getDataset();
        DcmElement *el = nullptr;
        const char *p = tagpath;
        bool top = true;
        for (;;) {
            /* a tag: 8 hex digits */
            if (strspn(p, "0123456789abcdefABCDEF") != 8 || (p[8] && p[8] != '/'))
                return KP_EINVAL;
            unsigned long t = strtoul(std::string(p, 8).c_str(), nullptr, 16);
            DcmTagKey key(static_cast<Uint16>(t >> 16), static_cast<Uint16>(t & 0xffff));
            if (item->findAndGetElement(key, el, OFFalse).bad() || !el) return KP_ENOTFOUND;
            p += 8;
            if (!*p) break;
            /* "/index/" then the next tag inside that item of the sequence */
            if (el->ident() != EVR_SQ) return KP_ENOTFOUND;
            p++;
            size_t nd = strspn(p, "0123456789");
            if (!nd || nd > 6 || p[nd] != '/') return KP_EINVAL;
            unsigned long idx = strtoul(p, nullptr, 10);
            DcmSequenceOfItems *sq = static_cast<DcmSequenceOfItems *>(el);
            if (idx >= sq->card()) return KP_ENOTFOUND;
            item = sq->getItem(idx);
            p += nd + 1;
            top = false;
        }
        if (el->ident() == EVR_SQ) return KP_ENOTFOUND;
        DcmXfer xfer(f->ff.getDataset()->getOriginalXfer());
        const Uint32 lf = el->getLengthField();
        if (top && el->getTag() == DCM_PixelData && (lf == DCM_UndefinedLength || xfer.isEncapsulated()))
            return KP_EUNSUPPORTED; /* encapsulated pixel data: served as frames */
        if (lf == DCM_UndefinedLength) return KP_EUNSUPPORTED;
        const DcmInputStreamFactory *fac = el->getInputStream();
        if (fac && fac->ident() == DFT_DcmInputFileStreamFactory &&
            xfer.getStreamCompression() == ESC_none && xfer.getByteOrder() == EBO_LittleEndian) {
            *offset = static_cast<int64_t>(
                static_cast<const DcmInputFileStreamFactory *>(fac)->getOffset());
            *length = static_cast<int64_t>(lf);
            return KP_OK;
        }
        /* Loaded (small) or stored big endian / deflated: a little-endian copy. */
        unsigned char *buf = static_cast<unsigned char *>(malloc(lf ? lf : 1));
        if (!buf) return KP_ENOMEM;
        DcmFileCache cache;
        if (lf && el->getPartialValue(buf, 0, lf, &cache, EBO_LittleEndian).bad()) {
            free(buf);
            return KP_EIO;
        }
        *mem = buf;
        *offset = 0;
        *length = static_cast<int64_t>(lf);
        return KP_OK;
    } catch (...) {
        free(*mem);
        *mem = nullptr;
        return KP_EINTERNAL;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* DICOM JSON                                                                                   */
/* ------------------------------------------------------------------------------------------ */

namespace
{

/* Compact format; BulkDataURIs are written by our walk, so DCMTK is never asked. */
struct KpJsonFormat : public DcmJsonFormatCompact {
    KpJsonFormat() : DcmJsonFormatCompact(OFFalse) {}
    OFBool asBulkDataURI(const DcmTagKey &, OFString &) override
    {
        return OFFalse;
    }
};

struct JsonCtx {
    KpJsonFormat fmt;
    std::string prefix;
    size_t threshold = 0;
};

} // namespace

static bool s_json_item(std::ostream &out, DcmItem *item, JsonCtx &ctx, const std::string &path);

/* Fallback for an element DCMTK refuses to encode: values as JSON strings. */
static void s_json_as_strings(std::ostream &out, DcmElement *el, const char *hex, const char *vr)
{
    out << '"' << hex << "\":{\"vr\":\"" << vr << '"';
    const unsigned long vm = el->getVM();
    if (el->getLengthField() > 0 && vm > 0) {
        out << ",\"Value\":[";
        for (unsigned long i = 0; i < vm; i++) {
            OFString v;
            el->getOFString(v, i, OFTrue);
            if (i) out << ',';
            DcmJsonFormat::printValueString(out, v);
        }
        out << ']';
    }
    out << '}';
}

static bool s_json_element(std::ostream &out, DcmElement *el, JsonCtx &ctx,
                           const std::string &parent)
{
    char hex[9];
    s_tag_hex(hex, el->getTag());
    const std::string path = parent.empty() ? std::string(hex) : parent + "/" + hex;
    const char *vr = DcmVR(el->getVR()).getValidVRName();
    if (el->ident() == EVR_SQ) {
        DcmSequenceOfItems *sq = static_cast<DcmSequenceOfItems *>(el);
        out << '"' << hex << "\":{\"vr\":\"" << vr << '"';
        if (sq->card() > 0) {
            out << ",\"Value\":[";
            for (unsigned long i = 0; i < sq->card(); i++) {
                if (i) out << ',';
                if (!s_json_item(out, sq->getItem(i), ctx, path + "/" + std::to_string(i)))
                    return false;
            }
            out << ']';
        }
        out << '}';
        return true;
    }
    const Uint32 len = el->getLengthField();
    const bool bulk =
        len > 0 && (s_is_pixel_tag(el->getTag()) ||
                    (s_is_binary_vr(vr) && (len == DCM_UndefinedLength || len > ctx.threshold)));
    if (bulk) {
        out << '"' << hex << "\":{\"vr\":\"" << vr << "\",\"BulkDataURI\":";
        DcmJsonFormat::printValueString(out, OFString((ctx.prefix + "/bulkdata/" + path).c_str()));
        out << '}';
        return true;
    }
    std::ostringstream tmp;
    OFCondition c = el->writeJson(tmp, ctx.fmt);
    if (c.good()) {
        out << tmp.str();
    } else {
        kp_debug(CAT, "JSON: DCMTK cannot encode %s (%s): writing its values as strings", hex,
                 c.text());
        s_json_as_strings(out, el, hex, vr);
    }
    return true;
}

static bool s_json_item(std::ostream &out, DcmItem *item, JsonCtx &ctx, const std::string &path)
{
    out << '{';
    bool first = true;
    for (unsigned long i = 0; i < item->card(); i++) {
        DcmElement *el = item->getElement(i);
        if (el->getTag().isGroupLength()) continue; /* as DCMTK's writeJson(): no (gggg,0000) */
        if (!first) out << ',';
        first = false;
        if (!s_json_element(out, el, ctx, path)) return false;
    }
    out << '}';
    return true;
}

extern "C" char *kp_dicom_json(kp_dicom_file_t *f, const char *uri_prefix, size_t bulk_threshold)
{
    if (!f) return nullptr;
    try {
        JsonCtx ctx;
        ctx.prefix = uri_prefix ? uri_prefix : "";
        ctx.threshold = bulk_threshold;
        std::ostringstream out;
        if (!s_json_item(out, f->ff.getDataset(), ctx, "")) return nullptr;
        const std::string json = s_utf8_sanitize(out.str());
        char *res = static_cast<char *>(malloc(json.size() + 1));
        if (!res) return nullptr;
        memcpy(res, json.c_str(), json.size() + 1);
        return res;
    } catch (...) {
        kp_warn(CAT, "JSON conversion of %s failed", f->path.c_str());
        return nullptr;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Storage SCP                                                                                  */
/* ------------------------------------------------------------------------------------------ */

namespace
{

/* Transfer syntaxes we accept, in order of preference (uncompressed first: when an SCU offers
 * a choice, accepting a lossy syntax could make it compress lossily for us). */
const char *const s_storage_xfers[] = {
    UID_LittleEndianExplicitTransferSyntax,
    UID_LittleEndianImplicitTransferSyntax,
    UID_BigEndianExplicitTransferSyntax,
    UID_DeflatedExplicitVRLittleEndianTransferSyntax,
    UID_JPEGLSLosslessTransferSyntax,
    UID_JPEGProcess14SV1TransferSyntax,
    UID_JPEGProcess14TransferSyntax,
    UID_JPEG2000LosslessOnlyTransferSyntax,
    UID_RLELosslessTransferSyntax,
    UID_JPEGProcess1TransferSyntax,
    UID_JPEGProcess2_4TransferSyntax,
    UID_JPEGLSLossyTransferSyntax,
    UID_JPEG2000TransferSyntax,
    UID_MPEG2MainProfileAtMainLevelTransferSyntax,
    UID_MPEG2MainProfileAtHighLevelTransferSyntax,
    UID_MPEG4HighProfileLevel4_1TransferSyntax,
    UID_MPEG4BDcompatibleHighProfileLevel4_1TransferSyntax,
    UID_MPEG4HighProfileLevel4_2_For2DVideoTransferSyntax,
    UID_MPEG4HighProfileLevel4_2_For3DVideoTransferSyntax,
    UID_MPEG4StereoHighProfileLevel4_2TransferSyntax,
    UID_HEVCMainProfileLevel5_1TransferSyntax,
    UID_HEVCMain10ProfileLevel5_1TransferSyntax,
};

} // namespace

/* C-FIND results: the request's keys (zero-length) as a template, one data set per match. */
struct kp_dicom_find_results {
    DcmDataset tmpl;
    std::vector<std::unique_ptr<DcmDataset>> rows;
    std::string comment;
};

extern "C" int kp_dicom_find_add_result(kp_dicom_find_results_t *out)
{
    if (!out) return KP_EINVAL;
    try {
        out->rows.emplace_back(new DcmDataset(out->tmpl));
        return KP_OK;
    } catch (const std::bad_alloc &) {
        return KP_ENOMEM;
    } catch (...) {
        return KP_EINTERNAL;
    }
}

extern "C" int kp_dicom_find_set(kp_dicom_find_results_t *out, uint32_t tag, const char *text)
{
    if (!out || out->rows.empty()) return KP_EINVAL;
    try {
        DcmDataset *ds = out->rows.back().get();
        const DcmTagKey key = s_key(tag);
        DcmElement *el = nullptr;
        if (ds->findAndGetElement(key, el, OFFalse).bad() || !el) {
            DcmTag t(key);
            if (t.getEVR() == EVR_UNKNOWN || t.getEVR() == EVR_UN || t.getEVR() == EVR_SQ)
                return KP_EINVAL;
            if (ds->insertEmptyElement(t, OFTrue).bad() ||
                ds->findAndGetElement(key, el, OFFalse).bad() || !el)
                return KP_EINVAL;
        }
        if (el->ident() == EVR_SQ || el->ident() == EVR_pixelSQ) return KP_EINVAL;
        OFCondition c = el->putString(text ? text : "");
        if (c.bad()) {
            el->clear();
            return KP_EINVAL;
        }
        return KP_OK;
    } catch (const std::bad_alloc &) {
        return KP_ENOMEM;
    } catch (...) {
        return KP_EINTERNAL;
    }
}

extern "C" void kp_dicom_find_set_comment(kp_dicom_find_results_t *out, const char *text)
{
    if (!out) return;
    try {
        out->comment = text ? text : "";
        if (out->comment.size() > 64) out->comment.resize(64);
    } catch (...) {
    }
}

namespace
{

/* Text of a C-FIND key as the C side sees it: UTF-8, spaces around each value trimmed. */
std::string s_find_key_text(DcmElement *el)
{
    if (el->ident() == EVR_SQ || el->ident() == EVR_pixelSQ) return "";
    const char *vr = DcmVR(el->getVR()).getValidVRName();
    if (s_is_binary_vr(vr) || el->getLengthField() == 0) return "";
    OFString value;
    if (el->getOFStringArray(value, OFTrue).bad()) return "";
    std::string in(value.c_str(), value.length()), out;
    size_t start = 0;
    for (;;) { /* trim every value of a multi-valued string */
        size_t end = in.find('\\', start);
        std::string v =
            in.substr(start, end == std::string::npos ? std::string::npos : end - start);
        size_t a = v.find_first_not_of(" \t\r\n");
        size_t b = v.find_last_not_of(" \t\r\n\0");
        if (!out.empty() || start > 0) out.push_back('\\');
        if (a != std::string::npos) out += v.substr(a, b - a + 1);
        if (end == std::string::npos) break;
        start = end + 1;
    }
    if (out.find_first_not_of('\\') == std::string::npos) out.clear();
    return s_utf8_sanitize(out);
}

/* One association: a DcmThreadSCP whose command loop and C-STORE handling are ours. */
class KpAssocSCP : public DcmThreadSCP
{
  public:
    KpAssocSCP(const kp_dicom_scp_config_t *cfg, const std::atomic<bool> *abort)
        : m_cfg(cfg), m_abort(abort)
    {
    }

    OFCondition run(T_ASC_Association *assoc) override
    {
        m_assoc = assoc; /* DcmSCP keeps its own copy private */
        return DcmThreadSCP::run(assoc);
    }

  protected:
    void notifyAssociationRequest(const T_ASC_Parameters &params, DcmSCPActionType &) override
    {
        m_calling = params.DULparams.callingAPTitle;
        m_called = params.DULparams.calledAPTitle;
        m_peer = params.DULparams.callingPresentationAddress;
        /* "host:port" for IPv4, strip the port */
        const size_t colon = m_peer.rfind(':');
        if (colon != std::string::npos && m_peer.find(':') == colon) m_peer.resize(colon);
        m_decision = m_cfg->on_assoc ? m_cfg->on_assoc(m_cfg->user, m_calling.c_str(),
                                                       m_called.c_str(), m_peer.c_str())
                                     : 0;
        if (m_decision != 0)
            kp_info(CAT, "rejecting association from %s (%s -> %s): %s not recognized",
                    m_peer.c_str(), m_calling.c_str(), m_called.c_str(),
                    m_decision == 2 ? "called AE" : "calling AE");
    }
    OFCondition negotiateAssociation() override
    {
        static const char *const echo_xfers[] = {UID_LittleEndianExplicitTransferSyntax,
                                                 UID_BigEndianExplicitTransferSyntax,
                                                 UID_LittleEndianImplicitTransferSyntax};
        const char *echo[] = {UID_VerificationSOPClass};
        OFCondition c = ASC_acceptContextsWithPreferredTransferSyntaxes(
            m_assoc->params, echo, 1, const_cast<const char **>(echo_xfers), 3);
        if (c.good())
            c = ASC_acceptContextsWithPreferredTransferSyntaxes(
                m_assoc->params, const_cast<const char **>(dcmAllStorageSOPClassUIDs),
                numberOfDcmAllStorageSOPClassUIDs, const_cast<const char **>(s_storage_xfers),
                static_cast<int>(sizeof s_storage_xfers / sizeof s_storage_xfers[0]));
        if (c.good() && m_cfg->on_find) {
            const char *find[] = {UID_FINDPatientRootQueryRetrieveInformationModel,
                                  UID_FINDStudyRootQueryRetrieveInformationModel};
            c = ASC_acceptContextsWithPreferredTransferSyntaxes(
                m_assoc->params, find, 2, const_cast<const char **>(echo_xfers), 3);
            if (c.good()) s_negotiate_find_extended();
        }
        if (c.bad()) kp_warn(CAT, "negotiating presentation contexts failed: %s", c.text());
        return c;
    }
    OFBool checkCalledAETitleAccepted(const OFString &) override
    {
        return m_decision != 2;
    }
    OFBool checkCallingAETitleAccepted(const OFString &) override
    {
        return m_decision != 1;
    }
    void notifyAssociationAcknowledge() override
    {
        kp_info(CAT, "association accepted from %s (%s -> %s)", m_peer.c_str(), m_calling.c_str(),
                m_called.c_str());
    }

    /* DcmSCP::handleAssociation() blocks for a whole DIMSE timeout between commands; ours
     * polls once a second so that *stop is seen, and counts idle seconds itself. */
    void handleAssociation() override
    {
        OFCondition cond = EC_Normal;
        int idle = 0;
        bool stopped = false;
        while (cond.good()) {
            T_DIMSE_Message msg;
            T_ASC_PresentationContextID pres_id = 0;
            cond = DIMSE_receiveCommand(m_assoc, DIMSE_NONBLOCKING, 1, &pres_id, &msg, nullptr);
            if (cond == DIMSE_NODATAAVAILABLE) {
                if (*m_cfg->stop || m_abort->load()) {
                    stopped = true;
                    break;
                }
                if (m_cfg->dimse_timeout > 0 && ++idle >= m_cfg->dimse_timeout) {
                    kp_info(CAT, "association from %s idle for %d s: aborting", m_peer.c_str(),
                            idle);
                    break;
                }
                cond = EC_Normal;
                continue;
            }
            idle = 0;
            if (cond.good()) {
                DcmPresentationContextInfo info;
                getPresentationContextInfo(m_assoc, pres_id, info);
                cond = handleIncomingCommand(&msg, info);
            }
        }
        if (cond == DUL_PEERREQUESTEDRELEASE) {
            ASC_acknowledgeRelease(m_assoc);
        } else if (cond == DUL_PEERABORTEDASSOCIATION) {
            kp_info(CAT, "association from %s aborted by the peer", m_peer.c_str());
        } else if (stopped) {
            /* No A-ABORT here: DUL_AbortAssociation() then waits for the peer to close the
             * connection (seconds if the peer is hung). Closing the connection is immediate. */
            kp_info(CAT, "stopping: closing association from %s", m_peer.c_str());
            ASC_dropAssociation(m_assoc);
        } else {
            if (cond.bad())
                kp_warn(CAT, "association from %s: %s: aborting", m_peer.c_str(), cond.text());
            ASC_abortAssociation(m_assoc);
        }
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message *msg,
                                      const DcmPresentationContextInfo &info) override
    {
        if (msg->CommandField == DIMSE_C_STORE_RQ) return s_store(msg->msg.CStoreRQ, info);
        if (msg->CommandField == DIMSE_C_FIND_RQ && m_cfg->on_find)
            return s_find(msg->msg.CFindRQ, info);
        return DcmThreadSCP::handleIncomingCommand(msg, info);
    }

  private:
    OFCondition s_store(T_DIMSE_C_StoreRQ &rq, const DcmPresentationContextInfo &info)
    {
        const T_ASC_PresentationContextID pres_id = info.presentationContextID;
        std::string tmpl = std::string(m_cfg->tmp_dir) + "/kp-store-XXXXXX";
        std::vector<char> path(tmpl.begin(), tmpl.end());
        path.push_back('\0');
        int fd = mkostemp(path.data(), O_CLOEXEC);
        if (fd < 0) {
            kp_error(CAT, "C-STORE %s: cannot create a file in %s: %s", rq.AffectedSOPInstanceUID,
                     m_cfg->tmp_dir, strerror(errno));
            DIC_UL bytes = 0, pdvs = 0;
            OFCondition c = DIMSE_ignoreDataSet(m_assoc, DIMSE_NONBLOCKING,
                                                static_cast<int>(s_dimse_timeout()), &bytes, &pdvs);
            if (c.bad()) return c;
            return sendSTOREResponse(pres_id, rq, STATUS_STORE_Refused_OutOfResources);
        }
        close(fd);
        OFCondition c = receiveSTORERequest(rq, pres_id, OFString(path.data()));
        if (c.bad()) {
            kp_warn(CAT, "C-STORE %s from %s: receiving the data set failed: %s",
                    rq.AffectedSOPInstanceUID, m_peer.c_str(), c.text());
            (void)unlink(path.data());
            return c;
        }
        Uint16 status;
        if (info.abstractSyntax != rq.AffectedSOPClassUID) {
            kp_warn(CAT, "C-STORE %s: SOP class %s differs from the presentation context's %s",
                    rq.AffectedSOPInstanceUID, rq.AffectedSOPClassUID, info.abstractSyntax.c_str());
            (void)unlink(path.data());
            status = STATUS_STORE_Error_DataSetDoesNotMatchSOPClass;
        } else {
            kp_dicom_store_req_t req;
            req.calling_ae = m_calling.c_str();
            req.called_ae = m_called.c_str();
            req.peer_host = m_peer.c_str();
            req.sop_class_uid = rq.AffectedSOPClassUID;
            req.sop_instance_uid = rq.AffectedSOPInstanceUID;
            req.transfer_syntax_uid = info.acceptedTransferSyntax.c_str();
            req.tmp_path = path.data();
            status = static_cast<Uint16>(m_cfg->on_store(m_cfg->user, &req));
        }
        return sendSTOREResponse(pres_id, rq, status);
    }

    /* Extended negotiation of the FIND SOP classes (PS3.4 C.5.1.1): byte 2 is combined
     * date-time matching, which we support; relational queries (byte 1) and the other
     * options are answered 0 (not supported). */
    void s_negotiate_find_extended()
    {
        SOPClassExtendedNegotiationSubItemList *req = nullptr;
        ASC_getRequestedExtNegList(m_assoc->params, &req);
        if (!req || req->empty()) return;
        SOPClassExtendedNegotiationSubItemList *acc = new SOPClassExtendedNegotiationSubItemList;
        for (SOPClassExtendedNegotiationSubItem *item : *req) {
            if (item->sopClassUID != UID_FINDPatientRootQueryRetrieveInformationModel &&
                item->sopClassUID != UID_FINDStudyRootQueryRetrieveInformationModel)
                continue;
            SOPClassExtendedNegotiationSubItem *a = new SOPClassExtendedNegotiationSubItem;
            a->sopClassUID = item->sopClassUID;
            a->serviceClassAppInfoLength = 2;
            a->serviceClassAppInfo = new unsigned char[2];
            a->serviceClassAppInfo[0] = 0;
            a->serviceClassAppInfo[1] =
                item->serviceClassAppInfoLength >= 2 && item->serviceClassAppInfo[1] == 1 ? 1 : 0;
            if (a->serviceClassAppInfo[1]) m_combined_datetime.insert(item->sopClassUID.c_str());
            acc->push_back(a);
        }
        if (acc->empty()) {
            delete acc;
            return;
        }
        ASC_setAcceptedExtNegList(m_assoc->params, acc); /* the association owns it now */
    }

    OFCondition s_find(T_DIMSE_C_FindRQ &rq, const DcmPresentationContextInfo &info)
    {
        const T_ASC_PresentationContextID pres_id = info.presentationContextID;
        DcmDataset *raw = nullptr;
        OFCondition c = receiveFINDRequest(rq, pres_id, raw);
        if (c.bad()) {
            delete raw;
            kp_warn(CAT, "C-FIND from %s: receiving the identifier failed: %s", m_peer.c_str(),
                    c.text());
            return c;
        }
        std::unique_ptr<DcmDataset> ds(raw);
        const OFString sop_class = rq.AffectedSOPClassUID;
        kp_dicom_find_results_t res;
        Uint16 status = 0;
        int model = sop_class == UID_FINDPatientRootQueryRetrieveInformationModel ? 1
                    : sop_class == UID_FINDStudyRootQueryRetrieveInformationModel ? 2
                                                                                  : 0;
        if (!model || info.abstractSyntax != sop_class) {
            status = STATUS_FIND_Refused_SOPClassNotSupported;
            res.comment = "SOP class not supported for C-FIND";
        }
        OFString cs;
        if (!status && ds->findAndGetOFStringArray(DCM_SpecificCharacterSet, cs).good() &&
            !cs.empty() && cs != "ISO_IR 192" && cs != "ISO_IR 6") {
            if (ds->convertToUTF8().bad()) {
                kp_warn(CAT, "C-FIND from %s: cannot convert character set '%s' to UTF-8",
                        m_calling.c_str(), cs.c_str());
                status = STATUS_FIND_Failed_UnableToProcess;
                res.comment = "Specific Character Set not supported";
            }
        }
        if (!status) {
            std::string level;
            bool has_level = false;
            std::vector<std::string> texts;
            std::vector<kp_dicom_find_key_t> keys;
            texts.reserve(ds->card());
            for (unsigned long i = 0; i < ds->card(); i++) {
                DcmElement *el = ds->getElement(i);
                if (!el) continue;
                const DcmTagKey k = el->getTag().getXTag();
                if (k.getElement() == 0 || k.getGroup() <= 0x0002) continue;
                if (k == DCM_QueryRetrieveLevel) {
                    has_level = true;
                    level = s_find_key_text(el);
                    continue;
                }
                if (k == DCM_SpecificCharacterSet) continue;
                texts.push_back(s_find_key_text(el));
                kp_dicom_find_key_t key;
                key.tag = (static_cast<uint32_t>(k.getGroup()) << 16) | k.getElement();
                snprintf(key.vr, sizeof key.vr, "%s", DcmVR(el->getVR()).getValidVRName());
                key.value = nullptr;
                keys.push_back(key);
            }
            for (size_t i = 0; i < keys.size(); i++)
                keys[i].value = texts[i].c_str();
            /* the template every result starts from: the request's keys, zero-length */
            res.tmpl = *ds;
            for (unsigned long i = 0; i < res.tmpl.card(); i++) {
                DcmElement *el = res.tmpl.getElement(i);
                if (el) el->clear();
            }
            res.tmpl.putAndInsertString(DCM_SpecificCharacterSet, "ISO_IR 192");
            res.tmpl.putAndInsertString(DCM_QueryRetrieveLevel, level.c_str());
            res.tmpl.putAndInsertString(DCM_RetrieveAETitle, m_cfg->ae_title);

            kp_dicom_find_req_t req;
            req.calling_ae = m_calling.c_str();
            req.called_ae = m_called.c_str();
            req.peer_host = m_peer.c_str();
            req.model = model;
            req.level = has_level ? level.c_str() : nullptr;
            req.combined_datetime = m_combined_datetime.count(sop_class.c_str()) ? 1 : 0;
            req.keys = keys.empty() ? nullptr : keys.data();
            req.nkeys = keys.size();
            status = static_cast<Uint16>(m_cfg->on_find(m_cfg->user, &req, &res));
        }
        size_t sent = 0;
        for (auto &row : res.rows) {
            c = checkForCANCEL(pres_id, rq.MessageID);
            if (c.good()) {
                kp_info(CAT, "C-FIND from %s cancelled after %zu of %zu responses",
                        m_calling.c_str(), sent, res.rows.size());
                status = STATUS_FIND_Cancel_MatchingTerminatedDueToCancelRequest;
                res.comment.clear();
                break;
            }
            if (c != DIMSE_NODATAAVAILABLE) {
                kp_warn(CAT, "C-FIND from %s: unexpected message while sending results: %s",
                        m_calling.c_str(), c.text());
                return c;
            }
            c = sendFINDResponse(pres_id, rq.MessageID, sop_class, row.get(),
                                 STATUS_FIND_Pending_MatchesAreContinuing);
            if (c.bad()) return c;
            sent++;
        }
        DcmDataset detail;
        bool with_detail = !res.comment.empty() && (status & 0xF000) != 0xF000 && status != 0;
        if (with_detail) detail.putAndInsertString(DCM_ErrorComment, res.comment.c_str());
        return sendFINDResponse(pres_id, rq.MessageID, sop_class, nullptr, status,
                                with_detail ? &detail : nullptr);
    }

    Uint32 s_dimse_timeout() const
    {
        return m_cfg->dimse_timeout > 0 ? static_cast<Uint32>(m_cfg->dimse_timeout) : 60;
    }

    const kp_dicom_scp_config_t *m_cfg;
    const std::atomic<bool> *m_abort; /* set when kp_dicom_scp_run() fails and must wind up */
    T_ASC_Association *m_assoc = nullptr;
    std::string m_calling, m_called, m_peer;
    std::set<std::string> m_combined_datetime; /* FIND SOP classes negotiated with it */
    int m_decision = 0;
};

/* DcmTransportConnection::getSocket() is protected and DCMTK offers no other way to the
 * socket of an association; a member pointer formed through a derived class may reach it. */
struct KpSocketPeek : public DcmTransportConnection {
    static int fd(DcmTransportConnection *c)
    {
        DcmNativeSocketType (DcmTransportConnection::*get)() = &KpSocketPeek::getSocket;
        return c ? static_cast<int>((c->*get)()) : -1;
    }
};

struct Worker {
    std::unique_ptr<KpAssocSCP> scp;
    std::thread thread;
    std::atomic<bool> done{false};
    /* our own dup() of the association's socket: shutdown() on it wakes a thread blocked in
     * a read whatever DCMTK did with its descriptor meanwhile (no descriptor reuse race) */
    int sock = -1;
};

void s_reap(std::list<std::unique_ptr<Worker>> &workers, bool all)
{
    for (auto it = workers.begin(); it != workers.end();) {
        if (all || (*it)->done.load()) {
            if ((*it)->thread.joinable()) (*it)->thread.join();
            (*it)->scp.reset(); /* ~DcmSCP drops and destroys the association */
            if ((*it)->sock >= 0) close((*it)->sock);
            it = workers.erase(it);
        } else {
            ++it;
        }
    }
}

/* After a stop: give the associations a second to end by themselves (idle ones notice the
 * stop within that), then cut the connections of those still busy and join everything. */
void s_wind_up(std::list<std::unique_ptr<Worker>> &workers)
{
    for (int i = 0; i < 20; i++) {
        bool busy = false;
        for (auto &w : workers)
            if (!w->done.load()) busy = true;
        if (!busy) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    for (auto &w : workers) {
        if (!w->done.load() && w->sock >= 0) {
            kp_warn(CAT, "stopping: cutting an association still busy");
            (void)shutdown(w->sock, SHUT_RDWR);
        }
    }
    s_reap(workers, true);
}

} // namespace

/* Settings shared by every association. Presentation contexts are not in here: DcmSCPConfig
 * refuses more than 128 of them per profile, and DCMTK knows more storage SOP classes than
 * that, so KpAssocSCP::negotiateAssociation() accepts them itself (as storescp does). */
static void s_scp_configure(const kp_dicom_scp_config_t *cfg, DcmSCPConfig &sc)
{
    sc.setAETitle(cfg->ae_title);
    sc.setPort(static_cast<Uint16>(cfg->port));
    sc.setMaxReceivePDULength(static_cast<Uint32>(cfg->max_pdu));
    sc.setACSETimeout(static_cast<Uint32>(cfg->acse_timeout));
    /* used while a data set is received: without a timeout, block */
    if (cfg->dimse_timeout > 0) {
        sc.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
        sc.setDIMSETimeout(static_cast<Uint32>(cfg->dimse_timeout));
    } else {
        sc.setDIMSEBlockingMode(DIMSE_BLOCKING);
        sc.setDIMSETimeout(0);
    }
    sc.setConnectionBlockingMode(DUL_NOBLOCK);
    sc.setConnectionTimeout(1);
    sc.setHostLookupEnabled(OFFalse);
}

extern "C" int kp_dicom_scp_run(const kp_dicom_scp_config_t *in)
{
    if (!in || !in->ae_title || !*in->ae_title || strlen(in->ae_title) > 16 || in->port < 1 ||
        in->port > 65535 || !in->tmp_dir || !in->on_store || !in->stop) {
        kp_error(CAT, "kp_dicom_scp_run: invalid configuration");
        return KP_EINVAL;
    }
    kp_dicom_scp_config_t cfg = *in;
    if (cfg.max_pdu <= 0) cfg.max_pdu = 16384;
    if (cfg.max_pdu < ASC_MINIMUMPDUSIZE) cfg.max_pdu = ASC_MINIMUMPDUSIZE;
    if (cfg.max_pdu > ASC_MAXIMUMPDUSIZE) cfg.max_pdu = ASC_MAXIMUMPDUSIZE;
    if (cfg.max_associations <= 0) cfg.max_associations = 1;
    if (cfg.acse_timeout <= 0) cfg.acse_timeout = 30;

    T_ASC_Network *net = nullptr;
    std::atomic<bool> abort{false};
    std::list<std::unique_ptr<Worker>> workers;
    try {
        const char *nodelay = getenv("TCP_NODELAY");
        if (!nodelay || strcmp(nodelay, "1") != 0) /* normally done by kp_dicom_init() */
            setenv("TCP_NODELAY", "1", 1);
        dcmDisableGethostbyaddr.set(OFTrue); /* peer_host is the IP address: no DNS lookups */
        /* DCMTK only waits with a timeout for the start of a PDU; the rest is read blocking,
         * bounded by these socket timeouts (SO_RCVTIMEO/SO_SNDTIMEO, default 60 s) */
        if (cfg.dimse_timeout > 0) {
            dcmSocketReceiveTimeout.set(cfg.dimse_timeout);
            dcmSocketSendTimeout.set(cfg.dimse_timeout);
        }

        DcmSCPConfig sc;
        s_scp_configure(&cfg, sc);
        DcmSharedSCPConfig shared(sc);

        OFCondition c = ASC_initializeNetwork(NET_ACCEPTOR, cfg.port, cfg.acse_timeout, &net);
        if (c.bad()) {
            kp_error(CAT, "cannot listen on port %d: %s", cfg.port, c.text());
            return KP_EIO;
        }
        /* the listening socket must not leak into processes we may start */
        const int lfd = static_cast<int>(DUL_networkSocket(net->network));
        if (lfd >= 0) (void)fcntl(lfd, F_SETFD, fcntl(lfd, F_GETFD) | FD_CLOEXEC);
        kp_info(CAT, "storage SCP %s listening on port %d (max %d associations)", cfg.ae_title,
                cfg.port, cfg.max_associations);

        while (!*cfg.stop) {
            s_reap(workers, false);
            if (lfd >= 0) {
                struct pollfd pfd = {lfd, POLLIN, 0};
                int n = poll(&pfd, 1, 250);
                if (n <= 0) continue; /* timeout or EINTR: check *stop again */
            }
            T_ASC_Association *assoc = nullptr;
            c = ASC_receiveAssociation(net, &assoc, cfg.max_pdu, nullptr, nullptr, OFFalse,
                                       DUL_NOBLOCK, 1);
            if (c == DUL_NOASSOCIATIONREQUEST) {
                ASC_destroyAssociation(&assoc);
                continue;
            }
            if (c.bad()) {
                kp_warn(CAT, "receiving an association request failed: %s", c.text());
                if (assoc) {
                    ASC_dropAssociation(assoc);
                    ASC_destroyAssociation(&assoc);
                }
                continue;
            }
            if (workers.size() >= static_cast<size_t>(cfg.max_associations)) {
                s_reap(workers, false);
            }
            if (workers.size() >= static_cast<size_t>(cfg.max_associations)) {
                kp_warn(CAT, "rejecting association from %s: %d associations already active",
                        assoc->params->DULparams.callingPresentationAddress, cfg.max_associations);
                T_ASC_RejectParameters rej;
                rej.result = ASC_RESULT_REJECTEDTRANSIENT;
                rej.source = ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED;
                rej.reason = ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED;
                ASC_rejectAssociation(assoc, &rej);
                ASC_dropAssociation(assoc);
                ASC_destroyAssociation(&assoc);
                continue;
            }
            std::unique_ptr<Worker> w(new Worker());
            const int fd = KpSocketPeek::fd(DUL_getTransportConnection(assoc->DULassociation));
            if (fd >= 0) {
                (void)fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
                w->sock = fcntl(fd, F_DUPFD_CLOEXEC, 0);
            }
            w->scp.reset(new KpAssocSCP(&cfg, &abort));
            w->scp->setSharedConfig(shared);
            Worker *wp = w.get();
            try {
                wp->thread = std::thread([wp, assoc]() {
                    try {
                        wp->scp->run(assoc);
                    } catch (...) {
                        kp_error(CAT, "association thread: unexpected exception");
                    }
                    wp->done.store(true);
                });
            } catch (const std::system_error &e) {
                kp_error(CAT, "cannot start an association thread: %s", e.what());
                if (w->sock >= 0) close(w->sock);
                ASC_dropAssociation(assoc);
                ASC_destroyAssociation(&assoc);
                continue;
            }
            workers.push_back(std::move(w));
        }
        kp_info(CAT, "storage SCP stopping: waiting for %zu association(s)", workers.size());
        s_wind_up(workers);
        ASC_dropNetwork(&net);
        kp_info(CAT, "storage SCP stopped");
        return KP_OK;
    } catch (...) {
        kp_error(CAT, "storage SCP: unexpected exception");
    }
    /* error path: association threads reference cfg, so make them wind up and wait */
    abort.store(true);
    try {
        s_wind_up(workers);
        if (net) ASC_dropNetwork(&net);
    } catch (...) {
    }
    return KP_EINTERNAL;
}

/* ------------------------------------------------------------------------------------------ */
/* Verification SCU                                                                             */
/* ------------------------------------------------------------------------------------------ */

extern "C" int kp_dicom_echo(const char *host, int port, const char *calling_ae,
                             const char *called_ae, int timeout_s, char *err, size_t errlen)
{
    char dummy[8];
    if (!err) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = 0;
    if (!host || !*host || port < 1 || port > 65535 || !calling_ae || !called_ae) {
        snprintf(err, errlen, "invalid host, port or AE title");
        return KP_EINVAL;
    }
    try {
        DcmSCU scu;
        scu.setAETitle(calling_ae);
        scu.setPeerAETitle(called_ae);
        scu.setPeerHostName(host);
        scu.setPeerPort(static_cast<Uint16>(port));
        int t = timeout_s > 0 ? timeout_s : 10;
        scu.setACSETimeout(static_cast<Uint32>(t));
        scu.setDIMSETimeout(static_cast<Uint32>(t));
        scu.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
        scu.setConnectionTimeout(t);
        OFList<OFString> xfers;
        xfers.push_back(UID_LittleEndianExplicitTransferSyntax);
        xfers.push_back(UID_LittleEndianImplicitTransferSyntax);
        scu.addPresentationContext(UID_VerificationSOPClass, xfers);
        OFCondition c = scu.initNetwork();
        if (c.bad()) {
            snprintf(err, errlen, "cannot initialise the network: %s", c.text());
            return KP_EINTERNAL;
        }
        c = scu.negotiateAssociation();
        if (c.bad()) {
            bool rejected = c == DUL_ASSOCIATIONREJECTED;
            snprintf(err, errlen, "%s %s:%d: %s",
                     rejected ? "association rejected by" : "cannot reach", host, port, c.text());
            return rejected ? KP_EPERM : KP_EIO;
        }
        c = scu.sendECHORequest(0);
        if (c.bad()) {
            snprintf(err, errlen, "C-ECHO failed: %s", c.text());
            scu.abortAssociation();
            return c == DIMSE_NODATAAVAILABLE ? KP_ETIMEOUT : KP_EDICOM;
        }
        scu.releaseAssociation();
        return 0;
    } catch (const std::bad_alloc &) {
        snprintf(err, errlen, "out of memory");
        return KP_ENOMEM;
    } catch (...) {
        snprintf(err, errlen, "unexpected error");
        return KP_EINTERNAL;
    }
}
