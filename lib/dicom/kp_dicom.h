/* kp_dicom: the one C API over DCMTK (reading DICOM files, DICOM JSON, the Storage SCP).
 *
 * Everything else in Klinika is C11; this header is the whole surface of lib/dicom/, whose
 * implementation (kp_dicom.cc) is the only C++ in the tree. Handles are opaque, results are
 * 0 or a negative KP_E* code (kp_errors.h), and no C++ exception ever crosses this boundary.
 *
 * Threads: call kp_dicom_init() once before starting threads. A kp_dicom_file_t is not
 * thread-safe (use one per thread); different files may be used from different threads.
 * kp_dicom_scp_run() runs on the calling thread and serves each association on its own thread. */
#ifndef KP_DICOM_H
#define KP_DICOM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Once at start-up, before threads: routes DCMTK's log into kp_log, checks that the data
 * dictionary is loaded (a clear error if not), registers the JPEG, JPEG-LS and RLE codecs and
 * sets TCP_NODELAY=1 in the environment (read by DCMTK for every DICOM socket).
 * 0 or KP_EINTERNAL. Idempotent. */
int kp_dicom_init(void);
/* Unregisters the codecs; call after all threads using DICOM are joined. */
void kp_dicom_shutdown(void);

typedef struct kp_dicom_file kp_dicom_file_t; /* opaque */

/* Opens a Part 10 file (or a raw data set) without loading large values: values over 4 KiB
 * (PixelData among them) stay on disk and are only read if asked for. If the data set declares
 * a Specific Character Set other than ISO_IR 192 / ISO_IR 6, its values are converted to UTF-8;
 * when that fails (e.g. ISO 2022 IR 87) the raw values are kept, kp_dicom_charset_fallback()
 * returns 1 and a warning is logged; the open still succeeds.
 * Returns a new handle (caller closes it), or NULL with *err (may be NULL) set to KP_EIO
 * (missing/unreadable file), KP_EDICOM (not DICOM, truncated, empty data set) or KP_EINVAL. */
kp_dicom_file_t *kp_dicom_open(const char *path, int *err);
/* Frees the handle and every string borrowed from it; idempotent, sets *f to NULL. */
void kp_dicom_close(kp_dicom_file_t **f);
/* 1 when the character set conversion failed and raw (not UTF-8) values were kept, else 0. */
int kp_dicom_charset_fallback(const kp_dicom_file_t *f);

/* Value of a top-level element (tag = (group << 16) | element) as text: all values joined by
 * '\\' as DICOM encodes them, trailing spaces trimmed; numbers (US, UL, SS, SL, FL, FD, IS, DS,
 * ...) as their text; a byte that is not valid UTF-8 read as ISO 8859-1. "" for an element present
 * with an empty value. NULL when absent, and for SQ and binary VRs (OB, OD, OF, OL, OV, OW, UN),
 * which are not text. Tags of group 0002 are read from the File Meta Information (e.g.
 * 0x00020016, SourceApplicationEntityTitle: the AE that sent the file to us). Borrowed from f:
 * valid until kp_dicom_close(). */
const char *kp_dicom_get(kp_dicom_file_t *f, uint32_t tag);
/* Same for the element item_tag in the first item of the top-level sequence seq_tag; NULL when
 * the sequence, its first item or the element is absent. Borrowed from f. */
const char *kp_dicom_get_in_seq(kp_dicom_file_t *f, uint32_t seq_tag, uint32_t item_tag);
/* Transfer syntax UID of the data set as stored: (0002,0010) of the meta header, or for a file
 * without one the syntax DCMTK detected; "" if unknown. Borrowed from f. */
const char *kp_dicom_transfer_syntax(kp_dicom_file_t *f);

/* Byte offset in the file of the VALUE of the top-level PixelData (7FE0,0010) and its length
 * (-1 for undefined length, i.e. encapsulated: the offset is then that of the first item tag).
 * Nothing is read into memory. Returns 0, or KP_ENOTFOUND when there is no pixel data or the
 * data set is deflated (the value then has no offset in the file), KP_EIO on a read error.
 * How: DCMTK records the file offset of every value it left on disk (the element's input
 * stream factory); when the value was small enough to be loaded, the offset is found by
 * walking the file's top-level element headers (skipping nested sequences) up to 7FE0,0010. */
