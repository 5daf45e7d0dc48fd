/* kp_pdf: report -> PDF with libharu (see kp_pdf.h).
 *
 * Design: one pass lays out and draws, page by page, keeping every page handle; a second pass
 * writes the footers ("Page X of Y"), since only then is Y known (libharu keeps every page's
 * content stream in memory until the document is saved, so earlier pages can still be drawn
 * on). Text is UTF-8 through libharu's UTF-8 encoder into embedded TrueType (CID) fonts.
 * libharu reports errors only through its handler: the first one is recorded and checked after
 * the fonts are loaded and at the end, so a failure anywhere fails the render. */
#include "kp_pdf.h"

#include "kp_errors.h"
#include "kp_log.h"

#include <hpdf.h>
#include <hpdf_pages.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- labels ------------------------------------------------------------------------------- */

typedef struct {
    const char *lang;
    const char *title, *patient, *patient_id, *birth_date, *sex, *study_date, *accession, *study,
        *modality, *referring;
    const char *sections[KP_PDF_NSECTIONS];
    const char *male, *female, *other;
    const char *signed_fmt;  /* %s name, %s date and time */
    const char *draft;       /* watermark word */
    const char *draft_note;  /* the label where the signature would be */
    const char *author;      /* "Written by" */
    const char *page_fmt;    /* %d page, %d pages */
    const char *version_fmt; /* %d */
    const char *amends_fmt;  /* %d */
    const char *superseded;  /* note on a version replaced by an amendment */
    char date_sep;           /* '-' (ISO), '.', '/' */
} s_labels_t;

/* clang-format off */
/* Designated initializers: each language's words next to their names. */
#define S_SECTIONS(a, b, c, d, e) .sections = {a, b, c, d, e}
static const s_labels_t s_labels[] = {
    {.lang = "en", .title = "Imaging report", .patient = "Patient", .patient_id = "Patient ID",
     .birth_date = "Date of birth", .sex = "Sex", .study_date = "Study date",
     .accession = "Accession number", .study = "Study", .modality = "Modality",
     .referring = "Referring physician",
     S_SECTIONS("Clinical information", "Technique", "Findings", "Impression", "Recommendations"),
     .male = "male", .female = "female", .other = "other",
     .signed_fmt = "Electronically signed by %s on %s", .draft = "DRAFT",
     .draft_note = "DRAFT: not signed, not a final report", .author = "Written by",
     .page_fmt = "Page %d of %d", .version_fmt = "Version %d", .amends_fmt = "amends version %d",
     .superseded = "Superseded by a later amendment", .date_sep = '-'},
    {.lang = "ru", .title = "Протокол исследования", .patient = "Пациент",
     .patient_id = "ID пациента", .birth_date = "Дата рождения", .sex = "Пол",
     .study_date = "Дата исследования", .accession = "Номер направления",
     .study = "Исследование", .modality = "Модальность", .referring = "Направивший врач",
     S_SECTIONS("Клинические данные", "Методика", "Описание", "Заключение", "Рекомендации"),
     .male = "мужской", .female = "женский", .other = "другой",
     .signed_fmt = "Подписано электронной подписью: %s, %s", .draft = "ЧЕРНОВИК",
     .draft_note = "ЧЕРНОВИК: не подписан, не является окончательным заключением",
     .author = "Автор", .page_fmt = "Страница %d из %d", .version_fmt = "Версия %d",
     .amends_fmt = "исправляет версию %d", .superseded = "Заменено более поздним исправлением",
     .date_sep = '.'},
    {.lang = "es", .title = "Informe de imagen", .patient = "Paciente",
     .patient_id = "ID del paciente", .birth_date = "Fecha de nacimiento", .sex = "Sexo",
     .study_date = "Fecha del estudio", .accession = "Número de acceso", .study = "Estudio",
     .modality = "Modalidad", .referring = "Médico solicitante",
     S_SECTIONS("Información clínica", "Técnica", "Hallazgos", "Impresión diagnóstica",
                "Recomendaciones"),
     .male = "masculino", .female = "femenino", .other = "otro",
     .signed_fmt = "Firmado electrónicamente por %s el %s", .draft = "BORRADOR",
     .draft_note = "BORRADOR: sin firmar, no es un informe definitivo", .author = "Redactado por",
     .page_fmt = "Página %d de %d", .version_fmt = "Versión %d",
     .amends_fmt = "enmienda de la versión %d",
     .superseded = "Sustituido por una enmienda posterior", .date_sep = '/'},
    {.lang = "fr", .title = "Compte rendu d'imagerie", .patient = "Patient",
     .patient_id = "ID patient", .birth_date = "Date de naissance", .sex = "Sexe",
     .study_date = "Date de l'examen", .accession = "N° d'accès", .study = "Examen",
     .modality = "Modalité", .referring = "Médecin prescripteur",
     S_SECTIONS("Renseignements cliniques", "Technique", "Résultats", "Conclusion",
                "Recommandations"),
     .male = "masculin", .female = "féminin", .other = "autre",
     .signed_fmt = "Signé électroniquement par %s le %s", .draft = "BROUILLON",
     .draft_note = "BROUILLON : non signé, pas un compte rendu définitif",
     .author = "Rédigé par", .page_fmt = "Page %d sur %d", .version_fmt = "Version %d",
     .amends_fmt = "rectifie la version %d",
     .superseded = "Remplacé par une rectification ultérieure", .date_sep = '/'},
    {.lang = "de", .title = "Befundbericht", .patient = "Patient", .patient_id = "Patienten-ID",
     .birth_date = "Geburtsdatum", .sex = "Geschlecht", .study_date = "Untersuchungsdatum",
     .accession = "Auftragsnummer", .study = "Untersuchung", .modality = "Modalität",
     .referring = "Überweisender Arzt",
     S_SECTIONS("Klinische Angaben", "Technik", "Befund", "Beurteilung", "Empfehlungen"),
     .male = "männlich", .female = "weiblich", .other = "divers",
     .signed_fmt = "Elektronisch signiert von %s am %s", .draft = "ENTWURF",
     .draft_note = "ENTWURF: nicht signiert, kein endgültiger Befund", .author = "Verfasst von",
     .page_fmt = "Seite %d von %d", .version_fmt = "Version %d",
     .amends_fmt = "korrigiert Version %d", .superseded = "Durch eine spätere Korrektur ersetzt",
     .date_sep = '.'},
};
#undef S_SECTIONS
/* clang-format on */

