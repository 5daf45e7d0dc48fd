/* kp_frames: locating frames in stored files and choosing what to send (see kp_frames.h). */
#include "kp_frames.h"

#include "kp_errors.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

int kp_frames_parse_list(const char *s, long *out, int max)
{
    int n = 0;
    if (!s || !*s) return -1;
    while (*s) {
        if (*s < '0' || *s > '9' || n >= max) return -1;
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (errno || v < 1 || v > 100000000L) return -1;
        out[n++] = v;
        if (*end == ',')
            s = end + 1;
        else if (*end == 0)
            s = end;
        else
            return -1;
        if (*end == ',' && !*s) return -1; /* trailing comma */
    }
    return n;
}

static int s_read_at(int fd, int64_t off, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = pread(fd, (char *)buf + got, len - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return KP_EIO;
        if (r == 0) return KP_EDICOM; /* the file ends inside an item */
        got += (size_t)r;
    }
    return 0;
}

static uint32_t s_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Reads an item header at off: 1 for an item (length in *len), 0 for the sequence delimiter. */
static int s_item(int fd, int64_t off, uint32_t *len)
{
    unsigned char h[8];
    int rc = s_read_at(fd, off, h, sizeof h);
    if (rc) return rc;
    uint32_t tag = (uint32_t)(h[0] | h[1] << 8) << 16 | (uint32_t)(h[2] | h[3] << 8);
    *len = s_le32(h + 4);
    if (tag == 0xFFFEE000u) return *len == 0xFFFFFFFFu ? KP_EDICOM : 1;
    if (tag == 0xFFFEE0DDu) return 0;
    return KP_EDICOM;
}

int kp_frames_locate(int fd, int64_t pix_off, int64_t pix_len, long nframes, int64_t frame_size,
                     long frame, kp_range_t *ranges, size_t max, size_t *n)
{
    *n = 0;
    if (nframes < 1) nframes = 1;
    if (frame < 1 || frame > nframes || max < 1) return KP_ENOTFOUND;
    if (pix_len >= 0) { /* native */
        if (frame_size <= 0) return KP_EDICOM;
        int64_t start = (int64_t)(frame - 1) * frame_size;
        if (start + frame_size > pix_len) return KP_ENOTFOUND;
        ranges[0] = (kp_range_t){pix_off + start, frame_size};
        *n = 1;
        return 0;
    }
    /* Encapsulated: the Basic Offset Table item, then fragments until the delimiter. */
    uint32_t bot_len;
    int rc = s_item(fd, pix_off, &bot_len);
    if (rc != 1) return rc < 0 ? rc : KP_EDICOM;
    if (bot_len % 4 || bot_len / 4 > 1000000u) return KP_EDICOM;
    int64_t first = pix_off + 8 + bot_len; /* first fragment item; BOT offsets count from it */
    int64_t want_lo = -1, want_hi = -1;    /* [lo, hi) relative to first, from the table */
    uint32_t nbot = bot_len / 4;
    if (nbot && nframes > 1) {
        if (nbot != (uint32_t)nframes) return KP_EDICOM;
        unsigned char b[8];
        if ((rc = s_read_at(fd, pix_off + 8 + (int64_t)(frame - 1) * 4, b, 4))) return rc;
        want_lo = s_le32(b);
        if (frame < nframes) {
            if ((rc = s_read_at(fd, pix_off + 8 + (int64_t)frame * 4, b, 4))) return rc;
            want_hi = s_le32(b);
            if (want_hi <= want_lo) return KP_EDICOM;
        }
    }
    int64_t pos = first;
    long index = 0; /* fragment number, 0-based */
    for (;;) {
        uint32_t len;
        rc = s_item(fd, pos, &len);
        if (rc < 0) return rc;
        if (rc == 0) break; /* sequence delimiter */
        int64_t rel = pos - first;
        bool mine;
        if (nframes == 1)
            mine = true; /* every fragment belongs to the only frame */
        else if (want_lo >= 0)
            mine = rel >= want_lo && (want_hi < 0 || rel < want_hi);
        else
            mine = index == frame - 1; /* no table: one fragment per frame, checked below */
        if (mine) {
            if (*n >= max) return KP_EUNSUPPORTED;
            ranges[(*n)++] = (kp_range_t){pos + 8, len};
        }
        pos += 8 + (int64_t)len;
        index++;
        if (index > 10000000L) return KP_EDICOM;
        if (want_hi >= 0 && rel >= want_hi) break;
    }
    if (nframes > 1 && want_lo < 0 && index != nframes)
        return KP_EUNSUPPORTED; /* fragments do not map one-to-one onto frames */
    return *n ? 0 : KP_ENOTFOUND;
}

bool kp_frames_native(const char *ts)
{
    return ts && (!strcmp(ts, "1.2.840.10008.1.2") || !strcmp(ts, "1.2.840.10008.1.2.1") ||
                  !strcmp(ts, "1.2.840.10008.1.2.2") || !strcmp(ts, "1.2.840.10008.1.2.1.99"));
}

