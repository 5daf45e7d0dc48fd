/* kp_encap: the C++ side of kp_encap.h (Encapsulated PDF instances over DCMTK 3.6.7).
 *
 * The data set is built from scratch: first the Patient / General Study / Patient Study
 * elements copied (cloned) from a stored instance of the study after converting it to UTF-8,
 * then our own series, equipment, document and SOP common elements. It is written with
 * DcmFileFormat::write() into a DcmOutputBufferStream drained into a malloc'd buffer (as
 * kp_image_transcode() does), with the meta header made by DCMTK (EWM_createNewMeta). Nothing
 * time-dependent is added by us or by DCMTK, so the same input gives the same bytes. */
#include <dcmtk/config/osconfig.h>

#include <dcmtk/dcmdata/dcostrmb.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmdata/dcwcache.h>

#include <openssl/evp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

extern "C" {
#include "kp_encap.h"
#include "kp_errors.h"
#include "kp_log.h"
}

#define CAT "encap"

/* Elements of the Patient, General Study and Patient Study modules (and the SOP Common
 * timezone) that describe the study: copied from a stored instance when present there. */
static const DcmTagKey s_study_tags[] = {
    /* Patient */
    DCM_PatientName,
    DCM_PatientID,
    DCM_IssuerOfPatientID,
    DCM_TypeOfPatientID,
    DCM_IssuerOfPatientIDQualifiersSequence,
    DCM_PatientBirthDate,
    DCM_PatientBirthTime,
    DCM_PatientSex,
    DCM_OtherPatientIDsSequence,
    DCM_OtherPatientNames,
    DCM_EthnicGroup,
    DCM_PatientComments,
    DCM_PatientSpeciesDescription,
    DCM_PatientBreedDescription,
    DCM_ResponsiblePerson,
    DCM_ResponsibleOrganization,
    DCM_PatientIdentityRemoved,
    DCM_DeidentificationMethod,
    /* General Study */
    DCM_StudyInstanceUID,
    DCM_StudyDate,
    DCM_StudyTime,
    DCM_ReferringPhysicianName,
    DCM_ReferringPhysicianIdentificationSequence,
    DCM_StudyID,
    DCM_AccessionNumber,
    DCM_IssuerOfAccessionNumberSequence,
    DCM_StudyDescription,
    DCM_PhysiciansOfRecord,
    DCM_NameOfPhysiciansReadingStudy,
    DCM_ProcedureCodeSequence,
    DCM_ReferencedStudySequence,
    /* Patient Study */
    DCM_AdmittingDiagnosesDescription,
    DCM_PatientAge,
    DCM_PatientSize,
    DCM_PatientWeight,
    DCM_Occupation,
    DCM_AdditionalPatientHistory,
    /* SOP Common */
    DCM_TimezoneOffsetFromUTC,
};

static bool s_is_uid(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n > 0 && n <= 64 && strspn(s, "0123456789.") == n && s[0] != '.' && s[n - 1] != '.';
}

static void s_put(DcmDataset *ds, const DcmTagKey &tag, const char *v)
{
    OFCondition c = ds->putAndInsertString(tag, v ? v : "");
    if (c.bad())
        throw std::runtime_error(std::string("cannot set ") + DcmTag(tag).getTagName() + ": " +
                                 c.text());
}

/* Copies the study elements of the stored instance at path into ds. Returns false (logged) when
 * it cannot: unreadable, another study, or a character set that cannot be converted. */
static bool s_copy_from_source(DcmDataset *ds, const kp_encap_pdf_t *in, int *rc)
{
    DcmFileFormat src;
    OFCondition c = src.loadFile(in->source_path, EXS_Unknown, EGL_noChange, 4096, ERM_autoDetect);
    if (c.bad()) {
        kp_warn(CAT, "%s: cannot read the study's instance (%s); using the index values",
                in->source_path, c.text());
        return false;
    }
    DcmDataset *s = src.getDataset();
    const char *study = nullptr;
    if (s->findAndGetString(DCM_StudyInstanceUID, study).bad() || !study ||
        strcmp(study, in->study_uid)) {
        kp_error(CAT, "%s belongs to study %s, not %s", in->source_path, study ? study : "(none)",
                 in->study_uid);
        *rc = KP_EMISMATCH;
        return false;
    }
    c = s->convertToUTF8();
    if (c.bad()) {
        kp_warn(CAT, "%s: cannot convert its character set to UTF-8 (%s); using the index values",
                in->source_path, c.text());
        return false;
    }
    for (const DcmTagKey &tag : s_study_tags) {
        DcmElement *el = nullptr;
        if (s->findAndGetElement(tag, el, OFFalse).bad() || !el) continue;
        DcmElement *copy = OFstatic_cast(DcmElement *, el->clone());
        if (!copy) throw std::bad_alloc();
        if (ds->insert(copy, OFTrue).bad()) {
            delete copy;
            throw std::runtime_error("cannot insert a copied element");
        }
    }
    return true;
}

