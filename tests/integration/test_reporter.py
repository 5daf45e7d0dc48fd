"""pacs-reporter: report versions rendered to PDF and stored into their study.

The reports API is not needed: the test writes what it would (reports, report_versions,
report_pdfs and a `report.pdf` job in the jobs outbox, in one transaction) and the outbox sweep
of pacs-busd publishes the job. Each PDF is checked with poppler (pdftotext for the exact text,
pdfinfo for pages, pdftoppm for a non-blank rendering); the Encapsulated PDF instance is looked
up in the index and through QIDO-RS, fetched with WADO-RS and compared with the PDF file."""
import json
import os
import re
import subprocess
import tempfile

import pydicom
import pytest

import datasets
import kp
from dicomweb import dcm_from_bytes, parse_multipart, png_decode

ROOT = "1.2.826.0.1.3680043.10.1411.95"
SYN = datasets.Studies(ROOT, {
    "S1": dict(name="Иванов^Иван^Петрович", pid="REP-1", birth="19700102", sex="M",
               date="20261127", time="101500", acc="ACC-REP-1", desc="КТ грудной клетки",
               ref="Щукин^Пётр", series=[("CT", 1, "axial", [1, 2])]),
})
STUDY = SYN.study_uid("S1")
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'

# one report per language, with that language's special characters
LANGS = {
    "en": dict(heading="Findings", impression_heading="Impression", page="Page 1 of 1",
               date="2026-11-27", signed="Electronically signed by",
               findings="The café-style naïve résumé shows no focal lesion.",
               impression="Normal study, “quoted” and — dashed."),
    "ru": dict(heading="Описание", impression_heading="Заключение", page="Страница 1 из 1",
               date="27.11.2026", signed="Подписано электронной подписью",
               findings="Щитовидная железа не увеличена, ёмкость съёмная, объём «Щ» в норме.",
               impression="Патологии не выявлено. Съешь же ещё этих мягких французских булок."),
    "es": dict(heading="Hallazgos", impression_heading="Impresión diagnóstica",
               page="Página 1 de 1", date="27/11/2026", signed="Firmado electrónicamente por",
               findings="El niño presenta señales de pequeña lesión en el pulmón; ¿año?",
               impression="¡Estudio normal! Señor Muñoz, acción."),
    "fr": dict(heading="Résultats", impression_heading="Conclusion", page="Page 1 sur 1",
               date="27/11/2026", signed="Signé électroniquement par",
               findings="Le cœur et l'œsophage sont normaux; élève à l'hôpital, Noël.",
               impression="Examen sans particularité, œdème absent, ça va."),
    "de": dict(heading="Befund", impression_heading="Beurteilung", page="Seite 1 von 1",
               date="27.11.2026", signed="Elektronisch signiert von",
               findings="Die Straße der Größe: Lunge über Ödem frei, Maß gemäß Übersicht.",
               impression="Unauffälliger Befund, weiß, süß, groß."),
}


@pytest.fixture(scope="module")
def rs(cluster):
    s = kp.System(cluster, gateway=True, extra_env={
        "KP_REPORT_CLINIC_NAME": "Клиника «Здоровье»",
        "KP_REPORT_CLINIC_ADDRESS": "ул. Ленина, 1 | 101000 Москва",
        "KP_REPORT_TIMEZONE": "UTC",
    })
    try:
        with tempfile.TemporaryDirectory() as d:
            files = SYN.write(d)
            rc, res, out = s.storescu(files)
            assert all(res.get(f) == "ok" for f in files), out[-2000:]
        s.wait_jobs_settled()
        s.wait_indexed(2)
        yield s
    finally:
        s.stop()