static const s_labels_t *s_labels_for(const char *lang)
{
    for (size_t i = 0; lang && i < sizeof s_labels / sizeof s_labels[0]; i++)
        if (!strcmp(s_labels[i].lang, lang)) return &s_labels[i];
    return &s_labels[0];
}

const char *kp_pdf_section_key(kp_pdf_section_t s)
{
    static const char *const keys[KP_PDF_NSECTIONS] = {"clinical_information", "technique",
                                                       "findings", "impression", "recommendations"};
    return (unsigned)s < KP_PDF_NSECTIONS ? keys[s] : "";
}

void kp_pdf_document_title(const char *lang, int version, char *out, size_t n)
{
    const s_labels_t *L = s_labels_for(lang);
    if (!n) return;
    if (version <= 0) {
        snprintf(out, n, "%s", L->title);
        return;
    }
    char v[64];
    snprintf(v, sizeof v, L->version_fmt, version);
    /* "Version 2" -> "version 2" after the comma: only the first letter is ASCII in every
     * language, except Russian ("Версия"), whose lower case is two bytes long as well */
    if (v[0] >= 'A' && v[0] <= 'Z')
        v[0] = (char)(v[0] - 'A' + 'a');
    else if (!memcmp(v, "\xD0\x92", 2))
        memcpy(v, "\xD0\xB2", 2); /* В -> в */
    snprintf(out, n, "%s, %s", L->title, v);
}

/* ---- small text helpers ------------------------------------------------------------------- */

static bool s_empty(const char *s)
{
    return !s || !*s;
}

/* Bytes in the UTF-8 sequence starting with c (1 for a stray continuation byte). */
static size_t s_u8len(unsigned char c)
{
    if (c >= 0xF0 && c < 0xF8) return 4;
    if (c >= 0xE0) return c < 0xF0 ? 3 : 1;
    if (c >= 0xC0) return 2;
    return 1;
}

/* Appends src[0..len) to out (capacity n, NUL kept), never splitting a character. */
static void s_append(char *out, size_t n, const char *src, size_t len)
{
    size_t o = strlen(out);
    size_t i = 0;
    while (i < len) {
        size_t k = s_u8len((unsigned char)src[i]);
        if (i + k > len || o + k + 1 > n) break;
        memcpy(out + o, src + i, k);
        o += k;
        i += k;
    }
    out[o] = 0;
}

void kp_pdf_format_name(const char *pn, char *out, size_t n)
{
    if (!n) return;
    out[0] = 0;
    if (!pn) return;
    /* the first non-empty component group (alphabetic, else ideographic, else phonetic) */
    const char *g = pn, *end;
    for (;;) {
        end = strchr(g, '=');
        if (!end) end = g + strlen(g);
        bool any = false;
        for (const char *p = g; p < end; p++)
            if (*p != '^' && *p != ' ') any = true;
        if (any || !*end) break;
        g = end + 1;
    }
    const char *c[5] = {0};
    size_t cl[5] = {0};
    const char *p = g;
    for (int i = 0; i < 5 && p <= end; i++) {
        const char *q = memchr(p, '^', (size_t)(end - p));
        if (!q) q = end;
        while (p < q && *p == ' ')
            p++;
        const char *e = q;
        while (e > p && e[-1] == ' ')
            e--;
        c[i] = p;
        cl[i] = (size_t)(e - p);
        p = q + 1;
        if (q == end) break;
    }
    /* family, then "prefix given middle", then suffix */
    if (cl[0]) s_append(out, n, c[0], cl[0]);
    bool rest = cl[1] || cl[2] || cl[3];
    if (cl[0] && rest) s_append(out, n, ", ", 2);
    const int order[] = {3, 1, 2};
    bool first = true;
    for (int k = 0; k < 3; k++) {
        int i = order[k];
        if (!cl[i]) continue;
        if (!first) s_append(out, n, " ", 1);
        s_append(out, n, c[i], cl[i]);
        first = false;
    }
    if (cl[4]) {
        if (out[0]) s_append(out, n, ", ", 2);
        s_append(out, n, c[4], cl[4]);
    }
}

void kp_pdf_format_date(const char *lang, const char *da, char *out, size_t n)
{
    if (!n) return;
    out[0] = 0;
    if (!da) return;
    char d[9];
    size_t k = 0;
    for (const char *p = da; *p && k < 9; p++) {
        if (*p >= '0' && *p <= '9')
            d[k++] = *p;
        else if (!((*p == '-' || *p == '.') && (k == 4 || k == 6)))
            k = 9; /* not a date */
    }
    if (k != 8) {
        snprintf(out, n, "%s", da);
        return;
    }
    const s_labels_t *L = s_labels_for(lang);
    if (L->date_sep == '-')
        snprintf(out, n, "%.4s-%.2s-%.2s", d, d + 4, d + 6);
    else
        snprintf(out, n, "%.2s%c%.2s%c%.4s", d + 6, L->date_sep, d + 4, L->date_sep, d);
}