const char *kp_frames_media_type(const char *ts)
{
    static const struct {
        const char *ts, *media;
    } map[] = {
        {"1.2.840.10008.1.2.4.50", "image/jpeg"}, {"1.2.840.10008.1.2.4.51", "image/jpeg"},
        {"1.2.840.10008.1.2.4.57", "image/jpeg"}, {"1.2.840.10008.1.2.4.70", "image/jpeg"},
        {"1.2.840.10008.1.2.4.80", "image/jls"},  {"1.2.840.10008.1.2.4.81", "image/jls"},
        {"1.2.840.10008.1.2.4.90", "image/jp2"},  {"1.2.840.10008.1.2.4.91", "image/jp2"},
        {"1.2.840.10008.1.2.5", "image/x-dicom-rle"},
    };
    for (size_t i = 0; ts && i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(map[i].ts, ts)) return map[i].media;
    return "application/octet-stream";
}

/* The value of parameter `name` in one media range (up to ',' or end), unquoted, into out. */
static bool s_param(const char *range, size_t rlen, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    for (const char *p = range; p + nl < range + rlen; p++) {
        if (strncasecmp(p, name, nl) || p[nl] != '=') continue;
        if (p > range && p[-1] != ';' && p[-1] != ' ' && p[-1] != '"') continue;
        const char *v = p + nl + 1, *e = range + rlen;
        if (*v == '"') v++;
        size_t n = 0;
        while (v + n < e && v[n] != ';' && v[n] != '"' && v[n] != ',' && n + 1 < outlen) n++;
        memcpy(out, v, n);
        out[n] = 0;
        while (n && out[n - 1] == ' ') out[--n] = 0;
        return true;
    }
    return false;
}

bool kp_frames_acceptable(const char *accept, const char *ts, const char *media)
{
    if (!accept || !*accept) return true;
    const char *p = accept;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        /* a comma inside a quoted type="a, b" cannot happen in the forms clients send */
        while (len && *p == ' ') p++, len--;
        char syntax[80] = "", type[80] = "";
        bool has_ts = s_param(p, len, "transfer-syntax", syntax, sizeof syntax);
        bool has_type = s_param(p, len, "type", type, sizeof type);
        if (!strncmp(p, "*/*", 3) && !has_ts) return true;
        bool multipart = !strncasecmp(p, "multipart/related", 17);
        const char *mt = multipart ? (has_type ? type : NULL) : p;
        size_t mtl = mt ? strcspn(mt, ";, ") : 0;
        bool media_ok = !mt || !strncmp(mt, "*/*", 3) ||
                        (!strcmp(media, "dicom") && !strncmp(mt, "application/dicom", mtl) &&
                         mtl == 17) ||
                        (!strcmp(media, "frames") &&
                         ((mtl == 24 && !strncmp(mt, "application/octet-stream", 24)) ||
                          (mtl == strlen(kp_frames_media_type(ts)) &&
                           !strncmp(mt, kp_frames_media_type(ts), mtl))));
        if (media_ok) {
            if (!has_ts || !strcmp(syntax, "*") || !strcmp(syntax, ts)) {
                /* octet-stream without a syntax means Explicit VR Little Endian (native) */
                if (!has_ts && !strcmp(media, "frames") && mt &&
                    !strncmp(mt, "application/octet-stream", 24))
                    return kp_frames_native(ts) && strcmp(ts, "1.2.840.10008.1.2.2");
                return true;
            }
            if (!strcmp(media, "frames") && kp_frames_native(ts) &&
                strcmp(ts, "1.2.840.10008.1.2.2") &&
                (!strcmp(syntax, "1.2.840.10008.1.2.1") || !strcmp(syntax, "1.2.840.10008.1.2")))
                return true; /* same pixel bytes in either little-endian syntax */
        }
        if (!e) break;
        p = e + 1;
    }
    return false;
}

const char *kp_frames_choose(const char *accept, const char *ts, const char *media,
                             const char *const *producible)
{
    if (kp_frames_acceptable(accept, ts, media)) return ts;
    if (!producible || !accept) return NULL;
    const char *p = accept;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        while (len && *p == ' ') p++, len--;
        char syntax[80] = "", type[80] = "";
        bool has_ts = s_param(p, len, "transfer-syntax", syntax, sizeof syntax);
        bool has_type = s_param(p, len, "type", type, sizeof type);
        bool multipart = !strncasecmp(p, "multipart/related", 17);
        const char *mt = multipart ? (has_type ? type : NULL) : p;
        size_t mtl = mt ? strcspn(mt, ";, ") : 0;
        bool dicom = !strcmp(media, "dicom");
        bool media_ok = !mt || (mtl == 3 && !strncmp(mt, "*/*", 3)) ||
                        (dicom && mtl == 17 && !strncmp(mt, "application/dicom", 17)) ||
                        (!dicom && mtl == 24 && !strncmp(mt, "application/octet-stream", 24));
        /* No transfer-syntax parameter means the default: Explicit VR Little Endian. */
        const char *want = has_ts ? syntax : "1.2.840.10008.1.2.1";
        if (media_ok && strcmp(want, "*"))
            for (size_t i = 0; producible[i]; i++)
                if (!strcmp(producible[i], want)) return producible[i];
        if (!e) break;
        p = e + 1;
    }
    return NULL;
}