int kp_dicom_pixel_location(kp_dicom_file_t *f, int64_t *offset, int64_t *length);

/* The value of the element at tagpath (the path of a BulkDataURI: "00420011", or nested
 * "00540016/0/00181072") in the open file f, for WADO-RS bulk data. When the value lies in the
 * file unencoded and little endian, *offset / *length give its place and *mem is NULL (send it
 * from the file); otherwise *mem is a malloc'd little-endian copy of *length bytes (caller
 * frees). Returns 0, KP_EINVAL (malformed path), KP_ENOTFOUND (no such element, item or a
 * sequence), KP_EUNSUPPORTED (encapsulated pixel data, which is retrieved as frames, or an
 * undefined length), KP_EIO, KP_ENOMEM. */
int kp_dicom_bulk(kp_dicom_file_t *f, const char *tagpath, int64_t *offset, int64_t *length,
                  unsigned char **mem);

/* The data set (never the File Meta Information, like dcm2json without +m) as one compact DICOM
 * JSON object (PS3.18 F), UTF-8 (a byte that is not valid UTF-8 read as ISO 8859-1). Returns a
 * malloc'd string the caller frees, or NULL on error. Every element is written exactly as DCMTK's
 * dcm2json writes it, except:
 *  - PixelData (7FE0,0010, also 7FE0,0008 / 7FE0,0009) with a non-empty value, at any depth, and
 *    every other binary value (VR OB, OD, OF, OL, OV, OW, UN) longer than bulk_threshold bytes,
 *    is written as {"vr":..,"BulkDataURI":"<uri_prefix>/bulkdata/<tagpath>"} and never read;
 *  - tagpath: 8 uppercase hex digits per element; for a nested element the sequence tag, the
 *    0-based item index and the element tag joined by '/', e.g. 00540016/0/00181072;
 *  - group lengths (gggg,0000) are left out, as dcm2json does;
 *  - should DCMTK refuse to encode an element, its values are written as JSON strings instead
 *    of failing the whole object (DCMTK 3.6.7 already writes invalid DS/IS values as strings).
 * uri_prefix may be NULL (treated as ""). */
char *kp_dicom_json(kp_dicom_file_t *f, const char *uri_prefix, size_t bulk_threshold);

/* ---- Storage, Query and Retrieve SCP (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET) ---- */

typedef struct {
    const char *calling_ae, *called_ae, *peer_host; /* peer_host: IP address, no DNS lookup */
    const char *sop_class_uid, *sop_instance_uid;   /* from the C-STORE-RQ command set */
    const char *transfer_syntax_uid;                /* of the accepted presentation context */
    const char *tmp_path; /* Part 10 file (meta header + data set exactly as received, not
                           * fsync'ed) in cfg->tmp_dir. The callback owns it: it must rename or
                           * unlink it (and fsync it if it needs durability). */
} kp_dicom_store_req_t;

/* Called on an association thread for every C-STORE after the data set is fully in tmp_path;
 * returns the DIMSE status to send (0x0000 success, or e.g. 0xA700/0xC000/0xA900/0x0111).
 * Called concurrently from several threads. All strings in req are borrowed for the call. */
typedef unsigned (*kp_dicom_store_fn)(void *user, const kp_dicom_store_req_t *req);

/* Association acceptance: return 0 to accept, 1 to reject "calling AE not recognized", 2 to
 * reject "called AE not recognized". May be NULL (accept all). Called on an association thread. */
typedef int (*kp_dicom_assoc_fn)(void *user, const char *calling_ae, const char *called_ae,
                                 const char *peer_host);