/* ---- the document ------------------------------------------------------------------------- */

enum { S_REGULAR = 0, S_BOLD = 1, S_ITALIC = 2, S_BOLD_ITALIC = 3 };

#define S_PAGE_W   595.276f
#define S_PAGE_H   841.89f
#define S_MARGIN_X 56.7f /* 20 mm */
#define S_TOP      790.0f
#define S_BOTTOM   62.0f /* the footer lives below */
#define S_WIDTH    (S_PAGE_W - 2 * S_MARGIN_X)

#define S_VALUE_MAX    161 /* bytes of a value in the patient and study block, NUL included */
#define S_BODY_SIZE    10.0f
#define S_BODY_LEADING 14.0f

typedef struct {
    HPDF_STATUS error, detail;
    bool quiet; /* expected failures (an optional logo) are not logged */
} s_err_t;

typedef struct {
    const kp_pdf_report_t *r;
    const s_labels_t *L;
    HPDF_Doc pdf;
    s_err_t *err;
    HPDF_Font font[4];
    bool font_loaded[4];
    HPDF_Page *pages;
    int npages, cap;
    HPDF_Page page;
    float y;
    char header_line[512]; /* running header of pages 2.. */
} s_doc_t;

static void s_on_error(HPDF_STATUS error, HPDF_STATUS detail, void *user)
{
    s_err_t *e = user;
    if (e->quiet) return;
    if (!e->error) {
        e->error = error;
        e->detail = detail;
    }
}

static const char *const s_font_files[4] = {"DejaVuSans.ttf", "DejaVuSans-Bold.ttf",
                                            "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf"};

/* libharu 2.3.0 gives UTF-8 fonts a ToUnicode CMap that is not one (a "begincidrange" copied
 * from the encoding CMap), so viewers cannot map the glyphs back to text reliably (poppler
 * warns and guesses from the font; others copy garbage). Our codes are UTF-16 code units equal
 * to the Unicode code points (Identity-H, the BMP), so the right CMap is the identity: one
 * bfrange per high byte (a range may only vary the last byte), at most 100 per block. The
 * replacement is a new stream added with libharu's object API from its installed headers. */
static void s_fix_tounicode(HPDF_Doc pdf, HPDF_Font font)
{
    HPDF_Dict cmap = HPDF_DictStream_New(pdf->mmgr, pdf->xref);
    if (!cmap) return;
    cmap->filter = HPDF_STREAM_FILTER_FLATE_DECODE;
    HPDF_Stream st = cmap->stream;
    HPDF_Stream_WriteStr(st, "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
                             "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 "
                             ">> def\n/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
                             "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n");
    int his[256], n = 0;
    for (int hi = 0; hi < 256; hi++)
        if (hi < 0xD8 || hi > 0xDF) his[n++] = hi; /* no surrogates */
    for (int i = 0; i < n; i += 100) {
        int k = n - i < 100 ? n - i : 100;
        char line[64];
        snprintf(line, sizeof line, "%d beginbfrange\n", k);
        HPDF_Stream_WriteStr(st, line);
        for (int j = 0; j < k; j++) {
            snprintf(line, sizeof line, "<%02X00> <%02XFF> <%02X00>\n", his[i + j], his[i + j],
                     his[i + j]);
            HPDF_Stream_WriteStr(st, line);
        }
        HPDF_Stream_WriteStr(st, "endbfrange\n");
    }
    HPDF_Stream_WriteStr(st, "endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n");
    HPDF_Dict_Add(font, "ToUnicode", cmap);
}

static HPDF_Font s_load_font(s_doc_t *d, int style, bool required)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", s_empty(d->r->font_dir) ? "." : d->r->font_dir,
             s_font_files[style]);
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (required) kp_error("pdf", "font %s cannot be read", path);
        return NULL;
    }
    fclose(f);
    const char *name = HPDF_LoadTTFontFromFile(d->pdf, path, HPDF_TRUE);
    HPDF_Font font = name ? HPDF_GetFont(d->pdf, name, "UTF-8") : NULL;
    if (font) s_fix_tounicode(d->pdf, font);
    return font;
}

/* The font of a style; italic faces are loaded on first use and fall back to upright. */
static HPDF_Font s_font(s_doc_t *d, int style)
{
    if (!d->font_loaded[style]) {
        d->font_loaded[style] = true;
        d->font[style] = s_load_font(d, style, false);
        if (!d->font[style]) {
            kp_warn("pdf", "font %s missing in %s; using the upright face", s_font_files[style],
                    d->r->font_dir);
            d->font[style] = d->font[style & S_BOLD];
        }
    }
    return d->font[style];
}

static float s_width(s_doc_t *d, int style, float size, const char *s, size_t n)
{
    if (!n) return 0;
    HPDF_TextWidth tw = HPDF_Font_TextWidth(s_font(d, style), (const HPDF_BYTE *)s, (HPDF_UINT)n);
    return (float)tw.width * size / 1000.0f;
}

/* Draws s[0..n) at (x, y); the text is copied to be NUL-terminated. */
static void s_text(s_doc_t *d, int style, float size, float x, float y, const char *s, size_t n)
{
    if (!n) return;
    char stackbuf[512], *buf = n < sizeof stackbuf ? stackbuf : malloc(n + 1);
    if (!buf) abort();
    memcpy(buf, s, n);
    buf[n] = 0;
    HPDF_Page_BeginText(d->page);
    HPDF_Page_SetFontAndSize(d->page, s_font(d, style), size);
    HPDF_Page_TextOut(d->page, x, y, buf);
    HPDF_Page_EndText(d->page);
    if (buf != stackbuf) free(buf);
}

