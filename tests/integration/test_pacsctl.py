"""pacsctl and the start-up contract of the daemons: migrations, schema version check,
--check-config, config-get, jobs listing/retry and the outbox sweep re-publishing a job."""
import os
import subprocess

import kp


def run(binary, *args, env=None):
    return subprocess.run([os.path.join(kp.BIN, binary), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=kp.REPO)


def test_migrate_is_idempotent(cluster):
    dsn = cluster.new_database()
    env = dict(os.environ, KP_DB_CONNINFO=dsn)
    r = run("pacsctl", "migrate", env=env)
    assert r.returncode == 0, r.stderr
    assert "0 migrations applied" in r.stdout
    rows = subprocess.run(["psql", "-X", "-tA", dsn, "-c", "SELECT count(*) FROM schema_migrations"],
                          capture_output=True, text=True).stdout.strip()
    assert rows == str(len([f for f in os.listdir(os.path.join(kp.REPO, "schema")) if f.endswith(".sql")]))


def test_daemons_refuse_unknown_schema(cluster):
    dsn = cluster.new_database()
    subprocess.run(["psql", "-X", "-q", dsn, "-c", "INSERT INTO schema_migrations VALUES (999, 'future')"],
                   check=True)
    env = dict(os.environ, KP_DB_CONNINFO=dsn, KP_DB_CONNECT_TIMEOUT="2")
    for b in ("pacs-indexer", "pacs-dicomd"):
        r = run(b, env=env)
        assert r.returncode != 0
        assert "schema" in r.stderr and "newer" in r.stderr, r.stderr
    r = run("pacsctl", "stats", env=env)
    assert r.returncode != 0
    r = run("pacsctl", "migrate", env=env)
    assert r.returncode != 0


def test_empty_database_is_refused_with_a_hint(cluster):
    cluster.admin("CREATE DATABASE kp_empty")
    env = dict(os.environ, KP_DB_CONNINFO=cluster.dsn("kp_empty"), KP_DB_CONNECT_TIMEOUT="2")
    r = run("pacs-indexer", env=env)
    assert r.returncode != 0
    assert "pacsctl migrate" in r.stderr


def test_check_config(tmp_path):
    good = tmp_path / "good.conf"
    good.write_text("[dicom]\nae_title = TESTAE\nport = 4242\n")
    for b in ("pacs-dicomd", "pacs-indexer", "pacs-busd", "pacsctl"):
        r = run(b, "--config", str(good), "--check-config")
        assert r.returncode == 0, (b, r.stderr)
        assert "configuration OK" in r.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("[dicom]\nport = 99999\n")
    r = run("pacs-dicomd", "--config", str(bad), "--check-config")
    assert r.returncode != 0 and "outside" in r.stderr
    r = run("pacsctl", "--config", str(good), "config-get", "dicom.ae_title")
    assert r.stdout.strip() == "TESTAE"
    env = dict(os.environ, KP_DICOM_PORT="104")
    r = run("pacsctl", "--config", str(good), "config-get", "dicom.port", env=env)
    assert r.stdout.strip() == "104"


def test_config_example_is_current():
    r = run("pacsctl", "config-example")
    with open(os.path.join(kp.REPO, "config/pacs.conf.example")) as f:
        assert r.stdout == f.read(), "regenerate with: build/bin/pacsctl config-example > config/pacs.conf.example"


def test_sweep_republishes_and_jobs_retry(cluster):
    """A job row with no bus message (as if the producer died right after its commit) is found by
    the outbox sweep and indexed; a failed job can be retried with pacsctl."""
    s = kp.System(cluster, start=False)
    try:
        s.start("pacs-busd")
        s.start("pacs-indexer#0", "pacs-indexer")
        s.start("pacs-auditor#0", "pacs-auditor")  # dicomd's association records settle too
        s.start_dicomd()
        f = os.path.join(kp.PYDICOM_DATA, "test_files", "CT_small.dcm")
        rc, res, out = s.storescu([f])
        assert res[f] == "ok", out
        s.wait_indexed(1, 30)
        path, sha, size = s.sql("SELECT path, file_sha256, file_size FROM instances")[0]
        # wipe the index and re-insert only the outbox row: nobody publishes it but the sweep
        s.sql("TRUNCATE instances, series, studies, patients")
        s.sql("INSERT INTO jobs (type, payload, lease_until) VALUES ('index', "
              "jsonb_build_object('path', %s::text, 'sha256', %s::text, 'size', %s::bigint, 'sop', 'x', 'ae', 'T'), now())",
              (path, sha, size))
        s.wait_indexed(1, 30)
        s.wait_jobs_settled(30)
        # a job for a file that is not DICOM fails, is listed, and can be retried
        bad_rel = "ff/ff/" + "f" * 64 + ".dcm"
        os.makedirs(os.path.join(s.env["KP_STORAGE_ROOT"], "ff/ff"), exist_ok=True)
        with open(os.path.join(s.env["KP_STORAGE_ROOT"], bad_rel), "wb") as fh:
            fh.write(b"not dicom at all")
        s.sql("INSERT INTO jobs (type, payload, lease_until) VALUES ('index', jsonb_build_object('path', %s::text), now())",
              (bad_rel,))
        kp.wait_for(lambda: s.sql("SELECT count(*) FROM jobs WHERE state='failed'")[0][0] == 1, 30, "job failed")
        out = s.pacsctl("jobs", "--state", "failed").stdout
        assert "failed" in out
        assert "retry" not in out
        r = s.pacsctl("jobs", "retry", "--failed")
        assert "1 job(s)" in r.stdout
        kp.wait_for(lambda: s.sql("SELECT count(*) FROM jobs WHERE state='failed'")[0][0] == 1, 30, "job failed again")
        assert s.alive("pacs-indexer#0")
        st = s.pacsctl("stats").stdout
        assert "instances  1" in st
        assert "index" in st
    finally:
        s.stop()
