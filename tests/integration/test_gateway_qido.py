"""pacs-gateway, first slice: QIDO-RS and WADO-RS metadata over real HTTPS on 127.0.0.1.

A System with the gateway ingests pydicom's test and charset files plus a few generated studies
with known attributes (storescu, as a modality would send them), then every matching form of
PS3.18 10.6 / PS3.4 C.2.2.2, the requests OHIF 3.13 makes (../shared/ohif.md L1, L2, V1-V4),
metadata, ETag/304, gzip, the HTTP->HTTPS redirect and the error cases are checked against it."""
import concurrent.futures
import gzip
import json
import socket
import ssl
import urllib.parse

import pytest

import datasets
import kp

ROOT = "1.2.826.0.1.3680043.10.1411.77"
SOP = datasets.SOP_CLASS

# study key -> attributes; series: (modality, number, description, date, time, instance numbers)
STUDIES = {
    "S1": dict(name="Müller^Jürgen", pid="GW-001", date="20200115", time="101500", acc="ACC-001",
               desc="Phantom CT head", ref="Doe^Jane", birth="19700101", sex="M",
               series=[("CT", 1, "Axial", "20200115", "101600", [3, 1, 2]),
                       ("CT", 2, "Coronal", "20200115", "102000", [1, 2])]),
    "S2": dict(name="Иванов^Иван", pid="GW-002", date="20210610", time="083000", acc="ACC-002",
               desc="MR knee", ref="", birth="19800202", sex="M",
               series=[("MR", 1, "T1 sag", "20210610", "083100", [1, 2])]),
    "S3": dict(name="SMITH^JOHN", pid="GW-003", date="20221231", time="235959", acc="ACC_003%",
               desc="US abdomen", ref="", birth="19900303", sex="M",
               series=[("US", 5, "Liver", "20221231", "235959", [1])]),
    "S4": dict(name="Müller^Jürgen", pid="GW-001", date="20230301", time="120000", acc="ACC-004",
               desc="Follow-up", ref="", birth="19700101", sex="M",
               series=[("MR", 1, "Brain", "20230301", "120100", [1]),
                       ("CT", 2, "Chest", "20230301", "121000", [1])]),
}


_DATA = datasets.Studies(ROOT, STUDIES)
study_uid, series_uid, sop_uid = _DATA.study_uid, _DATA.series_uid, _DATA.sop_uid
pydicom_files = datasets.pydicom_files


@pytest.fixture(scope="module")
def gw(cluster):
    s = kp.System(cluster, gateway=True)
    try:
        datasets.load(s, _DATA)
        yield s
    finally:
        s.stop()


# ---- helpers -------------------------------------------------------------------------------
def get(gw, path, headers=None):
    st, h, body = gw.https("GET", path, headers=headers)
    if h.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return st, h, body


def qido(gw, path, **params):
    q = urllib.parse.urlencode(params, safe="*?,")
    st, h, body = get(gw, path + ("?" + q if q else ""))
    assert st == 200, (path, params, st, body[:500])
    assert h["Content-Type"] == "application/dicom+json"
    return json.loads(body), h


def val(obj, tag):
    a = obj.get(tag)
    if a is None or "Value" not in a:
        return None
    v = a["Value"][0]
    return v.get("Alphabetic") if isinstance(v, dict) else v


def study_keys(rows):
    """The generated studies (S1..S4) among the rows, as a set of keys."""
    back = {study_uid(k): k for k in STUDIES}
    return {back[val(r, "0020000D")] for r in rows if val(r, "0020000D") in back}


def err_json(st, body, status, code=None):
    assert st == status, (st, body[:300])
    e = json.loads(body)["error"]
    assert e["code"] and e["message"]
    if code:
        assert e["code"] == code, e
    return e