static void s_gray(s_doc_t *d, float g)
{
    HPDF_Page_SetRGBFill(d->page, g, g, g);
    HPDF_Page_SetRGBStroke(d->page, g, g, g);
}

static void s_rule(s_doc_t *d, float y, float width)
{
    HPDF_Page_SetLineWidth(d->page, width);
    HPDF_Page_MoveTo(d->page, S_MARGIN_X, y);
    HPDF_Page_LineTo(d->page, S_PAGE_W - S_MARGIN_X, y);
    HPDF_Page_Stroke(d->page);
}

static void s_watermark(s_doc_t *d)
{
    const char *w = d->L->draft;
    float size = 96;
    float tw = s_width(d, S_BOLD, size, w, strlen(w));
    if (tw > 600) size = size * 600 / tw, tw = 600;
    float a = (float)(M_PI / 4), c = cosf(a), s = sinf(a);
    /* centre of the text's box at the centre of the page */
    float cx = S_PAGE_W / 2, cy = S_PAGE_H / 2, h = size * 0.7f;
    float x = cx - c * tw / 2 + s * h / 2, y = cy - s * tw / 2 - c * h / 2;
    /* Marked as a pagination artifact with an empty ActualText, so that text extraction (and
     * copy and paste, screen readers) skips it instead of mixing its letters into the report.
     * libharu has no call for marked content: the operators go straight into the page's
     * content stream (HPDF_PageAttr from libharu's installed hpdf_pages.h). */
    HPDF_Stream cs = ((HPDF_PageAttr)d->page->attr)->stream;
    HPDF_Stream_WriteStr(cs, "/Artifact <</Type /Pagination /Subtype /Watermark>> BDC\n"
                             "/Span <</ActualText ()>> BDC\n");
    HPDF_Page_GSave(d->page);
    HPDF_Page_SetRGBFill(d->page, 0.88f, 0.88f, 0.88f);
    HPDF_Page_BeginText(d->page);
    HPDF_Page_SetFontAndSize(d->page, s_font(d, S_BOLD), size);
    HPDF_Page_SetTextMatrix(d->page, c, s, -s, c, x, y);
    HPDF_Page_ShowText(d->page, w);
    HPDF_Page_EndText(d->page);
    HPDF_Page_GRestore(d->page);
    HPDF_Stream_WriteStr(cs, "EMC\nEMC\n");
}

static void s_new_page(s_doc_t *d)
{
    if (d->npages == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 8;
        d->pages = realloc(d->pages, (size_t)d->cap * sizeof *d->pages);
        if (!d->pages) abort();
    }
    d->page = HPDF_AddPage(d->pdf);
    d->pages[d->npages++] = d->page;
    HPDF_Page_SetWidth(d->page, S_PAGE_W);
    HPDF_Page_SetHeight(d->page, S_PAGE_H);
    if (s_empty(d->r->signed_name)) s_watermark(d);
    d->y = S_TOP;
    if (d->npages > 1) { /* running header: clinic, patient */
        s_gray(d, 0.35f);
        s_text(d, S_REGULAR, 8, S_MARGIN_X, d->y, d->header_line, strlen(d->header_line));
        s_rule(d, d->y - 5, 0.5f);
        s_gray(d, 0);
        d->y -= 22;
    }
}

/* Makes sure h points fit above the bottom margin, else starts a new page. */
static void s_need(s_doc_t *d, float h)
{
    if (d->y - h < S_BOTTOM) s_new_page(d);
}

/* ---- paragraphs: markup, words, lines ----------------------------------------------------- */

typedef struct {
    const char *s;
    size_t n;
    int style;
} s_span_t;

typedef struct {
    s_span_t *v;
    size_t n, cap;
} s_spans_t;

static void s_push(s_spans_t *a, const char *s, size_t n, int style)
{
    if (!n) return;
    if (a->n && a->v[a->n - 1].style == style && a->v[a->n - 1].s + a->v[a->n - 1].n == s) {
        a->v[a->n - 1].n += n;
        return;
    }
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 16;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        if (!a->v) abort();
    }
    a->v[a->n++] = (s_span_t){s, n, style};
}

static bool s_space(char c)
{
    return c == ' ' || c == '\t';
}

/* Is there a closing marker (m of length ml, preceded by a non-space) in s[from..n)? For "*" a
 * "**" does not count. */
static bool s_escape_at(const char *s, size_t i, size_t n)
{
    return s[i] == '\\' && i + 1 < n && (s[i + 1] == '*' || s[i + 1] == '\\');
}

static bool s_closer_ahead(const char *s, size_t from, size_t n, const char *m, size_t ml)
{
    for (size_t j = from; j + ml <= n; j++) {
        if (s_escape_at(s, j, n)) {
            j++;
            continue;
        }
        if (memcmp(s + j, m, ml) || s_space(s[j - 1])) continue;
        if (ml == 1 && j + 1 < n && s[j + 1] == '*') {
            j++;
            continue;
        }
        return true;
    }
    return false;
}

/* Splits one line into styled spans (the markers and escaping backslashes are dropped). */
static void s_parse_line(const char *s, size_t n, s_spans_t *out)
{
    int style = S_REGULAR;
    size_t start = 0, i = 0;
    while (i < n) {
        if (s_escape_at(s, i, n)) { /* \* and \\ stand for the character itself */
            s_push(out, s + start, i - start, style);
            start = i + 1;
            i += 2;
            continue;
        }
        if (s[i] != '*') {
            i++;
            continue;
        }
        size_t ml = (i + 1 < n && s[i + 1] == '*') ? 2 : 1;
        int flag = ml == 2 ? S_BOLD : S_ITALIC;
        bool open = style & flag;
        bool ok;
        if (open) /* closes when preceded by a non-space */
            ok = i > 0 && !s_space(s[i - 1]);
        else
            ok = i + ml < n && !s_space(s[i + ml]) &&
                 s_closer_ahead(s, i + ml + 1, n, ml == 2 ? "**" : "*", ml);
        if (!ok) {
            i += ml;
            continue;
        }
        s_push(out, s + start, i - start, style);
        style ^= flag;
        i += ml;
        start = i;
    }
    s_push(out, s + start, n - start, style);
}

