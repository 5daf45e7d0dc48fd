/* kp_encap: Encapsulated PDF Storage instances (SOP class 1.2.840.10008.5.1.4.1.1.104.1) over
 * DCMTK, so a rendered report travels inside its study (pacs-reporter stores it through
 * kp_ingest like any received instance: indexed, shown by OHIF, sent by C-MOVE).
 *
 * Part of the lib/dicom/ C API (see kp_dicom.h): C++ behind extern "C" functions returning 0 or
 * a negative KP_E* code; no exception crosses the boundary. Thread-safe (no shared state). */
#ifndef KP_ENCAP_H
#define KP_ENCAP_H

#include "kp_image.h" /* kp_buf_t */

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KP_ENCAP_PDF_SOP_CLASS "1.2.840.10008.5.1.4.1.1.104.1"

/* What the new instance is made of. Strings are UTF-8 and borrowed for the call. */
typedef struct kp_encap_pdf {
    const unsigned char *pdf; /* the document, pdf_len bytes (> 0) */
    size_t pdf_len;
    /* Patient, General Study and Patient Study modules are copied element by element from
     * source_path, a stored instance of the study (converted to UTF-8 first), so they match
     * the study exactly. When source_path is NULL or unreadable, or its character set cannot be
     * converted, the values below are used instead (NULL = left empty). */
    const char *source_path;
    const char *study_uid; /* required; the source must belong to this study */
    const char *patient_name, *patient_id, *birth_date, *sex;
    const char *study_date, *study_time, *accession, *study_id, *study_description,
        *referring_physician;
    /* the new series and instance */
    const char *series_uid, *sop_uid; /* required, valid UIDs */
    int series_number, instance_number;
    const char *series_description; /* e.g. "Report" */
    const char *document_title;     /* DocumentTitle (0042,0010) */
    const char *content_date;       /* DA YYYYMMDD: ContentDate, InstanceCreationDate, ... */
    const char *content_time;       /* TM HHMMSS */
    const char *manufacturer;       /* General Equipment; e.g. "Klinika PACS" */
} kp_encap_pdf_t;

/* Builds the instance as a Part 10 file in Explicit VR Little Endian: SpecificCharacterSet
 * ISO_IR 192, Modality DOC, ConversionType WSD, BurnedInAnnotation YES,
 * ConceptNameCodeSequence (LOINC 18748-4 "Diagnostic imaging report"), MIME type
 * application/pdf, EncapsulatedDocument padded with one 00H to an even length when the PDF's is
 * odd (EncapsulatedDocumentLength keeps the real length). On success *out owns the file bytes
 * (kp_buf_free()). KP_EINVAL (missing or invalid argument), KP_EMISMATCH (the source belongs to
 * another study), KP_EDICOM (DCMTK could not build or write it), KP_ENOMEM. */
int kp_encap_pdf_build(const kp_encap_pdf_t *in, kp_buf_t *out);

/* A UID derived from a name: "2.25." followed by the decimal value of a 128-bit UUID made from
 * the SHA-256 of name (version and variant bits set as for RFC 4122 name-based UUIDs), as
 * PS3.5 B.2 allows. The same name always gives the same UID, so a redone job makes the same
 * instance again instead of a second one; names that include a database row's id and creation
 * time are unique in practice. out must hold 65 bytes. 0 or KP_EINVAL. */
int kp_encap_uid_from_name(const char *name, char out[65]);

#ifdef __cplusplus
}
#endif

#endif
