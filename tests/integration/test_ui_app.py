"""The web application at /app in a real browser (Debian's chromium through playwright-core,
app_ui.js): a doctor signs in, filters the worklist, writes a report in Russian whose autosave
survives a reload, signs it, gets the PDF (preview and download), amends it and compares the
versions; switching the language changes every visible label and OHIF follows (its study list
in Russian, with a Report column leading back to the report); an operator sees no report
editor; an administrator creates a custom role and a user, edits both (the role's permissions;
the user's roles, sites, name and e-mail, as the database shows; a built-in role is read-only;
a refusal shows the server's reason), and the user then signs in (in the language the
administrator chose) and enrols a second factor with the QR code; a report template made in the
Templates tab is offered to the doctor and starts a report; the worklist and the editor fit a
tablet. Screenshots of each screen go to the test's output directory, and one of
each to docs/screenshots/. Also: the files and fallbacks of /app, without a browser."""
import json
import os
import shutil
import subprocess

import pydicom
import pytest

import kp
from test_ui_ohif import CHROMIUM, PLAYWRIGHT, _missing

T = os.path.join(kp.PYDICOM_DATA, "test_files")
CT = os.path.join(T, "CT_small.dcm")
MR = os.path.join(T, "MR_small.dcm")
PW = "Browser-App-Pass-51"
WWW = os.path.join(kp.REPO, "gateway", "www")
DOCS_SHOTS = os.path.join(kp.REPO, "docs", "screenshots")
# one screenshot per screen goes into the documentation
DOC_SCREENS = ("login", "worklist", "report", "report-history", "worklist-ru", "worklist-tablet",
               "ohif-study-list-ru", "admin-users", "admin-roles", "admin-sites",
               "admin-modalities", "admin-routes", "admin-audit", "admin-system", "account",
               "admin-user-edit", "admin-templates")


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        s.send_each([CT, MR])
        s.add_user("drapp", PW, "doctor", sites=["default"])
        s.add_user("opapp", PW, "operator", sites=["default"])
        yield s
    finally:
        s.stop()


def test_app_files_and_fallback(gw):
    st, h, b = gw.https("GET", "/app/worklist", auth=False)
    assert st == 200 and h["Content-Type"].startswith("text/html") and b"/app/app.js" in b
    assert "script-src 'self'" in h["Content-Security-Policy"]
    for path in ("/app", "/app/", "/app/reports/12", "/app/admin/users", "/app/studies/1.2.3/report"):
        st, h, b2 = gw.https("GET", path, auth=False)
        assert st == 200 and b2 == b, path
    st, h, b = gw.https("GET", "/app/app.js", auth=False)
    assert st == 200 and h["Content-Type"].startswith("application/javascript")
    assert b == open(os.path.join(WWW, "app.js"), "rb").read()
    st, h, b = gw.https("GET", "/app/i18n/ru.json", auth=False)
    assert st == 200 and h["Content-Type"] == "application/json"
    assert json.loads(b)["nav.worklist"] == "Рабочий список"
    st, h, _ = gw.https("GET", "/app/style.css", auth=False)
    assert st == 200 and h["Content-Type"].startswith("text/css")
    st, h, b = gw.https("GET", "/app/login", auth=False)
    assert st == 200 and b'id="username"' in b
    for bad in ("/app/nothing.js", "/app/i18n/xx.json", "/app/../etc/passwd", "/app/.hidden",
                "/app/a/../../login.js"):
        st, _, b = gw.https("GET", bad, auth=False)
        # 404; a path normalised outside /app (the viewer's sign-in redirect), or refused
        assert st in (400, 404, 302) and b"root:" not in b, (bad, st)
    assert gw.https("GET", "/app/nothing.js", auth=False)[0] == 404
    assert gw.https("POST", "/app/worklist", auth=False)[0] == 405


