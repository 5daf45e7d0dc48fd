"""Documents generated from the code stay in step with it."""
import os
import subprocess

import kp


def test_security_route_matrix_is_current():
    r = subprocess.run([os.path.join(kp.REPO, "scripts", "route-matrix"), "--bin", kp.BIN,
                        "--check", os.path.join(kp.REPO, "docs", "security.md")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
