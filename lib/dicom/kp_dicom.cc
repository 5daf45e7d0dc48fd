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
 *  - C-MOVE / C-GET: the identifier goes to the C callback as for C-FIND; it answers with a
 *    plan (instances with path and stored syntax, and the destination's address). The
 *    sub-operations run here on the association's thread with DIMSE_storeUser: C-MOVE over a
 *    new association (raw ASC API, one context per compressed stored syntax plus an
 *    uncompressed one per SOP class), C-GET over the requesting association on the storage
 *    contexts whose SCP role we accepted. When the accepted syntax is the stored one, a C-MOVE
 *    sends the file's data set bytes as they are (s_store_raw: our command set, then P-DATA
 *    fragments read from the file), a C-GET lets DIMSE_storeUser() load and write the file
 *    (values unchanged, lengths re-encoded); otherwise through kp_image_transcode() (never to
 *    a lossy syntax). C-CANCEL is checked between sub-operations (and, for C-GET,
 *    while waiting for each C-STORE response).
 *  - DICOM TLS: one DcmTLSTransportLayer (OpenSSL context) per role, made once by
 *    s_tls_layer(): the acceptor one is set on a second listening network, polled by the same
 *    accept loop, so TLS associations share the worker pool; the requestor one is set on the
 *    network of each C-MOVE sub-association to a TLS destination (creating connections from
 *    one SSL_CTX on several threads is safe in OpenSSL 3).
 *  - Accepting: the loop accepts connections itself and keeps each one pending until its
 *    A-ASSOCIATE-RQ is entirely in the receive buffer, then hands it to ASC_receiveAssociation()
 *    through DCMTK's external-socket ("inetd") handle, so that reading the request never waits
 *    on the peer: a silent or trickling client holds only its own slot until acse_timeout. On
 *    the TLS port the loop also runs the handshake itself, non-blocking, on an SSL made from the
 *    layer's context, and DCMTK's connection wraps the finished SSL (KpTLSLayer), so a client
 *    stalling mid-handshake holds only its own slot too.
 *  - Parallel C-MOVE: a plan with associations > 1 sends over that many sub-associations at
 *    once, a thread each taking the next instance (s_run_move_parallel); the association's own
 *    thread watches for C-CANCEL and sends the Pending responses.
 *  - DCMTK's oflog output is routed into kp_log (category "dcmtk"): DCMTK errors become our
 *    warnings, DCMTK warnings our debug lines (real-world files trigger many of them). */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcfcache.h>
#include <dcmtk/dcmdata/dcistrmb.h>
#include <dcmtk/dcmdata/dcistrmf.h>
#include <dcmtk/dcmdata/dcostrmb.h>
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
#include <dcmtk/dcmtls/tlslayer.h>
#include <dcmtk/dcmtls/tlstrans.h>
#include <dcmtk/oflog/appender.h>
#include <dcmtk/oflog/oflog.h>
#include <dcmtk/oflog/spi/logevent.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
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
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/statvfs.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

