"""The modality registry: pacsctl ae add/list/remove/echo, with validation and a real C-ECHO;
access per operation (allow_store / allow_find / allow_retrieve) and site scope."""
import os
import re
import socket
import subprocess
import tempfile

import datasets
import kp


def test_registry_and_echo(cluster):
    s = kp.System(cluster, start=False)
    try:
        s.start("pacs-busd")
        s.start_dicomd()
        assert "no modality registered" in s.pacsctl("ae", "list").stdout
        r = s.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port", str(s.port),
                      "--description", "our own dicomd", "--site", "main")
        assert "added KLINIKA" in r.stdout
        r = s.pacsctl("ae", "add", "CT_SCANNER_2", "--host", "ct2.example", "--port", "104",
                      "--no-find", "--no-retrieve", "--tls")
        out = s.pacsctl("ae", "list").stdout
        assert "KLINIKA" in out and "our own dicomd" in out
        line = next(l for l in out.splitlines() if l.startswith("CT_SCANNER_2"))
        assert "store" in line and "find" not in line and "retrieve" not in line and " yes " in line
        assert line.split()[4:6] == ["yes", "1"], line  # tls; moves: 1 per C-MOVE by default
        r = s.pacsctl("ae", "add", "PARALLEL_WS", "--host", "ws.example", "--port", "104",
                      "--move-associations", "4")
        line = next(l for l in s.pacsctl("ae", "list").stdout.splitlines()
                    if l.startswith("PARALLEL_WS"))
        assert line.split()[6:8] == ["no", "4"], line  # tls, moves
        for bad in ("0", "17", "four", ""):
            r = s.pacsctl("ae", "add", "PARALLEL_WS", "--host", "ws.example", "--port", "104",
                          "--move-associations", bad, check=False)
            assert r.returncode == 2 and "--move-associations must be 1 to 16" in r.stderr, bad
        assert s.sql("SELECT move_associations FROM modalities WHERE ae_title = 'PARALLEL_WS'") \
            == [(4,)]
        s.pacsctl("ae", "remove", "PARALLEL_WS")
        # updating keeps one row
        assert "updated KLINIKA" in s.pacsctl("ae", "add", "KLINIKA", "--host", "127.0.0.1", "--port",
                                           str(s.port)).stdout
        assert s.sql("SELECT count(*) FROM modalities")[0][0] == 2

        # a real C-ECHO from KLINIKA to the registered peer (here our own daemon)
        r = s.pacsctl("ae", "echo", "KLINIKA")
        assert "success" in r.stdout
        # a registered peer that is not listening: a clear failure, no hang
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
        s.pacsctl("ae", "add", "DEAD", "--host", "127.0.0.1", "--port", str(dead))
        r = s.pacsctl("ae", "echo", "DEAD", check=False)
        assert r.returncode != 0 and "failed" in r.stdout
        # the peer rejects our association (wrong called AE for our daemon)
        s.pacsctl("ae", "add", "NOTKLINIKA", "--host", "127.0.0.1", "--port", str(s.port))
        r = s.pacsctl("ae", "echo", "NOTKLINIKA", check=False)
        assert r.returncode != 0 and "rejected" in r.stdout
        r = s.pacsctl("ae", "echo", "UNKNOWN", check=False)
        assert r.returncode != 0 and "not registered" in r.stderr

        assert "removed DEAD" in s.pacsctl("ae", "remove", "DEAD").stdout
        r = s.pacsctl("ae", "remove", "DEAD", check=False)
        assert r.returncode != 0
    finally:
        s.stop()


def test_invalid_entries_are_refused(cluster):
    s = kp.System(cluster, start=False)
    try:
        bad = [
            ["ae", "add", "THIS_AE_TITLE_IS_TOO_LONG", "--host", "h", "--port", "104"],
            ["ae", "add", "BACK\\SLASH", "--host", "h", "--port", "104"],
            ["ae", "add", " LEADING", "--host", "h", "--port", "104"],
            ["ae", "add", "OK", "--host", "h", "--port", "0"],
            ["ae", "add", "OK", "--host", "h", "--port", "70000"],
            ["ae", "add", "OK", "--host", "h", "--port", "10x"],
            ["ae", "add", "OK", "--port", "104"],
            ["ae", "add", "OK", "--host", "h", "--port", "104", "--bogus"],
        ]
        for args in bad:
            r = s.pacsctl(*args, check=False)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stderr.strip(), args
        assert s.sql("SELECT count(*) FROM modalities")[0][0] == 0
    finally:
        s.stop()


# ---- access per operation and site scope ------------------------------------------------------
_ROOT = "1.2.826.0.1.3680043.10.1411.55"
_STUDIES = {
    "S1": dict(name="NORTH^ONE", pid="AC-N1", date="20210101", time="080000", acc="ACN1",
               desc="north", ref="", birth="", sex="F", series=[("CT", 1, "a", [1, 2])]),
    "S2": dict(name="SOUTH^TWO", pid="AC-S2", date="20210102", time="080000", acc="ACS2",
               desc="south", ref="", birth="", sex="M", series=[("CT", 1, "b", [1])]),
    "S3": dict(name="BOTH^THREE", pid="AC-B3", date="20210103", time="080000", acc="ACB3",
               desc="north too", ref="", birth="", sex="O", series=[("MR", 1, "c", [1])]),
}


def _dimse(cmd, system, timeout=60, files=()):
    r = subprocess.run(cmd + ["127.0.0.1", str(system.port), *files], capture_output=True,
                       timeout=timeout, env=system.env)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    st = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", out)
    return (int(st[-1], 16) if st else None), out