# ---- QIDO-RS study level ---------------------------------------------------------------------
def test_default_study_attributes(gw):
    rows, _ = qido(gw, "/dicom-web/studies", limit=1000)
    assert study_keys(rows) == set(STUDIES)
    s1 = next(r for r in rows if val(r, "0020000D") == study_uid("S1"))
    for tag in ("00080005", "00080020", "00080030", "00080050", "00080056", "00080061",
                "00080090", "00100010", "00100020", "00100030", "00100040", "0020000D",
                "00200010", "00201206", "00201208", "00081030"):
        assert tag in s1, tag
    assert s1["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}
    assert val(s1, "00080020") == "20200115" and val(s1, "00080030") == "101500"
    assert val(s1, "00201206") == 2 and val(s1, "00201208") == 5
    assert s1["00080061"]["Value"] == ["CT"]
    assert val(s1, "00080056") == "ONLINE"
    assert val(s1, "00081030") == "Phantom CT head"
    assert val(s1, "00080090") == "Doe^Jane"
    s2 = next(r for r in rows if val(r, "0020000D") == study_uid("S2"))
    assert s2["00080090"] == {"vr": "PN"}  # empty value: vr only
    assert len(rows) == gw.count("studies")


def test_single_value_and_tag_keys(gw):
    rows, _ = qido(gw, "/dicom-web/studies", PatientID="GW-002")
    assert [val(r, "0020000D") for r in rows] == [study_uid("S2")]
    rows, _ = qido(gw, "/dicom-web/studies", **{"00100020": "GW-002"})
    assert [val(r, "0020000D") for r in rows] == [study_uid("S2")]
    rows, _ = qido(gw, "/dicom-web/studies", **{"0020000d": study_uid("S3")})
    assert [val(r, "0020000D") for r in rows] == [study_uid("S3")]
    rows, _ = qido(gw, "/dicom-web/studies", AccessionNumber="ACC-00")
    assert rows == []


def test_uid_list(gw):
    rows, _ = qido(gw, "/dicom-web/studies",
                   StudyInstanceUID=study_uid("S1") + "\\" + study_uid("S3"))
    assert study_keys(rows) == {"S1", "S3"} and len(rows) == 2


def test_universal_matching(gw):
    all_rows, _ = qido(gw, "/dicom-web/studies", limit=1000)
    rows, _ = qido(gw, "/dicom-web/studies", limit=1000, AccessionNumber="", PatientName="*")
    assert len(rows) == len(all_rows)
    # a universal key is returned even when not a default attribute
    rows, _ = qido(gw, "/dicom-web/studies", IssuerOfPatientID="", PatientID="GW-002")
    assert "00100021" in rows[0]


def test_wildcards_case_insensitive_names(gw):
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="*müller*")
    assert study_keys(rows) == {"S1", "S4"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="smith*")
    assert study_keys(rows) == {"S3"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="smit?^john")
    assert study_keys(rows) == {"S3"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="ИВАНОВ*")
    assert study_keys(rows) == {"S2"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="smith^john")  # single value
    assert study_keys(rows) == {"S3"}
    rows, _ = qido(gw, "/dicom-web/studies", StudyDescription="*phantom*")
    assert study_keys(rows) == {"S1"}
    rows, _ = qido(gw, "/dicom-web/studies", AccessionNumber="*ACC-00*")
    assert study_keys(rows) == {"S1", "S2", "S4"}


def test_like_special_characters_are_literal(gw):
    # '_' and '%' in a value are not SQL wildcards
    rows, _ = qido(gw, "/dicom-web/studies", AccessionNumber="ACC_003%")
    assert study_keys(rows) == {"S3"} and len(rows) == 1
    rows, _ = qido(gw, "/dicom-web/studies", AccessionNumber="ACC_00*")
    assert study_keys(rows) == {"S3"} and len(rows) == 1
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="%")
    assert rows == []