/* The same decision with more about the association (borrowed for the call). */
typedef struct {
    const char *calling_ae, *called_ae, *peer_host;
    int tls; /* 1: the association came in on the DICOM TLS listener (the handshake succeeded,
              * so a client certificate, if required, verified) */
} kp_dicom_assoc_info_t;
typedef int (*kp_dicom_assoc_info_fn)(void *user, const kp_dicom_assoc_info_t *info);

/* ---- Query SCP (C-FIND) ---- */

/* Information models (the SOP class of the presentation context). */
#define KP_DICOM_FIND_PATIENT_ROOT 1 /* 1.2.840.10008.5.1.4.1.2.1.1 */
#define KP_DICOM_FIND_STUDY_ROOT   2 /* 1.2.840.10008.5.1.4.1.2.2.1 */

/* One top-level attribute of a C-FIND identifier. value is UTF-8 (the identifier is converted
 * from its Specific Character Set first), leading and trailing spaces removed, multiple values
 * joined by '\\' as DICOM encodes them; "" for a zero-length (universal / return) key. Sequence
 * keys are passed with vr "SQ" and value "" (sequence matching is not supported). */
typedef struct {
    uint32_t tag;
    char vr[3];
    const char *value;
} kp_dicom_find_key_t;

typedef struct {
    const char *calling_ae, *called_ae, *peer_host;
    int model;                       /* KP_DICOM_FIND_PATIENT_ROOT or KP_DICOM_FIND_STUDY_ROOT */
    const char *level;               /* QueryRetrieveLevel as sent (trimmed); NULL when absent */
    int combined_datetime;           /* 1 when the SCU negotiated combined date-time matching */
    const kp_dicom_find_key_t *keys; /* every other top-level key (never 0008,0005/0008,0052) */
    size_t nkeys;
} kp_dicom_find_req_t;

typedef struct kp_dicom_find_results kp_dicom_find_results_t; /* opaque, owned by the shim */

/* Starts a new result (a C-FIND-RSP Pending identifier). Every key of the request is in it,
 * zero-length, plus QueryRetrieveLevel, SpecificCharacterSet "ISO_IR 192" and RetrieveAETitle.
 * 0 or KP_ENOMEM. */
int kp_dicom_find_add_result(kp_dicom_find_results_t *out);
/* Sets an attribute of the current result to text (UTF-8, values joined by '\\'); NULL or ""
 * leaves it zero-length. A tag the request did not ask for is added with its dictionary VR.
 * 0, KP_EINVAL (no current result, unknown tag, a value the VR cannot hold) or KP_ENOMEM. */
int kp_dicom_find_set(kp_dicom_find_results_t *out, uint32_t tag, const char *text);
/* Error Comment (0000,0902) sent with the final response (at most 64 characters are kept). */
void kp_dicom_find_set_comment(kp_dicom_find_results_t *out, const char *text);

/* Called on an association thread for every C-FIND; adds its matches to out and returns the
 * final status: 0x0000 (every match is sent as Pending, then Success), or a failure (0xA700,
 * 0xA900, 0xC000, 0x0124 ...): the matches added so far are still sent as Pending first (used
 * when a result limit is hit). A C-CANCEL between two Pending responses stops the sending with
 * status 0xFE00. Called concurrently from several threads; req is borrowed for the call. */
typedef unsigned (*kp_dicom_find_fn)(void *user, const kp_dicom_find_req_t *req,
                                     kp_dicom_find_results_t *out);

/* ---- Retrieve SCP (C-MOVE, C-GET) ---- */

/* Retrieve SOP classes (the presentation context's), same model numbers as FIND. */
#define KP_DICOM_MOVE 1 /* C-MOVE: Patient Root .2.1.2, Study Root .2.2.2 */
#define KP_DICOM_GET  2 /* C-GET:  Patient Root .2.1.3, Study Root .2.2.3 */