/* One fragment of a laid-out line. */
typedef struct {
    const char *s;
    size_t n;
    int style;
    float x;
} s_frag_t;

typedef struct {
    s_frag_t *v;
    size_t n, cap;
    float w;
} s_line_t;

static void s_line_add(s_line_t *l, const char *s, size_t n, int style, float x)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        if (!l->v) abort();
    }
    l->v[l->n++] = (s_frag_t){s, n, style, x};
}

typedef struct {
    float x, width, size, leading;
    const char *bullet; /* drawn before the first line, NULL for none */
    float bullet_x;
} s_para_t;

static void s_flush(s_doc_t *d, s_line_t *l, const s_para_t *p, bool *first)
{
    s_need(d, p->leading);
    float base = d->y - p->size; /* baseline */
    if (*first && p->bullet)
        s_text(d, S_REGULAR, p->size, p->bullet_x, base, p->bullet, strlen(p->bullet));
    /* Fragments of one style are drawn as one string with real spaces between the words (the
     * layout used the width of one space, so the positions agree), and a space that precedes a
     * change of style ends the run before it: text extraction then finds every space. */
    size_t cap = 256, n = 0;
    char *run = malloc(cap);
    if (!run) abort();
    float run_x = 0;
    int run_style = 0;
    for (size_t i = 0; i < l->n; i++) {
        const s_frag_t *f = &l->v[i];
        bool gap = false;
        if (i > 0) {
            const s_frag_t *q = &l->v[i - 1];
            gap = f->x > q->x + s_width(d, q->style, p->size, q->s, q->n) + 0.01f;
        }
        if (i > 0 && f->style != run_style) {
            if (gap) run[n++] = ' ';
            s_text(d, run_style, p->size, p->x + run_x, base, run, n);
            n = 0;
            gap = false;
        }
        if (n + f->n + 2 > cap) {
            while (n + f->n + 2 > cap)
                cap *= 2;
            run = realloc(run, cap);
            if (!run) abort();
        }
        if (n == 0) {
            run_x = f->x;
            run_style = f->style;
        }
        if (gap) run[n++] = ' ';
        memcpy(run + n, f->s, f->n);
        n += f->n;
    }
    if (n) s_text(d, run_style, p->size, p->x + run_x, base, run, n);
    free(run);
    d->y -= p->leading;
    l->n = 0;
    l->w = 0;
    *first = false;
}

/* Lays out and draws one paragraph line (spans of one source line) with wrapping. */
static void s_draw_spans(s_doc_t *d, const s_spans_t *sp, const s_para_t *p, bool *first)
{
    s_line_t line = {0};
    bool pending_space = false;
    size_t si = 0, off = 0;
    /* word: a run of non-space bytes possibly over several spans */
    while (si < sp->n) {
        const s_span_t *s = &sp->v[si];
        if (off >= s->n) {
            si++;
            off = 0;
            continue;
        }
        if (s_space(s->s[off])) {
            pending_space = line.n > 0;
            off++;
            continue;
        }
        /* collect the word's pieces */
        s_frag_t pieces[64];
        size_t np = 0;
        float ww = 0;
        size_t wsi = si, woff = off;
        while (wsi < sp->n && np < 64) {
            const s_span_t *t = &sp->v[wsi];
            size_t e = woff;
            while (e < t->n && !s_space(t->s[e]))
                e++;
            if (e > woff) {
                float w = s_width(d, t->style, p->size, t->s + woff, e - woff);
                pieces[np++] = (s_frag_t){t->s + woff, e - woff, t->style, w};
                ww += w;
            }
            if (e < t->n) {
                woff = e;
                break;
            }
            wsi++;
            woff = 0;
        }
        si = wsi;
        off = woff;
        /* the space is drawn in the style of the word before it (see s_flush) */
        float lead =
            pending_space && line.n ? s_width(d, line.v[line.n - 1].style, p->size, " ", 1) : 0;
        if (line.n && line.w + lead + ww > p->width) {
            s_flush(d, &line, p, first);
            lead = 0;
        }
        pending_space = false;
        if (line.w + lead + ww <= p->width) {
            float x = line.w + lead;
            for (size_t k = 0; k < np; k++) {
                s_line_add(&line, pieces[k].s, pieces[k].n, pieces[k].style, x);
                x += pieces[k].x;
            }
            line.w = x;
            continue;
        }
        /* longer than a whole line: break between characters */
        for (size_t k = 0; k < np; k++) {
            const char *c = pieces[k].s;
            size_t left = pieces[k].n;
            while (left) {
                size_t take = 0;
                float w = 0;
                while (take < left) {
                    size_t cl = s_u8len((unsigned char)c[take]);
                    if (cl > left - take) cl = left - take;
                    float nw = s_width(d, pieces[k].style, p->size, c, take + cl);
                    if (line.w + nw > p->width && (take || line.n)) break;
                    take += cl;
                    w = nw;
                }
                if (!take) { /* not even one character fits after what is on the line */
                    s_flush(d, &line, p, first);
                    continue;
                }
                s_line_add(&line, c, take, pieces[k].style, line.w);
                line.w += w;
                c += take;
                left -= take;
                if (left) s_flush(d, &line, p, first);
            }
        }
    }
    if (line.n || (*first && p->bullet)) s_flush(d, &line, p, first);
    free(line.v);
}