static void s_put_code(DcmDataset *ds)
{
    DcmItem *item = nullptr;
    OFCondition c = ds->findOrCreateSequenceItem(DCM_ConceptNameCodeSequence, item, 0);
    if (c.bad() || !item) throw std::runtime_error("cannot create ConceptNameCodeSequence");
    item->putAndInsertString(DCM_CodeValue, "18748-4");
    item->putAndInsertString(DCM_CodingSchemeDesignator, "LN");
    item->putAndInsertString(DCM_CodeMeaning, "Diagnostic imaging report");
}

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

static int s_build(const kp_encap_pdf_t *in, kp_buf_t *out)
{
    DcmFileFormat ff;
    DcmDataset *ds = ff.getDataset();
    int rc = 0;
    bool copied = in->source_path && *in->source_path && s_copy_from_source(ds, in, &rc);
    if (rc) return rc;
    if (!copied) {
        s_put(ds, DCM_PatientName, in->patient_name);
        s_put(ds, DCM_PatientID, in->patient_id);
        s_put(ds, DCM_PatientBirthDate, in->birth_date);
        s_put(ds, DCM_PatientSex, in->sex);
        s_put(ds, DCM_StudyInstanceUID, in->study_uid);
        s_put(ds, DCM_StudyDate, in->study_date);
        s_put(ds, DCM_StudyTime, in->study_time);
        s_put(ds, DCM_AccessionNumber, in->accession);
        s_put(ds, DCM_StudyID, in->study_id);
        s_put(ds, DCM_ReferringPhysicianName, in->referring_physician);
        if (in->study_description && *in->study_description)
            s_put(ds, DCM_StudyDescription, in->study_description);
    }
    /* Type 2 elements of the General Study module must be present, if empty */
    const DcmTagKey type2[] = {DCM_PatientName,     DCM_PatientID, DCM_PatientBirthDate,
                               DCM_PatientSex,      DCM_StudyDate, DCM_StudyTime,
                               DCM_AccessionNumber, DCM_StudyID,   DCM_ReferringPhysicianName};
    for (const DcmTagKey &t : type2)
        if (!ds->tagExists(t)) s_put(ds, t, "");

    /* SOP Common: every text of the instance is UTF-8 (the copied values were converted) */
    s_put(ds, DCM_SpecificCharacterSet, "ISO_IR 192");
    s_put(ds, DCM_SOPClassUID, KP_ENCAP_PDF_SOP_CLASS);
    s_put(ds, DCM_SOPInstanceUID, in->sop_uid);
    s_put(ds, DCM_InstanceCreationDate, in->content_date);
    s_put(ds, DCM_InstanceCreationTime, in->content_time);
    /* Encapsulated Document Series */
    s_put(ds, DCM_Modality, "DOC");
    s_put(ds, DCM_SeriesInstanceUID, in->series_uid);
    s_put(ds, DCM_SeriesNumber, std::to_string(in->series_number).c_str());
    if (in->series_description && *in->series_description)
        s_put(ds, DCM_SeriesDescription, in->series_description);
    s_put(ds, DCM_SeriesDate, in->content_date);
    s_put(ds, DCM_SeriesTime, in->content_time);
    /* General Equipment, SC Equipment */
    s_put(ds, DCM_Manufacturer, in->manufacturer);
    s_put(ds, DCM_ConversionType, "WSD");
    /* Encapsulated Document */
    s_put(ds, DCM_InstanceNumber, std::to_string(in->instance_number).c_str());
    s_put(ds, DCM_ContentDate, in->content_date);
    s_put(ds, DCM_ContentTime, in->content_time);
    std::string acq = std::string(in->content_date ? in->content_date : "") +
                      (in->content_time ? in->content_time : "");
    s_put(ds, DCM_AcquisitionDateTime, acq.c_str());
    s_put(ds, DCM_BurnedInAnnotation, "YES");
    s_put(ds, DCM_DocumentTitle, in->document_title);
    s_put_code(ds);
    s_put(ds, DCM_MIMETypeOfEncapsulatedDocument, "application/pdf");
    if (ds->putAndInsertUint32(DCM_EncapsulatedDocumentLength, (Uint32)in->pdf_len).bad())
        throw std::runtime_error("cannot set EncapsulatedDocumentLength");
    /* OB of even length: a trailing 00H when the document's length is odd (PS3.5 7.1, PS3.3
     * C.24.2.1) */
    size_t even = in->pdf_len + (in->pdf_len & 1);
    std::unique_ptr<Uint8[]> doc(new Uint8[even]);
    memcpy(doc.get(), in->pdf, in->pdf_len);
    if (even != in->pdf_len) doc[even - 1] = 0;
    if (ds->putAndInsertUint8Array(DCM_EncapsulatedDocument, doc.get(), (unsigned long)even).bad())
        throw std::runtime_error("cannot set EncapsulatedDocument");

    const E_TransferSyntax xfer = EXS_LittleEndianExplicit;
    const offile_off_t chunk = 1 << 20;
    std::unique_ptr<unsigned char[]> tmp(new unsigned char[chunk]);
    DcmOutputBufferStream os(tmp.get(), chunk);
    DcmWriteCache wcache;
    size_t cap = 0;
    void *p = nullptr;
    offile_off_t n = 0;
    OFCondition c;
    ff.transferInit();
    for (;;) {
        c = ff.write(os, xfer, EET_ExplicitLength, &wcache, EGL_recalcGL, EPD_noChange, 0, 0, 0,
                     EWM_createNewMeta);
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
        kp_error(CAT, "cannot write the encapsulated PDF %s: %s", in->sop_uid,
                 c.bad() ? c.text() : "no meta header written");
        return KP_EDICOM;
    }
    return 0;
}