typedef struct {
    const char *calling_ae, *called_ae, *peer_host;
    int op;                          /* KP_DICOM_MOVE or KP_DICOM_GET */
    int model;                       /* KP_DICOM_FIND_PATIENT_ROOT or KP_DICOM_FIND_STUDY_ROOT */
    const char *level;               /* QueryRetrieveLevel as sent (trimmed); NULL when absent */
    const char *move_destination;    /* C-MOVE: Move Destination AE title (trimmed); GET: NULL */
    const kp_dicom_find_key_t *keys; /* every other top-level key of the identifier (UTF-8) */
    size_t nkeys;
} kp_dicom_retrieve_req_t;

typedef struct kp_dicom_retrieve_plan kp_dicom_retrieve_plan_t; /* opaque, owned by the shim */

/* Adds one instance to send: its SOP class ("" when unknown: its sub-operation then fails) and
 * instance UIDs, the transfer syntax it is stored in ("" when unknown: it is then always
 * transcoded), the absolute path of its Part 10 file and its Study Instance UID (for the audit
 * summary). Strings are copied. 0, KP_EINVAL (NULL or empty instance UID or path, a UID longer
 * than 64 characters) or KP_ENOMEM. */
int kp_dicom_retrieve_add(kp_dicom_retrieve_plan_t *plan, const char *sop_class_uid,
                          const char *sop_instance_uid, const char *transfer_syntax_uid,
                          const char *path, const char *study_uid);
/* C-MOVE: where the Move Destination listens (copied). Required for a C-MOVE that returns
 * 0x0000. 0 or KP_EINVAL. */
int kp_dicom_retrieve_set_destination(kp_dicom_retrieve_plan_t *plan, const char *host, int port);
/* C-MOVE: open the association to the destination over DICOM TLS (kp_dicom_scp_config_t
 * tls settings as the client side). Without kp_dicom_scp_config_t tls_client set up, such a
 * C-MOVE fails its sub-operations with a clear comment. */
void kp_dicom_retrieve_set_tls(kp_dicom_retrieve_plan_t *plan, int tls);
/* C-MOVE: how many associations to the destination the sub-operations may use at once (1 to
 * 16; default 1, one after another over one association). With n > 1 the first association is
 * opened as usual and up to n - 1 more are opened alongside it; each sends the next instance
 * of the plan as soon as it is free. One the destination refuses or does not answer is left
 * out: the others carry on. Values outside 1..16 are clamped. */
void kp_dicom_retrieve_set_associations(kp_dicom_retrieve_plan_t *plan, int n);
/* Error Comment (0000,0902) sent with a refusal (at most 64 characters are kept). */
void kp_dicom_retrieve_set_comment(kp_dicom_retrieve_plan_t *plan, const char *text);

/* Called on an association thread for every C-MOVE and C-GET before any sub-operation: checks
 * access, resolves the identifier into instances (kp_dicom_retrieve_add) and, for a C-MOVE, the
 * destination. Returns 0x0000 to go ahead, or the status that refuses the request (0x0124 not
 * authorized, 0xA801 move destination unknown, 0xA900 identifier does not match the SOP class,
 * 0xA701 / 0xA700 out of resources, 0xC000 ...), sent as the only response. Called
 * concurrently from several threads; req is borrowed for the call. */
typedef unsigned (*kp_dicom_retrieve_fn)(void *user, const kp_dicom_retrieve_req_t *req,
                                         kp_dicom_retrieve_plan_t *plan);

/* What a C-MOVE / C-GET ended with, handed to kp_dicom_retrieve_done_fn. */
typedef struct {
    unsigned status; /* the final DIMSE status sent (or that would have been sent) */
    unsigned completed, failed, warning, remaining; /* sub-operation counts */
    unsigned long long bytes_sent; /* of the instances sent (stored files, or transcoded) */
    const char *const *study_uids; /* distinct Study Instance UIDs of the plan, in order */
    size_t nstudies;
    const char *error; /* a short reason for a refusal or failure, "" when none */
} kp_dicom_retrieve_result_t;

/* Called once per C-MOVE / C-GET after the final response (also for refusals), on the
 * association thread: for audit events. Borrowed arguments. May be NULL. */
typedef void (*kp_dicom_retrieve_done_fn)(void *user, const kp_dicom_retrieve_req_t *req,
                                          const kp_dicom_retrieve_result_t *res);

