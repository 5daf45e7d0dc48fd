/* kp_multipart: a streaming multipart/related parser for STOW-RS request bodies (PS3.18 10.5,
 * RFC 2046 5.1.1, RFC 2387).
 *
 * The gateway feeds the request body in chunks of any size (down to 1 byte) and receives each
 * part as part_begin (with the part's Content-Type), part_data (its body bytes, exactly as sent,
 * in order, any chunking) and part_end. Pure C: no I/O, no H2O. Memory is bounded: the part
 * header buffer (max_header_bytes) plus a count of how many bytes of a possible delimiter are
 * held back; each input byte is looked at a bounded number of times (O(n) overall).
 *
 * Design note. A delimiter is CRLF "--" boundary; the CRLF belongs to the delimiter, not to the
 * part before it. The boundary may not contain CR or LF (RFC 2046 bchars), so CR occurs only at
 * the start of the delimiter and a failed partial match always restarts from the first byte:
 * no KMP table is needed, and the held-back bytes are always a prefix of the delimiter, which
 * is known, so they are never copied. Body bytes are searched for CR with memchr and handed to
 * part_data straight from the caller's buffer. The first delimiter may also start the body or
 * follow a bare LF in the preamble. After the boundary come optional spaces/tabs and CRLF (or
 * a bare LF), or "--" for the close delimiter, after which everything (the epilogue) is
 * ignored. Part headers may end their lines with CRLF or a bare LF; folded lines are unfolded.
 * A full delimiter inside a part followed by anything else is malformed (RFC 2046 forbids the
 * boundary inside a part), whereas "--boundary<garbage>" in the preamble is just preamble. */
#ifndef KP_MULTIPART_H
#define KP_MULTIPART_H

#include <stddef.h>

#define KP_MULTIPART_BOUNDARY_MAX   70 /* RFC 2046: 1..70 characters */
#define KP_MULTIPART_HEADER_DEFAULT 8192

/* Parses a Content-Type header value such as
 * "multipart/related; type=\"application/dicom\"; boundary=XYZ" (parameters in any order,
 * case-insensitive names, quoted or token values, optional spaces; other parameters such as
 * start= or charset= are ignored). Fills boundary (1..70 RFC 2046 bchars, not ending in a
 * space; blen must be > 70 to hold any boundary) and type (the "type" parameter, lower-cased,
 * "" when absent), both NUL-terminated. Returns 0; KP_EUNSUPPORTED when value is NULL or its
 * media type is not multipart/related (STOW answers 415); KP_EINVAL when the parameters are
 * malformed, the boundary is missing, invalid, repeated or too long for blen, or the type does
 * not fit in tlen (400). */
int kp_multipart_content_type(const char *value, char *boundary, size_t blen, char *type,
                              size_t tlen);

typedef struct kp_multipart kp_multipart_t;

/* Callbacks; any may be NULL (then it is skipped). A nonzero return aborts parsing: a negative
 * value (a KP_E* code) is returned unchanged by kp_multipart_feed, a positive one becomes
 * KP_EINTERNAL. */
typedef struct kp_multipart_cb {
    /* A part begins; ctype is its Content-Type value (unfolded, trimmed, "" when absent),
     * borrowed until the callback returns. Other headers (Content-Location, Content-Length,
     * Content-Transfer-Encoding, ...) are checked for syntax and otherwise ignored. */
    int (*part_begin)(void *user, const char *ctype);
    /* Body bytes of the current part (borrowed), in order, any chunking, never n == 0. */
    int (*part_data)(void *user, const unsigned char *p, size_t n);
    /* The current part is complete: its closing delimiter line was seen. Not called for a
     * part cut short by an error or by the end of the input. */
    int (*part_end)(void *user);
    void *user;
} kp_multipart_cb_t;

/* A parser for the given boundary (without the leading "--"); cb is copied (NULL: no
 * callbacks). max_header_bytes bounds the header block of each part including its line ends
 * and the blank line (0: KP_MULTIPART_HEADER_DEFAULT). Returns NULL when the boundary is not
 * 1..70 RFC 2046 bchars. Caller owns the result (kp_multipart_destroy). */
kp_multipart_t *kp_multipart_new(const char *boundary, const kp_multipart_cb_t *cb,
                                 size_t max_header_bytes);

/* Feeds the next n bytes of the body (borrowed; n may be 0). Returns 0 when fine so far;
 * KP_EINVAL when malformed (a part header block over max_header_bytes, a header line that is
 * not "name: value" or a folded continuation, control characters in a header, anything but
 * padding and a line end or "--" after a delimiter inside the body); or a callback's abort
 * value (see kp_multipart_cb_t). Errors are sticky: later calls return the same code and make
 * no callbacks. Bytes after the close delimiter (the epilogue) are ignored. */
int kp_multipart_feed(kp_multipart_t *m, const unsigned char *p, size_t n);

/* End of input. Returns 0 when the close delimiter "--boundary--" was seen after at least one
 * part; KP_EINVAL when the body was truncated (in the preamble, a part header or a part body)
 * or closed without any part; the sticky error after a failed feed. A caller then fails the
 * part in progress, if any (part_begin without part_end). */
int kp_multipart_finish(kp_multipart_t *m);

/* Parts completed so far (part_end reached). */
int kp_multipart_nparts(const kp_multipart_t *m);

/* Frees the parser; idempotent, clears *m. */
void kp_multipart_destroy(kp_multipart_t **m);

#endif
