"""Sites: a study belongs to the site its first instance maps to (sites.map: calling AE title,
InstitutionName), and a user sees only her sites' studies unless a role gives site.all — in
QIDO-RS, metadata, retrieval, frames, bulk data, rendered images and WADO-URI alike."""
import json
import os

import pydicom
import pytest

import kp

T = os.path.join(kp.PYDICOM_DATA, "test_files")
NORTH, SOUTH = os.path.join(T, "CT_small.dcm"), os.path.join(T, "MR_small.dcm")
PW = "Site-Test-Password-42"


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True, start=False,
                  extra_env={"KP_SITES_MAP": "calling_ae:NORTH_CT=north; calling_ae:SOUTH_MR=south"})
    try:
        s.sql("INSERT INTO sites (name) VALUES ('north'), ('south')")
        s.start_all()
        for f, aet in ((NORTH, "NORTH_CT"), (SOUTH, "SOUTH_MR")):
            rc, res, out = s.storescu([f], aet=aet)
            assert res[f] == "ok", out
        s.wait_jobs_settled()
        s.add_user("drnorth", PW, "doctor", sites=["north"])
        s.add_user("drboth", PW, "doctor", sites=["north", "south"])
        s.add_user("nosite", PW, "doctor")
        yield s
    finally:
        s.stop()


def token(gw, user):
    st, j = gw.login(user, PW)
    assert st == 200, j
    return {"Authorization": "Bearer " + j["access_token"]}


def paths(f):
    ds = pydicom.dcmread(f)
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    inst = f"/dicom-web/studies/{st}/series/{se}/instances/{sop}"
    return [f"/dicom-web/studies/{st}/series", f"/dicom-web/studies/{st}/metadata",
            f"/dicom-web/studies/{st}/series/{se}/metadata", f"{inst}/metadata",
            f"/dicom-web/studies/{st}", f"/dicom-web/studies/{st}/series/{se}", inst,
            f"{inst}/frames/1", f"{inst}/bulkdata/7FE00010", f"{inst}/rendered",
            f"/dicom-web/studies/{st}/thumbnail",
            f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}"
            "&contentType=application/dicom"], st


def test_studies_get_their_site_from_the_calling_ae(gw):
    rows = dict(gw.sql("SELECT st.study_uid, s.name FROM studies st JOIN sites s ON "
                       "s.id = st.site_id"))
    assert rows[pydicom.dcmread(NORTH).StudyInstanceUID] == "north"
    assert rows[pydicom.dcmread(SOUTH).StudyInstanceUID] == "south"


def test_a_doctor_of_one_site_sees_no_trace_of_another(gw):
    h = token(gw, "drnorth")
    north, nuid = paths(NORTH)
    south, suid = paths(SOUTH)
    st, _, body = gw.https("GET", "/dicom-web/studies", h)
    assert st == 200 and [s["0020000D"]["Value"][0] for s in json.loads(body)] == [nuid]
    for q in ("/dicom-web/series", "/dicom-web/instances",
              f"/dicom-web/studies?StudyInstanceUID={suid}", f"/dicom-web/studies/{suid}/instances"):
        st, _, body = gw.https("GET", q, h)
        assert st == 200 and suid.encode() not in body, q
    for p in north:
        assert gw.https("GET", p, h)[0] == 200, p
    for p in south:
        st, _, body = gw.https("GET", p, h)
        if p.endswith("/series"):  # QIDO of a study one may not see: an empty result
            assert st == 200 and json.loads(body) == [], p
        else:
            assert st == 404, (p, st, body[:200])


def test_several_sites_and_site_all(gw):
    for user_h in (token(gw, "drboth"), {}):  # {}: the test administrator (admin has site.all)
        st, _, body = gw.https("GET", "/dicom-web/studies", user_h)
        assert st == 200 and len(json.loads(body)) == 2
        for p in paths(SOUTH)[0]:
            assert gw.https("GET", p, user_h)[0] == 200, p


def test_a_user_without_sites_sees_nothing(gw):
    h = token(gw, "nosite")
    st, _, body = gw.https("GET", "/dicom-web/studies", h)
    assert st == 200 and json.loads(body) == []
    for p in paths(NORTH)[0][1:]:
        assert gw.https("GET", p, h)[0] == 404, p


def test_metadata_cache_does_not_leak_across_sites(gw):
    south, _ = paths(SOUTH)
    md = south[1]
    assert gw.https("GET", md)[0] == 200          # cached for the administrator (all sites)
    assert gw.https("GET", md, token(gw, "drnorth"))[0] == 404