/* DICOM TLS (PS3.15 B.9 BCP 195 non-downgrading profile: TLS 1.2 or newer, AES-GCM with
 * (EC)DHE). Paths are PEM files; strings are borrowed for the duration of the call using it. */
typedef struct {
    const char *cert_file; /* our certificate (chain); a client may leave it NULL (none sent) */
    const char *key_file;  /* its private key (unencrypted) */
    const char *ca_file;   /* trusted CA certificates the peer's certificate is verified against */
    int require_peer_cert; /* server side: 1 = a client without a certificate is refused; a
                            * certificate a client does present is always verified. A client
                            * always requires and verifies the server's certificate. */
} kp_dicom_tls_t;

typedef struct {
    const char *ae_title; /* our AE title, sent back in the A-ASSOCIATE-AC */
    int port;             /* 1..65535 */
    int max_pdu;          /* max receive PDU length, clamped to 4096..131072 (<= 0: 16384) */
    int max_associations; /* concurrent associations; more are rejected (transient) (<= 0: 1) */
    int acse_timeout;     /* seconds (<= 0: 30) */
    int dimse_timeout;    /* seconds without data before an association is aborted (<= 0: none) */
    const char *tmp_dir;  /* where received files are written (same filesystem as storage) */
    long long min_free_bytes; /* a C-STORE arriving while tmp_dir's file system has less free
                               * space is refused with A700 before its data set is read (so the
                               * association goes on); 0 = no check */
    kp_dicom_store_fn on_store;
    kp_dicom_assoc_fn on_assoc;
    kp_dicom_assoc_info_fn on_assoc_info; /* used instead of on_assoc when set (may be NULL) */
    kp_dicom_find_fn on_find; /* may be NULL: the C-FIND SOP classes are then not accepted */
    kp_dicom_retrieve_fn on_retrieve; /* may be NULL: MOVE and GET SOP classes not accepted */
    kp_dicom_retrieve_done_fn on_retrieve_done; /* may be NULL */
    void *user;
    volatile int *stop; /* run until *stop becomes non-zero */
    /* DICOM TLS: tls_port > 0 adds a second listener on that port, served by the same
     * association pool (max_associations counts both), with tls as the server side (cert_file,
     * key_file and ca_file required). tls is also the client side of C-MOVE sub-operations to
     * destinations flagged with kp_dicom_retrieve_set_tls() (our certificate, the destination's
     * verified against ca_file); those need cert/key/ca even when tls_port is 0. */
    int tls_port;
    kp_dicom_tls_t tls;
} kp_dicom_scp_config_t;

/* Listens on all addresses (sockets FD_CLOEXEC) and serves up to max_associations associations
 * at once, one thread each, accepting every storage SOP class DCMTK knows plus Verification, in
 * uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE, MPEG-2/4 and HEVC transfer syntaxes
 * (uncompressed preferred when the SCU offers a choice), and, when on_find is set, the Patient
 * Root and Study Root FIND SOP classes in uncompressed syntaxes (extended negotiation: combined
 * date-time matching accepted, relational queries refused), and, when on_retrieve is set, the
 * Patient Root and Study Root MOVE and GET SOP classes in uncompressed syntaxes; storage SOP
 * classes proposed with the SCP role (for C-GET) are accepted with that role. C-MOVE
 * sub-operations go over a new association from ae_title to the destination (proposing, per SOP
 * class, the stored transfer syntax and Explicit / Implicit VR Little Endian), C-GET ones over
 * the requesting association; an instance is transcoded (kp_image_transcode) when the accepted
 * syntax differs from the stored one. One Pending response per sub-operation; C-CANCEL is
 * checked between them. Data sets are received straight into
 * a file, bit for bit, never parsed in memory. A transfer that breaks off leaves no file and
 * no on_store call. Sets DCMTK's process-wide socket timeouts to dimse_timeout (when > 0) and
 * turns off its reverse DNS lookups.
 * Stop: the accept loop checks *stop every 250 ms; idle associations see it within 1 s and are
 * closed; 1 s after the stop, connections still busy (mid-transfer) are cut (the SCU sees the
 * connection drop; nothing is stored). Returns once every association thread is joined: 0
 * after a clean stop, KP_EIO if a port (plain or TLS) cannot be bound, KP_EINVAL for a bad
 * config (TLS files missing, unreadable or a key not matching its certificate included, with
 * the reason logged), KP_EINTERNAL on an unexpected error. A connection waits (without
 * blocking anyone) until its whole A-ASSOCIATE-RQ has arrived, at most acse_timeout, then the
 * accept loop reads it at once; on the TLS port the loop also runs the handshake once the
 * ClientHello is in (a client certificate that does not verify ends there), so a TLS peer that
 * stalls mid-handshake delays the next accept by up to dimse_timeout. */
