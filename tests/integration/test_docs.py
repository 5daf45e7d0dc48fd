"""Documents generated from the code stay in step with it."""
import os
import subprocess

import kp


def test_security_route_matrix_is_current():
    r = subprocess.run([os.path.join(kp.REPO, "scripts", "route-matrix"), "--bin", kp.BIN,
                        "--check", os.path.join(kp.REPO, "docs", "security.md")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_openapi_lists_every_route_with_a_summary():
    """pacs-gateway --openapi (also served at GET /api/openapi.json) is built from the route
    table: every route is there with its permission, and each has a summary."""
    import json
    import re
    routes = [json.loads(l) for l in subprocess.run(
        [os.path.join(kp.BIN, "pacs-gateway"), "--routes"], capture_output=True, text=True,
        check=True).stdout.splitlines()]
    doc = json.loads(subprocess.run([os.path.join(kp.BIN, "pacs-gateway"), "--openapi"],
                                    capture_output=True, text=True, check=True).stdout)
    assert doc["openapi"].startswith("3.0") and doc["info"]["title"]
    n = 0
    for r in routes:
        path = r["path"].replace("...}", "}")
        op = doc["paths"][path][r["method"].lower()]
        assert op["x-permission"] == r["permission"], r
        assert op["summary"], f"no summary for {r['method']} {r['path']} (gateway/http/kp_openapi.c)"
        names = re.findall(r"\{(\w+)\}", path)
        assert [p["name"] for p in op["parameters"]] == names
        assert ("401" in op["responses"]) == (r["permission"] != "public")
        n += 1
    assert n == sum(len(v) for v in doc["paths"].values())  # nothing listed that is not a route
    ids = [o["operationId"] for v in doc["paths"].values() for o in v.values()]
    assert len(ids) == len(set(ids))