def test_date_and_time_ranges(gw):
    def dates(rows):
        return [val(r, "00080020") for r in rows]

    rows, _ = qido(gw, "/dicom-web/studies", StudyDate="20200101-20211231", limit=1000)
    assert study_keys(rows) == {"S1", "S2"}
    assert all("20200101" <= d <= "20211231" for d in dates(rows))
    rows, _ = qido(gw, "/dicom-web/studies", StudyDate="20220101-", limit=1000)
    assert study_keys(rows) == {"S3", "S4"}
    assert all(d >= "20220101" for d in dates(rows))
    rows, _ = qido(gw, "/dicom-web/studies", StudyDate="-20200115", limit=1000)
    assert "S1" in study_keys(rows) and not study_keys(rows) & {"S2", "S3", "S4"}
    assert all(d and d <= "20200115" for d in dates(rows))
    rows, _ = qido(gw, "/dicom-web/studies", StudyDate="20210610")
    assert study_keys(rows) == {"S2"}
    rows, _ = qido(gw, "/dicom-web/studies", StudyTime="2300-", PatientID="GW-003")
    assert study_keys(rows) == {"S3"}
    rows, _ = qido(gw, "/dicom-web/studies", StudyTime="-1015", limit=1000)
    assert {"S1", "S2"} <= study_keys(rows) and not study_keys(rows) & {"S3", "S4"}


def test_modalities_in_study(gw):
    rows, _ = qido(gw, "/dicom-web/studies", ModalitiesInStudy="CT,MR", limit=1000)
    assert study_keys(rows) == {"S1", "S2", "S4"}
    assert all(set(r["00080061"]["Value"]) & {"CT", "MR"} for r in rows)
    st, _, body = get(gw, "/dicom-web/studies?ModalitiesInStudy=US%2CXA&limit=1000")
    assert study_keys(json.loads(body)) == {"S3"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientID="GW-001")
    s4 = next(r for r in rows if val(r, "0020000D") == study_uid("S4"))
    assert sorted(s4["00080061"]["Value"]) == ["CT", "MR"]


def test_fuzzy_matching(gw):
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="иванов", fuzzymatching="true")
    assert study_keys(rows) == {"S2"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="muller", fuzzymatching="true")
    assert study_keys(rows) == {"S1", "S4"}
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="JURGEN", fuzzymatching="true")
    assert study_keys(rows) == {"S1", "S4"}
    # accents matter without fuzzy matching
    rows, _ = qido(gw, "/dicom-web/studies", PatientName="muller*", fuzzymatching="false")
    assert study_keys(rows) == set()


def test_includefield(gw):
    rows, _ = qido(gw, "/dicom-web/studies", StudyInstanceUID=study_uid("S1"),
                   includefield="00081030,00080060,00080090,00100030")
    r = rows[0]
    assert val(r, "00080060") == "CT"  # not a study column: from the stored metadata
    assert val(r, "00081030") == "Phantom CT head" and val(r, "00100030") == "19700101"
    st, _, body = get(gw, "/dicom-web/studies?StudyInstanceUID=%s&includefield=00280010"
                      "&includefield=BitsStored" % study_uid("S1"))
    r = json.loads(body)[0]
    assert r["00280010"]["Value"] == [8]
    rows, _ = qido(gw, "/dicom-web/studies", StudyInstanceUID=study_uid("S1"), includefield="all")
    assert "00080062" in rows[0] and rows[0]["00080062"]["Value"] == [SOP["CT"]]
    rows, h = qido(gw, "/dicom-web/studies", StudyInstanceUID=study_uid("S1"),
                   includefield="NoSuchKeyword")
    assert "NoSuchKeyword" in h.get("Warning", "")


def test_limit_offset_paging(gw):
    pages = []
    for off in range(3):
        rows, _ = qido(gw, "/dicom-web/studies", PatientID="GW-001", limit=1, offset=off)
        pages.append([val(r, "0020000D") for r in rows])
    assert pages == [[study_uid("S4")], [study_uid("S1")], []]  # newest first
    total = gw.count("studies")
    seen = []
    for off in range(0, total + 3, 3):
        rows, _ = qido(gw, "/dicom-web/studies", limit=3, offset=off)
        seen += [val(r, "0020000D") for r in rows]
    assert len(seen) == total == len(set(seen))
    rows, _ = qido(gw, "/dicom-web/studies")
    assert len(rows) == min(total, 100)