extern "C" {
#include "kp_dicom.h"
#include "kp_errors.h"
#include "kp_image.h"
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
        /* the raw JPEG-LS encoder: 3.6.7's "cooked" one writes a pad byte past its buffer
         * when a frame compresses to an odd length (valgrind; dcmcjpls defaults to raw too) */
        DJLSEncoderRegistration::registerCodecs(0, 0, 0, 0, OFFalse /* preferCookedEncoding */);
        DcmRLEDecoderRegistration::registerCodecs();
        DcmRLEEncoderRegistration::registerCodecs();
        DcmTLSTransportLayer::initializeOpenSSL(); /* once, before threads (not thread-safe) */
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
            if (strspn(p, "0123456789abcdefABCDEF") != 8 || (p[8] && p[8] != '/')) return KP_EINVAL;
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
        if (top && el->getTag() == DCM_PixelData &&
            (lf == DCM_UndefinedLength || xfer.isEncapsulated()))
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

/* C-MOVE / C-GET: what the C callback resolved the identifier into. */
struct KpRetrieveItem {
    std::string sop_class, sop_uid, ts, path, study;
};

struct kp_dicom_retrieve_plan {
    std::vector<KpRetrieveItem> items;
    std::string host;
    int port = 0;
    bool tls = false;
    int associations = 1; /* C-MOVE: sub-associations used at once */
    std::string comment;
};

extern "C" int kp_dicom_retrieve_add(kp_dicom_retrieve_plan_t *plan, const char *sop_class_uid,
                                     const char *sop_instance_uid, const char *transfer_syntax_uid,
                                     const char *path, const char *study_uid)
{
    if (!plan || !sop_class_uid || !sop_instance_uid || !*sop_instance_uid || !path || !*path)
        return KP_EINVAL;
    if (strlen(sop_class_uid) > 64 || strlen(sop_instance_uid) > 64) return KP_EINVAL;
    try {
        KpRetrieveItem it;
        it.sop_class = sop_class_uid;
        it.sop_uid = sop_instance_uid;
        it.ts = transfer_syntax_uid ? transfer_syntax_uid : "";
        it.path = path;
        it.study = study_uid ? study_uid : "";
        plan->items.push_back(std::move(it));
        return KP_OK;
    } catch (const std::bad_alloc &) {
        return KP_ENOMEM;
    } catch (...) {
        return KP_EINTERNAL;
    }
}

extern "C" int kp_dicom_retrieve_set_destination(kp_dicom_retrieve_plan_t *plan, const char *host,
                                                 int port)
{
    if (!plan || !host || !*host || port < 1 || port > 65535) return KP_EINVAL;
    try {
        plan->host = host;
        plan->port = port;
        return KP_OK;
    } catch (...) {
        return KP_ENOMEM;
    }
}

extern "C" void kp_dicom_retrieve_set_tls(kp_dicom_retrieve_plan_t *plan, int tls)
{
    if (plan) plan->tls = tls != 0;
}

extern "C" void kp_dicom_retrieve_set_associations(kp_dicom_retrieve_plan_t *plan, int n)
{
    if (plan) plan->associations = n < 1 ? 1 : n > 16 ? 16 : n;
}

extern "C" void kp_dicom_retrieve_set_comment(kp_dicom_retrieve_plan_t *plan, const char *text)
{
    if (!plan) return;
    try {
        plan->comment = text ? text : "";
        if (plan->comment.size() > 64) plan->comment.resize(64);
    } catch (...) {
    }
}

namespace
{

bool s_set(const char *s)
{
    return s && *s;
}

/* DCMTK's TLS layer, plus a hand-over: the accept loop runs the TLS handshake of a connection
 * itself (non-blocking, on its own SSL object made from this layer's context, exactly as
 * DcmTLSTransportLayer::createConnection() makes one) and puts the finished SSL in handoff just
 * before ASC_receiveAssociation(); the connection DCMTK then asks for wraps it, and DCMTK's own
 * handshake call (SSL_accept) returns at once on an established connection. Only the accept
 * loop's thread sets handoff, and only around that call. */
class KpTLSLayer : public DcmTLSTransportLayer
{
  public:
    KpTLSLayer(T_ASC_NetworkRole role) : DcmTLSTransportLayer(role, nullptr, OFFalse) {}
    SSL *handoff = nullptr;
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        if (secure && handoff) {
            SSL *ssl = handoff;
            handoff = nullptr;
            return new DcmTLSConnection(sock, ssl);
        }
        return DcmTLSTransportLayer::createConnection(sock, secure);
    }
};

/* A TLS context for one role from the PEM files in t: BCP 195 non-downgrading profile (TLS 1.2
 * or newer, AES-GCM suites with ECDHE/DHE), our certificate and key (required for the
 * acceptor, optional for a requestor), the trusted CAs, and peer verification (a requestor
 * always requires the server's certificate; an acceptor requires a client certificate when
 * t->require_peer_cert, and verifies one that is presented in any case). NULL with why set
 * when a file is missing, unreadable or the key does not match the certificate. */
std::unique_ptr<KpTLSLayer> s_tls_layer(T_ASC_NetworkRole role, const kp_dicom_tls_t *t,
                                        std::string &why)
{
    const bool server = role == NET_ACCEPTOR;
    if (!t || !s_set(t->ca_file)) {
        why = "no trusted CA file given (dicom.tls_ca)";
        return nullptr;
    }
    if (server && (!s_set(t->cert_file) || !s_set(t->key_file))) {
        why = "the TLS listener needs a certificate and a key (dicom.tls_cert, dicom.tls_key)";
        return nullptr;
    }
    if (s_set(t->cert_file) != s_set(t->key_file)) {
        why = "a TLS certificate needs its key and a key its certificate";
        return nullptr;
    }
    for (const char *f : {t->ca_file, t->cert_file, t->key_file}) {
        if (s_set(f) && access(f, R_OK) != 0) {
            why = std::string("cannot read ") + f + ": " + strerror(errno);
            return nullptr;
        }
    }
    std::unique_ptr<KpTLSLayer> l(new KpTLSLayer(role));
    if (!*l) {
        why = "cannot create a TLS context (OpenSSL)";
        return nullptr;
    }
    OFCondition c = l->addTrustedCertificateFile(t->ca_file, DCF_Filetype_PEM);
    if (c.bad()) {
        why = std::string("cannot load the trusted CA certificates from ") + t->ca_file;
        return nullptr;
    }
    if (s_set(t->cert_file)) {
        l->setPrivateKeyPasswd(""); /* never prompt on the console */
        if (l->setPrivateKeyFile(t->key_file, DCF_Filetype_PEM).bad()) {
            why = std::string("cannot load the private key ") + t->key_file;
            return nullptr;
        }
        if (l->setCertificateFile(t->cert_file, DCF_Filetype_PEM).bad()) {
            why = std::string("cannot load the certificate ") + t->cert_file;
            return nullptr;
        }
        if (!l->checkPrivateKeyMatchesCertificate()) {
            why = std::string("the private key ") + t->key_file +
                  " does not match the certificate " + t->cert_file;
            return nullptr;
        }
    }
    c = l->setTLSProfile(TSP_Profile_BCP195_ND);
    if (c.good()) c = l->activateCipherSuites();
    if (c.bad()) {
        why = std::string("cannot set the TLS profile: ") + c.text();
        return nullptr;
    }
    l->setCertificateVerification(server && !t->require_peer_cert ? DCV_checkCertificate
                                                                  : DCV_requireCertificate);
    return l;
}

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

/* A query/retrieve identifier as the C side sees it: QueryRetrieveLevel apart, every other
 * top-level key (not 0008,0005) as UTF-8 text. keys[i].value points into texts. */
struct KpIdentifier {
    std::string level;
    bool has_level = false;
    std::vector<std::string> texts;
    std::vector<kp_dicom_find_key_t> keys;
};

/* Converts ds to UTF-8 when it declares another character set (false when that fails) and
 * fills id from it. */
bool s_identifier(DcmDataset *ds, KpIdentifier &id)
{
    OFString cs;
    if (ds->findAndGetOFStringArray(DCM_SpecificCharacterSet, cs).good() && !cs.empty() &&
        cs != "ISO_IR 192" && cs != "ISO_IR 6" && ds->convertToUTF8().bad())
        return false;
    id.texts.reserve(ds->card());
    for (unsigned long i = 0; i < ds->card(); i++) {
        DcmElement *el = ds->getElement(i);
        if (!el) continue;
        const DcmTagKey k = el->getTag().getXTag();
        if (k.getElement() == 0 || k.getGroup() <= 0x0002) continue;
        if (k == DCM_QueryRetrieveLevel) {
            id.has_level = true;
            id.level = s_find_key_text(el);
            continue;
        }
        if (k == DCM_SpecificCharacterSet) continue;
        id.texts.push_back(s_find_key_text(el));
        kp_dicom_find_key_t key;
        key.tag = (static_cast<uint32_t>(k.getGroup()) << 16) | k.getElement();
        snprintf(key.vr, sizeof key.vr, "%s", DcmVR(el->getVR()).getValidVRName());
        key.value = nullptr;
        id.keys.push_back(key);
    }
    for (size_t i = 0; i < id.keys.size(); i++)
        id.keys[i].value = id.texts[i].c_str();
    return true;
}

/* ---- C-MOVE / C-GET sub-operations ---------------------------------------------------------- */

bool s_is_uncompressed(const std::string &ts)
{
    return ts == UID_LittleEndianExplicitTransferSyntax ||
           ts == UID_LittleEndianImplicitTransferSyntax ||
           ts == UID_BigEndianExplicitTransferSyntax;
}

/* Targets we transcode to when the stored syntax was not accepted, best first: uncompressed,
 * then lossless compression. Never a lossy syntax (it would change the pixels). */
int s_target_rank(const std::string &ts)
{
    static const char *const order[] = {
        UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax,
        UID_BigEndianExplicitTransferSyntax,    UID_DeflatedExplicitVRLittleEndianTransferSyntax,
        UID_JPEGLSLosslessTransferSyntax,       UID_JPEGProcess14SV1TransferSyntax,
        UID_JPEGProcess14TransferSyntax,        UID_RLELosslessTransferSyntax,
    };
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (ts == order[i]) return static_cast<int>(i);
    return -1;
}

/* The accepted presentation context of assoc on which to send an instance of sop_class stored
 * in ts: one with that very syntax if any, else the best transcoding target (s_target_rank).
 * as_scu: we send on the requesting association (C-GET), so the context must give us the
 * storage SCU role, i.e. the peer the SCP role. 0 when there is none; *accepted gets its
 * transfer syntax. */
T_ASC_PresentationContextID s_pick_context(T_ASC_Association *assoc, const std::string &sop_class,
                                           const std::string &ts, bool as_scu,
                                           std::string &accepted)
{
    T_ASC_PresentationContextID best = 0;
    int best_rank = 1000;
    const int n = ASC_countPresentationContexts(assoc->params);
    for (int i = 0; i < n; i++) {
        T_ASC_PresentationContext pc;
        if (ASC_getPresentationContext(assoc->params, i, &pc).bad()) continue;
        if (pc.resultReason != ASC_P_ACCEPTANCE || sop_class != pc.abstractSyntax) continue;
        if (as_scu && pc.acceptedRole != ASC_SC_ROLE_SCP && pc.acceptedRole != ASC_SC_ROLE_SCUSCP)
            continue;
        const std::string xfer = pc.acceptedTransferSyntax;
        int rank = xfer == ts ? -1 : s_target_rank(xfer);
        if (rank < 0 && xfer != ts) continue;
        if (rank < best_rank) {
            best_rank = rank;
            best = pc.presentationContextID;
            accepted = xfer;
        }
    }
    return best;
}

/* Counters and the failed list of one C-MOVE / C-GET. */
struct KpSubOps {
    unsigned total = 0, completed = 0, failed = 0, warning = 0;
    unsigned long long bytes = 0; /* of the instances sent */
    std::vector<std::string> failed_uids;
    unsigned remaining() const
    {
        return total - completed - failed - warning;
    }
    void fail(const std::string &uid)
    {
        failed++;
        failed_uids.push_back(uid);
    }
    /* counts a sub-operation by its C-STORE status (Bxxx a warning, other non-zero a failure);
     * true when it failed */
    bool count(Uint16 st, const std::string &uid)
    {
        if (st == STATUS_Success)
            completed++;
        else if ((st & 0xF000) == 0xB000)
            warning++;
        else {
            fail(uid);
            return true;
        }
        return false;
    }
};

/* Where the data set starts in a stored Part 10 file: after the preamble, "DICM" and the meta
 * header, which DCMTK (our ingest, the compressor) always begins with its group length
 * (0002,0000) UL. 0 when the file does not look so (the caller then lets DCMTK read it). */
off_t s_dataset_offset(int fd, off_t size)
{
    unsigned char h[146];
    if (size < static_cast<off_t>(sizeof h) || pread(fd, h, 144, 0) != 144) return 0;
    if (memcmp(h + 128, "DICM", 4) != 0 || memcmp(h + 132, "\x02\x00\x00\x00UL\x04\x00", 8) != 0)
        return 0;
    const off_t off = 144 + static_cast<off_t>(static_cast<uint32_t>(h[140]) |
                                               static_cast<uint32_t>(h[141]) << 8 |
                                               static_cast<uint32_t>(h[142]) << 16 |
                                               static_cast<uint32_t>(h[143]) << 24);
    /* the data set follows at once: its first tag is not in group 0002 any more */
    if (off + 2 > size || pread(fd, h, 2, off) != 2 || (h[0] == 0x02 && h[1] == 0x00)) return 0;
    return off;
}

/* C-STORE with the data set sent straight from the file (its stored transfer syntax is the
 * accepted one): the command set built and sent here, then the file's data set bytes as they
 * are, in P-DATA fragments of the peer's maximum length; then the response is read. Unlike
 * DIMSE_storeUser() with a file name, which parses the whole file and writes it again
 * (recomputing group lengths, turning undefined-length sequences into defined ones), the
 * destination gets exactly the bytes that were received, and nothing is parsed or copied in
 * between. *used false: the file does not look as expected, nothing was sent (use DCMTK). */
OFCondition s_store_raw(T_ASC_Association *assoc, T_ASC_PresentationContextID pres_id,
                        const T_DIMSE_C_StoreRQ &rq, const char *path, int timeout, Uint16 *status,
                        bool *used, unsigned long long *sent)
{
    *used = false;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return EC_Normal;
    struct stat sb;
    const off_t off = fstat(fd, &sb) == 0 ? s_dataset_offset(fd, sb.st_size) : 0;
    const off_t len = off ? sb.st_size - off : 0;
    if (!off || len <= 0 || (len & 1)) {
        close(fd);
        return EC_Normal;
    }
    *used = true;
    /* the command set (PS3.7 9.3.1.1), Implicit VR Little Endian with its group length */
    DcmDataset cmd;
    cmd.putAndInsertString(DCM_AffectedSOPClassUID, rq.AffectedSOPClassUID);
    cmd.putAndInsertUint16(DCM_CommandField, 0x0001);
    cmd.putAndInsertUint16(DCM_MessageID, rq.MessageID);
    cmd.putAndInsertUint16(DCM_Priority, 0x0000);
    cmd.putAndInsertUint16(DCM_CommandDataSetType, 0x0000);
    cmd.putAndInsertString(DCM_AffectedSOPInstanceUID, rq.AffectedSOPInstanceUID);
    if (rq.opts & O_STORE_MOVEORIGINATORAETITLE)
        cmd.putAndInsertString(DCM_MoveOriginatorApplicationEntityTitle,
                               rq.MoveOriginatorApplicationEntityTitle);
    if (rq.opts & O_STORE_MOVEORIGINATORID)
        cmd.putAndInsertUint16(DCM_MoveOriginatorMessageID, rq.MoveOriginatorID);
    unsigned long frag = assoc->sendPDVLength;
    const Uint32 maxpdu = dcmMaxOutgoingPDUSize.get();
    if (frag + 12 > maxpdu) frag = maxpdu - 12;
    frag &= ~1UL;
    std::vector<unsigned char> buf(frag);
    DcmOutputBufferStream out(buf.data(), static_cast<offile_off_t>(buf.size()));
    cmd.transferInit();
    OFCondition c = cmd.write(out, EXS_LittleEndianImplicit, EET_ExplicitLength, nullptr,
                              EGL_withGL, EPD_withoutPadding);
    cmd.transferEnd();
    out.flush();
    void *cbuf = nullptr;
    offile_off_t clen = 0;
    out.flushBuffer(cbuf, clen);
    if (c.bad() || !out.isFlushed() || clen <= 0) { /* a command set never fills a fragment */
        close(fd);
        return c.bad() ? c : DIMSE_SENDFAILED;
    }
    DUL_PDV pdv;
    DUL_PDVLIST list;
    list.count = 1;
    list.pdv = &pdv;
    pdv.presentationContextID = pres_id;
    pdv.pdvType = DUL_COMMANDPDV;
    pdv.lastPDV = OFTrue;
    pdv.fragmentLength = static_cast<unsigned long>(clen);
    pdv.data = cbuf;
    c = DUL_WritePDVs(&assoc->DULassociation, &list);
    /* the data set, fragment by fragment */
    off_t done = 0;
    while (c.good() && done < len) {
        const size_t want = static_cast<size_t>(std::min<off_t>(len - done, frag));
        ssize_t n = pread(fd, buf.data(), want, off + done);
        if (n != static_cast<ssize_t>(want)) {
            c = DIMSE_SENDFAILED; /* the file changed under us: the association is unusable */
            break;
        }
        done += n;
        pdv.pdvType = DUL_DATASETPDV;
        pdv.lastPDV = done == len ? OFTrue : OFFalse;
        pdv.fragmentLength = static_cast<unsigned long>(n);
        pdv.data = buf.data();
        c = DUL_WritePDVs(&assoc->DULassociation, &list);
    }
    close(fd);
    if (c.bad()) return c;
    if (sent) *sent += static_cast<unsigned long long>(sb.st_size);
    T_DIMSE_Message rsp;
    memset(&rsp, 0, sizeof rsp);
    T_ASC_PresentationContextID rsp_id = 0;
    DcmDataset *detail = nullptr;
    c = DIMSE_receiveCommand(assoc, DIMSE_NONBLOCKING, timeout, &rsp_id, &rsp, &detail);
    delete detail;
    if (c.bad()) return c;
    if (rsp.CommandField != DIMSE_C_STORE_RSP ||
        rsp.msg.CStoreRSP.MessageIDBeingRespondedTo != rq.MessageID)
        return makeDcmnetCondition(DIMSEC_UNEXPECTEDRESPONSE, OF_error,
                                   "unexpected response to a C-STORE request");
    *status = rsp.msg.CStoreRSP.DimseStatus;
    return EC_Normal;
}

/* Sends one instance with C-STORE on assoc / pres_id, transcoding it to accepted when that
 * differs from the stored syntax. Returns the condition of the exchange (bad: the association
 * is no longer usable) and the peer's status in *status (0xC000-ish failure of ours, with
 * *why, when the instance could not even be prepared: the exchange condition is then good). */
OFCondition s_store_instance(T_ASC_Association *assoc, T_ASC_PresentationContextID pres_id,
                             const KpRetrieveItem &it, const std::string &accepted,
                             const char *move_originator, DIC_US move_msg_id, int timeout,
                             T_DIMSE_DetectedCancelParameters *cancel, Uint16 *status,
                             std::string &why, unsigned long long *sent = nullptr)
{
    T_DIMSE_C_StoreRQ rq;
    memset(&rq, 0, sizeof rq);
    rq.MessageID = assoc->nextMsgID++;
    OFStandard::strlcpy(rq.AffectedSOPClassUID, it.sop_class.c_str(),
                        sizeof rq.AffectedSOPClassUID);
    OFStandard::strlcpy(rq.AffectedSOPInstanceUID, it.sop_uid.c_str(),
                        sizeof rq.AffectedSOPInstanceUID);
    rq.DataSetType = DIMSE_DATASET_PRESENT;
    rq.Priority = DIMSE_PRIORITY_MEDIUM;
    if (move_originator) {
        OFStandard::strlcpy(rq.MoveOriginatorApplicationEntityTitle, move_originator,
                            sizeof rq.MoveOriginatorApplicationEntityTitle);
        rq.MoveOriginatorID = move_msg_id;
        rq.opts = O_STORE_MOVEORIGINATORAETITLE | O_STORE_MOVEORIGINATORID;
    }
    T_DIMSE_C_StoreRSP rsp;
    memset(&rsp, 0, sizeof rsp);
    DcmDataset *detail = nullptr;
    OFCondition c = EC_Normal;
    if (!it.ts.empty() && it.ts == accepted) {
        /* as stored: for C-MOVE the data set bytes go from the file to the network as they
         * are (s_store_raw); C-GET keeps DIMSE_storeUser(), which also watches for a C-CANCEL
         * on the same association while the response is awaited */
        if (access(it.path.c_str(), R_OK) != 0) {
            why = "stored file missing or unreadable";
            *status = STATUS_STORE_Error_CannotUnderstand;
            return EC_Normal;
        }
        bool raw = false;
        if (!cancel) {
            c = s_store_raw(assoc, pres_id, rq, it.path.c_str(), timeout, status, &raw, sent);
            if (raw) return c;
        }
        c = DIMSE_storeUser(assoc, pres_id, &rq, it.path.c_str(), nullptr, nullptr, nullptr,
                            DIMSE_NONBLOCKING, timeout, &rsp, &detail, cancel);
        struct stat sb;
        if (c.good() && sent && stat(it.path.c_str(), &sb) == 0)
            *sent += static_cast<unsigned long long>(sb.st_size);
    } else {
        kp_buf_t buf = {nullptr, 0};
        int rc = kp_image_transcode(it.path.c_str(), accepted.c_str(), &buf);
        if (rc) {
            why = std::string("cannot transcode to ") + accepted + ": " + kp_strerror(rc);
            *status = STATUS_STORE_Error_CannotUnderstand;
            return EC_Normal;
        }
        DcmFileFormat ff;
        {
            DcmInputBufferStream is;
            is.setBuffer(buf.data, static_cast<offile_off_t>(buf.len));
            is.setEos();
            ff.transferInit();
            c = ff.read(is, EXS_Unknown, EGL_noChange, DCM_MaxReadLength);
            ff.transferEnd();
        }
        if (c.bad()) {
            kp_buf_free(&buf);
            why = std::string("cannot read the transcoded instance: ") + c.text();
            *status = STATUS_STORE_Error_CannotUnderstand;
            return EC_Normal;
        }
        c = DIMSE_storeUser(assoc, pres_id, &rq, nullptr, ff.getDataset(), nullptr, nullptr,
                            DIMSE_NONBLOCKING, timeout, &rsp, &detail, cancel);
        if (c.good() && sent) *sent += buf.len; /* the Part 10 file we made; about the data set */
        kp_buf_free(&buf);
    }
    delete detail;
    if (c.good()) *status = rsp.DimseStatus;
    return c;
}

/* The association of a C-MOVE to its destination (closed by the destructor). */
struct KpSubAssoc {
    T_ASC_Network *net = nullptr;
    T_ASC_Association *assoc = nullptr;
    bool broken = false;
    ~KpSubAssoc()
    {
        if (assoc) {
            if (broken)
                ASC_abortAssociation(assoc);
            else if (ASC_releaseAssociation(assoc).bad())
                ASC_abortAssociation(assoc);
            ASC_destroyAssociation(&assoc);
        }
        if (net) ASC_dropNetwork(&net);
    }
};

/* Opens the association from our AE to the move destination, proposing for each SOP class of
 * the plan a context per compressed stored syntax and one with Explicit and Implicit VR Little
 * Endian (at most 128 contexts: compressed ones beyond that are left out, their instances are
 * then transcoded). */
OFCondition s_open_destination(KpSubAssoc &sub, const char *our_ae, int acse_timeout, int max_pdu,
                               const std::vector<KpRetrieveItem> &items, const std::string &dest_ae,
                               const std::string &host, int port, DcmTransportLayer *tls,
                               std::string &why)
{
    std::vector<std::string> classes;
    std::vector<std::pair<std::string, std::string>> compressed;
    std::set<std::string> seen_class;
    std::set<std::pair<std::string, std::string>> seen_pair;
    for (const auto &it : items) {
        if (it.sop_class.empty()) continue; /* cannot be sent: its sub-operation fails */
        if (seen_class.insert(it.sop_class).second) classes.push_back(it.sop_class);
        if (!it.ts.empty() && !s_is_uncompressed(it.ts) &&
            seen_pair.insert(std::make_pair(it.sop_class, it.ts)).second)
            compressed.push_back(std::make_pair(it.sop_class, it.ts));
    }
    if (classes.size() > 128) classes.resize(128);
    if (classes.size() + compressed.size() > 128) compressed.resize(128 - classes.size());

    OFCondition c = ASC_initializeNetwork(NET_REQUESTOR, 0, acse_timeout, &sub.net);
    if (c.bad()) {
        why = std::string("cannot initialise the network: ") + c.text();
        return c;
    }
    if (tls) c = ASC_setTransportLayer(sub.net, tls, 0);
    if (c.bad()) {
        why = std::string("cannot set up TLS: ") + c.text();
        return c;
    }
    T_ASC_Parameters *params = nullptr;
    c = ASC_createAssociationParameters(&params, static_cast<Uint32>(max_pdu));
    if (c.bad()) {
        why = c.text();
        return c;
    }
    if (tls) ASC_setTransportLayerType(params, OFTrue);
    ASC_setAPTitles(params, our_ae, dest_ae.c_str(), nullptr);
    char peer[300];
    snprintf(peer, sizeof peer, "%s:%d", host.c_str(), port);
    ASC_setPresentationAddresses(params, "localhost", peer);
    T_ASC_PresentationContextID id = 1;
    for (const auto &p : compressed) {
        const char *ts[] = {p.second.c_str()};
        c = ASC_addPresentationContext(params, id, p.first.c_str(), ts, 1);
        if (c.bad()) break;
        id = static_cast<T_ASC_PresentationContextID>(id + 2);
    }
    for (size_t i = 0; c.good() && i < classes.size(); i++) {
        const char *ts[] = {UID_LittleEndianExplicitTransferSyntax,
                            UID_LittleEndianImplicitTransferSyntax};
        c = ASC_addPresentationContext(params, id, classes[i].c_str(), ts, 2);
        id = static_cast<T_ASC_PresentationContextID>(id + 2);
    }
    if (c.bad()) {
        ASC_destroyAssociationParameters(&params);
        why = std::string("cannot propose presentation contexts: ") + c.text();
        return c;
    }
    c = ASC_requestAssociation(sub.net, params, &sub.assoc);
    if (c.bad()) {
        if (!sub.assoc) ASC_destroyAssociationParameters(&params);
        why = std::string("cannot open an association to ") + dest_ae + " at " + peer +
              (tls ? " (TLS): " : ": ") +
              (c == DUL_ASSOCIATIONREJECTED ? "association rejected" : c.text());
        if (sub.assoc) {
            ASC_dropAssociation(sub.assoc);
            ASC_destroyAssociation(&sub.assoc);
        }
        return c.bad() ? c : EC_IllegalCall;
    }
    if (ASC_countAcceptedPresentationContexts(sub.assoc->params) == 0) {
        why = dest_ae + " accepted none of the presentation contexts";
        sub.broken = false;
        return EC_IllegalCall;
    }
    return EC_Normal;
}

/* One association: a DcmThreadSCP whose command loop and C-STORE handling are ours. */
class KpAssocSCP : public DcmThreadSCP
{
  public:
    /* tls: the association came in on the TLS listener; client_tls: the context for C-MOVE
     * sub-associations to TLS destinations (NULL when not configured) */
    KpAssocSCP(const kp_dicom_scp_config_t *cfg, const std::atomic<bool> *abort, bool tls,
               DcmTransportLayer *client_tls)
        : m_cfg(cfg), m_abort(abort), m_tls(tls), m_client_tls(client_tls)
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
        if (m_cfg->on_assoc_info) {
            kp_dicom_assoc_info_t info;
            info.calling_ae = m_calling.c_str();
            info.called_ae = m_called.c_str();
            info.peer_host = m_peer.c_str();
            info.tls = m_tls ? 1 : 0;
            m_decision = m_cfg->on_assoc_info(m_cfg->user, &info);
        } else {
            m_decision = m_cfg->on_assoc ? m_cfg->on_assoc(m_cfg->user, m_calling.c_str(),
                                                           m_called.c_str(), m_peer.c_str())
                                         : 0;
        }
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
        if (c.good() && m_cfg->on_retrieve) {
            const char *ret[] = {UID_MOVEPatientRootQueryRetrieveInformationModel,
                                 UID_MOVEStudyRootQueryRetrieveInformationModel,
                                 UID_GETPatientRootQueryRetrieveInformationModel,
                                 UID_GETStudyRootQueryRetrieveInformationModel};
            c = ASC_acceptContextsWithPreferredTransferSyntaxes(
                m_assoc->params, ret, 4, const_cast<const char **>(echo_xfers), 3);
            if (c.good()) c = s_accept_storage_roles();
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
        kp_info(CAT, "association accepted from %s (%s -> %s)%s", m_peer.c_str(), m_calling.c_str(),
                m_called.c_str(), m_tls ? " over TLS" : "");
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
        if (msg->CommandField == DIMSE_C_MOVE_RQ && m_cfg->on_retrieve)
            return s_retrieve(KP_DICOM_MOVE, msg->msg.CMoveRQ.MessageID,
                              msg->msg.CMoveRQ.AffectedSOPClassUID,
                              msg->msg.CMoveRQ.MoveDestination, &msg->msg.CMoveRQ, nullptr, info);
        if (msg->CommandField == DIMSE_C_GET_RQ && m_cfg->on_retrieve)
            return s_retrieve(KP_DICOM_GET, msg->msg.CGetRQ.MessageID,
                              msg->msg.CGetRQ.AffectedSOPClassUID, nullptr, nullptr,
                              &msg->msg.CGetRQ, info);
        return DcmThreadSCP::handleIncomingCommand(msg, info);
    }

  private:
    OFCondition s_store(T_DIMSE_C_StoreRQ &rq, const DcmPresentationContextInfo &info)
    {
        const T_ASC_PresentationContextID pres_id = info.presentationContextID;
        std::string tmpl = std::string(m_cfg->tmp_dir) + "/kp-store-XXXXXX";
        std::vector<char> path(tmpl.begin(), tmpl.end());
        path.push_back('\0');
        /* storage (nearly) full: refuse before reading the data set, so the sender gets A700
         * on a living association instead of an abort halfway through a write */
        struct statvfs vfs;
        bool full = m_cfg->min_free_bytes > 0 && statvfs(m_cfg->tmp_dir, &vfs) == 0 &&
                    (long long)vfs.f_bavail * (long long)vfs.f_frsize < m_cfg->min_free_bytes;
        int fd = full ? -1 : mkostemp(path.data(), O_CLOEXEC);
        if (fd < 0) {
            if (full)
                kp_error(CAT,
                         "C-STORE %s from %s refused: the storage has less than %lld MB free "
                         "(storage.min_free_mb)",
                         rq.AffectedSOPInstanceUID, m_peer.c_str(),
                         m_cfg->min_free_bytes / (1024 * 1024));
            else
                kp_error(CAT, "C-STORE %s: cannot create a file in %s: %s",
                         rq.AffectedSOPInstanceUID, m_cfg->tmp_dir, strerror(errno));
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
        KpIdentifier id;
        if (!status && !s_identifier(ds.get(), id)) {
            kp_warn(CAT, "C-FIND from %s: cannot convert the identifier's character set to UTF-8",
                    m_calling.c_str());
            status = STATUS_FIND_Failed_UnableToProcess;
            res.comment = "Specific Character Set not supported";
        }
        if (!status) {
            const std::string &level = id.level;
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
            req.level = id.has_level ? level.c_str() : nullptr;
            req.combined_datetime = m_combined_datetime.count(sop_class.c_str()) ? 1 : 0;
            req.keys = id.keys.empty() ? nullptr : id.keys.data();
            req.nkeys = id.keys.size();
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

    /* C-GET: the SCU proposes storage SOP classes with the SCP role (SCP/SCU role selection) so
     * that our C-STORE sub-operations can come back on this association: accept that role on
     * every storage context already accepted (the syntax chosen for storage is kept). */
    OFCondition s_accept_storage_roles()
    {
        const int n = ASC_countPresentationContexts(m_assoc->params);
        for (int i = 0; i < n; i++) {
            T_ASC_PresentationContext pc;
            if (ASC_getPresentationContext(m_assoc->params, i, &pc).bad()) continue;
            if (pc.resultReason != ASC_P_ACCEPTANCE || !dcmIsaStorageSOPClassUID(pc.abstractSyntax))
                continue;
            if (pc.proposedRole != ASC_SC_ROLE_SCP && pc.proposedRole != ASC_SC_ROLE_SCUSCP)
                continue;
            OFCondition c =
                ASC_acceptPresentationContext(m_assoc->params, pc.presentationContextID,
                                              pc.acceptedTransferSyntax, pc.proposedRole);
            if (c.bad()) return c;
        }
        return EC_Normal;
    }

    /* One C-MOVE or C-GET response (Pending when status is 0xFF00). ids: the identifier with
     * the Failed SOP Instance UID List, or NULL; comment: Error Comment, or "". */
    OFCondition s_retrieve_rsp(int op, T_ASC_PresentationContextID pres_id, DIC_US msg_id,
                               const char *sop_class, void *rq, Uint16 status, const KpSubOps &n,
                               DcmDataset *ids, const std::string &comment)
    {
        DcmDataset detail;
        DcmDataset *pdetail = nullptr;
        if (!comment.empty() && status != 0 && (status & 0xF000) != 0xF000) {
            detail.putAndInsertString(DCM_ErrorComment, comment.c_str());
            pdetail = &detail;
        }
        /* counts: on every Pending and Cancel response, and on final ones once sub-operations
         * were started; remaining only on Pending and Cancel (PS3.4 C.4.2.1.6/7) */
        const bool pending = status == STATUS_MOVE_Pending_SubOperationsAreContinuing;
        const bool cancel =
            status == STATUS_MOVE_Cancel_SubOperationsTerminatedDueToCancelIndication;
        const bool counts = pending || cancel || n.total > 0;
        auto cap = [](unsigned v) { return static_cast<DIC_US>(v > 65535 ? 65535 : v); };
        if (op == KP_DICOM_MOVE) {
            T_DIMSE_C_MoveRSP rsp;
            memset(&rsp, 0, sizeof rsp);
            rsp.MessageIDBeingRespondedTo = msg_id;
            OFStandard::strlcpy(rsp.AffectedSOPClassUID, sop_class, sizeof rsp.AffectedSOPClassUID);
            rsp.DimseStatus = status;
            rsp.DataSetType = ids ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
            rsp.opts = O_MOVE_AFFECTEDSOPCLASSUID;
            if (counts) {
                rsp.NumberOfCompletedSubOperations = cap(n.completed);
                rsp.NumberOfFailedSubOperations = cap(n.failed);
                rsp.NumberOfWarningSubOperations = cap(n.warning);
                rsp.opts |= O_MOVE_NUMBEROFCOMPLETEDSUBOPERATIONS |
                            O_MOVE_NUMBEROFFAILEDSUBOPERATIONS |
                            O_MOVE_NUMBEROFWARNINGSUBOPERATIONS;
                if (pending || cancel) {
                    rsp.NumberOfRemainingSubOperations = cap(n.remaining());
                    rsp.opts |= O_MOVE_NUMBEROFREMAININGSUBOPERATIONS;
                }
            }
            return DIMSE_sendMoveResponse(m_assoc, pres_id, static_cast<T_DIMSE_C_MoveRQ *>(rq),
                                          &rsp, ids, pdetail);
        }
        T_DIMSE_C_GetRSP rsp;
        memset(&rsp, 0, sizeof rsp);
        rsp.MessageIDBeingRespondedTo = msg_id;
        OFStandard::strlcpy(rsp.AffectedSOPClassUID, sop_class, sizeof rsp.AffectedSOPClassUID);
        rsp.DimseStatus = status;
        rsp.DataSetType = ids ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
        rsp.opts = O_GET_AFFECTEDSOPCLASSUID;
        if (counts) {
            rsp.NumberOfCompletedSubOperations = cap(n.completed);
            rsp.NumberOfFailedSubOperations = cap(n.failed);
            rsp.NumberOfWarningSubOperations = cap(n.warning);
            rsp.opts |= O_GET_NUMBEROFCOMPLETEDSUBOPERATIONS | O_GET_NUMBEROFFAILEDSUBOPERATIONS |
                        O_GET_NUMBEROFWARNINGSUBOPERATIONS;
            if (pending || cancel) {
                rsp.NumberOfRemainingSubOperations = cap(n.remaining());
                rsp.opts |= O_GET_NUMBEROFREMAININGSUBOPERATIONS;
            }
        }
        return DIMSE_sendGetResponse(m_assoc, pres_id, static_cast<T_DIMSE_C_GetRQ *>(rq), &rsp,
                                     ids, pdetail);
    }

    /* C-MOVE and C-GET (PS3.4 C.4.2, C.4.3): receive the identifier, let the C callback
     * resolve it into instances, then one C-STORE sub-operation per instance (over a new
     * association to the destination for C-MOVE, over this one for C-GET), a Pending response
     * after each, C-CANCEL checked between them, and the final status. */
    OFCondition s_retrieve(int op, DIC_US msg_id, const char *sop_class_c, const char *move_dest,
                           T_DIMSE_C_MoveRQ *move_rq, T_DIMSE_C_GetRQ *get_rq,
                           const DcmPresentationContextInfo &info)
    {
        const char *what = op == KP_DICOM_MOVE ? "C-MOVE" : "C-GET";
        void *rq = op == KP_DICOM_MOVE ? static_cast<void *>(move_rq) : static_cast<void *>(get_rq);
        T_ASC_PresentationContextID pres_id = info.presentationContextID;
        DcmDataset *raw = nullptr;
        OFCondition c = DIMSE_receiveDataSetInMemory(m_assoc, DIMSE_NONBLOCKING,
                                                     static_cast<int>(s_dimse_timeout()), &pres_id,
                                                     &raw, nullptr, nullptr);
        if (c.bad()) {
            delete raw;
            kp_warn(CAT, "%s from %s: receiving the identifier failed: %s", what, m_peer.c_str(),
                    c.text());
            return c;
        }
        std::unique_ptr<DcmDataset> ds(raw);
        const std::string sop_class = sop_class_c;
        std::string dest = move_dest ? move_dest : "";
        while (!dest.empty() && dest.back() == ' ')
            dest.pop_back();
        while (!dest.empty() && dest.front() == ' ')
            dest.erase(0, 1);

        kp_dicom_retrieve_plan_t plan;
        KpSubOps n;
        Uint16 status = 0;
        std::string comment;
        int model = 0;
        if (op == KP_DICOM_MOVE)
            model = sop_class == UID_MOVEPatientRootQueryRetrieveInformationModel ? 1
                    : sop_class == UID_MOVEStudyRootQueryRetrieveInformationModel ? 2
                                                                                  : 0;
        else
            model = sop_class == UID_GETPatientRootQueryRetrieveInformationModel ? 1
                    : sop_class == UID_GETStudyRootQueryRetrieveInformationModel ? 2
                                                                                 : 0;
        KpIdentifier id;
        if (!model || info.abstractSyntax != sop_class_c) {
            status = STATUS_MOVE_Refused_SOPClassNotSupported;
            comment = std::string("SOP class not supported for ") + what;
        } else if (!s_identifier(ds.get(), id)) {
            status = STATUS_MOVE_Failed_UnableToProcess;
            comment = "Specific Character Set not supported";
        }
        kp_dicom_retrieve_req_t req;
        req.calling_ae = m_calling.c_str();
        req.called_ae = m_called.c_str();
        req.peer_host = m_peer.c_str();
        req.op = op;
        req.model = model;
        req.level = id.has_level ? id.level.c_str() : nullptr;
        req.move_destination = op == KP_DICOM_MOVE ? dest.c_str() : nullptr;
        req.keys = id.keys.empty() ? nullptr : id.keys.data();
        req.nkeys = id.keys.size();
        if (!status) {
            status = static_cast<Uint16>(m_cfg->on_retrieve(m_cfg->user, &req, &plan));
            comment = plan.comment;
            if (!status && op == KP_DICOM_MOVE && !plan.items.empty() && plan.port == 0) {
                status = STATUS_MOVE_Refused_MoveDestinationUnknown;
                comment = "move destination unknown";
            }
            if (!status && plan.items.size() > 65535) {
                status = STATUS_MOVE_Refused_OutOfResourcesNumberOfMatches;
                comment = "more than 65535 instances; retrieve less at once";
            }
        }
        bool cancelled = false;
        bool sub_started = false;
        if (!status) {
            n.total = static_cast<unsigned>(plan.items.size());
            sub_started = true;
            c = s_run_subops(op, pres_id, msg_id, sop_class, rq, dest, plan, n, cancelled, comment);
            if (c.bad()) {
                /* our association is gone: nobody to answer to */
                s_retrieve_done(req, plan, n, STATUS_MOVE_Failed_UnableToProcess,
                                std::string("association lost: ") + c.text());
                return c;
            }
            if (cancelled)
                status = STATUS_MOVE_Cancel_SubOperationsTerminatedDueToCancelIndication;
            else if (n.failed > 0 && n.completed + n.warning == 0)
                status = STATUS_MOVE_Refused_OutOfResourcesSubOperations;
            else if (n.failed > 0 || n.warning > 0)
                status = STATUS_MOVE_Warning_SubOperationsCompleteOneOrMoreFailures;
        }
        /* Failed SOP Instance UID List (0008,0058) on a final response with failures; UI
         * values are capped at 64 KiB in all */
        std::unique_ptr<DcmDataset> ids;
        if (sub_started && !n.failed_uids.empty() && status != 0) {
            std::string list;
            for (const auto &u : n.failed_uids) {
                if (list.size() + u.size() + 1 > 65000) break;
                if (!list.empty()) list.push_back('\\');
                list += u;
            }
            ids.reset(new DcmDataset());
            ids->putAndInsertString(DCM_FailedSOPInstanceUIDList, list.c_str());
        }
        if (!sub_started) n.total = 0;
        c = s_retrieve_rsp(op, pres_id, msg_id, sop_class_c, rq, status, n, ids.get(), comment);
        kp_info(CAT,
                "%s from %s (%s)%s%s: %u instance(s), %u completed, %u failed, %u warning, "
                "status %04X%s%s",
                what, m_calling.c_str(), m_peer.c_str(), op == KP_DICOM_MOVE ? " to " : "",
                op == KP_DICOM_MOVE ? dest.c_str() : "", n.total, n.completed, n.failed, n.warning,
                status, comment.empty() ? "" : ": ", comment.c_str());
        s_retrieve_done(req, plan, n, status, comment);
        return c;
    }

    void s_retrieve_done(const kp_dicom_retrieve_req_t &req, const kp_dicom_retrieve_plan_t &plan,
                         const KpSubOps &n, Uint16 status, const std::string &error)
    {
        if (!m_cfg->on_retrieve_done) return;
        std::vector<const char *> studies;
        std::set<std::string> seen;
        for (const auto &it : plan.items)
            if (!it.study.empty() && seen.insert(it.study).second)
                studies.push_back(it.study.c_str());
        kp_dicom_retrieve_result_t res;
        res.status = status;
        res.completed = n.completed;
        res.failed = n.failed;
        res.warning = n.warning;
        res.remaining = n.remaining();
        res.bytes_sent = n.bytes;
        res.study_uids = studies.empty() ? nullptr : studies.data();
        res.nstudies = studies.size();
        res.error = error.c_str();
        m_cfg->on_retrieve_done(m_cfg->user, &req, &res);
    }

    /* One sub-operation: instance it over target (C-MOVE: a sub-association; C-GET: the
     * requesting one, watching for cancel). *st is the destination's status, or ours when it
     * could not be sent (why says why). A bad condition: target broke (why has its text). */
    OFCondition s_subop(T_ASC_Association *target, const KpRetrieveItem &it, int op, DIC_US msg_id,
                        int timeout, T_DIMSE_DetectedCancelParameters *cancel, Uint16 *st,
                        std::string &why, unsigned long long *bytes)
    {
        std::string accepted;
        *st = STATUS_STORE_Refused_SOPClassNotSupported;
        T_ASC_PresentationContextID ctx =
            s_pick_context(target, it.sop_class, it.ts, op == KP_DICOM_GET, accepted);
        if (!ctx) {
            why = "no accepted presentation context for its SOP class / transfer syntax";
            return EC_Normal;
        }
        OFCondition c = s_store_instance(target, ctx, it, accepted,
                                         op == KP_DICOM_MOVE ? m_calling.c_str() : nullptr, msg_id,
                                         timeout, cancel, st, why, bytes);
        if (c.bad()) why = c.text();
        return c;
    }

    /* C-MOVE over several associations to the destination (plan.associations > 1; first is
     * already open). A thread per sub-association takes the next instance of the plan as soon
     * as its previous one is answered; the others are opened alongside the first, and one the
     * destination refuses or leaves unanswered simply takes no work. This thread, the
     * requesting association's, watches for C-CANCEL and a stop, and sends a Pending response
     * whenever the counts moved. Returns as s_run_subops(). */
    OFCondition s_run_move_parallel(T_ASC_PresentationContextID pres_id, DIC_US msg_id,
                                    const std::string &sop_class, void *rq, const std::string &dest,
                                    const kp_dicom_retrieve_plan_t &plan,
                                    std::unique_ptr<KpSubAssoc> first, KpSubOps &n, bool &cancelled,
                                    std::string &comment)
    {
        struct Shared {
            std::mutex mu;
            std::condition_variable cv;
            size_t next = 0;      /* the next item of the plan to send */
            unsigned busy = 0;    /* sub-operations in flight */
            unsigned senders = 0; /* threads that may still send (opening or open) */
            unsigned opened = 1;  /* associations opened (the first included) */
            unsigned changes = 0; /* bumped by every finished sub-operation */
            bool halt = false;    /* C-CANCEL, a stop, or the requesting association failed */
        } sh;
        const int timeout = static_cast<int>(s_dimse_timeout());
        const size_t total = plan.items.size();
        const size_t want = std::min<size_t>(static_cast<size_t>(plan.associations), total);
        DcmTransportLayer *tls = plan.tls ? m_client_tls : nullptr;

        auto send_items = [&](KpSubAssoc *sub) {
            for (;;) {
                size_t i;
                {
                    std::lock_guard<std::mutex> lk(sh.mu);
                    if (sh.halt || sh.next >= total || *m_cfg->stop || m_abort->load()) break;
                    i = sh.next++;
                    sh.busy++;
                }
                const KpRetrieveItem &it = plan.items[i];
                std::string why;
                Uint16 st;
                unsigned long long bytes = 0;
                const bool broke = s_subop(sub->assoc, it, KP_DICOM_MOVE, msg_id, timeout, nullptr,
                                           &st, why, &bytes)
                                       .bad();
                if (broke) {
                    why = "association to the destination failed: " + why;
                    sub->broken = true;
                    st = STATUS_STORE_Refused_OutOfResources;
                }
                bool failed;
                {
                    std::lock_guard<std::mutex> lk(sh.mu);
                    n.bytes += bytes;
                    failed = n.count(st, it.sop_uid);
                    if (broke) comment = why.substr(0, 64);
                    sh.busy--;
                    sh.changes++;
                }
                sh.cv.notify_all();
                if (failed)
                    kp_warn(CAT, "C-MOVE from %s: sub-operation for %s failed (status %04X)%s%s",
                            m_calling.c_str(), it.sop_uid.c_str(), st, why.empty() ? "" : ": ",
                            why.c_str());
                if (broke) break;
            }
        };
        auto finished = [&]() {
            {
                std::lock_guard<std::mutex> lk(sh.mu);
                sh.senders--;
            }
            sh.cv.notify_all();
        };

        /* threads[0] sends over first; the others open their own association first */
        std::vector<std::thread> threads;
        for (size_t k = 0; k < want; k++) {
            {
                std::lock_guard<std::mutex> lk(sh.mu);
                sh.senders++;
            }
            try {
                if (k == 0) {
                    threads.emplace_back([&, sub = first.get()]() {
                        send_items(sub);
                        finished();
                    });
                    continue;
                }
                threads.emplace_back([&, k]() {
                    std::unique_ptr<KpSubAssoc> sub(new KpSubAssoc());
                    std::string why;
                    if (s_open_destination(*sub, m_cfg->ae_title, m_cfg->acse_timeout,
                                           m_cfg->max_pdu, plan.items, dest, plan.host, plan.port,
                                           tls, why)
                            .bad()) {
                        kp_info(CAT,
                                "C-MOVE from %s: association %zu of %zu to %s not opened (%s); "
                                "the others carry on",
                                m_calling.c_str(), k + 1, want, dest.c_str(), why.c_str());
                    } else {
                        {
                            std::lock_guard<std::mutex> lk(sh.mu);
                            sh.opened++;
                        }
                        send_items(sub.get());
                    }
                    sub.reset(); /* released (or aborted) here, on this thread */
                    finished();
                });
            } catch (const std::system_error &e) {
                kp_warn(CAT, "C-MOVE: cannot start a thread for association %zu: %s", k + 1,
                        e.what());
                std::lock_guard<std::mutex> lk(sh.mu);
                sh.senders--;
                break;
            }
        }

        /* watch: C-CANCEL, a stop, progress; until nothing is in flight and nothing is left to
         * take (or no association is left to take it) */
        OFCondition lost = EC_Normal;
        bool stopping = false;
        {
            std::unique_lock<std::mutex> lk(sh.mu);
            unsigned seen = 0;
            for (;;) {
                if (((sh.next >= total || sh.halt) && sh.busy == 0) || sh.senders == 0) break;
                if (sh.halt) { /* only waiting for the sub-operations in flight */
                    sh.cv.wait_for(lk, std::chrono::milliseconds(100));
                    continue;
                }
                if (sh.changes == seen) sh.cv.wait_for(lk, std::chrono::milliseconds(100));
                const bool moved = sh.changes != seen;
                seen = sh.changes;
                KpSubOps snap;
                snap.total = n.total;
                snap.completed = n.completed;
                snap.failed = n.failed;
                snap.warning = n.warning;
                lk.unlock();
                OFCondition cc = DIMSE_checkForCancelRQ(m_assoc, pres_id, msg_id);
                OFCondition rc = EC_Normal;
                if (cc == DIMSE_NODATAAVAILABLE && moved && snap.remaining() > 0)
                    rc = s_retrieve_rsp(KP_DICOM_MOVE, pres_id, msg_id, sop_class.c_str(), rq,
                                        STATUS_MOVE_Pending_SubOperationsAreContinuing, snap,
                                        nullptr, "");
                lk.lock();
                if (cc.good()) {
                    cancelled = true;
                    sh.halt = true;
                } else if (cc != DIMSE_NODATAAVAILABLE) {
                    lost = cc; /* broken, or an unexpected message */
                    sh.halt = true;
                } else if (rc.bad()) {
                    lost = rc;
                    sh.halt = true;
                } else if (*m_cfg->stop || m_abort->load()) {
                    stopping = true;
                    sh.halt = true;
                }
            }
        }
        /* the first association is released before the others are waited for: a destination
         * that serves one association at a time answers a waiting one only then */
        if (!threads.empty()) threads[0].join();
        first.reset();
        for (size_t k = 1; k < threads.size(); k++)
            threads[k].join();

        if (lost.bad()) return lost;
        if (cancelled) {
            kp_info(CAT, "C-MOVE from %s cancelled after %u of %u sub-operations",
                    m_calling.c_str(), n.total - n.remaining(), n.total);
            return EC_Normal;
        }
        /* never taken: a stop, or every association to the destination failed */
        for (size_t k = sh.next; k < total; k++)
            n.fail(plan.items[k].sop_uid);
        if (sh.next < total && (stopping || *m_cfg->stop || m_abort->load()))
            comment = "stopping: sub-operations not performed";
        kp_info(CAT, "C-MOVE from %s to %s: %u instance(s) over %u association(s)",
                m_calling.c_str(), dest.c_str(), n.total, sh.opened);
        return EC_Normal;
    }

    /* Runs the sub-operations. Returns a bad condition only when the requesting association
     * broke; *cancelled when a C-CANCEL arrived; comment gets the reason of a failure that
     * stopped everything (the destination could not be reached, say). */
    OFCondition s_run_subops(int op, T_ASC_PresentationContextID pres_id, DIC_US msg_id,
                             const std::string &sop_class, void *rq, const std::string &dest,
                             const kp_dicom_retrieve_plan_t &plan, KpSubOps &n, bool &cancelled,
                             std::string &comment)
    {
        const char *what = op == KP_DICOM_MOVE ? "C-MOVE" : "C-GET";
        const int timeout = static_cast<int>(s_dimse_timeout());
        if (plan.items.empty()) return EC_Normal;
        std::unique_ptr<KpSubAssoc> sub;
        if (op == KP_DICOM_MOVE) {
            sub.reset(new KpSubAssoc());
            std::string why;
            if (plan.tls && !m_client_tls) {
                why = "destination needs TLS; dicom.tls_cert/tls_key/tls_ca not set";
                kp_warn(CAT, "C-MOVE from %s to %s: %s", m_calling.c_str(), dest.c_str(),
                        why.c_str());
                comment = why.substr(0, 64);
                for (const auto &it : plan.items)
                    n.fail(it.sop_uid);
                return EC_Normal;
            }
            if (s_open_destination(*sub, m_cfg->ae_title, m_cfg->acse_timeout, m_cfg->max_pdu,
                                   plan.items, dest, plan.host, plan.port,
                                   plan.tls ? m_client_tls : nullptr, why)
                    .bad()) {
                kp_warn(CAT, "C-MOVE from %s: %s", m_calling.c_str(), why.c_str());
                comment = why.size() > 64 ? why.substr(0, 64) : why;
                for (const auto &it : plan.items)
                    n.fail(it.sop_uid);
                return EC_Normal;
            }
        }
        if (op == KP_DICOM_MOVE && plan.associations > 1 && plan.items.size() > 1)
            return s_run_move_parallel(pres_id, msg_id, sop_class, rq, dest, plan, std::move(sub),
                                       n, cancelled, comment);
        T_ASC_Association *target = op == KP_DICOM_MOVE ? sub->assoc : m_assoc;
        for (size_t i = 0; i < plan.items.size(); i++) {
            const KpRetrieveItem &it = plan.items[i];
            /* C-CANCEL, or a stop of the daemon, between two sub-operations */
            OFCondition cc = DIMSE_checkForCancelRQ(m_assoc, pres_id, msg_id);
            if (cc.good()) {
                cancelled = true;
                kp_info(CAT, "%s from %s cancelled after %u of %u sub-operations", what,
                        m_calling.c_str(), n.total - n.remaining(), n.total);
                return EC_Normal;
            }
            if (cc != DIMSE_NODATAAVAILABLE) return cc; /* broken, or an unexpected message */
            if (*m_cfg->stop || m_abort->load() || (sub && sub->broken)) {
                for (size_t k = i; k < plan.items.size(); k++)
                    n.fail(plan.items[k].sop_uid);
                if (!sub || !sub->broken) comment = "stopping: sub-operations not performed";
                break;
            }
            std::string why;
            Uint16 st;
            T_DIMSE_DetectedCancelParameters cancel;
            memset(&cancel, 0, sizeof cancel);
            OFCondition sc = s_subop(target, it, op, msg_id, timeout,
                                     op == KP_DICOM_GET ? &cancel : nullptr, &st, why, &n.bytes);
            if (sc.bad()) {
                if (op == KP_DICOM_GET) return sc; /* the requesting association broke */
                why = "association to the destination failed: " + why;
                sub->broken = true;
                st = STATUS_STORE_Refused_OutOfResources;
                comment = why.substr(0, 64);
            }
            if (n.count(st, it.sop_uid)) {
                kp_warn(CAT, "%s from %s: sub-operation for %s failed (status %04X)%s%s", what,
                        m_calling.c_str(), it.sop_uid.c_str(), st, why.empty() ? "" : ": ",
                        why.c_str());
            }
            if (cancel.cancelEncountered) {
                cancelled = true;
                kp_info(CAT, "%s from %s cancelled after %u of %u sub-operations", what,
                        m_calling.c_str(), n.total - n.remaining(), n.total);
                return EC_Normal;
            }
            if (n.remaining() > 0) {
                OFCondition rc =
                    s_retrieve_rsp(op, pres_id, msg_id, sop_class.c_str(), rq,
                                   STATUS_MOVE_Pending_SubOperationsAreContinuing, n, nullptr, "");
                if (rc.bad()) return rc;
            }
        }
        return EC_Normal;
    }

    Uint32 s_dimse_timeout() const
    {
        return m_cfg->dimse_timeout > 0 ? static_cast<Uint32>(m_cfg->dimse_timeout) : 60;
    }

    const kp_dicom_scp_config_t *m_cfg;
    const std::atomic<bool> *m_abort; /* set when kp_dicom_scp_run() fails and must wind up */
    bool m_tls;
    DcmTransportLayer *m_client_tls;
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

/* A connection accepted by the loop whose association request has not fully arrived yet. The
 * loop hands it to DCMTK only once the whole A-ASSOCIATE-RQ is in the socket's receive buffer
 * (on the TLS port: once the loop has completed the TLS handshake itself, non-blocking, and the
 * request is readable through it), so that nothing DCMTK then reads blocks the loop: a peer
 * that connects and stays silent, stalls in the middle of the handshake, or trickles its
 * request only occupies a slot here until acse_timeout, while others are accepted and served. */
struct Pending {
    int fd;
    bool secure;
    std::chrono::steady_clock::time_point deadline;
    std::string peer;
    SSL *ssl = nullptr;      /* TLS port: the connection being set up (owned until handed over) */
    short events = POLLIN;   /* what the handshake waits for */
    bool handshaken = false; /* TLS handshake complete */
    std::chrono::steady_clock::time_point since; /* when it completed */
};

void s_pending_close(Pending &p)
{
    if (p.ssl) SSL_free(p.ssl); /* the socket BIO does not close the descriptor */
    p.ssl = nullptr;
    close(p.fd);
}

/* The size of a PDU whose first bytes are head (type, reserved, 4-byte length): a request
 * larger than 64 KiB is refused by DCMTK anyway, so it is handed over once that much is in. */
size_t s_pdu_need(const unsigned char head[6])
{
    const size_t len = static_cast<size_t>(head[2]) << 24 | static_cast<size_t>(head[3]) << 16 |
                       static_cast<size_t>(head[4]) << 8 | head[5];
    return 6 + (len < 65536 ? len : 65536);
}

/* TLS port: advances the handshake; once it is complete, 1 when the A-ASSOCIATE-RQ can be read
 * through it. A request sent in several TLS records is only seen one record at a time, so one
 * whose first record has arrived is handed over 2 s after the handshake at the latest. */
int s_tls_ready(Pending &p, std::chrono::steady_clock::time_point now)
{
    if (!p.handshaken) {
        ERR_clear_error();
        const int r = SSL_do_handshake(p.ssl);
        if (r != 1) {
            const int e = SSL_get_error(p.ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                p.events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
                return 0;
            }
            char why[256] = "connection closed";
            const unsigned long ec = ERR_get_error();
            if (ec) ERR_error_string_n(ec, why, sizeof why);
            kp_warn(CAT, "TLS handshake with %s failed: %s", p.peer.c_str(), why);
            ERR_clear_error();
            return -1;
        }
        p.handshaken = true;
        p.since = now;
        p.events = POLLIN;
    }
    static thread_local std::vector<unsigned char> buf;
    if (buf.size() < 6 + 65536) buf.resize(6 + 65536);
    ERR_clear_error();
    int n = SSL_peek(p.ssl, buf.data(), 6);
    if (n >= 6) n = SSL_peek(p.ssl, buf.data(), static_cast<int>(s_pdu_need(buf.data())));
    if (n <= 0) {
        const int e = SSL_get_error(p.ssl, n);
        ERR_clear_error();
        if (e == SSL_ERROR_WANT_READ) return 0;
        if (e == SSL_ERROR_WANT_WRITE) {
            p.events = POLLOUT;
            return 0;
        }
        return -1; /* closed, or broken */
    }
    if (n >= 6 && static_cast<size_t>(n) >= s_pdu_need(buf.data())) return 1;
    return now - p.since >= std::chrono::seconds(2) ? 1 : 0;
}

/* 1 when the first PDU is complete in the receive buffer (TLS: see s_tls_ready), 0 not yet, -1
 * when the peer closed, the socket failed or the TLS handshake failed. */
int s_first_pdu_ready(Pending &p, std::chrono::steady_clock::time_point now)
{
    if (p.ssl) return s_tls_ready(p, now);
    unsigned char head[6];
    ssize_t n = recv(p.fd, head, 6, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return -1;
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    if (n < 6) return 0;
    const size_t need = s_pdu_need(head);
    static thread_local std::vector<unsigned char> buf;
    if (buf.size() < need) buf.resize(need);
    n = recv(p.fd, buf.data(), need, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return -1;
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    return static_cast<size_t>(n) >= need ? 1 : 0;
}

std::string s_peer_name(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char host[64] = "?";
    if (getpeername(fd, reinterpret_cast<struct sockaddr *>(&ss), &len) == 0) {
        if (ss.ss_family == AF_INET)
            inet_ntop(AF_INET, &reinterpret_cast<struct sockaddr_in *>(&ss)->sin_addr, host,
                      sizeof host);
        else if (ss.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &reinterpret_cast<struct sockaddr_in6 *>(&ss)->sin6_addr, host,
                      sizeof host);
    }
    return host;
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
    if (cfg.tls_port < 0 || cfg.tls_port > 65535 || (cfg.tls_port && cfg.tls_port == cfg.port)) {
        kp_error(CAT, "kp_dicom_scp_run: invalid TLS port %d", cfg.tls_port);
        return KP_EINVAL;
    }

    /* declared before the networks and the workers so that they outlive both */
    std::unique_ptr<KpTLSLayer> server_tls;
    std::unique_ptr<DcmTLSTransportLayer> client_tls;
    T_ASC_Network *net = nullptr, *tnet = nullptr;
    std::atomic<bool> abort{false};
    std::list<std::unique_ptr<Worker>> workers;
    try {
        std::string why;
        if (cfg.tls_port > 0) {
            server_tls = s_tls_layer(NET_ACCEPTOR, &cfg.tls, why);
            if (!server_tls) {
                kp_error(CAT, "DICOM TLS listener: %s", why.c_str());
                return KP_EINVAL;
            }
        }
        if (s_set(cfg.tls.cert_file) || s_set(cfg.tls.key_file) || s_set(cfg.tls.ca_file)) {
            client_tls = s_tls_layer(NET_REQUESTOR, &cfg.tls, why);
            if (!client_tls) {
                kp_error(CAT, "DICOM TLS to C-MOVE destinations: %s", why.c_str());
                return KP_EINVAL;
            }
        }
        const char *nodelay = getenv("TCP_NODELAY");
        if (!nodelay || strcmp(nodelay, "1") != 0) /* normally done by kp_dicom_init() */
            setenv("TCP_NODELAY", "1", 1);
        dcmDisableGethostbyaddr.set(OFTrue); /* peer_host is the IP address: no DNS lookups */
        /* C-MOVE destinations: connecting is bounded like association messages */
        if (cfg.on_retrieve) dcmConnectionTimeout.set(cfg.acse_timeout);
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
        int tfd = -1;
        if (server_tls) {
            c = ASC_initializeNetwork(NET_ACCEPTOR, cfg.tls_port, cfg.acse_timeout, &tnet);
            if (c.good()) c = ASC_setTransportLayer(tnet, server_tls.get(), 0);
            if (c.bad()) {
                kp_error(CAT, "cannot listen on TLS port %d: %s", cfg.tls_port, c.text());
                if (tnet) ASC_dropNetwork(&tnet);
                ASC_dropNetwork(&net);
                return KP_EIO;
            }
            tfd = static_cast<int>(DUL_networkSocket(tnet->network));
            if (tfd >= 0) (void)fcntl(tfd, F_SETFD, fcntl(tfd, F_GETFD) | FD_CLOEXEC);
        }
        kp_info(CAT, "storage SCP %s listening on port %d%s%s (max %d associations)", cfg.ae_title,
                cfg.port, tnet ? ", DICOM TLS on port " : "",
                tnet ? std::to_string(cfg.tls_port).c_str() : "", cfg.max_associations);

        std::vector<Pending> pending;
        /* connections waiting for their request; beyond this many the oldest is dropped */
        const size_t max_pending = static_cast<size_t>(cfg.max_associations) * 2 + 16;
        while (!*cfg.stop) {
            s_reap(workers, false);
            /* 1. wait for a new connection on either port, or more bytes from a pending one */
            std::vector<struct pollfd> pfd;
            pfd.push_back({lfd, POLLIN, 0});
            pfd.push_back({tfd, POLLIN, 0}); /* -1 without TLS: poll ignores it */
            for (const Pending &p : pending)
                pfd.push_back({p.fd, p.events, 0});
            int wait_ms = 250;
            const auto now = std::chrono::steady_clock::now();
            for (const Pending &p : pending) {
                auto left =
                    std::chrono::duration_cast<std::chrono::milliseconds>(p.deadline - now).count();
                if (left < wait_ms) wait_ms = left > 0 ? static_cast<int>(left) : 0;
            }
            int n = poll(pfd.data(), pfd.size(), wait_ms);
            if (n < 0 && errno != EINTR) {
                kp_error(CAT, "poll on the listening sockets failed: %s", strerror(errno));
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
                continue;
            }
            for (int i = 0; n > 0 && i < 2; i++) {
                if (!(pfd[i].revents & POLLIN)) continue;
                int fd = accept4(i ? tfd : lfd, nullptr, nullptr, SOCK_CLOEXEC);
                if (fd < 0)
                    continue; /* EAGAIN (taken already), ECONNABORTED, EMFILE: logged
                               * by the next failure that matters */
                if (pending.size() >= max_pending) {
                    kp_warn(CAT,
                            "too many connections without an association request: "
                            "dropping the oldest, from %s",
                            pending.front().peer.c_str());
                    s_pending_close(pending.front());
                    pending.erase(pending.begin());
                }
                Pending np;
                np.fd = fd;
                np.secure = i == 1;
                np.deadline =
                    std::chrono::steady_clock::now() + std::chrono::seconds(cfg.acse_timeout);
                np.peer = s_peer_name(fd);
                if (np.secure) {
                    /* the handshake is ours, non-blocking; DCMTK gets the finished SSL */
                    np.ssl = SSL_new(server_tls->getNativeHandle());
                    if (!np.ssl || !SSL_set_fd(np.ssl, fd) ||
                        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
                        kp_warn(CAT, "TLS connection from %s: cannot set up (OpenSSL)",
                                np.peer.c_str());
                        s_pending_close(np);
                        continue;
                    }
                    SSL_set_accept_state(np.ssl);
                }
                pending.push_back(std::move(np));
            }
            /* 2. pick one connection whose request is complete; drop the dead and the late */
            int ready_fd = -1;
            bool secure = false;
            SSL *ready_ssl = nullptr;
            const auto t = std::chrono::steady_clock::now();
            for (size_t i = 0; i < pending.size();) {
                int r =
                    ready_fd < 0 || !pending[i].handshaken ? s_first_pdu_ready(pending[i], t) : 0;
                if (r == 0 && t >= pending[i].deadline) {
                    kp_warn(CAT,
                            "closing a connection from %s: no complete %s within %d s "
                            "(dicom.acse_timeout)",
                            pending[i].peer.c_str(),
                            pending[i].ssl && !pending[i].handshaken ? "TLS handshake"
                                                                     : "association request",
                            cfg.acse_timeout);
                    r = -1;
                }
                if (r < 0) {
                    s_pending_close(pending[i]);
                    pending.erase(pending.begin() + static_cast<long>(i));
                    continue;
                }
                if (r == 1 && ready_fd < 0) {
                    ready_fd = pending[i].fd;
                    secure = pending[i].secure;
                    ready_ssl = pending[i].ssl;
                    pending.erase(pending.begin() + static_cast<long>(i));
                    continue;
                }
                i++;
            }
            if (ready_fd < 0) continue;
            if (ready_ssl) /* DCMTK reads and writes blocking, bounded by the socket timeouts */
                (void)fcntl(ready_fd, F_SETFL, fcntl(ready_fd, F_GETFL) & ~O_NONBLOCK);
            /* 3. DCMTK takes the connection as if it had accepted it (its "inetd" mode): the
             * request is already buffered, so this does not wait on the peer. Only this thread
             * sets the handle, and only around this call. */
            T_ASC_Association *assoc = nullptr;
            dcmExternalSocketHandle.set(ready_fd);
            /* TLS: the connection DCMTK makes wraps our finished SSL (KpTLSLayer); a client
             * whose certificate did not verify never got this far */
            if (ready_ssl) server_tls->handoff = ready_ssl;
            c = ASC_receiveAssociation(secure ? tnet : net, &assoc, cfg.max_pdu, nullptr, nullptr,
                                       secure ? OFTrue : OFFalse, DUL_NOBLOCK, 1);
            dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
            if (server_tls && server_tls->handoff) { /* not taken (DCMTK failed before) */
                SSL_free(server_tls->handoff);
                server_tls->handoff = nullptr;
            }
            if (c.bad()) {
                kp_warn(CAT, "receiving an association request%s failed: %s",
                        secure ? " on the TLS port" : "", c.text());
                if (assoc) { /* it owns the connection now: this closes it */
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
            w->scp.reset(new KpAssocSCP(&cfg, &abort, secure, client_tls.get()));
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
        for (Pending &p : pending)
            s_pending_close(p);
        kp_info(CAT, "storage SCP stopping: waiting for %zu association(s)", workers.size());
        s_wind_up(workers);
        ASC_dropNetwork(&net);
        if (tnet) ASC_dropNetwork(&tnet);
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
        if (tnet) ASC_dropNetwork(&tnet);
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
    return kp_dicom_echo_tls(host, port, calling_ae, called_ae, timeout_s, nullptr, err, errlen);
}

extern "C" int kp_dicom_echo_tls(const char *host, int port, const char *calling_ae,
                                 const char *called_ae, int timeout_s, const kp_dicom_tls_t *tls,
                                 char *err, size_t errlen)
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
        std::unique_ptr<DcmTLSTransportLayer> layer; /* outlives scu */
        if (tls) {
            std::string why;
            layer = s_tls_layer(NET_REQUESTOR, tls, why);
            if (!layer) {
                snprintf(err, errlen, "TLS: %s", why.c_str());
                return KP_EINVAL;
            }
        }
        /* DcmSCU::useSecureConnection() is protected in 3.6.7 (DcmTLSSCU wraps it) */
        struct EchoSCU : public DcmSCU {
            using DcmSCU::useSecureConnection;
        } scu;
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
        if (layer && (c = scu.useSecureConnection(layer.get())).bad()) { /* needs the network */
            snprintf(err, errlen, "cannot set up TLS: %s", c.text());
            return KP_EINTERNAL;
        }
        c = scu.negotiateAssociation();
        if (c.bad()) {
            bool rejected = c == DUL_ASSOCIATIONREJECTED;
            snprintf(err, errlen, "%s %s:%d%s: %s",
                     rejected ? "association rejected by" : "cannot reach", host, port,
                     tls ? " (TLS)" : "", c.text());
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

extern "C" int kp_dicom_store_scu(const char *host, int port, const char *calling_ae,
                                  const char *called_ae, int timeout_s, const kp_dicom_tls_t *tls,
                                  kp_dicom_store_item_t *items, size_t n, char *err, size_t errlen)
{
    char dummy[8];
    if (!err) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = 0;
    if (!host || !*host || port < 1 || port > 65535 || !calling_ae || !called_ae || (!items && n)) {
        snprintf(err, errlen, "invalid host, port or AE title");
        return KP_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        items[i].status = 0xFFFF;
        items[i].error[0] = 0;
    }
    try {
        std::unique_ptr<DcmTLSTransportLayer> layer;
        if (tls) {
            std::string why;
            layer = s_tls_layer(NET_REQUESTOR, tls, why);
            if (!layer) {
                snprintf(err, errlen, "TLS: %s", why.c_str());
                return KP_EINVAL;
            }
        }
        std::vector<KpRetrieveItem> plan;
        plan.reserve(n);
        for (size_t i = 0; i < n; i++) {
            KpRetrieveItem it;
            it.sop_class = items[i].sop_class_uid ? items[i].sop_class_uid : "";
            it.sop_uid = items[i].sop_instance_uid ? items[i].sop_instance_uid : "";
            it.ts = items[i].transfer_syntax_uid ? items[i].transfer_syntax_uid : "";
            it.path = items[i].path ? items[i].path : "";
            plan.push_back(std::move(it));
        }
        const int t = timeout_s > 0 ? timeout_s : 30;
        dcmConnectionTimeout.set(static_cast<Sint32>(t));
        KpSubAssoc sub;
        std::string why;
        OFCondition c = s_open_destination(sub, calling_ae, t, ASC_DEFAULTMAXPDU, plan, called_ae,
                                           host, port, layer.get(), why);
        if (c.bad()) {
            snprintf(err, errlen, "%s", why.c_str());
            if (c == EC_IllegalCall && sub.assoc) return KP_EPERM; /* no context accepted */
            return c == DUL_ASSOCIATIONREJECTED ? KP_EPERM : KP_EIO;
        }
        for (size_t i = 0; i < n; i++) {
            const KpRetrieveItem &it = plan[i];
            if (sub.broken) break;
            if (it.sop_class.empty() || it.sop_uid.empty() || it.path.empty()) {
                items[i].status = STATUS_STORE_Error_CannotUnderstand;
                snprintf(items[i].error, sizeof items[i].error, "SOP class, UID or path missing");
                continue;
            }
            std::string accepted;
            T_ASC_PresentationContextID ctx =
                s_pick_context(sub.assoc, it.sop_class, it.ts, false, accepted);
            if (!ctx) {
                items[i].status = STATUS_STORE_Refused_SOPClassNotSupported;
                snprintf(items[i].error, sizeof items[i].error,
                         "%s accepted no context for SOP class %s / syntax %s", called_ae,
                         it.sop_class.c_str(), it.ts.c_str());
                continue;
            }
            Uint16 st = 0xFFFF;
            std::string wy;
            c = s_store_instance(sub.assoc, ctx, it, accepted, nullptr, 0, t, nullptr, &st, wy);
            if (c.bad()) {
                sub.broken = true;
                snprintf(items[i].error, sizeof items[i].error, "association broke: %s", c.text());
                snprintf(err, errlen, "association to %s broke: %s", called_ae, c.text());
                break;
            }
            items[i].status = st;
            if (!wy.empty()) snprintf(items[i].error, sizeof items[i].error, "%s", wy.c_str());
        }
        return 0;
    } catch (const std::bad_alloc &) {
        snprintf(err, errlen, "out of memory");
        return KP_ENOMEM;
    } catch (...) {
        snprintf(err, errlen, "unexpected error");
        return KP_EINTERNAL;
    }
}

extern "C" int kp_dicom_tag_by_keyword(const char *keyword, uint32_t *tag)
{
    if (!keyword || !*keyword || !tag) return KP_ENOTFOUND;
    try {
        const DcmDataDictionary &dict = dcmDataDict.rdlock();
        const DcmDictEntry *e = dict.findEntry(keyword);
        int rc = KP_ENOTFOUND;
        if (e && !e->isRepeating()) {
            *tag = (static_cast<uint32_t>(e->getGroup()) << 16) | e->getElement();
            rc = 0;
        }
        dcmDataDict.rdunlock();
        return rc;
    } catch (...) {
        return KP_ENOTFOUND;
    }
}