def _find(system, aet, level="STUDY", model="-S", keys=("StudyInstanceUID",)):
    """findscu; returns (final status, response data sets)."""
    import pydicom
    with tempfile.TemporaryDirectory() as d:
        cmd = ["findscu", "-d", "-aet", aet, "-aec", "KLINIKA", model, "-X", "-od", d,
               "-k", f"QueryRetrieveLevel={level}"]
        for k in keys:
            cmd += ["-k", k]
        st, _ = _dimse(cmd, system)
        return st, [pydicom.dcmread(os.path.join(d, f), force=True)
                    for f in sorted(os.listdir(d)) if f.startswith("rsp")]


def _uids(rsps, keyword="StudyInstanceUID"):
    return {str(getattr(r, keyword)) for r in rsps}


def test_operation_access_and_site_scope(cluster):
    s = kp.System(cluster, extra_env={"KP_DICOM_STORE_REQUIRE_REGISTERED": "true",
                                      "KP_DICOM_FIND_REQUIRE_REGISTERED": "true"})
    data = datasets.Studies(_ROOT, _STUDIES)
    try:
        s.sql("INSERT INTO sites (name) VALUES ('north'), ('south')")
        add = lambda ae, *o: s.pacsctl("ae", "add", ae, "--host", "127.0.0.1", "--port", "104", *o)
        add("MODALITY", "--no-find", "--no-retrieve")
        add("NOSTORE", "--no-store")
        add("NORTHWS", "--site", "north", "--no-store")
        add("ALLWS", "--no-store")
        add("GHOSTWS", "--site", "nowhere", "--no-store")
        add("FINDONLY", "--no-store", "--no-retrieve")
        add("RETRONLY", "--no-store", "--no-find")
        with tempfile.TemporaryDirectory() as d:
            files = data.write(d)
            # C-STORE: allow_store required; refused with 0124 and nothing stored
            for aet in ("STRANGER", "NOSTORE"):
                st, out = _dimse(["storescu", "-d", "-aet", aet, "-aec", "KLINIKA"], s,
                                 files=files[:1])
                assert st == 0x0124, out[-2000:]
            assert s.count("instances") == 0
            rc, res, out = s.storescu(files, aet="MODALITY")
            assert all(res.get(f) == "ok" for f in files), out[-2000:]
        s.wait_indexed(4)
        n1, s2, b3 = (data.study_uid(k) for k in ("S1", "S2", "S3"))
        s.sql("UPDATE studies SET site_id = (SELECT id FROM sites WHERE name = 'north') "
              "WHERE study_uid IN (%s, %s)", (n1, b3))
        s.sql("UPDATE studies SET site_id = (SELECT id FROM sites WHERE name = 'south') "
              "WHERE study_uid = %s", (s2,))

        # C-FIND: allow_find required (MODALITY is store-only, RETRONLY retrieve-only)
        for aet in ("STRANGER", "MODALITY", "RETRONLY"):
            st, rsps = _find(s, aet)
            assert st == 0x0124 and not rsps, aet
        # site scope: every level of both models sees only the AE's site
        st, rsps = _find(s, "ALLWS")
        assert st == 0 and _uids(rsps) == {n1, s2, b3}
        st, rsps = _find(s, "NORTHWS")
        assert st == 0 and _uids(rsps) == {n1, b3}
        st, rsps = _find(s, "NORTHWS", "PATIENT", "-P",
                         ("PatientID", "NumberOfPatientRelatedStudies"))
        assert st == 0 and _uids(rsps, "PatientID") == {"AC-N1", "AC-B3"}
        assert {str(r.NumberOfPatientRelatedStudies) for r in rsps} == {"1"}
        st, rsps = _find(s, "NORTHWS", "SERIES", "-S",
                         (f"StudyInstanceUID={s2}", "SeriesInstanceUID"))
        assert st == 0 and not rsps  # a study of another site
        st, rsps = _find(s, "NORTHWS", "IMAGE", "-S",
                         (f"StudyInstanceUID={n1}", f"SeriesInstanceUID={data.series_uid('S1', 0)}",
                          "SOPInstanceUID"))
        assert st == 0 and _uids(rsps, "SOPInstanceUID") == {data.sop_uid("S1", 0, n)
                                                             for n in (1, 2)}
        st, rsps = _find(s, "GHOSTWS")  # names a site that does not exist: nothing
        assert st == 0 and not rsps
        assert "does not exist" in s.log("pacs-dicomd")

        # C-GET / C-MOVE: allow_retrieve required, and the site scope applies
        with tempfile.TemporaryDirectory() as d:
            def get(aet, study):
                return _dimse(["getscu", "-d", "-aet", aet, "-aec", "KLINIKA", "-S", "-od", d,
                               "-k", "QueryRetrieveLevel=STUDY", "-k",
                               f"StudyInstanceUID={study}"], s)
            st, out = get("FINDONLY", n1)
            assert st == 0x0124 and os.listdir(d) == [], out[-2000:]
            st, out = get("NORTHWS", s2)
            assert st == 0 and os.listdir(d) == [], out[-2000:]  # another site's: no match
            st, out = get("NORTHWS", n1)
            assert st == 0 and len(os.listdir(d)) == 2, out[-2000:]
        st, out = _dimse(["movescu", "-d", "-aet", "FINDONLY", "-aec", "KLINIKA", "-aem", "ALLWS",
                          "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={n1}"], s)
        assert st == 0x0124, out[-2000:]
        log = s.log("pacs-dicomd")
        assert "not a registered AE with allow_store" in log
        assert "not a registered AE with allow_find" in log
        assert "not a registered AE with allow_retrieve" in log
        assert s.echo(aet="STRANGER")  # operations are refused, not the association
    finally:
        s.stop()