def test_limit_clamped_and_bad_numbers(gw):
    rows, h = qido(gw, "/dicom-web/studies", limit=5000)
    assert "1000" in h["Warning"] and h["Warning"].startswith("299 ")
    for bad in ("-1", "abc", "99999999999999999999", "1e3"):
        st, _, body = get(gw, "/dicom-web/studies?limit=" + bad)
        err_json(st, body, 400, "invalid_argument")
    st, _, body = get(gw, "/dicom-web/studies?offset=-5")
    err_json(st, body, 400)


def test_unknown_parameter_warning(gw):
    rows, h = qido(gw, "/dicom-web/studies", PatientID="GW-002", orderby="PatientName")
    assert study_keys(rows) == {"S2"}
    assert h["Warning"].startswith("299 ") and "orderby" in h["Warning"]
    rows, h = qido(gw, "/dicom-web/studies", PatientID="GW-002")
    assert "Warning" not in h


def test_bad_values_are_400_json(gw):
    for q in ("StudyDate=2020", "StudyDate=20200101-2021", "StudyDate=-", "StudyTime=25x",
              "StudyInstanceUID=abc", "StudyInstanceUID=1.2.%2A", "fuzzymatching=maybe",
              "PatientID=a&PatientID=b", "PatientName=%zz", "ModalitiesInStudy=ct;drop"):
        st, _, body = get(gw, "/dicom-web/studies?" + q)
        err_json(st, body, 400, "invalid_argument")
    st, _, body = get(gw, "/dicom-web/studies/%s/series?SeriesNumber=x" % study_uid("S1"))
    err_json(st, body, 400)


# ---- series and instance levels --------------------------------------------------------------
def test_series_level(gw):
    rows, _ = qido(gw, "/dicom-web/studies/%s/series" % study_uid("S1"))
    assert [val(r, "0020000E") for r in rows] == [series_uid("S1", 0), series_uid("S1", 1)]
    assert [val(r, "00201209") for r in rows] == [3, 2]
    assert all(val(r, "0020000D") == study_uid("S1") for r in rows)
    rows, _ = qido(gw, "/dicom-web/series", Modality="MR", limit=1000)
    ours = {val(r, "0020000E") for r in rows} & {series_uid(k, i) for k in STUDIES
                                                  for i in range(2)}
    assert ours == {series_uid("S2", 0), series_uid("S4", 0)}
    assert all(val(r, "00080060") == "MR" for r in rows)
    assert all("00100010" in r for r in rows)  # study attributes when the study is not in the path
    rows, _ = qido(gw, "/dicom-web/series", PatientName="*müller*", SeriesDescription="chest")
    assert [val(r, "0020000E") for r in rows] == [series_uid("S4", 1)]
    rows, _ = qido(gw, "/dicom-web/studies/%s/series" % study_uid("S1"), SeriesNumber="2")
    assert [val(r, "0008103E") for r in rows] == ["Coronal"]


def test_instance_level(gw):
    rows, _ = qido(gw, "/dicom-web/studies/%s/series/%s/instances"
                   % (study_uid("S1"), series_uid("S1", 0)))
    assert [val(r, "00200013") for r in rows] == [1, 2, 3]
    r = rows[0]
    assert val(r, "00080016") == SOP["CT"] and val(r, "00280010") == 8 and val(r, "00280100") == 16
    assert val(r, "00080018") == sop_uid("S1", 0, 1)
    rows, _ = qido(gw, "/dicom-web/studies/%s/instances" % study_uid("S1"))
    assert len(rows) == 5
    rows, _ = qido(gw, "/dicom-web/instances", SOPInstanceUID=sop_uid("S4", 1, 1),
                   includefield="00280101")
    assert len(rows) == 1 and val(rows[0], "00280101") == 12
    assert val(rows[0], "0020000E") == series_uid("S4", 1)
    rows, _ = qido(gw, "/dicom-web/studies/%s/series/%s/instances"
                   % (study_uid("S1"), series_uid("S1", 0)), InstanceNumber="2")
    assert [val(r, "00080018") for r in rows] == [sop_uid("S1", 0, 2)]
    rows, _ = qido(gw, "/dicom-web/studies/1.2.3.4/series")
    assert rows == []