def request_pdf(s, lang, sections, signed=True, study=STUDY):
    """Inserts a report, its version, a report_pdfs row and the report.pdf job, as the API does
    (one transaction). Returns (pdf_id, job_id)."""
    import psycopg2
    c = psycopg2.connect(s.dsn)
    try:
        cur = c.cursor()
        cur.execute("INSERT INTO reports (study_uid, language, status, created_by) VALUES "
                    "(%s, %s, %s, 'doc') RETURNING id",
                    (study, lang, "final" if signed else "draft"))
        rid = cur.fetchone()[0]
        cur.execute("INSERT INTO report_versions (report_id, version, status, sections, language, "
                    "author, author_name, signed_by, signed_name, signed_at) VALUES (%s, 1, %s, "
                    "%s, %s, 'doc', 'Др. Анна Щукина', %s, %s, %s) RETURNING id",
                    (rid, "final" if signed else "draft", json.dumps(sections), lang,
                     "doc" if signed else None, "Др. Анна Щукина" if signed else None,
                     "2026-11-27 14:05:00+00" if signed else None))
        vid = cur.fetchone()[0]
        cur.execute("INSERT INTO report_pdfs (version_id, requested_by) VALUES (%s, 'doc') "
                    "RETURNING id", (vid,))
        pid = cur.fetchone()[0]
        cur.execute("INSERT INTO jobs (type, payload, lease_until) VALUES ('report.pdf', "
                    "jsonb_build_object('pdf_id', %s::bigint), now()) RETURNING id", (pid,))
        jid = cur.fetchone()[0]
        cur.execute("UPDATE report_pdfs SET job_id = %s WHERE id = %s", (jid, pid))
        c.commit()
        return pid, jid
    finally:
        c.close()


def wait_pdf(s, pid, timeout=30):
    def state():
        r = s.sql("SELECT state, error, path, size, sha256, sop_uid FROM report_pdfs "
                  "WHERE id = %s", (pid,))[0]
        return r if r[0] != "pending" else None
    return kp.wait_for(state, timeout, f"report_pdfs {pid} to leave pending")


def pdf_bytes(s, row):
    with open(os.path.join(s.env["KP_STORAGE_ROOT"], row[2]), "rb") as f:
        return f.read()


def pdftotext(data):
    with tempfile.NamedTemporaryFile(suffix=".pdf") as f:
        f.write(data)
        f.flush()
        r = subprocess.run(["pdftotext", "-enc", "UTF-8", f.name, "-"], capture_output=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode()


def norm(t):
    return re.sub(r"\s+", " ", t).strip()


def body_text(text, footer):
    """The text of every page without the running header (first line of pages 2..) and the
    footer (a line matching the footer pattern), so that a paragraph broken over two pages reads
    as one again."""
    pages = []
    for i, page in enumerate(text.split("\f")):
        lines = [l for l in page.splitlines() if l.strip()]
        if i > 0 and lines:
            lines = lines[1:]
        pages.append("\n".join(l for l in lines if not re.fullmatch(footer, l.strip())))
    return norm("\n".join(pages))


def pdf_pages(data):
    with tempfile.NamedTemporaryFile(suffix=".pdf") as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["pdfinfo", f.name], capture_output=True, text=True, timeout=60)
        return int(re.search(r"^Pages:\s+(\d+)", out.stdout, re.M).group(1))


def dark_pixels(data, page=1):
    """Pixels darker than mid-grey on a page rendered at 30 dpi by pdftoppm."""
    with tempfile.TemporaryDirectory() as d:
        pdf = os.path.join(d, "r.pdf")
        with open(pdf, "wb") as f:
            f.write(data)
        subprocess.run(["pdftoppm", "-r", "30", "-png", "-f", str(page), "-l", str(page), pdf,
                        os.path.join(d, "p")], check=True, capture_output=True, timeout=60)
        png = [n for n in os.listdir(d) if n.endswith(".png")]
        assert len(png) == 1, png
        with open(os.path.join(d, png[0]), "rb") as f:
            w, h, ch, rows = png_decode(f.read())
    assert w > 200 and h > 300  # A4 at 30 dpi: 248 x 351
    return sum(1 for row in rows for x in range(0, len(row), ch) if row[x] < 128)


