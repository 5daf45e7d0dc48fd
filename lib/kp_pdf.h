/* kp_pdf: renders one version of a doctor's report to PDF (libharu), for pacs-reporter.
 *
 * A pure function: a kp_pdf_report_t (every text UTF-8, every value already read from the
 * database) in, PDF bytes out; no database, no globals, so it is unit-tested directly and the
 * same input always gives the same bytes (no creation date or random id is written; times come
 * from the input). A4 portrait, the DejaVu Sans TrueType family embedded (Cyrillic, accents,
 * everything DejaVu covers), letterhead (optional logo, clinic name, address lines) on the first
 * page and a one-line running header on the others, a patient and study block, the five sections
 * in their fixed order (empty ones left out) with headings in the report's language, a signature
 * line (or a DRAFT label and a diagonal DRAFT watermark on every page when unsigned), and
 * "Page X of Y" on every page (filled in once the page count is known).
 *
 * Text layout is ours (libharu only places strings): words are measured with the font they are
 * drawn in, lines are filled greedily, a word longer than a line is broken between characters,
 * and a line that does not fit the page goes to the next one, so nothing is ever cut off.
 *
 * Markup (the subset the reports API accepts, docs/reports.md): a blank line separates
 * paragraphs, a single line break is kept as a line break, a line starting with "- " is a bullet
 * item, **bold** and *italic* (within one line; an opening marker must be followed by a
 * non-space and a closing one preceded by a non-space, otherwise the asterisks are printed as
 * they are), \* and \\ for a literal * and \. Nothing else is interpreted: every other
 * character (<, &, a lone \ ...) is printed as it is.
 *
 * Dates: en 2026-11-27 (ISO 8601), ru and de 27.11.2026, es and fr 27/11/2026; times 24-hour
 * HH:MM followed by the time zone abbreviation of the process (TZ). */
#ifndef KP_PDF_H
#define KP_PDF_H

#include <stddef.h>
#include <stdint.h>

/* The sections of a report, in the order they are printed (the JSON keys of
 * report_versions.sections are kp_pdf_section_key()). */
typedef enum {
    KP_PDF_CLINICAL = 0,
    KP_PDF_TECHNIQUE,
    KP_PDF_FINDINGS,
    KP_PDF_IMPRESSION,
    KP_PDF_RECOMMENDATIONS,
    KP_PDF_NSECTIONS
} kp_pdf_section_t;

/* Everything printed. Every string is UTF-8, borrowed for the call, and may be NULL or "" when
 * unknown (the line is then left out). */
typedef struct kp_pdf_report {
    const char *language; /* "en", "ru", "es", "fr", "de"; anything else prints English */
    /* letterhead */
    const char *font_dir;       /* holds DejaVuSans.ttf, -Bold, -Oblique, -BoldOblique */
    const char *clinic_name;    /* printed large at the top of page 1 */
    const char *clinic_address; /* lines separated by '|' or newlines */
    const char *logo_path;      /* PNG or JPEG; an unreadable file is logged and left out */
    /* patient and study, in their DICOM forms */
    const char *patient_name;        /* PN: "Doe^John" is printed "Doe, John" */
    const char *patient_id;          /* */
    const char *birth_date;          /* DA: YYYYMMDD */
    const char *sex;                 /* CS: M, F, O */
    const char *study_date;          /* DA */
    const char *study_time;          /* TM: HHMMSS[.ffffff]; printed HH:MM after the date */
    const char *accession;           /* */
    const char *study_description;   /* */
    const char *modalities;          /* e.g. "CT, MR" */
    const char *referring_physician; /* PN */
    /* the report version */
    const char *sections[KP_PDF_NSECTIONS]; /* markup text, see the top */
    int version;                            /* 1, 2, ...; 0 leaves the version line out */
    int amends_version;                     /* the signed version this one amends, or 0 */
    int superseded;                         /* 1: a later signed amendment replaced this text */
    const char *author_name;                /* printed on drafts */
    const char *signed_name;                /* NULL or "": unsigned, printed as a DRAFT */
    int64_t signed_at;                      /* Unix time of signing (local time zone, TZ) */
} kp_pdf_report_t;

/* The JSON key of a section ("clinical_information", "technique", "findings", "impression",
 * "recommendations"); static. */
const char *kp_pdf_section_key(kp_pdf_section_t s);

/* Renders r. On success returns 0, *pdf is a malloc'd buffer of *len bytes (the caller frees it)
 * and *pages (when not NULL) the page count. KP_EINVAL for a NULL argument, KP_EIO when the
 * regular or bold font cannot be loaded from font_dir, KP_EINTERNAL when libharu fails (the
 * reason is logged). */
int kp_pdf_render(const kp_pdf_report_t *r, unsigned char **pdf, size_t *len, int *pages);

/* The report's title in language lang, followed by its version when version > 0 ("Imaging
 * report, version 2"; for DocumentTitle and SeriesDescription of the encapsulated instance).
 * Writes at most n bytes including the NUL. */
void kp_pdf_document_title(const char *lang, int version, char *out, size_t n);

/* --- formatting helpers (used by the renderer, public for tests and other callers) ---------- */

/* A DICOM person name for display: "Family^Given^Middle^Prefix^Suffix" -> "Family, Prefix
 * Given Middle, Suffix" (missing parts left out, only the first non-empty component group).
 * Writes at most n bytes including the NUL (cut at a character boundary). */
void kp_pdf_format_name(const char *pn, char *out, size_t n);
/* A DICOM date (YYYYMMDD, or YYYY-MM-DD, or YYYY.MM.DD) in the language's format (see the top);
 * anything else is copied unchanged. */
void kp_pdf_format_date(const char *lang, const char *da, char *out, size_t n);

#endif