def test_every_stored_patient_name_is_found(gw):
    """Charset files included: each stored name, sent back exactly, finds its studies, and the
    Alphabetic group comes back as stored."""
    names = gw.sql("SELECT patient_name, array_agg(study_uid) FROM studies WHERE patient_name "
                   "<> '' AND patient_name NOT LIKE '%\\\\%' AND patient_name !~ '[*?%_]' "
                   "GROUP BY 1")
    assert len(names) >= 10
    for name, uids in names:
        rows, _ = qido(gw, "/dicom-web/studies", PatientName=name, limit=1000)
        got = {val(r, "0020000D") for r in rows}
        assert set(uids) <= got, name
        r = next(r for r in rows if val(r, "0020000D") == uids[0])
        assert r["00100010"]["Value"][0].get("Alphabetic", "") == name.split("=")[0], name


# ---- OHIF's requests (ohif.md 4.1-4.3) ----------------------------------------------------------
L1_FIELDS = "includefield=00081030%2C00080060%2C00080090%2C00100030"


def test_ohif_l1_study_list(gw):
    st, h, body = get(gw, "/dicom-web/studies?limit=101&offset=0&fuzzymatching=false&"
                      + L1_FIELDS, headers={"Accept": "application/dicom+json",
                                            "Accept-Encoding": "gzip, deflate, br, zstd"})
    assert st == 200
    rows = json.loads(body)
    assert study_keys(rows) == set(STUDIES)
    for r in rows:
        for tag in ("0020000D", "00080020", "00080030", "00080050", "00100020", "00100010",
                    "00100030", "00201208", "00081030", "00080061", "00080090"):
            assert tag in r, tag
    s1 = next(r for r in rows if val(r, "0020000D") == study_uid("S1"))
    assert val(s1, "00081030") == "Phantom CT head" and val(s1, "00080060") == "CT"


def test_ohif_l2_v2_series(gw):
    rows, _ = qido(gw, "/dicom-web/studies/%s/series" % study_uid("S1"),
                   includefield="0008103E,00080021")
    for r in rows:
        for tag in ("0020000E", "00080060", "00200011", "00080021", "00201209", "0008103E"):
            assert tag in r, tag
    assert [val(r, "0008103E") for r in rows] == ["Axial", "Coronal"]
    st, _, body = get(gw, "/dicom-web/studies/%s/series?includefield=00080021%%2C00080031%%2C"
                      "0008103E%%2C00200011&SeriesInstanceUID=%s"
                      % (study_uid("S1"), series_uid("S1", 1)))
    rows = json.loads(body)
    assert len(rows) == 1 and val(rows[0], "00080031") == "102000"
    assert val(rows[0], "00200011") == 2 and val(rows[0], "00080021") == "20200115"


def test_ohif_v1_v3(gw):
    st, _, body = get(gw, "/dicom-web/studies?limit=101&offset=0&fuzzymatching=false&"
                      + L1_FIELDS + "&StudyInstanceUID=" + study_uid("S2"))
    rows = json.loads(body)
    assert [val(r, "0020000D") for r in rows] == [study_uid("S2")]
    assert val(rows[0], "00100010") == "Иванов^Иван"
    st, _, body = get(gw, "/dicom-web/studies?00100020=GW-001&limit=101&offset=0&"
                      "fuzzymatching=false&" + L1_FIELDS)
    assert study_keys(json.loads(body)) == {"S1", "S4"} and len(json.loads(body)) == 2
    # the study-list filters of 4.2 (supportsWildcard)
    st, _, body = get(gw, "/dicom-web/studies?limit=101&offset=0&fuzzymatching=false&"
                      + L1_FIELDS + "&00100020=*GW-00*&AccessionNumber=*ACC-001*")
    assert study_keys(json.loads(body)) == {"S1"}