def doc_instances(s):
    return s.sql("SELECT i.sop_uid, se.series_uid, se.modality, st.study_uid, i.path FROM "
                 "instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON "
                 "st.pk = se.study_pk WHERE se.modality = 'DOC' ORDER BY i.pk")


@pytest.mark.parametrize("lang", list(LANGS))
def test_languages(rs, lang):
    t = LANGS[lang]
    pid, jid = request_pdf(rs, lang, {"clinical_information": "", "findings": t["findings"],
                                      "impression": t["impression"]})
    row = wait_pdf(rs, pid)
    assert row[0] == "done", row
    data = pdf_bytes(rs, row)
    assert data.startswith(b"%PDF-")
    assert len(data) == row[3]
    import hashlib
    assert hashlib.sha256(data).hexdigest() == row[4]
    text = norm(pdftotext(data))
    for expected in (t["findings"], t["impression"], t["heading"], t["impression_heading"],
                     t["page"], t["date"], t["signed"], "Иванов, Иван Петрович", "REP-1",
                     "Клиника «Здоровье»", "ул. Ленина, 1", "101000 Москва", "Щукин, Пётр",
                     "Др. Анна Щукина", "КТ грудной клетки", "ACC-REP-1"):
        assert norm(expected) in text, (expected, text)
    assert pdf_pages(data) == 1
    assert dark_pixels(data) > 200
    assert rs.sql("SELECT state FROM jobs WHERE id = %s", (jid,))[0][0] == "done"


def test_long_report_breaks_pages(rs):
    paras = [f"Paragraph {i}: the lung parenchyma shows sentence marker S{i:03d}X with "
             f"Съешь ещё {i} мягких булок and a longish tail of words to wrap around." for i in
             range(300)]
    long_word = "Щ" * 400  # one word longer than a line: broken between letters
    pid, _ = request_pdf(rs, "ru", {"findings": "\n\n".join(paras),
                                    "recommendations": "- первый пункт\n- " + long_word})
    row = wait_pdf(rs, pid, timeout=60)
    assert row[0] == "done", row
    data = pdf_bytes(rs, row)
    pages = pdf_pages(data)
    assert pages > 1
    raw = pdftotext(data)
    assert raw.count("\f") >= pages - 1
    # the running header of the following pages names the clinic and the patient
    assert all(norm(p).startswith("Клиника «Здоровье» · Иванов, Иван Петрович · ID пациента "
                                  "REP-1") for p in raw.split("\f")[1:] if p.strip())
    text = body_text(raw, r"Страница \d+ из \d+")
    for p in paras:  # every sentence, whole, in order of appearance
        assert p in text, p
    positions = [text.index(p) for p in paras]
    assert positions == sorted(positions)
    assert long_word in text.replace(" ", "")
    assert "первый пункт" in text
    for n in range(1, pages + 1):
        assert f"Страница {n} из {pages}" in raw
    assert dark_pixels(data, 1) > 200 and dark_pixels(data, pages) > 20


def test_draft_label_and_clean_text(rs):
    findings = ("Черновик текста: **важно** и *курсив*, без подписи. \\*Звёзды\\* и \\\\ "
                "черта, <b>&amp;</b> Größe 2*3 cm, ein * allein\n- пункт")
    pid, _ = request_pdf(rs, "de", {"findings": findings}, signed=False)
    row = wait_pdf(rs, pid)
    assert row[0] == "done", row
    text = norm(pdftotext(pdf_bytes(rs, row)))
    # markup markers and escapes are not printed, everything else is, literally; the text is
    # whole (the diagonal watermark is not extracted as text)
    assert ("Черновик текста: важно и курсив, без подписи. *Звёзды* и \\ черта, <b>&amp;</b> "
            "Größe 2*3 cm, ein * allein • пункт") in text, text
    assert "ENTWURF: nicht signiert" in text
    assert "Verfasst von: Др. Анна Щукина" in text
    assert "Elektronisch signiert" not in text