int kp_dicom_scp_run(const kp_dicom_scp_config_t *cfg);

/* ---- Verification SCU ---- */

/* Sends a C-ECHO from calling_ae to called_ae at host:port (timeout_s for connecting and for
 * each message). 0 on a successful echo; otherwise KP_ETIMEOUT, KP_EIO (no connection),
 * KP_EPERM (association rejected) or KP_EDICOM (the peer answered with a failure), with a
 * one-line reason in err (may be NULL). Safe to call from any thread. */
int kp_dicom_echo(const char *host, int port, const char *calling_ae, const char *called_ae,
                  int timeout_s, char *err, size_t errlen);
/* The same over DICOM TLS when tls is not NULL (client side: our certificate from
 * tls->cert_file / key_file if given, the peer's verified against tls->ca_file). A failed
 * handshake (untrusted certificate, no common protocol) is KP_EIO with the reason in err;
 * unreadable or mismatched key / certificate files are KP_EINVAL. */
int kp_dicom_echo_tls(const char *host, int port, const char *calling_ae, const char *called_ae,
                      int timeout_s, const kp_dicom_tls_t *tls, char *err, size_t errlen);

/* ---- Storage SCU (pacs-router) ---- */

/* One instance to send with kp_dicom_store_scu(): in: its SOP class and instance UIDs, the
 * transfer syntax it is stored in ("" when unknown: then always transcoded) and the absolute
 * path of its Part 10 file; out: the peer's DIMSE status (0x0000 success, 0xBxxx warning), or
 * 0xFFFF when it was not sent (association broke or never opened), or a failure status of ours
 * (0xC000 / 0x0122) with the reason in error. */
typedef struct {
    const char *sop_class_uid, *sop_instance_uid, *transfer_syntax_uid, *path;
    unsigned status;
    char error[160];
} kp_dicom_store_item_t;

/* Sends n instances with C-STORE over one association from calling_ae to called_ae at
 * host:port (over DICOM TLS when tls is not NULL, as kp_dicom_echo_tls), negotiated the way
 * C-MOVE sub-operations are (the same code): per SOP class the stored compressed syntax and
 * Explicit / Implicit VR Little Endian are proposed, and an instance whose stored syntax was not
 * accepted is transcoded (kp_image_transcode) to the best accepted one. timeout_s bounds the
 * connection and each message. Returns 0 when the association was opened (each item's status
 * says how it went; items after a broken association stay 0xFFFF), or KP_EIO (no connection,
 * TLS handshake failed), KP_EPERM (association rejected), KP_EINVAL (bad arguments or TLS
 * files), KP_ENOMEM, KP_EINTERNAL, with the reason in err. Safe from any thread. */
int kp_dicom_store_scu(const char *host, int port, const char *calling_ae, const char *called_ae,
                       int timeout_s, const kp_dicom_tls_t *tls, kp_dicom_store_item_t *items,
                       size_t n, char *err, size_t errlen);

/* The tag of a data dictionary keyword ("PatientName" -> 0x00100010). 0, or KP_ENOTFOUND. */
int kp_dicom_tag_by_keyword(const char *keyword, uint32_t *tag);

#ifdef __cplusplus
}
#endif

#endif