# ---- WADO-RS metadata ------------------------------------------------------------------------
def stored(gw, where, args):
    rows = gw.sql("SELECT i.metadata FROM instances i JOIN series se ON se.pk = i.series_pk "
                  "JOIN studies st ON st.pk = se.study_pk WHERE " + where +
                  " ORDER BY se.series_number, se.pk, i.instance_number, i.pk", args)
    return [r[0] for r in rows]


def test_v4_series_metadata_equals_stored_json(gw):
    st, h, body = get(gw, "/dicom-web/studies/%s/series/%s/metadata"
                      % (study_uid("S1"), series_uid("S1", 0)))
    assert st == 200 and h["Content-Type"] == "application/dicom+json"
    md = json.loads(body)
    assert md == stored(gw, "se.series_uid = %s", (series_uid("S1", 0),))
    assert [m["00200013"]["Value"][0] for m in md] == [1, 2, 3]
    assert all(m["00280010"]["Value"] == [8] for m in md)


def test_study_and_instance_metadata(gw):
    st, _, body = get(gw, "/dicom-web/studies/%s/metadata" % study_uid("S4"))
    assert json.loads(body) == stored(gw, "st.study_uid = %s", (study_uid("S4"),))
    assert len(json.loads(body)) == 2
    st, _, body = get(gw, "/dicom-web/studies/%s/series/%s/instances/%s/metadata"
                      % (study_uid("S1"), series_uid("S1", 1), sop_uid("S1", 1, 2)))
    assert json.loads(body) == stored(gw, "i.sop_uid = %s", (sop_uid("S1", 1, 2),))
    # every pydicom file's metadata too
    uids = [r[0] for r in gw.sql("SELECT study_uid FROM studies")]
    for u in uids:
        st, _, body = get(gw, "/dicom-web/studies/%s/metadata" % u)
        assert st == 200 and json.loads(body) == stored(gw, "st.study_uid = %s", (u,)), u


def test_metadata_404(gw):
    for p in ("/dicom-web/studies/1.2.3.999/metadata",
              "/dicom-web/studies/%s/series/1.2.3.999/metadata" % study_uid("S1"),
              "/dicom-web/studies/%s/series/%s/instances/1.2.3/metadata"
              % (study_uid("S1"), series_uid("S1", 0)),
              "/dicom-web/studies/%s/series/%s/metadata" % (study_uid("S1"), series_uid("S2", 0))):
        st, _, body = get(gw, p)
        err_json(st, body, 404, "not_found")


def test_etag_304(gw):
    p = "/dicom-web/studies/%s/series/%s/metadata" % (study_uid("S1"), series_uid("S1", 0))
    st, h, body = get(gw, p)
    etag = h["ETag"]
    assert st == 200 and etag.startswith('"') and len(body) > 100
    st, h2, body2 = gw.https("GET", p, headers={"If-None-Match": etag})
    assert st == 304 and body2 == b"" and h2["ETag"] == etag
    st, _, body3 = gw.https("GET", p, headers={"If-None-Match": '"other"'})
    assert st == 200 and json.loads(body3) == json.loads(body)
    # another series has another tag
    st, h4, _ = get(gw, "/dicom-web/studies/%s/series/%s/metadata"
                    % (study_uid("S1"), series_uid("S1", 1)))
    assert h4["ETag"] != etag