def fetch_instance(rs, study, series, sop):
    st, h, body = rs.https("GET", f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                           {"Accept": DICOM_ACCEPT})
    assert st == 200, body[:300]
    parts = parse_multipart(body)
    assert len(parts) == 1 and parts[0][0].startswith("application/dicom"), parts[0][0]
    return dcm_from_bytes(parts[0][1])


def test_encapsulated_instance(rs):
    # (the pad byte of an odd-length document is checked by tests/unit/lib/test_encap.c)
    pid, _ = request_pdf(rs, "fr", {"findings": LANGS["fr"]["findings"]})
    row = wait_pdf(rs, pid)
    assert row[0] == "done", row
    data = pdf_bytes(rs, row)
    sop = row[5]
    assert sop and sop.startswith("2.25.")
    inst = kp.wait_for(lambda: [r for r in doc_instances(rs) if r[0] == sop], 30,
                       "the encapsulated PDF to be indexed")[0]
    assert inst[2] == "DOC" and inst[3] == STUDY
    # QIDO-RS finds the DOC series in the study
    st, h, body = rs.https("GET", f"/dicom-web/studies/{STUDY}/series?Modality=DOC",
                           {"Accept": "application/dicom+json"})
    assert st == 200, body[:300]
    series = {s["0020000E"]["Value"][0] for s in json.loads(body)}
    assert inst[1] in series
    st, h, body = rs.https("GET", f"/dicom-web/studies?StudyInstanceUID={STUDY}",
                           {"Accept": "application/dicom+json"})
    assert "DOC" in json.loads(body)[0]["00080061"]["Value"]
    # WADO-RS: the document equals the PDF (without the pad byte of an odd length)
    ds = fetch_instance(rs, STUDY, inst[1], sop)
    doc = bytes(ds.EncapsulatedDocument)
    assert len(doc) % 2 == 0
    if len(data) % 2:
        assert doc[-1] == 0
        doc = doc[:-1]
    assert doc == data
    assert ds.EncapsulatedDocumentLength == len(data)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.Modality == "DOC" and ds.BurnedInAnnotation == "YES"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert ds.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.DocumentTitle.startswith("Compte rendu d'imagerie")
    # Patient and Study modules are those of the received images
    img = pydicom.dcmread(os.path.join(rs.env["KP_STORAGE_ROOT"], rs.sql(
        "SELECT i.path FROM instances i JOIN series se ON se.pk = i.series_pk "
        "WHERE se.modality = 'CT' LIMIT 1")[0][0]))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
               "ReferringPhysicianName", "StudyID"):
        assert str(ds.get(kw)) == str(img.get(kw)), kw
    assert str(ds.PatientName) == "Иванов^Иван^Петрович"


def test_redelivery_makes_no_second_instance(rs):
    pid, jid = request_pdf(rs, "es", {"impression": LANGS["es"]["impression"]})
    row = wait_pdf(rs, pid)
    assert row[0] == "done", row
    sop = row[5]
    kp.wait_for(lambda: any(r[0] == sop for r in doc_instances(rs)), 30, "indexed")
    before = doc_instances(rs)
    # 1. the same job again (a redelivery after success): acknowledged, nothing new
    rs.sql("UPDATE jobs SET state = 'pending', attempts = 0, lease_until = now() WHERE id = %s",
           (jid,))
    kp.wait_for(lambda: rs.sql("SELECT state FROM jobs WHERE id = %s", (jid,))[0][0] == "done",
                30, "the redelivered job to be done")
    # 2. a crash after the instance was stored but before the row was updated: the job runs
    #    again in full and stores the same instance (same UID, same bytes)
    rs.sql("UPDATE report_pdfs SET state = 'pending', sop_uid = NULL WHERE id = %s", (pid,))
    rs.sql("UPDATE jobs SET state = 'pending', attempts = 0, lease_until = now() WHERE id = %s",
           (jid,))
    row2 = wait_pdf(rs, pid)
    assert row2[0] == "done" and row2[5] == sop and row2[4] == row[4]
    rs.wait_jobs_settled()
    assert doc_instances(rs) == before
    assert rs.sql("SELECT count(*) FROM instances WHERE sop_uid = %s", (sop,))[0][0] == 1