/* Draws plain text (no markup) wrapped in a box of the given width at x. */
static void s_draw_plain(s_doc_t *d, int style, float size, float leading, float x, float width,
                         const char *text)
{
    s_spans_t sp = {0};
    s_push(&sp, text, strlen(text), style);
    s_para_t p = {.x = x, .width = width, .size = size, .leading = leading};
    bool first = true;
    s_draw_spans(d, &sp, &p, &first);
    free(sp.v);
}

/* Replaces control characters (tabs included) by spaces, except line feeds; drops CR. The
 * result is malloc'd. */
static char *s_clean(const char *text)
{
    size_t n = strlen(text);
    char *o = malloc(n + 1), *q = o;
    if (!o) abort();
    for (const char *p = text; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '\r') continue;
        *q++ = (c < 0x20 && c != '\n') || c == 0x7f ? ' ' : (char)c;
    }
    *q = 0;
    return o;
}

static bool s_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!s_space(s[i])) return false;
    return true;
}

/* One section body: paragraphs separated by blank lines, line breaks kept, "- " bullets. */
static void s_draw_markup(s_doc_t *d, const char *text)
{
    char *t = s_clean(text);
    const char *p = t;
    bool gap = false; /* a blank line was seen since the last drawn line */
    bool drawn = false;
    while (*p) {
        const char *e = strchr(p, '\n');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (s_blank(p, n)) {
            gap = drawn;
        } else {
            size_t lead = 0;
            while (lead < n && s_space(p[lead]))
                lead++;
            bool bullet = n - lead >= 2 && p[lead] == '-' && p[lead + 1] == ' ';
            if (gap) d->y -= 6;
            gap = false;
            s_para_t para = {
                .x = S_MARGIN_X, .width = S_WIDTH, .size = S_BODY_SIZE, .leading = S_BODY_LEADING};
            const char *body = p + lead;
            size_t bn = n - lead;
            if (bullet) {
                para.bullet = "\xE2\x80\xA2"; /* U+2022 */
                para.bullet_x = S_MARGIN_X + 4;
                para.x = S_MARGIN_X + 16;
                para.width = S_WIDTH - 16;
                body += 2;
                bn -= 2;
            }
            s_spans_t sp = {0};
            s_parse_line(body, bn, &sp);
            bool first = true;
            s_draw_spans(d, &sp, &para, &first);
            free(sp.v);
            drawn = true;
        }
        if (!e) break;
        p = e + 1;
    }
    free(t);
}

/* ---- the parts of the page ---------------------------------------------------------------- */

static void s_letterhead(s_doc_t *d)
{
    const kp_pdf_report_t *r = d->r;
    float top = d->y + 10, text_x = S_MARGIN_X, logo_h = 0;
    if (!s_empty(r->logo_path)) {
        unsigned char magic[8] = {0};
        FILE *f = fopen(r->logo_path, "rb");
        size_t got = f ? fread(magic, 1, sizeof magic, f) : 0;
        if (f) fclose(f);
        HPDF_Image img = NULL;
        d->err->quiet = true; /* a bad logo is left out, not a failed report */
        if (got >= 8 && !memcmp(magic, "\x89PNG\r\n\x1a\n", 8))
            img = HPDF_LoadPngImageFromFile(d->pdf, r->logo_path);
        else if (got >= 3 && !memcmp(magic, "\xFF\xD8\xFF", 3))
            img = HPDF_LoadJpegImageFromFile(d->pdf, r->logo_path);
        d->err->quiet = false;
        HPDF_ResetError(d->pdf);
        if (!img) {
            kp_warn("pdf", "logo %s is not a readable PNG or JPEG file; left out", r->logo_path);
        } else {
            float iw = (float)HPDF_Image_GetWidth(img), ih = (float)HPDF_Image_GetHeight(img);
            float scale = fminf(140.0f / iw, 56.0f / ih);
            float w = iw * scale, h = ih * scale;
            HPDF_Page_DrawImage(d->page, img, S_MARGIN_X, top - h, w, h);
            text_x = S_MARGIN_X + w + 14;
            logo_h = h;
        }
    }
    float width = S_PAGE_W - S_MARGIN_X - text_x;
    float y0 = d->y;
    /* the clinic block is drawn with the paragraph machinery, in a narrower column */
    if (!s_empty(r->clinic_name)) s_draw_plain(d, S_BOLD, 15, 19, text_x, width, r->clinic_name);
    if (!s_empty(r->clinic_address)) {
        char *a = strdup(r->clinic_address);
        if (!a) abort();
        s_gray(d, 0.3f);
        for (char *line = a, *next; line; line = next) {
            next = strpbrk(line, "|\n");
            if (next) *next++ = 0;
            while (*line == ' ')
                line++;
            size_t n = strlen(line);
            while (n && line[n - 1] == ' ')
                line[--n] = 0;
            if (n) s_draw_plain(d, S_REGULAR, 9, 12, text_x, width, line);
        }
        s_gray(d, 0);
        free(a);
    }
    float used = y0 - d->y;
    if (logo_h + 10 > used + 10) d->y = top - logo_h - 4;
    if (d->y < y0) {
        d->y -= 6;
        s_rule(d, d->y, 1.0f);
        d->y -= 18;
    }
}

static void s_datetime(s_doc_t *d, int64_t t, char *out, size_t n)
{
    time_t tt = (time_t)t;
    struct tm tm;
    localtime_r(&tt, &tm);
    char da[16], date[32], zone[16];
    strftime(da, sizeof da, "%Y%m%d", &tm);
    strftime(zone, sizeof zone, "%Z", &tm);
    kp_pdf_format_date(d->L->lang, da, date, sizeof date);
    snprintf(out, n, "%s %02d:%02d %s", date, tm.tm_hour, tm.tm_min, zone);
}