def test_gzip(gw):
    p = "/dicom-web/studies/%s/metadata" % study_uid("S1")
    st, h, raw = gw.https("GET", p, headers={"Accept-Encoding": "gzip, deflate, br, zstd"})
    assert st == 200 and h["Content-Encoding"] == "gzip"
    st, h2, plain = gw.https("GET", p)
    assert "Content-Encoding" not in h2 and int(h2["Content-Length"]) == len(plain)
    assert gzip.decompress(raw) == plain and len(raw) < len(plain)
    st, h, raw = gw.https("GET", "/dicom-web/studies?limit=1000", headers={"Accept-Encoding": "gzip"})
    assert h["Content-Encoding"] == "gzip" and json.loads(gzip.decompress(raw))


# ---- HTTP behaviour --------------------------------------------------------------------------
def test_http_redirects_to_https(gw):
    st, h, _ = gw.https("GET", "/dicom-web/studies?PatientID=x", tls=False)
    assert st == 301
    assert h["Location"] == "https://127.0.0.1:%d/dicom-web/studies?PatientID=x" % gw.https_port
    st, h, _ = gw.https("GET", "/", tls=False, headers={"Host": "pacs.example.org:8080"})
    assert st == 301 and h["Location"] == "https://pacs.example.org:%d/" % gw.https_port
    st, h, _ = gw.https("GET", "/", tls=False, headers={"Host": "evil\"host"})
    assert st == 400


def test_security_headers(gw):
    for p in ("/dicom-web/studies", "/nope"):
        st, h, _ = gw.https("GET", p)
        assert h["Strict-Transport-Security"].startswith("max-age=")
        assert h["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'self'" in h["Content-Security-Policy"]
        assert h["X-Frame-Options"] == "SAMEORIGIN" and h["Referrer-Policy"]
        assert "h2o" not in h.get("Server", "").lower()


def test_errors_are_json(gw):
    st, _, body = get(gw, "/dicom-web/studies/1.2.abc/series")
    err_json(st, body, 400, "invalid_argument")
    st, _, body = get(gw, "/dicom-web/studies/" + "1" * 65 + "/series")
    err_json(st, body, 400)
    st, _, body = get(gw, "/dicom-web/nothing-here")
    err_json(st, body, 404, "not_found")
    st, h, body = gw.https("DELETE", "/dicom-web/studies/%s/metadata" % study_uid("S1"))
    err_json(st, body, 405)
    assert h["Allow"] == "GET"


def test_path_traversal(gw):
    for p in ("/dicom-web/studies/../../etc/passwd", "/dicom-web/studies/%2e%2e/%2e%2e/etc/passwd",
              "/dicom-web/studies/..%2f..%2fetc%2fpasswd/metadata", "/../../../etc/passwd",
              "/dicom-web/studies/1.2/series/..%00/metadata"):
        st, _, body = gw.https("GET", p)
        assert 400 <= st < 500, (p, st)
        assert b"root:" not in body
        json.loads(body)["error"]


def test_limits_and_still_answering(gw):
    st, _, body = gw.https("GET", "/dicom-web/studies", headers={"X-Big": "a" * 64 * 1024})
    assert st in (400, 413, 431), st
    hdrs = {f"X-H{i}": "v" for i in range(200)}
    st, _, _ = gw.https("GET", "/dicom-web/studies", headers=hdrs)
    assert 400 <= st < 500
    # clients that vanish before their answer: nothing must break
    for _ in range(30):
        raw = socket.create_connection(("127.0.0.1", gw.https_port))
        tls = ssl._create_unverified_context().wrap_socket(raw)
        tls.sendall(b"GET /dicom-web/studies?limit=1000&includefield=all HTTP/1.1\r\n"
                    b"Host: x\r\n\r\n")
        tls.close()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        res = list(ex.map(lambda i: gw.https("GET", "/dicom-web/studies?limit=%d" % (i + 1))[0],
                          range(48)))
    assert res == [200] * 48
    assert gw.alive("pacs-gateway")
    rows, _ = qido(gw, "/dicom-web/studies", PatientID="GW-002")
    assert study_keys(rows) == {"S2"}
    log = gw.log("pacs-gateway")
    assert "GET /dicom-web/studies?PatientID=GW-002 200" in log