def test_failures_are_recorded_and_worker_goes_on(rs):
    missing = ROOT + ".999"
    pid, jid = request_pdf(rs, "en", {"findings": "text"}, study=missing)
    row = wait_pdf(rs, pid)
    assert row[0] == "failed" and missing in row[1] and "not in the archive" in row[1], row
    job = rs.sql("SELECT state, last_error FROM jobs WHERE id = %s", (jid,))[0]
    assert job[0] == "failed" and "not in the archive" in job[1]
    # a malformed job is failed too, and the worker still serves the next one
    bad = rs.sql("INSERT INTO jobs (type, payload, lease_until) VALUES ('report.pdf', "
                 "'{\"pdf\": 1}', now()) RETURNING id")[0][0]
    kp.wait_for(lambda: rs.sql("SELECT state FROM jobs WHERE id = %s", (bad,))[0][0] == "failed",
                30, "the malformed job to be failed")
    pid, _ = request_pdf(rs, "en", {"findings": "After the failures."})
    assert wait_pdf(rs, pid)[0] == "done"
    assert rs.alive("pacs-reporter#0")


def test_through_the_reports_api(rs):
    """The whole path with the real API: create, sign, ask for the PDF (202), poll its state,
    download it; the download is the stored file and the instance is in the study."""
    findings = "Через API: «Щ» и **жирный** текст."
    st, h, body = rs.https("POST", f"/api/studies/{STUDY}/reports",
                           {"Content-Type": "application/json"},
                           json.dumps({"language": "ru", "sections": {"findings": findings}}))
    if st == 404 and b"not_found" in body and b"study" not in body.lower():
        pytest.skip("the reports API is not in this build")
    assert st == 201, body[:300]
    rep = json.loads(body)
    st, h, body = rs.https("POST", f"/api/reports/{rep['id']}/sign",
                           {"Content-Type": "application/json"},
                           json.dumps({"lock_version": rep["lock_version"]}))
    assert st == 200, body[:300]
    st, h, body = rs.https("POST", f"/api/reports/{rep['id']}/pdf", {"X-Request-Id": "pdf-req-9"})
    assert st == 202, body[:300]
    pdf_id = json.loads(body)["pdf_id"]
    # the request id rides the job into the reporter's log lines
    assert rs.sql("SELECT payload->>'rid' FROM jobs WHERE id = %s",
                  (json.loads(body)["job_id"],)) == [("pdf-req-9",)]

    def done():
        st, h, b = rs.https("GET", f"/api/report-pdfs/{pdf_id}")
        j = json.loads(b)
        return j if j["state"] != "pending" else None
    j = kp.wait_for(done, 30, "the PDF to be rendered")
    assert j["state"] == "done" and j["sop_uid"], j
    st, h, data = rs.https("GET", f"/api/reports/{rep['id']}/pdf")
    assert st == 200 and h["content-type"].startswith("application/pdf")
    row = wait_pdf(rs, pdf_id)
    assert data == pdf_bytes(rs, row)
    text = norm(pdftotext(data))
    assert "Через API: «Щ» и жирный текст." in text
    assert "Подписано электронной подписью" in text
    kp.wait_for(lambda: any(r[0] == j["sop_uid"] for r in doc_instances(rs)), 30,
                "the instance to be indexed")
    assert "rid=pdf-req-9]" in rs.log("pacs-reporter#0"), rs.log("pacs-reporter#0")[-2000:]