def test_the_web_application_in_a_browser(gw, tmp_path):
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    shots = tmp_path / "shots"
    shots.mkdir()
    cat = {lang: json.load(open(os.path.join(WWW, "i18n", lang + ".json"), encoding="utf-8"))
           for lang in ("en", "ru")}
    spec = {"base": f"https://127.0.0.1:{gw.https_port}", "playwright": PLAYWRIGHT,
            "chromium": CHROMIUM, "shots": str(shots),
            "doctor": {"user": "drapp", "password": PW},
            "operator": {"user": "opapp", "password": PW},
            "admin": {"user": gw.ADMIN, "password": gw.ADMIN_PASSWORD},
            # both test patients are CompressedSamples^...: the prefix up to the given name's
            # last character finds one (CT1, not MR1)
            "study": {"uid": ds.StudyInstanceUID, "family": str(ds.PatientName).split("^")[0],
                      "prefix": str(ds.PatientName)[:-1].lower()},
            "russianFindings": "Очаговых изменений не выявлено.\n- желудочки не расширены",
            "russianImpression": "Норма.",
            "en": cat["en"], "ru": cat["ru"], "newUser": "nneu", "newRole": "reader",
            "password": "Neu-Nutzerin-Pass-77", "newSite": "north",
            "mrUid": pydicom.dcmread(MR, stop_before_pixels=True).StudyInstanceUID,
            "template": {"name": "MR spine (UI test)", "technique": "Sagittal T1 and T2, axial T2.",
                         "findings": "Vertebral bodies of normal height."}}
    st, _, b = gw.https("POST", "/api/sites", headers={"Content-Type": "application/json"},
                        body=json.dumps({"name": "north", "description": "North wing"}))
    assert st == 201, b
    spec["routeAe"] = "ARCHIVE"  # the routing rule's destination, registered first
    gw.pacsctl("ae", "add", "ARCHIVE", "--host", "127.0.0.1", "--port", "104")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    r = subprocess.run(["node", os.path.join(os.path.dirname(__file__), "app_ui.js"), str(path)],
                       capture_output=True, text=True, timeout=400)
    assert r.stdout.strip(), r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1, ensure_ascii=False))
    assert not out.get("error"), out
    s = {x["name"]: x for x in out["steps"]}

    login = s["login"]
    assert login["redirected"] and login["rows"] == 2
    wl = s["worklist"]
    assert "Report" in wl["headers"] and "Patient name" in wl["headers"]
    assert wl["filteredRows"] == 1 and "CompressedSamples, CT1" in wl["filteredText"], wl
    assert not wl["strayText"] and wl["overflow"] <= 0, wl  # the table fits 1280 pixels
    assert wl["ptRows"] == 0 and wl["noneRows"] == 2 and wl["statusText"] == "No report"
    assert wl["viewerHref"].startswith(f"/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}&lng=")

    rep = s["report"]
    assert rep["afterReload"] == spec["russianFindings"], rep  # autosave survived the reload
    assert rep["impressionAfterReload"] == "Норма."
    assert rep["signed"] and rep["readonlyAfterSign"] and not rep["strayText"]
    assert rep["preview"].startswith("blob:")
    assert rep["pdfName"] == f"report-{rep['reportId']}-v1.pdf"
    assert rep["pdfMagic"] == "%PDF-" and rep["pdfSize"] > 1000
    assert any("Дополнение." in line for line in rep["diffAdded"]), rep
    # a save from elsewhere, then an edit here: 409, said plainly, and nothing overwritten
    assert rep["otherSave"] == 200 and rep["readonlyAfterConflict"], rep
    assert rep["conflictText"].startswith(cat["en"]["report.conflict"]), rep
    assert gw.sql("SELECT sections->>'recommendations', sections->>'technique' FROM "
                  "report_versions WHERE report_id = %s AND status = 'draft'",
                  (rep["reportId"],)) == [("", "CT")]
    assert gw.sql("SELECT language, status FROM reports WHERE id = %s", (rep["reportId"],)) == \
        [("ru", "draft")]
    v1 = gw.sql("SELECT sections->>'findings', status FROM report_versions WHERE report_id = %s "
                "AND version = 1", (rep["reportId"],))
    assert v1 == [(spec["russianFindings"], "amended")] or v1 == [(spec["russianFindings"], "final")]

    lang = s["language"]
    assert lang["englishBefore"] > 15, lang  # the check could fail
    assert lang["englishAfter"] == [], lang  # every visible label changed
    assert lang["russianAfter"] > 15 and lang["i18nextLng"] == "ru"
    assert lang["afterReload"] == "Рабочий список"
    assert gw.sql("SELECT language FROM users WHERE username = 'drapp'") == [("en",)]  # back
    assert lang["viewerHref"].endswith("&lng=ru")
    assert lang["lngAfterOhif"] == "ru", lang  # OHIF's i18next kept the user's language
    assert lang["viewerRussian"] or lang["viewerTitles"], lang  # and the viewer speaks it
    assert lang["viewerLogo"].startswith("/app/studies/"), lang
    assert lang["ohifReportLink"] == f"/app/studies/{ds.StudyInstanceUID}/report"
    assert lang["ohifReportText"] == "Заключение"
    assert lang["fromOhif"].endswith(f"/app/reports/{rep['reportId']}")

    tab = s["tablet"]
    assert tab["overflow"] <= 0 and tab["reportOverflow"] <= 0, tab

    op = s["operator"]
    assert op["rows"] == 2 and op["viewerLinks"] == 2
    assert op["reportLinks"] == 0 and op["editor"] == 0 and op["statusFilter"] == 0
    assert "Report" not in op["headers"] and op["adminNav"] == 0
    assert op["message"] == cat["en"]["error.forbidden"]

    ad = s["admin"]
    assert "reader" in ad["role"] and "report.read" in ad["role"]
    assert "nneu" in ad["user"] and "reader" in ad["user"]
    assert ad["routesUnavailable"] == 0  # the routing API answers
    # the rule made in the form is stored as shown, and the disable button disabled it
    assert "CT to archive" in ad["routeRow"] and "Modality equals CT" in ad["routeRow"], ad
    assert "DICOM ARCHIVE" in ad["routeRow"] and "whole study" in ad["routeRow"], ad
    assert "association rejected" in ad["deliveryRow"] and "failed" in ad["deliveryRow"], ad
    assert ad["retried"] == ["POST"], ad
    rule = gw.sql("SELECT enabled, trigger, conditions::text, destinations::text FROM route_rules "
                  "WHERE name = 'CT to archive'")
    assert len(rule) == 1 and rule[0][0] is False and rule[0][1] == "study", rule
    assert '"ARCHIVE"' in rule[0][3] and '"Modality"' in rule[0][2], rule
    assert ad["workers"] >= 1 and ad["busOk"] == 1
    assert "report.sign" in ad["auditSign"] and "drapp" in ad["auditSign"]
    # the role's edit form: one more permission and a new description, stored
    assert ad["roleSaved"] == cat["en"]["admin.saved"] and "report.export" in ad["roleEdited"], ad
    assert gw.sql("SELECT array_agg(permission ORDER BY permission) FROM role_permissions "
                  "WHERE role = 'reader'") == [(["report.export", "report.read", "study.read"],)]
    assert gw.sql("SELECT description FROM roles WHERE name = 'reader'") == \
        [("Reads studies and reports, exports PDFs",)]
    assert ad["builtinNotice"] == 1 and ad["builtinEditable"] == 0, ad  # built-in: read-only
    # the user's edit form: roles, sites, name and e-mail changed, as the database shows
    assert ad["userSaved"] == cat["en"]["admin.saved"], ad
    assert "operator" in ad["userEdited"] and "north" in ad["userEdited"], ad
    assert gw.sql("SELECT display_name, email, array(SELECT role FROM user_roles WHERE user_id = "
                  "u.id ORDER BY role), array(SELECT s.name FROM user_sites us JOIN sites s ON "
                  "s.id = us.site_id WHERE us.user_id = u.id ORDER BY s.name) FROM users u "
                  "WHERE username = 'nneu'") == \
        [("Dr. Nina Neu-Meier", "nina.neu@example.org", ["operator", "reader"], ["default", "north"])]
    # a refusal shows the server's reason, and nothing changed
    assert "you cannot disable your own account" in ad["selfDisable"], ad
    assert gw.sql("SELECT disabled FROM users WHERE username = %s", (gw.ADMIN,)) == [(False,)]
    # the template made and changed in the Templates tab; the other one deleted
    tpl = spec["template"]
    assert ad["templateSaved"] == cat["en"]["admin.saved"] and tpl["name"] in ad["templateRows"]
    assert gw.sql("SELECT language, modality, body_part, sections->>'technique', "
                  "sections->>'findings' FROM report_templates WHERE name = %s", (tpl["name"],)) \
        == [("en", "MR", "", tpl["technique"], tpl["findings"])]
    assert gw.sql("SELECT count(*) FROM report_templates WHERE name = 'Throwaway'") == [(0,)]

    nu = s["newuser"]
    assert nu["lang"] == "de" and nu["title"] == "Arbeitsliste" and nu["rows"] == 2
    assert nu["writeLinks"] == 1  # opens the existing report; no "write report" without report.write
    assert nu["qrLoaded"] and nu["recoveryCodes"] == 10 and not nu["strayText"]
    assert gw.sql("SELECT totp_secret IS NOT NULL FROM users WHERE username = 'nneu'") == [(True,)]

    # the doctor's report editor offers it, and a report started from it has its text
    pick = s["template"]
    assert any(tpl["name"] in o for o in pick["options"]), pick
    assert pick["technique"] == tpl["technique"] and pick["findings"] == tpl["findings"], pick

    errors = [c for c in out["console"] if "favicon" not in c and "401" not in c]
    assert not [c for c in errors if "pageerror" in c or "Content Security Policy" in c], errors

    # every screen was shot; the documentation's copies are refreshed only on request
    # (KP_UPDATE_SCREENSHOTS=1 make test) or when one is missing, so a test run leaves the
    # working tree clean
    os.makedirs(DOCS_SHOTS, exist_ok=True)
    update = os.environ.get("KP_UPDATE_SCREENSHOTS") == "1"
    for name in DOC_SCREENS:
        src = shots / (name + ".png")
        assert src.is_file(), name
        dst = os.path.join(DOCS_SHOTS, name + ".png")
        if update or not os.path.exists(dst):
            shutil.copyfile(src, dst)