static void s_title(s_doc_t *d)
{
    const kp_pdf_report_t *r = d->r;
    s_need(d, 40);
    s_draw_plain(d, S_BOLD, 16, 21, S_MARGIN_X, S_WIDTH, d->L->title);
    char line[256] = "";
    if (r->version > 0) snprintf(line, sizeof line, d->L->version_fmt, r->version);
    if (r->amends_version > 0) {
        char a[96];
        snprintf(a, sizeof a, d->L->amends_fmt, r->amends_version);
        snprintf(line + strlen(line), sizeof line - strlen(line), "%s%s", line[0] ? ", " : "", a);
    }
    if (r->superseded)
        snprintf(line + strlen(line), sizeof line - strlen(line), "%s%s", line[0] ? ". " : "",
                 d->L->superseded);
    if (line[0]) {
        s_gray(d, 0.35f);
        s_draw_plain(d, S_REGULAR, 9, 13, S_MARGIN_X, S_WIDTH, line);
        s_gray(d, 0);
    }
    d->y -= 8;
}

/* One column of label/value rows; returns the height used. Drawn from d->y down. */
static float s_rows(s_doc_t *d, float x, float width, const char *const (*rows)[2], size_t n)
{
    float y0 = d->y, label_w = 0;
    for (size_t i = 0; i < n; i++)
        if (!s_empty(rows[i][1]))
            label_w = fmaxf(label_w, s_width(d, S_BOLD, 8.5f, rows[i][0], strlen(rows[i][0])));
    label_w = fminf(label_w + 8, width * 0.45f);
    for (size_t i = 0; i < n; i++) {
        if (s_empty(rows[i][1])) continue;
        float y = d->y;
        s_gray(d, 0.35f);
        s_draw_plain(d, S_BOLD, 8.5f, 13, x, label_w - 6, rows[i][0]);
        s_gray(d, 0);
        float after_label = d->y;
        d->y = y;
        s_draw_plain(d, S_REGULAR, 10, 13, x + label_w, width - label_w, rows[i][1]);
        if (after_label < d->y) d->y = after_label;
    }
    return y0 - d->y;
}

static void s_patient_block(s_doc_t *d)
{
    const kp_pdf_report_t *r = d->r;
    const s_labels_t *L = d->L;
    /* values are capped (S_VALUE_MAX bytes) so that the block always fits on the first page */
    char name[S_VALUE_MAX], birth[64], sex[64] = "", sdate[96], ref[S_VALUE_MAX];
    char pid[S_VALUE_MAX] = "", acc[S_VALUE_MAX] = "", desc[S_VALUE_MAX] = "",
         mod[S_VALUE_MAX] = "";
    if (r->patient_id) s_append(pid, sizeof pid, r->patient_id, strlen(r->patient_id));
    if (r->accession) s_append(acc, sizeof acc, r->accession, strlen(r->accession));
    if (r->study_description)
        s_append(desc, sizeof desc, r->study_description, strlen(r->study_description));
    if (r->modalities) s_append(mod, sizeof mod, r->modalities, strlen(r->modalities));
    kp_pdf_format_name(r->patient_name, name, sizeof name);
    kp_pdf_format_name(r->referring_physician, ref, sizeof ref);
    kp_pdf_format_date(L->lang, r->birth_date, birth, sizeof birth);
    kp_pdf_format_date(L->lang, r->study_date, sdate, sizeof sdate);
    if (sdate[0] && !s_empty(r->study_time) && strlen(r->study_time) >= 4)
        snprintf(sdate + strlen(sdate), sizeof sdate - strlen(sdate), " %.2s:%.2s", r->study_time,
                 r->study_time + 2);
    if (!s_empty(r->sex))
        snprintf(sex, sizeof sex, "%s",
                 !strcmp(r->sex, "M")   ? L->male
                 : !strcmp(r->sex, "F") ? L->female
                 : !strcmp(r->sex, "O") ? L->other
                                        : r->sex);
    const char *left[][2] = {
        {L->patient, name}, {L->patient_id, pid}, {L->birth_date, birth}, {L->sex, sex}};
    const char *right[][2] = {{L->study_date, sdate},
                              {L->accession, acc},
                              {L->study, desc},
                              {L->modality, mod},
                              {L->referring, ref}};
    s_need(d, 100); /* it comes right after the title, near the top of page 1 */
    float col = (S_WIDTH - 20) / 2, top = d->y;
    d->y -= 8;
    float y0 = d->y;
    float h1 = s_rows(d, S_MARGIN_X + 8, col - 8, left, 4);
    d->y = y0;
    float h2 = s_rows(d, S_MARGIN_X + col + 20, col - 8, right, 5);
    d->y = y0 - fmaxf(h1, h2) - 6;
    HPDF_Page_SetRGBStroke(d->page, 0.7f, 0.7f, 0.7f);
    HPDF_Page_SetLineWidth(d->page, 0.6f);
    HPDF_Page_Rectangle(d->page, S_MARGIN_X, d->y, S_WIDTH, top - d->y);
    HPDF_Page_Stroke(d->page);
    HPDF_Page_SetRGBStroke(d->page, 0, 0, 0);
    d->y -= 16;
}