extern "C" int kp_encap_pdf_build(const kp_encap_pdf_t *in, kp_buf_t *out)
{
    if (out) *out = kp_buf_t{nullptr, 0};
    if (!in || !out || !in->pdf || !in->pdf_len || in->pdf_len > 0xFFFFFFF0u ||
        !s_is_uid(in->study_uid) || !s_is_uid(in->series_uid) || !s_is_uid(in->sop_uid))
        return KP_EINVAL;
    try {
        return s_build(in, out);
    } catch (const std::bad_alloc &) {
        kp_buf_free(out);
        kp_error(CAT, "encapsulated PDF %s: out of memory", in->sop_uid);
        return KP_ENOMEM;
    } catch (const std::exception &e) {
        kp_buf_free(out);
        kp_error(CAT, "encapsulated PDF %s: %s", in->sop_uid, e.what());
        return KP_EDICOM;
    } catch (...) {
        kp_buf_free(out);
        kp_error(CAT, "encapsulated PDF %s: unexpected exception", in->sop_uid);
        return KP_EDICOM;
    }
}

extern "C" int kp_encap_uid_from_name(const char *name, char out[65])
{
    if (!name || !out) return KP_EINVAL;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(name, strlen(name), md, &mdlen, EVP_sha256(), nullptr) || mdlen < 16)
        return KP_EINVAL;
    md[6] = (unsigned char)((md[6] & 0x0F) | 0x50); /* version 5 (name-based) */
    md[8] = (unsigned char)((md[8] & 0x3F) | 0x80); /* RFC 4122 variant */
    unsigned __int128 v = 0;
    for (int i = 0; i < 16; i++)
        v = (v << 8) | md[i];
    char digits[48];
    int k = 0;
    do {
        digits[k++] = (char)('0' + (int)(v % 10));
        v /= 10;
    } while (v);
    int o = snprintf(out, 65, "2.25.");
    while (k)
        out[o++] = digits[--k];
    out[o] = 0;
    return 0;
}