static void s_sections(s_doc_t *d)
{
    for (int i = 0; i < KP_PDF_NSECTIONS; i++) {
        const char *t = d->r->sections[i];
        if (s_empty(t)) continue;
        char *c = s_clean(t);
        bool blank = s_blank(c, strlen(c)) || strspn(c, " \n") == strlen(c);
        free(c);
        if (blank) continue;
        /* a heading stays with the first lines of its section */
        s_need(d, 18 + 3 * S_BODY_LEADING);
        s_draw_plain(d, S_BOLD, 12, 16, S_MARGIN_X, S_WIDTH, d->L->sections[i]);
        d->y -= 3;
        s_draw_markup(d, t);
        d->y -= 12;
    }
}

static void s_signature(s_doc_t *d)
{
    const kp_pdf_report_t *r = d->r;
    s_need(d, 60);
    d->y -= 10;
    HPDF_Page_SetRGBStroke(d->page, 0.5f, 0.5f, 0.5f);
    s_rule(d, d->y, 0.6f);
    HPDF_Page_SetRGBStroke(d->page, 0, 0, 0);
    d->y -= 8;
    if (!s_empty(r->signed_name)) {
        char when[96], line[1024];
        s_datetime(d, r->signed_at, when, sizeof when);
        snprintf(line, sizeof line, d->L->signed_fmt, r->signed_name, when);
        s_draw_plain(d, S_BOLD, 10, 14, S_MARGIN_X, S_WIDTH, line);
    } else {
        HPDF_Page_SetRGBFill(d->page, 0.7f, 0.1f, 0.1f);
        s_draw_plain(d, S_BOLD, 10, 14, S_MARGIN_X, S_WIDTH, d->L->draft_note);
        HPDF_Page_SetRGBFill(d->page, 0, 0, 0);
        if (!s_empty(r->author_name)) {
            char line[1024];
            snprintf(line, sizeof line, "%s: %s", d->L->author, r->author_name);
            s_draw_plain(d, S_REGULAR, 10, 14, S_MARGIN_X, S_WIDTH, line);
        }
    }
}

static void s_footers(s_doc_t *d)
{
    for (int i = 0; i < d->npages; i++) {
        d->page = d->pages[i];
        char text[128];
        snprintf(text, sizeof text, d->L->page_fmt, i + 1, d->npages);
        s_gray(d, 0.35f);
        s_rule(d, 44, 0.5f);
        float w = s_width(d, S_REGULAR, 8, text, strlen(text));
        s_text(d, S_REGULAR, 8, S_PAGE_W - S_MARGIN_X - w, 32, text, strlen(text));
        s_gray(d, 0);
    }
}

int kp_pdf_render(const kp_pdf_report_t *r, unsigned char **out, size_t *len, int *pages)
{
    if (!r || !out || !len) return KP_EINVAL;
    *out = NULL;
    *len = 0;
    s_err_t err = {0};
    s_doc_t d = {.r = r, .L = s_labels_for(r->language), .err = &err};
    int rc = KP_EINTERNAL;
    d.pdf = HPDF_New(s_on_error, &err);
    if (!d.pdf) return KP_EINTERNAL;
    HPDF_SetCompressionMode(d.pdf, HPDF_COMP_ALL);
    HPDF_UseUTFEncodings(d.pdf);
    HPDF_SetCurrentEncoder(d.pdf, "UTF-8");
    HPDF_SetInfoAttr(d.pdf, HPDF_INFO_CREATOR, "Klinika PACS");
    for (int s = S_REGULAR; s <= S_BOLD; s++) {
        d.font[s] = s_load_font(&d, s, true);
        d.font_loaded[s] = true;
        if (!d.font[s]) {
            rc = KP_EIO;
            goto out;
        }
    }
    if (err.error) {
        kp_error("pdf", "cannot load the fonts from %s (libharu error 0x%04X, detail %u)",
                 r->font_dir, (unsigned)err.error, (unsigned)err.detail);
        rc = KP_EIO;
        goto out;
    }
    /* running header of the following pages: clinic, patient name, patient ID */
    char name[512];
    kp_pdf_format_name(r->patient_name, name, sizeof name);
    const char *parts[] = {r->clinic_name, name, s_empty(r->patient_id) ? NULL : d.L->patient_id};
    for (size_t i = 0; i < 3; i++) {
        if (s_empty(parts[i])) continue;
        size_t n = strlen(d.header_line);
        snprintf(d.header_line + n, sizeof d.header_line - n, "%s%s", n ? "  \xC2\xB7  " : "",
                 parts[i]);
    }
    if (!s_empty(r->patient_id)) {
        size_t n = strlen(d.header_line);
        snprintf(d.header_line + n, sizeof d.header_line - n, " %s", r->patient_id);
    }

    s_new_page(&d);
    s_letterhead(&d);
    s_title(&d);
    s_patient_block(&d);
    s_sections(&d);
    s_signature(&d);
    s_footers(&d);
    if (err.error) {
        kp_error("pdf", "libharu failed (error 0x%04X, detail %u)", (unsigned)err.error,
                 (unsigned)err.detail);
        goto out;
    }
    if (HPDF_SaveToStream(d.pdf) != HPDF_OK || err.error) {
        kp_error("pdf", "cannot write the PDF (libharu error 0x%04X)", (unsigned)err.error);
        goto out;
    }
    HPDF_UINT32 size = HPDF_GetStreamSize(d.pdf);
    unsigned char *buf = malloc(size ? size : 1);
    if (!buf) abort();
    HPDF_UINT32 got = size;
    HPDF_ResetStream(d.pdf);
    HPDF_ReadFromStream(d.pdf, buf, &got); /* answers HPDF_STREAM_EOF once all is read */
    if (got != size) {
        free(buf);
        kp_error("pdf", "cannot read the PDF back from libharu");
        goto out;
    }
    *out = buf;
    *len = got;
    if (pages) *pages = d.npages;
    rc = 0;
out:
    free(d.pages);
    HPDF_Free(d.pdf);
    return rc;
}
